"""Per-key limits, key lifecycle (rotate, disable, expiry, last use) and upstream key failover."""
import json
import os
import sqlite3
import subprocess
import sys
import threading

import pytest
import requests
import webtest

import gateway
from gateway import APIError, HostState, KeyEntry
from conftest import ANY_PORT, CLIENT_KEY, ROOT, auth, gateway_process, key_line
from upstream import UPSTREAM_KEY, stream_events, text_stream

MESSAGE = {"model": "claude-opus-4-8", "max_tokens": 16,
           "messages": [{"role": "user", "content": "Hello"}]}
T0 = 1_800_000_000.0  # a fixed 'now' (2027-01-15) for the counters


def limited(**limits):
    return KeyEntry("k", b"\0" * 32, **limits)


def refusal(state, entry, holder, now):
    with pytest.raises(APIError) as error:
        state.admit(entry, holder, now)
    assert error.value.status == 429 and error.value.error_type == "rate_limit_error"
    return dict(error.value.headers)["retry-after"]


# -- the shared counters, with an explicit clock -----------------------------------------------

def test_rpm_is_a_sliding_minute_shared_by_every_instance(tmp_path):
    path = str(tmp_path / "state")
    worker_a, worker_b = HostState(path), HostState(path)  # two processes' views of one file
    entry = limited(rpm=3)
    worker_a.admit(entry, "r1", T0)
    worker_b.admit(entry, "r2", T0 + 10)
    worker_a.admit(entry, "r3", T0 + 20)
    assert refusal(worker_b, entry, "r4", T0 + 30) == "30"  # the first hit leaves at T0+60
    worker_b.admit(entry, "r5", T0 + 60.5)  # recovered: the first hit is out of the window
    assert refusal(worker_a, entry, "r6", T0 + 61) == "9"


def sqlite_steps(state, admit):
    """SQLite's virtual-machine steps (in tens) while ``admit`` runs, counted by its progress
    handler: what an admit costs, without timing it."""
    with state._db() as db:
        steps = []
        db.set_progress_handler(lambda: steps.append(1), 10)
    try:
        admit()
    finally:
        with state._db() as db:
            db.set_progress_handler(None, 10)
    return len(steps)


def test_an_rpm_admit_costs_the_same_whatever_the_hits_of_the_last_minute(tmp_path):
    # Counting the window's hits row by row made an admit cost in proportion to the key's
    # traffic (20,000 hits: about 550 times the steps of 10).
    state, entry = HostState(str(tmp_path / "state")), limited(rpm=10**9)

    def steps_to_admit(hits, holder):
        with state._db() as db:
            db.executemany("INSERT INTO hits VALUES (?, ?)",
                           [("k", T0 + n / 10**6) for n in range(hits)])
        return sqlite_steps(state, lambda: state.admit(entry, holder, T0 + 30))

    few = steps_to_admit(10, "first")
    many = steps_to_admit(20000, "second")
    assert many < 2 * few + 20, (few, many)
    assert refusal(state, limited(rpm=20012), "third", T0 + 30) == "30"  # 20,012 hits


def test_a_concurrency_admit_costs_the_same_whatever_the_hosts_open_requests(tmp_path):
    # Every key's open requests are rows of one table: without indexes, each admit read all
    # of them twice (10,000 open streams on a host: about 700 times the steps of 10).
    state, entry = HostState(str(tmp_path / "state")), limited(concurrency=2)

    def steps_to_admit(others, holder):
        with state._db() as db:
            db.executemany("INSERT INTO slots VALUES (?, ?, ?, ?)", [
                ("%s-%d" % (holder, n), "other-%d" % (n % 50), os.getpid(), T0)
                for n in range(others)])
        steps = sqlite_steps(state, lambda: state.admit(entry, holder, T0))
        state.release(holder)
        return steps

    few = steps_to_admit(10, "first")
    many = steps_to_admit(10000, "second")
    assert many < 2 * few + 20, (few, many)


