#!/usr/bin/env python3
"""The gateway's benchmark: what it adds to a call, side by side with "direct" and "nginx".

Run it from a checkout (wrk and nginx from the Debian packages; nothing else beyond what the
tests use)::

    python3 tests/benchmark.py --json bench.json      # about 4 minutes
    python3 tests/benchmark.py --quick                # CI smoke run, about a minute

One run starts, on 127.0.0.1 only:

- a fast fake upstream (asyncio, this file's ``--upstream`` mode) that answers JSON and paced,
  chunked SSE, so that the upstream is never the bottleneck: the "direct" row proves it;
- nginx ``proxy_pass`` to it with upstream keepalive (the practical floor of any proxy);
- the gateway exactly as deployed: ``./gateway serve`` with ``deploy/gunicorn.conf.py``;
- the same gateway with an https upstream ("gateway_https"): nginx terminates TLS in front of
  the fake upstream with a certificate from a CA made here (``trustme``, in the test extra),
  and the gateway trusts that CA (``upstream_ca_file``). Against the "gateway" row this is
  what TLS to the upstream costs with the pool's connection reuse, plus one nginx hop (the
  "nginx" row's own added latency).

The proxy under test is pinned to core 0 and the load generator and upstream to core 1 (when
the machine has two cores or more), so throughput and CPU per request are per core. wrk
measures latency and throughput; a small asyncio client measures what wrk cannot (time to
first and last SSE event, byte equality, 200 slow streams), and /proc gives CPU and RSS.
Every figure is printed with its ratio to direct and to nginx and written to ``--json``.
Every wait is bounded and every process started here is stopped here. The exit status is 1
when a target answered errors or changed the SSE bytes, never because a figure is slow.

pytest does not collect this file (no ``test_`` name); it has no assertions, only figures.
"""

import argparse
import asyncio
import contextlib
import hashlib
import json
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from statistics import median

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLIENT_KEY = "sk-gw-bench-0123456789abcdefghijklmnopqrstuv"
UPSTREAM_KEY = "sk-ant-bench-upstream-0123456789abcdef"
PUBLIC_MODEL = "claude-opus-4-8"
UPSTREAM_MODEL = "claude-opus-4-8-20261101"

#: The targets of issue 5 (per core, same run).
TARGETS = {
    "added_c1_p50_ms": 0.7, "added_c1_p99_ms": 2.0, "rps_c16": 1300,
    "added_ttfe_p99_ms_c50": 2.0, "late_first_events_200": 0, "rss_idle_mb": 60,
    "rss_after_vs_idle": 1.10, "added_5mb_p50_ms": 20.0,
}


# ---------------------------------------------------------------------------------------------
# The fast fake upstream (runs in its own process: --upstream PORT)
# ---------------------------------------------------------------------------------------------
#
# asyncio.Protocol with prebuilt answers: one core serves tens of thousands of small JSON
# answers a second, far above what a Python proxy can send it. SSE is chunked, one event per
# chunk, like the real API; ``?events=N&gap_ms=M`` paces it (the gateway forwards the query).

def sse(event, data, pad=0):
    text = json.dumps(data, separators=(",", ":"))
    if pad:
        text = text[:-1] + " " * pad + "}"
    return ("event: %s\ndata: %s\n\n" % (event, text)).encode()


def sse_events(count):
    """A realistic streamed answer of ``count`` events (message_start ... message_stop)."""
    start = {"id": "msg_01bench", "type": "message", "role": "assistant",
             "model": UPSTREAM_MODEL, "content": [], "stop_reason": None, "stop_sequence": None,
             "usage": {"input_tokens": 12, "cache_creation_input_tokens": 0,
                       "cache_read_input_tokens": 0, "output_tokens": 1}}
    events = [sse("message_start", {"type": "message_start", "message": start}, pad=7),
              sse("content_block_start", {"type": "content_block_start", "index": 0,
                                          "content_block": {"type": "text", "text": ""}}),
              b'event: ping\ndata: {"type": "ping"}\n\n']
    for number in range(max(1, count - 6)):
        events.append(sse("content_block_delta", {
            "type": "content_block_delta", "index": 0,
            "delta": {"type": "text_delta", "text": "token %d " % number}}, pad=13))
    events += [sse("content_block_stop", {"type": "content_block_stop", "index": 0}),
               sse("message_delta", {"type": "message_delta",
                                     "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                                     "usage": {"output_tokens": count}}, pad=3),
               sse("message_stop", {"type": "message_stop"}, pad=7)]
    return events


JSON_ANSWER = json.dumps({
    "id": "msg_01bench", "type": "message", "role": "assistant", "model": UPSTREAM_MODEL,
    "content": [{"type": "text", "text": "Hello! How can I help you today?"}],
    "stop_reason": "end_turn", "stop_sequence": None,
    "usage": {"input_tokens": 12, "cache_creation_input_tokens": 0,
              "cache_read_input_tokens": 0, "output_tokens": 11}}).encode()
JSON_RESPONSE = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
                 b"request-id: req_bench_json\r\nanthropic-ratelimit-requests-remaining: 99\r\n"
                 b"\r\n%s" % (len(JSON_ANSWER), JSON_ANSWER))
SSE_HEAD = (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream; charset=utf-8\r\n"
            b"Cache-Control: no-cache\r\nrequest-id: req_bench_sse\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n")


class UpstreamProtocol(asyncio.Protocol):
    def __init__(self):
        self.buffer = bytearray()
        self.head = None
        self.need = 0
        self.transport = None
        self.timer = None

    def connection_made(self, transport):
        self.transport = transport

    def connection_lost(self, exc):
        if self.timer is not None:
            self.timer.cancel()

    def data_received(self, data):
        self.buffer += data
        while True:
            if self.head is None:
                end = self.buffer.find(b"\r\n\r\n")
                if end < 0:
                    return
                self.head = bytes(self.buffer[:end])
                del self.buffer[:end + 4]
                match = re.search(rb"(?i)\r\ncontent-length:\s*(\d+)", self.head)
                self.need = int(match.group(1)) if match else 0
            if len(self.buffer) < self.need:
                return
            body = self.buffer[:self.need]
            del self.buffer[:self.need]
            head, self.head = self.head, None
            self.answer(head, body)

    def answer(self, head, body):
        if b'"stream":true' not in body:
            self.transport.write(JSON_RESPONSE)
            return
        target = head.split(b" ", 2)[1].decode()
        query = dict(part.split("=", 1) for part in target.partition("?")[2].split("&")
                     if "=" in part)
        events = sse_events(int(query.get("events", 20)))
        gap = int(query.get("gap_ms", 20)) / 1000
        self.transport.write(SSE_HEAD + b"%x\r\n%s\r\n" % (len(events[0]), events[0]))
        self.send_later(events, 1, gap)

    def send_later(self, events, index, gap):
        def send():
            if self.transport.is_closing():
                return
            event = events[index]
            last = index == len(events) - 1
            self.transport.write(b"%x\r\n%s\r\n%s" % (len(event), event,
                                                       b"0\r\n\r\n" if last else b""))
            if not last:
                self.send_later(events, index + 1, gap)
        self.timer = asyncio.get_running_loop().call_later(gap, send)


def run_upstream(port):
    """Serve on ``port`` (0: one the kernel picks), and say which on stdout."""
    async def serve():
        server = await asyncio.get_running_loop().create_server(
            UpstreamProtocol, "127.0.0.1", port, backlog=4096, reuse_address=True)
        print("listening on %d" % server.sockets[0].getsockname()[1], flush=True)
        async with server:
            await server.serve_forever()
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve())


# ---------------------------------------------------------------------------------------------
# Processes: pinning, starting, stopping, CPU and memory from /proc
# ---------------------------------------------------------------------------------------------

def picked_port():
    """A port the kernel just handed out, for a server that cannot bind port 0 and say which
    it got (granian, uWSGI in --scenario servers, run by hand): another server could take it
    first; everything CI starts binds 0 (logged_port) or retries (run_nginx)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_port(port, process, timeout=30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError("%s exited with %s" % (process.args, process.returncode))
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError("nothing listens on %d after %.0f s" % (port, timeout))


def logged_port(path, pattern, process, timeout=30.0):
    """The port a server we started logged it listens on (it bound port 0)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        match = re.search(pattern, open(path, errors="replace").read())
        if match:
            return int(match.group(1))
        if process.poll() is not None:
            raise RuntimeError("%s exited with %s" % (process.args, process.returncode))
        time.sleep(0.05)
    raise RuntimeError("no listening port in %s after %.0f s" % (path, timeout))


def cores():
    """(proxy core, load core): 0 and 1 on a machine with two cores or more, else None."""
    try:
        available = sorted(os.sched_getaffinity(0))
    except AttributeError:
        available = list(range(os.cpu_count() or 1))
    if len(available) >= 2 and shutil.which("taskset"):
        return str(available[0]), str(available[1])
    return None, None


def pinned(core, argv):
    return ["taskset", "-c", core] + argv if core is not None else argv


def stop(process, timeout=15.0):
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)


