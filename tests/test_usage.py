"""'gateway usage': the pure report over records, then the real command over the access log
that a real 'gateway serve' wrote, rotated and gzipped, checked against the tokens the fake
upstream returned."""
import gzip
import random
import json
import os
import subprocess
import sys
import time

import pytest
import requests

import gateway
from conftest import ANY_PORT, CLIENT_KEY, LIMITED_KEY, ROOT, auth, gateway_process
from upstream import abandoned_stream, default_handler, returned_usage

WAIT = 15.0  # every wait below is bounded by this many seconds

OPUS_8, OPUS_7 = "claude-opus-4-8", "claude-opus-4-7"


def record(request_id, key="alice", model=OPUS_8, status=200, when="2026-11-25T15:04:28Z",
           **fields):
    return dict({"time": when, "request_id": request_id, "key": key, "model": model,
                 "status": status}, **fields)


# -- the pure part ----------------------------------------------------------------------------

def test_access_records_skips_what_is_not_an_access_line():
    line = json.dumps(record("req_gw_1", input_tokens=3))
    lines = [
        "[2026-11-25 15:04:28 +0000] [42] [INFO] Booting worker with pid: 42\n",
        line + "\n",
        "Nov 25 15:04:28 host gateway[42]: " + line + "\n",  # syslog / journalctl prefix
        '{"not": "an access line"}\n',
        "{broken json\n",
        "Traceback (most recent call last): {\n",
        "",
    ]
    records = list(gateway.access_records(lines))
    assert [r["request_id"] for r in records] == ["req_gw_1", "req_gw_1"]


def test_usage_report_adds_up_per_key_and_model():
    records = [
        record("r1", input_tokens=10, output_tokens=5, cache_read_input_tokens=3),
        record("r2", input_tokens=1, output_tokens=2, cache_creation_input_tokens=7),
        record("r3", status=529),                                  # upstream overloaded
        record("r4", error="upstream stream failed", input_tokens=4),  # 200, then failed
        record("r5", key="bob", model=OPUS_7, input_tokens=100),
        record("r6", key="bob", model=None, status=403),           # refused before routing
        record("r7", key=None, model=None, status=401),             # nobody's usage
        record("r1", input_tokens=10, output_tokens=5),            # the same request again
    ]
    rows = gateway.usage_report(records)
    assert rows == [
        {"key": "alice", "model": OPUS_8, "requests": 4, "errors": 2, "input_tokens": 15,
         "output_tokens": 7, "cache_creation_input_tokens": 7, "cache_read_input_tokens": 3},
        {"key": "bob", "model": "-", "requests": 1, "errors": 1, "input_tokens": 0,
         "output_tokens": 0, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0},
        {"key": "bob", "model": OPUS_7, "requests": 1, "errors": 0, "input_tokens": 100,
         "output_tokens": 0, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0},
    ]
    assert gateway.usage_total(rows)["requests"] == 6


def test_usage_report_filters_by_time_and_key_and_groups_by_day():
    records = [record("r1", when="2026-10-31T23:59:59Z", input_tokens=1),
               record("r2", when="2026-11-01T00:00:00Z", input_tokens=2),
               record("r3", when="2026-11-30T23:59:59Z", input_tokens=4),
               record("r4", when="2026-12-01T00:00:00Z", input_tokens=8),
               record("r5", key="bob", when="2026-11-15T12:00:00Z", input_tokens=16)]
    november = gateway.usage_report(records, since="2026-11-01T00:00:00Z",
                                    until="2026-12-01T00:00:00Z", by=("day",))
    assert [(row["day"], row["input_tokens"]) for row in november] == [
        ("2026-11-01", 2), ("2026-11-15", 16), ("2026-11-30", 4)]
    alice = gateway.usage_report(records, key="alice", by=("key",))
    assert alice == [dict(alice[0], key="alice", requests=4, input_tokens=15)]
    by_model = gateway.usage_report(records, by=("model", "key"))
    assert [(row["model"], row["key"]) for row in by_model] == [(OPUS_8, "alice"),
                                                                 (OPUS_8, "bob")]


