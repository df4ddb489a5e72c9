"""Streaming, proven by calling the WSGI app directly and iterating its body.

WebTest buffers whole bodies, so it cannot tell a streaming gateway from a buffering one.
Here the fake upstream sends event 1 and then waits for a threading.Event that the test sets
only after it has read event 1 through the gateway: a gateway that buffers never hands event 1
over, the upstream's bounded wait runs out, and the test fails. No sleeps.
"""
import io
import json
import logging
import threading
from wsgiref.validate import validator

import pytest

from conftest import auth
from upstream import message, sse, stream_events, text_stream

STREAM = {"model": "claude-opus-4-8", "max_tokens": 64, "stream": True,
          "messages": [{"role": "user", "content": "Hello"}]}


def call(app, body, path="/v1/messages", headers=None):
    """Call the app as a WSGI server would; return (status, headers, body iterator)."""
    raw = json.dumps(body).encode()
    environ = {
        "REQUEST_METHOD": "POST", "PATH_INFO": path, "QUERY_STRING": "", "SERVER_NAME": "gw",
        "SERVER_PORT": "80", "SERVER_PROTOCOL": "HTTP/1.1", "wsgi.version": (1, 0),
        "wsgi.url_scheme": "http", "wsgi.input": io.BytesIO(raw), "wsgi.errors": io.StringIO(),
        "wsgi.multithread": True, "wsgi.multiprocess": False, "wsgi.run_once": False,
        "CONTENT_TYPE": "application/json", "CONTENT_LENGTH": str(len(raw)),
        "SCRIPT_NAME": "",
    }
    for name, value in (headers or auth()).items():
        environ["HTTP_" + name.upper().replace("-", "_")] = value
    started = {}

    def start_response(status, headers, exc_info=None):
        started["status"], started["headers"] = status, dict(headers)
        return lambda data: None
    body = validator(app)(environ, start_response)
    return started, body


def streams_through(app, upstream, holder="the gateway"):
    """Stream ``STREAM`` through ``app`` with the Event handshake: event 1 must reach the
    client while ``upstream`` still waits on its gate, and the whole stream must arrive byte
    for byte. Returns what ``start_response`` was given."""
    upstream.gate = threading.Event()
    started, body = call(app, STREAM)
    chunks = iter(body)
    first = next(chunks)
    assert started["status"] == "200 OK"
    assert first.startswith(b"event: message_start\n")
    assert not upstream.stream_finished.is_set()
    upstream.gate.set()  # only now may the upstream send the rest
    rest = b"".join(chunks)
    body.close()
    assert not upstream.gate_timed_out.is_set(), "%s held event 1 back" % holder
    # byte for byte what the upstream sent, padding and pings included
    assert first + rest == b"".join(text_stream("claude-opus-4-8-20261101"))
    return started


@pytest.mark.parametrize("framing", ["chunked", "close"])
def test_event_one_reaches_the_client_before_the_upstream_sends_event_two(app, upstream,
                                                                           framing):
    upstream.framing = framing
    started = streams_through(app, upstream)
    assert started["headers"]["Content-Type"] == "text/event-stream; charset=utf-8"
    assert started["headers"]["Cache-Control"] == "no-cache"


def test_each_event_is_relayed_as_it_arrives(app, upstream):
    """Every event, not just the first: the upstream waits on a fresh gate after each one."""
    gates = []

    def gated(handler, received):
        handler.start_sse("chunked")
        for event in text_stream("m"):
            gate = threading.Event()
            gates.append(gate)
            handler.send_chunk(event)
            if not gate.wait(10):
                upstream.gate_timed_out.set()
        handler.end_sse()
    upstream.handler = gated
    started, body = call(app, STREAM)
    received = b""
    for chunk in body:
        received += chunk
        while received.count(b"\n\n") > len([g for g in gates if g.is_set()]):
            gates[len([g for g in gates if g.is_set()])].set()
    body.close()
    assert not upstream.gate_timed_out.is_set()
    assert received == b"".join(text_stream("m"))


@pytest.mark.parametrize("framing", ["chunked", "close"])
def test_client_going_away_closes_the_upstream_connection(app, upstream, framing, caplog):
    upstream.framing = framing
    upstream.gate = threading.Event()
    gone = threading.Event()

    def watch(handler, received):
        handler.start_sse(framing)
        handler.send_chunk(text_stream("m")[0])
        if handler.wait_for_client_gone():
            gone.set()
    upstream.handler = watch
    started, body = call(app, STREAM)
    with caplog.at_level(logging.INFO, logger="gateway.access"):
        next(iter(body))
        body.close()  # what gunicorn does when the client disconnects
    assert gone.wait(10), "the upstream never saw its connection closed"
    record = json.loads(caplog.records[-1].getMessage())
    assert record["error"] == "client went away" and record["input_tokens"] == 12


def test_upstream_failing_mid_stream_ends_with_an_error_event(app, upstream, caplog):
    def dies(handler, received):
        handler.start_sse("chunked")
        handler.send_chunk(text_stream("m")[0])
        handler.wfile.write(b"5\r\nevent")  # a chunk shorter than it claims, then reset
        handler.wfile.flush()
        handler.connection.shutdown(2)
    upstream.handler = dies
    with caplog.at_level(logging.INFO):
        started, body = call(app, STREAM)
        data = b"".join(body)
        body.close()
    assert started["status"] == "200 OK"
    last = data.rstrip(b"\n").split(b"\n\n")[-1]
    assert last.startswith(b"event: error\ndata: ")
    error = json.loads(last.split(b"data: ", 1)[1])
    assert error == {"type": "error", "error": {"type": "api_error", "message": error["error"]
                                                ["message"]}}
    access = [json.loads(r.getMessage()) for r in caplog.records if r.name == "gateway.access"]
    assert access[-1]["error"] == "upstream stream failed"


