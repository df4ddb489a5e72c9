"""The production path: an https upstream, with certificates made here by ``trustme``.

Every other module talks to ``http://127.0.0.1``; a real deployment talks to
``https://api.anthropic.com``. Here the fake upstream answers over TLS with a certificate from
a private CA, and the gateway must: forward and stream over it, keep one TLS connection for
many requests, refuse a certificate with the wrong name, an unknown issuer or a past expiry
(502 to the client, the host and the reason in the log, never a key), trust requests' bundle
and not the system store by default, and take a new ``upstream_ca_file`` without a restart.
"""
import datetime
import logging
import os

import pytest
import webtest

trustme = pytest.importorskip("trustme")

import gateway  # noqa: E402
from conftest import CLIENT_KEY, auth  # noqa: E402
from test_streaming import streams_through  # noqa: E402
from upstream import UPSTREAM_KEY, FakeUpstream, tls_server  # noqa: E402

BODY = {"model": "claude-opus-4-8", "max_tokens": 10,
        "messages": [{"role": "user", "content": "hi"}]}


def write_ini(directory, upstream_url, **settings):
    (directory / "upstream.key").write_text(UPSTREAM_KEY + "\n")
    (directory / "gateway.keys").write_text(
        "alice sha256:%s * enabled\n" % gateway.digest_key(CLIENT_KEY).hex())
    settings = dict({"upstream_url": upstream_url, "keys_file": "gateway.keys",
                     "upstream_key_file": "upstream.key", "connect_timeout": 2,
                     "read_timeout": 5}, **settings)
    path = directory / "gateway.ini"
    path.write_text("[gateway]\n" + "".join("%s = %s\n" % item for item in settings.items())
                    + "[models]\nclaude-opus-4-8 = claude-opus-4-8-20261101\n")
    return path


def tls_app(directory, upstream_url, ca=None, **settings):
    """The gateway in front of ``upstream_url``, trusting ``ca`` (a trustme CA) if given."""
    if ca is not None:
        ca.cert_pem.write_to_path(str(directory / "upstream-ca.pem"))
        settings["upstream_ca_file"] = "upstream-ca.pem"
    return gateway.make_app(gateway.Config.from_file(str(write_ini(directory, upstream_url,
                                                                   **settings))))


def post(app, body=BODY, status="*"):
    return webtest.TestApp(app).post_json("/v1/messages", body, headers=auth(), status=status)


def test_forwards_over_tls_and_keeps_one_connection(tmp_path, ca, tls_upstream):
    app = tls_app(tmp_path, tls_upstream.url, ca)
    for _ in range(5):
        response = post(app)
        assert response.status_int == 200, response.body[:300]
        assert response.json["content"][0]["text"] == "Hello!"
    counted = webtest.TestApp(app).post_json("/v1/messages/count_tokens", BODY, headers=auth())
    assert counted.json == {"input_tokens": 42}
    assert len(tls_upstream.received) == 6
    assert tls_upstream.last.headers["x-api-key"] == UPSTREAM_KEY
    # Six requests from one thread, one TCP connection and so one TLS handshake: keep-alive.
    assert tls_upstream.connections == 1


def test_streams_over_tls_each_event_as_it_arrives(tmp_path, ca, tls_upstream):
    app = tls_app(tmp_path, tls_upstream.url, ca)
    streams_through(app, tls_upstream)
    # ...and the connection is reused by the next request once the stream ended.
    assert post(app).status_int == 200
    assert tls_upstream.connections == 1


def _refused(tmp_path, caplog, upstream, ca, reason):
    app = tls_app(tmp_path, upstream.url, ca)
    with caplog.at_level(logging.ERROR, logger="gateway"):
        response = post(app)
    assert response.status_int == 502
    assert response.json["error"]["type"] == "api_error"
    assert upstream.received == []  # nothing was sent over a connection we do not trust
    lines = [r.getMessage() for r in caplog.records if "upstream request to" in r.getMessage()]
    assert len(lines) == 1, caplog.text
    assert "upstream request to 127.0.0.1:%d failed" % upstream.port in lines[0]
    assert "TLS certificate refused: " + reason in lines[0]
    for secret in (UPSTREAM_KEY, CLIENT_KEY):
        assert secret not in caplog.text
    return lines[0]


@pytest.mark.parametrize("identities, reason", [
    (("other.example",), "wrong name"),
    (("127.0.0.1",), "expired")])
def test_certificate_with_wrong_name_or_expired_is_refused(tmp_path, caplog, ca, identities,
                                                           reason):
    past = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(days=1)
    leaf = ca.issue_cert(*identities, not_after=past if reason == "expired" else None)
    upstream = FakeUpstream(tls_server(leaf)).start()
    try:
        _refused(tmp_path, caplog, upstream, ca, reason)
    finally:
        upstream.stop()


