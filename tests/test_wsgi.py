"""The WSGI contract through webtest.TestApp (lint on), against the real loopback upstream."""
import json
import logging

import pytest
import webtest

import gateway
from conftest import CLIENT_KEY, DISABLED_KEY, LIMITED_KEY, auth
from upstream import UPSTREAM_KEY, message

MESSAGE = {"model": "claude-opus-4-8", "max_tokens": 16,
           "messages": [{"role": "user", "content": "Hello"}]}


@pytest.fixture
def client(app):
    return webtest.TestApp(app, lint=True)


def assert_envelope(response, status, error_type):
    assert response.status_int == status
    assert response.content_type == "application/json"
    body = response.json
    assert body["type"] == "error" and body["error"]["type"] == error_type
    assert body["request_id"] == response.headers["request-id"]
    assert body["request_id"].startswith("req_gw_")
    return body["error"]["message"]


# -- forwarding ----------------------------------------------------------------------------

def test_message_is_forwarded_with_our_key_and_the_model_rewritten(client, upstream):
    response = client.post("/v1/messages?beta=true", json.dumps(MESSAGE), headers=dict(
        auth(), **{"content-type": "application/json", "anthropic-beta": "x-1,y-2",
                   "anthropic-user-profile-id": "prof", "cookie": "session=1",
                   "x-forwarded-for": "10.0.0.1"}))
    assert response.status_int == 200
    # the upstream's JSON comes back unchanged, its model id included
    assert response.json == message("claude-opus-4-8-20261101")
    assert response.headers["request-id"] == "req_upstream_1"
    assert response.headers["anthropic-ratelimit-requests-remaining"] == "99"
    assert response.headers["retry-after"] == "1"
    for hidden in ("Set-Cookie", "anthropic-organization-id"):
        assert hidden not in response.headers
    seen = upstream.last
    assert seen.path == "/v1/messages?beta=true"
    assert seen.json() == dict(MESSAGE, model="claude-opus-4-8-20261101")
    assert seen.headers["x-api-key"] == UPSTREAM_KEY
    assert seen.headers["anthropic-beta"] == "x-1,y-2"
    assert seen.headers["anthropic-version"] == "2023-06-01"
    assert seen.headers["anthropic-user-profile-id"] == "prof"
    assert seen.headers["accept-encoding"] == "identity"
    for never in ("authorization", "cookie", "x-forwarded-for"):
        assert never not in seen.headers
    assert CLIENT_KEY not in repr(seen.headers) + seen.body.decode()


def test_bearer_credential_and_current_sdk_version_pass(client, upstream):
    client.post_json("/v1/messages", MESSAGE, headers={
        "Authorization": "Bearer " + CLIENT_KEY, "anthropic-version": "2026-10-21"})
    assert upstream.last.headers["anthropic-version"] == "2026-10-21"
    assert "authorization" not in upstream.last.headers


def test_missing_version_is_sent_as_2023_06_01(client, upstream):
    client.post_json("/v1/messages", MESSAGE, headers={"x-api-key": CLIENT_KEY})
    assert upstream.last.headers["anthropic-version"] == "2023-06-01"


def test_count_tokens_drops_fields_it_rejects_and_relays_the_answer(client, upstream):
    body = dict(MESSAGE, stream=True, temperature=0.5, metadata={"user_id": "u"})
    response = client.post_json("/v1/messages/count_tokens?beta=true", body, headers=auth())
    assert response.json == {"input_tokens": 42}
    assert upstream.last.path == "/v1/messages/count_tokens?beta=true"
    assert upstream.last.json() == {"model": "claude-opus-4-8-20261101",
                                    "messages": MESSAGE["messages"]}


def test_upstream_errors_are_relayed_unchanged(client, upstream):
    error = {"type": "error", "error": {"type": "invalid_request_error",
                                        "message": "prompt is too long: 9 tokens > 8 maximum"},
             "request_id": "req_up_9"}

    def too_long(handler, received):
        handler.send_json(400, error, {"x-should-retry": "false"})
    upstream.handler = too_long
    response = client.post_json("/v1/messages", MESSAGE, headers=auth(), status=400)
    assert response.json == error and response.headers["x-should-retry"] == "false"


def test_upstream_refusing_our_key_is_a_502_logged_loudly(client, upstream, config_dir, caplog):
    (config_dir / "upstream.key").write_text("sk-ant-wrong\n")
    with caplog.at_level(logging.CRITICAL, logger="gateway"):
        response = client.post_json("/v1/messages", MESSAGE, headers=auth(), status=502)
    assert "credentials" in assert_envelope(response, 502, "api_error")
    assert "refused OUR key" in caplog.text and "sk-ant-wrong" not in caplog.text


