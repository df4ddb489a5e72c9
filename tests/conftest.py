import contextlib
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server
from socketserver import ThreadingMixIn

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import gateway  # noqa: E402
from upstream import UPSTREAM_KEY, FakeUpstream, tls_server  # noqa: E402

CLIENT_KEY = "sk-gw-test-alice-0123456789abcdefghijklmnop"
LIMITED_KEY = "sk-gw-test-bob-0123456789abcdefghijklmnopqr"
DISABLED_KEY = "sk-gw-test-carol-0123456789abcdefghijklmno"


def in_ci(environ=os.environ):
    """Whether CI is set to a true value: 'true' (GitHub, GitLab), '1', 'yes', 'on'... Only
    empty or a false word ('0', 'false', 'no', 'off') counts as not in CI."""
    return environ.get("CI", "").strip().lower() not in ("", "0", "false", "no", "off")


def required(tool, why):
    """The path of ``tool``, or a skip locally and a failure in CI (where a skip could hide a
    missing install)."""
    found = shutil.which(tool) or shutil.which(tool, path="/usr/sbin:/sbin")
    if found:
        return found
    missing("%s is not installed (%s)" % (tool, why))


def missing(message):
    """Skip locally, fail in CI: what a test does when something it needs is absent."""
    if in_ci():
        pytest.fail(message + "; CI must install it")
    pytest.skip(message + "; in CI this test fails instead")


BACKGROUND_TIMEOUT = 40  # seconds


def eventually(condition, timeout=10.0):
    """Poll ``condition`` until it is true (bounded); for background work, never a sleep."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "not within %g s" % timeout
        time.sleep(0.02)


def in_background(function, *args, **kwargs):
    """Run ``function`` in a thread; the returned callable joins it (bounded) and returns its
    result or raises its exception: a background thread's failure is the test's failure,
    never lost while the test checks what the other threads did."""
    outcome = {}

    def run():
        try:
            outcome["value"] = function(*args, **kwargs)
        except BaseException as exc:  # handed to the test thread
            outcome["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()

    def join():
        thread.join(BACKGROUND_TIMEOUT)
        assert not thread.is_alive(), "a background thread did not finish"
        if "error" in outcome:
            raise outcome["error"]
        return outcome["value"]

    return join



@pytest.fixture(autouse=True)
def no_proxy_environment(monkeypatch):
    """requests honours proxy variables; a developer's proxy must not catch loopback tests."""
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY", "http_proxy",
                 "https_proxy", "all_proxy", "no_proxy", "ANTHROPIC_API_KEY",
                 "GATEWAY_CONFIG", "ANTHROPIC_BASE_URL", "ANTHROPIC_AUTH_TOKEN"):
        monkeypatch.delenv(name, raising=False)


def running(fake):
    """Start ``fake`` (a FakeUpstream), yield it, then release its gate and stop it."""
    fake.start()
    yield fake
    if fake.gate is not None:
        fake.gate.set()
    fake.stop()


@pytest.fixture
def upstream():
    yield from running(FakeUpstream())


@pytest.fixture(scope="module")
def ca():
    """A private certificate authority (trustme), one per test module."""
    return pytest.importorskip("trustme").CA()


@pytest.fixture
def tls_upstream(ca):
    """The fake upstream over TLS, with a certificate from ``ca`` for 127.0.0.1 and localhost."""
    yield from running(FakeUpstream(tls_server(ca.issue_cert("127.0.0.1", "localhost"))))


def key_line(name, key, models="*", enabled="enabled"):
    return "%s sha256:%s %s %s\n" % (name, gateway.digest_key(key).hex(), models, enabled)


def last_good_copy(ini):
    """Where the workers save the last good copy of the key file that config file ``ini``
    names (its name carries a tag of the key file's path)."""
    import pathlib
    return pathlib.Path(gateway.last_good_keys(gateway.Config.from_file(str(ini))).path)


