"""Property-based fuzzing of the WSGI app (hypothesis): headers, paths, queries and bodies.

Whatever a client sends, the gateway itself never answers 5xx (the fake upstream here only
answers 200, so any 5xx would be the gateway's own), never shows a traceback or a secret, and
every error it makes is the Anthropic envelope with a ``request-id``. When a request does go
upstream, the upstream receives the client's body with only the model ids mapped, and no
header value with CR, LF or NUL in it.

The number of cases per property is ``GATEWAY_FUZZ_EXAMPLES`` (default 250), except for the
last property, aimed past routing and refusals so that every case reaches the upstream:
``GATEWAY_FUZZ_UPSTREAM_EXAMPLES`` (default 2,000). hypothesis keeps failing cases in
``.hypothesis/`` and replays them first.
"""
import hashlib
import io
import json
import logging
import os
import threading

import pytest
from hypothesis import HealthCheck, event, given, settings, strategies as st

import gateway
from conftest import CLIENT_KEY, DISABLED_KEY, LIMITED_KEY, key_line
from upstream import UPSTREAM_KEY, FakeUpstream, message, text_stream

EXAMPLES = int(os.environ.get("GATEWAY_FUZZ_EXAMPLES", "250"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None if os.environ.get(
    "GATEWAY_FUZZ_NO_DATABASE") else settings.default.database,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                           HealthCheck.filter_too_much])
MAX_BODY = 64 * 1024
MODELS = {"claude-opus-4-8": "claude-opus-4-8-20261101",
          "claude-opus-4-7": "claude-opus-4-7-20260601"}
KEYS = (CLIENT_KEY, LIMITED_KEY, DISABLED_KEY)
SECRETS = [UPSTREAM_KEY.encode()] + [
    form for key in KEYS for form in (hashlib.sha256(key.encode()).hexdigest().encode(),
                                      hashlib.sha256(key.encode()).hexdigest()[:16].encode())]
HOP_BY_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te",
              "trailer", "transfer-encoding", "upgrade"}
CASES = {"count": 0}


# ---------------------------------------------------------------------------------------------
# The app under test, its upstream, and what they log
# ---------------------------------------------------------------------------------------------

def fuzz_upstream(handler, received):
    """Answers 200 to whatever the gateway forwards; flags a forwarded body that is not JSON."""
    fake = handler.server.fake
    try:
        body = json.loads(received.body)
    except ValueError:
        fake.anomalies.append(("not JSON upstream", received.body[:200]))
        return handler.send_json(400, {"type": "error", "error": {
            "type": "invalid_request_error", "message": "not JSON"}})
    if received.path.split("?")[0] == "/v1/messages/count_tokens":
        return handler.send_json(200, {"input_tokens": 7})
    if isinstance(body, dict) and body.get("stream") is True:
        handler.start_sse("chunked")
        for event in text_stream(body.get("model", "?")):
            handler.send_chunk(event)
        return handler.end_sse()
    return handler.send_json(200, message(str(body.get("model"))))


class Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records = []
        self.guard = threading.Lock()  # not self.lock: Handler.handle holds that one

    def emit(self, record):
        with self.guard:
            self.records.append(record)


@pytest.fixture(scope="module")
def rig(tmp_path_factory):
    directory = tmp_path_factory.mktemp("fuzz")
    fake = FakeUpstream()
    fake.handler = fuzz_upstream
    fake.anomalies = []
    fake.start()
    (directory / "upstream.key").write_text(UPSTREAM_KEY + "\n")
    (directory / "gateway.keys").write_text(
        key_line("alice", CLIENT_KEY) + key_line("bob", LIMITED_KEY, "claude-opus-4-7")
        + key_line("carol", DISABLED_KEY, "*", "disabled"))
    config = gateway.Config(
        upstream_url=fake.url, keys_file="gateway.keys", upstream_key_file="upstream.key",
        connect_timeout=2.0, read_timeout=5.0, max_body_bytes=MAX_BODY,
        models=MODELS, base_dir=str(directory))
    records = Records()
    logger = logging.getLogger("gateway")
    logger.addHandler(records)
    previous_level = logger.level
    logger.setLevel(logging.DEBUG)
    try:
        yield gateway.make_app(config), fake, records
    finally:
        logger.removeHandler(records)
        logger.setLevel(previous_level)
        fake.stop()
    assert not fake.anomalies, fake.anomalies[:3]
    upstream_saw = b"".join(repr(r.headers).encode() + r.path.encode() + r.body
                            for r in fake.received)
    for secret in SECRETS[1:] + [key.encode() for key in KEYS]:
        assert secret not in upstream_saw


