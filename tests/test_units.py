"""Pure functions: no sockets, no app."""
import json
import time
import random

import pytest

import gateway
from gateway import APIError, KeyEntry, KeyStore
from conftest import eventually, key_line

MODELS = {"claude-opus-4-8": "up-4-8", "claude-opus-4-7": "up-4-7"}
ANY = KeyEntry("any", b"\0" * 32)
ONLY_47 = KeyEntry("only47", b"\0" * 32, models=frozenset({"claude-opus-4-7"}))


# -- key file -------------------------------------------------------------------------------

def test_parse_key_file_reads_names_digests_models_and_flags():
    text = ("# comment\n\n" + key_line("alice", "sk-a")
            + key_line("bob", "sk-b", "claude-opus-4-7,claude-opus-4-8", "disabled"))
    store = gateway.parse_key_file(text)
    assert [e.name for e in store.entries] == ["alice", "bob"]
    assert store.find("sk-a").name == "alice"
    bob = store.find("sk-b")
    assert bob.enabled is False and bob.models == {"claude-opus-4-7", "claude-opus-4-8"}
    assert store.find("sk-c") is None and store.find("") is None


def test_salted_digests_match_only_their_key():
    salt = bytes.fromhex("a1b2c3")
    import hashlib
    digest = hashlib.sha256(salt + b"sk-salty").hexdigest()
    store = gateway.parse_key_file("s sha256:a1b2c3:%s * enabled\n" % digest)
    assert store.find("sk-salty").name == "s"
    assert store.find("sk-salt") is None


def test_key_entry_round_trips_through_its_line():
    entry = KeyEntry("ci", gateway.digest_key("sk-x"), b"\x01\x02", frozenset({"m1", "m2"}),
                     False)
    assert gateway.parse_key_file(entry.to_line()).entries == (entry,)


def _salted(name, key, salt=b"\x01\x02"):
    import hashlib
    return KeyEntry(name, hashlib.sha256(salt + key.encode()).digest(), salt)


def test_find_looks_up_current_previous_and_salted_digests_alike():
    now = 1000.0
    rotated = KeyEntry("rotated", gateway.digest_key("sk-new"),
                       previous=(b"", gateway.digest_key("sk-old")), previous_until=now + 1)
    salted_before = _salted("salted-before", "sk-salted-old")
    from_salted = KeyEntry("from-salted", gateway.digest_key("sk-new2"),
                           previous=(salted_before.salt, salted_before.digest),
                           previous_until=now + 1)
    store = KeyStore([rotated, _salted("imported", "sk-imported"), from_salted])
    assert store.find("sk-new", now).name == "rotated"
    assert store.find("sk-old", now).name == "rotated"
    assert store.find("sk-old", now + 1) is None  # the grace period is over
    assert store.find("sk-imported", now).name == "imported"
    assert store.find("sk-salted-old", now).name == "from-salted"
    assert store.find("sk-salted-old", now + 1) is None
    assert store.find("sk-new2", now + 1).name == "from-salted"
    # Only the imported key is still hashed one by one once the grace periods are over.
    assert [e.name for _, e in store.salted_entries(now + 1)] == ["imported"]


def test_find_answers_the_first_entry_in_the_file_when_two_share_a_key():
    store = KeyStore([_salted("first", "sk-same"), KeyEntry("second", gateway.digest_key(
        "sk-same")), KeyEntry("third", gateway.digest_key("sk-same"))])
    assert store.find("sk-same").name == "first"
    assert KeyStore(store.entries[1:]).find("sk-same").name == "second"


def test_find_and_get_do_not_depend_on_the_number_of_keys(monkeypatch):
    # Not a timing test: it counts the SHA-256 computations a lookup makes.
    entries = [KeyEntry("k%d" % n, gateway.digest_key("sk-%d" % n)) for n in range(5000)]
    store = KeyStore(entries)
    calls, real = [], gateway.hashlib.sha256
    monkeypatch.setattr(gateway.hashlib, "sha256", lambda data=b"": calls.append(data) or real(data))
    assert store.find("sk-4321").name == "k4321" and store.find("sk-x") is None
    monkeypatch.undo()
    assert len(calls) == 2
    assert store.get("k4999") is entries[-1] and store.get("nobody") is None


