"""A fake Anthropic upstream on 127.0.0.1 that records what it received.

It answers like api.anthropic.com (docs/protocol.md, "Responses and streaming"): JSON
messages, SSE streams with padded JSON and pings, count_tokens. A test can swap
``FakeUpstream.handler`` for a function of its own to inject a fault, and can gate a stream on
a ``threading.Event`` so that it proves the gateway relays event 1 before the upstream sends
event 2.
"""

import contextlib
import json
import select
import socket
import ssl
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

UPSTREAM_KEY = "sk-ant-upstream-test-key-0123456789abcdef"
GATE_TIMEOUT = 10.0  # bounded: a buffering gateway makes the test fail, never hang


def sse(event, data, pad=0):
    """One SSE event as the real API frames it: padded JSON, '\\n' line ends."""
    text = json.dumps(data, separators=(",", ":"))
    if pad:
        text = text[:-1] + " " * pad + "}"
    return ("event: %s\ndata: %s\n\n" % (event, text)).encode()


def message(model, text="Hello!", input_tokens=12, output_tokens=5):
    return {
        "id": "msg_01fake", "type": "message", "role": "assistant", "model": model,
        "content": [{"type": "text", "text": text}], "stop_reason": "end_turn",
        "stop_sequence": None,
        "usage": {"input_tokens": input_tokens, "cache_creation_input_tokens": 0,
                  "cache_read_input_tokens": 3, "output_tokens": output_tokens},
    }