def call(app, environ):
    """Run one request through the app as a WSGI server would: status, headers, body bytes."""
    answer = {}

    def start_response(status, headers, exc_info=None):
        answer["status"], answer["headers"] = status, headers

    iterable = app(environ, start_response)
    try:
        data = b"".join(iterable)
    finally:
        if hasattr(iterable, "close"):
            iterable.close()
    return answer["status"], answer["headers"], data


def check_forwarded(client, upstream, path, nan_ok=False):
    """The upstream got the ``client``'s body with its model id mapped and every other field
    as it was (but tools and fallbacks, and the fields count_tokens drops, which it must not
    get). ``nan_ok``: a NaN the client sent arrives as NaN, which never equals itself."""
    assert upstream["model"] == MODELS[client["model"]]
    for name in set(client) | set(upstream):
        if name in ("model", "fallbacks", "tools"):
            continue
        if path.endswith("count_tokens") and name in gateway.COUNT_TOKENS_DROPPED_FIELDS:
            assert name not in upstream
            continue
        value = upstream.get(name)
        assert value == client.get(name) or (nan_ok and value != value), name


def check_answer(status, headers, data, records, start, method="POST"):
    """The invariants every answer holds, whatever was asked."""
    CASES["count"] += 1
    code, _, reason = status.partition(" ")
    assert code.isdigit() and len(code) == 3 and reason, status
    assert int(code) < 500, (status, data[:300])
    names = {name.lower() for name, _ in headers}
    assert not names & HOP_BY_HOP, names
    for name, value in headers:
        assert isinstance(name, str) and isinstance(value, str)
        assert "\r" not in value and "\n" not in value
        value.encode("latin-1")
    assert b"Traceback" not in data
    for secret in SECRETS:
        assert secret not in data
    if method == "HEAD":  # RFC 9110 9.3.2: the headers GET would get, no content
        assert data == b"", data[:300]
    elif int(code) >= 400:
        payload = json.loads(data)
        assert payload["type"] == "error"
        assert isinstance(payload["error"]["type"], str) and payload["error"]["type"]
        assert isinstance(payload["error"]["message"], str) and payload["error"]["message"]
        assert payload["request_id"] == dict(headers)["request-id"]
        assert dict(headers)["Content-Type"] == "application/json"
    with records.guard:
        new = records.records[start:]
    for record in new:
        assert not record.exc_info, record.getMessage()     # no 'unexpected error' traceback
        text = record.getMessage().encode("utf-8", "replace")
        for secret in SECRETS + [key.encode() for key in KEYS]:
            assert secret not in text


def environ_for(method="POST", path="/v1/messages", query="", headers=(), body=b"",
                content_length=None, terminated=True):
    environ = {
        "REQUEST_METHOD": method, "PATH_INFO": path, "QUERY_STRING": query,
        "SERVER_NAME": "127.0.0.1", "SERVER_PORT": "8080", "SERVER_PROTOCOL": "HTTP/1.1",
        "REMOTE_ADDR": "127.0.0.1", "SCRIPT_NAME": "",
        "wsgi.version": (1, 0), "wsgi.url_scheme": "http", "wsgi.input": io.BytesIO(body),
        "wsgi.errors": io.StringIO(), "wsgi.multithread": True, "wsgi.multiprocess": False,
        "wsgi.run_once": False, "wsgi.input_terminated": terminated,
    }
    if content_length is None and body:
        content_length = str(len(body))
    if content_length is not None:
        environ["CONTENT_LENGTH"] = content_length
    for name, value in headers:
        key = name.upper().replace("-", "_")
        if key in ("CONTENT_TYPE", "CONTENT_LENGTH"):
            environ[key] = value
        else:
            environ["HTTP_" + key] = value
    return environ


# ---------------------------------------------------------------------------------------------
# Strategies
# ---------------------------------------------------------------------------------------------