@pytest.mark.parametrize("line, complaint", [
    ("alice sha256:abcd * enabled", "64 hex digits"),
    ("alice md5:" + "0" * 64 + " * enabled", "sha256"),
    ("alice sha256:" + "z" * 64 + " * enabled", "hexadecimal"),
    ("alice sha256:" + "0" * 64 + " * yes", "enabled"),
    ("alice sha256:" + "0" * 64 + " *", "4 fields"),
])
def test_parse_key_file_names_the_bad_line(line, complaint):
    with pytest.raises(ValueError) as error:
        gateway.parse_key_file("# header\n" + line + "\n")
    assert "line 2" in str(error.value) and complaint in str(error.value)


def test_parse_key_file_refuses_duplicate_names():
    with pytest.raises(ValueError, match="duplicate"):
        gateway.parse_key_file(key_line("a", "k1") + key_line("a", "k2"))


def test_watched_file_reloads_on_change_and_keeps_last_good(tmp_path):
    path = tmp_path / "keys"
    path.write_text(key_line("alice", "sk-a"))
    watched = gateway.WatchedFile(str(path), gateway.parse_key_file, KeyStore())
    assert watched.get().find("sk-a").name == "alice"
    path.write_text(key_line("alice", "sk-a") + key_line("bob", "sk-bbbbbbbb"))
    assert watched.get().find("sk-bbbbbbbb").name == "bob"
    path.write_text("this is not a key file\n")
    assert watched.get().find("sk-bbbbbbbb").name == "bob"
    path.unlink()
    assert watched.get().find("sk-a").name == "alice"


# -- credentials and headers -----------------------------------------------------------------

@pytest.mark.parametrize("environ, key", [
    ({"HTTP_X_API_KEY": "sk-1"}, "sk-1"),
    ({"HTTP_AUTHORIZATION": "Bearer sk-2"}, "sk-2"),
    ({"HTTP_AUTHORIZATION": "bearer  sk-2 "}, "sk-2"),
    ({"HTTP_X_API_KEY": "sk-1", "HTTP_AUTHORIZATION": "Bearer sk-1"}, "sk-1"),
    ({"HTTP_X_API_KEY": "sk-ant-api03-dev", "HTTP_AUTHORIZATION": "Bearer sk-gw-1"}, "sk-gw-1"),
    ({"HTTP_X_API_KEY": "sk-gw-1", "HTTP_AUTHORIZATION": "Bearer sk-ant-oat01-x"}, "sk-gw-1"),
    ({"HTTP_X_API_KEY": "sk-1", "HTTP_AUTHORIZATION": "Basic c2stMg=="}, "sk-1"),
    ({"HTTP_AUTHORIZATION": "Basic c2stMg=="}, None),
    ({"HTTP_AUTHORIZATION": "Bearer "}, None),
    ({}, None),
])
def test_client_key(environ, key):
    assert gateway.client_key(environ) == key


@pytest.mark.parametrize("api_key, bearer", [
    ("sk-gw-1", "sk-gw-2"),  # two gateway keys: which one did the client mean?
    ("sk-ant-a", "sk-ant-b"),
])
def test_two_different_keys_are_a_401(api_key, bearer):
    with pytest.raises(APIError) as refused:
        gateway.client_key({"HTTP_X_API_KEY": api_key, "HTTP_AUTHORIZATION": "Bearer " + bearer})
    assert refused.value.status == 401 and "two different keys" in refused.value.message