def process_tree(pid):
    """``pid`` and its descendants (the gunicorn master and its workers, nginx and its worker)."""
    children = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open("/proc/%s/stat" % entry) as file:
                    ppid = int(file.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    tree, todo = [], [pid]
    while todo:
        current = todo.pop()
        tree.append(current)
        todo.extend(children.get(current, []))
    return tree


def cpu_seconds(pid, members=None):
    """User plus system CPU time of the tree, in seconds (of ``members``, its pids, when
    given: finding the tree reads every process's /proc entry)."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for member in members or process_tree(pid):
        try:
            with open("/proc/%d/stat" % member) as file:
                fields = file.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
        except (OSError, IndexError, ValueError):
            pass
    return total / ticks


def steal_seconds():
    """The machine's CPU time that its host gave to others while this virtual machine had
    work ready (/proc/stat's steal, all cores), in seconds: 0 on a machine of its own."""
    with open("/proc/stat") as file:
        fields = file.readline().split()
    return int(fields[8]) / os.sysconf("SC_CLK_TCK") if len(fields) > 8 else 0.0


def memory_mb(pid):
    """(RSS, PSS) of the tree in MB. RSS counts pages the forked workers share with the master
    once per process (that is what the target names); PSS splits shared pages fairly."""
    rss = pss = 0
    for member in process_tree(pid):
        try:
            member_rss, member_pss = process_memory_mb(member)
        except OSError:  # exited meanwhile
            continue
        rss, pss = rss + member_rss, pss + member_pss
    return rss, pss


def process_memory_mb(pid):
    """(RSS, PSS) of the one process ``pid`` in MB."""
    found = {}
    with open("/proc/%d/smaps_rollup" % pid) as file:
        for line in file:
            name, _, value = line.partition(":")
            if name in ("Rss", "Pss"):
                found[name] = int(value.split()[0]) / 1024
    return found["Rss"], found["Pss"]


def thread_count(pid):
    """Threads of the tree: gthread starts one per concurrent request (up to 'threads')."""
    count = 0
    for member in process_tree(pid):
        try:
            with open("/proc/%d/status" % member) as file:
                count += int(next(line for line in file if line.startswith("Threads:"))
                             .split()[1])
        except (OSError, StopIteration, ValueError):
            pass
    return count


class PeakSampler:
    """Samples the tree's memory every ``every`` seconds in a thread: ``peak`` is the highest
    RSS seen, ``peak_pss`` the highest PSS (memory_mb)."""

    def __init__(self, pid, every=0.05):
        self.pid, self.every, self._stop = pid, every, threading.Event()
        self.peak = self.peak_pss = 0.0
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            rss, pss = memory_mb(self.pid)
            self.peak, self.peak_pss = max(self.peak, rss), max(self.peak_pss, pss)
            self._stop.wait(self.every)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(5)


# ---------------------------------------------------------------------------------------------
# The three targets: direct, nginx, gateway
# ---------------------------------------------------------------------------------------------

def nginx_proxy_conf(server_head):
    """An nginx config that proxies everything to the fake upstream (one worker, kept-alive
    connections, nothing buffered); ``server_head`` opens its server block (listen and the
    like). The %(dir)s, %(upstream)d and %(port)d in it are for run_nginx to fill in."""
    return _PROXY_CONF_HEAD + server_head + _PROXY_CONF_TAIL


_PROXY_CONF_HEAD = """\
worker_processes 1;
error_log %(dir)s/nginx-error.log notice;
pid %(dir)s/nginx.pid;
events { worker_connections 4096; }
http {
    access_log off;
    client_body_temp_path %(dir)s/body;
    proxy_temp_path %(dir)s/proxy;
    fastcgi_temp_path %(dir)s/fastcgi;
    uwsgi_temp_path %(dir)s/uwsgi;
    scgi_temp_path %(dir)s/scgi;
    upstream fake { server 127.0.0.1:%(upstream)d; keepalive 256; }
    server {
"""
_PROXY_CONF_TAIL = """\
        keepalive_requests 1000000;
        client_max_body_size 64m;
        location / {
            proxy_pass http://fake;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
            proxy_request_buffering off;
            proxy_read_timeout 600s;
        }
    }
}
"""


NGINX_CONF = nginx_proxy_conf("        listen 127.0.0.1:%(port)d;\n")


def start_nginx(workdir, upstream_port, core):
    return run_nginx(os.path.join(workdir, "nginx"), NGINX_CONF, upstream_port, core)


def run_nginx(directory, template, upstream_port, core, attempts=5):
    """nginx with ``template`` in ``directory``; returns (process, port). nginx cannot listen
    on port 0 and say which port it got, so it gets one the kernel just handed out and, when
    another server took that port first ('Address already in use'), starts again on another.
    It is ready once it logs its worker's start, which it does only after binding."""
    os.makedirs(directory, exist_ok=True)
    errors = os.path.join(directory, "nginx-error.log")
    for _ in range(attempts):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        conf = os.path.join(directory, "nginx.conf")
        with open(conf, "w") as file:
            file.write(template % {"dir": directory, "upstream": upstream_port, "port": port})
        if os.path.exists(errors):
            os.unlink(errors)
        process = subprocess.Popen(
            pinned(core, [shutil.which("nginx") or "/usr/sbin/nginx", "-c", conf, "-p",
                          directory, "-g", "daemon off;"]),
            stdout=subprocess.DEVNULL, stderr=open(os.path.join(directory, "stderr"), "wb"))
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            text = open(errors, errors="replace").read() if os.path.exists(errors) else ""
            if "Address already in use" in text:
                stop(process)
                break
            if "start worker process" in text:
                return process, port
            if process.poll() is not None:
                raise RuntimeError("nginx exited: %s" % text[-2000:])
            time.sleep(0.05)
        else:
            stop(process)
            raise RuntimeError("nginx did not start in 30 s")
    raise RuntimeError("nginx found no free port in %d attempts" % attempts)


TLS_TERMINATOR_CONF = nginx_proxy_conf("""\
        listen 127.0.0.1:%(port)d ssl;
        ssl_certificate %(dir)s/upstream.pem;
        ssl_certificate_key %(dir)s/upstream.key;
        keepalive_timeout 600s;
""")


def start_tls_upstream(workdir, upstream_port, core):
    """nginx terminating TLS in front of the fake upstream, on the upstream's core; returns
    (process, port, path of the CA certificate that signed its certificate)."""
    import trustme  # the test extra; only this target needs it
    directory = os.path.join(workdir, "tls-upstream")
    os.makedirs(directory, exist_ok=True)
    authority = trustme.CA()
    leaf = authority.issue_cert("127.0.0.1")
    leaf.private_key_pem.write_to_path(os.path.join(directory, "upstream.key"))
    leaf.cert_chain_pems[0].write_to_path(os.path.join(directory, "upstream.pem"))
    ca_path = os.path.join(directory, "ca.pem")
    authority.cert_pem.write_to_path(ca_path)
    process, port = run_nginx(directory, TLS_TERMINATOR_CONF, upstream_port, core)
    return process, port, ca_path


def start_gateway(workdir, upstream_port, core, gunicorn_config=None, keys=1, serve_args=(),
                  settings="", key_lines="", upstream_url=None, environment=None):
    """``./gateway serve`` with the shipped gunicorn defaults (only --bind differs), and a key
    file of ``keys`` keys, the benchmark's own last (then ``key_lines``). ``settings`` are
    more [gateway] lines; ``upstream_url`` replaces http://127.0.0.1:``upstream_port``;
    ``environment``, variables added to its environment."""
    directory = os.path.join(workdir, "gateway")
    os.makedirs(directory, exist_ok=True)
    write_key_file(os.path.join(directory, "gateway.keys"), keys)
    with open(os.path.join(directory, "gateway.keys"), "a") as file:
        file.write(key_lines)
    with open(os.path.join(directory, "upstream.key"), "w") as file:
        file.write(UPSTREAM_KEY + "\n")
    os.chmod(os.path.join(directory, "upstream.key"), 0o600)
    ini = os.path.join(directory, "gateway.ini")
    with open(ini, "w") as file:
        file.write("[gateway]\nupstream_url = %s\nkeys_file = gateway.keys\n"
                   "upstream_key_file = upstream.key\n%s[models]\n%s = %s\n"
                   % (upstream_url or "http://127.0.0.1:%d" % upstream_port, settings,
                      PUBLIC_MODEL, UPSTREAM_MODEL))
    argv = [sys.executable, os.path.join(ROOT, "gateway"), "serve", "--config", ini,
            "--bind", "127.0.0.1:0"]  # the kernel picks the port; gunicorn logs it
    if gunicorn_config:
        argv += ["--gunicorn-config", gunicorn_config]
    argv += list(serve_args)
    log_path = os.path.join(directory, "serve.log")
    process = subprocess.Popen(pinned(core, argv), stdout=subprocess.DEVNULL,
                               stderr=open(log_path, "wb"),
                               env=dict(clean_environment(), **(environment or {})))
    port = logged_port(log_path, r"Listening at: http://127\.0\.0\.1:(\d+)", process)
    # gunicorn listens before its workers have booted: wait until every worker answers.
    deadline, stable = time.monotonic() + 30, 0
    while time.monotonic() < deadline and stable < 5:  # the same count for 0.5 s
        text = open(log_path, errors="replace").read()
        booted = len(re.findall(r"Booting worker", text))
        stable = stable + 1 if booted and booted == len(process_tree(process.pid)) - 1 else 0
        time.sleep(0.1)
    return process, port, log_path


def write_key_file(path, keys):
    """``keys - 1`` keys of a large organisation, then the benchmark's own key."""
    with open(path, "w") as file:
        file.writelines("user%06d sha256:%s * enabled\n" % (
            number, hashlib.sha256(b"sk-gw-someone-else-%d" % number).hexdigest())
            for number in range(keys - 1))
        file.write("bench sha256:%s * enabled\n" % hashlib.sha256(CLIENT_KEY.encode()).hexdigest())


def clean_environment():
    environment = dict(os.environ)
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy",
                 "all_proxy", "GATEWAY_CONFIG", "ANTHROPIC_API_KEY"):
        environment.pop(name, None)
    return environment


# ---------------------------------------------------------------------------------------------
# wrk: latency and throughput
# ---------------------------------------------------------------------------------------------

WRK_SCRIPT = """\
local f = io.open("%(body)s", "rb")
wrk.method = "%(method)s"
if wrk.method == "POST" then wrk.body = f:read("*a") end
f:close()
wrk.headers["Content-Type"] = "application/json"
wrk.headers["x-api-key"] = "%(key)s"
wrk.headers["anthropic-version"] = "2023-06-01"
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {"requests":%%d,"duration_us":%%d,"bytes":%%d,"errors":%%d,"non2xx":%%d,' ..
    '"p50_us":%%d,"p90_us":%%d,"p99_us":%%d,"p999_us":%%d,"mean_us":%%.1f,"max_us":%%d}\\n',
    summary.requests, summary.duration, summary.bytes,
    e.connect + e.read + e.write + e.timeout, e.status,
    latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency:percentile(99.9), latency.mean, latency.max))
end
"""


def small_body(stream=False):
    body = {"model": PUBLIC_MODEL, "max_tokens": 256,
            "messages": [{"role": "user", "content": "Hello, Claude"}]}
    if stream:
        body["stream"] = True
    return json.dumps(body, separators=(",", ":")).encode()


def image_body(size):
    """An image-sized message: one base64 image block of about ``size`` bytes."""
    data = (b"iVBORw0KGgoAAAANSUhEUgAA" * (size // 24 + 1))[:size].decode()
    return json.dumps({"model": PUBLIC_MODEL, "max_tokens": 256, "messages": [{
        "role": "user", "content": [
            {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                         "data": data}},
            {"type": "text", "text": "What is in this image?"}]}]},
        separators=(",", ":")).encode()


def wrk(port, body_path, connections, seconds, core, workdir, path="/v1/messages",
        method="POST", key=CLIENT_KEY):
    script = os.path.join(workdir, "wrk-%s-%s.lua" % (method, os.path.basename(body_path)))
    with open(script, "w") as file:
        file.write(WRK_SCRIPT % {"body": body_path, "key": key, "method": method})
    argv = pinned(core, ["wrk", "-t1", "-c%d" % connections, "-d%ds" % seconds,
                         "--timeout", "10s", "-s", script,
                         "http://127.0.0.1:%d%s" % (port, path)])
    result = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 60)
    match = re.search(r"^WRKJSON (.*)$", result.stdout, re.M)
    if not match:
        raise RuntimeError("wrk failed: %s %s" % (result.stdout, result.stderr))
    figures = json.loads(match.group(1))
    figures["rps"] = figures["requests"] / (figures["duration_us"] / 1e6)
    return figures


# ---------------------------------------------------------------------------------------------
# The SSE client: time to first and last event, and the bytes
# ---------------------------------------------------------------------------------------------

async def one_stream(port, events, gap_ms, start_at=None):
    """POST a streaming request; return (seconds to first event, to last event, body bytes)
    with the body de-chunked, so direct's and the proxies' bytes compare equal."""
    body = small_body(stream=True)
    request = post_request(CLIENT_KEY, body,
                           "/v1/messages?events=%d&gap_ms=%d" % (events, gap_ms))
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        started = time.monotonic()
        writer.write(request)
        head = await reader.readuntil(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 200"):
            raise RuntimeError("stream answered %r" % head[:200])
        chunked = b"transfer-encoding: chunked" in head.lower()
        data, first, last = bytearray(), None, None
        while True:
            if chunked:
                size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
                chunk = await reader.readexactly(size + 2)
                chunk = chunk[:-2]
                if size == 0:
                    break
            else:
                chunk = await reader.read(65536)
                if not chunk:
                    break
            data += chunk
            now = time.monotonic()
            if first is None and b"\n\n" in data:
                first = now - started
            if data.endswith(b"\n\n") and b"event: message_stop" in data[-200:]:
                last = now - started
        return first, last, bytes(data)
    finally:
        writer.close()


def percentile(values, fraction):
    ordered = sorted(values)
    if not ordered:
        return None
    index = min(len(ordered) - 1, max(0, int(round(fraction * (len(ordered) - 1)))))
    return ordered[index]


def streams(port, concurrency, rounds, events, gap_ms, timeout, burst=True):
    """``concurrency`` streams open at once, ``rounds`` times each: TTFE/TTLE p50 and p99.

    A burst starts them all in the same instant, so the last one waits for the proxy to
    accept and forward the other ones first (queueing, on one core). Otherwise the starts are
    spread evenly over one stream's length and each slot starts its next stream when the last
    ends: ``concurrency`` streams are always open and each new one meets a proxy busy relaying
    the others, which is the steady state the "at 50 streams" target is about.
    """
    length = events * gap_ms / 1000

    async def slot(number):
        if not burst:
            await asyncio.sleep(length * number / concurrency)
        return [await one_stream(port, events, gap_ms) for _ in range(rounds)]

    async def run():
        if burst:
            results = []
            for _ in range(rounds):
                results += await asyncio.wait_for(asyncio.gather(*[
                    one_stream(port, events, gap_ms) for _ in range(concurrency)]), timeout)
            return results
        slots = await asyncio.wait_for(asyncio.gather(*[
            slot(number) for number in range(concurrency)]), timeout)
        return [result for results in slots for result in results]
    results = asyncio.run(run())
    firsts = [r[0] for r in results]
    lasts = [r[1] for r in results]
    bodies = {r[2] for r in results}
    return {
        "streams": len(results),
        "ttfe_p50_ms": percentile(firsts, 0.5) * 1000, "ttfe_p99_ms": percentile(firsts, 0.99)
        * 1000, "ttle_p50_ms": percentile(lasts, 0.5) * 1000,
        "ttle_p99_ms": percentile(lasts, 0.99) * 1000,
        "late_first_events": sum(1 for f in firsts if f > 1.0),
        "body_sha256": hashlib.sha256(results[0][2]).hexdigest() if len(bodies) == 1 else None,
        "bodies_identical": len(bodies) == 1,
        "_body": results[0][2],
    }


# ---------------------------------------------------------------------------------------------
# One target, every figure
# ---------------------------------------------------------------------------------------------

def measure(name, port, pid, plan, load_core, workdir, bodies):
    """Every figure for one target. ``pid`` is the process tree whose CPU and RSS count (the
    upstream for direct, nginx, or the gunicorn master and its workers)."""
    figures = {}
    say = lambda text: print("  %-8s %s" % (name, text), flush=True)  # noqa: E731
    # Warm up: connections, imports, pools, the first key-file read.
    wrk(port, bodies["small"], 4, 1, load_core, workdir)
    streams(port, 2, 1, 4, 1, 30)
    time.sleep(plan["settle"])
    figures["rss_idle_mb"], figures["pss_idle_mb"] = memory_mb(pid)
    figures["threads_idle"] = thread_count(pid)

    c1 = wrk(port, bodies["small"], 1, plan["seconds"], load_core, workdir)
    figures.update(c1_p50_ms=c1["p50_us"] / 1000, c1_p99_ms=c1["p99_us"] / 1000,
                   c1_rps=c1["rps"], errors_c1=c1["errors"] + c1["non2xx"])
    say("c1 p50 %.3f ms p99 %.3f ms" % (figures["c1_p50_ms"], figures["c1_p99_ms"]))

    for connections in (16, 64):
        before = cpu_seconds(pid)
        with PeakSampler(pid) as sampler:
            run = wrk(port, bodies["small"], connections, plan["seconds"], load_core, workdir)
        cpu = cpu_seconds(pid) - before
        figures["rps_c%d" % connections] = run["rps"]
        figures["p99_ms_c%d" % connections] = run["p99_us"] / 1000
        figures["cpu_ms_per_req_c%d" % connections] = cpu * 1000 / max(1, run["requests"])
        figures["errors_c%d" % connections] = run["errors"] + run["non2xx"]
        if connections == 64:
            figures["rss_load_mb"] = sampler.peak
        say("c%d %.0f req/s, %.3f ms CPU/req, %d errors" % (
            connections, run["rps"], figures["cpu_ms_per_req_c%d" % connections],
            figures["errors_c%d" % connections]))

    for concurrency, rounds in ((1, plan["stream_rounds_1"]), (50, plan["stream_rounds_50"])):
        result = streams(port, concurrency, rounds, 20, 20, 120, burst=False)
        for key in ("ttfe_p50_ms", "ttfe_p99_ms", "ttle_p50_ms", "ttle_p99_ms"):
            figures["%s_s%d" % (key, concurrency)] = result[key]
        figures["sse_body_s%d" % concurrency] = result["_body"]
        figures["sse_consistent_s%d" % concurrency] = result["bodies_identical"]
        say("%d stream(s): TTFE p50 %.2f p99 %.2f ms, TTLE p50 %.1f ms" % (
            concurrency, result["ttfe_p50_ms"], result["ttfe_p99_ms"], result["ttle_p50_ms"]))
    burst = streams(port, 50, plan["stream_rounds_50"], 20, 20, 120, burst=True)
    figures["burst_ttfe_p50_ms_s50"] = burst["ttfe_p50_ms"]
    figures["burst_ttfe_p99_ms_s50"] = burst["ttfe_p99_ms"]
    say("burst of 50 streams: TTFE p50 %.2f p99 %.2f ms" % (burst["ttfe_p50_ms"],
                                                            burst["ttfe_p99_ms"]))

    with PeakSampler(pid) as sampler:
        slow = streams(port, plan["slow_streams"], 1, plan["slow_events"], 250, 120)
    figures["late_first_events_200"] = slow["late_first_events"]
    figures["slow_ttfe_p99_ms"] = slow["ttfe_p99_ms"]
    figures["rss_peak_slow_mb"] = sampler.peak
    figures["threads_slow"] = thread_count(pid)  # as the streams end: none retired yet
    say("%d slow streams: %d first events later than 1 s, peak RSS %.1f MB" % (
        plan["slow_streams"], slow["late_first_events"], sampler.peak))

    big = wrk(port, bodies["big"], 1, plan["seconds"], load_core, workdir)
    figures["big_p50_ms"] = big["p50_us"] / 1000
    figures["big_p99_ms"] = big["p99_us"] / 1000
    figures["errors_5mb"] = big["errors"] + big["non2xx"]
    say("5 MB body p50 %.2f ms" % figures["big_p50_ms"])

    # "After load" is memory settled within settle_after seconds of the load's end: RSS is
    # sampled every 0.5 s and the row reads the last sample; rss_back_s says how soon the
    # tree came within 0.5 MB of it (the samples are in the JSON).
    ended, samples = time.monotonic(), []
    while True:
        samples.append((round(time.monotonic() - ended, 2),) + memory_mb(pid))
        if samples[-1][0] >= plan["settle_after"]:
            break
        time.sleep(0.5)
    figures["rss_after_mb"], figures["pss_after_mb"] = samples[-1][1:]
    figures["rss_after_samples_mb"] = [(at, round(rss, 1)) for at, rss, _ in samples]
    figures["rss_back_s"] = next(at for at, rss, _ in samples
                                 if rss <= figures["rss_after_mb"] + 0.5)
    figures["threads_after"] = thread_count(pid)
    say("RSS idle %.1f MB, under load %.1f MB, after %.1f MB (back %.1f s after the load)" % (
        figures["rss_idle_mb"], figures["rss_load_mb"], figures["rss_after_mb"],
        figures["rss_back_s"]))
    say("threads idle %d, after the slow streams %d, after load %d" % (
        figures["threads_idle"], figures["threads_slow"], figures["threads_after"]))
    return figures


# ---------------------------------------------------------------------------------------------
# Scenarios of issue 16: cost that does not grow with the work
# ---------------------------------------------------------------------------------------------

KEY_COUNTS = (10, 100_000)
KEY_COMMANDS = [("keys list", ["keys", "list"]), ("keys add", ["keys", "add", "newcomer"]),
                ("keys set", ["keys", "set", "newcomer", "--rpm", "60"]),
                ("keys rotate", ["keys", "rotate", "newcomer"]),
                ("keys revoke", ["keys", "revoke", "newcomer"]), ("check", ["check"])]


def scenario_keys(plan, workdir, upstream_port, proxy_core, load_core, bodies):
    """GET /v1/models at concurrency 1 with 10 and with 100,000 keys in the key file (the
    benchmark's key last), then each operator command and a key-file parse at 100,000 keys."""
    figures = {}
    for count in KEY_COUNTS:
        process, port, _ = start_gateway(workdir, upstream_port, proxy_core, keys=count)
        try:
            # Warm-up: each worker reads the key file on its first request.
            wrk(port, bodies["small"], 4, 1, load_core, workdir, "/v1/models", "GET")
            run = wrk(port, bodies["small"], 1, plan["seconds"], load_core, workdir,
                      "/v1/models", "GET")
        finally:
            stop(process)
        figures["keys_%d" % count] = {"p50_ms": run["p50_us"] / 1000,
                                      "p99_ms": run["p99_us"] / 1000, "rps": run["rps"],
                                      "errors": run["errors"] + run["non2xx"]}
        print("  %7d keys: GET /v1/models c1 p50 %.3f ms, p99 %.3f ms, %d errors" % (
            count, run["p50_us"] / 1000, run["p99_us"] / 1000, run["errors"] + run["non2xx"]),
            flush=True)
    small, large = (figures["keys_%d" % count]["p50_ms"] for count in KEY_COUNTS)
    figures["p50_ratio"] = large / small
    print("  p50 with %d keys / with %d keys: %.2f× (target <= 1.25×)" % (
        KEY_COUNTS[1], KEY_COUNTS[0], figures["p50_ratio"]))
    directory = os.path.join(workdir, "gateway")  # holds the 100,000-key file now
    ini = os.path.join(directory, "gateway.ini")
    for label, command in KEY_COMMANDS:
        started = time.monotonic()
        result = subprocess.run([sys.executable, os.path.join(ROOT, "gateway")] + command
                                + ["--config", ini], stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, env=clean_environment(), timeout=300)
        figures["%s_s" % label.replace(" ", "_")] = seconds = time.monotonic() - started
        print("  gateway %s at %d keys: %.2f s%s" % (
            label, KEY_COUNTS[1], seconds, "" if result.returncode == 0 else
            " (exit %d: %s)" % (result.returncode, result.stderr.decode().strip())), flush=True)
    sys.path.insert(0, ROOT)
    import gateway
    with open(os.path.join(directory, "gateway.keys")) as file:
        text = file.read()
    started = time.monotonic()
    gateway.parse_key_file(text)
    figures["reload_s"] = time.monotonic() - started
    print("  a worker's key-file reload (parse) at %d keys: %.2f s" % (KEY_COUNTS[1],
                                                                      figures["reload_s"]))
    return figures


def write_access_log(path, lines, seed=16):
    """``lines`` access-log lines as ``Exchange.log`` writes them: 300 keys, three models, one
    line in 301 refused before authentication, a gunicorn line every 1,000."""
    import random
    rng = random.Random(seed)
    keys = ["user%04d" % number for number in range(300)] + [None]
    models = [PUBLIC_MODEL, "claude-opus-4-7", "claude-sonnet-4-5"]
    with open(path, "w") as file:
        for number in range(lines):
            key = rng.choice(keys)
            record = {"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(
                1764000000 + number * 30)),
                "request_id": "req_gw_%024x" % rng.getrandbits(96),
                "upstream_request_id": "req_011CV%020d" % number if key else None,
                "client_ip": "10.1.2.%d" % (number % 250), "method": "POST",
                "path": "/v1/messages", "key": key, "model": rng.choice(models) if key else None,
                "upstream_model": UPSTREAM_MODEL if key else None,
                "status": 200 if key else 401, "stream": bool(number % 2),
                "duration_ms": 1234.56, "ttfb_ms": 345.67 if key else None}
            if key:
                record.update(input_tokens=rng.randrange(50000), output_tokens=rng.randrange(
                    4000), cache_creation_input_tokens=0, cache_read_input_tokens=rng.randrange(
                    10000))
            file.write(json.dumps(record) + "\n")
            if number % 1000 == 0:
                file.write("[2026-11-25 15:04:28 +0000] [42] [INFO] Booting worker with pid: 42\n")
        # On disk before it is timed: otherwise the first run shares the core with the kernel
        # writing the log back (7.5 s for 4.8 on a run that did not wait).
        file.flush()
        os.fsync(file.fileno())


