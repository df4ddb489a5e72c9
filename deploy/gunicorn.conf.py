"""gunicorn settings for the gateway: 'gateway serve' loads this file; so can
'gunicorn -c deploy/gunicorn.conf.py' (then set GATEWAY_CONFIG). Each non-default setting
says why. Its timeouts fit deploy/nginx.conf and deploy/gateway.service; for thousands of
concurrent streams, gunicorn-gevent.conf.py builds on this file."""

import os

# The app factory; it reads the file that GATEWAY_CONFIG names ('gateway serve --config' sets it).
wsgi_app = "gateway:make_app()"

# Loopback: nginx (deploy/nginx.conf) faces the network. Override with 'gateway serve --bind'.
bind = ["127.0.0.1:8080"]

# gthread needs nothing beyond the standard library. A stream holds a thread for its whole
# length (thousands of streams: gunicorn-gevent.conf.py).
worker_class = "gthread"

# One worker per core this process may run on: the GIL lets a worker use one core, and a
# second worker on the same core added no throughput but 28 MB of RSS (tests/benchmark.py,
# docs/performance.md). 'taskset -c 0 gateway serve' therefore runs one worker, and so does a
# container whose cgroup (v2) allows one CPU's time, however many cores its host has.
# WEB_CONCURRENCY (gunicorn's own convention) sets the number outright.
def _cores():
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    cores = cores or os.cpu_count() or 1
    try:
        with open("/sys/fs/cgroup/cpu.max") as file:
            quota, period = file.read().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, -(-int(quota) // int(period))))  # rounded up
    except (OSError, ValueError):
        pass
    return cores


workers = int(os.environ.get("WEB_CONCURRENCY") or _cores())

# Each open stream holds a thread. gthread does not balance connections between workers, and
# a worker whose threads are all busy queues the next request: 2 workers x 128 threads let
# first events of 200 slow streams wait over 1 s (performance-facts.md; seen again here: 130
# of a burst of 200 on one worker, 60 first events 4.9 s late). So each worker alone
# holds 256 streams; the benchmark's one pinned worker serves its 200 with none late. A thread
# costs memory only once it has run (about 60 KB of stack and state each, measured).
threads = 256

# gthread workers keep heartbeating while a thread waits on a quiet stream, so this only kills
# a worker whose main loop is stuck; it never cuts a long answer.
timeout = 120

# On HUP or stop, open streams get this long to finish (a long answer can take minutes, the
# SDKs wait 600 s). systemd must wait longer before killing: TimeoutStopSec=630 in the unit.
graceful_timeout = 600

# Clients and nginx reuse connections between calls. Longer than nginx's upstream
# keepalive_timeout (60 s), so nginx closes an idle connection first and never sends a
# request on one that gunicorn is closing.
keepalive = 75

# gunicorn 27's control socket defaults to one path per user (~/.gunicorn/gunicorn.ctl), so two
# gateways on one host would fight over it; we manage the server with signals (HUP, TERM).
control_socket_disable = True

# The access log is the gateway's own JSON line (logger 'gateway.access'); gunicorn's would
# duplicate it without the key name, model or tokens.
accesslog = None


def _logger_class():
    """gunicorn's logger, minus its access line. Any logconfig_dict turns gunicorn's access log
    on, and it then formats a line for every request (about 3% of a request's CPU under
    py-spy) that nothing prints. The gateway's own line (above) is the access log."""
    import gunicorn.glogging

    class Logger(gunicorn.glogging.Logger):
        def access(self, resp, req, environ, request_time):
            pass

    return Logger


logger_class = _logger_class  # a function: gunicorn calls it to get the class


def post_worker_init(worker):
    """Give memory back once big request bodies stop, without paying for it on every one.

    Facts -> decision: glibc serves big blocks from mmap until one is freed, then raises its
    mmap threshold, so later big blocks come from heaps that seldom shrink, one heap ("arena")
    per busy thread: RSS after the benchmark's 5 MB bodies grew from 62 to 111-140 MB. Fixing
    the threshold (mallopt) kept it at 77 MB but made every 5 MB body 8 ms slower (fresh pages
    each time). So each worker keeps one arena (threads take turns on the GIL anyway, so they
    hardly contend for it) and calls malloc_trim(3) once a second has passed since its last
    big body or answer (post_request notes when): 75 MB after the benchmark, no slower.
    glibc only; elsewhere nothing changes."""
    import ctypes
    import threading
    import time
    try:
        libc = ctypes.CDLL(None)
        libc.mallopt(-8, 1)  # M_ARENA_MAX: before this worker's threads first allocate
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return
    worker.gateway_big_request_at = None

    def trim_when_quiet():
        while True:
            time.sleep(1)
            seen = worker.gateway_big_request_at
            if seen is not None and time.monotonic() - seen >= 1:
                worker.gateway_big_request_at = None
                trim(0)

    threading.Thread(target=trim_when_quiet, name="malloc-trim", daemon=True).start()


def post_request(worker, req, environ, resp):
    """Note a request that moved a megabyte or more (see post_worker_init)."""
    import time
    length = environ.get("CONTENT_LENGTH") or ""  # environ is {} when parsing failed
    size = max(int(length) if length.isdigit() else 0, getattr(resp, "sent", 0) or 0)
    if size >= 1 << 20:
        worker.gateway_big_request_at = time.monotonic()


def child_exit(server, worker):
    """With metrics on, prometheus_client's multiprocess mode keeps each worker's values in
    PROMETHEUS_MULTIPROC_DIR; an exited worker's open-streams gauge must stop counting
    (client_python docs, "Multiprocess Mode", step 3). Its counters stay: they are totals."""
    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        return
    try:
        from prometheus_client import multiprocess
    except ImportError:
        return
    multiprocess.mark_process_dead(worker.pid)


# Everything on stderr (the journal under systemd): the access log (logger 'gateway.access') as
# bare JSON lines, one per request; every other line with time, pid and level.
logconfig_dict = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {
        "json_line": {"format": "%(message)s"},
        "plain": {"format": "%(asctime)s [%(process)d] [%(levelname)s] %(name)s: %(message)s"},
    },
    "handlers": {
        "access": {"class": "logging.StreamHandler", "formatter": "json_line",
                   "stream": "ext://sys.stderr"},
        "errors": {"class": "logging.StreamHandler", "formatter": "plain",
                   "stream": "ext://sys.stderr"},
    },
    "root": {"level": "INFO", "handlers": ["errors"]},
    "loggers": {
        "gateway": {"level": "INFO", "handlers": ["errors"], "propagate": False},
        "gateway.access": {"level": "INFO", "handlers": ["access"], "propagate": False},
        "gunicorn.error": {"level": "INFO", "handlers": ["errors"], "propagate": False},
    },
}
