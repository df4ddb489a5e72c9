"""The real anthropic Python SDK, pointed at the gateway over HTTP, sees the real API."""
import json
import logging
import threading
import time

import anthropic
import pytest

import gateway
from conftest import CLIENT_KEY, LIMITED_KEY, key_line, missing
from upstream import message, sse, stream_events, text_stream

MESSAGES = [{"role": "user", "content": "Hello"}]


@pytest.fixture
def sdk(served_app):
    return anthropic.Anthropic(api_key=CLIENT_KEY, base_url=served_app, max_retries=0)


def test_create(sdk, upstream):
    reply = sdk.messages.create(model="claude-opus-4-8", max_tokens=16, messages=MESSAGES)
    assert reply.content[0].text == "Hello!"
    assert reply.model == "claude-opus-4-8-20261101"
    assert reply.usage.input_tokens == 12 and reply.usage.output_tokens == 5
    assert reply._request_id == "req_upstream_1"
    assert upstream.last.headers["x-api-key"] != CLIENT_KEY


def test_auth_token_credential(served_app, upstream):
    client = anthropic.Anthropic(auth_token=CLIENT_KEY, base_url=served_app, max_retries=0)
    assert client.messages.create(model="claude-opus-4-8", max_tokens=16,
                                  messages=MESSAGES).content[0].text == "Hello!"


def test_an_anthropic_key_in_the_environment_beside_the_gateway_key(served_app, upstream,
                                                                      monkeypatch):
    """Both headers at once: the 0.x SDKs send x-api-key from ANTHROPIC_API_KEY beside the
    Bearer of auth_token=; the current ones send an x-api-key only from custom headers
    (ANTHROPIC_CUSTOM_HEADERS, default_headers=), as here. A developer's own Anthropic key
    there must not turn a valid gateway key into a 401."""
    monkeypatch.setenv("ANTHROPIC_CUSTOM_HEADERS", "x-api-key: sk-ant-api03-developers-own-key")
    client = anthropic.Anthropic(auth_token=CLIENT_KEY, base_url=served_app, max_retries=0)
    assert client.messages.create(model="claude-opus-4-8", max_tokens=16,
                                  messages=MESSAGES).content[0].text == "Hello!"
    assert "sk-ant-api03-developers-own-key" not in repr(upstream.last.headers)


def test_two_different_gateway_keys_are_a_401_and_the_message_names_the_header(served_app,
                                                                              monkeypatch):
    monkeypatch.setenv("ANTHROPIC_CUSTOM_HEADERS", "x-api-key: " + LIMITED_KEY)
    both = anthropic.Anthropic(auth_token=CLIENT_KEY, base_url=served_app, max_retries=0)
    with pytest.raises(anthropic.AuthenticationError, match="two different keys"):
        both.messages.create(model="claude-opus-4-7", max_tokens=1, messages=MESSAGES)
    monkeypatch.delenv("ANTHROPIC_CUSTOM_HEADERS")
    bearer = anthropic.Anthropic(auth_token="sk-gw-stranger", base_url=served_app,
                                 max_retries=0)
    with pytest.raises(anthropic.AuthenticationError) as refused:
        bearer.messages.create(model="claude-opus-4-7", max_tokens=1, messages=MESSAGES)
    assert refused.value.body["error"]["message"] == "Invalid bearer token"
    api_key = anthropic.Anthropic(api_key="sk-ant-api03-x", base_url=served_app, max_retries=0)
    with pytest.raises(anthropic.AuthenticationError) as refused:
        api_key.messages.create(model="claude-opus-4-7", max_tokens=1, messages=MESSAGES)
    assert refused.value.body["error"]["message"].startswith("Invalid bearer token (it is an "
                                                             "Anthropic API key")


def test_stream_text(sdk, upstream):
    with sdk.messages.stream(model="claude-opus-4-8", max_tokens=16, messages=MESSAGES) as s:
        texts = list(s.text_stream)
        final = s.get_final_message()
    assert texts == ["Hel", "lo", "!"]
    assert final.usage.output_tokens == 7 and final.stop_reason == "end_turn"