def test_a_state_file_from_before_the_hit_counts_counts_its_hits(tmp_path):
    # A file an earlier version wrote has hits and no hit_counts: its hits still count.
    path = str(tmp_path / "state")
    earlier = sqlite3.connect(path, isolation_level=None)
    earlier.executescript(HostState.SCHEMA)  # without HIT_COUNTS
    earlier.executemany("INSERT INTO hits VALUES (?, ?)", [("k", T0), ("k", T0 + 1)])
    earlier.close()
    state = HostState(path)
    state.admit(limited(rpm=3), "third", T0 + 2)
    assert refusal(state, limited(rpm=3), "fourth", T0 + 3) == "57"


def test_hits_written_by_a_writer_without_hit_counts_are_counted(tmp_path):
    # An earlier version's worker sharing the file during an upgrade adds and deletes hits
    # with its own statements; the triggers in the file keep the counts exact.
    path = str(tmp_path / "state")
    state, entry = HostState(path), limited(rpm=3)
    state.admit(entry, "ours", T0)
    earlier = sqlite3.connect(path, isolation_level=None)
    earlier.executemany("INSERT INTO hits VALUES (?, ?)", [("k", T0 + 1), ("k", T0 + 2)])
    assert refusal(state, entry, "refused", T0 + 3) == "57"
    earlier.execute("DELETE FROM hits WHERE name = 'k' AND at <= ?", (T0 + 1,))
    earlier.close()
    state.admit(entry, "admitted", T0 + 4)  # two deleted: T0 + 2 and this one count
    state.admit(entry, "admitted too", T0 + 5)
    assert refusal(state, entry, "refused again", T0 + 6) == "56"


def test_concurrency_counts_open_requests_until_released(tmp_path):
    state, entry = HostState(str(tmp_path / "state")), limited(concurrency=2)
    state.admit(entry, "a", T0)
    state.admit(entry, "b", T0)
    assert refusal(state, entry, "c", T0) == "1"
    state.release("a")
    state.admit(entry, "c", T0)  # recovered as soon as one finished


def test_slots_of_a_dead_process_are_freed(tmp_path):
    state, entry = HostState(str(tmp_path / "state")), limited(concurrency=1)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    with state._db() as db:
        db.execute("INSERT INTO slots VALUES ('ghost', 'k', ?, ?)", (dead.pid, T0))
    state.admit(entry, "alive", T0)
    assert refusal(state, entry, "more", T0) == "1"