def scenario_usage(plan, workdir, upstream_port, proxy_core, load_core, bodies):
    """'gateway usage' over a log of plan["usage_lines"] lines, then over three copies of it
    (the same memory is the point): lines a second and peak memory, first on one core (one
    process, the figure earlier rounds measured), then on two (a process a core: 'gateway
    usage' reads in as many processes as it has cores)."""
    path = os.path.join(workdir, "access.log")
    write_access_log(path, plan["usage_lines"])
    figures = {"bytes": os.path.getsize(path)}
    environment = installed_environment(workdir)
    both = "%s,%s" % (proxy_core, load_core) if proxy_core is not None else None
    for prefix, cores_given in (("", proxy_core), ("two_cores_", both)):
        print("  %s:" % ("one core" if prefix == "" else "two cores"), flush=True)
        for copies in (1, 3):
            lines = plan["usage_lines"] * copies
            run = usage_run(pinned(cores_given, [
                sys.executable, os.path.join(ROOT, "gateway"), "usage"] + [path] * copies),
                environment)
            figures["%scopies_%d" % (prefix, copies)] = dict(
                run, lines=lines, lines_per_s=lines / run["seconds"])
            print("    %d lines (%.0f MB): %.2f s, %.0f lines/s, peak RSS %.1f MB (largest "
                  "process), %.1f MB PSS (all, sampled)" % (
                      lines, figures["bytes"] * copies / 1e6, run["seconds"],
                      lines / run["seconds"], run["peak_rss_mb"], run["peak_pss_mb_sum"]),
                  flush=True)
    return figures