def test_upstream_headers_forward_anthropic_and_telemetry_but_no_credentials():
    environ = {
        "HTTP_X_API_KEY": "sk-client", "HTTP_AUTHORIZATION": "Bearer sk-client",
        "HTTP_ANTHROPIC_VERSION": "2026-10-21", "HTTP_ANTHROPIC_BETA": "a-1,b-2",
        "HTTP_ANTHROPIC_USER_PROFILE_ID": "p1", "HTTP_X_STAINLESS_RETRY_COUNT": "0",
        "HTTP_USER_AGENT": "Anthropic/Python 2.14.0", "HTTP_X_CLAUDE_CODE_SESSION_ID": "s",
        "HTTP_COOKIE": "a=b", "HTTP_HOST": "gw", "HTTP_CONNECTION": "keep-alive",
        "HTTP_X_FORWARDED_FOR": "1.2.3.4", "HTTP_ACCEPT_ENCODING": "gzip, br, zstd",
        "HTTP_PROXY_AUTHORIZATION": "x", "CONTENT_LENGTH": "12",
    }
    headers = gateway.upstream_headers(environ, "sk-upstream")
    assert headers == {
        "anthropic-version": "2026-10-21", "anthropic-beta": "a-1,b-2",
        "anthropic-user-profile-id": "p1", "x-stainless-retry-count": "0",
        "user-agent": "Anthropic/Python 2.14.0", "x-claude-code-session-id": "s",
        "x-api-key": "sk-upstream", "content-type": "application/json",
        "accept": "application/json", "accept-encoding": "identity",
    }


def test_upstream_headers_default_the_version_only_when_absent():
    assert gateway.upstream_headers({}, "k")["anthropic-version"] == "2023-06-01"


def test_client_headers_relay_only_what_clients_use():
    upstream = {"Content-Type": "application/json", "request-id": "req_1",
                "retry-after": "3", "retry-after-ms": "3000", "x-should-retry": "true",
                "anthropic-ratelimit-tokens-remaining": "9000", "Content-Length": "5",
                "Transfer-Encoding": "chunked", "Connection": "keep-alive",
                "Content-Encoding": "gzip", "Set-Cookie": "_cfuvid=x", "server": "cloudflare",
                "anthropic-organization-id": "org-ours", "cf-ray": "1"}
    assert dict(gateway.client_headers(upstream)) == {
        "Content-Type": "application/json", "request-id": "req_1", "retry-after": "3",
        "retry-after-ms": "3000", "x-should-retry": "true",
        "anthropic-ratelimit-tokens-remaining": "9000"}


# -- bodies ------------------------------------------------------------------------------------

@pytest.mark.parametrize("raw, message", [
    (b"{", "not valid JSON"), (b"[1]", "JSON object"), (b'"x"', "JSON object"),
    (b'{"a": NaN}', "NaN"), (b'{"a": Infinity}', "Infinity"), (b"\xff\xfe{", "JSON"),
    (b"[" * 100000 + b"]" * 100000, "nested too deeply"),
])
def test_parse_json_body_refuses_with_400(raw, message):
    with pytest.raises(APIError) as error:
        gateway.parse_json_body(raw)
    assert error.value.status == 400 and error.value.error_type == "invalid_request_error"
    assert message in error.value.message


def test_route_models_rewrites_every_model_id():
    body = {"model": "claude-opus-4-8", "max_tokens": 5,
            "fallbacks": [{"model": "claude-opus-4-7", "max_tokens": 3}],
            "tools": [{"type": "advisor_20260301", "name": "advisor", "model": "claude-opus-4-8"},
                      {"name": "get_weather", "model": "not-a-model-field-for-custom-tools",
                       "input_schema": {}}]}
    routed, public, upstream = gateway.route_models(body, MODELS, ANY)
    assert (public, upstream) == ("claude-opus-4-8", "up-4-8")
    assert routed["fallbacks"] == [{"model": "up-4-7", "max_tokens": 3}]
    assert routed["tools"][0]["model"] == "up-4-8"
    assert routed["tools"][1] == body["tools"][1]
    assert body["model"] == "claude-opus-4-8"  # the input is not changed


