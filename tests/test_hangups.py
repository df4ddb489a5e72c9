"""Nothing held after the client leaves or the load ends. A client that hangs up while the
upstream has not yet answered (no headers: a long non-streamed answer) gets its upstream
connection closed, under the shipped gthread and gevent configs, directly and behind the
shipped nginx; after a burst, the workers' threads and open files come back.

The upstream here accepts requests and never answers, the way a long thinking answer looks
until it is complete; ``read_timeout`` is 600 s, so only the gateway noticing the hang-up can
close its connections within the bound below.
"""
import contextlib
import json
import os
import re
import socket
import sys
import threading
import time

import pytest

from conftest import ANY_PORT, CLIENT_KEY, ROOT, key_line, listening_url, missing
from test_deploy import DEPLOY, SITE_NAME, running_nginx, serving, started, wait_for
from upstream import UPSTREAM_KEY, message

CLIENTS = 20
WAIT = 10
BOUND = 2.0  # seconds from the hang-ups until every upstream connection is closed


class SilentUpstream:
    """Reads each request and answers none until a test calls ``answer(marker)``; records
    each unanswered request whose connection the gateway closed. ``marker`` is the request's
    first user message. Answered connections serve the next request (keep-alive)."""

    def __init__(self, tls=None):
        self.tls = tls  # an ssl.SSLContext for an https upstream
        self.listener = socket.create_server(("127.0.0.1", 0), backlog=256)
        self.url = "%s://127.0.0.1:%d" % ("https" if tls else "http",
                                          self.listener.getsockname()[1])
        self.lock = threading.Lock()
        self.waiting = {}  # marker -> the connection its request came on
        self.answered = set()
        self.closed = []   # markers whose connection the gateway closed before the answer
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn):
        if self.tls is not None:
            conn = self.tls.wrap_socket(conn, server_side=True)
        with conn:
            data, marker = b"", None
            while True:
                try:
                    chunk = conn.recv(65536)
                except OSError:
                    chunk = b""
                if not chunk:
                    with self.lock:
                        if marker is not None and marker not in self.answered:
                            self.closed.append(marker)
                    return
                data += chunk
                if b"\r\n\r\n" not in data:
                    continue
                head, body = data.split(b"\r\n\r\n", 1)
                length = int(next(line.split(b":", 1)[1] for line in head.split(b"\r\n")
                                  if line.lower().startswith(b"content-length:")))
                if len(body) < length:
                    continue
                data = body[length:]
                marker = json.loads(body[:length])["messages"][0]["content"]
                with self.lock:
                    self.waiting[marker] = conn

    def answer(self, marker):
        payload = json.dumps(message("claude-opus-4-8-20261101")).encode()
        with self.lock:
            self.answered.add(marker)
            conn = self.waiting[marker]
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(payload), payload))

    def stop(self):
        self.listener.close()


def request_bytes(marker, host):
    body = json.dumps({"model": "claude-opus-4-8", "max_tokens": 10,
                       "messages": [{"role": "user", "content": marker}]}).encode()
    return (b"POST /v1/messages HTTP/1.1\r\nHost: %s\r\nx-api-key: %s\r\n"
            b"anthropic-version: 2023-06-01\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (host.encode(), CLIENT_KEY.encode(),
                                                len(body), body))


@pytest.fixture
def silent_upstream():
    fake = SilentUpstream()
    yield fake
    fake.stop()


@pytest.fixture
def silent_config(tmp_path, silent_upstream):
    (tmp_path / "upstream.key").write_text(UPSTREAM_KEY + "\n")
    (tmp_path / "gateway.keys").write_text(key_line("alice", CLIENT_KEY))
    (tmp_path / "gateway.ini").write_text(
        "[gateway]\nupstream_url = %s\nkeys_file = gateway.keys\n"
        "upstream_key_file = upstream.key\nread_timeout = 600\n"
        "[models]\nclaude-opus-4-8 = claude-opus-4-8-20261101\n" % silent_upstream.url)
    return tmp_path


@contextlib.contextmanager
def gevent_gateway(config_dir, tmp_path):
    """deploy/gunicorn-gevent.conf.py under plain gunicorn: yields (port, log path)."""
    try:
        import gevent  # noqa: F401
    except ImportError:
        missing("gevent is not installed (it is in the test extra)")
    command = [sys.executable, "-m", "gunicorn", "-c",
               os.path.join(DEPLOY, "gunicorn-gevent.conf.py"),
               "--bind", ANY_PORT, "--pythonpath", ROOT]
    log_path = tmp_path / "gevent.log"
    with started(command, log_path, {"GATEWAY_CONFIG": str(config_dir / "gateway.ini")}):
        yield int(listening_url(log_path).rsplit(":", 1)[1]), log_path