def installed_environment(workdir):
    """clean_environment, with the bytecode that an installed gateway has: pip writes
    gateway.py's bytecode as it installs it (even with PYTHONDONTWRITEBYTECODE set), so an
    installed 'gateway usage' never compiles it, where one run from this checkout with that
    setting compiles it on every run (about 0.07 s on this project's machine, a few per cent
    of a timed run). The bytecode goes under ``workdir``, not into the checkout, and is
    written here, before anything is timed."""
    environment = clean_environment()
    environment.pop("PYTHONDONTWRITEBYTECODE", None)
    environment["PYTHONPYCACHEPREFIX"] = os.path.join(workdir, "bytecode")
    empty = os.path.join(workdir, "empty.log")
    open(empty, "w").close()
    subprocess.run([sys.executable, os.path.join(ROOT, "gateway"), "usage", empty],
                   stdout=subprocess.DEVNULL, env=environment, check=True, timeout=60)
    return environment


def usage_run(argv, environment):
    """Run one 'gateway usage': its time, the peak RSS of its largest process (the kernel's
    figure), and the peak of its processes' PSS added up, sampled every 0.1 s beside it
    (worker processes share the parent's pages until they write them: PSS counts them
    once)."""
    started = time.monotonic()
    process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, env=environment)
    with PeakSampler(process.pid, every=0.1) as sampler:
        _, status, usage = os.wait4(process.pid, 0)
        seconds = time.monotonic() - started
    return {"seconds": seconds, "peak_rss_mb": usage.ru_maxrss / 1024,
            "peak_pss_mb_sum": sampler.peak_pss, "exit": os.waitstatus_to_exitcode(status)}


LIMITED_KEY = "sk-gw-bench-limited-0123456789abcdefghijklmnop"
#: Limits that a benchmark never reaches, so that every request is admitted and counted:
#: rpm and concurrency are the two that write on every request.
LIMITED_LINE = "limited sha256:%s * enabled rpm=1000000000 concurrency=100000\n" % (
    hashlib.sha256(LIMITED_KEY.encode()).hexdigest())