@pytest.mark.parametrize("body, status, message", [
    ({"model": "claude-foo"}, 404, "model: claude-foo"),
    ({"model": "up-4-8"}, 404, "model: up-4-8"),
    ({"model": "claude-opus-4-8"}, 403, "claude-opus-4-8"),
    ({"model": "claude-opus-4-7", "fallbacks": [{"model": "claude-opus-4-8"}]}, 403, ""),
    ({"model": "claude-opus-4-7", "fallbacks": [{"model": "gpt-5"}]}, 404, "model: gpt-5"),
    ({"model": "claude-opus-4-7",
      "tools": [{"type": "advisor_20260301", "model": "opus-upstream-x"}]}, 404, "model:"),
    ({"model": 7}, 400, "model"), ({}, 400, "model"),
    ({"model": "claude-opus-4-7", "fallbacks": "default"}, 400, 'fallbacks: '),
    ({"model": "claude-opus-4-7", "fallbacks": {"model": "claude-opus-4-7"}}, 400, "fallbacks"),
    # entries the gateway cannot map or check are refused, not passed on as they are
    ({"model": "claude-opus-4-7", "fallbacks": ["claude-opus-4-8"]}, 400, "fallbacks: each"),
    ({"model": "claude-opus-4-7", "fallbacks": [{"max_tokens": 3}]}, 400, "fallbacks: each"),
    ({"model": "claude-opus-4-7", "fallbacks": [{"model": 7}]}, 400, "fallbacks: each"),
    ({"model": "claude-opus-4-7", "tools": [{"type": "advisor_20260301", "name": "advisor"}]},
     400, "tools: each"),
])
def test_route_models_refuses_what_is_outside_the_map_or_the_key(body, status, message):
    with pytest.raises(APIError) as error:
        gateway.route_models(body, MODELS, ONLY_47)
    assert error.value.status == status and message in error.value.message


def test_count_tokens_body_drops_fields_count_tokens_rejects():
    body = {"model": "m", "messages": [], "max_tokens": 5, "stream": True,
            "temperature": 1, "top_p": 1, "top_k": 1, "stop_sequences": [], "metadata": {},
            "service_tier": "auto", "container": "c", "system": "s", "tools": [],
            "fallbacks": "default", "diagnostics": {}, "inference_geo": "us",
            "thinking": {"type": "adaptive"}, "context_management": {}}
    assert gateway.count_tokens_body(body) == {
        "model": "m", "messages": [], "system": "s", "tools": [],
        "thinking": {"type": "adaptive"}, "context_management": {}}


def test_encode_json_keeps_meaning_and_utf8():
    body = {"model": "m", "messages": [{"role": "user", "content": "héllo ✓ 🦀"}],
            "x": [1.5, None, True, {"deep": "\u2028"}]}
    encoded = gateway.encode_json(body)
    assert json.loads(encoded) == body and "🦀".encode() in encoded
    assert json.loads(gateway.encode_json({"s": "\ud800"})) == {"s": "\ud800"}


# -- usage -------------------------------------------------------------------------------------

def sse_stream():
    import upstream
    return b"".join(upstream.text_stream("m", pieces=("a", '"message_start"', "c" * 5000)))


def test_stream_meter_reads_usage_whatever_the_chunking():
    data = sse_stream()
    rng = random.Random(7)
    for _ in range(50):
        meter, position = gateway.StreamMeter(), 0
        while position < len(data):
            size = rng.choice([1, 2, 7, 64, 1000, 9000])
            meter.feed(data[position:position + size])
            position += size
        assert meter.usage == {"input_tokens": 12, "output_tokens": 7,
                               "cache_creation_input_tokens": 0, "cache_read_input_tokens": 3}
        assert meter.finished


def test_stream_meter_notices_a_missing_message_stop():
    data = sse_stream()
    meter = gateway.StreamMeter()
    meter.feed(data[:data.index(b"event: message_stop")])
    assert not meter.finished and meter.usage["output_tokens"] == 7


def test_usage_from_json():
    assert gateway.usage_from_json(b'{"usage": {"input_tokens": 3, "output_tokens": 4}}') == {
        "input_tokens": 3, "output_tokens": 4}
    assert gateway.usage_from_json(b'{"input_tokens": 42}') == {}
    assert gateway.usage_from_json(b"not json") == {}


# -- models ------------------------------------------------------------------------------------

def test_display_name():
    assert gateway.display_name("claude-opus-4-8") == "Claude Opus 4.8"
    assert gateway.display_name("claude-sonnet-5") == "Claude Sonnet 5"