@pytest.fixture
def config_dir(tmp_path, upstream):
    """A config directory as an operator would lay it out: gateway.ini, keys, upstream.key."""
    (tmp_path / "upstream.key").write_text(UPSTREAM_KEY + "\n")
    (tmp_path / "gateway.keys").write_text(
        key_line("alice", CLIENT_KEY)
        + key_line("bob", LIMITED_KEY, "claude-opus-4-7")
        + key_line("carol", DISABLED_KEY, "*", "disabled"))
    (tmp_path / "gateway.ini").write_text(
        "[gateway]\nupstream_url = %s\nkeys_file = gateway.keys\n"
        "upstream_key_file = upstream.key\nconnect_timeout = 2\nread_timeout = 5\n"
        "[models]\nclaude-opus-4-8 = claude-opus-4-8-20261101\n"
        "claude-opus-4-7 = claude-opus-4-7-20260601\n" % upstream.url)
    return tmp_path


@pytest.fixture
def config(config_dir):
    return gateway.Config.from_file(str(config_dir / "gateway.ini"))


@pytest.fixture
def app(config):
    return gateway.make_app(config)


def auth(key=CLIENT_KEY):
    return {"x-api-key": key, "anthropic-version": "2023-06-01"}


class _ThreadingWSGIServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def served_app(app):
    """The app on a real loopback HTTP server in this process (for real HTTP clients)."""
    server = make_server("127.0.0.1", 0, app, server_class=_ThreadingWSGIServer,
                         handler_class=_QuietHandler)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield "http://127.0.0.1:%d" % server.server_address[1]
    server.shutdown()
    server.server_close()


@contextlib.contextmanager
def server_process(command, log_path, ready, env=None, timeout=30, stop_timeout=15, **popen):
    """Run ``command`` with its output in ``log_path``; yield the process once ``ready(log
    text)`` is true; stop it with SIGTERM afterwards (SIGKILL after ``stop_timeout``).
    ``popen`` goes to ``subprocess.Popen`` (test_faults passes a ``preexec_fn``)."""
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                   env=dict(os.environ, **(env or {})), **popen)
    try:
        deadline = time.monotonic() + timeout
        while not ready(open(log_path, encoding="utf-8", errors="replace").read()):
            if process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError("%s did not start:\n%s" % (
                    os.path.basename(command[1] if len(command) > 1 else command[0]),
                    open(log_path, encoding="utf-8", errors="replace").read()))
            time.sleep(0.05)
        yield process
    finally:
        stop_process(process, stop_timeout)


def stop_process(process, timeout):
    """Stop ``process`` with SIGTERM, and with SIGKILL when it has not exited ``timeout``
    seconds later."""
    process.terminate()
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


LISTENING = re.compile(r"Listening at: http://([\d.]+:\d+)")
DEV_LISTENING = re.compile(r"DEVELOPMENT SERVER .* listening on http://([\d.]+:\d+)")
#: What every server started here binds: port 0, so the kernel picks a free port and the
#: server says which (listening_url). A port picked and closed first could be taken meanwhile.
ANY_PORT = "127.0.0.1:0"


def listening_url(log_path):
    """The base URL that gunicorn (or 'gateway serve --dev') logged it listens at."""
    text = open(log_path, encoding="utf-8", errors="replace").read()
    match = LISTENING.search(text) or DEV_LISTENING.search(text)
    assert match, "no 'Listening at' in %s:\n%s" % (log_path, text[-2000:])
    return "http://" + match.group(1)


@contextlib.contextmanager
def gateway_process(args, log_path, env=None, timeout=30, root=ROOT, **popen):
    """Run ``<root>/gateway <args>`` (gunicorn in the foreground) and yield (process,
    base_url) once gunicorn listens and has booted a worker."""
    def ready(text):
        return LISTENING.search(text) and "Booting worker" in text
    with server_process([sys.executable, os.path.join(root, "gateway")] + args, log_path,
                        ready, env, timeout, **popen) as process:
        yield process, "http://" + LISTENING.search(log_path.read_text()).group(1)


def pytest_addoption(parser):
    parser.addoption("--soak", action="store_true",
                     help="also run the soak tests (minutes); GATEWAY_SOAK=1 does the same")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--soak") or os.environ.get("GATEWAY_SOAK") == "1":
        return
    skip = pytest.mark.skip(reason="soak test: opt in with --soak or GATEWAY_SOAK=1")
    for item in items:
        if "soak" in item.keywords:
            item.add_marker(skip)