def test_usage_table_is_aligned_with_a_total():
    rows = gateway.usage_report([record("r1", input_tokens=12345, output_tokens=7),
                                 record("r2", key="bob", model=OPUS_7, status=429)])
    lines = gateway.format_usage_table(rows, ("key", "model")).splitlines()
    assert lines[0].split() == ["KEY", "MODEL", "REQUESTS", "ERRORS", "INPUT", "OUTPUT",
                                "CACHE_CREATION", "CACHE_READ"]
    assert lines[1].split() == ["alice", OPUS_8, "1", "0", "12345", "7", "0", "0"]
    assert lines[2].split() == ["bob", OPUS_7, "1", "1", "0", "0", "0", "0"]
    assert lines[3].split() == ["TOTAL", "2", "1", "12345", "7", "0", "0"]
    assert len({len(line) for line in lines[:3]}) == 1  # numbers right-aligned in columns
    assert gateway.format_usage_table([], ("day",)).splitlines()[-1].split()[0] == "TOTAL"


# -- the real log of a real 'gateway serve' ---------------------------------------------------

def run_usage(*args, stdin=None):
    return subprocess.run([sys.executable, os.path.join(ROOT, "gateway"), "usage"] + list(args),
                          capture_output=True, text=True, input=stdin, timeout=30)


def ask(url, key=CLIENT_KEY, model=OPUS_8, stream=False):
    body = {"model": model, "max_tokens": 10, "stream": stream,
            "messages": [{"role": "user", "content": "hi"}]}
    response = requests.post(url + "/v1/messages", json=body, headers=auth(key), timeout=WAIT)
    return response.status_code, response.content


def abandon_stream(url, upstream):
    """Read the first event of a stream, then hang up; wait until the upstream saw the
    gateway hang up too."""
    upstream.handler = abandoned_stream
    body = {"model": OPUS_8, "max_tokens": 10, "stream": True,
            "messages": [{"role": "user", "content": "hi"}]}
    response = requests.post(url + "/v1/messages", json=body, headers=auth(), stream=True,
                             timeout=WAIT)
    received = b""
    while b"\n\n" not in received:
        chunk = response.raw.read1(65536)
        assert chunk, "the stream ended before its first event"
        received += chunk
    assert b"message_start" in received
    response.close()
    assert upstream.client_gone.wait(WAIT), "the gateway never hung up on the upstream"
    upstream.handler = default_handler


def access_lines(path):
    return [line for line in path.read_text().splitlines() if '"request_id"' in line]


def serve(config_dir, log_path, requests_to_send, expected_lines):
    """Run 'gateway serve', send the requests, and stop once the access log holds them all
    (a stream's line is written after its last byte, so the wait is on the log)."""
    ini = str(config_dir / "gateway.ini")
    bind = ANY_PORT
    with gateway_process(["serve", "--config", ini, "--bind", bind], log_path) as (_, url):
        requests_to_send(url)
        deadline = time.monotonic() + WAIT
        while len(access_lines(log_path)) < expected_lines:
            assert time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.05)