def test_upstream_key_file_is_reread_when_it_changes(client, upstream, config_dir):
    (config_dir / "upstream.key").write_text("sk-ant-rotated\n")
    client.post_json("/v1/messages", MESSAGE, headers=auth(), status=502)
    assert upstream.last.headers["x-api-key"] == "sk-ant-rotated"


def test_upstream_unreachable_is_502(config):
    import dataclasses
    from upstream import refused_port
    with refused_port() as port:
        app = gateway.make_app(dataclasses.replace(
            config, upstream_url="http://127.0.0.1:%d" % port))
        response = webtest.TestApp(app).post_json("/v1/messages", MESSAGE, headers=auth(),
                                                  status=502)
    assert "could not be reached" in assert_envelope(response, 502, "api_error")


def test_upstream_silent_past_the_read_timeout_is_504(config, upstream):
    import dataclasses
    import threading
    release = threading.Event()

    def silent(handler, received):
        release.wait(5)
    upstream.handler = silent
    app = gateway.make_app(dataclasses.replace(config, read_timeout=0.2))
    try:
        response = webtest.TestApp(app).post_json("/v1/messages", MESSAGE, headers=auth(),
                                                  status=504)
    finally:
        release.set()
    assert_envelope(response, 504, "timeout_error")


# -- our own errors ----------------------------------------------------------------------------

@pytest.mark.parametrize("headers", [
    {}, {"x-api-key": "sk-gw-unknown"}, {"Authorization": "Bearer sk-gw-unknown"},
    {"Authorization": "Basic " + CLIENT_KEY}, {"x-api-key": DISABLED_KEY},
])
def test_missing_unknown_or_disabled_key_is_401(client, upstream, headers):
    response = client.post_json("/v1/messages", MESSAGE, headers=headers, status=401)
    assert_envelope(response, 401, "authentication_error")
    assert upstream.received == []


@pytest.mark.parametrize("headers, message", [
    ({"x-api-key": "sk-gw-unknown"}, "invalid x-api-key"),
    ({"Authorization": "Bearer sk-gw-unknown"}, "Invalid bearer token"),
    ({"x-api-key": "sk-ant-api03-x"}, "invalid x-api-key (it is an Anthropic API key"),
])
def test_a_refused_key_is_named_by_the_header_it_came_in(client, headers, message):
    response = client.post_json("/v1/messages", MESSAGE, headers=headers, status=401)
    assert response.json["error"]["message"].startswith(message)


def test_model_not_allowed_for_the_key_is_403(client, upstream, caplog):
    with caplog.at_level(logging.INFO, logger="gateway.access"):
        response = client.post_json("/v1/messages", MESSAGE, headers=auth(LIMITED_KEY),
                                    status=403)
    assert_envelope(response, 403, "permission_error")
    record = json.loads([r for r in caplog.records if r.name == "gateway.access"][-1]
                        .getMessage())
    assert (record["status"], record["key"], record["model"]) == (403, "bob", MESSAGE["model"])
    client.post_json("/v1/messages", dict(MESSAGE, model="claude-opus-4-7"),
                     headers=auth(LIMITED_KEY))
    assert upstream.last.json()["model"] == "claude-opus-4-7-20260601"


def test_unknown_public_model_is_404_naming_it(client, upstream):
    response = client.post_json("/v1/messages", dict(MESSAGE, model="claude-foo"),
                                headers=auth(), status=404)
    assert assert_envelope(response, 404, "not_found_error") == (
        "model: claude-foo. This key may use: claude-opus-4-8, claude-opus-4-7.")
    assert upstream.received == []


@pytest.mark.parametrize("body", [b"{not json", b"[]", b'{"model": NaN}', b"\xff\xfe\xfd"])
def test_bad_bodies_are_400(client, body):
    response = client.post("/v1/messages", body, headers=dict(
        auth(), **{"content-type": "application/json"}), status=400)
    assert_envelope(response, 400, "invalid_request_error")


def test_body_over_the_limit_is_413_before_reading(config):
    import dataclasses
    app = gateway.make_app(dataclasses.replace(config, max_body_bytes=100))
    environ_reads = []

    class Input:
        def read(self, size=-1):
            environ_reads.append(size)
            return b"x"
    environ = {"REQUEST_METHOD": "POST", "PATH_INFO": "/v1/messages",
               "CONTENT_LENGTH": "101", "HTTP_X_API_KEY": CLIENT_KEY, "wsgi.input": Input()}
    started = []
    body = b"".join(app(environ, lambda status, headers: started.append(status)))
    assert started == [gateway.status_line(413)] and environ_reads == []
    assert json.loads(body)["error"]["type"] == "request_too_large"


