"""Opt-in CORS: preflights and response headers for the origins the config or a key names,
nothing for any other (the browser itself is in test_browser.py)."""

import pytest
import webtest

import gateway
from conftest import CLIENT_KEY, LIMITED_KEY, auth, key_line

APP_ORIGIN = "https://app.example"  # cors_origins: every key
BOB_ORIGIN = "http://localhost:5173"  # only bob's key names it
STRANGER = "https://evil.example"
MESSAGE = {"model": "claude-opus-4-7", "max_tokens": 16,
           "messages": [{"role": "user", "content": "Hello"}]}


@pytest.fixture
def client(config_dir):
    ini = config_dir / "gateway.ini"
    ini.write_text(ini.read_text().replace(
        "[gateway]\n", "[gateway]\ncors_origins = %s/\n" % APP_ORIGIN.upper()))
    keys = config_dir / "gateway.keys"
    keys.write_text(keys.read_text().replace(
        key_line("bob", LIMITED_KEY, "claude-opus-4-7"),
        key_line("bob", LIMITED_KEY, "claude-opus-4-7").rstrip("\n") + " origins=" + BOB_ORIGIN
        + "\n"))
    return webtest.TestApp(gateway.make_app(gateway.Config.from_file(str(ini))))


def preflight(client, origin, path="/v1/messages", status=204):
    return client.options(path, headers={
        "Origin": origin, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "x-api-key,anthropic-version,content-type,"
                                          "anthropic-dangerous-direct-browser-access"},
        status=status)


@pytest.mark.parametrize("origin", [APP_ORIGIN, BOB_ORIGIN])
def test_a_preflight_from_a_named_origin_is_allowed(client, origin):
    response = preflight(client, origin)
    assert response.headers["Access-Control-Allow-Origin"] == origin
    assert response.headers["Access-Control-Allow-Methods"] == "POST"
    assert response.headers["Access-Control-Allow-Headers"] == (
        "x-api-key, anthropic-version, content-type, anthropic-dangerous-direct-browser-access")
    assert response.headers["Access-Control-Max-Age"] == "600"
    assert response.body == b""


def test_a_preflight_from_any_other_origin_gets_no_cors(client):
    response = preflight(client, STRANGER, status=403)
    assert response.json["error"]["type"] == "permission_error"
    assert not [name for name in response.headers if name.lower().startswith("access-control")]
    # and an OPTIONS that is no preflight is still a 405
    client.options("/v1/messages", status=405)


def test_requests_from_an_allowed_origin_carry_the_cors_headers(client, upstream):
    for key, origin in ((CLIENT_KEY, APP_ORIGIN), (LIMITED_KEY, BOB_ORIGIN),
                        (LIMITED_KEY, APP_ORIGIN)):
        response = client.post_json("/v1/messages", MESSAGE,
                                    headers=dict(auth(key), Origin=origin))
        assert response.headers["Access-Control-Allow-Origin"] == origin
        assert response.headers["Access-Control-Expose-Headers"] == "*"
    # an error before the key is known: the config's origins only
    refused = client.post_json("/v1/messages", MESSAGE, status=401,
                               headers=dict(auth("sk-gw-nobody"), Origin=APP_ORIGIN))
    assert refused.headers["Access-Control-Allow-Origin"] == APP_ORIGIN
    refused = client.post_json("/v1/messages", MESSAGE, status=401,
                               headers=dict(auth("sk-gw-nobody"), Origin=BOB_ORIGIN))
    assert "Access-Control-Allow-Origin" not in refused.headers


def test_an_origin_only_another_key_names_is_refused_before_the_upstream(client, upstream):
    response = client.post_json("/v1/messages", MESSAGE, status=403,
                                headers=dict(auth(CLIENT_KEY), Origin=BOB_ORIGIN))
    assert response.json["error"]["message"] == "This key may not be used from %s." % BOB_ORIGIN
    assert "Access-Control-Allow-Origin" not in response.headers
    assert upstream.received == []
    # an origin nobody names (a server-side client sending Origin): served, without CORS
    served = client.post_json("/v1/messages", MESSAGE, headers=dict(auth(), Origin=STRANGER))
    assert "Access-Control-Allow-Origin" not in served.headers


def test_without_cors_configured_nothing_changes(app, upstream):
    client = webtest.TestApp(app)
    preflight(client, APP_ORIGIN, status=403)
    served = client.post_json("/v1/messages", MESSAGE, headers=dict(auth(), Origin=APP_ORIGIN))
    assert "Access-Control-Allow-Origin" not in served.headers


@pytest.mark.parametrize("text", ["app.example", "https://app.example/path", "ftp://x", "*x"])
def test_origins_that_are_not_origins_are_refused(text):
    with pytest.raises(ValueError, match="is not an origin"):
        gateway.parse_origins(text)
    with pytest.raises(ValueError, match="line 1: field 5"):
        gateway.parse_key_file("k sha256:%s * enabled origins=%s\n" % ("0" * 64, text))


def test_key_origins_round_trip_through_the_key_file_and_the_cli(config_dir, capsys):
    ini = str(config_dir / "gateway.ini")
    assert gateway.main(["--config", ini, "keys", "set", "alice", "--origins",
                         "https://a.example, http://localhost:3000"]) == 0
    entry = gateway.parse_key_file((config_dir / "gateway.keys").read_text()).get("alice")
    assert entry.origins == {"https://a.example", "http://localhost:3000"}
    assert "origins=http://localhost:3000,https://a.example" in entry.to_line()
    assert gateway.main(["--config", ini, "keys", "set", "alice", "--origins", "none"]) == 0
    entry = gateway.parse_key_file((config_dir / "gateway.keys").read_text()).get("alice")
    assert entry.origins == frozenset() and "origins" not in entry.to_line()
    assert gateway.main(["--config", ini, "keys", "set", "alice", "--origins", "a.example"]) == 2
    assert "is not an origin" in capsys.readouterr().err


def test_the_origins_keys_name_are_gathered_once_per_key_file(config_dir):
    """A preflight carries no key, so it may pass any origin some key names: that set is
    gathered as the key file is read (KeyStore.origins), not from every entry per preflight
    (3 ms a preflight at 100,000 keys)."""
    keys = (config_dir / "gateway.keys").read_text()
    store = gateway.parse_key_file(keys.replace(
        key_line("bob", LIMITED_KEY, "claude-opus-4-7"),
        key_line("bob", LIMITED_KEY, "claude-opus-4-7").rstrip("\n") + " origins=" + BOB_ORIGIN
        + "," + APP_ORIGIN + "\n"))
    assert store.origins == {BOB_ORIGIN, APP_ORIGIN}
    assert gateway.KeyStore().origins == frozenset()
