"""'gateway usage': the pure report over records, then the real command over the access log
that a real 'gateway serve' wrote, rotated and gzipped, checked against the tokens the fake
upstream returned."""
import gzip
import json
import math
import os
import random
import signal
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
        assert rows_by_chunks(lines, 700, options) == expected, options


def rows_by_chunks(lines, step, options):
    """The rows a UsageTally with ``options`` adds up from ``lines`` in chunks of ``step``
    whole lines."""
    tally = gateway.UsageTally(**options)
    for start in range(0, len(lines), step):
        tally.add_chunk(("\n".join(lines[start:start + step]) + "\n").encode())
    return tally.rows()


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


def test_only_what_json_reads_is_counted(caplog):
    # Lines the expression could take for the gateway's own and json.loads reads otherwise:
    # a value that is not JSON (refused), request ids that are not UTF-8 (read, as
    # access_records decodes a line, as the same id), a carriage return in a string
    # (bytes.splitlines ends the line there), a tab in one (read: strict=False), and a count
    # too long for the expression (read by json.loads). Each in a chunk with and without a
    # backslash, which the expression reads two ways.
    line = logged_line(caplog, key_name="alice", public_model=OPUS_8, status=200,
                       usage={"input_tokens": 3, "output_tokens": 4}).encode()
    odd = [line.replace(b'"stream": false', b'"stream": maybe'),
           line.replace(b'"duration_ms": ', b'"duration_ms": 0'),
           line.replace(b'"request_id": "', b'"request_id": "\xff'),
           line.replace(b'"request_id": "', b'"request_id": "\xfe'),
           line.replace(b'"request_id": "', b'"request_id": "cr').replace(b'/v1', b'/\r/v1'),
           line.replace(b'"request_id": "', b'"request_id": "tab').replace(b'/v1', b'/\t/v1'),
           line.replace(b'"request_id": "', b'"request_id": "long').replace(
               b'"input_tokens": 3', b'"input_tokens": ' + b"9" * 120)]
    for lines in ([line] + odd, [line, b'{"time": "-", "request_id": "\\"}'] + odd):
        data = b"\n".join(lines) + b"\n"
        tally = gateway.UsageTally()
        tally.add_chunk(data)
        expected = gateway.usage_report(gateway.access_records(
            [text.decode("utf-8", "replace") for text in data.splitlines()]))
        assert tally.rows() == expected
    assert expected[0]["requests"] == 4  # the line, one of the two ids, the tab, the long one
    assert expected[0]["input_tokens"] == 3 * 3 + int("9" * 120)


def test_groups_whose_lines_all_have_every_count_are_summed_alike(caplog):
    # _add_pending reads a group's counts in one go when every line has all four, and
    # column by column otherwise: both give json.loads' sums, whichever group ends up where.
    lines = []
    for number in range(200):
        usage = {name: number * (column + 1) for column, name in
                 enumerate(gateway.USAGE_FIELDS)}
        if number % 50 == 7:  # a few lines without some of the counts, in one group
            usage.pop("output_tokens")
        lines.append(logged_line(caplog, key_name=["alice", "bob"][number % 2],
                                 public_model=[OPUS_8, OPUS_7][number % 3 == 0],
                                 status=200, usage=usage).replace(
            '"request_id": "', '"request_id": "n%d-' % number))
    for options in ({}, {"by": ("key",)}, {"by": ("model", "day", "key")}):
        expected = gateway.usage_report(gateway.access_records(lines), **options)
        assert rows_by_chunks(lines, 30, options) == expected, options


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


#: An access record as Exchange.log writes it (json.dumps keeps this field order), for tests to
#: fill in.
ACCESS_RECORD = {"time": "", "request_id": "", "upstream_request_id": None,
                 "client_ip": "10.0.0.1", "method": "POST", "path": "/v1/messages", "key": "",
                 "model": "", "upstream_model": None, "status": 200, "stream": False,
                 "duration_ms": 1.5, "ttfb_ms": None}