def test_models_page_paginates_like_the_api():
    ids = ["a", "b", "c", "d", "e"]
    first = gateway.models_page(ids, "limit=2")
    assert [m["id"] for m in first["data"]] == ["a", "b"] and first["has_more"]
    assert (first["first_id"], first["last_id"]) == ("a", "b")
    second = gateway.models_page(ids, "limit=2&after_id=b")
    assert [m["id"] for m in second["data"]] == ["c", "d"] and second["has_more"]
    last = gateway.models_page(ids, "limit=2&after_id=d")
    assert [m["id"] for m in last["data"]] == ["e"] and not last["has_more"]
    back = gateway.models_page(ids, "limit=2&before_id=e")
    assert [m["id"] for m in back["data"]] == ["c", "d"] and back["has_more"]
    assert gateway.models_page([], "")["first_id"] is None
    for bad in ("limit=0", "limit=1001", "limit=x"):
        with pytest.raises(APIError):
            gateway.models_page(ids, bad)


# -- config ------------------------------------------------------------------------------------

def test_config_from_file_resolves_paths_against_the_file(tmp_path):
    ini = tmp_path / "gateway.ini"
    ini.write_text("[gateway]\nupstream_url = http://up.example/\nkeys_file = k/keys\n"
                   "max_body_bytes = 1000\nread_timeout = 900\ntrust_env = yes\n"
                   "trusted_proxies = 127.0.0.1, ::1\n[models]\nclaude-x = upstream-x\n")
    config = gateway.Config.from_file(str(ini), environ={})
    assert config.upstream_url == "http://up.example"
    assert config.keys_path == str(tmp_path / "k" / "keys")
    assert config.upstream_key_path == str(tmp_path / "upstream.key")
    assert (config.max_body_bytes, config.read_timeout, config.trust_env) == (1000, 900.0, True)
    assert config.trusted_proxies == {"127.0.0.1", "::1"}
    assert dict(config.models) == {"claude-x": "upstream-x"}


def test_config_defaults_and_the_upstream_key_from_the_environment(tmp_path):
    ini = tmp_path / "gateway.ini"
    ini.write_text("[gateway]\n")
    config = gateway.Config.from_file(str(ini), environ={"ANTHROPIC_API_KEY": "sk-ant-env"})
    assert dict(config.models) == dict(gateway.DEFAULT_MODELS)
    assert config.upstream_key == "sk-ant-env" and config.upstream_key_path is None
    assert "sk-ant-env" not in repr(config)
    ini.write_text("[gateway]\nupstream_key_file = secret/up.key\n")
    explicit = gateway.Config.from_file(str(ini), environ={"ANTHROPIC_API_KEY": "sk-ant-env"})
    assert explicit.upstream_key is None  # a named file is never overridden by the env
    assert explicit.upstream_key_path == str(tmp_path / "secret" / "up.key")


@pytest.mark.parametrize("text, complaint", [
    ("[gateway]\nmax_body_byte = 5\n", "unknown setting"),
    ("[gateway]\nmax_body_bytes = -5\n", "positive"),
    ("[gateway]\nread_timeout = soon\n", "read_timeout"),
    ("[gateway]\ntrust_env = perhaps\n", "true or false"),
    ("[gateway]\nupstream_url = api.anthropic.com\n", "http"),
    ("[gateway]\nupstream_url = ftp://x\n", "http"),
    ("[gateway]\nupstream_url = http://127.0.0.1:99999\n", "port must be a number from 1"),
    ("[gateway]\nupstream_url = http://up.example:abc\n", "port must be a number from 1"),
    ("[gateway]\nupstream_url = http://up.example:0\n", "port must be a number from 1"),
    ("[gateway]\nlimits_backend = redis://redis.example:0/0\n",
     "limits_backend: the port must be a number from 1"),
    ("[gateway]\nlimits_backend = redis://redis.example:99999/0\n",
     "limits_backend: the port must be a number from 1"),
    ("[gateway]\nupstream_url = http://my host\n", "invalid character ' '"),
    ("[gateway]\nupstream_url = http://:8080\n", "no host name"),
    ("[gateway]\nupstream_url = https://api.anthropic.com/v1\n", "/v1/v1/messages"),
    ("[gateway]\nupstream_url = https://u:p@api.anthropic.com\n", "upstream_key_file"),
    ("[gateway]\nupstream_url = https://api.anthropic.com?beta=1\n", "no \\?query"),
    ("[models]\nclaude-x =\n", "maps to nothing"),
    ("not an ini file", "line 1: a setting before any section"),
])
def test_config_errors_say_what_is_wrong(tmp_path, text, complaint):
    ini = tmp_path / "gateway.ini"
    ini.write_text(text)
    with pytest.raises(ValueError, match=complaint):
        gateway.Config.from_file(str(ini), environ={})