@contextlib.contextmanager
def gateway_for(worker, via, config_dir, tmp_path):
    """The gateway as deployed: yields ((host, port) clients connect to, gateway log path)."""
    if worker == "gthread":
        server = serving(config_dir, tmp_path)
    else:
        server = gevent_gateway(config_dir, tmp_path)
    with server as started_server:
        port, log_path = started_server[-2:]
        if via == "direct":
            yield ("127.0.0.1", port), log_path
            return
        with running_nginx(tmp_path, [port]) as base:
            yield ("127.0.0.1", int(base.rsplit(":", 1)[1])), log_path


@pytest.mark.parametrize("via", ["direct", "nginx"])
@pytest.mark.parametrize("worker", ["gthread", "gevent"])
def test_clients_leaving_before_the_answer_close_their_upstream_connections(
        worker, via, silent_upstream, silent_config, tmp_path):
    host = SITE_NAME if via == "nginx" else "localhost"
    with gateway_for(worker, via, silent_config, tmp_path) as (address, log_path):
        leaving = [socket.create_connection(address, timeout=WAIT) for _ in range(CLIENTS)]
        for number, client in enumerate(leaving):
            client.sendall(request_bytes("leaves-%d" % number, host))
        # A client that stays, with a second request pipelined behind its first: bytes
        # waiting on its socket must not read as a hang-up.
        staying = socket.create_connection(address, timeout=WAIT)
        staying.sendall(request_bytes("stays", host) + b"GET /healthz HTTP/1.1\r\nHost: "
                        + host.encode() + b"\r\nConnection: close\r\n\r\n")
        wait_for(lambda: len(silent_upstream.waiting) == CLIENTS + 1,
                 "every request to reach the upstream")
        for client in leaving:
            client.close()
        left = time.monotonic()
        wait_for(lambda: len(silent_upstream.closed) >= CLIENTS,
                 "the gateway to close the upstream connections", timeout=WAIT)
        elapsed = time.monotonic() - left
        assert sorted(silent_upstream.closed) == sorted("leaves-%d" % n for n in range(CLIENTS))
        assert elapsed <= BOUND, "%d upstream connections closed after %.2f s" % (
            CLIENTS, elapsed)
        silent_upstream.answer("stays")
        answer = b""
        while b'{"status": "ok"}' not in answer:
            chunk = staying.recv(65536)
            if not chunk:
                break
            answer += chunk
        staying.close()
        assert answer.startswith(b"HTTP/1.1 200 ")
        assert b'"msg_01fake"' in answer and b'{"status": "ok"}' in answer
        wait_for(lambda: sum(1 for line in open(log_path, encoding="utf-8")
                             if '"client went away"' in line) >= CLIENTS, "the access log")
        records = [json.loads(line) for line in open(log_path, encoding="utf-8")
                   if line.startswith('{"time"')]
        gone = [r for r in records if r.get("error") == "client went away"]
        assert len(gone) == CLIENTS and {r["status"] for r in gone} == {499}
        assert "Traceback" not in log_path.read_text()


def tcp_pair():
    """(accepted, connected): both ends of one loopback TCP connection."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        connected = socket.create_connection(listener.getsockname())
        return listener.accept()[0], connected


def test_client_watch_closes_the_upstream_of_a_client_that_hung_up_and_only_that():
    """ClientWatch on socket pairs: the client that closed has its upstream socket shut down;
    one that sent more bytes and then closed (a pipelined request) is not taken for gone, nor
    is one still there; a server without gunicorn.socket is not watched."""
    import gateway
    watch = gateway.ClientWatch()
    pairs = {name: (tcp_pair(), tcp_pair()) for name in ("hung_up", "pipelined", "still_there")}
    with contextlib.ExitStack() as stack:
        waiting = {}
        for name, ((server_side, _), (upstream, _)) in pairs.items():
            environ = {"gunicorn.socket": server_side, "SERVER_PROTOCOL": "HTTP/1.1"}
            waiting[name] = stack.enter_context(watch.watching(environ))
            waiting[name].upstream = upstream
        pairs["pipelined"][0][1].sendall(b"GET /healthz HTTP/1.1\r\n\r\n")
        pairs["pipelined"][0][1].close()
        pairs["hung_up"][0][1].close()
        upstream_peer = pairs["hung_up"][1][1]
        upstream_peer.settimeout(WAIT)
        assert upstream_peer.recv(1) == b""  # shut down by the watch's thread
        watch._check()  # one more look: the others stay
        assert [name for name, w in waiting.items() if w.client_gone] == ["hung_up"]
    with watch.watching({"SERVER_PROTOCOL": "HTTP/1.1"}) as unwatched:
        assert unwatched is None


def worker_totals(master_pid):
    """(open fds, threads) summed over the gunicorn workers of ``master_pid``."""
    fds = threads = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        with contextlib.suppress(OSError, ValueError, IndexError):
            with open("/proc/%s/stat" % entry) as file:
                if int(file.read().rsplit(")", 1)[1].split()[1]) != master_pid:
                    continue
            with open("/proc/%s/status" % entry) as file:
                status = dict(line.split(":", 1) for line in file.read().splitlines())
            fds += len(os.listdir("/proc/%s/fd" % entry))
            threads += int(status["Threads"])
    return fds, threads


def read_answer(client):
    """One whole HTTP response with a Content-Length, from a raw socket."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = client.recv(65536)
        assert chunk, data
        data += chunk
    head, body = data.split(b"\r\n\r\n", 1)
    length = int(re.search(rb"(?im)^content-length:\s*(\d+)", head).group(1))
    while len(body) < length:
        chunk = client.recv(65536)
        assert chunk, data + body
        body += chunk
    return head + b"\r\n\r\n" + body