def test_fast_reader_agrees_with_json_on_lines_written_otherwise():
    # Lines no gateway writes but json.loads reads (or refuses): compact, escaped keys,
    # non-ASCII unescaped, a leading zero, cut off, behind a prefix, and junk ending in '"}'.
    # The window is larger than the log, so every copy counts once either way.
    for seed in range(60):
        rng = random.Random(seed)
        lines = []
        for _ in range(rng.randrange(1, 60)):
            entry = dict(ACCESS_RECORD, request_id="r%d" % rng.randrange(40),
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
            assert rows_by_chunks(lines, step, options) == expected, (seed, options)


# -- both cores: worker processes add chunks up beside the parent, with the same answer ---------

def gateway_lines(count, seed, ids=None):
    """``count`` access lines as Exchange.log writes them (json.dumps, its field order), with
    request ids drawn from ``ids`` when given (so that some repeat), else all different."""
    rng = random.Random(seed)
    lines = []
    for number in range(count):
        key = rng.choice(["alice", "bob", "carl", None])
        entry = dict(ACCESS_RECORD,
                     time="2026-11-%02dT%02d:00:00Z" % (number % 28 + 1, number % 24),
                     request_id="req_%d" % (rng.randrange(ids) if ids else number), key=key,
                     model=rng.choice([OPUS_8, OPUS_7]),
                     status=rng.choice([200, 200, 200, 429, 529]))
        entry.update({name: rng.randrange(1, 1000) for name in gateway.USAGE_FIELDS
                      if rng.random() < 0.8})
        if rng.random() < 0.05:
            entry["error"] = rng.choice(["upstream stream failed", gateway.CLIENT_WENT_AWAY])
        lines.append(json.dumps(entry))
    return lines


def watched_workers(monkeypatch):
    """The UsageWorkers that add_up_logs starts, appended to the list returned."""
    started, start = [], gateway.UsageWorkers.start

    def watched(cls, *args):
        workers = start(*args)
        started.append(workers)
        return workers
    monkeypatch.setattr(gateway.UsageWorkers, "start", classmethod(watched))
    return started


@pytest.mark.parametrize("options", [
    {}, {"by": ("day",)}, {"key": "alice", "by": ("day", "model")},
    {"since": "2026-11-05T00:00:00Z", "until": "2026-11-20T12:00:00Z"}])
def test_workers_add_up_as_one_process_does(monkeypatch, tmp_path, options):
    # Small chunks (2 KB, about 8 lines) and a small window (60 ids) so that the log takes
    # the workers' path hundreds of times, with copies of a request within a chunk, across
    # chunks at the window's edge (counted once or twice: as one process counts them), and
    # chunks read line by line (an escaped name), in a plain file and a .gz.
    lines = gateway_lines(6000, seed=16, ids=4000)
    for number in range(0, len(lines), 997):
        lines[number] = lines[number].replace('"bob"', '"b\\u00f6b"')
    lines[100:100] = ["[2026-11-25 15:04:28 +0000] [42] [INFO] Booting worker"] * 3
    half = len(lines) // 2
    (tmp_path / "old.log").write_text("\n".join(lines[:half]) + "\n")
    with gzip.open(tmp_path / "new.log.gz", "wt") as packed:
        packed.write("\n".join(lines[half:]) + "\n")
    os.utime(tmp_path / "old.log", (1, 1))  # read first
    paths = [str(tmp_path / "new.log.gz"), str(tmp_path / "old.log")]
    alone = gateway.add_up_logs(gateway.UsageTally(window=60, **options), paths,
                                chunk_bytes=2048)
    started = watched_workers(monkeypatch)
    beside = gateway.add_up_logs(gateway.UsageTally(window=60, **options), paths,
                                 processes=2, chunk_bytes=2048)
    assert beside == alone and alone
    workers, = started
    assert workers.claimed > 100 and workers.read_again > 10, (workers.claimed,
                                                                workers.read_again)
    # With a window larger than the log, both are json.loads' answer.
    everything = gateway.usage_report(gateway.access_records(lines), **options)
    assert gateway.add_up_logs(gateway.UsageTally(**options), paths, processes=2,
                               chunk_bytes=2048) == everything


def test_a_log_too_small_for_workers_starts_none(monkeypatch, tmp_path):
    lines = gateway_lines(40, seed=1)
    (tmp_path / "access.log").write_text("\n".join(lines) + "\n")
    started = watched_workers(monkeypatch)
    rows = gateway.add_up_logs(gateway.UsageTally(), [str(tmp_path / "access.log")],
                               processes=2, chunk_bytes=2048)
    assert rows == gateway.usage_report(gateway.access_records(lines)) and started == []


def test_without_fork_the_parent_reads_alone(monkeypatch, tmp_path):
    lines = gateway_lines(2000, seed=2)
    (tmp_path / "access.log").write_text("\n".join(lines) + "\n")

    def no_fork():
        raise OSError(11, "Resource temporarily unavailable")
    monkeypatch.setattr(os, "fork", no_fork)
    started = watched_workers(monkeypatch)
    rows = gateway.add_up_logs(gateway.UsageTally(), [str(tmp_path / "access.log")],
                               processes=2, chunk_bytes=2048)
    assert started == [None]
    assert rows == gateway.usage_report(gateway.access_records(lines))


def test_a_worker_that_fails_stops_the_report(monkeypatch, tmp_path, capfd):
    # Never a report short of that worker's chunks: an error, and no worker left behind.
    (tmp_path / "access.log").write_text("\n".join(gateway_lines(2000, seed=3)) + "\n")

    def children():
        return {int(pid) for task in os.listdir("/proc/self/task")
                for pid in open("/proc/self/task/%s/children" % task).read().split()}

    parent, claim_chunk = os.getpid(), gateway.UsageTally.claim_chunk

    def broken(tally, data):
        if os.getpid() != parent:
            raise ValueError("broken on purpose")
        return claim_chunk(tally, data)
    monkeypatch.setattr(gateway.UsageTally, "claim_chunk", broken)  # the forks inherit it
    before = children()
    with pytest.raises(gateway.CommandError, match="worker process"):
        gateway.add_up_logs(gateway.UsageTally(), [str(tmp_path / "access.log")],
                            processes=2, chunk_bytes=2048)
    assert "broken on purpose" in capfd.readouterr().err
    assert children() == before  # every worker reaped


def test_the_command_in_processes_gives_the_same_report(tmp_path):
    # The real command over a log big enough for its workers (more than
    # USAGE_SERIAL_CHUNKS megabytes), plain, gzip and on standard input, and over two
    # copies of it: the second copy's ids are all in the window, so each of its chunks is
    # read again by the parent and counted once.
    line_count = 40_000
    lines = gateway_lines(line_count, seed=4)
    text = "\n".join(lines) + "\n"
    assert len(text) > (gateway.USAGE_SERIAL_CHUNKS + 4) * gateway.USAGE_CHUNK_BYTES
    plain, packed = tmp_path / "access.log", tmp_path / "access.log.1.gz"
    plain.write_text(text)
    packed.write_bytes(gzip.compress(text.encode(), compresslevel=1))
    expected = gateway.usage_report(gateway.access_records(lines), by=("day", "key"))
    for args, stdin in (([str(plain)], None), ([str(packed)], None), (["-"], text),
                        ([str(plain), str(packed)], None)):
        for processes in ("1", "2"):
            result = run_usage("--json", "--by", "day,key", "--processes", processes, *args,
                               stdin=stdin)
            assert result.returncode == 0, result.stderr
            assert json.loads(result.stdout)["rows"] == expected, (args, processes)
    bad = run_usage("--processes", "0", str(plain))
    assert bad.returncode == 2 and "--processes" in bad.stderr


def test_the_command_runs_without_the_http_libraries(tmp_path):
    # requests, urllib3 and http.cookiejar were half of the command's start (about 60 ms of
    # 120), and the report never calls the upstream: gateway.py imports them only where it
    # does (docs/performance.md). The command as the 'gateway' script runs it, then what it
    # had imported.
    log = tmp_path / "access.log"
    lines = gateway_lines(50, seed=6)
    log.write_text("\n".join(lines) + "\n")
    script = ("import runpy, sys\n"
              "sys.argv = [%r, 'usage', '--json', %r]\n"
              "try:\n"
              "    runpy.run_path(sys.argv[0], run_name='__main__')\n"
              "finally:\n"
              "    print(sorted(name for name in ('requests', 'urllib3', 'http.cookiejar')\n"
              "                 if name in sys.modules), file=sys.stderr)\n"
              % (os.path.join(ROOT, "gateway"), str(log)))
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=30)
    assert json.loads(result.stdout)["rows"] == gateway.usage_report(
        gateway.access_records(lines))
    assert result.stderr.strip() == "[]"