def text_stream(model, pieces=("Hel", "lo", "!"), input_tokens=12):
    """The events of a streamed text answer, one bytes object per event."""
    start = message(model, "", input_tokens, 1)
    start["content"], start["stop_reason"] = [], None
    events = [sse("message_start", {"type": "message_start", "message": start}, pad=7),
              sse("content_block_start", {"type": "content_block_start", "index": 0,
                                          "content_block": {"type": "text", "text": ""}}),
              b'event: ping\ndata: {"type": "ping"}\n\n']
    for piece in pieces:
        events.append(sse("content_block_delta", {
            "type": "content_block_delta", "index": 0,
            "delta": {"type": "text_delta", "text": piece}}, pad=13))
    events += [sse("content_block_stop", {"type": "content_block_stop", "index": 0}),
               sse("message_delta", {"type": "message_delta",
                                     "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                                     "usage": {"output_tokens": len(pieces) + 4}}, pad=3),
               sse("message_stop", {"type": "message_stop"}, pad=7)]
    return events


class Received:
    """One request as the upstream saw it."""

    def __init__(self, method, path, headers, body):
        self.method, self.path, self.headers, self.body = method, path, headers, body

    def json(self):
        return json.loads(self.body)


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def do_POST(self):
        length = int(self.headers.get("Content-Length", 0))
        body = self.rfile.read(length)
        received = Received("POST", self.path, {k.lower(): v for k, v in self.headers.items()},
                            body)
        self.server.fake.received.append(received)
        self.server.fake.handler(self, received)

    do_GET = do_POST

    def do_HEAD(self):
        """What 'gateway check --online' sends: counted, answered 404 with no body."""
        self.server.fake.heads += 1
        self.send_response(404)
        self.send_header("Content-Length", "0")
        self.end_headers()

    # -- answers a handler can give -----------------------------------------------------------

    def send_json(self, status, payload, headers=None):
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("request-id", "req_upstream_1")
        self.send_header("anthropic-organization-id", "org-secret-upstream")
        self.send_header("Set-Cookie", "_cfuvid=upstream-cookie; path=/")
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    def start_sse(self, framing="chunked"):
        """Send SSE headers; 'close' framing means HTTP/1.0 style: no length, no chunks, the
        end of the body is the end of the connection."""
        self.framing = framing
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream; charset=utf-8")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("request-id", "req_upstream_stream")
        if framing == "chunked":
            self.send_header("Transfer-Encoding", "chunked")
        else:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.flush()

    def send_chunk(self, data):
        if self.framing == "chunked":
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        else:
            self.wfile.write(data)
        self.wfile.flush()

    def end_sse(self):
        if self.framing == "chunked":
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()

    def wait_for_client_gone(self, timeout=GATE_TIMEOUT):
        """True once the gateway closed this connection (EOF or reset), within ``timeout``."""
        sock = self.connection
        readable, _, _ = select.select([sock], [], [], timeout)
        if not readable:
            return False
        try:
            return sock.recv(1) == b""
        except OSError:
            return True


class _Server(ThreadingHTTPServer):
    request_queue_size = 128  # socketserver's 5 drops connects under load (the soak's bursts)

    def get_request(self):
        """Accept, count the connection, and with TLS wrap it: the handshake itself happens
        on the first read, in the connection's own thread, so a client that fails it (or
        never starts it) holds up nobody else."""
        sock, address = super().get_request()
        self.fake.connections += 1
        # Headers and body go out in two writes; with Nagle's algorithm the second waits for
        # the client's delayed ACK of the first, 40 ms per answer on Linux.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.fake.tls is not None:
            sock = self.fake.tls.wrap_socket(sock, server_side=True,
                                             do_handshake_on_connect=False)
        return sock, address

    def handle_error(self, request, client_address):
        # Expected, not worth a traceback: a refused certificate, a gateway that hung up.
        if not isinstance(sys.exc_info()[1], (ssl.SSLError, ConnectionResetError,
                                               BrokenPipeError)):
            super().handle_error(request, client_address)


class FakeUpstream:
    """The server plus what the tests steer and observe."""

    def __init__(self, tls=None):
        """``tls``: a server-side ``ssl.SSLContext`` to answer over TLS (see ``tls_server``)."""
        self.tls = tls
        self.connections = 0  # accepted TCP connections (TLS sessions, with tls)
        self.heads = 0  # HEAD requests
        self.received = []
        self.handler = default_handler
        self.framing = "chunked"
        self.gate = None          # a threading.Event: the stream waits on it after event 1
        self.gate_timed_out = threading.Event()
        self.client_gone = threading.Event()
        self.stream_finished = threading.Event()
        self.server = _Server(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.server.fake = self
        self.port = self.server.server_address[1]
        self.url = "%s://127.0.0.1:%d" % ("https" if tls else "http", self.port)
        self._thread = threading.Thread(target=self.server.serve_forever, args=(0.05,),
                                        daemon=True)

    def start(self):
        self._thread.start()
        return self

    def stop(self):
        self.server.shutdown()
        self.server.server_close()

    @property
    def last(self):
        return self.received[-1]


def tls_server(leaf):
    """A server-side TLS context presenting ``leaf`` (a ``trustme`` LeafCert)."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    leaf.configure_cert(context)
    return context


def default_handler(handler, received):
    fake = handler.server.fake
    if received.headers.get("x-api-key") != UPSTREAM_KEY:
        return handler.send_json(401, {"type": "error", "error": {
            "type": "authentication_error", "message": "invalid x-api-key"}})
    path = received.path.split("?")[0]
    if path == "/v1/messages/count_tokens":
        return handler.send_json(200, {"input_tokens": 42})
    if path != "/v1/messages":
        return handler.send_json(404, {"type": "error", "error": {
            "type": "not_found_error", "message": "Not Found"}})
    body = received.json()
    if not body.get("stream"):
        return handler.send_json(200, message(body["model"]), {
            "anthropic-ratelimit-requests-remaining": "99", "retry-after": "1"})
    stream_events(handler, text_stream(body["model"]), fake)


def stream_events(handler, events, fake):
    """Send ``events``; after the first, wait for ``fake.gate`` when a test set one."""
    handler.start_sse(fake.framing)
    try:
        for number, event in enumerate(events):
            handler.send_chunk(event)
            if number == 0 and fake.gate is not None:
                if not fake.gate.wait(GATE_TIMEOUT):
                    fake.gate_timed_out.set()
        handler.end_sse()
        fake.stream_finished.set()
    except (BrokenPipeError, ConnectionResetError):
        fake.client_gone.set()


@contextlib.contextmanager
def refused_port():
    """A port on 127.0.0.1 that refuses connections: bound and never listening, and held for
    the block, so no other server (another test run's) can start listening there meanwhile.
    Servers the tests start bind port 0 and say which port they got; there is no picking a
    free port and hoping it stays free."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


PING = b'event: ping\ndata: {"type": "ping"}\n\n'
PINGS_BEFORE_GIVING_UP = 100


def abandoned_stream(handler, received):
    """A stream whose client leaves after the first event: ``message_start`` (input and
    cache counts), then pings, as the real API sends while it thinks, until the gateway hangs
    up. So the tokens returned are exactly those of ``message_start``, wherever the gateway
    notices the client left. Bounded: at most PINGS_BEFORE_GIVING_UP pings."""
    fake = handler.server.fake
    handler.start_sse(fake.framing)
    try:
        handler.send_chunk(text_stream(received.json()["model"])[0])
        for _ in range(PINGS_BEFORE_GIVING_UP):
            handler.send_chunk(PING)
            if handler.wait_for_client_gone(0.1):
                break
        else:
            return
    except (BrokenPipeError, ConnectionResetError):
        pass
    fake.client_gone.set()


def returned_usage(kind, model="claude-opus-4-8-20261101"):
    """The token counts this fake returns for one answer of ``kind`` ('json', 'stream' or
    'abandoned'), read from the bodies it sends, the way a client adds them up."""
    if kind == "json":
        return dict(message(model)["usage"])
    events = text_stream(model)[:1] if kind == "abandoned" else text_stream(model)
    usage = {}
    for event in events:
        data = json.loads(event.split(b"data: ", 1)[1])
        if data["type"] == "message_start":
            usage.update(data["message"]["usage"])
        elif data["type"] == "message_delta":
            usage.update(data["usage"])
    return usage