def test_usage_over_a_real_rotated_and_gzipped_log(config_dir, upstream, tmp_path):
    logs = tmp_path / "logs"
    logs.mkdir()

    def first_day(url):
        assert ask(url)[0] == 200
        assert ask(url)[0] == 200
        status, body = ask(url, stream=True)
        assert status == 200 and b"message_stop" in body
        assert ask(url, LIMITED_KEY, OPUS_7)[0] == 200
        assert ask(url, LIMITED_KEY, OPUS_8)[0] == 403  # bob may not use opus 4.8

    def second_day(url):
        assert ask(url)[0] == 200
        status, body = ask(url, stream=True)
        assert status == 200 and b"message_stop" in body
        abandon_stream(url, upstream)
        assert ask(url, "sk-gw-not-a-key")[0] == 401  # nobody's usage

    # logrotate's way: yesterday's log compressed beside today's.
    serve(config_dir, logs / "access.log", first_day, expected_lines=5)
    with open(logs / "access.log", "rb") as plain, gzip.open(logs / "access.log.1.gz",
                                                             "wb") as packed:
        packed.write(plain.read())
    os.unlink(logs / "access.log")
    serve(config_dir, logs / "access.log", second_day, expected_lines=4)

    result = run_usage("--json", str(logs / "access.log.1.gz"), str(logs / "access.log"))
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    rows = {(row["key"], row["model"]): row for row in report["rows"]}
    # bob's 403 is counted under the model he asked for (the access line names it)
    assert set(rows) == {("alice", OPUS_8), ("bob", OPUS_7), ("bob", OPUS_8)}

    answers = ["json"] * 3 + ["stream"] * 2 + ["abandoned"]
    alice = rows["alice", OPUS_8]
    assert alice["requests"] == 6 and alice["errors"] == 0
    for field in gateway.USAGE_FIELDS:
        assert alice[field] == sum(returned_usage(kind)[field] for kind in answers), field
        assert rows["bob", OPUS_7][field] == returned_usage("json")[field], field
    assert rows["bob", OPUS_8]["requests"] == 1 and rows["bob", OPUS_8]["errors"] == 1
    assert report["total"]["requests"] == 8

    # The same report as a table, one key, and the log read from standard input.
    table = run_usage("--key", "bob", str(logs / "access.log.1.gz"), str(logs / "access.log"))
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert [line.split()[0] for line in lines] == ["KEY", "bob", "bob", "TOTAL"]
    assert lines[-1].split()[1:3] == ["2", "1"]
    piped = run_usage("-", "--json", stdin=(logs / "access.log").read_text())
    assert json.loads(piped.stdout)["total"]["requests"] == 3

    # Nothing yet tomorrow; a bad date is a usage error.
    tomorrow = time.strftime("%Y-%m-%d", time.gmtime(time.time() + 86400))
    later = run_usage("--json", "--since", tomorrow, str(logs / "access.log"))
    assert json.loads(later.stdout)["rows"] == []
    assert run_usage("--since", "someday", str(logs / "access.log")).returncode == 2


def test_usage_reports_a_missing_file_and_a_cut_gzip(tmp_path):
    missing = run_usage(str(tmp_path / "nope.log"))
    assert missing.returncode == 1 and "nope.log" in missing.stderr
    line = json.dumps(record("req_gw_1", input_tokens=5)) + "\n"
    packed = gzip.compress((line * 2000).encode())
    (tmp_path / "cut.log.gz").write_bytes(packed[:len(packed) - 20])
    cut = run_usage("--json", str(tmp_path / "cut.log.gz"))
    assert cut.returncode == 0 and "ends early" in cut.stderr
    assert json.loads(cut.stdout)["total"]["requests"] == 1  # one request id, many copies


# -- the fast reader: the same report as json.loads, in bounded memory -------------------------

def logged_line(caplog, **fields):
    """One access-log line exactly as the gateway writes it (Exchange.log)."""
    exchange = gateway.Exchange({"REQUEST_METHOD": "POST", "PATH_INFO": "/v1/messages"},
                                "127.0.0.1")
    for name, value in fields.items():
        setattr(exchange, name, value)
    caplog.clear()
    with caplog.at_level("INFO", logger="gateway.access"):
        exchange.log()
    return caplog.records[-1].getMessage()


def test_the_gateways_own_lines_take_the_fast_path(caplog):
    # If this fails, Exchange.log's record changed: update _access_line_pattern to match it
    # ('gateway usage' stays right without it, only slower).
    for find in gateway._access_line_pattern(), gateway._access_line_pattern(backslashes=False):
        for fields in ({"key_name": "alice", "public_model": OPUS_8, "status": 200,
                        "usage": {"input_tokens": 3, "output_tokens": 4}},
                       {"key_name": "bob", "status": 529, "error": "upstream stream failed"},
                       {"status": 401}):
            line = logged_line(caplog, **fields)
            assert len(find(line.encode())) == 1, line


