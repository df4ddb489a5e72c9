"""Egress through a forward proxy: a real tinyproxy (Debian's package) started here.

The gateway reaches an https upstream through the proxy with CONNECT, so the proxy sees the
upstream's host and port and then only TLS records; an http upstream goes through it in
absolute form. Between the gateway and tinyproxy sits a tap, a relay in this process that
records every byte the gateway sent the proxy, so "the proxy never sees the client key" is a
check on those bytes, not on the proxy's log. Without tinyproxy the tests skip locally and
fail in CI.
"""
import contextlib
import logging
import re
import socket
import sys
import threading

import pytest

trustme = pytest.importorskip("trustme")

import gateway  # noqa: E402
from conftest import CLIENT_KEY, required, server_process  # noqa: E402
from test_streaming import streams_through  # noqa: E402
from test_tls import post, tls_app  # noqa: E402
from upstream import UPSTREAM_KEY, FakeUpstream  # noqa: E402

WAIT = 10


class Tap:
    """A TCP relay on 127.0.0.1 (port 0, read back) to ``target``, recording what clients
    sent through it."""

    def __init__(self, target):
        self.target = target
        self.sent = bytearray()
        self.connections = 0
        self.closed_by_proxy = threading.Semaphore(0)  # released as the proxy ends each one
        self._lock = threading.Lock()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:  # closed
                return
            self.connections += 1
            upstream = socket.create_connection(self.target, timeout=WAIT)
            threading.Thread(target=self._pump, args=(client, upstream, True),
                             daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, False),
                             daemon=True).start()

    def _pump(self, source, sink, record):
        try:
            while True:
                data = source.recv(65536)
                if not data:
                    break
                if record:
                    with self._lock:
                        self.sent += data
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
            if not record:  # after the shutdown: the client's side is closed by now
                self.closed_by_proxy.release()

    def close(self):
        self.listener.close()


TINYPROXY_CONFIG = """\
Port {port}
Listen 127.0.0.1
Timeout 30
LogLevel Info
MaxClients 20
Allow 127.0.0.1
"""


@contextlib.contextmanager
def tinyproxy(tmp_path):
    """tinyproxy in the foreground with its own config; yields its log path and port.
    tinyproxy cannot listen on port 0, so a port taken by someone else between our pick and
    its bind (it exits: 'Could not create listening sockets') is retried with another."""
    binary = required("tinyproxy", "the egress proxy tests")
    for attempt in range(5):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        config = tmp_path / ("tinyproxy-%d.conf" % attempt)
        config.write_text(TINYPROXY_CONFIG.format(port=port))
        log_path = tmp_path / ("tinyproxy-%d.log" % attempt)
        try:
            with server_process([binary, "-d", "-c", str(config)], log_path,
                                lambda text: "Accepting connections" in text,
                                timeout=WAIT):
                yield log_path, port
                return
        except AssertionError:
            if "Could not create listening sockets" not in log_path.read_text():
                raise
    raise AssertionError("tinyproxy found no free port in 5 attempts")


@pytest.fixture
def proxy(tmp_path):
    with tinyproxy(tmp_path) as (log_path, port):
        tap = Tap(("127.0.0.1", port))
        tap.log_path = log_path
        tap.url = "http://127.0.0.1:%d" % tap.port
        yield tap
        tap.close()


def test_https_upstream_through_a_connect_proxy(tmp_path, ca, tls_upstream, proxy):
    app = tls_app(tmp_path, tls_upstream.url, ca, upstream_proxy=proxy.url)
    for _ in range(3):
        response = post(app)
        assert response.status_int == 200, response.body[:300]
        assert response.json["content"][0]["text"] == "Hello!"
    streams_through(app, tls_upstream, "the proxy or the gateway")
    assert len(tls_upstream.received) == 4
    assert tls_upstream.received[0].headers["x-api-key"] == UPSTREAM_KEY
    # One tunnel, kept alive through the proxy for all four requests.
    assert proxy.connections == 1 and tls_upstream.connections == 1
    sent = bytes(proxy.sent)
    assert re.match(rb"CONNECT 127\.0\.0\.1:%d HTTP/1\.[01]\r\n" % tls_upstream.port, sent)
    assert sent.count(b"CONNECT ") == 1
    # Past the CONNECT, only TLS: neither key nor any header name crosses the proxy readable.
    for secret in (CLIENT_KEY.encode(), UPSTREAM_KEY.encode(), b"x-api-key", b"/v1/messages"):
        assert secret not in sent
    assert "CONNECT" in proxy.log_path.read_text()