def test_beta_stream_forwards_the_beta_header(sdk, upstream):
    # SDK 2.x sends no ?beta=true (docs/protocol.md, "Client generations"); 0.x's query is
    # tested in test_wsgi.
    with sdk.beta.messages.stream(model="claude-opus-4-8", max_tokens=16, messages=MESSAGES,
                                  betas=["interleaved-thinking-2025-05-14"]) as s:
        assert s.get_final_message().content[0].text == "Hello!"
    assert upstream.last.headers["anthropic-beta"] == "interleaved-thinking-2025-05-14"


def test_stream_tool_use_and_thinking(sdk, upstream):
    start = dict(message("m", ""), content=[], stop_reason=None)
    events = [
        sse("message_start", {"type": "message_start", "message": start}, pad=5),
        sse("content_block_start", {"type": "content_block_start", "index": 0,
                                    "content_block": {"type": "thinking", "thinking": "",
                                                      "signature": ""}}),
        sse("content_block_delta", {"type": "content_block_delta", "index": 0,
                                    "delta": {"type": "thinking_delta",
                                              "thinking": "Weather needs a tool."}}),
        sse("content_block_delta", {"type": "content_block_delta", "index": 0,
                                    "delta": {"type": "signature_delta", "signature": "c2lnbg=="}}),
        sse("content_block_stop", {"type": "content_block_stop", "index": 0}),
        sse("content_block_start", {"type": "content_block_start", "index": 1,
                                    "content_block": {"type": "tool_use", "id": "toolu_01",
                                                      "name": "get_weather", "input": {}}}),
        sse("content_block_delta", {"type": "content_block_delta", "index": 1, "delta": {
            "type": "input_json_delta", "partial_json": "{\"city\": \"Pa"}}, pad=11),
        sse("content_block_delta", {"type": "content_block_delta", "index": 1, "delta": {
            "type": "input_json_delta", "partial_json": "ris\", \"unit\": \"c\"}"}}),
        sse("content_block_stop", {"type": "content_block_stop", "index": 1}),
        sse("message_delta", {"type": "message_delta", "delta": {"stop_reason": "tool_use"},
                              "usage": {"output_tokens": 40}}),
        sse("message_stop", {"type": "message_stop"}),
    ]
    upstream.handler = lambda handler, received: stream_events(handler, events, upstream)
    with sdk.messages.stream(
            model="claude-opus-4-8", max_tokens=2048, messages=MESSAGES,
            thinking={"type": "enabled", "budget_tokens": 1024},
            tools=[{"name": "get_weather", "input_schema": {"type": "object"}}]) as s:
        final = s.get_final_message()
    thinking, tool = final.content
    assert thinking.thinking == "Weather needs a tool." and thinking.signature == "c2lnbg=="
    assert tool.input == {"city": "Paris", "unit": "c"} and final.stop_reason == "tool_use"
    assert final.usage.output_tokens == 40


def test_count_tokens(sdk, upstream):
    counted = sdk.messages.count_tokens(model="claude-opus-4-8", messages=MESSAGES)
    assert counted.input_tokens == 42
    assert upstream.last.json() == {"model": "claude-opus-4-8-20261101", "messages": MESSAGES}


def _fields(typed_dict):
    return {name for cls in typed_dict.__mro__ for name in getattr(cls, "__annotations__", {})}


def test_count_tokens_drops_exactly_what_the_sdk_types_say_it_lacks():
    """The create fields (GA and beta, streaming included) that count_tokens does not take,
    from the installed SDK's own types: a field the API adds later fails this test until the
    gateway drops it too."""
    from anthropic.types import message_count_tokens_params, message_create_params
    from anthropic.types.beta import message_count_tokens_params as beta_count
    from anthropic.types.beta import message_create_params as beta_create
    create = (_fields(message_create_params.MessageCreateParamsStreaming)
              | _fields(beta_create.MessageCreateParamsStreaming))
    count = (_fields(message_count_tokens_params.MessageCountTokensParams)
             | _fields(beta_count.MessageCountTokensParams))
    assert {"model", "messages", "max_tokens", "stream"} <= create and "messages" in count
    dropped = gateway.COUNT_TOKENS_DROPPED_FIELDS
    assert create - count <= dropped, "count_tokens would get fields it does not take"
    assert not dropped & count, "the gateway drops a field count_tokens takes"
    # Beyond the SDK's list only the sampling settings older SDKs still send.
    assert dropped - create <= {"temperature", "top_p", "top_k"}