def test_chunked_body_over_the_limit_is_413(config):
    import dataclasses
    import io
    app = gateway.make_app(dataclasses.replace(config, max_body_bytes=1000))
    environ = {"REQUEST_METHOD": "POST", "PATH_INFO": "/v1/messages",
               "wsgi.input_terminated": True, "HTTP_X_API_KEY": CLIENT_KEY,
               "wsgi.input": io.BytesIO(b"{" + b" " * 5000 + b"}")}
    started = []
    b"".join(app(environ, lambda status, headers: started.append(status)))
    assert started == [gateway.status_line(413)]
    assert environ["wsgi.input"].tell() <= 1001  # stopped reading just past the limit


def test_unknown_path_is_404_and_wrong_method_405(client):
    assert_envelope(client.get("/v2/whatever", status=404), 404, "not_found_error")
    response = client.get("/v1/messages", headers=auth(), status=405)
    assert_envelope(response, 405, "invalid_request_error")
    assert response.headers["Allow"] == "POST"


def test_health_and_head_need_no_key(client):
    assert client.get("/healthz").json == {"status": "ok"}
    assert client.head("/").status_int == 200


@pytest.mark.parametrize("path, headers", [
    ("/healthz", {}), ("/v1/models", auth()), ("/v1/models/claude-opus-4-8", auth()),
    ("/", {}),
])
def test_every_answer_has_a_request_id_and_head_works_where_get_does(client, path, headers):
    got = client.get(path, headers=headers)
    assert got.headers["request-id"].startswith("req_gw_")
    head = client.head(path, headers=headers)
    assert head.status_int == 200 and head.body == b""
    assert head.headers["Content-Length"] == got.headers["Content-Length"]
    assert head.headers["request-id"] != got.headers["request-id"]


def test_head_is_allowed_where_get_is(client):
    response = client.post("/v1/models", headers=auth(), status=405)
    assert response.headers["Allow"] == "GET, HEAD"


@pytest.mark.parametrize("status, line", [
    (200, "200 OK"), (402, "402 Payment Required"), (413, "413 Content Too Large"),
    (529, "529 Overloaded"), (499, "499 Client Closed Request"), (599, "599 Unknown"),
])
def test_status_lines_use_the_standard_reason_phrases(status, line):
    import http
    if status == 413 and not hasattr(http.HTTPStatus, "CONTENT_TOO_LARGE"):
        line = "413 Request Entity Too Large"  # Python < 3.13 names it by RFC 7231
    assert gateway.status_line(status) == line


def test_an_upstream_402_keeps_its_reason_phrase(served_app, upstream):
    import requests
    upstream.handler = lambda handler, received: handler.send_json(402, {
        "type": "error", "error": {"type": "billing_error", "message": "Pay up"}})
    response = requests.post(served_app + "/v1/messages", json=MESSAGE, headers=auth())
    assert (response.status_code, response.reason) == (402, "Payment Required")


# -- models ----------------------------------------------------------------------------------

def test_models_lists_the_public_ids_this_key_may_use(client):
    everything = client.get("/v1/models?limit=1000", headers=auth()).json
    assert [m["id"] for m in everything["data"]] == ["claude-opus-4-8", "claude-opus-4-7"]
    assert everything["has_more"] is False
    assert (everything["first_id"], everything["last_id"]) == ("claude-opus-4-8",
                                                               "claude-opus-4-7")
    assert everything["data"][0] == {"type": "model", "id": "claude-opus-4-8",
                                     "display_name": "Claude Opus 4.8",
                                     "created_at": "1970-01-01T00:00:00Z"}
    limited = client.get("/v1/models", headers={"Authorization": "Bearer " + LIMITED_KEY})
    assert [m["id"] for m in limited.json["data"]] == ["claude-opus-4-7"]
    assert client.get("/v1/models/claude-opus-4-8?beta=true", headers=auth()).json["id"] == \
        "claude-opus-4-8"
    client.get("/v1/models/claude-opus-4-8", headers=auth(LIMITED_KEY), status=404)
    client.get("/v1/models", status=401)


# -- the access log -----------------------------------------------------------------------------

