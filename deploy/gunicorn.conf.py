"""gunicorn settings for the gateway: 'gateway serve' loads this file; so can
'gunicorn -c deploy/gunicorn.conf.py' (then set GATEWAY_CONFIG). Each non-default setting
says why."""

# The app factory; it reads the file that GATEWAY_CONFIG names ('gateway serve --config' sets it).
wsgi_app = "gateway:make_app()"

# Loopback: nginx (deploy/nginx.conf) faces the network. Override with 'gateway serve --bind'.
bind = ["127.0.0.1:8080"]

# gthread needs nothing beyond the standard library. A stream holds a thread for its whole
# length, so concurrency is workers * threads open streams.
worker_class = "gthread"
workers = 2
threads = 128

# gthread workers keep heartbeating while a thread waits on a quiet stream, so this only kills
# a worker whose main loop is stuck; it never cuts a long answer.
timeout = 120

# On HUP or stop, open streams get this long to finish (a long answer can take minutes).
graceful_timeout = 600

# Clients (and nginx's upstream keepalive) reuse connections between calls.
keepalive = 75

# gunicorn 27's control socket defaults to one path per user (~/.gunicorn/gunicorn.ctl), so two
# gateways on one host would fight over it; we manage the server with signals (HUP, TERM).
control_socket_disable = True

# The access log is the gateway's own JSON line (logger 'gateway.access'); gunicorn's would
# duplicate it without the key name, model or tokens.
accesslog = None

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