#: rpm alone: the admit call and nothing after the response (no slot, no tokens), so its
#: figure is what one round trip to the backend costs a request.
ADMIT_ONLY_KEY = "sk-gw-bench-admit-only-0123456789abcdefghijklm"
ADMIT_ONLY_LINE = "admit-only sha256:%s * enabled rpm=1000000000\n" % (
    hashlib.sha256(ADMIT_ONLY_KEY.encode()).hexdigest())


#: The keys of --scenario limits, in the order of a round (the next round goes backwards).
LIMITS_KEYS = (("unlimited", CLIENT_KEY), ("admit_only", ADMIT_ONLY_KEY), ("limited", LIMITED_KEY))


def scenario_limits(plan, workdir, upstream_port, proxy_core, load_core, bodies):
    """What per-key limits cost a request: an unlimited key, a limited one (rpm and
    concurrency, never reached) and one with rpm alone (the admit call only), first with the
    limits in this host's SQLite file, then in
    Redis (a redis-server on a unix socket, pinned beside wrk and the upstream, or beside the
    gateway with --redis-core gateway). Latency at
    concurrency 1 (this process's client: p50 and p99), CPU per request of the gateway at
    concurrency 1, and of the gateway and redis-server at concurrency 16 (wrk).

    The c1 latencies are measured with the three keys taking turns of 50 requests on one
    connection of the same gateway (turn_about_c1), ``limits_rounds`` times
    ``limits_round_seconds`` per key in all: what a key adds is its p50 less the unlimited
    key's, over all their requests, so a change of the machine's speed (other work on a
    shared machine moves a p50 by more than the 0.05 ms looked for) falls on every key
    alike. The figures per part (the run cut in ``limits_rounds``) show how far one part
    is from the next; the gateway's CPU per request at c1 that a key adds is the median
    of the parts' (at c1 that CPU is about the whole p50)."""
    binary = shutil.which("redis-server") or "/usr/bin/redis-server"
    directory = os.path.join(workdir, "redis")
    os.makedirs(directory, exist_ok=True)
    socket_path = os.path.join(directory, "redis.sock")
    redis_core = proxy_core if plan["redis_core"] == "gateway" else load_core
    redis = subprocess.Popen(pinned(redis_core, [
        binary, "--port", "0", "--unixsocket", socket_path, "--dir", directory, "--save", "",
        "--appendonly", "no", "--maxmemory-policy", "noeviction"]), stdout=subprocess.DEVNULL)
    figures = {}
    try:
        deadline = time.monotonic() + 10
        while not os.path.exists(socket_path) and time.monotonic() < deadline:
            time.sleep(0.05)
        backends = (("sqlite", ""), ("redis", "limits_backend = unix://%s?db=0\n" % socket_path))
        for backend, settings in backends:
            process, port, _ = start_gateway(workdir, upstream_port, proxy_core,
                                             settings=settings,
                                             key_lines=LIMITED_LINE + ADMIT_ONLY_LINE)
            try:
                found = limits_keys(plan, port, process.pid, redis.pid, load_core, workdir,
                                    bodies)
            finally:
                stop(process)
            for label, _ in LIMITS_KEYS:
                figures["%s_%s" % (backend, label)] = found[label]
                print("  %-6s %-9s c1 p50 %.3f ms p99 %.3f ms; c16 %.0f req/s, CPU/req: "
                      "gateway %.3f ms, redis %.3f ms" % (
                          backend, label, *(found[label][name] for
                                            name in ("c1_p50_ms", "c1_p99_ms", "rps_c16",
                                                     "cpu_ms_per_req_c16",
                                                     "redis_cpu_ms_per_req_c16"))),
                      flush=True)
            for label in ("limited", "admit_only"):
                print("  %-6s %-9s adds, c1 p50 %.3f ms (per part: %s ms); gateway CPU/req "
                      "at c1, median %.3f ms" % (
                          backend, label, found["added_c1_p50_ms"][label],
                          ", ".join("%.3f" % added for added in found["added"][label]),
                          median(found["added_cpu"][label])))
            print("  %-6s the host's other work took %.1f %% of the cores during the c1 turns "
                  "(steal)" % (backend, found["c1_steal_percent"]))
            limited, unlimited = found["limited"], found["unlimited"]
            figures["%s_added_c1_p50_ms" % backend] = found["added_c1_p50_ms"]["limited"]
            figures["%s_added_cpu_ms_per_req_c16" % backend] = (
                limited["cpu_ms_per_req_c16"] - unlimited["cpu_ms_per_req_c16"])
            figures["%s_admit_only_added_c1_p50_ms" % backend] = (
                found["added_c1_p50_ms"]["admit_only"])
            figures["%s_added_c1_p50_rounds_ms" % backend] = found["added"]
            figures["%s_c1_steal_percent" % backend] = found["c1_steal_percent"]
            for label in ("limited", "admit_only"):
                figures["%s_%s_added_cpu_ms_per_req_c1" % (backend, label)] = median(
                    found["added_cpu"][label])
        figures["redis_ping_us"] = ping_across_cores(socket_path, proxy_core)
    finally:
        stop(redis)
    figures["unlimited_redis_vs_sqlite_c1_p50_ms"] = (figures["redis_unlimited"]["c1_p50_ms"]
                                                      - figures["sqlite_unlimited"]["c1_p50_ms"])
    print("  a limited key adds, c1 p50: SQLite %.3f ms, Redis %.3f ms (target <= 0.15 ms); "
          "CPU/req: SQLite %.3f ms, Redis %.3f ms in the gateway" % (
              figures["sqlite_added_c1_p50_ms"], figures["redis_added_c1_p50_ms"],
              figures["sqlite_added_cpu_ms_per_req_c16"],
              figures["redis_added_cpu_ms_per_req_c16"]))
    print("  an unlimited key with Redis configured vs without, c1 p50: %+.3f ms (target: 0)"
          % figures["unlimited_redis_vs_sqlite_c1_p50_ms"])
    print("  the admit call alone (rpm only) adds, c1 p50: SQLite %.3f ms, Redis %.3f ms; a "
          "bare PING from the gateway's core to Redis's, 1 ms apart: p50 %.0f us" % (
              figures["sqlite_admit_only_added_c1_p50_ms"],
              figures["redis_admit_only_added_c1_p50_ms"], figures["redis_ping_us"]))
    return figures


def ping_across_cores(socket_path, core, count=2000, gap=0.001):
    """The p50 in microseconds of a bare PING to the Redis at ``socket_path`` from a process
    on ``core`` (the gateway's), ``gap`` seconds apart as a request's calls are: the floor
    under any call the gateway makes to Redis on this machine, its cores waking included."""
    program = (
        "import socket, sys, time\n"
        "s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); times = []\n"
        "for _ in range(%d):\n"
        "    started = time.perf_counter(); s.sendall(b'PING\\r\\n'); s.recv(64)\n"
        "    times.append(time.perf_counter() - started); time.sleep(%r)\n"
        "print(sorted(times)[len(times) // 2] * 1e6)\n" % (count, gap))
    result = subprocess.run(pinned(core, [sys.executable, "-c", program, socket_path]),
                            capture_output=True, text=True, timeout=60, check=True)
    return float(result.stdout)


def limits_keys(plan, port, pid, redis_pid, load_core, workdir, bodies):
    """{label: a key's figures (LIMITS_KEYS), "added": {label: [c1 p50 over the unlimited
    key's, ms, per part of the run]}, "added_cpu": {label: [the gateway's CPU per request at
    c1 over the unlimited key's, ms, per part]}, "added_c1_p50_ms": {label: the p50 of all
    the key's c1 requests less the unlimited key's}} on one gateway (see scenario_limits)."""
    for _, key in LIMITS_KEYS:
        wrk(port, bodies["small"], 4, 1, load_core, workdir, key=key)  # warm: pools, scripts
    with open(bodies["small"], "rb") as file:
        body = file.read()
    stolen, started = steal_seconds(), time.monotonic()
    parts = turn_about_c1(port, body, pid, plan["limits_rounds"],
                          plan["limits_rounds"] * plan["limits_round_seconds"]
                          * len(LIMITS_KEYS))
    found = {"added": {}, "added_cpu": {}, "added_c1_p50_ms": {},
             # a share of the two cores' time the host gave to others: 0-2 % in stop 22's
             # runs, while a bare PING between the cores took 67-144 us (docs/performance.md)
             "c1_steal_percent": 100 * (steal_seconds() - stolen)
                                 / (os.cpu_count() * (time.monotonic() - started))}
    everything = {label: [value for part in parts for value in part[label]["us"]]
                  for label, _ in LIMITS_KEYS}
    p50_us = {label: percentile(values, 0.50) for label, values in everything.items()}
    for label, key in LIMITS_KEYS:
        before, redis_before = cpu_seconds(pid), cpu_seconds(redis_pid)
        c16 = wrk(port, bodies["small"], 16, plan["seconds"], load_core, workdir, key=key)
        requests = max(1, c16["requests"])
        found[label] = {
            "c1_p50_ms": p50_us[label] / 1000,
            "c1_p99_ms": percentile(everything[label], 0.99) / 1000,
            "c1_requests": len(everything[label]),
            "cpu_ms_per_req_c1": median([part[label]["cpu_ms_per_req"] for part in parts]),
            "rps_c16": c16["rps"],
            "cpu_ms_per_req_c16": (cpu_seconds(pid) - before) * 1000 / requests,
            "redis_cpu_ms_per_req_c16": (cpu_seconds(redis_pid) - redis_before) * 1000 / requests,
            "errors": sum(part[label]["errors"] for part in parts)
                      + c16["errors"] + c16["non2xx"]}
        if label != "unlimited":
            found["added_c1_p50_ms"][label] = (p50_us[label] - p50_us["unlimited"]) / 1000
            found["added"][label] = [
                (percentile(part[label]["us"], 0.50) - percentile(part["unlimited"]["us"], 0.50))
                / 1000 for part in parts]
            found["added_cpu"][label] = [
                part[label]["cpu_ms_per_req"] - part["unlimited"]["cpu_ms_per_req"]
                for part in parts]
    return found


