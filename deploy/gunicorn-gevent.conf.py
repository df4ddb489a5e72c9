"""gunicorn settings for thousands of concurrent streams: the gevent worker (optional extra).

    pip install 'gateway[gevent]'
    gateway serve --worker gevent --config /etc/gateway/gateway.ini    # uses this file
    GATEWAY_CONFIG=/etc/gateway/gateway.ini gunicorn -c <this file>   # or plain gunicorn

Everything not set here comes from gunicorn.conf.py beside this file. The default gthread
worker needs only the standard library and holds a few hundred open streams per host; here an
open stream costs a greenlet instead of a thread, so thousands fit in the same memory.

Facts -> decision: gevent must patch the standard library before ``requests`` is imported.
Patched late, urllib3 keeps the unpatched ``ssl.SSLContext`` and every HTTPS upstream request
fails with RecursionError (gevent#1016; reproduced with gevent 26.9, urllib3 2, Python 3.11).
Neither ``gateway serve`` (its master never imports the gateway: ``gateway.SERVE_MASTER``)
nor plain gunicorn imports the gateway before each worker has patched, after the fork. This
file refuses to load in a process that imported urllib3 unpatched (an embedding that imported
requests first).

On reload or stop, the worker below closes its idle keep-alive connections after 2 s, as
gthread does (gunicorn's own gevent worker waits for each until nginx drops it, 60 s, or
``keepalive``, 75 s, runs out), so old workers leave once their streams end.
"""

import os
import runpy
import sys

if "urllib3" in sys.modules and not (
        "gevent.monkey" in sys.modules and sys.modules["gevent.monkey"].is_module_patched("ssl")):
    raise RuntimeError(
        "deploy/gunicorn-gevent.conf.py needs gevent to patch first: 'gateway serve --worker "
        "gevent', or plain gunicorn: GATEWAY_CONFIG=/etc/gateway/gateway.ini gunicorn -c %s "
        "(gevent must patch before requests is imported)" % os.path.abspath(__file__))

globals().update((name, value) for name, value in runpy.run_path(
    os.path.join(os.path.dirname(os.path.abspath(__file__)), "gunicorn.conf.py")).items()
    if not name.startswith("__"))

# A greenlet per connection, cooperative I/O (gevent is imported here, in the master too,
# unpatched: each worker patches after the fork, before it imports the gateway).
from gunicorn.workers.ggevent import GeventWorker  # noqa: E402  (gevent, not patched by this)
import gevent  # noqa: E402


class GatewayGeventWorker(GeventWorker):
    """gunicorn's gevent worker, closing its idle keep-alive connections when it stops, as the
    gthread worker does. gunicorn's own waits for each to send another request or time out
    (keepalive, 75 s), so after a HUP the old workers lived on until nginx dropped its idle
    upstream connections (60 s). Like gthread (gunicorn/workers/gthread.py,
    STOP_KEEPALIVE_LINGER), a stopping worker still answers, with ``Connection: close``, a
    request that arrives on one in the next 2 s (nginx may be sending one already), then
    closes the idle ones. A connection busy with a request finishes it first."""

    STOP_KEEPALIVE_LINGER = 2.0

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.idle = {}  # greenlet -> the Timeout it waits under for its next request

    def timeout_ctx(self):
        # gunicorn calls this around each wait for the next request on a connection only.
        return _IdleWait(self)

    def handle_exit(self, sig, frame):
        super().handle_exit(sig, frame)
        gevent.spawn_later(self.STOP_KEEPALIVE_LINGER, self.close_idle)

    def close_idle(self):
        for greenlet, timeout in list(self.idle.items()):
            greenlet.kill(timeout, block=False)  # the wait ends as if it had timed out


class _IdleWait:
    """``gevent.Timeout(keepalive, False)``, as gunicorn uses it, that the worker can end early:
    a timeout with ``False`` ends its block quietly, and gunicorn then closes the connection."""

    def __init__(self, worker):
        self.worker = worker
        self.timeout = gevent.Timeout(worker.cfg.keepalive, False)

    def __enter__(self):
        self.worker.idle[gevent.getcurrent()] = self.timeout
        return self.timeout.__enter__()

    def __exit__(self, *exc):
        self.worker.idle.pop(gevent.getcurrent(), None)
        return self.timeout.__exit__(*exc)


worker_class = GatewayGeventWorker

# Open connections per worker (streams and idle keep-alive). Each stream also holds an upstream
# socket, so a worker needs about twice this many file descriptors (LimitNOFILE in the unit).
worker_connections = 4096