BURST = 60


def test_after_a_burst_threads_and_open_files_come_back(silent_upstream, silent_config,
                                                         tmp_path):
    """A burst of 60 requests held open at once starts a thread and an upstream connection
    for each; once they are answered, the workers' threads and open files come back to
    within 20 of the warm figures within 10 s (gthread kept every thread it started, and
    each thread its own upstream connection, until the worker restarted)."""
    with serving(silent_config, tmp_path) as (process, port, _):
        def ask(marker):
            client = socket.create_connection(("127.0.0.1", port), timeout=WAIT)
            client.sendall(request_bytes(marker, "localhost"))
            return client

        for number in range(4):  # warm: pools, key file, state file, a few threads
            client = ask("warm-%d" % number)
            wait_for(lambda: "warm-%d" % number in silent_upstream.waiting, "warm request")
            silent_upstream.answer("warm-%d" % number)
            assert read_answer(client).startswith(b"HTTP/1.1 200 ")
            client.close()
        warm = worker_totals(process.pid)
        clients = [ask("burst-%d" % number) for number in range(BURST)]
        wait_for(lambda: sum(m.startswith("burst-") for m in list(silent_upstream.waiting))
                 == BURST, "the burst to reach the upstream")
        peak = worker_totals(process.pid)
        assert peak[1] >= warm[1] + BURST - 10, (warm, peak)  # a thread for each, or close
        for number in range(BURST):
            silent_upstream.answer("burst-%d" % number)
        for client in clients:
            assert read_answer(client).startswith(b"HTTP/1.1 200 ")
            client.close()
        deadline = time.monotonic() + 10
        while True:
            back = worker_totals(process.pid)
            if back[0] <= warm[0] + 20 and back[1] <= warm[1] + 20:
                break
            assert time.monotonic() < deadline, ("not back within 10 s", warm, peak, back)
            time.sleep(0.1)


def test_a_wait_on_an_https_upstream_ends_too(tmp_path):
    """The same over TLS, in process: the app called with a gunicorn.socket whose client
    closes; the upstream's TLS connection is closed and the exchange logged as 499."""
    import ssl
    import webtest
    trustme = pytest.importorskip("trustme")
    from conftest import auth
    from test_tls import tls_app
    ca = trustme.CA()
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(context)
    fake = SilentUpstream(context)
    try:
        app = tls_app(tmp_path, fake.url, ca, read_timeout=600)
        server_side, client_side = tcp_pair()
        answers = []

        def call():
            answers.append(webtest.TestApp(app).post_json(
                "/v1/messages", {"model": "claude-opus-4-8", "max_tokens": 10,
                                 "messages": [{"role": "user", "content": "tls"}]},
                headers=auth(), status="*",
                extra_environ={"gunicorn.socket": server_side, "SERVER_PROTOCOL": "HTTP/1.1"}))
        thread = threading.Thread(target=call, daemon=True)
        thread.start()
        wait_for(lambda: "tls" in fake.waiting, "the request to reach the upstream")
        client_side.close()
        left = time.monotonic()
        wait_for(lambda: fake.closed == ["tls"], "the upstream connection to close")
        assert time.monotonic() - left <= BOUND
        thread.join(WAIT)
        assert [answer.status_int for answer in answers] == [499]
    finally:
        fake.stop()