latin1 = st.characters(min_codepoint=0, max_codepoint=255)
latin1_text = st.text(latin1, max_size=40)
#: What a real server can put in a header value (RFC 9110 field-value), and then anything.
header_values = st.one_of(
    st.text(st.characters(min_codepoint=0x20, max_codepoint=0xFF, exclude_characters="\x7f"),
            max_size=40),
    latin1_text,
    st.text(max_size=10),  # beyond latin-1: no server sends it, the app must still cope
    st.sampled_from(["", " ", "a\r\nx-evil: 1", "a\nb", "a\x00b", " lead", "trail\t"]))
header_names = st.one_of(
    st.sampled_from(["anthropic-beta", "anthropic-version", "anthropic-x", "x-api-key",
                     "authorization", "content-type", "content-length", "user-agent",
                     "x-stainless-retry-count", "x-claude-code-session-id", "x-app",
                     "x-client-request-id", "cookie", "host", "x-real-ip", "accept-encoding",
                     "connection", "transfer-encoding", "te", "x-forwarded-for"]),
    st.from_regex(r"[A-Za-z][A-Za-z0-9\-_]{0,24}", fullmatch=True),
    st.text(latin1, min_size=1, max_size=12))
credentials = st.one_of(
    st.sampled_from(KEYS).map(lambda key: [("x-api-key", key)]),
    st.sampled_from(KEYS).map(lambda key: [("authorization", "Bearer " + key)]),
    st.sampled_from(KEYS).map(lambda key: [("authorization", "bearer  %s " % key)]),
    st.just([]),
    header_values.map(lambda value: [("x-api-key", value)]))
headers = st.builds(lambda creds, extra: creds + extra, credentials,
                    st.lists(st.tuples(header_names, header_values), max_size=8))
paths = st.one_of(
    st.sampled_from(["/v1/messages", "/v1/messages/count_tokens", "/v1/models", "/healthz",
                     "/", "", "/v1/messages/", "//v1/messages", "/V1/MESSAGES",
                     "/v1/models/claude-opus-4-8", "/v1/models/", "/metrics"]),
    st.builds(lambda rest: "/v1/models/" + rest, latin1_text),
    st.builds(lambda rest: "/" + rest, latin1_text))
methods = st.one_of(st.sampled_from(["GET", "POST", "HEAD", "PUT", "DELETE", "OPTIONS",
                                     "PATCH", "TRACE", "CONNECT"]),
                    st.from_regex(r"[A-Z]{1,10}", fullmatch=True))
queries = st.one_of(st.sampled_from(["", "beta=true", "limit=1", "limit=0", "limit=abc",
                                     "after_id=claude-opus-4-8", "before_id=x", "a=%zz",
                                     "%", "a=%E9", "a=b=c&&d", "limit=1001"]),
                    latin1_text)
json_scalars = st.one_of(st.none(), st.booleans(), st.integers(),
                         st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=20))
json_values = st.recursive(json_scalars, lambda children: st.one_of(
    st.lists(children, max_size=4), st.dictionaries(st.text(max_size=10), children, max_size=4)),
    max_leaves=20)
model_ids = st.one_of(st.sampled_from(list(MODELS) + list(MODELS.values()) + ["", "claude"]),
                      json_values)
message_bodies = st.fixed_dictionaries(
    {"model": model_ids},
    optional={"max_tokens": json_values, "stream": st.one_of(st.booleans(), json_values),
              "messages": json_values, "system": json_values, "metadata": json_values,
              "temperature": json_values,
              "fallbacks": st.lists(st.one_of(
                  st.fixed_dictionaries({"model": model_ids}), json_values), max_size=3),
              "tools": st.lists(st.one_of(
                  st.fixed_dictionaries({"type": st.sampled_from(["advisor_20260301",
                                                                  "custom"]),
                                         "model": model_ids}),
                  st.fixed_dictionaries({"type": json_values}), json_values), max_size=3)})


def nested(depth, opener, closer):
    return opener * depth + closer * depth


