"""The deployment as users run it: the shipped deploy/ files with the real gunicorn and nginx.

Every server listens on 127.0.0.1 and every wait is bounded. nginx runs in the foreground from
a prefix under tmp_path; deploy/nginx.conf is included the way Debian's nginx.conf includes a
site, with only its listen ports, gateway addresses and error log path substituted. Without nginx the nginx
tests skip locally and fail in CI (CI set to any true value: conftest.in_ci), where a skip
could hide a missing install.
"""
import configparser
import contextlib
import http.client
import json
import os
import re
import runpy
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.parse

import pytest
import requests

import gateway
from conftest import ANY_PORT, CLIENT_KEY, ROOT, auth, gateway_process, listening_url, \
    missing, required, server_process, stop_process
from upstream import refused_port, text_stream

DEPLOY = os.path.join(ROOT, "deploy")
SITE_NAME = "gateway.example.com"  # deploy/nginx.conf's server_name
WAIT = 10  # seconds; a failure shows as a failed assertion or timeout, never a hang

STREAM = {"model": "claude-opus-4-8", "max_tokens": 10, "stream": True,
          "messages": [{"role": "user", "content": "hi"}]}
MESSAGE = dict(STREAM, stream=False)


def shipped_workers():
    """How many workers deploy/gunicorn.conf.py asks for on this machine."""
    return runpy.run_path(os.path.join(DEPLOY, "gunicorn.conf.py"))["workers"]


def booted_workers(log_path):
    text = open(log_path, encoding="utf-8", errors="replace").read()
    return [int(pid) for pid in re.findall(r"Booting worker with pid: (\d+)", text)]