def test_count_tokens_after_a_create_body_gets_only_its_own_fields(served_app, upstream):
    """Claude Code's create body (fallbacks, diagnostics, inference_geo, ...) reused for
    count_tokens: the upstream gets only what count_tokens takes."""
    import requests
    body = {"model": "claude-opus-4-8", "messages": MESSAGES, "max_tokens": 64000,
            "stream": True, "system": [{"type": "text", "text": "s"}],
            "fallbacks": "default", "diagnostics": {"previous_message_id": "msg_1"},
            "inference_geo": "us", "fallback_credit_token": "t", "speed": "fast",
            "metadata": {"user_id": "u"}, "context_management": {"edits": []}}
    response = requests.post(served_app + "/v1/messages/count_tokens?beta=true", json=body,
                             headers={"Authorization": "Bearer " + CLIENT_KEY})
    assert response.json() == {"input_tokens": 42}
    assert upstream.last.json() == {
        "model": "claude-opus-4-8-20261101", "messages": MESSAGES, "system": body["system"],
        "speed": "fast", "context_management": {"edits": []}}


def test_models_list_and_retrieve(served_app):
    sdk = anthropic.Anthropic(api_key=LIMITED_KEY, base_url=served_app, max_retries=0)
    assert [m.id for m in sdk.models.list()] == ["claude-opus-4-7"]
    assert sdk.models.retrieve("claude-opus-4-7").display_name == "Claude Opus 4.7"