def test_access_log_has_one_json_line_without_secrets(client, caplog):
    with caplog.at_level(logging.INFO, logger="gateway.access"):
        client.post_json("/v1/messages", MESSAGE, headers=auth())
        client.post_json("/v1/messages", MESSAGE, headers=auth("sk-gw-nope"), status=401)
    records = [json.loads(r.getMessage()) for r in caplog.records
               if r.name == "gateway.access"]
    assert len(records) == 2
    ok, refused = records
    assert ok["key"] == "alice" and ok["status"] == 200 and ok["stream"] is False
    assert (ok["model"], ok["upstream_model"]) == ("claude-opus-4-8", "claude-opus-4-8-20261101")
    assert (ok["input_tokens"], ok["output_tokens"], ok["cache_read_input_tokens"]) == (12, 5, 3)
    assert ok["upstream_request_id"] == "req_upstream_1" and ok["duration_ms"] >= 0
    assert refused["status"] == 401 and refused["key"] is None
    assert refused["error"] == "authentication_error"
    text = caplog.text
    assert CLIENT_KEY not in text and "sk-gw-nope" not in text
    assert gateway.digest_key(CLIENT_KEY).hex() not in text
    assert "Hello" not in text  # never a message body


def test_client_ip_from_x_real_ip_only_from_trusted_proxies(config, caplog):
    import dataclasses
    trusting = webtest.TestApp(gateway.make_app(
        dataclasses.replace(config, trusted_proxies=frozenset({"127.0.0.1"}))))
    plain = webtest.TestApp(gateway.make_app(config))
    with caplog.at_level(logging.INFO, logger="gateway.access"):
        for app in (trusting, plain):
            app.get("/healthz", headers={"X-Real-IP": "203.0.113.9"},
                    extra_environ={"REMOTE_ADDR": "127.0.0.1"})
    ips = [json.loads(r.getMessage())["client_ip"] for r in caplog.records
           if r.name == "gateway.access"]
    assert ips == ["203.0.113.9", "127.0.0.1"]


def test_two_apps_in_one_process_share_nothing(config_dir, upstream):
    import dataclasses
    first = gateway.make_app(gateway.Config.from_file(str(config_dir / "gateway.ini")))
    other_keys = config_dir / "other.keys"
    other_keys.write_text("")
    second = gateway.make_app(dataclasses.replace(first.config, keys_file=str(other_keys)))
    webtest.TestApp(first).post_json("/v1/messages", MESSAGE, headers=auth())
    webtest.TestApp(second).post_json("/v1/messages", MESSAGE, headers=auth(), status=401)
    assert first.session() is not second.session()


def test_an_unexpected_failure_is_a_500_envelope_with_the_traceback_only_in_the_log(app,
                                                                                   caplog):
    def broken(environ, exchange):
        raise RuntimeError("internal detail that must not leak")
    app.routes["/healthz"]["GET"] = broken
    with caplog.at_level(logging.ERROR, logger="gateway"):
        response = webtest.TestApp(app).get("/healthz", status=500)
    assert_envelope(response, 500, "api_error")
    assert "internal detail" not in response.text and "Traceback" not in response.text
    assert "internal detail that must not leak" in caplog.text


def _established_to(port):
    """This host's client-side TCP connections to 127.0.0.1:``port`` that are still open."""
    with open("/proc/net/tcp") as file:
        rows = [line.split() for line in file.read().splitlines()[1:]]
    return sum(1 for row in rows if row[2] == "0100007F:%04X" % port and row[3] == "01")


def test_threads_share_one_upstream_pool_that_keeps_pool_maxsize_idle(config, upstream):
    """A burst of 8 concurrent requests opens 8 upstream connections; afterwards the app
    keeps pool_maxsize (2) of them for reuse and has closed the rest."""
    import dataclasses
    import threading
    app = gateway.make_app(dataclasses.replace(config, pool_maxsize=2))
    burst = threading.Barrier(8, timeout=10)

    def answer_together(handler, received):
        burst.wait()  # every request holds its upstream connection open at the same time
        handler.send_json(200, message(received.json()["model"]))
    upstream.handler = answer_together
    statuses = []
    threads = [threading.Thread(target=lambda: statuses.append(webtest.TestApp(app).post_json(
        "/v1/messages", MESSAGE, headers=auth()).status_int)) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(20)
    assert statuses == [200] * 8
    pools = set()
    threading.Thread(target=lambda: pools.add(app.upstream_pool())).start()
    pools.add(app.upstream_pool())
    assert len(pools) == 1
    assert _established_to(int(upstream.url.rsplit(":", 1)[1])) == 2