bodies = st.one_of(
    message_bodies.map(lambda value: json.dumps(value).encode()),
    message_bodies.map(lambda value: json.dumps(value, ensure_ascii=False).encode()),
    message_bodies.map(lambda value: json.dumps(value).encode("utf-16")),
    json_values.map(lambda value: json.dumps(value).encode()),
    st.binary(max_size=200),
    st.builds(lambda depth, where: ('{"model": "claude-opus-4-8", "%s": %s}' % (
        where, nested(depth, "[", "]"))).encode(),
        st.integers(1, 3000), st.sampled_from(["messages", "metadata", "system"])),
    st.builds(lambda depth: ('{"model": "claude-opus-4-8", "tools": [{"type": %s}]}'
                             % nested(depth, "[", "]")).encode(), st.integers(1, 3000)),
    st.builds(lambda depth: ('{"model": "claude-opus-4-8", "metadata": %s1%s}'
                             % ('{"a":' * depth, "}" * depth)).encode(), st.integers(1, 3000)),
    st.sampled_from([b"", b"{}", b"[]", b"null", b"NaN", b'{"model": 1e999}',
                     b'{"model": "claude-opus-4-8", "n": 1e999}',
                     b'{"model": "claude-opus-4-8", "n": ' + b"9" * 5000 + b"}",
                     b'{"model": "claude-opus-4-8", "s": "\\ud800"}',
                     b'{"model": "claude-opus-4-8", "model": "claude-opus-4-7"}',
                     b"\xef\xbb\xbf{}", b"x" * (MAX_BODY + 1)]))


# ---------------------------------------------------------------------------------------------
# Properties
# ---------------------------------------------------------------------------------------------

@FUZZ
@given(method=methods, path=paths, query=queries, request_headers=headers, body=st.one_of(
    bodies, st.just(b"")), length=st.one_of(st.none(), st.sampled_from(
        ["", "0", "-1", "abc", "1_0", " 5 ", "99999999999999999999", "3", str(MAX_BODY + 1)])),
    terminated=st.booleans())
def test_any_request_is_answered_in_the_envelope_without_a_5xx(rig, method, path, query,
                                                               request_headers, body, length,
                                                               terminated):
    app, fake, records = rig
    start = len(records.records)
    environ = environ_for(method, path, query, request_headers, body, length, terminated)
    status, response_headers, data = call(app, environ)
    check_answer(status, response_headers, data, records, start, method)
    event("status %s" % status[:3])


@FUZZ
@given(body=bodies, key=st.sampled_from([CLIENT_KEY, LIMITED_KEY]),
       path=st.sampled_from(["/v1/messages", "/v1/messages/count_tokens"]),
       extra=st.lists(st.tuples(header_names, header_values), max_size=4))
def test_any_body_with_a_good_key(rig, body, key, path, extra):
    app, fake, records = rig
    start, before = len(records.records), len(fake.received)
    marker = "fuzz-%d" % CASES["count"]
    environ = environ_for("POST", path, "", extra + [("x-api-key", key),
                                                     ("x-client-request-id", marker)], body)
    status, response_headers, data = call(app, environ)
    check_answer(status, response_headers, data, records, start)
    sent = [r for r in fake.received[before:] if r.headers.get("x-client-request-id") == marker]
    for received in fake.received[before:]:
        for value in received.headers.values():
            assert not set(value) & {"\r", "\n", "\x00"}
    event("status %s" % status[:3])
    if not sent:
        assert not status.startswith("2"), status
        return
    assert len(sent) == 1  # never retried
    check_forwarded(json.loads(body), sent[0].json(), path, nan_ok=True)


@FUZZ
@given(query=queries, request_headers=st.lists(st.tuples(header_names, header_values),
                                               max_size=6),
       stream=st.booleans(), path=st.sampled_from(["/v1/messages",
                                                   "/v1/messages/count_tokens"]))
def test_any_query_and_headers_on_a_good_request(rig, query, request_headers, stream, path):
    app, fake, records = rig
    start = len(records.records)
    body = json.dumps({"model": "claude-opus-4-8", "max_tokens": 5, "stream": stream,
                       "messages": [{"role": "user", "content": "hi"}]}).encode()
    environ = environ_for("POST", path, query, request_headers + [("x-api-key", CLIENT_KEY)],
                          body)
    status, response_headers, data = call(app, environ)
    check_answer(status, response_headers, data, records, start)
    event("status %s" % status[:3])