def test_certificate_from_an_unknown_issuer_is_refused(tmp_path, caplog, ca, tls_upstream):
    _refused(tmp_path, caplog, tls_upstream, trustme.CA(), "unknown issuer")


def test_default_trust_is_requests_bundle_not_the_system_store(tmp_path, caplog, ca,
                                                               tls_upstream, monkeypatch):
    # SSL_CERT_FILE steers OpenSSL's default paths (the system store): it must not matter.
    ca.cert_pem.write_to_path(str(tmp_path / "private-ca.pem"))
    monkeypatch.setenv("SSL_CERT_FILE", str(tmp_path / "private-ca.pem"))
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(tmp_path / "private-ca.pem"))
    _refused(tmp_path, caplog, tls_upstream, None, "unknown issuer")  # trust_env is off
    # With trust_env, REQUESTS_CA_BUNDLE replaces requests' bundle, as it does for requests.
    app = tls_app(tmp_path, tls_upstream.url, None, trust_env="true")
    assert post(app).status_int == 200


@pytest.mark.parametrize("content, reason", [(None, "No such file or directory"),
                                             (b"not a certificate\n", "NO_CERTIFICATE")])
def test_a_requests_ca_bundle_that_does_not_load_is_named_by_check(tmp_path, monkeypatch,
                                                                    capsys, content, reason):
    bundle = tmp_path / "bundle.pem"
    if content is not None:
        bundle.write_bytes(content)
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(bundle))
    write_ini(tmp_path, "https://127.0.0.1:9", trust_env="true")
    assert gateway.main(["check", "--config", str(tmp_path / "gateway.ini")]) == 1
    out = capsys.readouterr().out
    assert "a worker cannot start with this config: CA bundle %s (REQUESTS_CA_BUNDLE" % bundle \
        in out and reason in out, out


def test_the_default_bundle_is_requests_own():
    config = gateway.Config(upstream_url="https://api.anthropic.com")
    assert gateway.default_ca_bundle(config, {"REQUESTS_CA_BUNDLE": "/x"}) == \
        __import__("requests").certs.where()


def test_a_new_ca_file_is_taken_up_and_a_broken_one_ignored(tmp_path, caplog, ca,
                                                            tls_upstream):
    app = tls_app(tmp_path, tls_upstream.url, trustme.CA())  # the wrong CA first
    assert post(app).status_int == 502
    path = tmp_path / "upstream-ca.pem"
    replace(path, ca.cert_pem.bytes())
    assert post(app).status_int == 200
    connections = tls_upstream.connections
    replace(path, b"-----BEGIN CERTIFICATE-----\nnot base64\n")  # a botched edit
    with caplog.at_level(logging.ERROR, logger="gateway"):
        assert post(app).status_int == 200  # the last good CA file still holds...
    assert "cannot load %s" % path in caplog.text
    assert tls_upstream.connections == connections  # ...and so does its pool's connection


def replace(path, data):
    temporary = path.with_name(path.name + ".new")
    temporary.write_bytes(data)
    os.replace(temporary, path)


def test_check_reports_a_bad_ca_file(tmp_path, ca, capsys):
    (tmp_path / "upstream-ca.pem").write_text("not a certificate\n")
    ini = write_ini(tmp_path, "https://127.0.0.1:9", upstream_ca_file="upstream-ca.pem")
    assert gateway.main(["check", "--config", str(ini)]) == 1
    assert "upstream_ca_file %s" % (tmp_path / "upstream-ca.pem") in capsys.readouterr().out


def test_check_online_reports_the_certificate_and_sends_nothing_billed(tmp_path, ca,
                                                                       tls_upstream, capsys):
    ca.cert_pem.write_to_path(str(tmp_path / "upstream-ca.pem"))
    ini = write_ini(tmp_path, tls_upstream.url, upstream_ca_file="upstream-ca.pem")
    assert gateway.main(["check", "--config", str(ini), "--online"]) == 0
    out = capsys.readouterr().out
    assert "online: TLSv1." in out
    assert "issuer organizationName=trustme" in out
    assert "(" in out and " days)" in out
    assert "HEAD / answered 404; round trip " in out and "ms reusing the connection" in out
    assert tls_upstream.received == [] and tls_upstream.heads == 2  # no POST, no key
    assert tls_upstream.connections == 1
    assert UPSTREAM_KEY not in out


def test_check_online_names_a_refused_certificate(tmp_path, tls_upstream, capsys):
    trustme.CA().cert_pem.write_to_path(str(tmp_path / "upstream-ca.pem"))
    ini = write_ini(tmp_path, tls_upstream.url, upstream_ca_file="upstream-ca.pem")
    assert gateway.main(["check", "--config", str(ini), "--online"]) == 1
    assert "problem: upstream: cannot reach 127.0.0.1:%d: TLS certificate refused: unknown " \
        "issuer" % tls_upstream.port in capsys.readouterr().out