@pytest.mark.parametrize("data, error", [
    (b"[gateway]\nread_timeout = ten\n", "line 2: read_timeout = ten: not a number"),
    (b"[gateway]\n\n# why\n  connect_timeout = 0\n", "line 4: connect_timeout = 0: must be a "
     "positive, finite number"),
    (b"[gateway]\nbody_timeout = inf\n", "line 2: body_timeout = inf: must be a positive, "),
    (b"[gateway]\nmax_body_bytes = 1e6\n", "line 2: max_body_bytes = 1e6: not a whole number"),
    (b"[gateway]\nread_timeout = 5\n[gatway]\nread_timeout = 6\n",
     "line 3: unknown section [gatway]; known: [gateway], [models]"),
    (b"[DEFAULT]\nread_timeout = 5\n", "line 1: unknown section [DEFAULT]"),
    (b"[gateway]\n# caf\xe9 au lait\nread_timeout = 5\n", "line 2: not UTF-8 (byte 0xe9)"),
    (b"\xef\xbb\xbf[gateway]\nread_timeout = 5\n\xff\n", "line 3: not UTF-8 (byte 0xff)"),
    (b"[gateway]\nread_timeout = 5\nread_timeout = 6\n", "line 3: read_timeout is set twice"),
    (b"[gateway]\nsk-ant-pasted-here\n", "line 2: not a setting (expected name = value)"),
    (b"[gateway]\nupstream_key_file = sk-ant-pasted-here\n", "line 2: upstream_key_file = "
     "sk-\u2026: that is a key, not a setting (the upstream key goes in the file that "
     "upstream_key_file names)"),
    (b"[gateway]\nupstream_url = sk-ant-pasted-here\n", "line 2: upstream_url = sk-\u2026: "),
    (b"[gateway]\nupstream_url = http://127.0.0.1:8080\n  read_timeout = ten\n", "line 2: "
     "upstream_url = http://127.0.0.1:8080: the line after it is indented, which makes it part "
     "of this value: unindent it"),
    (b"[gateway]\nupstream_proxy = http://u:pasted-here@proxy:3128\n\tread_timeout = 5\n", "line 2: "
     "upstream_proxy = \u2026: the line after it is indented"),
    (b"[gateway]\nmax_body_byte = 5\n", "line 2: unknown setting max_body_byte in [gateway]"),
    (b"[models]\nclaude-x = a\nclaude-y =\n", "line 3: model claude-y maps to nothing"),
    (b"[gateway]\r\n# a \x0c form feed\r\nread_timeout = ten\r\n", "line 3: read_timeout = ten"),
    (b"[gateway]\nupstream_url = http://127.0.0.1:99999\n", "line 2: upstream_url = "
     "http://127.0.0.1:99999: the port must be a number from 1 to 65535"),
])
def test_config_errors_name_the_file_the_line_and_the_setting(tmp_path, data, error):
    ini = tmp_path / "gateway.ini"
    ini.write_bytes(data)
    with pytest.raises(ValueError) as raised:
        gateway.Config.from_file(str(ini), environ={})
    assert str(raised.value).startswith("config %s, %s" % (ini, error))
    assert "pasted-here" not in str(raised.value)  # a key pasted in the config: never shown


def test_a_list_setting_may_go_on_over_indented_lines(tmp_path):
    ini = tmp_path / "gateway.ini"
    ini.write_text("[gateway]\ntrusted_proxies = 10.0.0.1,\n    10.0.0.2\n")
    config = gateway.Config.from_file(str(ini), environ={})
    assert config.trusted_proxies == {"10.0.0.1", "10.0.0.2"}


def test_config_with_a_byte_order_mark_reads_as_without():
    assert gateway.decode_utf8(b"\xef\xbb\xbf[gateway]\n") == "[gateway]\n"


def test_config_from_environ_without_a_file_uses_defaults():
    config = gateway.Config.from_environ({})
    assert config.upstream_url == "https://api.anthropic.com"
    assert config.max_body_bytes == 32 * 1024 * 1024 and config.read_timeout >= 600