# ---------------------------------------------------------------------------------------------
# Aimed at the upstream: valid requests with arbitrary content, most of the fuzzing budget
# ---------------------------------------------------------------------------------------------

#: Cases of the property below, every one of which must reach the upstream (CI runs the
#: default); GATEWAY_FUZZ_UPSTREAM_EXAMPLES changes it.
UPSTREAM_EXAMPLES = int(os.environ.get("GATEWAY_FUZZ_UPSTREAM_EXAMPLES", "2000"))
UPSTREAM_FUZZ = settings(FUZZ, max_examples=UPSTREAM_EXAMPLES)

#: (key, a public model it may use): alice may use both, bob only claude-opus-4-7.
ALLOWED = [(CLIENT_KEY, "claude-opus-4-8"), (CLIENT_KEY, "claude-opus-4-7"),
           (LIMITED_KEY, "claude-opus-4-7")]
#: Anything at all, as the value of any field the gateway does not route.
free_fields = st.dictionaries(
    st.one_of(st.sampled_from(["messages", "system", "max_tokens", "metadata", "temperature",
                               "stop_sequences", "thinking", "tool_choice", "top_k",
                               "service_tier", "container", "mcp_servers"]),
              st.text(max_size=12)).filter(
        lambda name: name not in ("model", "fallbacks", "tools", "stream")),
    json_values, max_size=6)


@st.composite
def valid_requests(draw):
    """(key, path, body bytes, the body as sent): the model ids all ones the key may use, so
    the gateway must forward it; everything else arbitrary JSON, encoded in several ways."""
    key, model = draw(st.sampled_from(ALLOWED))
    allowed = [public for owner, public in ALLOWED if owner == key]
    body = {"model": model}
    body.update(draw(free_fields))
    if draw(st.booleans()):
        body["fallbacks"] = draw(st.lists(st.fixed_dictionaries(
            {"model": st.sampled_from(allowed)}, optional={"max_tokens": json_values}),
            max_size=2))
    if draw(st.booleans()):
        body["tools"] = draw(st.lists(st.one_of(
            st.fixed_dictionaries({"type": st.just("advisor_20260301"),
                                   "name": st.text(max_size=8),
                                   "model": st.sampled_from(allowed)}),
            st.fixed_dictionaries({"name": st.text(max_size=8),
                                   "input_schema": json_values})), max_size=3))
    path = draw(st.sampled_from(["/v1/messages", "/v1/messages/count_tokens"]))
    if path == "/v1/messages" and draw(st.booleans()):
        body["stream"] = draw(st.booleans())
    encode = draw(st.sampled_from([
        lambda value: json.dumps(value).encode(),
        lambda value: json.dumps(value, ensure_ascii=False).encode(),
        lambda value: json.dumps(value, indent=draw(st.integers(0, 3))).encode(),
        lambda value: json.dumps(value, separators=(",", ":")).encode()]))
    return key, path, encode(body), body


def test_valid_requests_reach_the_upstream_with_only_the_model_ids_mapped(rig):
    """Most of the fuzzing budget, aimed past the routing and the refusals: every case is a
    request the gateway must forward, and the upstream must get the client's fields as they
    were (count_tokens minus the fields it refuses), the model ids mapped, nothing retried."""
    app, fake, records = rig
    reached = []

    @UPSTREAM_FUZZ
    @given(case=valid_requests())
    def forwards(case):
        key, path, data, client = case
        start, before = len(records.records), len(fake.received)
        marker = "aimed-%d" % len(reached)
        environ = environ_for("POST", path, "", [("x-api-key", key),
                                                 ("x-client-request-id", marker)], data)
        status, response_headers, answer = call(app, environ)
        check_answer(status, response_headers, answer, records, start)
        sent = [r for r in fake.received[before:]
                if r.headers.get("x-client-request-id") == marker]
        assert status.startswith("200") and len(sent) == 1, (status, answer[:300])
        upstream = sent[0].json()
        check_forwarded(client, upstream, path)
        for routed, item in zip(upstream.get("fallbacks", ()), client.get("fallbacks", ())):
            assert routed["model"] == MODELS[item["model"]]
        reached.append(path)

    forwards()
    # hypothesis runs exactly max_examples generated cases (plus any saved failures first).
    assert len(reached) >= UPSTREAM_EXAMPLES, len(reached)