def wait_for(condition, what, timeout=WAIT):
    """Poll ``condition`` until it returns something true; fail naming ``what``."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting for " + what)
        time.sleep(0.02)


def with_trusted_proxy(config_dir):
    """nginx runs on this host, so the gateway believes X-Real-IP from 127.0.0.1 only."""
    ini = config_dir / "gateway.ini"
    text = ini.read_text()
    if "trusted_proxies" not in text:
        ini.write_text(text.replace("[gateway]\n", "[gateway]\ntrusted_proxies = 127.0.0.1\n"))
    return str(ini)


def require_gevent():
    try:
        import gevent  # noqa: F401
    except ImportError:
        missing("gevent is not installed (it is in the test extra)")


@pytest.fixture(params=["gthread", "gevent"])
def worker(request):
    """Each deployment behaviour is proven for both workers 'gateway serve --worker' runs."""
    if request.param == "gevent":
        require_gevent()
    return request.param


@contextlib.contextmanager
def serving(config_dir, tmp_path, name="gateway", worker=None):
    """``gateway serve`` with the shipped gunicorn config (``--worker`` when given): yields
    (process, port, log path) once every worker has booted."""
    ini = with_trusted_proxy(config_dir)
    log_path = tmp_path / (name + ".log")
    command = ["serve", "--config", ini, "--bind", ANY_PORT]
    with gateway_process(command + (["--worker", worker] if worker else []),
                         log_path) as (process, url):
        wait_for(lambda: len(booted_workers(log_path)) >= shipped_workers(), "workers")
        yield process, int(url.rsplit(":", 1)[1]), log_path


# -- nginx ------------------------------------------------------------------------------------

# What Debian's /etc/nginx/nginx.conf contributes around a site, every path under the prefix.
NGINX_MAIN = """\
{user}worker_processes 1;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log info;
events {{ worker_connections 512; }}
http {{
    access_log {prefix}/access.log;
    client_body_temp_path {prefix}/client_body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    include {prefix}/sites-enabled/gateway;
}}
"""


def nginx_site(listen_port, gateway_ports, error_log, error_level=None):
    """deploy/nginx.conf with its ports, gateway addresses and error log path substituted,
    nothing else (``error_level``: another level than the shipped one, for a control run)."""
    text = open(os.path.join(DEPLOY, "nginx.conf"), encoding="utf-8").read()
    text, listens = re.subn(r"^(\s*)listen 80\b", r"\g<1>listen 127.0.0.1:%d" % listen_port,
                            text, flags=re.M)
    servers = "\n    ".join("server 127.0.0.1:%d;" % port for port in gateway_ports)
    text, upstreams = re.subn(r"^(\s*)server 127\.0\.0\.1:8080;", r"\g<1>" + servers, text,
                              flags=re.M)
    text, logs = re.subn(r"^(\s*error_log) /var/log/nginx/error\.log (\w+);",
                         lambda m: "%s %s %s;" % (m.group(1), error_log,
                                                  error_level or m.group(2)), text, flags=re.M)
    assert (listens, upstreams, logs) == (2, 1, 2)
    return text


NGINX_PORT_ATTEMPTS = 5


@contextlib.contextmanager
def running_nginx(tmp_path, gateway_ports, error_level=None):
    """The real nginx in the foreground with the shipped site; yields its base URL.

    nginx cannot listen on port 0 and say which port it got, so it is given a port the
    kernel just handed out, and if another server takes that port first, nginx fails to bind
    ('Address already in use') and is started again on another one."""
    for attempt in range(NGINX_PORT_ATTEMPTS):
        prefix = tmp_path / ("nginx-%d" % attempt)
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        with _nginx(prefix, port, gateway_ports, error_level) as base:
            if base is None:
                continue  # the port was taken before nginx could bind it
            yield base
            return
    raise AssertionError("nginx found no free port in %d attempts" % NGINX_PORT_ATTEMPTS)


@contextlib.contextmanager
def _nginx(prefix, port, gateway_ports, error_level=None):
    """nginx on ``port``; yields its base URL, or None when the port was in use. The site's
    own error log is ``site-error.log`` in ``prefix``."""
    binary = required("nginx", "apt-get install nginx")
    (prefix / "sites-enabled").mkdir(parents=True)
    (prefix / "sites-enabled" / "gateway").write_text(nginx_site(
        port, gateway_ports, prefix / "site-error.log", error_level))
    user = "user root;\n" if os.geteuid() == 0 else ""  # workers must reach the 0700 tmp_path
    (prefix / "nginx.conf").write_text(NGINX_MAIN.format(user=user, prefix=prefix))
    with open(prefix / "stderr.log", "wb") as log:
        process = subprocess.Popen(
            [binary, "-p", str(prefix), "-e", str(prefix / "error.log"),
             "-c", str(prefix / "nginx.conf"), "-g", "daemon off;"],
            stdout=log, stderr=subprocess.STDOUT)
    try:
        def started():
            # Not a connect to the port: it could be another server's. nginx logs its
            # workers' start only once it has bound every listen address.
            errors = (prefix / "error.log").read_text() if (prefix / "error.log").exists() \
                else ""
            if "Address already in use" in errors:
                return "taken"
            if process.poll() is not None:
                raise AssertionError("nginx exited:\n" + (prefix / "stderr.log").read_text()
                                     + errors)
            return "started" if "start worker process" in errors else None
        outcome = wait_for(started, "nginx to start")
        yield "http://127.0.0.1:%d" % port if outcome == "started" else None
    finally:
        stop_process(process, WAIT)


def test_nginx_is_started_again_when_its_port_was_taken(tmp_path):
    """The retry above, proven: a port someone else listens on is given up, not shared."""
    with socket.create_server(("127.0.0.1", 0)) as taken:
        with _nginx(tmp_path / "taken", taken.getsockname()[1], [9]) as base:
            assert base is None


def via_nginx(headers=None):
    return dict(auth(), Host=SITE_NAME, **(headers or {}))


def open_stream(base, source=None):
    """Start a streamed request and return (connection, response, first bytes) as soon as
    the first event has arrived."""
    url = urllib.parse.urlsplit(base)
    connection = http.client.HTTPConnection(url.hostname, url.port, timeout=WAIT,
                                            source_address=source)
    connection.request("POST", "/v1/messages", body=json.dumps(STREAM),
                       headers=via_nginx({"content-type": "application/json"}))
    response = connection.getresponse()
    assert response.status == 200, response.read()
    return connection, response, read_until(response, b"\n\n")


def read_until(response, marker):
    data = b""
    while marker not in data:
        chunk = response.read1(65536)
        if not chunk:
            break
        data += chunk
    return data


def read_rest(response):
    data = b""
    while True:
        chunk = response.read1(65536)
        if not chunk:
            return data
        data += chunk


def access_lines(log_path):
    return [json.loads(line) for line in open(log_path, encoding="utf-8").read().splitlines()
            if line.startswith("{")]


# -- through nginx and gunicorn ---------------------------------------------------------------

def test_a_stream_passes_through_nginx_and_gunicorn_event_by_event(config_dir, upstream,
                                                                   tmp_path, worker):
    upstream.gate = threading.Event()
    with serving(config_dir, tmp_path, worker=worker) as (_, port, _), running_nginx(tmp_path, [port]) as base:
        connection, response, first = open_stream(base)
        # The upstream is holding event 2 until the gate opens: event 1 came through alone.
        assert first.startswith(b"event: message_start")
        assert response.getheader("content-type").startswith("text/event-stream")
        upstream.gate.set()
        rest = read_rest(response)
        connection.close()
    assert not upstream.gate_timed_out.is_set()
    assert first + rest == b"".join(text_stream("claude-opus-4-8-20261101"))


def test_body_limits_through_nginx(config_dir, upstream, tmp_path, worker):
    with serving(config_dir, tmp_path, worker=worker) as (_, port, _), running_nginx(tmp_path, [port]) as base:
        too_large = requests.post(base + "/v1/messages", data=b" " * (33 * 1024 * 1024),
                                  headers=via_nginx({"content-type": "application/json"}),
                                  timeout=WAIT)
        text = "x" * (20 * 1000 * 1000)
        big = requests.post(base + "/v1/messages", timeout=WAIT, headers=via_nginx(), json=dict(
            MESSAGE, messages=[{"role": "user", "content": text}]))
        # Over nginx's own limit (64m): nginx answers before reading, in the same envelope.
        connection = http.client.HTTPConnection("127.0.0.1", urllib.parse.urlsplit(base).port,
                                                timeout=WAIT)
        connection.putrequest("POST", "/v1/messages", skip_host=True)
        for name, value in via_nginx({"Content-Length": str(100 * 1024 * 1024)}).items():
            connection.putheader(name, value)
        connection.endheaders()
        huge = connection.getresponse()
        huge_body = json.loads(huge.read())
        connection.close()
    assert too_large.status_code == 413
    assert too_large.json()["error"]["type"] == "request_too_large"
    assert too_large.json()["request_id"].startswith("req_gw_")  # the gateway's, not nginx's
    assert big.status_code == 200, big.text
    assert len(upstream.last.body) > 20 * 1000 * 1000
    assert upstream.last.json()["messages"][0]["content"] == text
    assert huge.status == 413 and huge_body["error"]["type"] == "request_too_large"


def pings_until_the_client_leaves(handler, received):
    """Event 1, then a ping every 0.1 s as the real API sends while it thinks, until the
    gateway hangs up (at most 10 s). The gateway only learns its client left when it writes."""
    fake = handler.server.fake
    handler.start_sse()
    try:
        handler.send_chunk(text_stream(received.json()["model"])[0])
        for _ in range(100):
            handler.send_chunk(b'event: ping\ndata: {"type": "ping"}\n\n')
            if handler.wait_for_client_gone(0.1):
                fake.client_gone.set()
                return
    except (BrokenPipeError, ConnectionResetError):
        fake.client_gone.set()


def test_a_client_leaving_mid_stream_through_nginx_closes_the_upstream(config_dir, upstream,
                                                                       tmp_path, worker):
    upstream.handler = pings_until_the_client_leaves
    with serving(config_dir, tmp_path, worker=worker) as (_, port, log), running_nginx(tmp_path, [port]) as base:
        connection, response, first = open_stream(base)
        assert first.startswith(b"event: message_start")
        response.close()
        connection.close()
        assert upstream.client_gone.wait(WAIT), "the upstream never saw the gateway hang up"
        record = wait_for(lambda: [r for r in access_lines(log) if r["path"] == "/v1/messages"],
                          "the access line")[0]
    assert record["stream"] is True and record["key"] == "alice"


def test_hup_reload_finishes_open_streams_and_keeps_serving(config_dir, upstream, tmp_path, worker):
    upstream.gate = threading.Event()
    with serving(config_dir, tmp_path, worker=worker) as (process, port, log), \
            running_nginx(tmp_path, [port]) as base:
        old_workers = booted_workers(log)
        streams = [open_stream(base) for _ in range(3)]
        answers, stop = [], threading.Event()

        def keep_asking():  # new requests before, during and after the reload
            while not stop.is_set() and len(answers) < 2000:
                try:
                    answers.append(requests.post(base + "/v1/messages", json=MESSAGE,
                                                 headers=via_nginx(), timeout=WAIT).status_code)
                except requests.RequestException as exc:
                    answers.append(repr(exc))

        asker = threading.Thread(target=keep_asking)
        asker.start()
        try:
            process.send_signal(signal.SIGHUP)
            wait_for(lambda: len(booted_workers(log)) >= 2 * len(old_workers), "new workers")
            served_before = len(answers)
            wait_for(lambda: len(answers) >= served_before + 20, "requests after the reload")
            upstream.gate.set()  # now the open streams may finish
            rests = [read_rest(response) for _, response, _ in streams]
        finally:
            stop.set()
            asker.join(WAIT)
            upstream.gate.set()
        for connection, _, _ in streams:
            connection.close()
        exited = wait_for(lambda: all("Worker exiting (pid: %d)" % pid in log.read_text()
                                      for pid in old_workers), "the old workers to exit")
    assert all(b"event: message_stop" in rest for rest in rests)
    assert exited and not upstream.gate_timed_out.is_set()
    assert answers and set(answers) == {200}, answers


def test_the_client_address_comes_from_nginx_and_only_from_it(config_dir, upstream, tmp_path, worker):
    with serving(config_dir, tmp_path, worker=worker) as (_, port, log), running_nginx(tmp_path, [port]) as base:
        # A client on 127.0.0.2 (loopback too) that also forges X-Real-IP, via nginx...
        connection = http.client.HTTPConnection("127.0.0.1", urllib.parse.urlsplit(base).port,
                                                timeout=WAIT, source_address=("127.0.0.2", 0))
        connection.request("GET", "/v1/models", headers=via_nginx({"X-Real-IP": "192.0.2.1"}))
        assert connection.getresponse().status == 200
        connection.close()
        # ...and straight to gunicorn, where nobody vouches for the header.
        direct = http.client.HTTPConnection("127.0.0.1", port, timeout=WAIT,
                                            source_address=("127.0.0.2", 0))
        direct.request("GET", "/v1/models", headers=dict(auth(), **{"X-Real-IP": "192.0.2.1"}))
        assert direct.getresponse().status == 200
        direct.close()
        wait_for(lambda: len(access_lines(log)) >= 2, "two access lines")
    assert [r["client_ip"] for r in access_lines(log)] == ["127.0.0.2", "127.0.0.2"]


def test_nginx_answers_its_own_errors_in_the_anthropic_envelope(tmp_path):
    with refused_port() as port, running_nginx(tmp_path, [port]) as base:  # no gateway
        unavailable = requests.post(base + "/v1/messages", json=MESSAGE, headers=via_nginx(),
                                    timeout=WAIT)
        with pytest.raises(requests.ConnectionError):  # any other host name: 444, no answer
            requests.get(base + "/v1/models", headers={"Host": "scanner.invalid"}, timeout=WAIT)
    assert unavailable.status_code == 502
    assert unavailable.headers["content-type"] == "application/json"
    assert unavailable.json()["type"] == "error"
    assert unavailable.json()["error"]["type"] == "api_error"
    assert unavailable.json()["request_id"] == unavailable.headers["request-id"]


SECRET = "sk-gw-never-in-a-log-0123456789"


def raw_request(base, head, body=b""):
    """Send ``head`` (request line and header lines, without the blank line) as it is and
    return (status, headers, parsed JSON body): for requests no client library would send."""
    url = urllib.parse.urlsplit(base)
    with socket.create_connection((url.hostname, url.port), timeout=WAIT) as sock:
        sock.sendall(head.encode("latin-1") + b"\r\n\r\n" + body)
        response = http.client.HTTPResponse(sock)
        response.begin()
        data = response.read()
    return response.status, response.headers, json.loads(data)


NGINX_REFUSALS = {
    # a header that may appear once, twice (nginx: "client sent duplicate header line")
    "duplicate Authorization": ("POST /v1/messages HTTP/1.1\r\nHost: %s\r\n"
                                "Authorization: Bearer %s\r\nAuthorization: Bearer %s-2\r\n"
                                "Content-Length: 2" % (SITE_NAME, SECRET, SECRET), b"{}", 400),
    # over large_client_header_buffers (8k): nginx's 494, answered as 400
    "oversized header": ("POST /v1/messages HTTP/1.1\r\nHost: %s\r\nx-api-key: %s\r\n"
                         "x-padding: %s\r\nContent-Length: 2" % (SITE_NAME, SECRET, "a" * 9000),
                         b"{}", 400),
    # request smuggling's favourite: both framings at once
    "Transfer-Encoding and Content-Length": (
        "POST /v1/messages HTTP/1.1\r\nHost: %s\r\nTransfer-Encoding: chunked\r\n"
        "Content-Length: 7" % SITE_NAME, b"2\r\n{}\r\n0\r\n\r\n", 400),
    # over the same buffers before the Host header: the default server answers
    "URI too long": ("GET /v1/models?%s HTTP/1.1\r\nHost: %s" % ("a" * 9000, SITE_NAME), b"",
                     414),
    "malformed request line": ("G@T /v1/models HTTP/1.1\r\nHost: %s" % SITE_NAME, b"", 400),
    # nginx refuses TRACE itself (405), and answers these with a 5xx that SDKs would retry
    "TRACE": ("TRACE /v1/models HTTP/1.1\r\nHost: %s" % SITE_NAME, b"", 405),
    "TRACE to another host": ("TRACE / HTTP/1.1\r\nHost: scanner.invalid", b"", 405),
    "unknown Transfer-Encoding": ("POST /v1/messages HTTP/1.1\r\nHost: %s\r\n"
                                  "Transfer-Encoding: gzip" % SITE_NAME, b"", 501),
    "unknown HTTP version": ("GET /v1/models HTTP/2.0\r\nHost: %s" % SITE_NAME, b"", 505),
}


@pytest.mark.parametrize("case", sorted(NGINX_REFUSALS))
def test_nginxs_own_refusals_are_the_anthropic_envelope_with_a_request_id(tmp_path, case):
    head, body, status = NGINX_REFUSALS[case]
    with refused_port() as port, running_nginx(tmp_path, [port]) as base:
        got, headers, payload = raw_request(base, head, body)
    assert got == status
    assert headers["content-type"] == "application/json"
    assert payload["type"] == "error" and payload["error"]["type"] == "invalid_request_error"
    assert payload["request_id"] == headers["request-id"]
    assert re.fullmatch(r"req_nginx_[0-9a-f]{32}", payload["request_id"])
    if status >= 500:  # the same bytes get the same answer: SDKs must not retry it
        assert headers["x-should-retry"] == "false"


def test_the_shipped_error_log_level_does_not_log_refused_header_lines(tmp_path):
    """At info nginx logs the header line it refused, a client's key included: the control
    run at info shows it does, so the shipped level (notice) is what keeps keys out."""
    head, body, _ = NGINX_REFUSALS["duplicate Authorization"]
    logs = {}
    for level in (None, "info"):
        with refused_port() as port, running_nginx(tmp_path / str(level), [port],
                                                   error_level=level) as base:
            assert raw_request(base, head, body)[0] == 400
            [log] = (tmp_path / str(level)).glob("nginx-*/site-error.log")
            logs[level] = log.read_text()
    assert "duplicate header line" in logs["info"] and SECRET in logs["info"]
    assert SECRET not in logs[None]


def test_scale_out_two_hosts_behind_nginx_share_one_key_file(config_dir, upstream, tmp_path):
    ini = with_trusted_proxy(config_dir)
    with serving(config_dir, tmp_path, "host1") as (_, port1, log1), \
            serving(config_dir, tmp_path, "host2") as (_, port2, log2), \
            running_nginx(tmp_path, [port1, port2]) as base:
        for _ in range(4):  # nginx takes turns between the hosts
            ok = requests.post(base + "/v1/messages", json=MESSAGE, headers=via_nginx(),
                               timeout=WAIT)
            assert ok.status_code == 200
        run_gateway("keys", "revoke", "alice", "--config", ini)
        refused = [requests.post(base + "/v1/messages", json=MESSAGE, headers=via_nginx(),
                                 timeout=WAIT).status_code for _ in range(4)]
        statuses = [sorted(r["status"] for r in access_lines(log)) for log in (log1, log2)]
    assert refused == [401] * 4
    assert statuses == [[200, 200, 401, 401]] * 2


# -- gunicorn alone ---------------------------------------------------------------------------

def run_gateway(*args):
    result = subprocess.run([sys.executable, os.path.join(ROOT, "gateway")] + list(args),
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def _proc_address(host, port):
    return "%08X:%04X" % (struct.unpack("<I", socket.inet_aton(host))[0], port)


def serving_worker(connection, workers):
    """Which worker process holds the server end of ``connection`` (Linux /proc)."""
    local, peer = connection.sock.getsockname(), connection.sock.getpeername()
    wanted = (_proc_address(*peer), _proc_address(*local))
    inodes = [fields[9] for fields in (line.split() for line in open("/proc/net/tcp"))
              if tuple(fields[1:3]) == wanted]
    for pid in workers:
        for fd in os.listdir("/proc/%d/fd" % pid):
            with contextlib.suppress(OSError):
                if os.readlink("/proc/%d/fd/%s" % (pid, fd)) in (
                        "socket:[%s]" % inode for inode in inodes):
                    return pid
    return None


def one_connection_per_worker(port, workers):
    """Keep-alive connections, one held by each worker: a request on it reaches that worker."""
    held = {}
    for _ in range(200):
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=WAIT)
        connection.request("GET", "/healthz")
        connection.getresponse().read()
        pid = serving_worker(connection, workers)
        if pid is not None and pid not in held:
            held[pid] = connection
        else:
            connection.close()
        if len(held) == len(workers):
            return held
    raise AssertionError("could not reach every worker: %s of %s" % (sorted(held), workers))


def status_with(connection, key):
    connection.request("GET", "/v1/models", headers=auth(key))
    response = connection.getresponse()
    response.read()
    return response.status


def test_keys_added_and_revoked_reach_every_worker_without_restart(config_dir, upstream,
                                                                   tmp_path, worker):
    ini = str(config_dir / "gateway.ini")
    with serving(config_dir, tmp_path, worker=worker) as (process, port, log):
        workers = booted_workers(log)
        held = one_connection_per_worker(port, workers)
        assert {pid: status_with(c, CLIENT_KEY) for pid, c in held.items()} == dict.fromkeys(
            workers, 200)  # every worker has loaded the key file once already

        new_key = run_gateway("keys", "add", "dave", "--config", ini).strip().splitlines()[-1]
        accepted = {pid: status_with(c, new_key) for pid, c in held.items()}
        run_gateway("keys", "revoke", "dave", "--config", ini)
        refused = {pid: status_with(c, new_key) for pid, c in held.items()}
        for connection in held.values():
            connection.close()
        assert process.poll() is None and booted_workers(log) == workers  # no restart
    assert accepted == dict.fromkeys(workers, 200)
    assert refused == dict.fromkeys(workers, 401)


def doc_block(doc, marker):
    """The fenced code block after ``marker`` in ``doc`` (a path under the checkout): what the
    reader copies."""
    text = open(os.path.join(ROOT, doc), encoding="utf-8").read()
    match = re.search(re.escape(marker) + r".*?\n```\w*\n(.*?)```", text, re.S)
    assert match, "%s has no block after %s" % (doc, marker)
    return match.group(1)


def started(command, log_path, env, ready="Booting worker"):
    """Run a server command; yield it once its log shows ``ready``; terminate it after.
    A TERM that reaches a worker before it has set its signal handlers (gevent patching
    takes a moment) is lost, and gunicorn waits graceful_timeout for it: 5 s, then KILL."""
    return server_process(command, log_path, lambda text: ready in text, env,
                          stop_timeout=5)


def test_mounted_under_a_prefix_in_another_wsgi_app(config_dir, upstream, tmp_path):
    site_app = doc_block("docs/embedding.md", "<!-- embedding-example")
    (tmp_path / "site_app.py").write_text(site_app)
    command = [sys.executable, "-m", "gunicorn", "-c", os.path.join(DEPLOY, "gunicorn.conf.py"),
               "--bind", ANY_PORT, "--pythonpath", "%s,%s" % (tmp_path, ROOT),
               "site_app:application"]
    with started(command, tmp_path / "site.log",
                 {"GATEWAY_CONFIG": str(config_dir / "gateway.ini")}):
        base = listening_url(tmp_path / "site.log")
        upstream.gate = threading.Event()
        stream = requests.post(base + "/anthropic/v1/messages", json=STREAM, headers=auth(),
                               stream=True, timeout=WAIT)
        first = read_until(stream.raw, b"\n\n")
        upstream.gate.set()
        rest = stream.raw.read()
        models = requests.get(base + "/anthropic/v1/models", headers=auth(), timeout=WAIT)
        outside = requests.get(base + "/v1/models", headers=auth(), timeout=WAIT)
    assert stream.status_code == 200 and first.startswith(b"event: message_start")
    assert b"event: message_stop" in rest and not upstream.gate_timed_out.is_set()
    assert upstream.received[0].path == "/v1/messages"
    assert [m["id"] for m in models.json()["data"]] == ["claude-opus-4-8", "claude-opus-4-7"]
    assert outside.text == "the rest of the site\n"


def test_dev_server_streams_with_the_standard_library_alone(config_dir, upstream, tmp_path):
    command = [sys.executable, os.path.join(ROOT, "gateway"), "serve", "--dev", "--config",
               str(config_dir / "gateway.ini"), "--bind", ANY_PORT]
    with started(command, tmp_path / "dev.log", {}, ready="DEVELOPMENT SERVER"):
        upstream.gate = threading.Event()
        stream = requests.post(listening_url(tmp_path / "dev.log") + "/v1/messages", json=STREAM,
                               headers=auth(), stream=True, timeout=WAIT)
        first = read_until(stream.raw, b"\n\n")
        upstream.gate.set()
        rest = stream.raw.read()
    assert first.startswith(b"event: message_start") and b"event: message_stop" in rest
    assert not upstream.gate_timed_out.is_set()
    assert '"path": "/v1/messages"' in (tmp_path / "dev.log").read_text()


def test_serve_with_the_gevent_config_and_no_worker_option(config_dir, upstream, tmp_path):
    """The 'gateway serve' master never imports requests, so the gevent config loads in it
    as under plain gunicorn, and its workers patch before they import the gateway (it
    refused before: the master had imported urllib3 unpatched)."""
    require_gevent()
    log_path = tmp_path / "gevent.log"
    with gateway_process(["serve", "--config", str(config_dir / "gateway.ini"), "--bind",
                          ANY_PORT, "--gunicorn-config",
                          os.path.join(DEPLOY, "gunicorn-gevent.conf.py")],
                         log_path) as (_, url):
        answer = requests.post(url + "/v1/messages", json=STREAM,
                               headers=dict(auth(), Connection="close"), timeout=WAIT)
    log = log_path.read_text()
    assert answer.status_code == 200 and b"event: message_stop" in answer.content
    assert "Using worker: GatewayGeventWorker" in log and "MonkeyPatchWarning" not in log


def test_the_gevent_extra_streams_under_plain_gunicorn(config_dir, upstream, tmp_path):
    require_gevent()
    command = [sys.executable, "-m", "gunicorn", "-c",
               os.path.join(DEPLOY, "gunicorn-gevent.conf.py"),
               "--bind", ANY_PORT, "--pythonpath", ROOT]
    with started(command, tmp_path / "gevent.log",
                 {"GATEWAY_CONFIG": str(config_dir / "gateway.ini")}):
        upstream.gate = threading.Event()
        # Connection: close, or the worker's graceful stop waits for this idle connection.
        stream = requests.post(listening_url(tmp_path / "gevent.log") + "/v1/messages",
                               json=STREAM,
                               headers=dict(auth(), Connection="close"), stream=True,
                               timeout=WAIT)
        first = read_until(stream.raw, b"\n\n")
        upstream.gate.set()
        rest = stream.raw.read()
    log = (tmp_path / "gevent.log").read_text()
    assert first.startswith(b"event: message_start") and b"event: message_stop" in rest
    assert not upstream.gate_timed_out.is_set()
    assert "Using worker: GatewayGeventWorker" in log and "MonkeyPatchWarning" not in log


def test_serve_with_gevent_streams_from_an_https_upstream(config_dir, tmp_path):
    """gevent patched first: HTTPS upstream calls work (patched after requests, urllib3's
    SSLContext recurses: gevent#1016), and 'gateway serve' still checks before serving."""
    require_gevent()
    trustme = pytest.importorskip("trustme")  # in the test extra
    import ssl
    from upstream import FakeUpstream
    ca = trustme.CA()
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(context)
    tls_upstream = FakeUpstream()
    tls_upstream.server.socket = context.wrap_socket(tls_upstream.server.socket,
                                                     server_side=True)
    tls_upstream.start()
    try:
        ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
        ini = config_dir / "gateway.ini"
        ini.write_text(re.sub(r"upstream_url = \S+", "upstream_url = https://127.0.0.1:%d\n"
                              "trust_env = true" % tls_upstream.server.server_address[1],
                              ini.read_text()))
        log_path = tmp_path / "gevent.log"
        with gateway_process(["serve", "--worker", "gevent", "--config", str(ini), "--bind",
                              ANY_PORT], log_path,
                             env={"REQUESTS_CA_BUNDLE": str(tmp_path / "ca.pem")}) as (_, url):
            tls_upstream.gate = threading.Event()
            stream = requests.post(url + "/v1/messages", json=STREAM,
                                   headers=dict(auth(), Connection="close"), stream=True,
                                   timeout=WAIT)
            first = read_until(stream.raw, b"\n\n")
            tls_upstream.gate.set()
            rest = stream.raw.read()
        log = log_path.read_text()
    finally:
        if tls_upstream.gate is not None:
            tls_upstream.gate.set()
        tls_upstream.stop()
    assert stream.status_code == 200 and first.startswith(b"event: message_start")
    assert b"event: message_stop" in rest and not tls_upstream.gate_timed_out.is_set()
    assert log.startswith("config: ") and "\nok\n" in log  # gateway check ran first
    assert "Using worker: GatewayGeventWorker" in log
    assert "RecursionError" not in log and "MonkeyPatchWarning" not in log


# -- systemd ----------------------------------------------------------------------------------

def test_the_systemd_unit(tmp_path):
    path = os.path.join(DEPLOY, "gateway.service")
    unit = configparser.ConfigParser(interpolation=None, strict=False)
    unit.optionxform = str
    unit.read(path, encoding="utf-8")
    service = unit["Service"]
    graceful = runpy.run_path(os.path.join(DEPLOY, "gunicorn.conf.py"))["graceful_timeout"]
    assert service["Type"] == "notify" and service["NotifyAccess"] == "main"
    assert service["ExecStart"].endswith("gateway serve --config /etc/gateway/gateway.ini")
    reload = re.findall(r"^ExecReload=(.*)$", open(path, encoding="utf-8").read(), re.M)
    assert reload == ["/opt/gateway/bin/gateway check --config /etc/gateway/gateway.ini",
                      "/bin/kill -s HUP $MAINPID"]
    assert service["KillMode"] == "mixed" and int(service["TimeoutStopSec"]) > graceful
    assert service["User"] == "gateway" and service["Restart"] == "on-failure"
    assert service["ProtectSystem"] == "strict" and service["StateDirectory"] == "gateway"
    assert unit["Install"]["WantedBy"] == "multi-user.target"
    analyze = shutil.which("systemd-analyze")
    if analyze:  # systemd's own parser: unknown keys and bad values are errors here
        copy = tmp_path / "gateway.service"
        copy.write_text(open(path, encoding="utf-8").read().replace(
            "/opt/gateway/bin/gateway", os.path.join(ROOT, "gateway")))
        result = subprocess.run([analyze, "verify", str(copy)], capture_output=True,
                                text=True, timeout=60)
        assert result.returncode == 0 and not (result.stdout + result.stderr).strip(), (
            result.stdout + result.stderr)


# -- found while proving 200 concurrent streams -----------------------------------------------

def test_a_new_workers_concurrent_first_requests_all_see_the_key_file(tmp_path):
    """Two threads reading a WatchedFile for the first time: the second must not get the
    empty initial value while the first is still parsing (a burst of 401s at every start)."""
    path = tmp_path / "gateway.keys"
    path.write_text("v1")
    parsing, release, calls = threading.Event(), threading.Event(), []

    def parse(text):
        calls.append(text)
        if len(calls) == 1:  # the first reader is slow
            parsing.set()
            release.wait(WAIT)
        return text

    watched = gateway.WatchedFile(str(path), parse, None)
    first = []
    reader = threading.Thread(target=lambda: first.append(watched.get()))
    reader.start()
    assert parsing.wait(WAIT)
    second = watched.get()  # arrives while the first reader is still parsing
    release.set()
    reader.join(WAIT)
    assert (first, second) == (["v1"], "v1")