def test_tokens_per_day_refuse_until_the_next_utc_day(tmp_path):
    state, entry = HostState(str(tmp_path / "state")), limited(tokens_per_day=100)
    state.admit(entry, "a", T0)
    state.add_tokens("k", 60, T0)
    state.admit(entry, "b", T0)
    state.add_tokens("k", 60, T0)
    midnight = (T0 // 86400 + 1) * 86400
    assert refusal(state, entry, "c", T0) == str(int(midnight - T0))
    state.admit(entry, "d", midnight + 1)


def test_last_use_is_recorded_and_read_back(tmp_path):
    state = HostState(str(tmp_path / "state"))
    assert HostState(str(tmp_path / "absent")).last_use() == {}
    state.touch("alice", T0)
    state.touch("alice", T0 + 5)  # within the minute: not written again
    assert state.last_use() == {"alice": T0}
    state.touch("alice", T0 + 61)
    assert HostState(str(tmp_path / "state")).last_use() == {"alice": T0 + 61}


def test_an_unusable_state_file_serves_and_logs(tmp_path, caplog):
    state = HostState(str(tmp_path / "no-such-dir" / "state"))
    state.admit(limited(rpm=1), "a", T0)
    state.admit(limited(rpm=1), "b", T0)
    assert "limits not enforced" in caplog.text


# -- through the app ----------------------------------------------------------------------------

def test_429_reaches_the_client_with_retry_after(config_dir, upstream):
    (config_dir / "gateway.keys").write_text(key_line("alice", CLIENT_KEY).strip()
                                            + " rpm=2\n")
    client = webtest.TestApp(gateway.make_app(
        gateway.Config.from_file(str(config_dir / "gateway.ini"))))
    client.post_json("/v1/messages", MESSAGE, headers=auth())
    client.post_json("/v1/messages", MESSAGE, headers=auth())
    refused = client.post_json("/v1/messages", MESSAGE, headers=auth(), status=429)
    assert refused.json["error"]["type"] == "rate_limit_error"
    assert 1 <= int(refused.headers["retry-after"]) <= 60
    assert len(upstream.received) == 2


def test_expired_key_is_401_saying_so(config_dir, app):
    (config_dir / "gateway.keys").write_text(key_line("alice", CLIENT_KEY).strip()
                                            + " expires=2020-01-01\n")
    refused = webtest.TestApp(app).get("/v1/models", headers=auth(), status=401)
    assert "expired at 2020-01-01T00:00:00Z" in refused.json["error"]["message"]


def test_rotated_key_keeps_the_old_one_for_the_grace_period(config_dir, app):
    old = KeyEntry("alice", gateway.digest_key(CLIENT_KEY))
    client = webtest.TestApp(app)
    for until, status in ((T0 * 2, 200), (T0 / 2, 401)):
        rotated = KeyEntry("alice", gateway.digest_key("sk-gw-new-one"),
                           previous=(old.salt, old.digest), previous_until=until)
        (config_dir / "gateway.keys").write_text(rotated.to_line() + "\n")
        client.get("/v1/models", headers=auth(), status=status)
        client.get("/v1/models", headers=auth("sk-gw-new-one"), status=200)


def test_upstream_key_failover_moves_to_the_next_key(config_dir, app, upstream, caplog):
    (config_dir / "upstream.key").write_text("# rotated\nsk-ant-revoked\n%s\n" % UPSTREAM_KEY)
    client = webtest.TestApp(app)
    assert client.post_json("/v1/messages", MESSAGE, headers=auth()).json["type"] == "message"
    assert [r.headers["x-api-key"] for r in upstream.received] == ["sk-ant-revoked",
                                                                    UPSTREAM_KEY]
    client.post_json("/v1/messages", MESSAGE, headers=auth())
    assert upstream.last.headers["x-api-key"] == UPSTREAM_KEY and len(upstream.received) == 3
    assert "key #1 of 2" in caplog.text and "sk-ant-revoked" not in caplog.text


# -- under the real gunicorn, several workers ----------------------------------------------------

def run_keys(config_dir, *args):
    return subprocess.run([sys.executable, os.path.join(ROOT, "gateway"), "keys"] + list(args)
                          + ["--config", str(config_dir / "gateway.ini")],
                          capture_output=True, text=True, timeout=30, check=True).stdout


def test_concurrency_limit_across_workers_and_rotation_loses_nothing(config_dir, upstream,
                                                                      tmp_path):
    """Streams held open on several workers count against one limit; rotating the client key
    and the upstream key while they are open loses none of them."""
    run_keys(config_dir, "set", "alice", "--concurrency", "3")
    gates = []

    def held(handler, received):
        gate = threading.Event()
        gates.append(gate)
        handler.start_sse("chunked")
        events = text_stream("m")
        handler.send_chunk(events[0])
        gate.wait(20)
        for event in events[1:]:
            handler.send_chunk(event)
        handler.end_sse()
    upstream.handler = held
    stream = dict(MESSAGE, stream=True)
    with gateway_process(["serve", "--config", str(config_dir / "gateway.ini"), "--bind",
                          ANY_PORT], tmp_path / "serve.log") as (_, url):
        session = requests.Session()
        opened = [requests.post(url + "/v1/messages", json=stream, headers=auth(),
                                stream=True, timeout=20) for _ in range(3)]
        readers = [r.iter_content(None) for r in opened]
        firsts = [next(reader) for reader in readers]
        assert all(f.startswith(b"event: message_start") for f in firsts)
        refused = session.post(url + "/v1/messages", json=MESSAGE, headers=auth(), timeout=20)
        assert refused.status_code == 429 and refused.headers["retry-after"] == "1"

        new_key = run_keys(config_dir, "rotate", "alice", "--grace", "1h").splitlines()[-1]
        (config_dir / "upstream.key").write_text(UPSTREAM_KEY + "\nsk-ant-spare\n")
        for gate in gates:
            gate.set()
        bodies = [first + b"".join(reader) for first, reader in zip(firsts, readers)]
        assert all(body.endswith(b"event: message_stop\ndata: {\"type\":\"message_stop\""
                                 b"       }\n\n") for body in bodies)

        upstream.handler = lambda handler, received: stream_events(
            handler, text_stream("m"), upstream) if received.json().get("stream") else \
            handler.send_json(200, {"type": "message", "usage": {}})
        for key in (new_key, CLIENT_KEY):  # recovered, and the old key is in its grace period
            assert session.post(url + "/v1/messages", json=MESSAGE, headers=auth(key),
                                timeout=20).status_code == 200
    listed = run_keys(config_dir, "list")
    alice = [line for line in listed.splitlines() if line.startswith("alice")][0]
    assert "concurrency=3" in alice and "never" not in alice
    log = [json.loads(line) for line in (tmp_path / "serve.log").read_text().splitlines()
           if line.startswith("{")]
    assert sorted(r["status"] for r in log) == [200] * 5 + [429]


def test_rpm_and_tokens_are_exact_under_concurrent_clients(config_dir, upstream, tmp_path):
    """20 clients at once against rpm=7 on two gunicorn workers: exactly 7 get through.
    Then a daily token budget: spent by the answers' usage, refused until the next day."""
    import concurrent.futures
    (config_dir / "gateway.keys").write_text(
        key_line("alice", CLIENT_KEY).strip() + " rpm=7\n"
        + key_line("bob", "sk-gw-bob-budget-0123456789").strip() + " tokens_per_day=30\n")
    with gateway_process(["serve", "--config", str(config_dir / "gateway.ini"), "--bind",
                          ANY_PORT], tmp_path / "serve.log",
                         env={"WEB_CONCURRENCY": "2"}) as (_, url):
        def call(key):
            return requests.post(url + "/v1/messages", json=MESSAGE, headers=auth(key),
                                 timeout=20).status_code
        with concurrent.futures.ThreadPoolExecutor(20) as pool:
            statuses = list(pool.map(call, [CLIENT_KEY] * 20))
        assert sorted(statuses) == [200] * 7 + [429] * 13
        # each answer reports 12 input + 5 output tokens: 17, 34 (over 30), then refused
        assert [call("sk-gw-bob-budget-0123456789") for _ in range(3)] == [200, 200, 429]
    request_ids = {json.loads(line).get("request_id") for line in
            (tmp_path / "serve.log").read_text().splitlines() if line.startswith("{")}
    assert len(request_ids) == 23  # every request logged once, refused ones included


def test_threads_share_one_sqlite_connection(tmp_path):
    """Eight threads writing at once hold one handle on the state file between them (one per
    thread stayed open for the worker's life before)."""
    path = str(tmp_path / "state")
    state, entry = HostState(path), limited(rpm=100)
    start = threading.Barrier(8, timeout=10)

    def admit(number):
        start.wait()
        for round_ in range(5):
            state.admit(entry, "r%d-%d" % (number, round_), T0 + round_)
    threads = [threading.Thread(target=admit, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(20)
    handles = [fd for fd in os.listdir("/proc/self/fd")
               if os.path.realpath("/proc/self/fd/" + fd) == path]
    assert len(handles) == 1
    with state._db() as db:
        assert db.execute("SELECT count(*) FROM hits").fetchone()[0] == 40