def test_http_upstream_through_the_proxy_carries_no_client_key(tmp_path, upstream, proxy):
    app = tls_app(tmp_path, upstream.url, upstream_proxy=proxy.url)
    response = post(app)
    assert response.status_int == 200, response.body[:300]
    # tinyproxy closes a plain-http client connection after each answer without saying so
    # (HTTP/1.1, no 'Connection: close'), so the pool may reuse it in that instant and fail
    # (docs/upstream.md). Wait for the close; then the next request opens a new connection.
    assert proxy.closed_by_proxy.acquire(timeout=WAIT)
    streams_through(app, upstream, "the proxy or the gateway")
    sent = bytes(proxy.sent)
    assert sent.startswith(b"POST %s/v1/messages HTTP/1.1\r\n" % upstream.url.encode())
    assert UPSTREAM_KEY.encode() in sent  # plain http: the proxy is on the upstream's path
    assert CLIENT_KEY.encode() not in sent
    assert gateway.digest_key(CLIENT_KEY).hex().encode() not in sent
    # tinyproxy's Via header says the request really went through it.
    assert "tinyproxy" in upstream.received[0].headers.get("via", "")


def test_trust_env_takes_the_proxy_from_the_environment(tmp_path, ca, tls_upstream, proxy,
                                                        monkeypatch):
    monkeypatch.setenv("HTTPS_PROXY", proxy.url)
    app = tls_app(tmp_path, tls_upstream.url, ca, trust_env="true")
    assert post(app).status_int == 200
    assert proxy.connections == 1
    # NO_PROXY is honoured, as requests honours it...
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    assert post(tls_app(tmp_path, tls_upstream.url, ca, trust_env="true")).status_int == 200
    assert proxy.connections == 1
    # ...and without trust_env the environment is not read at all.
    monkeypatch.delenv("NO_PROXY")
    assert post(tls_app(tmp_path, tls_upstream.url, ca)).status_int == 200
    assert proxy.connections == 1
    assert len(tls_upstream.received) == 3


def test_trust_env_takes_a_proxy_without_a_scheme_as_requests_does(tmp_path, ca, tls_upstream,
                                                                   proxy, monkeypatch, capsys):
    monkeypatch.setenv("HTTPS_PROXY", proxy.url.replace("http://", ""))
    assert post(tls_app(tmp_path, tls_upstream.url, ca, trust_env="true")).status_int == 200
    assert proxy.connections == 1
    # One it cannot use is named as the operator set it, and its password is not shown.
    monkeypatch.setenv("HTTPS_PROXY", "socks5://user:env-secret@127.0.0.1:1080")
    assert gateway.main(["check", "--config", str(tmp_path / "gateway.ini")]) == 1
    out, err = capsys.readouterr()
    assert "trust_env: the proxy in HTTPS_PROXY" in out + err and "env-secret" not in out + err


def test_a_407_from_the_proxy_is_a_502_not_relayed_to_the_client(tmp_path, caplog):
    # A real server on loopback as the proxy, answering 407 as RFC 9110 15.5.8 says a proxy
    # refusing credentials does (tinyproxy answers 401 instead).
    refusing = FakeUpstream()
    refusing.handler = lambda handler, received: handler.send_json(
        407, b"proxy authentication required", {"Proxy-Authenticate": 'Basic realm="corp"'})
    refusing.start()
    try:
        app = tls_app(tmp_path, "http://api.example",
                      upstream_proxy=refusing.url.replace("//", "//user:proxy-pw@"))
        with caplog.at_level(logging.ERROR, logger="gateway"):
            response = post(app)
    finally:
        refusing.stop()
    assert response.status_int == 502 and response.json["error"]["type"] == "api_error"
    assert "the proxy refused the gateway's proxy credentials (407) [%s]" % \
        response.headers["request-id"] in caplog.text
    assert "replace it in the upstream key file" not in caplog.text
    assert "proxy-pw" not in caplog.text + response.text


def test_a_proxy_that_refuses_is_a_502_naming_no_secret(tmp_path, ca, tls_upstream, caplog):
    listener = socket.create_server(("127.0.0.1", 0))  # closed at once: connections refused
    port = listener.getsockname()[1]
    listener.close()
    app = tls_app(tmp_path, tls_upstream.url, ca,
                  upstream_proxy="http://user:proxy-password@127.0.0.1:%d" % port)
    with caplog.at_level(logging.ERROR, logger="gateway"):
        response = post(app)
    assert response.status_int == 502 and response.json["error"]["type"] == "api_error"
    assert "upstream request to 127.0.0.1:%d failed [%s]: through the proxy: connection " \
        "refused" % (tls_upstream.port, response.headers["request-id"]) in caplog.text
    assert "proxy-password" not in caplog.text and "proxy-password" not in response.text
    assert "proxy-password" not in repr(app.config)