#: Requests of one key in a row in turn_about_c1: about 50 ms, short enough that the
#: machine's speed cannot move between the keys' turns.
TURN_REQUESTS = 50
#: Seconds between two turns, twice RedisLimits.FINISH_DELAY (25 ms): the finish calls a
#: key's turn queued are made in its own time, counted in its CPU, never in the next key's
#: turn (which would be charged with their cost: the limited key's turns are followed by
#: the rpm-only key's).
TURN_PAUSE = 0.05


def turn_about_c1(port, body, pid, parts, seconds):
    """The c1 latencies of LIMITS_KEYS taking turns on one connection, TURN_REQUESTS
    requests each, forwards then backwards, for ``seconds`` in ``parts`` equal parts:
    [{label: {"us": [microseconds per request], "cpu_ms_per_req": the gateway's, "errors"}}].

    Facts -> decision: a key's figure is what it adds to the unlimited key's p50, a few
    hundredths of a millisecond looked for. Measured in turns of 1-2 s of wrk per key, the
    difference of one turn from the next moved by up to 0.5 ms on this project's machine
    (other virtual machines on its host speed it up and slow it down from one second to the
    next), and the median of nine such differences by 0.15 ms from run to run of the same
    code. Turns of 50 ms put every key's requests in the same seconds; a pause of
    TURN_PAUSE after each keeps a key's finish calls in its own turn. The client is this
    process, on the load core: its own time in each request is the same for every key."""
    requests = {label: post_request(key, body) for label, key in LIMITS_KEYS}
    members = process_tree(pid)  # the gateway's master and worker: the same all along
    parts_found = []
    with socket.create_connection(("127.0.0.1", port), timeout=10) as connection:
        connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        reader = connection.makefile("rb")
        for part in range(parts):
            found = {label: {"us": [], "cpu_seconds": 0.0, "errors": 0}
                     for label, _ in LIMITS_KEYS}
            ends = time.monotonic() + seconds / parts
            turn = 0
            while time.monotonic() < ends:
                order = LIMITS_KEYS if turn % 2 == 0 else LIMITS_KEYS[::-1]
                for label, _ in order:
                    before = cpu_seconds(pid, members)
                    for _ in range(TURN_REQUESTS):
                        started = time.perf_counter()
                        connection.sendall(requests[label])
                        status = read_response(reader)
                        found[label]["us"].append((time.perf_counter() - started) * 1e6)
                        found[label]["errors"] += status != 200
                    time.sleep(TURN_PAUSE)  # the turn's last finish calls, made meanwhile
                    found[label]["cpu_seconds"] += cpu_seconds(pid, members) - before
                    ends += TURN_PAUSE  # as many requests as without the pauses
                turn += 1
            for figures in found.values():
                figures["cpu_ms_per_req"] = (figures.pop("cpu_seconds") * 1000
                                             / max(1, len(figures["us"])))
            parts_found.append(found)
    return parts_found


def post_request(key, body, path="/v1/messages"):
    """A POST of ``body`` to ``path`` with ``key``, as the benchmark's own clients send it."""
    return (b"POST %s HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Content-Type: application/json\r\nx-api-key: %s\r\n"
            b"anthropic-version: 2023-06-01\r\nContent-Length: %d\r\n\r\n%s"
            % (path.encode(), key.encode(), len(body), body))


def read_response(reader):
    """Read one response with a Content-Length from ``reader``; its status code. Anything
    else (the connection closed, a response without a length) ends the run: the next
    response could not be told from this one's rest."""
    status_line = reader.readline()
    if not status_line:
        raise RuntimeError("the gateway closed the benchmark's connection")
    length = None
    while True:
        line = reader.readline()
        if line in (b"\r\n", b""):
            break
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    if length is None:
        raise RuntimeError("a response without Content-Length: %r" % status_line)
    reader.read(length)
    return int(status_line.split()[1])


STREAM_COUNTS = (1000, 5000, 10000)
STREAM_GAP_MS = 2000
STREAM_BURST = 1000