def test_error_body_is_the_anthropic_envelope():
    assert json.loads(gateway.error_body("not_found_error", "model: x", "req_gw_1")) == {
        "type": "error", "error": {"type": "not_found_error", "message": "model: x"},
        "request_id": "req_gw_1"}


def test_make_app_refuses_an_upstream_url_its_pool_cannot_use():
    """Embedders skip the INI parser: the app itself refuses, as it is built."""
    with pytest.raises(ValueError, match="port must be a number"):
        gateway.make_app(gateway.Config(upstream_url="http://127.0.0.1:99999"))
    assert gateway.make_app(gateway.Config(upstream_url="http://[::1]:8080/prefix"))


@pytest.mark.parametrize("value, expected", [
    ("true", True), ("1", True), ("yes", True), ("True", True), ("on", True),
    ("", False), ("0", False), ("false", False), ("no", False), ("off", False)])
def test_the_ci_guard_takes_any_true_value(value, expected):
    from conftest import in_ci
    assert in_ci({"CI": value}) is expected
    assert in_ci({}) is False


def test_a_refused_model_names_the_models_the_key_may_use():
    with pytest.raises(APIError) as missing:
        gateway.route_models({"model": "claude-sonnet-4-6"}, MODELS, ONLY_47)
    assert missing.value.message == "model: claude-sonnet-4-6. This key may use: claude-opus-4-7."
    nothing = gateway.KeyEntry("none", b"\0" * 32, models=frozenset())
    assert gateway.usable_models(MODELS, nothing) == "This key may use no model."


# -- FinishQueue: RedisLimits' finish calls, made in batches by a thread ---------------------

def finish_queue(delay):
    """A FinishQueue whose run records (item, when run) and counts the wake-ups asked of
    its thread (its condition's notify calls)."""
    done, notified = [], []

    def run(items):
        now = time.monotonic()
        done.extend((item, now) for item in items)

    queue = gateway.FinishQueue(run, delay)
    notify = queue._wake.notify
    queue._wake.notify = lambda *args: (notified.append(1), notify(*args))[1]
    return queue, done, notified


def test_finish_calls_that_keep_coming_go_within_the_delay_without_waking_the_thread():
    queue, done, notified = finish_queue(delay=0.05)
    put_at = {}
    for number in range(60):  # one every 5 ms for 0.3 s: six delays' worth
        put_at[number] = time.monotonic()
        queue.put("k", number)
        time.sleep(0.005)
    eventually(lambda: len(done) >= 60)
    assert sorted(item for item, _ in done) == list(range(60))
    lags = sorted(when - put_at[item] for item, when in done)
    assert lags[30] < 0.05 + 0.02 and lags[-1] < 0.05 + 1.0  # generous: a loaded machine
    # only a put that came after a look found nothing wakes the thread: the first, and one
    # after each pause in the puts longer than the delay (a loaded machine makes some)
    times = sorted(put_at.values())
    pauses = sum(later - earlier > 0.05 for earlier, later in zip(times, times[1:]))
    assert len(notified) <= 1 + pauses
    assert len({when for _, when in done}) < 30  # in batches, not one call each


def test_after_a_pause_a_put_wakes_the_thread_and_a_waiter_goes_at_once():
    queue, done, notified = finish_queue(delay=0.05)
    queue.put("k", "first")
    eventually(lambda: len(done) >= 1)
    time.sleep(0.3)  # well past the look again: the thread waits for a put
    before = len(notified)
    queue.put("k", "after the pause")
    eventually(lambda: len(done) >= 2)
    assert len(notified) == before + 1  # that put woke it
    slow, slow_done, _ = finish_queue(delay=30)
    slow.put("k", "waited for")
    started = time.monotonic()
    slow.wait_for("k", timeout=10)  # at once, not 30 s later
    assert [item for item, _ in slow_done] == ["waited for"]
    assert time.monotonic() - started < 5
    eventually(lambda: slow._ticking)  # the thread looks again on its own, 30 s later
    slow.put("k", "while the thread looks again")  # the waiter still goes at once
    started = time.monotonic()
    slow.wait_for("k", timeout=10)
    assert [item for item, _ in slow_done][-1] == "while the thread looks again"
    assert time.monotonic() - started < 5