def test_a_proxy_refusing_its_credentials_is_named_in_the_log_and_check(tmp_path, ca,
                                                                         tls_upstream, caplog,
                                                                         capsys, monkeypatch):
    monkeypatch.setattr(sys.modules[__name__], "TINYPROXY_CONFIG",
                        TINYPROXY_CONFIG + "BasicAuth proxy-user right-password\n")
    with tinyproxy(tmp_path) as (_, port):
        for password, status in (("right-password", 200), ("wrong-password", 502)):
            app = tls_app(tmp_path, tls_upstream.url, ca,
                          upstream_proxy="http://proxy-user:%s@127.0.0.1:%d" % (password, port))
            with caplog.at_level(logging.ERROR, logger="gateway"):
                assert post(app).status_int == status
        logged = caplog.text
        assert gateway.main(["check", "--config", str(tmp_path / "gateway.ini"),
                             "--online"]) == 1
    out, err = capsys.readouterr()
    for text in (logged, out + err):
        # tinyproxy answers 401 Unauthorized where RFC 9110 15.5.8 says 407
        assert re.search(r"through the proxy: CONNECT answered 40[17] \w", text), text
        assert "wrong-password" not in text and "right-password" not in text


def test_check_online_asks_an_http_upstream_through_a_proxy_with_its_credentials(
        tmp_path, upstream, capsys, monkeypatch):
    monkeypatch.setattr(sys.modules[__name__], "TINYPROXY_CONFIG",
                        TINYPROXY_CONFIG + "BasicAuth proxy-user right-password\n")
    with tinyproxy(tmp_path) as (log_path, port):
        tls_app(tmp_path, upstream.url,
                upstream_proxy="http://proxy-user:right-password@127.0.0.1:%d" % port)
        code = gateway.main(["check", "--config", str(tmp_path / "gateway.ini"), "--online"])
    out, err = capsys.readouterr()
    assert code == 0 and "HEAD / answered 404" in out, out + err
    # tinyproxy closes each plain-http connection after its answer: not called reuse
    assert "reusing the connection" not in out
    assert "on a new connection (the first was closed)" in out or "not kept alive" in out
    assert "HEAD %s/ HTTP/1.1" % upstream.url in log_path.read_text()


def test_check_online_masks_a_proxy_password_that_is_part_of_the_user_name(tmp_path, ca,
                                                                             tls_upstream, capsys):
    listener = socket.create_server(("127.0.0.1", 0))  # closed at once: connections refused
    port = listener.getsockname()[1]
    listener.close()
    tls_app(tmp_path, tls_upstream.url, ca,
            upstream_proxy="http://s3cr3t-user:s3cr3t@127.0.0.1:%d" % port)
    assert gateway.main(["check", "--config", str(tmp_path / "gateway.ini"), "--online"]) == 1
    out, err = capsys.readouterr()
    assert "through proxy http://s3cr3t-user:***@127.0.0.1:%d" % port in out
    assert "s3cr3t@" not in out + err and "connection refused" in out + err


def test_check_online_goes_through_the_proxy(tmp_path, ca, tls_upstream, proxy, capsys):
    tls_app(tmp_path, tls_upstream.url, ca, upstream_proxy=proxy.url)  # writes the files
    assert gateway.main(["check", "--config", str(tmp_path / "gateway.ini"), "--online"]) == 0
    out = capsys.readouterr().out
    assert "through proxy %s" % proxy.url in out and "HEAD / answered 404" in out
    assert bytes(proxy.sent).startswith(b"CONNECT ")


@pytest.mark.parametrize("value", ["127.0.0.1:3128", "socks4://127.0.0.1:1080",
                                   "http://user:pw-secret@127.0.0.1:99999", "http://:3128"])
def test_a_proxy_url_the_pool_cannot_use_is_refused_without_showing_it(tmp_path, value,
                                                                      capsys):
    ini = tmp_path / "gateway.ini"
    ini.write_text("[gateway]\nupstream_proxy = %s\n" % value)
    with pytest.raises(ValueError) as refused:
        gateway.Config.from_file(str(ini))
    assert "upstream_proxy" in str(refused.value) and value not in str(refused.value)
    assert gateway.main(["check", "--config", str(ini)]) != 0
    out, err = capsys.readouterr()
    assert "upstream_proxy" in err and "pw-secret" not in out + err