def test_errors_become_the_sdk_exceptions(served_app, sdk, upstream):
    stranger = anthropic.Anthropic(api_key="sk-gw-stranger", base_url=served_app,
                                   max_retries=0)
    with pytest.raises(anthropic.AuthenticationError) as denied:
        stranger.messages.create(model="claude-opus-4-8", max_tokens=1, messages=MESSAGES)
    assert denied.value.request_id.startswith("req_gw_")
    with pytest.raises(anthropic.NotFoundError) as missing:
        sdk.messages.create(model="claude-foo", max_tokens=1, messages=MESSAGES)
    assert missing.value.body["error"]["message"] == (
        "model: claude-foo. This key may use: claude-opus-4-8, claude-opus-4-7.")
    limited = anthropic.Anthropic(api_key=LIMITED_KEY, base_url=served_app, max_retries=0)
    with pytest.raises(anthropic.PermissionDeniedError) as denied:
        limited.messages.create(model="claude-opus-4-8", max_tokens=1, messages=MESSAGES)
    assert denied.value.body["error"]["message"] == (
        "This key may not use model claude-opus-4-8. This key may use: claude-opus-4-7.")

    upstream.handler = lambda handler, received: handler.send_json(529, {
        "type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}})
    with pytest.raises(anthropic.APIStatusError) as overloaded:
        sdk.messages.create(model="claude-opus-4-8", max_tokens=1, messages=MESSAGES)
    assert overloaded.value.status_code == 529


def test_fallbacks_default_is_refused_before_the_upstream(sdk, upstream):
    """"default" would let the upstream answer from models outside the map and the key."""
    with pytest.raises(anthropic.BadRequestError) as refused:
        sdk.beta.messages.create(model="claude-opus-4-8", max_tokens=1, messages=MESSAGES,
                                 fallbacks="default")
    assert refused.value.body["error"]["message"].startswith("fallbacks: ")
    assert upstream.received == []


def test_error_event_mid_stream_raises(sdk, upstream):
    def breaks(handler, received):
        stream_events(handler, text_stream("m")[:2] + [
            b'event: error\ndata: {"type": "error", "error": {"type": "overloaded_error", '
            b'"message": "Overloaded"}}\n\n'], upstream)
    upstream.handler = breaks
    with pytest.raises(anthropic.APIStatusError, match="Overloaded"):
        with sdk.messages.stream(model="claude-opus-4-8", max_tokens=8,
                                 messages=MESSAGES) as s:
            s.get_final_message()


TS_SDK_VERSION = "1.14.0"


@pytest.fixture(scope="session")
def ts_sdk():
    """The official TypeScript SDK, installed from the npm registry into tests/ts once."""
    import os
    import shutil
    import subprocess
    here = os.path.join(os.path.dirname(os.path.abspath(__file__)), "ts")
    if not (shutil.which("node") and shutil.which("npm")):
        missing("node and npm are not installed (the TypeScript SDK test)")
    if not os.path.isdir(os.path.join(here, "node_modules", "@anthropic-ai", "sdk")):
        subprocess.run(["npm", "install", "--silent", "--no-audit", "--no-fund",
                        "--no-save", "@anthropic-ai/sdk@" + TS_SDK_VERSION],
                       cwd=here, check=True, timeout=300)
    return here


def test_typescript_sdk(ts_sdk, served_app, upstream):
    import json
    import subprocess
    result = subprocess.run(["node", "client.js", served_app, CLIENT_KEY], cwd=ts_sdk,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {
        "text": "Hello!", "streamed": ["Hel", "lo", "!"], "output_tokens": 7,
        "input_tokens": 42, "error": {"status": 404, "type": "not_found_error"}}
    assert all(CLIENT_KEY not in repr(r.headers) for r in upstream.received)


# -- refusals that cannot succeed soon are not retried (x-should-retry: false) -----------------

SPENT_KEY = "sk-gw-test-dave-0123456789abcdefghijklmnopq"


@pytest.fixture
def spent_key(config_dir, config):
    """A key whose tokens_per_day are used up: its 429 says retry-after of hours."""
    with open(config_dir / "gateway.keys", "a") as keys:
        keys.write(key_line("dave", SPENT_KEY).rstrip("\n") + " tokens_per_day=10\n")
    gateway.HostState(config.state_path).add_tokens("dave", 10, time.time())
    return SPENT_KEY


def gateway_requests(caplog, key=None):
    return [json.loads(r.getMessage()) for r in caplog.records if r.name == "gateway.access"
            and (key is None or json.loads(r.getMessage())["key"] == key)]


def bounded(call, seconds=30):
    """``call()``'s exception, raised within ``seconds`` or the test fails: an SDK that sleeps
    on an hours-long retry-after must fail the test, not hang it (the thread is a daemon)."""
    outcome = []

    def run():
        try:
            call()
        except Exception as exc:
            outcome.append(exc)
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), "the SDK is still waiting to retry"
    assert outcome, "the call succeeded"
    return outcome[0]


def test_python_sdk_does_not_retry_a_spent_daily_budget(served_app, spent_key, caplog):
    sdk = anthropic.Anthropic(api_key=spent_key, base_url=served_app, max_retries=2)
    with caplog.at_level(logging.INFO, logger="gateway.access"):
        refused = bounded(lambda: sdk.messages.create(model="claude-opus-4-8", max_tokens=1,
                                                      messages=MESSAGES))
    assert isinstance(refused, anthropic.RateLimitError)
    assert refused.response.headers["x-should-retry"] == "false"
    assert int(refused.response.headers["retry-after"]) > 60
    assert len(gateway_requests(caplog, "dave")) == 1


def test_python_sdk_does_not_retry_our_refused_upstream_credentials(served_app, upstream):
    upstream.handler = lambda handler, received: handler.send_json(401, {
        "type": "error", "error": {"type": "authentication_error",
                                   "message": "invalid x-api-key"}})
    sdk = anthropic.Anthropic(api_key=CLIENT_KEY, base_url=served_app, max_retries=2)
    with pytest.raises(anthropic.InternalServerError) as failed:
        sdk.messages.create(model="claude-opus-4-8", max_tokens=1, messages=MESSAGES)
    assert failed.value.status_code == 502
    assert failed.value.response.headers["x-should-retry"] == "false"
    assert len(upstream.received) == 1


def test_typescript_sdk_does_not_sleep_on_an_hours_long_retry_after(ts_sdk, served_app,
                                                                     spent_key, caplog):
    import subprocess
    with caplog.at_level(logging.INFO, logger="gateway.access"):
        result = subprocess.run(["node", "no_retry.js", served_app, spent_key], cwd=ts_sdk,
                                capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    seen = json.loads(result.stdout)
    assert (seen["status"], seen["type"], seen["should_retry"]) == (
        429, "rate_limit_error", "false")
    assert len(gateway_requests(caplog, "dave")) == 1