def test_stream_ending_without_message_stop_ends_with_an_error_event(app, upstream):
    def short(handler, received):
        stream_events(handler, text_stream("m")[:-1], upstream)
    upstream.handler = short
    started, body = call(app, STREAM)
    data = b"".join(body)
    body.close()
    assert data.startswith(b"".join(text_stream("m")[:-1]))
    assert data.endswith(b"\n\n") and b"event: error" in data.split(b"content_block_stop")[-1]


OVERLOADED_EVENT = (b'event: error\ndata: {"type": "error", "error": {"type": '
                    b'"overloaded_error", "message": "Overloaded"}}\n\n')


@pytest.mark.parametrize("framing", ["chunked", "close"])
def test_the_upstreams_own_error_event_passes_alone_and_unchanged(app, upstream, framing,
                                                                   caplog):
    """The upstream ends with its own error event: the client gets those bytes and no second
    error event of the gateway's (a client would otherwise see two errors, or the wrong one)."""
    upstream.framing = framing
    sent = text_stream("m")[:3] + [OVERLOADED_EVENT]
    upstream.handler = lambda handler, received: stream_events(handler, sent, upstream)
    with caplog.at_level(logging.INFO, logger="gateway.access"):
        started, body = call(app, STREAM)
        data = b"".join(body)
        body.close()
    assert data == b"".join(sent)
    record = json.loads([r for r in caplog.records if r.name == "gateway.access"][-1]
                        .getMessage())
    assert record["error"] == "upstream error event"


def test_an_upstream_error_event_then_a_broken_connection_adds_no_second_one(app, upstream):
    def dies(handler, received):
        handler.start_sse("chunked")
        handler.send_chunk(text_stream("m")[0])
        handler.send_chunk(OVERLOADED_EVENT)
        handler.wfile.write(b"5\r\nev")  # a chunk shorter than it claims, then reset
        handler.wfile.flush()
        handler.connection.shutdown(2)
    upstream.handler = dies
    started, body = call(app, STREAM)
    data = b"".join(body)
    body.close()
    assert data.count(b"event: error") == 1 and OVERLOADED_EVENT in data


def test_usage_is_read_from_the_events_as_they_pass(app, upstream, caplog):
    with caplog.at_level(logging.INFO, logger="gateway.access"):
        started, body = call(app, STREAM)
        b"".join(body)
        body.close()
    record = json.loads([r for r in caplog.records if r.name == "gateway.access"][-1]
                        .getMessage())
    assert record["stream"] is True and record["status"] == 200
    assert (record["input_tokens"], record["output_tokens"]) == (12, 7)
    assert record["ttfb_ms"] is not None and record["ttfb_ms"] <= record["duration_ms"]


def test_a_streamed_request_answered_with_an_error_is_relayed_as_json(app, upstream):
    overloaded = {"type": "error", "error": {"type": "overloaded_error",
                                             "message": "Overloaded"}}

    def busy(handler, received):
        handler.send_json(529, overloaded, {"retry-after": "7"})
    upstream.handler = busy
    started, body = call(app, STREAM)
    assert started["status"].startswith("529")
    assert started["headers"]["retry-after"] == "7"
    assert json.loads(b"".join(body)) == overloaded
    body.close()
    assert len(upstream.received) == 1  # relayed, not retried


def test_stream_false_is_answered_as_json(app, upstream):
    started, body = call(app, dict(STREAM, stream=False))
    assert json.loads(b"".join(body)) == message("claude-opus-4-8-20261101")
    body.close()
    assert started["headers"]["Content-Type"] == "application/json"


def test_tool_use_and_thinking_events_pass_byte_for_byte(app, upstream):
    events = [
        sse("message_start", {"type": "message_start", "message": dict(
            message("m", ""), content=[], stop_reason=None)}),
        sse("content_block_start", {"type": "content_block_start", "index": 0,
                                    "content_block": {"type": "thinking", "thinking": "",
                                                      "signature": ""}}),
        sse("content_block_delta", {"type": "content_block_delta", "index": 0,
                                    "delta": {"type": "thinking_delta", "thinking": "Hmm…"}}),
        sse("content_block_delta", {"type": "content_block_delta", "index": 0,
                                    "delta": {"type": "signature_delta",
                                              "signature": "EqQBCgIYAhIM1gbcDa9GJwZA2b3h"}}),
        sse("content_block_stop", {"type": "content_block_stop", "index": 0}),
        sse("content_block_start", {"type": "content_block_start", "index": 1,
                                    "content_block": {"type": "tool_use", "id": "toolu_1",
                                                      "name": "get_weather", "input": {}}}),
        sse("content_block_delta", {"type": "content_block_delta", "index": 1,
                                    "delta": {"type": "input_json_delta",
                                              "partial_json": "{\"city\": \"Par"}}, pad=9),
        sse("content_block_delta", {"type": "content_block_delta", "index": 1,
                                    "delta": {"type": "input_json_delta",
                                              "partial_json": "is\"}"}}),
        sse("content_block_stop", {"type": "content_block_stop", "index": 1}),
        sse("message_delta", {"type": "message_delta", "delta": {"stop_reason": "tool_use"},
                              "usage": {"output_tokens": 30}}),
        sse("message_stop", {"type": "message_stop"}),
    ]
    upstream.handler = lambda handler, received: stream_events(handler, events, upstream)
    started, body = call(app, STREAM)
    assert b"".join(body) == b"".join(events)
    body.close()
