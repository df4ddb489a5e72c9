"""Does the gateway itself keep memory from request to request? tracemalloc says.

    python tests/memory_growth.py                    # 20,000 requests after 2,000 to warm up
    python tests/memory_growth.py --requests 2000    # quicker

The app runs in this process, called as a WSGI server calls it, in front of the fake upstream
(tests/upstream.py) on 127.0.0.1: JSON answers, streams read to the end, streams the client
leaves after one chunk, and refusals (a bad key, bad JSON), in a fixed random mix. After the
warm-up, tracemalloc compares a snapshot before the measured requests with one after and
prints the growth of allocations made in gateway.py (the gateway's own), then the largest
sources of growth anywhere. docs/reliability-and-security.md quotes its output.
"""
import argparse
import io
import json
import os
import random
import sys
import tempfile
import tracemalloc

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

import gateway  # noqa: E402
from upstream import UPSTREAM_KEY, FakeUpstream  # noqa: E402

KEY = "sk-gw-memory-0123456789abcdefghijklmnop"
MESSAGE = {"model": "claude-opus-4-8", "max_tokens": 10,
           "messages": [{"role": "user", "content": "hi"}]}


def call(app, body, key=KEY, leave_early=False):
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    environ = {
        "REQUEST_METHOD": "POST", "PATH_INFO": "/v1/messages", "QUERY_STRING": "",
        "SERVER_NAME": "127.0.0.1", "SERVER_PORT": "8080", "SERVER_PROTOCOL": "HTTP/1.1",
        "REMOTE_ADDR": "127.0.0.1", "SCRIPT_NAME": "", "wsgi.version": (1, 0),
        "wsgi.url_scheme": "http", "wsgi.input": io.BytesIO(raw), "wsgi.errors": io.StringIO(),
        "wsgi.multithread": True, "wsgi.multiprocess": False, "wsgi.run_once": False,
        "CONTENT_TYPE": "application/json", "CONTENT_LENGTH": str(len(raw)),
        "HTTP_X_API_KEY": key, "HTTP_ANTHROPIC_VERSION": "2023-06-01",
    }
    iterable = app(environ, lambda status, headers, exc_info=None: None)
    try:
        for _ in iterable:
            if leave_early:
                break
    finally:
        if hasattr(iterable, "close"):
            iterable.close()


def one_request(app, rng):
    kind = rng.choices(["json", "stream", "abandoned", "bad_key", "bad_json"],
                       [60, 20, 10, 5, 5])[0]
    if kind == "json":
        call(app, MESSAGE)
    elif kind in ("stream", "abandoned"):
        call(app, dict(MESSAGE, stream=True), leave_early=kind == "abandoned")
    elif kind == "bad_key":
        call(app, MESSAGE, key="sk-gw-nobody-%d" % rng.randrange(10 ** 9))
    else:
        call(app, b'{"model": ')


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--warmup", type=int, default=2000)
    args = parser.parse_args(argv)
    upstream = FakeUpstream().start()
    with tempfile.TemporaryDirectory() as directory:
        with open(os.path.join(directory, "gateway.keys"), "w") as file:
            file.write("memory sha256:%s * enabled\n" % gateway.digest_key(KEY).hex())
        os.chmod(os.path.join(directory, "gateway.keys"), 0o600)
        config = gateway.Config(upstream_url=upstream.url, keys_file="gateway.keys",
                                upstream_key=UPSTREAM_KEY, base_dir=directory)
        app = gateway.make_app(config)
        rng = random.Random(15)
        for _ in range(args.warmup):
            one_request(app, rng)
        upstream.received.clear()  # the fake keeps every request: not the gateway's memory
        tracemalloc.start(10)
        before = tracemalloc.take_snapshot()
        for number in range(args.requests):
            one_request(app, rng)
            if number % 1000 == 999:
                upstream.received.clear()
        upstream.received.clear()
        after = tracemalloc.take_snapshot()
        tracemalloc.stop()
    upstream.stop()
    ours = [tracemalloc.Filter(True, gateway.__file__)]
    growth = after.filter_traces(ours).compare_to(before.filter_traces(ours), "filename")
    total = sum(stat.size_diff for stat in growth)
    print("%d requests after %d to warm up: allocations made in gateway.py grew by %.1f KiB"
          % (args.requests, args.warmup, total / 1024))
    print("largest growth anywhere (tracemalloc, by line):")
    for stat in after.compare_to(before, "lineno")[:5]:
        print("  %s" % stat)
    return 0


if __name__ == "__main__":
    sys.exit(main())