def child_pids(pid):
    """The pids of the processes whose parent is ``pid``, from /proc."""
    children = []
    for entry in os.listdir("/proc"):
        try:
            with open("/proc/%s/stat" % entry) as stat:
                # pid (comm) state ppid ...: comm may hold spaces, so read after its ')'
                parent = int(stat.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if parent == pid:
            children.append(int(entry))
    return children


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="reads the processes in /proc")
@pytest.mark.parametrize("processes, workers", [("1", 0), ("3", 2)])
def test_processes_starts_that_many_processes_in_all(processes, workers):
    # The same report whatever --processes says (above) could not tell an option that is
    # ignored: count the command's worker processes while it reads. The command reads its
    # standard input a chunk at a time and forks its workers as its read passes
    # USAGE_SERIAL_CHUNKS chunks' worth of bytes; once a write of three chunks more has
    # gone into the pipe (64 KiB), the fork is behind it, and the workers wait, alive,
    # for the rest of the input.
    lines = gateway_lines(60_000, seed=5)
    text = ("\n".join(lines) + "\n").encode()
    enough = (gateway.USAGE_SERIAL_CHUNKS + 3) * gateway.USAGE_CHUNK_BYTES
    cut = text.index(b"\n", enough) + 1
    command = subprocess.Popen(
        [sys.executable, os.path.join(ROOT, "gateway"), "usage", "--json", "--processes",
         processes, "-"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE)
    try:
        command.stdin.write(text[:cut])
        command.stdin.flush()
        assert len(child_pids(command.pid)) == workers
        command.stdin.write(text[cut:])
        stdout, stderr = command.communicate(timeout=60)
    finally:
        command.kill()
        command.wait()
    assert command.returncode == 0, stderr
    expected = gateway.usage_report(gateway.access_records(lines))
    assert json.loads(stdout)["rows"] == expected


def test_many_small_files_start_no_worker(monkeypatch, tmp_path):
    # Workers start past USAGE_SERIAL_CHUNKS chunks' worth of bytes, not chunks: a dozen
    # small rotated files are a dozen chunks, and not worth a fork.
    paths = []
    for number in range(2 * gateway.USAGE_SERIAL_CHUNKS):
        path = tmp_path / ("access.log.%d" % number)
        path.write_text(gateway_lines(1, seed=number)[0] + "\n")
        paths.append(str(path))
    started = watched_workers(monkeypatch)
    gateway.add_up_logs(gateway.UsageTally(), paths, processes=2, chunk_bytes=2048)
    assert started == []


def test_a_large_file_starts_the_workers_at_its_first_chunk(monkeypatch, tmp_path):
    # A file says its size before it is read: larger than USAGE_SERIAL_CHUNKS chunks, the
    # workers start before the parent adds any chunk up alone. A .gz smaller than that on
    # disk (its text is larger) waits for the bytes read, as standard input does.
    lines = gateway_lines(150, seed=7)
    text = "\n".join(lines) + "\n"
    plain, packed = tmp_path / "access.log", tmp_path / "access.log.gz"
    plain.write_text(text)
    packed.write_bytes(gzip.compress(text.encode()))
    threshold = gateway.USAGE_SERIAL_CHUNKS * 2048
    assert packed.stat().st_size < threshold < len(text)
    expected = gateway.usage_report(gateway.access_records(lines))

    def added_alone_before_the_workers(path):
        tally, added, at_start = gateway.UsageTally(), [], []
        add_chunk, start = tally.add_chunk, gateway.UsageWorkers.start

        def counted(data):
            added.append(data)
            return add_chunk(data)

        def watched(cls, *args):
            at_start.append(len(added))
            return start(*args)
        tally.add_chunk = counted
        monkeypatch.setattr(gateway.UsageWorkers, "start", classmethod(watched))
        assert gateway.add_up_logs(tally, [path], processes=2, chunk_bytes=2048) == expected
        return at_start
    assert added_alone_before_the_workers(str(plain)) == [0]
    alone, = added_alone_before_the_workers(str(packed))
    assert alone >= gateway.USAGE_SERIAL_CHUNKS - 1


def test_a_worker_killed_says_so_and_is_reaped(monkeypatch, tmp_path):
    (tmp_path / "access.log").write_text("\n".join(gateway_lines(2000, seed=4)) + "\n")
    parent, claim_chunk = os.getpid(), gateway.UsageTally.claim_chunk

    def killed(tally, data):
        if os.getpid() != parent:
            os.kill(os.getpid(), signal.SIGKILL)  # as the OOM killer would
        return claim_chunk(tally, data)
    monkeypatch.setattr(gateway.UsageTally, "claim_chunk", killed)
    with pytest.raises(gateway.CommandError, match="was killed by signal %d" % signal.SIGKILL):
        gateway.add_up_logs(gateway.UsageTally(), [str(tmp_path / "access.log")],
                            processes=2, chunk_bytes=2048)


@pytest.mark.parametrize("files, expected", [
    ({}, math.inf),  # no cgroup v2 here
    ({"cpu.max": "max 100000\n"}, math.inf),
    ({"cpu.max": "150000 100000\n"}, 2),  # 1.5 CPUs: two processes
    ({"cpu.max": "max 100000\n", "system.slice/cpu.max": "100000 100000\n",
      "system.slice/gateway.service/cpu.max": "max 100000\n"}, 1),  # an ancestor's quota
])
def test_the_default_processes_keep_to_the_cgroup_cpu_quota(tmp_path, files, expected):
    (tmp_path / "proc-cgroup").write_text("0::/system.slice/gateway.service\n")
    for name, text in files.items():
        (tmp_path / "fs" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "fs" / name).write_text(text)
    assert gateway.cgroup_cpu_quota(str(tmp_path / "fs"),
                                    str(tmp_path / "proc-cgroup")) == expected


@pytest.mark.parametrize("cores, quota, expected", [
    (64, math.inf, gateway.USAGE_MAX_PROCESSES),  # a large host: no more than the cap
    (64, 2, 2),  # a two-CPU container on it: its quota
    (1, 8, 1),  # taskset -c 0
])
def test_the_default_processes_are_the_fewest_of_cores_quota_and_cap(monkeypatch, cores,
                                                                     quota, expected):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)))
    monkeypatch.setattr(gateway, "cgroup_cpu_quota", lambda: quota)
    assert gateway.usage_processes() == expected
