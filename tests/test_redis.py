"""Per-key limits across hosts on a real redis-server (limits_backend): exactness, leases,
and what happens while Redis is restarted, killed or frozen. No mock of Redis anywhere.

Each test starts its own redis-server on a unix socket in a fresh temporary directory (no
port to collide with other tests), and stops it. Without redis-server (Debian's package) or
redis-py the tests skip locally and fail in CI, where a skip could hide a missing install.
"""
import concurrent.futures
import contextlib
import dataclasses
import os
import re
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import types

import pytest
import requests
import webtest

import gateway
from gateway import APIError, HostState, KeyEntry, RedisLimits
from conftest import (ANY_PORT, CLIENT_KEY, LIMITED_KEY, ROOT, auth, eventually,
                      gateway_process, in_background, key_line, listening_url, missing,
                      server_process)
from upstream import UPSTREAM_KEY, default_handler, stream_events, text_stream

LEASE = 3.0  # seconds: short, so that lapsed leases are seen within a test
TIMEOUT = RedisLimits.TIMEOUT  # what a call to a frozen Redis waits (a stall on a loaded
                               # machine is shorter than that, or it would fail the test)


def required_redis():
    found = shutil.which("redis-server") or shutil.which("redis-server", path="/usr/sbin")
    try:
        import redis  # noqa: F401
    except ImportError:
        found = None
    if found:
        return found
    missing("redis-server and redis-py are needed (apt install redis-server; the test extra)")