async def paced_stream(port, events, gap_ms):
    """One slow stream: (seconds to its first event, the worst delay of an event beyond the
    pacing, whether it ended with message_stop). Any failure counts as lost."""
    body = small_body(stream=True)
    request = post_request(CLIENT_KEY, body,
                           "/v1/messages?events=%d&gap_ms=%d" % (events, gap_ms))
    started = time.monotonic()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        return None, None, False
    try:
        writer.write(request)
        head = await reader.readuntil(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 200"):
            return None, None, False
        arrivals, tail = [], b""
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            chunk = (await reader.readexactly(size + 2))[:-2]
            if size == 0:
                break
            now = time.monotonic() - started
            arrivals += [now] * chunk.count(b"\n\n")
            tail = (tail + chunk)[-200:]
        delays = [later - earlier - gap_ms / 1000 for earlier, later in zip(arrivals, arrivals[1:])]
        return (arrivals[0] if arrivals else None, max(delays, default=0.0),
                b"event: message_stop" in tail)
    except (OSError, asyncio.IncompleteReadError, ValueError):
        return None, None, False
    finally:
        writer.close()


def open_streams(port, count, pid, step=STREAM_BURST, burst=STREAM_BURST,
                 gap_ms=STREAM_GAP_MS):
    """``count`` slow streams (an event every ``gap_ms``): ``burst`` at once, then ``step``
    more every ``gap_ms``, each long enough that all are open together for a while; the
    tree's RSS is sampled once they all are. Returns the figures."""
    starts = [min(burst, count)] + [step] * (-(-max(0, count - burst) // step))
    starts[-1] -= sum(starts) - count
    events = len(starts) + 5
    rss = {}

    async def run():
        tasks = []
        for started in starts:
            tasks += [asyncio.ensure_future(paced_stream(port, events, gap_ms))
                      for _ in range(started)]
            await asyncio.sleep(gap_ms / 1000)
        await asyncio.sleep(gap_ms / 1000)
        rss["open"] = memory_mb(pid)[0]
        return await asyncio.wait_for(asyncio.gather(*tasks), events * gap_ms / 1000 + 120)
    results = asyncio.run(run())
    firsts = [r[0] for r in results if r[0] is not None]
    first_burst = [r[0] for r in results[:burst] if r[0] is not None]
    return {
        "streams": count, "events_each": events,
        "ttfe_p50_ms": percentile(firsts, 0.5) * 1000 if firsts else None,
        "ttfe_p99_ms": percentile(firsts, 0.99) * 1000 if firsts else None,
        "first_burst_ttfe_p99_ms": percentile(first_burst, 0.99) * 1000 if first_burst else None,
        "lost": sum(1 for r in results if not r[2]),
        "late_first_events": sum(1 for f in firsts if f > 1.0),
        "late_events": sum(1 for r in results if r[1] is not None and r[1] > 1.0),
        "worst_event_delay_ms": max((r[1] for r in results if r[1] is not None),
                                    default=0) * 1000,
        "rss_open_mb": rss["open"],
    }


def scenario_streams(plan, workdir, upstream_port, proxy_core, load_core, bodies):
    """``gateway serve --worker gevent`` (or --worker WORKER) holding 1,000, 5,000 and 10,000
    slow streams: first events, events late or lost, RSS per open stream."""
    import resource
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # the children inherit it
    shipped = os.path.join(ROOT, "deploy", "gunicorn-gevent.conf.py" if plan["worker"] ==
                           "gevent" else "gunicorn.conf.py")
    config = os.path.join(workdir, "gunicorn-streams.conf.py")
    with open(config, "w") as file:  # the shipped config, with room for every stream
        file.write("import runpy\nglobals().update((k, v) for k, v in runpy.run_path(%r)"
                   ".items() if not k.startswith('__'))\nworker_connections = %d\n"
                   % (shipped, max(STREAM_COUNTS) + 1000))
    process, port, _ = start_gateway(workdir, upstream_port, proxy_core, config,
                                     serve_args=["--worker", plan["worker"]])
    figures = {"worker": plan["worker"], "nofile": hard}
    try:
        streams(port, 2, 1, 4, 1, 30)  # warm-up
        time.sleep(1)
        for count in plan["stream_counts"]:
            idle = memory_mb(process.pid)[0]
            result = open_streams(port, count, process.pid, plan["stream_step"])
            result["rss_idle_mb"] = idle
            result["rss_per_stream_kb"] = (result["rss_open_mb"] - idle) * 1024 / count
            figures["streams_%d" % count] = result
            print("  %5d streams (%s): first event p50 %.0f ms, p99 %.0f ms (first %d: p99 %.0f "
                  "ms), %d first events > 1 s, %d streams with an event > 1 s late (worst "
                  "%.0f ms), %d lost; RSS %.0f -> %.0f MB, %.1f KB per stream" % (
                      count, plan["worker"], result["ttfe_p50_ms"] or -1,
                      result["ttfe_p99_ms"] or -1, STREAM_BURST,
                      result["first_burst_ttfe_p99_ms"] or -1, result["late_first_events"],
                      result["late_events"], result["worst_event_delay_ms"], result["lost"],
                      idle, result["rss_open_mb"], result["rss_per_stream_kb"]), flush=True)
            time.sleep(3)  # the workers let go of the finished streams
    finally:
        stop(process)
    return figures


UWSGI_APP = "import gateway\napplication = gateway.make_app()\n"


def other_server(name, workdir, port):
    """argv for the same app under another server, one process, or None when it is absent
    (``pip install granian`` / ``pip install uwsgi``; PYTHONPATH and PATH are honoured)."""
    import importlib.util
    if name == "granian" and importlib.util.find_spec("granian"):
        return [sys.executable, "-m", "granian", "--interface", "wsgi", "--factory", "--host",
                "127.0.0.1", "--port", str(port), "--workers", "1", "gateway:make_app"]
    if name == "uwsgi" and shutil.which("uwsgi"):
        app = os.path.join(workdir, "uwsgi_app.py")
        with open(app, "w") as file:
            file.write(UWSGI_APP)
        # http11-socket: keep-alive and chunked answers on uWSGI's own HTTP parser.
        return ["uwsgi", "--http11-socket", "127.0.0.1:%d" % port, "--wsgi-file", app,
                "--pythonpath", ROOT, "--master", "--processes", "1", "--threads", "256",
                "--http-auto-chunked", "--die-on-term", "--need-app", "--disable-logging"]
    return None


def scenario_servers(plan, workdir, upstream_port, proxy_core, load_core, bodies):
    """The same app, one process on one core, under gunicorn gthread and gevent (as
    ``gateway serve`` runs them), granian and uWSGI: latency, throughput and CPU per request,
    one stream's bytes and first event, 200 slow streams, and whether the gateway's access
    lines reach the server's output."""
    figures = {}
    for name in ("gunicorn-gthread", "gunicorn-gevent", "granian", "uwsgi"):
        if name.startswith("gunicorn"):
            process, port, log_path = start_gateway(
                workdir, upstream_port, proxy_core,
                serve_args=["--worker", name.split("-")[1]])
        else:
            start_gateway(workdir, upstream_port, proxy_core)[0].kill()  # writes the config
            port = picked_port()
            argv = other_server(name, workdir, port)
            if argv is None:
                print("  %-16s not installed: skipped" % name, flush=True)
                continue
            log_path = os.path.join(workdir, "%s.log" % name)
            environment = dict(clean_environment(), GATEWAY_CONFIG=os.path.join(
                workdir, "gateway", "gateway.ini"), PYTHONPATH=os.pathsep.join(
                filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
            process = subprocess.Popen(pinned(proxy_core, argv), stdout=subprocess.DEVNULL,
                                       stderr=open(log_path, "wb"), env=environment)
            wait_for_port(port, process)
            time.sleep(1)
        try:
            wrk(port, bodies["small"], 4, 1, load_core, workdir)  # warm-up
            c1 = wrk(port, bodies["small"], 1, plan["seconds"], load_core, workdir)
            before = cpu_seconds(process.pid)
            c16 = wrk(port, bodies["small"], 16, plan["seconds"], load_core, workdir)
            cpu = cpu_seconds(process.pid) - before
            one = streams(port, 1, 3, 20, 20, 60, burst=False)
            slow = streams(port, 200, 1, 8, 250, 120)
            requests = c1["requests"] + c16["requests"]
            with open(log_path, errors="replace") as file:
                logged = sum(1 for line in file if '"request_id": "req_gw_' in line)
            figures[name] = {
                "c1_p50_ms": c1["p50_us"] / 1000, "c1_p99_ms": c1["p99_us"] / 1000,
                "rps_c16": c16["rps"], "cpu_ms_per_req_c16": cpu * 1000 / max(1, c16[
                    "requests"]), "errors": c1["errors"] + c1["non2xx"] + c16["errors"]
                + c16["non2xx"], "ttfe_p50_ms_s1": one["ttfe_p50_ms"],
                "sse_bytes_identical": one["_body"] == b"".join(sse_events(20)),
                "late_first_events_200": slow["late_first_events"],
                "access_log": logged >= requests}
        finally:
            stop(process)
        print("  %-16s c1 p50 %.3f ms p99 %.3f ms; c16 %.0f req/s, %.3f ms CPU/req, %d errors; "
              "1 stream TTFE %.2f ms, bytes %s; 200 slow streams: %d late; access log %s" % (name, *(figures[name][key] for key in (
                  "c1_p50_ms", "c1_p99_ms", "rps_c16", "cpu_ms_per_req_c16", "errors",
                  "ttfe_p50_ms_s1")), "identical" if figures[name]["sse_bytes_identical"]
                  else "DIFFERENT", figures[name]["late_first_events_200"],
                  "yes" if figures[name]["access_log"] else "LOST"), flush=True)
    return figures


WORKER_COUNTS = (1, 2, 4)


def scenario_workers(plan, workdir, upstream_port, proxy_core, load_core, bodies):
    """Idle memory by process with 1, 2 and 4 workers: ``gateway serve`` (WEB_CONCURRENCY set),
    the table's warm-up and settle, then RSS and PSS of the master and of each worker. PSS
    splits a page shared by n processes n ways, so the PSS total is the tree's real memory;
    the sum of RSS counts a shared page once per process."""
    figures = {}
    for workers in WORKER_COUNTS:
        process, port, _ = start_gateway(  # the gunicorn config reads WEB_CONCURRENCY
            workdir, upstream_port, proxy_core, environment={"WEB_CONCURRENCY": str(workers)})
        try:
            wrk(port, bodies["small"], 4, 1, load_core, workdir)
            streams(port, 2, 1, 4, 1, 30)
            time.sleep(plan["settle"])
            each = [process_memory_mb(pid) for pid in process_tree(process.pid)]  # master first
        finally:
            stop(process)
        row = figures["workers_%d" % workers] = {
            "rss_mb": sum(rss for rss, _ in each), "pss_mb": sum(pss for _, pss in each),
            "master_rss_mb": each[0][0], "master_pss_mb": each[0][1],
            "worker_rss_mb": [rss for rss, _ in each[1:]],
            "worker_pss_mb": [pss for _, pss in each[1:]]}
        print("  %d worker(s): RSS %.1f MB, PSS %.1f MB (master RSS %.1f, PSS %.1f; workers "
              "RSS %s)" % (workers, row["rss_mb"], row["pss_mb"], row["master_rss_mb"],
                           row["master_pss_mb"],
                           ", ".join("%.1f" % rss for rss in row["worker_rss_mb"])), flush=True)
    return figures


SCENARIOS = {"keys": scenario_keys, "usage": scenario_usage, "limits": scenario_limits,
             "streams": scenario_streams, "servers": scenario_servers,
             "workers": scenario_workers}


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------

ROWS = [  # (key, label, lower is better)
    ("c1_p50_ms", "latency c1 p50 (ms)", True),
    ("c1_p99_ms", "latency c1 p99 (ms)", True),
    ("added_c1_p50_ms", "added latency c1 p50 (ms)", True),
    ("added_c1_p99_ms", "added latency c1 p99 (ms)", True),
    ("rps_c16", "throughput c16 (req/s)", False),
    ("rps_c64", "throughput c64 (req/s)", False),
    ("cpu_ms_per_req_c16", "CPU per request c16 (ms)", True),
    ("cpu_ms_per_req_c64", "CPU per request c64 (ms)", True),
    ("ttfe_p50_ms_s1", "TTFE 1 stream p50 (ms)", True),
    ("ttle_p50_ms_s1", "TTLE 1 stream p50 (ms)", True),
    ("ttfe_p50_ms_s50", "TTFE 50 streams p50 (ms)", True),
    ("ttfe_p99_ms_s50", "TTFE 50 streams p99 (ms)", True),
    ("added_ttfe_p99_ms_c50", "added TTFE 50 streams p99 (ms)", True),
    ("ttle_p99_ms_s50", "TTLE 50 streams p99 (ms)", True),
    ("burst_ttfe_p50_ms_s50", "TTFE 50 streams started at once p50 (ms)", True),
    ("burst_ttfe_p99_ms_s50", "TTFE 50 streams started at once p99 (ms)", True),
    ("late_first_events_200", "200 slow streams: first event > 1 s", True),
    ("rss_peak_slow_mb", "peak RSS, 200 slow streams (MB)", True),
    ("rss_idle_mb", "RSS idle (MB)", True),
    ("pss_idle_mb", "PSS idle (MB)", True),
    ("rss_load_mb", "RSS under load, c64 peak (MB)", True),
    ("rss_after_mb", "RSS after load, 5 s after (MB)", True),
    ("rss_back_s", "RSS after load: back within (s)", True),
    ("pss_after_mb", "PSS after load (MB)", True),
    ("threads_idle", "threads idle", True),
    ("threads_slow", "threads as the 200 slow streams end", True),
    ("threads_after", "threads after load", True),
    ("big_p50_ms", "5 MB body p50 (ms)", True),
    ("added_5mb_p50_ms", "added 5 MB body p50 (ms)", True),
]


def derive(results):
    """Added figures (target minus direct) and the identical-bytes check."""
    direct = results.get("direct")
    expected = b"".join(sse_events(20))
    for name, figures in results.items():
        figures["sse_bytes_identical"] = all(
            figures.pop("sse_body_s%d" % n) == expected and figures["sse_consistent_s%d" % n]
            for n in (1, 50))
        if direct is None:
            continue
        figures["added_c1_p50_ms"] = figures["c1_p50_ms"] - direct["c1_p50_ms"]
        figures["added_c1_p99_ms"] = figures["c1_p99_ms"] - direct["c1_p99_ms"]
        figures["added_ttfe_p99_ms_c50"] = figures["ttfe_p99_ms_s50"] - direct["ttfe_p99_ms_s50"]
        figures["added_5mb_p50_ms"] = figures["big_p50_ms"] - direct["big_p50_ms"]


def ratio(value, base):
    if value is None or base is None or base <= 0 or value < 0:
        return None
    return value / base


def check_targets(gateway):
    rss_back = gateway["rss_after_mb"] <= gateway["rss_idle_mb"] * TARGETS["rss_after_vs_idle"]
    return {
        "added latency c1 p50 <= 0.7 ms": gateway["added_c1_p50_ms"] <= TARGETS["added_c1_p50_ms"],
        "added latency c1 p99 <= 2 ms": gateway["added_c1_p99_ms"] <= TARGETS["added_c1_p99_ms"],
        "throughput c16 >= 1300 req/s": gateway["rps_c16"] >= TARGETS["rps_c16"],
        "SSE bytes identical": gateway["sse_bytes_identical"],
        "added TTFE p99 at 50 streams <= 2 ms":
            gateway["added_ttfe_p99_ms_c50"] <= TARGETS["added_ttfe_p99_ms_c50"],
        "200 slow streams: 0 late first events": gateway["late_first_events_200"] == 0,
        "RSS idle <= 60 MB": gateway["rss_idle_mb"] <= TARGETS["rss_idle_mb"],
        "RSS after load within 10% of idle": rss_back,
        "5 MB body added p50 <= 20 ms": gateway["added_5mb_p50_ms"] <= TARGETS["added_5mb_p50_ms"],
    }


def report(results, targets_met):
    names = [name for name in TARGET_NAMES if name in results]
    print()
    print("| figure | %s | gateway/direct | gateway/nginx |" % " | ".join(names))
    print("|---|%s---|---|" % ("---|" * len(names)))
    for key, label, _ in ROWS:
        cells = []
        for name in names:
            value = results[name].get(key)
            cells.append("-" if value is None else ("%.0f" % value if abs(value) >= 100
                                                    else "%.2f" % value))
        gateway = results.get("gateway", {}).get(key)
        rd = ratio(gateway, results.get("direct", {}).get(key))
        rn = ratio(gateway, results.get("nginx", {}).get(key))
        print("| %s | %s | %s | %s |" % (label, " | ".join(cells),
                                         "-" if rd is None else "%.2f×" % rd,
                                         "-" if rn is None else "%.2f×" % rn))
    print("| SSE bytes identical to direct | %s | | |" % " | ".join(
        "yes" if results[name]["sse_bytes_identical"] else "NO" for name in names))
    if targets_met:
        print()
        for target, met in targets_met.items():
            print("%-45s %s" % (target, "met" if met else "MISSED"))


def machine():
    model = platform.processor()
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as file:
            found = re.search(r"^model name\s*:\s*(.*)$", file.read(), re.M)
            model = found.group(1) if found else model
    return {"nproc": os.cpu_count(), "cpu": model, "python": platform.python_version(),
            "kernel": platform.release()}


#: settle: seconds of quiet before "idle"; settle_after: "after load" is RSS this long after the
#: load ends, memory given back within it (deploy/gunicorn.conf.py: idle threads exit after 1 s,
#: the worker trims 0.5 s after; rss_back_s records when it came back).
PLANS = {
    "full": {"seconds": 10, "settle": 3, "settle_after": 5, "stream_rounds_1": 20,
             "stream_rounds_50": 5, "slow_streams": 200, "slow_events": 20,
             "usage_lines": 1_000_000, "limits_rounds": 9, "limits_round_seconds": 2,
             "stream_counts": STREAM_COUNTS, "worker": "gevent"},
    "quick": {"seconds": 2, "settle": 0.5, "settle_after": 5, "stream_rounds_1": 3,
              "stream_rounds_50": 1, "slow_streams": 200, "slow_events": 8,
              "usage_lines": 100_000, "limits_rounds": 5, "limits_round_seconds": 1,
              "stream_counts": (1000,), "worker": "gevent"},
}


#: The rows of the table, in order: see the module docstring.
TARGET_NAMES = ("direct", "nginx", "gateway", "gateway_https")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", metavar="FILE", help="write every figure here")
    parser.add_argument("--quick", action="store_true",
                        help="short runs (CI smoke test, about a minute)")
    parser.add_argument("--only", action="append", choices=TARGET_NAMES,
                        help="measure only this target (repeatable; default all four)")
    parser.add_argument("--gunicorn-config", metavar="FILE",
                        help="try another gunicorn config instead of the shipped one")
    parser.add_argument("--scenario", choices=sorted(SCENARIOS),
                        help="instead of the table, one scenario: keys (cost against the "
                        "number of keys), usage ('gateway usage' over a large log), limits "
                        "(what a limited key costs on SQLite and on Redis), streams (1,000 to "
                        "10,000 slow streams), servers (gunicorn's workers, granian, uWSGI), "
                        "workers (idle RSS and PSS by process with 1, 2 and 4 workers)")
    parser.add_argument("--worker", choices=("gevent", "gthread"), default="gevent",
                        help="the worker for --scenario streams (default gevent)")
    parser.add_argument("--streams", type=int, action="append", metavar="N",
                        help="--scenario streams: hold N streams (repeatable; default 1,000, "
                        "5,000 and 10,000)")
    parser.add_argument("--stream-step", type=int, default=STREAM_BURST, metavar="N",
                        help="--scenario streams: after the first 1,000, open N more every 2 s "
                        "(default 1,000)")
    parser.add_argument("--redis-core", choices=("load", "gateway"), default="load",
                        help="--scenario limits: pin redis-server beside wrk and the upstream "
                        "(default) or beside the gateway, where a call crosses no core")
    parser.add_argument("--unpinned", action="store_true",
                        help="pin nothing: the proxy may use every core (and shares them with "
                        "the client and the upstream)")
    parser.add_argument("--upstream", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.upstream is not None:
        run_upstream(args.upstream)
        return 0
    for tool in ("wrk",) + (("nginx",) if not args.only or "nginx" in args.only else ()):
        if not shutil.which(tool) and not os.path.exists("/usr/sbin/" + tool):
            print("error: %s is not installed (apt-get install -y wrk nginx)" % tool,
                  file=sys.stderr)
            return 2
    # A TERM (CI's timeout, a supervisor) unwinds like Ctrl-C, so the ExitStack below stops
    # the upstream, nginx and the gateway instead of leaving them running.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    plan = dict(PLANS["quick" if args.quick else "full"], worker=args.worker,
                stream_step=args.stream_step, redis_core=args.redis_core)
    if args.streams:
        plan["stream_counts"] = tuple(args.streams)
    proxy_core, load_core = cores() if not args.unpinned else (None, None)
    info = dict(machine(), plan="quick" if args.quick else "full",
                pinning="proxy on core %s, wrk/client/upstream on core %s" % (
                    proxy_core, load_core) if proxy_core else "none",
                command=" ".join(["python3", "tests/benchmark.py"] + (argv or sys.argv[1:])))
    print("machine: %(nproc)s cores, %(cpu)s, Python %(python)s; %(pinning)s" % info)
    # Other work on the machine moves the figures (p99s most): say how busy it was.
    info["load_average_before"] = os.getloadavg()[0]
    print("load average before: %.2f" % info["load_average_before"])
    # The client runs in this process: pin it beside wrk and the upstream.
    if load_core is not None:
        os.sched_setaffinity(0, {int(load_core)})
    started = time.monotonic()
    results = {}
    with tempfile.TemporaryDirectory(prefix="gateway-bench-") as workdir, \
            contextlib.ExitStack() as stack:
        bodies = {"small": os.path.join(workdir, "small.json"),
                  "big": os.path.join(workdir, "big.json")}
        with open(bodies["small"], "wb") as file:
            file.write(small_body())
        with open(bodies["big"], "wb") as file:
            file.write(image_body(5 * 1024 * 1024))
        upstream_log = os.path.join(workdir, "upstream.log")
        upstream = subprocess.Popen(pinned(load_core, [
            sys.executable, os.path.abspath(__file__), "--upstream", "0"]),
            stdout=open(upstream_log, "wb"))
        stack.callback(stop, upstream)
        upstream_port = logged_port(upstream_log, r"listening on (\d+)", upstream)
        if args.scenario:
            print("%s:" % args.scenario, flush=True)
            results = SCENARIOS[args.scenario](plan, workdir, upstream_port, proxy_core,
                                               load_core, bodies)
            info["load_average_after"] = os.getloadavg()[0]
            print("\n%.0f s in all; load average after: %.2f" % (
                time.monotonic() - started, info["load_average_after"]))
            if args.json:
                with open(args.json, "w") as file:
                    json.dump({"machine": info, "results": results}, file, indent=2)
            return 0
        for name in args.only or TARGET_NAMES:
            print("%s:" % name, flush=True)
            if name == "direct":
                port, pid = upstream_port, upstream.pid
            elif name == "nginx":
                process, port = start_nginx(workdir, upstream_port, proxy_core)
                stack.callback(stop, process)
                pid = process.pid
            elif name == "gateway_https":
                terminator, tls_port, ca_path = start_tls_upstream(workdir, upstream_port,
                                                                   load_core)
                stack.callback(stop, terminator)
                process, port, _ = start_gateway(
                    workdir, upstream_port, proxy_core, args.gunicorn_config,
                    settings="upstream_ca_file = %s\n" % ca_path,
                    upstream_url="https://127.0.0.1:%d" % tls_port)
                stack.callback(stop, process)
                pid = process.pid
            else:
                process, port, _ = start_gateway(workdir, upstream_port, proxy_core,
                                                 args.gunicorn_config)
                stack.callback(stop, process)
                pid = process.pid
            results[name] = measure(name, port, pid, plan, load_core, workdir, bodies)
            if name != "direct":
                stop(process)
            if name == "gateway_https":
                stop(terminator)
    derive(results)
    targets_met = check_targets(results["gateway"]) if "gateway" in results and \
        "direct" in results else None
    report(results, targets_met)
    info["load_average_after"] = os.getloadavg()[0]
    print("\n%.0f s in all; load average after: %.2f (the benchmark itself adds up to 2)"
          % (time.monotonic() - started, info["load_average_after"]))
    if args.json:
        with open(args.json, "w") as file:
            json.dump({"machine": info, "targets": targets_met, "results": results}, file,
                      indent=2, sort_keys=True)
    # Exit 1 only for what is wrong, never for what is slow: a smoke run in CI must not fail
    # because the machine was busy, but must fail when answers or streamed bytes are wrong.
    broken = [name for name, figures in results.items() if not figures["sse_bytes_identical"]
              or any(figures["errors_" + run] for run in ("c1", "c16", "c64", "5mb"))]
    if broken:
        print("error: wrong answers or SSE bytes from %s" % ", ".join(broken), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