@pytest.mark.parametrize("names", [
    ["alice", "bob", None],  # every chunk read by one regular expression
    ["alice", "bob", "zoë", None, "carl\"q"],  # escaped names: chunks read line by line
])
def test_fast_reader_agrees_with_json_on_every_kind_of_line(caplog, names):
    rng = random.Random(16)
    lines = []
    for number in range(3000):
        usage = {name: rng.randrange(1000) for name in gateway.USAGE_FIELDS
                 if rng.random() < 0.8}
        line = logged_line(
            caplog, key_name=rng.choice(names),
            public_model=rng.choice([OPUS_8, OPUS_7, None]),
            status=rng.choice([200, 200, 200, 400, 429, 529, 401]), usage=usage,
            error=rng.choice([None, None, gateway.CLIENT_WENT_AWAY, "upstream error event"]))
        line = line.replace('"time": "%s' % line[10:20], '"time": "2026-11-%02d' % (
            number % 28 + 1))  # spread over days
        if rng.random() < 0.05:
            line = "Nov 25 15:04:28 host gateway[42]: " + line  # a journal prefix
        lines.append(line)
        if rng.random() < 0.05:
            lines.append(rng.choice(lines))  # a copy from an overlapping log
        if rng.random() < 0.02:
            lines.append("[2026-11-25 15:04:28 +0000] [42] [INFO] Booting worker")
    text = "\n".join(lines) + "\n"
    for options in ({}, {"by": ("day",)}, {"key": "alice", "by": ("day", "model")},
                    {"since": "2026-11-05", "until": "2026-11-20T12:00:00Z"}):
        expected = gateway.usage_report(gateway.access_records(text.splitlines()), **options)
        tally = gateway.UsageTally(**options)
        for start in range(0, len(lines), 700):  # chunks of whole lines
            tally.add_chunk(("\n".join(lines[start:start + 700]) + "\n").encode())
        assert tally.rows() == expected, options


def test_a_cut_off_line_is_not_read_into_the_next(caplog):
    # Without a backslash in the data, the fast expression reads a string up to the next
    # quote, wherever it is: here past the end of a line cut off inside its error (a full
    # disk, a copy taken mid-write) and into a line that ends in a quote and a brace.
    line = logged_line(caplog, key_name="alice", public_model=OPUS_8, status=200,
                       usage={"input_tokens": 3}, error="upstream stream failed")
    cut = line[:line.index("stream failed")]
    line = logged_line(caplog, key_name="alice", public_model=OPUS_8, status=200,
                       usage={"input_tokens": 3})  # another request, whole
    assert gateway._access_line_pattern(backslashes=False)(
        ("%s\nfailed: see the upstream's status page\"}\n" % cut).encode())  # the trap
    text = "%s\nfailed: see the upstream's status page\"}\n%s\n" % (cut, line)
    tally = gateway.UsageTally()
    tally.add_chunk(text.encode())
    assert tally.rows() == gateway.usage_report(gateway.access_records(text.splitlines()))
    assert tally.rows()[0]["requests"] == 1


def test_a_name_that_is_not_utf8_is_read_as_json_reads_it(caplog):
    line = logged_line(caplog, key_name="alice", public_model=OPUS_8, status=200,
                       usage={"input_tokens": 3}).encode()
    line = line.replace(b'"alice"', b'"al\xffice"')  # a damaged byte
    tally = gateway.UsageTally()
    tally.add_chunk(line + b"\n")
    expected = gateway.usage_report(gateway.access_records([line.decode("utf-8", "replace")]))
    assert tally.rows() == expected and expected[0]["key"] == "al\ufffdice"


def test_duplicates_are_found_within_a_bounded_window():
    def report(ids):
        tally = gateway.UsageTally(window=4)
        for request_id in ids:
            tally.add_record(record(request_id))
        return tally.rows()[0]["requests"]
    assert report(["a", "b", "a", "c", "b"]) == 3  # copies close together count once
    # After at least 4 other ids (at most 8), an id is forgotten: memory stays bounded.
    assert report(["a"] + ["x%d" % n for n in range(8)] + ["a"]) == 10