class RedisServer:
    """A real redis-server on a unix socket, with the faults the tests inject; also on a
    loopback port, which the gateway uses instead, with ``transport`` "tcp" or "tls" (a
    certificate from the trustme CA ``ca``)."""

    def __init__(self, directory, binary, appendonly=False, transport="unix", ca=None):
        self.directory = directory
        self.binary = binary
        self.appendonly = appendonly
        self.transport = transport
        self.socket = os.path.join(directory, "redis.sock")
        self.port = None  # tcp, tls: the one it listens on, kept across restarts
        self.tls_files = {name: os.path.join(directory, name + ".pem")
                          for name in ("ca", "cert", "key")}
        if transport == "tls":
            ca.cert_pem.write_to_path(self.tls_files["ca"])
            issued = ca.issue_cert("127.0.0.1")
            issued.cert_chain_pems[0].write_to_path(self.tls_files["cert"])
            issued.private_key_pem.write_to_path(self.tls_files["key"])
        self.process = None

    @property
    def url(self):
        if self.transport == "tcp":
            return "redis://127.0.0.1:%d/0" % self.port
        if self.transport == "tls":
            return "rediss://127.0.0.1:%d/0?ssl_ca_certs=%s" % (self.port, self.tls_files["ca"])
        return "unix://%s?db=0" % self.socket

    def start(self):
        """Start it, and wait until it answers. redis-server cannot listen on port 0 and say
        which port it got: on its first start on a port, it is given one the kernel just
        handed out, and started again on another if that was taken before it could bind."""
        for _ in range(5):
            first = self.transport != "unix" and self.port is None
            if first:
                with socket.socket() as probe:
                    probe.bind(("127.0.0.1", 0))
                    self.port = probe.getsockname()[1]
            if self._started():
                return self
            log = open(os.path.join(self.directory, "redis.log")).read()
            if not (first and "Address already in use" in log):
                raise AssertionError("redis-server did not start: %s" % log)
            self.port = None
        raise AssertionError("redis-server found no free port in 5 attempts")

    def _started(self):
        listen = {"unix": ["--port", "0"],  # no TCP port: the unix socket only
                  "tcp": ["--port", str(self.port)],
                  "tls": ["--port", "0", "--tls-port", str(self.port),
                          "--tls-cert-file", self.tls_files["cert"],
                          "--tls-key-file", self.tls_files["key"],
                          "--tls-ca-cert-file", self.tls_files["ca"],
                          "--tls-auth-clients", "no"]}[self.transport]
        command = [self.binary, *listen, "--bind", "127.0.0.1", "--unixsocket", self.socket,
                   "--dir", self.directory, "--save", "",
                   "--appendonly", "yes" if self.appendonly else "no",
                   "--maxmemory-policy", "noeviction"]
        self.log = open(os.path.join(self.directory, "redis.log"), "ab")
        self.process = subprocess.Popen(command, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 10
        while True:
            try:
                if self.client().ping():
                    return True
            except Exception:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    self.log.close()
                    return False
                time.sleep(0.02)

    def client(self):
        import redis
        return redis.Redis(unix_socket_path=self.socket, socket_timeout=2)

    def kill(self):
        self.process.kill()
        self.process.wait()
        self.log.close()

    def restart(self):
        self.kill()
        return self.start()

    def freeze(self):
        os.kill(self.process.pid, signal.SIGSTOP)

    def thaw(self):
        os.kill(self.process.pid, signal.SIGCONT)

    def stop(self):
        if self.process.poll() is None:
            self.thaw()
            self.kill()

    def everything(self):
        """Every key with its type, TTL in ms and contents, as bytes (for secrets and TTLs)."""
        client, found = self.client(), {}
        for key in client.scan_iter("*"):
            kind = client.type(key).decode()
            if kind == "none":  # gone since the scan (a finish call emptied it)
                continue
            value = {"string": lambda: client.get(key),
                     "zset": lambda: client.zrange(key, 0, -1, withscores=True),
                     "hash": lambda: client.hgetall(key)}[kind]()
            found[key] = (kind, client.pttl(key), repr(value).encode())
        return found


@pytest.fixture
def redis_server():
    binary = required_redis()
    directory = tempfile.mkdtemp(prefix="gw-redis-")  # short: a socket path has 107 bytes
    server = RedisServer(directory, binary).start()
    yield server
    server.stop()
    shutil.rmtree(directory, ignore_errors=True)


def redis_config(server, tmp_path, **settings):
    settings = dict({"limits_lease": LEASE}, **settings)
    return gateway.Config(limits_backend=server.url, state_file=str(tmp_path / "host.state"),
                          **settings)


def limits(server, tmp_path, **settings):
    config = redis_config(server, tmp_path, **settings)
    return RedisLimits(config, HostState(config.state_path), gateway.Deadlines())


def unreachable_logged(caplog, backend):
    """Whether ``backend`` logged its Redis unreachable. Not any such line: a backend of an
    earlier test, its Redis stopped and its directory gone, may still renew its slots from
    its own thread and log its own."""
    return "%s unreachable" % backend.where in caplog.text


def limited(name="k", **options):
    return KeyEntry(name, b"\0" * 32, **options)


def refused(backend, entry, holder, now=None):
    with pytest.raises(APIError) as error:
        backend.admit(entry, holder, time.time() if now is None else now)
    return error.value


# -- the scripts against one real Redis ---------------------------------------------------------

def test_same_refusals_in_the_same_order_as_sqlite(redis_server, tmp_path):
    """Both backends, same key, same sequence: the same statuses, messages and order."""
    shared = limits(redis_server, tmp_path)
    local = HostState(str(tmp_path / "other.state"))
    entry = limited(rpm=3, concurrency=2, tokens_per_day=50)
    for backend in (shared, local):
        now = time.time()
        backend.admit(entry, "a", now)
        backend.admit(entry, "b", now)
        over_concurrency = refused(backend, entry, "c", now)
        backend.finish(entry, "a", 0, now)  # Redis: sent by a background thread
        eventually(lambda: _admits(backend, entry, "c", now))
        backend.finish(entry, "c", 0, now)
        eventually(lambda: refused_with(backend, entry, "d", now, "per minute"))
        over_rpm = refused(backend, entry, "d", now)
        backend.finish(entry, "b", 60, now)
        eventually(lambda: refused_with(backend, entry, "e", now, "tokens"))
        over_tokens = refused(backend, entry, "e", now)
        assert [e.status for e in (over_concurrency, over_rpm, over_tokens)] == [429] * 3
        assert {e.error_type for e in (over_concurrency, over_rpm, over_tokens)} == {
            "rate_limit_error"}
        assert over_concurrency.message == "This key already has 2 requests in progress."
        assert dict(over_concurrency.headers)["retry-after"] == "1"
        assert over_rpm.message == "This key is limited to 3 requests per minute."
        assert 1 <= int(dict(over_rpm.headers)["retry-after"]) <= 60
        # over rpm and tokens now: the tokens are named first, with the wait until midnight
        assert over_tokens.message == "This key has used its 50 tokens for today (UTC)."
        midnight_wait = 86400 - now % 86400
        assert abs(int(dict(over_tokens.headers)["retry-after"]) - midnight_wait) <= 5


def _admits(backend, entry, holder, now):
    try:
        backend.admit(entry, holder, now)
        return True
    except APIError:
        return False


def refused_with(backend, entry, holder, now, word):
    try:
        backend.admit(entry, holder, now)
    except APIError as exc:
        return word in exc.message
    raise AssertionError("admitted")


def test_a_refusal_writes_nothing_and_every_key_has_a_ttl(redis_server, tmp_path):
    backend = limits(redis_server, tmp_path)
    entry = limited("alice", rpm=2, concurrency=5, tokens_per_day=1000)
    backend.admit(entry, "r1", time.time())
    backend.admit(entry, "r2", time.time())
    before = redis_server.everything()
    for number in range(5):
        refused(backend, entry, "refused-%d" % number)
    after = redis_server.everything()
    assert {key: (kind, value) for key, (kind, _, value) in after.items()} == {
        key: (kind, value) for key, (kind, _, value) in before.items()}
    backend.finish(entry, "r1", 17, time.time())
    backend.touch("alice", time.time())
    backend.renew()
    eventually(lambda: b"gateway:{alice}:tokens" in redis_server.everything())
    found = redis_server.everything()
    assert sorted(found) == [b"gateway:{alice}:hits", b"gateway:{alice}:last",
                             b"gateway:{alice}:slots", b"gateway:{alice}:tokens"]
    assert all(ttl > 0 for _, ttl, _ in found.values())  # -1 would be a key without TTL
    assert found[b"gateway:{alice}:slots"][1] <= (LEASE + 1) * 1000


def test_rpm_is_exact_under_threads_and_two_processes(redis_server, tmp_path):
    """Two clients (as two workers would be), 12 threads each, rpm = 7: exactly 7 pass."""
    entry = limited("burst", rpm=7)
    backends = [limits(redis_server, tmp_path), limits(redis_server, tmp_path)]
    results, start = [], threading.Barrier(24)

    def call(backend, number):
        start.wait(10)
        results.append(_admits(backend, entry, "h%d" % number, time.time()))
    threads = [threading.Thread(target=call, args=(backends[n % 2], n)) for n in range(24)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(20)
    assert sorted(results) == [False] * 17 + [True] * 7


def test_back_to_back_requests_see_the_tokens_and_the_slot_of_the_one_before(redis_server,
                                                                             tmp_path):
    """Each request ends (its finish call queued for the finisher) and the next is admitted
    at once, in the same process: the day's token count already holds the ended ones, and
    a key of one slot finds it free. Twenty keys, so that a race would show."""
    backend = limits(redis_server, tmp_path)
    for number in range(20):
        entry = limited("seq-%d" % number, concurrency=1, tokens_per_day=100)
        for holder in "abc":
            backend.admit(entry, holder, time.time())
            backend.finish(entry, holder, 40, time.time())
        assert "tokens" in refused(backend, entry, "d").message  # 120 of 100 spent
        slots_only = limited("slot-%d" % number, concurrency=1)
        for holder in "abc":
            backend.admit(slots_only, holder, time.time())
            backend.finish(slots_only, holder, 0, time.time())


def test_finishes_from_many_threads_free_every_slot_and_count_every_token(redis_server,
                                                                          tmp_path):
    """The finisher sends what it finds queued in one pipelined batch: 24 threads end their
    requests at once, and every slot is freed and every token counted, once."""
    backend = limits(redis_server, tmp_path)
    entry = limited("many", concurrency=24, tokens_per_day=10_000)
    for number in range(24):
        backend.admit(entry, "h%d" % number, time.time())
    start = threading.Barrier(24)

    def end(number):
        start.wait(10)
        backend.finish(entry, "h%d" % number, number + 1, time.time())
    for join in [in_background(end, n) for n in range(24)]:
        join()
    server = redis_server.client()
    eventually(lambda: server.zcard("gateway:{many}:slots") == 0)
    eventually(lambda: sum(map(int, server.hvals("gateway:{many}:tokens"))) == 24 * 25 // 2)
    backend.admit(entry, "after", time.time())  # and the key admits again
    assert backend._down_until is None


def test_finish_calls_go_together_and_at_once_for_an_admit_that_waits(redis_server, tmp_path):
    """The finisher waits FINISH_DELAY after a first finish call for others to go with it
    (so under load it wakes once for many, not once each); an admit that waits for its
    key's finish calls (tokens_per_day here) has them sent at once, all in one call."""
    backend = limits(redis_server, tmp_path)
    backend.FINISH_DELAY = 60  # before the first call makes the finisher's queue
    entry = limited("together", concurrency=3, tokens_per_day=1000)
    for holder in "abc":
        backend.admit(entry, holder, time.time())
    batches, finish_all = [], backend._finishing._run
    backend._finishing._run = lambda finishes: (batches.append(len(finishes)),
                                                finish_all(finishes))
    for holder in "abc":
        backend.finish(entry, holder, 10, time.time())
    server = redis_server.client()
    # A finisher that sent each call at once would have sent them within this wait.
    time.sleep(0.3)
    assert server.zcard("gateway:{together}:slots") == 3  # within the delay: none sent yet
    backend.admit(entry, "d", time.time())
    assert batches == [3]
    assert sum(map(int, server.hvals("gateway:{together}:tokens"))) == 30
    assert server.zrange("gateway:{together}:slots", 0, -1) == [b"d"]


def test_a_slot_another_worker_is_freeing_is_waited_for_not_refused(redis_server, tmp_path):
    """A client's next request reaches another worker (behind nginx's shared pool of
    connections, or on a new connection) before the first worker's finisher has freed the
    last one's slot: the refusal is asked again once the other's FINISH_DELAY is over, and
    the request admitted. A key whose slot is really held is still refused, once, after
    that wait."""
    first, other = limits(redis_server, tmp_path), limits(redis_server, tmp_path)
    for backend in (first, other):
        backend.FINISH_DELAY = 0.3  # before the first call makes the finisher's queue
    entry = limited("moved", concurrency=1)
    first.admit(entry, "last", time.time())
    first.finish(entry, "last", 0, time.time())  # its release waits up to 0.3 s
    server = redis_server.client()
    assert server.zscore("gateway:{moved}:slots", "last") is not None
    other.admit(entry, "next", time.time())
    assert server.zrange("gateway:{moved}:slots", 0, -1) == [b"next"]
    started = time.monotonic()
    assert "in progress" in refused(first, entry, "while next runs").message
    assert time.monotonic() - started >= 2 * 0.3  # asked again after the wait
    assert server.zrange("gateway:{moved}:slots", 0, -1) == [b"next"]


def test_a_live_slot_outlives_many_leases_and_frees_at_once(redis_server, tmp_path):
    holder, other = limits(redis_server, tmp_path), limits(redis_server, tmp_path)
    entry = limited("long", concurrency=1)
    holder.admit(entry, "stream", time.time())
    holder_renewed = time.monotonic() + 3.5 * LEASE  # renewed every LEASE/3 meanwhile
    while time.monotonic() < holder_renewed:
        assert "in progress" in refused(other, entry, "x").message
        time.sleep(LEASE / 2)
    holder.finish(entry, "stream", 0, time.time())
    eventually(lambda: _admits(other, entry, "y", time.time()), timeout=2)


def test_a_dead_process_frees_its_slots_within_the_lease(redis_server, tmp_path):
    """A process admits two requests and dies by SIGKILL: refused while its leases run, then
    free within the lease, with no release ever sent."""
    entry = limited("crash", concurrency=2)
    script = (
        "import os, signal, sys, time\nsys.path.insert(0, %r)\nimport gateway\n"
        "config = gateway.Config(limits_backend=%r, limits_lease=%r, state_file=%r)\n"
        "backend = gateway.RedisLimits(config, None, gateway.Deadlines())\n"
        "entry = gateway.KeyEntry('crash', b'\\0' * 32, concurrency=2)\n"
        "backend.admit(entry, 'one', time.time()); backend.admit(entry, 'two', time.time())\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
        % (os.path.dirname(gateway.__file__), redis_server.url, LEASE,
           str(tmp_path / "dead.state")))
    subprocess.run([sys.executable, "-c", script], timeout=30)
    died = time.monotonic()
    survivor = limits(redis_server, tmp_path)
    assert "in progress" in refused(survivor, entry, "a").message
    eventually(lambda: _admits(survivor, entry, "a", time.time()), timeout=LEASE + 2)
    assert time.monotonic() - died <= LEASE + 1.5


def test_a_redis_restarted_empty_gets_the_live_slots_back_within_a_lease(redis_server,
                                                                         tmp_path):
    holder, other = limits(redis_server, tmp_path), limits(redis_server, tmp_path)
    entry = limited("restart", concurrency=1)
    holder.admit(entry, "stream", time.time())
    redis_server.restart()  # empty: no persistence in this server
    # The next renewal (every LEASE/3) puts the live slot back: refused again from then on.
    # (A renewal that hit the restart itself opens the breaker: BREAKER_SECONDS more.)
    eventually(lambda: redis_server.client().exists("gateway:{restart}:slots"),
               timeout=LEASE + holder.BREAKER_SECONDS)
    assert "in progress" in refused(other, entry, "x").message
    holder.finish(entry, "stream", 0, time.time())
    eventually(lambda: _admits(other, entry, "y", time.time()), timeout=LEASE)


def test_the_first_renewal_after_redis_lost_its_scripts_renews(redis_server, tmp_path):
    # A Redis restarted empty has no scripts; SCRIPT FLUSH is the same for this purpose. A
    # redis-py pipeline empties itself when it runs, so a renewal that met NOSCRIPT and only
    # then loaded the script would renew nothing in that round.
    holder = limits(redis_server, tmp_path)
    entry = limited("flushed", concurrency=1)
    holder.admit(entry, "stream", time.time())
    holder.touch("flushed", time.time())
    server = redis_server.client()
    server.script_flush()
    server.delete("gateway:{flushed}:slots")
    holder.renew()
    assert server.zscore("gateway:{flushed}:slots", "stream") is not None
    assert server.get("gateway:{flushed}:last") is not None



def test_admit_and_finish_after_redis_lost_its_scripts(redis_server, tmp_path):
    """A Redis restarted empty answers NOSCRIPT to the first EVALSHA of each script: the
    call sends the script's text instead and counts as usual, with the breaker closed."""
    backend = limits(redis_server, tmp_path)
    entry = limited("lost", concurrency=1, tokens_per_day=100)
    backend.admit(entry, "first", time.time())  # the scripts are loaded now
    server = redis_server.client()
    server.script_flush()
    refused(backend, entry, "second")  # Redis ran the admit: the one slot is taken
    server.script_flush()
    backend.finish(entry, "first", 40, time.time())
    eventually(lambda: sum(map(int, server.hvals("gateway:{lost}:tokens"))) == 40)
    assert server.zcard("gateway:{lost}:slots") == 0
    assert backend._down_until is None


def test_last_use_is_the_latest_whichever_host_writes_last(redis_server, tmp_path):
    """Each process writes the last uses it noted with its next renewal: a host that noted
    an older use may write after one that noted a later use. The later use stays."""
    early, late = limits(redis_server, tmp_path), limits(redis_server, tmp_path)
    late.touch("k", 2000000000.0)
    late.renew()
    early.touch("k", 1900000000.0)
    early.renew()
    assert late.last_use(["k"]) == {"k": 2000000000.0}
    assert 0 < redis_server.client().ttl("gateway:{k}:last") <= RedisLimits.LAST_USE_TTL

@pytest.mark.parametrize("policy", ["local", "open", "closed"])
def test_while_redis_is_down_the_policy_decides_and_says_so_once(redis_server, tmp_path,
                                                                 caplog, policy):
    backend = limits(redis_server, tmp_path, limits_backend_down=policy)
    entry = limited("down", rpm=2)
    backend.admit(entry, "before", time.time())
    redis_server.kill()
    outcomes = []
    for number in range(4):
        started = time.monotonic()
        try:
            backend.admit(entry, "while-%d" % number, time.time())
            outcomes.append(200)
        except APIError as exc:
            outcomes.append(exc.status)
            if exc.status == 503:
                assert exc.error_type == "api_error" and dict(exc.headers)["retry-after"]
        assert time.monotonic() - started < 1.0
    assert outcomes == {"local": [200, 200, 429, 429],  # rpm=2 on this host's own file
                        "open": [200] * 4, "closed": [503] * 4}[policy]
    assert backend._away == set()  # rpm only: no finish call will come, so nothing is kept
    errors = [r for r in caplog.records if "unreachable" in r.getMessage()]
    assert len(errors) == 1 and "redis.sock" in errors[0].getMessage()
    redis_server.start()
    time.sleep(backend.BREAKER_SECONDS)  # the breaker lets a probe through only after this
    backend.admit(limited("fresh", rpm=5), "after", time.time())
    assert "answers again" in caplog.text


def test_an_answer_to_a_call_begun_before_an_outage_keeps_the_breaker_open(redis_server,
                                                                          tmp_path, caplog):
    backend = limits(redis_server, tmp_path)
    before = time.monotonic()
    backend._failed(ConnectionError("gone"))  # another thread's call found Redis gone
    backend._answered(before)  # this thread's call, sent earlier, had its answer
    assert not backend._should_try()
    assert "answers again" not in caplog.text
    backend._answered(time.monotonic())  # a call begun since: Redis is back
    assert backend._should_try() and "answers again" in caplog.text


def script_connection(sock):
    """A redis-py connection (for its reply parser's error classes) on ``sock``, one end of
    a socket pair: what RedisLimits sends and reads on it, byte for byte."""
    connection = pytest.importorskip("redis").Connection()
    connection._sock = sock
    return connection


def read_timing_out(connection, exceptions):
    """The error of a read on ``connection`` that nothing answers: a TimeoutError, never
    taken for a connection Redis closed (a timed-out call is never sent again)."""
    with pytest.raises(exceptions.TimeoutError) as timed_out:
        gateway._read_replies(connection, 1, exceptions)
    assert not gateway._closed_by_redis(timed_out.value)
    return timed_out.value


def test_a_connection_closed_is_told_from_a_timeout():
    # A call on a reused connection that Redis closed is sent again; a timed-out one never
    # is (a frozen Redis must cost one timeout). Each failure, as _send_commands and
    # _ScriptReplies raise it on a blocking socket with the kernel's timeouts.
    exceptions = pytest.importorskip("redis").exceptions
    ours, theirs = socket.socketpair()
    gateway._kernel_timeouts(ours, 0.05)
    connection = script_connection(ours)
    read_timing_out(connection, exceptions)
    theirs.close()
    with pytest.raises(exceptions.ConnectionError) as ended:  # the end of the stream
        gateway._read_replies(connection, 1, exceptions)
    assert gateway._closed_by_redis(ended.value)
    with pytest.raises(exceptions.ConnectionError) as broken:  # EPIPE
        gateway._send_commands(connection, "EVALSHA", "0" * 40, [(["k"], [1])], exceptions)
    assert isinstance(broken.value.__cause__, BrokenPipeError)
    assert gateway._closed_by_redis(broken.value)
    ours.close()


def test_a_python_timeout_is_a_timeout_too():
    # TLS and gevent sockets keep Python's timeouts (ScriptConnections): socket.timeout, not
    # the kernel's EAGAIN, must be a TimeoutError too, never taken for a closed connection.
    exceptions = pytest.importorskip("redis").exceptions
    ours, theirs = socket.socketpair()
    ours.settimeout(0.05)
    timed_out = read_timing_out(script_connection(ours), exceptions)
    assert isinstance(timed_out.__cause__, socket.timeout)
    ours.close()
    theirs.close()


def test_a_connection_reset_is_told_as_closed():
    exceptions = pytest.importorskip("redis").exceptions
    with socket.create_server(("127.0.0.1", 0)) as server:
        ours = socket.create_connection(server.getsockname(), timeout=5)  # no hang
        theirs, _ = server.accept()
    theirs.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    theirs.close()  # with a zero linger: a reset, not an end of stream
    with pytest.raises(exceptions.ConnectionError) as reset:
        gateway._read_replies(script_connection(ours), 1, exceptions)
    assert isinstance(reset.value.__cause__, ConnectionResetError)
    assert gateway._closed_by_redis(reset.value)
    ours.close()


def test_script_replies_are_read_whole_however_they_arrive():
    exceptions = pytest.importorskip("redis").exceptions
    ours, theirs = socket.socketpair()
    ours.settimeout(5)  # a regression fails instead of hanging
    connection = script_connection(ours)

    def dribble(data):  # one byte at a time: every reply split across receives
        for byte in data:
            theirs.sendall(bytes([byte]))
            time.sleep(0.001)

    writer = threading.Thread(target=dribble, args=(b"*2\r\n:0\r\n:-12\r\n:7\r\n",))
    writer.start()
    assert gateway._read_replies(connection, 2, exceptions) == [[0, -12], 7]
    writer.join()
    # An error reply takes its call's place, as redis-py's parser classes it, and the next
    # reply is still read: none is left on the connection for the next call.
    theirs.sendall(b"-NOSCRIPT No matching script. Please use EVAL.\r\n:0\r\n")
    lost, finished = gateway._read_replies(connection, 2, exceptions)
    assert isinstance(lost, exceptions.NoScriptError) and finished == 0
    theirs.sendall(b"-ERR user_script:3: oops\r\n")
    error, = gateway._read_replies(connection, 1, exceptions)
    assert type(error) is exceptions.ResponseError and "oops" in str(error)
    theirs.sendall(b"-LOADING Redis is loading the dataset in memory\r\n")
    with pytest.raises(exceptions.BusyLoadingError):  # a ConnectionError: Redis is away
        gateway._read_replies(connection, 1, exceptions)
    # A RESP3 push (redis-py 8 talks RESP3, and asks for maintenance notifications) before,
    # inside and after the replies is no reply: skipped, split across receives or not.
    writer = threading.Thread(target=dribble, args=(
        b">4\r\n$6\r\nMOVING\r\n:1\r\n:15\r\n$13\r\n10.0.0.1:6379\r\n*2\r\n:0\r\n"
        b">2\r\n$9\r\nMIGRATING\r\n%1\r\n+a\r\n_\r\n:3\r\n:9\r\n>1\r\n$-1\r\n",))
    writer.start()
    assert gateway._read_replies(connection, 2, exceptions) == [[0, 3], 9]
    writer.join()
    theirs.sendall(b":1\r\n>1\r\n+MIGRATED\r\n")
    assert gateway._read_replies(connection, 1, exceptions) == [1]
    for unexpected in (b"+OK\r\n", b":1\r\n:2\r\n",  # not a script's, or one too many
                       b":1x\r\n", b"*two\r\n"):  # not a number: a RedisError, not a 500
        theirs.sendall(unexpected)
        with pytest.raises(exceptions.InvalidResponse):
            gateway._read_replies(connection, 1, exceptions)
    ours.close()
    theirs.close()


def test_commands_are_sent_as_redis_protocol_arrays():
    exceptions = pytest.importorskip("redis").exceptions
    ours, theirs = socket.socketpair()
    gateway._send_commands(script_connection(ours), "EVALSHA", "ab", [
        (["gateway:{n\u00e9}:slots"], ["req_1", 0]), ([], [60000])], exceptions)
    ours.close()
    received = b""
    while chunk := theirs.recv(4096):
        received += chunk
    assert received == (b"*6\r\n$7\r\nEVALSHA\r\n$2\r\nab\r\n$1\r\n1\r\n"
                        b"$19\r\ngateway:{n\xc3\xa9}:slots\r\n$5\r\nreq_1\r\n$1\r\n0\r\n"
                        b"*4\r\n$7\r\nEVALSHA\r\n$2\r\nab\r\n$1\r\n0\r\n$5\r\n60000\r\n")
    theirs.close()


def test_an_admit_polls_for_its_answer_only_within_its_window(redis_server, tmp_path):
    """_await_admit polls until the answer is there or the window (ADMIT_POLL after the call
    was sent) is over; never while admit calls take longer than the window on average, nor
    while another request polls. A window of a fifth of a second makes each case plain."""
    backend = limits(redis_server, tmp_path)
    backend.client()
    ours, theirs = socket.socketpair()
    ours.settimeout(None)  # blocking, as _kernel_timeouts leaves the admit connections

    def waited(window=0.2):
        started = time.monotonic()
        backend._await_admit(ours, started + window - backend.ADMIT_POLL)
        return time.monotonic() - started

    late = threading.Timer(1, theirs.sendall, [b":1\r\n"])  # a poll without end ends
    late.start()
    try:
        assert 0.18 <= waited() < 0.9  # nothing came: polled the window through, no longer
    finally:
        late.join()
    assert ours.recv(64) == b":1\r\n"
    soon = threading.Timer(0.1, theirs.sendall, [b":0\r\n"])
    soon.start()
    try:
        assert 0.05 <= waited(window=30) < 10  # polled until it came, and took nothing
    finally:
        soon.join()
    assert ours.recv(64) == b":0\r\n"
    with backend._polling:  # another request polls
        assert waited() < 0.1
    backend._admit_seconds = 2 * backend.ADMIT_POLL  # answers come later than the window
    assert waited() < 0.1
    ours.close()
    theirs.close()


def test_polling_leaves_a_socket_error_for_the_read():
    """A reset that comes while the request polls is raised by the read as a reset (poll(2)
    leaves the socket's error; a receive, even one that peeks, would take it, and the read
    would find only the end of the stream)."""
    exceptions = pytest.importorskip("redis").exceptions
    backend = types.SimpleNamespace(_admit_seconds=0.0, _polling=threading.Lock(),
                                    ADMIT_POLL=RedisLimits.ADMIT_POLL)
    with socket.create_server(("127.0.0.1", 0)) as listener:
        ours = socket.create_connection(listener.getsockname())
        theirs, _ = listener.accept()
    theirs.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    theirs.close()  # a reset
    time.sleep(0.05)
    ours.settimeout(None)
    RedisLimits._await_admit(backend, ours, time.monotonic())
    with pytest.raises(exceptions.ConnectionError) as reset:
        gateway._read_replies(script_connection(ours), 1, exceptions)
    assert isinstance(reset.value.__cause__, ConnectionResetError)
    ours.close()


def test_an_admit_waiting_on_a_frozen_redis_polls_only_briefly(redis_server, tmp_path):
    """A request that polls spends its CPU: at most the window's worth, then it sleeps in
    the read until the answer or the timeout."""
    backend = limits(redis_server, tmp_path)
    entry = limited("frozen-poll", rpm=100)
    backend.admit(entry, "warm", time.time())
    backend._admit_seconds = 0.0  # polls, however long the warm call took
    redis_server.freeze()
    thawed = threading.Timer(1, redis_server.thaw)  # a poll without end ends
    thawed.start()
    try:
        started = time.thread_time()
        backend.admit(entry, "while-frozen", time.time())  # times out: admitted locally
        assert time.thread_time() - started < TIMEOUT / 5
    finally:
        thawed.join()


def test_a_frozen_redis_costs_a_request_at_most_a_quarter_second(redis_server, tmp_path):
    backend = limits(redis_server, tmp_path)
    entry = limited("frozen", rpm=100, concurrency=100)
    backend.admit(entry, "warm", time.time())
    redis_server.freeze()
    try:
        waits = []
        for number in range(20):
            started = time.monotonic()
            backend.admit(entry, "while-%d" % number, time.time())
            waits.append(time.monotonic() - started)
        # one call (or the renewal) waits out the timeout, then the breaker skips Redis; a
        # timed-out call is never sent again (that would take two timeouts and more)
        assert max(waits) < 2 * TIMEOUT and sum(w >= TIMEOUT for w in waits) <= 1
    finally:
        redis_server.thaw()


def test_the_admit_connections_block_with_the_kernels_timeout(redis_server, tmp_path):
    """One system call to send an admit call and one to read its answer (ScriptConnections):
    the socket blocks, and the kernel times its reads and writes out after 0.25 s."""
    backend = limits(redis_server, tmp_path)
    backend.admit(limited("k", rpm=5), "one", time.time())
    connection, = backend._admit_connections._idle
    assert_kernel_timeouts(connection._sock)


def test_script_connections_are_bounded_and_a_caller_waits_for_one_given_back(redis_server,
                                                                            tmp_path):
    """At most POOL_SIZE admit connections per process: a caller that finds them all taken
    waits for one to be given back, up to the timeout, then fails as redis-py's
    BlockingConnectionPool does (a Redis error: the breaker and limits_backend_down). One
    dropped (a call on it failed) is connected anew when taken again, not one more."""
    backend = limits(redis_server, tmp_path)
    backend.client()
    connections, size = backend._admit_connections, RedisLimits.POOL_SIZE
    taken = [connections.take()[0] for _ in range(size)]
    assert len(set(map(id, taken))) == size
    started = time.monotonic()
    with pytest.raises(backend._redis_module.ConnectionError, match="No connection"):
        connections.take()
    assert TIMEOUT - 0.01 <= time.monotonic() - started < TIMEOUT + 2
    connections._timeout = 30  # the waiter below: long enough for any stall of the machine
    waiter = in_background(connections.take)
    eventually(lambda: connections._waiting == 1)
    connections.give_back(taken[0])
    assert waiter() == (taken[0], True)
    connections.drop(taken[0])
    assert connections.take() == (taken[0], False)  # connected anew
    for connection in taken:
        connections.give_back(connection)
    assert len(redis_server.client().client_list()) == size + 1  # and the test's own


def test_the_admit_call_is_packed_as_redis_py_would_pack_its_keys_and_args(redis_server,
                                                                           tmp_path):
    """The admit call is sent from a head packed once per key (_admit_command): the same
    bytes as the whole call packed item by item, for any name the key file allows."""
    backend = limits(redis_server, tmp_path)
    backend.client()
    for entry in (limited("bench"), limited("équipe-東京-🚀", rpm=7, concurrency=3,
                                            tokens_per_day=1_000_000)):
        for holder in ("req_gw_0123456789abcdef01234567", "another"):
            keys, args = backend._admit_call(entry, holder)
            assert backend._admit_command(entry, holder) == gateway._resp_command(
                ("EVALSHA", backend._scripts.admit.sha, len(keys), *keys, *args))


def test_a_key_whose_limits_change_is_admitted_by_its_new_limits(redis_server, tmp_path):
    """The admit call is packed from a head made once per key and its limits: a key file
    reloaded with another rpm is counted by the new one at once."""
    backend = limits(redis_server, tmp_path)
    backend.admit(limited("changed", rpm=1), "first", time.time())
    assert "per minute" in refused(backend, limited("changed", rpm=1), "second").message
    backend.admit(limited("changed", rpm=2), "second", time.time())
    assert "per minute" in refused(backend, limited("changed", rpm=2), "third").message


def test_the_finish_connections_block_with_the_kernels_timeout(redis_server, tmp_path):
    """The finish calls have connections of their own too, made the same way (one system
    call to check one, one to send, one to read), not redis-py's pool's."""
    backend = limits(redis_server, tmp_path)
    entry = limited("k", concurrency=5)
    backend.admit(entry, "one", time.time())
    backend.finish(entry, "one", 0, time.time())
    eventually(lambda: not backend._finishing.pending("k"))
    connection, = backend._finish_connections._idle
    assert_kernel_timeouts(connection._sock)
    assert redis_server.client().zcard("gateway:{k}:slots") == 0


def assert_kernel_timeouts(sock):
    assert sock.gettimeout() is None  # blocking: no poll before each send and receive
    for option in (socket.SO_RCVTIMEO, socket.SO_SNDTIMEO):
        seconds, microseconds = struct.unpack("@ll", sock.getsockopt(
            socket.SOL_SOCKET, option, struct.calcsize("@ll")))
        assert abs(seconds + microseconds / 1e6 - TIMEOUT) < 0.01  # in the kernel's ticks


def test_under_gevent_the_admit_and_finish_connections_keep_their_own_timeouts(redis_server):
    """A blocking gevent socket would wait in gevent's loop with no bound: under gevent
    (deploy/gunicorn-gevent.conf.py) the sockets keep their timeouts, and an admit call to a
    frozen Redis still fails after 0.25 s."""
    pytest.importorskip("gevent")
    program = (
        "from gevent import monkey; monkey.patch_all()\n"
        "import sys, time, gateway\n"
        "config = gateway.Config(limits_backend=sys.argv[1], state_file=sys.argv[2])\n"
        "backend = gateway.RedisLimits(config, gateway.HostState(config.state_path),\n"
        "                              gateway.Deadlines())\n"
        "entry = gateway.KeyEntry('k', bytes(32), rpm=5, concurrency=5)\n"
        "backend.admit(entry, 'one', time.time())\n"
        "backend.finish(entry, 'one', 0, time.time())\n"
        "backend._finishing.wait_for('k', 5)\n"
        "for connections in (backend._admit_connections, backend._finish_connections):\n"
        "    connection, = connections._idle\n"
        "    print(connection._sock.gettimeout(), type(connection._sock).__module__)\n")
    with tempfile.TemporaryDirectory() as directory:
        result = subprocess.run(
            [sys.executable, "-c", program, redis_server.url,
             os.path.join(directory, "host.state")], capture_output=True, text=True,
            timeout=60, cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT))
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [str(TIMEOUT), "gevent._socket3"] * 2


@contextlib.contextmanager
def redis_on(transport):
    """A redis-server of its own on ``transport`` (unix, tcp or tls: trustme's CA), stopped
    and its directory removed after."""
    ca = pytest.importorskip("trustme").CA() if transport == "tls" else None
    directory = tempfile.mkdtemp(prefix="gw-redis-")
    server = RedisServer(directory, required_redis(), transport=transport, ca=ca).start()
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(directory, ignore_errors=True)


@pytest.mark.parametrize("transport", ["unix", "tcp", "tls"])
def test_a_connection_redis_closed_while_idle_is_made_again_not_a_failure(tmp_path, caplog,
                                                                          transport):
    """Redis closes connections idle longer than its ``timeout`` setting (as a proxy may, or
    a restart does). The admit connections are not checked before each call (redis-py's
    pool checks, at three system calls a call): the call that finds its connection closed is
    sent again on a new one, and the request is counted in Redis, with no breaker opened and
    nothing logged."""
    with redis_on(transport) as server:
        backend = limits(server, tmp_path, limits_lease=60)  # no renewal in the meantime
        entry = limited("idle", rpm=5, concurrency=5)
        backend.admit(entry, "before", time.time())
        control = server.client()
        control.config_set("timeout", 1)
        # Until Redis has closed the gateway's connection (it checks idle ones every second)
        eventually(lambda: len(control.client_list()) == 1)
        backend.admit(entry, "after", time.time())
        assert control.zscore("gateway:{idle}:hits", "after") is not None  # counted in Redis
        assert control.zscore("gateway:{idle}:slots", "after") is not None
        assert backend._down_until is None and not unreachable_logged(caplog, backend)
        assert backend.local.last_use() == {}  # nothing admitted on this host's own file


@pytest.mark.parametrize("transport", ["unix", "tcp", "tls"])
def test_a_finish_connection_redis_closed_while_idle_is_made_again_before_the_call(
        tmp_path, caplog, transport):
    """The finish call is never sent twice (its HINCRBY would count the tokens twice): its
    connection is checked before the call is sent (ScriptConnections.take_checked), and one
    that Redis closed while idle is made again first. The slot is freed and the tokens are
    counted once, with no breaker opened and nothing logged."""
    with redis_on(transport) as server:
        backend = limits(server, tmp_path, limits_lease=60)  # no renewal in the meantime
        entry = limited("idle", concurrency=5, tokens_per_day=1000)
        for holder in ("before", "after"):
            backend.admit(entry, holder, time.time())
        backend.finish(entry, "before", 10, time.time())
        eventually(lambda: not backend._finishing.pending("idle"))
        control = server.client()
        control.config_set("timeout", 1)
        # Until Redis has closed the gateway's connections (it checks idle ones every second)
        eventually(lambda: len(control.client_list()) == 1)
        backend.finish(entry, "after", 30, time.time())
        eventually(lambda: not backend._finishing.pending("idle"))
        assert sum(map(int, control.hvals("gateway:{idle}:tokens"))) == 40
        assert control.zcard("gateway:{idle}:slots") == 0
        assert backend._down_until is None and not unreachable_logged(caplog, backend)
        assert backend._loose == {}


def test_a_finish_connection_with_a_reply_left_unread_is_made_again(redis_server, tmp_path,
                                                                     caplog):
    """A finish connection with data unread on it (a reply that is not the next call's) is
    made again before the call, so the call never reads that reply as its own."""
    backend = limits(redis_server, tmp_path)
    entry = limited("unread", concurrency=5, tokens_per_day=1000)
    for holder in ("first", "second"):
        backend.admit(entry, holder, time.time())
    backend.finish(entry, "first", 10, time.time())
    eventually(lambda: not backend._finishing.pending("unread"))
    connection, = backend._finish_connections._idle
    connection.send_command("NO-SUCH-COMMAND")  # its error reply is left on the connection
    eventually(lambda: select.select([connection._sock], [], [], 0)[0])
    backend.finish(entry, "second", 30, time.time())
    eventually(lambda: not backend._finishing.pending("unread"))
    server = redis_server.client()
    assert sum(map(int, server.hvals("gateway:{unread}:tokens"))) == 40
    assert server.zcard("gateway:{unread}:slots") == 0
    assert backend._down_until is None and not unreachable_logged(caplog, backend)


def test_the_admit_and_finish_connections_work_with_a_redis_py_before_8(redis_server,
                                                                         tmp_path, caplog):
    """redis-py's connections have ``is_connected`` only from redis-py 8, and setup.cfg
    allows earlier ones (CI runs this module with the oldest too): ScriptConnections tells a
    connected one by its socket, so that every limited request is not an AttributeError
    there."""
    redis = pytest.importorskip("redis")

    class BeforeRedisPy8(redis.UnixDomainSocketConnection):
        @property
        def is_connected(self):
            raise AttributeError("'UnixDomainSocketConnection' object has no attribute "
                                 "'is_connected'")

    backend = limits(redis_server, tmp_path)
    backend.client()
    for connections in (backend._admit_connections, backend._finish_connections):
        connections._pool.connection_class = BeforeRedisPy8
    entry = limited("old", rpm=5, concurrency=5)
    for holder in ("first", "second"):  # the second on the connections the first made
        backend.admit(entry, holder, time.time())
        backend.finish(entry, holder, 0, time.time())
        eventually(lambda: not backend._finishing.pending("old"))
    assert isinstance(backend._admit_connections._idle[0], BeforeRedisPy8)
    server = redis_server.client()
    assert server.zcard("gateway:{old}:hits") == 2 and server.zcard("gateway:{old}:slots") == 0
    assert backend._down_until is None and not unreachable_logged(caplog, backend)


def test_a_restarted_redis_admits_the_next_request_without_the_breaker(redis_server,
                                                                        tmp_path, caplog):
    """A restart closes every pooled connection: the next call on each finds it closed, is
    sent again on a new connection and, the scripts gone with the restart, sent as EVAL."""
    backend = limits(redis_server, tmp_path)
    entry = limited("restart", rpm=5, concurrency=5)
    for number in range(3):
        backend.admit(entry, "before-%d" % number, time.time())
    redis_server.restart()
    backend.admit(entry, "after", time.time())
    server = redis_server.client()
    assert server.zrange("gateway:{restart}:slots", 0, -1) == [b"after"]
    assert backend._down_until is None and not unreachable_logged(caplog, backend)


def test_an_admit_sent_again_for_the_same_request_admits_it_once(redis_server, tmp_path):
    """An admit call sent again (its connection found closed) may meet its own first run, if
    Redis ran it before the connection closed. At the limit, the holder's own slot and hit
    must not refuse it, nor be counted twice."""
    backend = limits(redis_server, tmp_path)
    entry = limited("again", rpm=1, concurrency=1)
    now = time.time()
    backend.admit(entry, "the-request", now)
    backend.admit(entry, "the-request", now)  # the same request again: admitted
    server = redis_server.client()
    assert server.zcard("gateway:{again}:hits") == 1
    assert server.zcard("gateway:{again}:slots") == 1
    assert refused_with(backend, entry, "another", now, "in progress")
    roomy = limited("again-roomy", rpm=5, concurrency=5)  # below the limits
    backend.admit(roomy, "the-request", time.time())
    first = [server.zrange("gateway:{again-roomy}:" + kind, 0, -1, withscores=True)
             for kind in ("hits", "slots")]
    time.sleep(0.01)
    backend.admit(roomy, "the-request", time.time())  # the first run's hit and slot stay
    assert [server.zrange("gateway:{again-roomy}:" + kind, 0, -1, withscores=True)
            for kind in ("hits", "slots")] == first
    assert [len(members) for members in first] == [1, 1]


def test_a_key_of_one_slot_used_back_to_back_is_never_refused(redis_server, config_dir):
    # A script or an agent's loop sends its next request as soon as it has read the answer.
    # The slot must be free by then. It is released by this process's finisher thread as
    # the response is closed, and the next admit of the key waits for that call: without
    # the wait, about 40 % of such requests were refused here.
    keys = (config_dir / "gateway.keys").read_text()
    (config_dir / "gateway.keys").write_text(keys.replace(
        "claude-opus-4-7 enabled", "claude-opus-4-7 enabled concurrency=1", 1))
    config = dataclasses.replace(gateway.Config.from_file(str(config_dir / "gateway.ini")),
                                 limits_backend=redis_server.url, limits_lease=LEASE)
    client = webtest.TestApp(gateway.make_app(config))
    message = {"model": "claude-opus-4-7", "max_tokens": 5,
               "messages": [{"role": "user", "content": "hi"}]}
    statuses = [client.post_json("/v1/messages", message, headers=auth(LIMITED_KEY),
                                 expect_errors=True).status_int for _ in range(200)]
    assert statuses == [200] * 200


def test_no_client_key_or_upstream_key_in_redis(redis_server, config_dir):
    keys = (config_dir / "gateway.keys").read_text()
    (config_dir / "gateway.keys").write_text(keys.replace(
        "claude-opus-4-7 enabled", "claude-opus-4-7 enabled rpm=5 concurrency=2 "
        "tokens_per_day=100000", 1))
    config = dataclasses.replace(gateway.Config.from_file(str(config_dir / "gateway.ini")),
                                 limits_backend=redis_server.url, limits_lease=LEASE)
    app = gateway.make_app(config)
    client = webtest.TestApp(app)
    message = {"model": "claude-opus-4-7", "max_tokens": 5,
               "messages": [{"role": "user", "content": "hi"}]}
    for key in (LIMITED_KEY, CLIENT_KEY):
        client.post_json("/v1/messages", message, headers=auth(key))
    app.limits.renew()
    eventually(lambda: b"gateway:{bob}:tokens" in redis_server.everything())
    stored = b"".join(key + value for key, (_, _, value) in redis_server.everything().items())
    for secret in (CLIENT_KEY, LIMITED_KEY, UPSTREAM_KEY, gateway.digest_key(LIMITED_KEY).hex(),
                   gateway.digest_key(CLIENT_KEY).hex()):
        assert secret.encode() not in stored
    assert b"gateway:{alice}:last" in stored  # last use of the unlimited key, too


def test_config_checks_the_url_and_never_repeats_a_password():
    parse = gateway._parse_limits_backend
    for good in ("redis://localhost:6379/0", "rediss://:pw@cache.internal:6380/2",
                 "unix:///run/redis/redis.sock?db=3"):
        assert parse(good) == good
    for bad in ("localhost:6379", "http://x", "redis://", "unix://", "redis://h:port/0"):
        with pytest.raises(ValueError) as error:
            parse(bad)
        assert "expected" in str(error.value) or "port" in str(error.value)
    assert gateway.redacted_url("rediss://user:s3cret@cache:6380/2") == "rediss://cache:6380/2"
    assert gateway.redacted_url("unix:///run/r.sock?db=3&password=s3cret") == \
        "unix:///run/r.sock?db=3"
    with pytest.raises(ValueError):
        gateway.Config._with_environ({"limits_backend_down": "maybe"}, {}, "/", {})
    with pytest.raises(ValueError, match="at least 1"):
        gateway.Config._with_environ({"limits_lease": "0.5"}, {}, "/", {})



@pytest.mark.parametrize("url", ["unix://:s3cret@/run/redis.sock?db=abc",
                                 "redis://:s3cret@localhost:6379/0?socket_timeout=soon",
                                 "rediss://:s3cret@localhost:6379/0?colour=blue"])
def test_an_option_redis_py_refuses_fails_the_check_not_every_request(url):
    """redis-py reads these only when it connects: a worker would answer every request (each
    notes its key's last use) with a 500. make_app refuses the config instead, so 'gateway
    check' and a HUP say so first; the message never repeats the password."""
    pytest.importorskip("redis")
    config = gateway.Config._with_environ({"limits_backend": url}, {}, "/", {})
    problem = gateway.boot_problem(config)
    assert problem and problem.startswith("setting limits_backend: ")
    assert "s3cret" not in problem


@pytest.mark.parametrize("option", ["socket_timeout=5", "socket_connect_timeout=5", "timeout=5"])
def test_the_url_cannot_lengthen_the_quarter_second_timeouts(option):
    """redis-py lets a URL's options override the client's arguments: these would make a
    request wait seconds on a frozen Redis. The config is refused, saying which one."""
    pytest.importorskip("redis")
    config = gateway.Config._with_environ(
        {"limits_backend": "redis://:s3cret@localhost:6379/0?" + option}, {}, "/", {})
    problem = gateway.boot_problem(config)
    assert problem and option.split("=")[0] in problem and "s3cret" not in problem


def test_check_fails_on_a_wrong_password_and_only_warns_while_redis_is_down(redis_server,
                                                                          config_dir):
    """A Redis that answers and refuses the password will not come round by itself: 'gateway
    check' (systemd's ExecReload) fails, so a reload keeps the config that works."""
    redis_server.client().config_set("requirepass", "right-one")
    ini = (config_dir / "gateway.ini").read_text()

    def check(url):
        (config_dir / "check.ini").write_text(ini.replace(
            "[gateway]\n", "[gateway]\nlimits_backend = %s\n" % url, 1))
        done = subprocess.run([sys.executable, os.path.join(ROOT, "gateway"), "check",
                               "--config", str(config_dir / "check.ini")],
                              capture_output=True, text=True, timeout=30)
        assert "Traceback" not in done.stderr
        return done.returncode, done.stdout
    socket = redis_server.socket
    status, out = check("unix://:wrong-one@%s?db=0" % socket)
    assert status == 1 and "refuses the gateway (AuthenticationError)" in out
    assert "wrong-one" not in out
    status, out = check("unix://:right-one@%s?db=0" % socket)
    assert status == 0 and "limits: shared by every host" in out
    redis_server.kill()
    status, out = check("unix://:right-one@%s?db=0" % socket)
    assert status == 0 and "does not answer" in out

# -- whole hosts: 'gateway serve' (gthread) and plain gunicorn (gevent), several workers ----------

STREAM = {"model": "claude-opus-4-8", "max_tokens": 16, "stream": True,
          "messages": [{"role": "user", "content": "Hello"}]}
MESSAGE = dict(STREAM, stream=False)
RPM_KEY = "sk-gw-test-rpm-0123456789abcdefghijklmnopqrstu"
SLOTS_KEY = "sk-gw-test-slots-0123456789abcdefghijklmnopqrs"


def write_keys(config_dir, rpm=6, concurrency=4):
    (config_dir / "gateway.keys").write_text(
        key_line("alice", CLIENT_KEY)
        + key_line("rpm", RPM_KEY).strip() + " rpm=%d\n" % rpm
        + key_line("slots", SLOTS_KEY).strip() + " concurrency=%d\n" % concurrency)


def host_ini(config_dir, name, server, lease=LEASE, **settings):
    """This host's config: the shared one plus the Redis settings and its own state_file."""
    settings = dict({"limits_backend": server.url, "limits_lease": lease,
                     "state_file": name + ".state"}, **settings)
    text = (config_dir / "gateway.ini").read_text().replace("[gateway]\n", "[gateway]\n" + "".join(
        "%s = %s\n" % item for item in settings.items()), 1)
    path = config_dir / (name + ".ini")
    path.write_text(text)
    return str(path)


@contextlib.contextmanager
def host(config_dir, tmp_path, name, server, workers=2, **settings):
    """One gateway host: 'gateway serve' with ``workers`` workers, in its own process group
    (so that a test can SIGKILL the whole host). Yields (process, base URL)."""
    ini = host_ini(config_dir, name, server, **settings)
    with gateway_process(["serve", "--config", ini, "--bind", ANY_PORT],
                         tmp_path / (name + ".log"), env={"WEB_CONCURRENCY": str(workers)},
                         start_new_session=True) as started:  # port 0: nothing to collide
        yield started


def held_streams(upstream):
    """Streams that send message_start, then wait for the returned Event (bounded)."""
    gate = threading.Event()

    def handler(handler, received):
        if not received.json().get("stream"):
            return default_handler(handler, received)
        events = text_stream("m")
        handler.start_sse("chunked")
        try:
            handler.send_chunk(events[0])
            gate.wait(30)
            for event in events[1:]:
                handler.send_chunk(event)
            handler.end_sse()
        except (BrokenPipeError, ConnectionResetError):
            pass
    upstream.handler = handler
    return gate


def post(url, key, body=MESSAGE, **options):
    return requests.post(url + "/v1/messages", json=body, headers=auth(key),
                         timeout=options.pop("timeout", 20), **options)


def at_once(calls):
    """Run every call in ``calls`` at the same moment, each in its own thread; their results
    in order."""
    with concurrent.futures.ThreadPoolExecutor(len(calls)) as pool:
        barrier = threading.Barrier(len(calls))

        def run(call):
            barrier.wait(20)
            return call()
        return list(pool.map(run, calls))


def test_two_hosts_admit_exactly_the_limit_of_three_times_as_many(redis_server, config_dir,
                                                                   upstream, tmp_path):
    """Two hosts, two workers each, one Redis: rpm = 6 and concurrency = 4 are exact for the
    18 and 12 clients that arrive at once, spread over both hosts. Then the operator's view:
    'gateway check' names the backend, 'gateway keys list' shows last use from Redis."""
    write_keys(config_dir, rpm=6, concurrency=4)
    gate = held_streams(upstream)
    with host(config_dir, tmp_path, "one", redis_server) as (_, one), \
            host(config_dir, tmp_path, "two", redis_server) as (_, two):
        urls = [one, two] * 9
        statuses = at_once([lambda url=url: post(url, RPM_KEY).status_code for url in urls])
        assert sorted(statuses) == [200] * 6 + [429] * 12

        streams = at_once([lambda url=url: post(url, SLOTS_KEY, STREAM, stream=True)
                           for url in urls[:12]])
        assert sorted(r.status_code for r in streams) == [200] * 4 + [429] * 8
        refusals = [r for r in streams if r.status_code == 429]
        assert {r.json()["error"]["message"] for r in refusals} == {
            "This key already has 4 requests in progress."}
        assert {r.headers["retry-after"] for r in refusals} == {"1"}
        gate.set()
        for response in streams:
            assert response.status_code == 429 or response.content.endswith(
                b'"message_stop"       }\n\n')
        # The slots are free once the streams end (released after the response, in the
        # background: a bounded wait).
        eventually(lambda: post(one, SLOTS_KEY).status_code == 200)
        assert post(two, CLIENT_KEY).status_code == 200  # unlimited: never waits on Redis

        check = run_gateway("check", "--config", str(config_dir / "one.ini"))
        assert "limits: shared by every host in %s (Redis " % redis_server.url in check
        eventually(lambda: "never" not in keys_row(config_dir, "rpm"))
    assert "never" in keys_row(config_dir, "rpm", state_only=True)  # it came from Redis
    logs = (tmp_path / "one.log").read_text() + (tmp_path / "two.log").read_text()
    stored = b"".join(k + v for k, (_, _, v) in redis_server.everything().items())
    for secret in (CLIENT_KEY, RPM_KEY, SLOTS_KEY, UPSTREAM_KEY):
        assert secret not in logs and secret.encode() not in stored
    assert "Traceback" not in logs


def test_a_key_of_one_slot_used_in_turn_on_two_hosts_is_never_refused(redis_server,
                                                                       config_dir, upstream,
                                                                       tmp_path):
    """A client's requests one after the other, each to the other host (as behind a load
    balancer, or behind nginx's pool of connections to several workers): each finds the
    last one's slot not yet freed by the other host's finisher, and is admitted once it is,
    not refused."""
    write_keys(config_dir, concurrency=1)
    with host(config_dir, tmp_path, "one", redis_server, workers=1) as (_, one), \
            host(config_dir, tmp_path, "two", redis_server, workers=1) as (_, two):
        statuses = [post(url, SLOTS_KEY).status_code for url in [one, two] * 15]
    assert statuses == [200] * 30


def run_gateway(*args):
    return subprocess.run([sys.executable, os.path.join(ROOT, "gateway")] + list(args),
                          capture_output=True, text=True, timeout=30).stdout


def keys_row(config_dir, name, state_only=False):
    ini = "gateway.ini" if state_only else "one.ini"
    if state_only:  # the same state file as host one, without Redis
        text = (config_dir / "gateway.ini").read_text().replace(
            "[gateway]\n", "[gateway]\nstate_file = one.state\n", 1)
        (config_dir / "state-only.ini").write_text(text)
        ini = "state-only.ini"
    listed = run_gateway("keys", "list", "--config", str(config_dir / ini))
    return [line for line in listed.splitlines() if line.startswith(name + " ")][0]


def test_a_sigkilled_host_frees_its_slots_within_the_lease(redis_server, config_dir,
                                                           upstream, tmp_path):
    write_keys(config_dir, concurrency=2)
    gate = held_streams(upstream)
    try:
        with host(config_dir, tmp_path, "survivor", redis_server) as (_, survivor):
            with host(config_dir, tmp_path, "doomed", redis_server) as (doomed, url):
                held = [post(url, SLOTS_KEY, STREAM, stream=True) for _ in range(2)]
                assert [r.status_code for r in held] == [200, 200]
                assert post(survivor, SLOTS_KEY).status_code == 429
                os.killpg(doomed.pid, signal.SIGKILL)  # master and workers, no goodbye
                killed = time.monotonic()
                eventually(lambda: post(survivor, SLOTS_KEY).status_code == 200,
                           timeout=LEASE + 5)
                assert time.monotonic() - killed <= LEASE + 2
    finally:
        gate.set()


def test_a_stream_longer_than_three_leases_keeps_its_slot(redis_server, config_dir,
                                                          upstream, tmp_path):
    """The upstream says nothing at all (long thinking before the first byte) for 3.5 leases:
    the slot is renewed all along, so the second request is refused throughout. (A renewal
    comes every lease / 3 on the deadlines thread's 0.25 s tick: with a lease of 2 s a worker
    may stall a second without losing its slot, so a loaded machine does not fail the test.)"""
    lease = 2.0
    write_keys(config_dir, concurrency=1)
    ini = config_dir / "gateway.ini"  # silent for 7 s: longer than the fixture's read_timeout
    ini.write_text(ini.read_text().replace("read_timeout = 5\n", "read_timeout = 30\n"))
    gate, arrived = threading.Event(), threading.Event()

    def silent_then_stream(handler, received):
        if not received.json().get("stream"):
            return default_handler(handler, received)
        arrived.set()
        gate.wait(30)
        stream_events(handler, text_stream("m"), upstream)
    upstream.handler = silent_then_stream
    with host(config_dir, tmp_path, "one", redis_server, lease=lease) as (_, one), \
            host(config_dir, tmp_path, "two", redis_server, lease=lease) as (_, two):
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            long_one = pool.submit(post, one, SLOTS_KEY, STREAM)
            assert arrived.wait(20)
            silent_until = time.monotonic() + 3.5 * lease
            refused_statuses = []
            while time.monotonic() < silent_until:
                refused_statuses.append(post(two, SLOTS_KEY).status_code)
                time.sleep(lease / 4)
            gate.set()
            assert long_one.result(20).status_code == 200
        assert set(refused_statuses) == {429} and len(refused_statuses) >= 4
        eventually(lambda: post(two, SLOTS_KEY).status_code == 200)


def test_redis_restarted_then_frozen_under_load(redis_server, config_dir, upstream, tmp_path):
    """Clients keep calling while Redis restarts and then freezes (SIGSTOP): every request
    is answered, none waits much longer than the 0.25 s timeout, each worker logs the outage
    once; once Redis answers again, rpm is exact again."""
    write_keys(config_dir, rpm=5)
    (config_dir / "gateway.keys").write_text(
        (config_dir / "gateway.keys").read_text()
        + key_line("busy", "sk-gw-test-busy-0123456789abcdefghij").strip() + " rpm=100000\n")
    with host(config_dir, tmp_path, "one", redis_server) as (_, one):
        answers, stop = [], threading.Event()

        def load():
            while not stop.is_set():
                started = time.monotonic()
                status = post(one, "sk-gw-test-busy-0123456789abcdefghij").status_code
                answers.append((status, time.monotonic() - started))
        clients = [in_background(load) for _ in range(4)]
        try:
            eventually(lambda: len(answers) > 20)
            redis_server.restart()
            seen = len(answers)
            eventually(lambda: len(answers) > seen + 20)
            redis_server.freeze()
            seen = len(answers)
            eventually(lambda: len(answers) > seen + 40)
            frozen = answers[seen:]
            redis_server.thaw()
        finally:
            stop.set()
            for join in clients:
                join()  # a client's exception fails the test, not just that client
        assert {status for status, _ in answers} == {200}
        assert max(elapsed for _, elapsed in frozen) < 2.0  # generous: a loaded machine
        # Each worker's breaker lets one request probe Redis once BREAKER_SECONDS have passed
        # (the others meanwhile count on this host): wait until every worker that logged the
        # outage has logged Redis back, then the limits are shared again.
        log_path = tmp_path / "one.log"

        def recovered():
            post(one, "sk-gw-test-busy-0123456789abcdefghij")
            text = log_path.read_text()
            return text.count("answers again") >= text.count("unreachable")
        eventually(recovered, timeout=RedisLimits.BREAKER_SECONDS * 4)
        statuses = at_once([lambda: post(one, RPM_KEY).status_code] * 15)
        assert sorted(statuses) == [200] * 5 + [429] * 10
    log = (tmp_path / "one.log").read_text()
    assert 1 <= log.count("unreachable") <= 4  # at most twice (restart, freeze) per worker
    assert "Traceback" not in log


def test_exact_under_the_gevent_config_too(redis_server, config_dir, upstream, tmp_path):
    try:
        import gevent  # noqa: F401
    except ImportError:
        missing("gevent is not installed (it is in the test extra)")
    write_keys(config_dir, rpm=6, concurrency=3)
    gate = held_streams(upstream)
    ini = host_ini(config_dir, "gevent", redis_server)
    command = [sys.executable, "-m", "gunicorn", "-c",
               os.path.join(ROOT, "deploy", "gunicorn-gevent.conf.py"),
               "--bind", ANY_PORT, "--pythonpath", ROOT]
    try:
        with server_process(command, tmp_path / "gevent.log",
                            lambda text: text.count("Booting worker") >= 2,
                            {"GATEWAY_CONFIG": ini, "WEB_CONCURRENCY": "2"}, stop_timeout=5):
            url = listening_url(tmp_path / "gevent.log")
            statuses = at_once([lambda: post(url, RPM_KEY).status_code] * 18)
            assert sorted(statuses) == [200] * 6 + [429] * 12
            streams = at_once([lambda: post(url, SLOTS_KEY, STREAM, stream=True)] * 9)
            assert sorted(r.status_code for r in streams) == [200] * 3 + [429] * 6
            gate.set()
            for response in streams:
                response.close()
    finally:
        gate.set()
    log = (tmp_path / "gevent.log").read_text()
    assert re.search(r"Using worker: \S*[Gg]event", log) and "Traceback" not in log


def test_metrics_count_backend_errors_and_requests_admitted_while_away(redis_server,
                                                                       config_dir):
    pytest.importorskip("prometheus_client")
    write_keys(config_dir, rpm=100)
    config = dataclasses.replace(gateway.Config.from_file(str(config_dir / "gateway.ini")),
                                 limits_backend=redis_server.url, metrics=True)
    client = webtest.TestApp(gateway.make_app(config))
    client.post_json("/v1/messages", MESSAGE, headers=auth(RPM_KEY))
    redis_server.kill()
    for _ in range(3):
        client.post_json("/v1/messages", MESSAGE, headers=auth(RPM_KEY))
    client.post_json("/v1/messages", MESSAGE, headers=auth(CLIENT_KEY))  # unlimited: no count
    text = client.get("/metrics").text
    assert "gateway_limits_backend_errors_total 1.0" in text  # then the breaker: no calls
    assert 'gateway_limits_admitted_away_total{mode="local"} 3.0' in text


def test_last_use_noted_since_the_last_renewal_is_written_as_a_worker_exits(
        redis_server, config_dir, tmp_path):
    """Last use goes to Redis with the renewal, every lease/3 (here 200 s): what a worker
    noted since is written as it exits, so 'gateway keys list' does not lose it to a stop,
    a restart or a HUP."""
    write_keys(config_dir)
    with host(config_dir, tmp_path, "stopping", redis_server, workers=1, lease=600) as (
            _, url):
        assert post(url, CLIENT_KEY).status_code == 200
        time.sleep(0.5)
        assert redis_server.client().get("gateway:{alice}:last") is None  # not yet
    assert redis_server.client().get("gateway:{alice}:last") is not None  # stopped: written


def test_unlimited_keys_never_wait_on_redis(redis_server, config_dir, caplog):
    """An unlimited key's requests send Redis nothing (their last use goes with the periodic
    renewal), so they are served at once even while Redis is frozen; a limited key's request
    is one admit script."""
    write_keys(config_dir, rpm=100)
    config = dataclasses.replace(gateway.Config.from_file(str(config_dir / "gateway.ini")),
                                 limits_backend=redis_server.url)
    client = webtest.TestApp(gateway.make_app(config))

    def scripts_run():
        stats = redis_server.client().info("commandstats")
        return stats.get("cmdstat_evalsha", {}).get("calls", 0)
    client.post_json("/v1/messages", MESSAGE, headers=auth(RPM_KEY))  # loads the script
    before = scripts_run()
    for _ in range(10):
        client.post_json("/v1/messages", MESSAGE, headers=auth(CLIENT_KEY))
    assert scripts_run() == before
    client.post_json("/v1/messages", MESSAGE, headers=auth(RPM_KEY))
    assert scripts_run() == before + 1
    redis_server.freeze()
    try:
        for _ in range(10):
            client.post_json("/v1/messages", MESSAGE, headers=auth(CLIENT_KEY))
        assert "unreachable" not in caplog.text  # no call timed out: none was made
        client.post_json("/v1/messages", MESSAGE, headers=auth(RPM_KEY))  # local fallback
        assert "unreachable (TimeoutError)" in caplog.text
    finally:
        redis_server.thaw()


def test_a_slot_written_by_an_admit_that_timed_out_is_released(redis_server, tmp_path):
    """Redis runs an admit script only after the client gave up (another client's slow
    script held Redis longer than the 0.25 s timeout): the request was admitted on this
    host, and the slot Redis wrote late is released once Redis answers again, not left to
    block the key on every host for a whole lease."""
    backend = limits(redis_server, tmp_path, limits_lease=60)
    backend.BREAKER_SECONDS = 0.5  # this instance only: the test need not wait 5 s
    busy = ("local t = redis.call('TIME') local stop = t[1] * 1e6 + t[2] + 1000000 "
            "repeat t = redis.call('TIME') until t[1] * 1e6 + t[2] > stop return 0")
    backend.admit(limited("warm", concurrency=1), "warm", time.time())  # connected, loaded
    join = in_background(lambda: redis_server.client().eval(busy, 0))
    number, deadline = 0, time.monotonic() + 5
    while backend._down_until is None:  # until an admit call times out behind the script
        assert time.monotonic() < deadline, "no admit call timed out"
        number += 1
        backend.admit(limited("slow-%d" % number, concurrency=1), "late", time.time())
    join()
    server, slots = redis_server.client(), "gateway:{slow-%d}:slots" % number
    assert server.zscore(slots, "late") is not None  # Redis ran it after the timeout
    eventually(lambda: backend.renew() or server.zscore(slots, "late") is None, timeout=5)


def test_a_request_failing_after_its_admit_gets_the_refusal_first_and_frees_the_connection(
        redis_server, config_dir, caplog):
    """The admit call's answer is read just before the request goes upstream (Gateway.limit),
    so that preparing the request overlaps the round trip. A failure in between (here the
    gateway has no upstream key: a 502 of its own) must still read it: a refused request
    gets its 429, as when the limits were asked first, and the connection goes back to the
    pool. Without that, the pool would run dry after POOL_SIZE such requests and every call
    after them time out."""
    requests_allowed = RedisLimits.POOL_SIZE + 4
    write_keys(config_dir, rpm=requests_allowed)
    (config_dir / "upstream.key").unlink()  # not there yet: every request is a 502
    config = dataclasses.replace(gateway.Config.from_file(str(config_dir / "gateway.ini")),
                                 limits_backend=redis_server.url)
    app = gateway.make_app(config)
    client = webtest.TestApp(app)
    statuses = [client.post_json("/v1/messages", MESSAGE, headers=auth(RPM_KEY),
                                 expect_errors=True).status_int
                for _ in range(requests_allowed + 2)]
    assert statuses == [502] * requests_allowed + [429] * 2
    assert "unreachable" not in caplog.text  # no call waited for a connection
    assert app.limits._down_until is None


def test_a_refused_request_never_reaches_the_upstream_nor_a_refused_models_page(
        redis_server, config_dir, upstream):
    """The admit's answer is read before the request goes upstream (Exchange.admitted in
    Gateway._send), and before an endpoint that answers by itself returns (GET and HEAD
    /v1/models, in Gateway._dispatch)."""
    write_keys(config_dir, rpm=2)
    config = dataclasses.replace(gateway.Config.from_file(str(config_dir / "gateway.ini")),
                                 limits_backend=redis_server.url)
    client = webtest.TestApp(gateway.make_app(config))
    statuses = [client.post_json("/v1/messages", MESSAGE, headers=auth(RPM_KEY),
                                 expect_errors=True).status_int for _ in range(4)]
    assert statuses == [200, 200, 429, 429]
    assert len(upstream.received) == 2
    for method in (client.get, client.head):
        assert method("/v1/models", headers=auth(RPM_KEY), expect_errors=True).status_int == 429
    fresh = "sk-gw-test-fresh-0123456789abcdefghijklmnopqrs"
    (config_dir / "gateway.keys").write_text(key_line("fresh", fresh).strip() + " rpm=1\n")
    statuses = [client.get("/v1/models", headers=auth(fresh), expect_errors=True).status_int
                for _ in range(2)]
    assert statuses == [200, 429]
