"""Rewriting only what routing changes (parse_json_members, encode_routed): the upstream must
get the same JSON value as a full re-encoding would give it, with the client's own bytes for
everything routing left alone, and every body json.loads refuses refused the same way."""
import json

import pytest

import gateway

MODELS = {"claude-opus-4-8": "claude-opus-4-8-20261101", "claude-opus-4-7": "claude-opus-4-7"}
ANY = gateway.KeyEntry("alice", b"\0" * 32)


def rewrite(raw):
    body, layout = gateway.parse_json_members(raw)
    assert body == gateway.parse_json_body(raw)
    routed, _, _ = gateway.route_models(body, MODELS, ANY)
    sent = gateway.encode_routed(routed, body, layout)
    assert json.loads(sent) == json.loads(gateway.encode_json(routed))
    return sent, layout


@pytest.mark.parametrize("raw, sent", [
    (b'{"model":"claude-opus-4-8","max_tokens":5}',
     b'{"model":"claude-opus-4-8-20261101","max_tokens":5}'),
    # spacing, escapes and member order stay as the client wrote them
    (b' {\n "max_tokens" : 5, "model" : "claude-opus-4-8",\t"x": "\\u00e9\\n"} ',
     b' {\n "max_tokens" : 5, "model" : "claude-opus-4-8-20261101",\t"x": "\\u00e9\\n"} '),
    # non-ASCII text, and a member routing maps to itself, are left byte for byte
    ('{"model":"claude-opus-4-7","messages":[{"role":"user","content":"héllo 😀"}]}'.encode(),
     '{"model":"claude-opus-4-7","messages":[{"role":"user","content":"héllo 😀"}]}'.encode()),
    ('{"messages":"é","model":"claude-opus-4-8"}'.encode(),
     '{"messages":"é","model":"claude-opus-4-8-20261101"}'.encode()),
    # fallbacks and advisor tools are re-encoded as members; other tools are not touched
    (b'{"model":"claude-opus-4-7","fallbacks":[{"model":"claude-opus-4-8"}],'
     b'"tools":[ {"type":"x"} ]}',
     b'{"model":"claude-opus-4-7","fallbacks":[{"model":"claude-opus-4-8-20261101"}],'
     b'"tools":[ {"type":"x"} ]}'),
])
def test_only_the_changed_members_are_rewritten(raw, sent):
    assert rewrite(raw)[0] == sent


@pytest.mark.parametrize("raw", [
    b'{"model":"claude-opus-4-7","model":"claude-opus-4-8"}',  # repeated name: last one wins
    b'\xef\xbb\xbf{"model":"claude-opus-4-8"}',                 # a BOM: json.loads accepts it
    '{"model":"claude-opus-4-8"}'.encode("utf-16"),
])
def test_unusual_bodies_are_re_encoded_whole(raw):
    sent, layout = rewrite(raw)
    assert layout is None
    assert json.loads(sent)["model"] == "claude-opus-4-8-20261101"


@pytest.mark.parametrize("raw", [
    b'{"model":"claude-opus-4-8","t":NaN}', b'{"model":"claude-opus-4-8","t":[-Infinity]}',
    b'{"model":"claude-opus-4-8",}', b'{"model":"claude-opus-4-8"} {}', b'{"model" 1}',
    b'[1]', b'', b'{"model":"claude-opus-4-8","t":"\x01"}', b'{"a":' + b'[' * 100000,
])
def test_what_json_loads_refuses_is_refused_with_the_same_message(raw):
    with pytest.raises(gateway.APIError) as expected:
        gateway.parse_json_body(raw)
    with pytest.raises(gateway.APIError) as got:
        gateway.parse_json_members(raw)
    assert (got.value.status, got.value.message) == (expected.value.status,
                                                    expected.value.message)
