"""gunicorn settings for thousands of concurrent streams: the gevent worker (optional extra).

    pip install 'gateway[gevent]'
    GATEWAY_CONFIG=/etc/gateway/gateway.ini gunicorn -c <this file>

Everything not set here comes from gunicorn.conf.py beside this file. The default gthread
worker needs only the standard library and holds a few hundred open streams per host; here an
open stream costs a greenlet instead of a thread, so thousands fit in the same memory.

Run it with plain ``gunicorn``, not ``gateway serve``. Facts -> decision: gevent must patch the
standard library before ``requests`` is imported; ``gateway serve`` has imported it already (the
command is part of the gateway module). Patched late, urllib3 keeps the unpatched
``ssl.SSLContext`` and every HTTPS upstream request fails with RecursionError (gevent#1016;
reproduced with gevent 26.9, urllib3 2, Python 3.11). Plain gunicorn imports the gateway only in
each worker, after the worker has patched. So this file refuses to load where urllib3 is
already imported.

Limits: on reload or stop a gevent worker also waits for its idle keep-alive connections
(gthread closes them after 2 s), so old workers linger until nginx drops them (60 s) or
``keepalive`` (75 s) runs out.
"""

import os
import runpy
import sys

if "urllib3" in sys.modules:
    raise RuntimeError(
        "deploy/gunicorn-gevent.conf.py needs plain gunicorn: GATEWAY_CONFIG=/etc/gateway/"
        "gateway.ini gunicorn -c %s (gevent must patch before requests is imported, and "
        "'gateway serve' has imported it)" % os.path.abspath(__file__))

globals().update((name, value) for name, value in runpy.run_path(
    os.path.join(os.path.dirname(os.path.abspath(__file__)), "gunicorn.conf.py")).items()
    if not name.startswith("__"))

# A greenlet per connection, cooperative I/O; gunicorn imports gevent only in the workers.
worker_class = "gevent"

# Open connections per worker (streams and idle keep-alive). Each stream also holds an upstream
# socket, so a worker needs about twice this many file descriptors (LimitNOFILE in the unit).
worker_connections = 4096