def test_records_written_otherwise_are_still_counted(caplog):
    # The same records as json.loads reads them, whoever wrote them: compact separators
    # (`jq -c`), a key spelled with an escape, counts of 0 and one with a leading zero
    # (not JSON: json.loads refuses that line, so it is nobody's usage).
    line = logged_line(caplog, key_name="alice", public_model=OPUS_8, status=200,
                       usage={"input_tokens": 3, "output_tokens": 0})
    compact = json.dumps(dict(json.loads(line), request_id="req_compact"),
                         separators=(",", ":"))
    escaped = line.replace('"request_id": "', '"request_\\u0069d": "x')
    zero = line.replace('"request_id": "', '"request_id": "zero').replace(
        '"input_tokens": 3', '"input_tokens": 0')
    leading = line.replace('"request_id": "', '"request_id": "lead').replace(
        '"input_tokens": 3', '"input_tokens": 03')
    for lines in ([line, compact], [line, escaped], [line, escaped, "caf\\u00e9"],
                  [line, zero, leading]):
        text = "\n".join(lines) + "\n"
        tally = gateway.UsageTally()
        tally.add_chunk(text.encode())
        expected = gateway.usage_report(gateway.access_records(text.splitlines()))
        assert tally.rows() == expected, lines
    assert [row["requests"] for row in expected] == [2]  # the leading zero is not counted


def test_errors_are_counted_in_their_own_group(caplog):
    lines = [logged_line(caplog, key_name=name, public_model=OPUS_8, status=status,
                         usage={"input_tokens": 1}, error=error)
             for name, status, error in [("alice", 200, None), ("alice", 429, None),
                                         ("bob", 200, "upstream stream failed"),
                                         ("bob", 529, "upstream stream failed"),
                                         ("carl", 200, gateway.CLIENT_WENT_AWAY)]]
    text = "\n".join(lines) + "\n"
    for by in (("key",), ("key", "model"), ("model",)):
        tally = gateway.UsageTally(by=by)
        tally.add_chunk(text.encode())
        assert tally.rows() == gateway.usage_report(gateway.access_records(
            text.splitlines()), by=by)
    assert [row["errors"] for row in tally.rows()] == [3]


def test_fast_reader_agrees_with_json_on_lines_written_otherwise():
    # Lines no gateway writes but json.loads reads (or refuses): compact, escaped keys,
    # non-ASCII unescaped, a leading zero, cut off, behind a prefix, and junk ending in '"}'.
    # The window is larger than the log, so every copy counts once either way.
    fields = {"time": "", "request_id": "", "upstream_request_id": None, "client_ip": "1.2.3.4",
              "method": "POST", "path": "/v1/messages", "key": "", "model": "",
              "upstream_model": None, "status": 200, "stream": False, "duration_ms": 1.5,
              "ttfb_ms": None}
    for seed in range(60):
        rng = random.Random(seed)
        lines = []
        for _ in range(rng.randrange(1, 60)):
            entry = dict(fields, request_id="r%d" % rng.randrange(40),
                         time="2026-11-%02dT10:00:00Z" % rng.randrange(1, 29),
                         key=rng.choice(["alice", "bob", None, "zo\u00eb"]),
                         model=rng.choice([OPUS_8, OPUS_7, None]),
                         status=rng.choice([200, 200, 429, 401]))
            entry.update({name: rng.choice([0, 0, 1, 7, 120]) for name in gateway.USAGE_FIELDS
                          if rng.random() < 0.7})
            if rng.random() < 0.2:
                entry["error"] = rng.choice(["upstream error event", gateway.CLIENT_WENT_AWAY])
            line = rng.choice([
                json.dumps(entry), json.dumps(entry, separators=(",", ":")),
                json.dumps(entry).replace('"request_id"', '"request_\\u0069d"'),
                json.dumps(entry, ensure_ascii=False), "prefix: " + json.dumps(entry),
                json.dumps(entry).replace(": 7", ": 07"),
                json.dumps(entry)[:rng.randrange(10, 200)]])
            lines.append(line)
            if rng.random() < 0.1:
                lines.append('junk "}')
        text = "\n".join(lines) + "\n"
        step = rng.randrange(1, 20)
        for options in ({}, {"by": ("day",)}, {"key": "bob", "by": ("model", "key")},
                        {"since": "2026-11-10", "until": "2026-11-20"}):
            expected = gateway.usage_report(gateway.access_records(text.splitlines()), **options)
            tally = gateway.UsageTally(**options)
            for start in range(0, len(lines), step):
                tally.add_chunk(("\n".join(lines[start:start + step]) + "\n").encode())
            assert tally.rows() == expected, (seed, options)
