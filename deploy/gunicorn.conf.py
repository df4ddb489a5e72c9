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
# length (thousands of streams: gunicorn-gevent.conf.py). gunicorn calls this function for
# the class: gthread whose idle threads exit (below).
def _worker_class():
    """gunicorn's gthread worker with a thread pool whose idle threads exit.

    Facts -> decision: gthread's pool (concurrent.futures) keeps every thread it ever
    started, so after a burst of 200 streams a worker held 200 idle threads, about 13 MB,
    until it restarted (docs/performance.md). Recycling workers (max_requests) would give it
    back too, but a worker that restarts must wait for its open streams or cut them; a
    thread that exits after _IDLE_THREAD_SECONDS without work cuts nothing, and starting one
    again costs about 26 us of CPU (a thread started and ended, measured on this machine)."""
    import concurrent.futures
    import queue
    import threading
    import time

    import gunicorn.workers.gthread

    class ShrinkingThreadPool(concurrent.futures.Executor):
        """At most ``max_workers`` threads, started as work arrives; each exits once it has
        waited ``idle_seconds`` for work. The few calls gthread makes: submit, shutdown."""

        def __init__(self, max_workers, idle_seconds, on_exit):
            self._max_workers, self._idle_seconds = max_workers, idle_seconds
            self._on_exit = on_exit  # called by a thread that leaves for want of work
            self._work = queue.SimpleQueue()
            self._lock = threading.Lock()
            self._threads = 0
            self._idle = 0  # threads waiting for work that no queued item has claimed
            self._shut_down = False

        def submit(self, fn, /, *args, **kwargs):
            future = concurrent.futures.Future()
            with self._lock:
                if self._shut_down:
                    raise RuntimeError("cannot schedule new futures after shutdown")
                self._work.put((future, fn, args, kwargs))
                if self._idle:
                    self._idle -= 1  # a waiting thread takes it
                elif self._threads < self._max_workers:
                    self._threads += 1
                    threading.Thread(target=self._run, name="gthread-worker",
                                     daemon=True).start()
            return future

        def shutdown(self, wait=True, *, cancel_futures=False):
            with self._lock:
                self._shut_down = True
                for _ in range(self._threads):
                    self._work.put(None)

        def _run(self):
            while True:
                try:
                    item = self._work.get(timeout=self._idle_seconds)
                except queue.Empty:
                    with self._lock:
                        if self._work.empty():  # nothing queued meanwhile: leave
                            # (a thread whose first item another took was never counted)
                            self._idle = max(0, self._idle - 1)
                            self._threads -= 1
                            self._on_exit()
                            return
                    continue
                if item is None:
                    return
                future, fn, args, kwargs = item
                del item
                if future.set_running_or_notify_cancel():
                    try:
                        future.set_result(fn(*args, **kwargs))
                    except BaseException as exc:
                        future.set_exception(exc)
                del future, fn, args, kwargs  # the request and its connection: not kept
                with self._lock:
                    self._idle += 1

    class ThreadWorker(gunicorn.workers.gthread.ThreadWorker):
        def get_thread_pool(self):
            return ShrinkingThreadPool(self.cfg.threads, _IDLE_THREAD_SECONDS, self._exited)

        def _exited(self):
            self.gateway_active_at = time.monotonic()  # its stack and state can be trimmed

    return ThreadWorker


worker_class = _worker_class
# A thread holds a request, not a connection (gthread's poller waits on idle keep-alive
# connections), so a thread idle for a second is surplus; a worker quieter than that pays
# 26 us to start one again. With 2 s, memory came back 3.5 s after a load instead of 2 s.
_IDLE_THREAD_SECONDS = 1
# Quiet this long (no request ended, no idle thread exited) before a worker collects and trims:
# a worker busier than one request every half second never pays the collection (about 4 ms).
_QUIET_SECONDS = 0.5

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
# first events of 200 slow streams wait over 1 s (docs/deployment.md, "Capacity": 130
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
    """Give memory back once the worker goes quiet, without paying for it on every request.

    Facts -> decision: glibc serves big blocks from mmap until one is freed, then raises its
    mmap threshold, so later big blocks come from heaps that seldom shrink, one heap ("arena")
    per busy thread: RSS after the benchmark's 5 MB bodies grew from 62 to 111-140 MB. Fixing
    the threshold (mallopt) kept it at 77 MB but made every 5 MB body 8 ms slower (fresh pages
    each time). So each worker keeps one arena (threads take turns on the GIL anyway, so they
    hardly contend for it) and calls malloc_trim(3) once _QUIET_SECONDS have passed since its
    last request ended or idle thread exited (post_request and the thread pool note when),
    timed from that moment, not from a once-a-second tick: after a burst the idle threads exit
    together and the trim follows them within half a second (tests/benchmark.py: memory back
    2.0 s after the load in three runs, 3.5 s before). A trim of a quiet heap costs well
    under a millisecond, and busy workers never pay it.
    Before the trim, a full garbage collection: what a request leaves in reference cycles
    (the 5 MB bodies' memory among it) is otherwise freed only by a later collection, which a
    quiet worker seldom reaches, so the trim found nothing to give back. Measured with
    tests/worker_memory.py: after the benchmark's load the worker kept 7.7 MB more than idle
    without it, 4.2-5.1 MB with it; a full collection of a worker's heap takes about 4 ms.
    glibc only; elsewhere nothing changes."""
    import ctypes
    import gc
    import threading
    import time
    worker.gateway_active_at = None
    try:
        libc = ctypes.CDLL(None)
        libc.mallopt(-8, 1)  # M_ARENA_MAX: before this worker's threads first allocate
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return

    def trim_when_quiet():
        while True:
            seen = worker.gateway_active_at
            quiet = _QUIET_SECONDS if seen is None else seen + _QUIET_SECONDS - time.monotonic()
            if quiet > 0:
                time.sleep(max(quiet, 0.05))  # asleep until the quiet spell would be long enough
                continue
            worker.gateway_active_at = None
            gc.collect()  # cycles first, or their memory is not free to trim
            trim(0)

    threading.Thread(target=trim_when_quiet, name="malloc-trim", daemon=True).start()



def post_request(worker, req, environ, resp):
    """Note that memory moved (see post_worker_init)."""
    import time
    worker.gateway_active_at = time.monotonic()


def when_ready(server):
    """Fork the workers from a trimmed master: each worker starts with a copy of the master's
    heap (the app that 'gateway serve' built for its check, the garbage of reading the
    config), and RSS counts those pages in every process. Measured at boot: 1.4 MB less in
    all with one worker."""
    import ctypes
    import gc
    gc.collect()
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


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

