"""gateway: the Anthropic Messages API, served with our own keys in front of an upstream.

A WSGI application that accepts the requests real Anthropic clients send (the Python and
TypeScript SDKs, Claude Code, curl), checks the client's key against a hashed key file,
rewrites the public model id to the configured upstream id, forwards the request with our
upstream key, and relays the upstream's JSON or SSE stream byte for byte, each chunk the
moment it arrives.

Run it::

    gateway keys add alice                      # prints alice's key once
    ANTHROPIC_API_KEY=sk-ant-... gateway serve  # gunicorn on 127.0.0.1:8080

Embed it::

    from gateway import Config, make_app
    application = make_app(Config.from_file("/etc/gateway/gateway.ini"))

Runtime needs the standard library and ``requests``; ``gateway serve`` also needs gunicorn.
"""

import argparse
import atexit
import collections
import configparser
import contextlib
import contextvars
import dataclasses
import datetime
import fcntl
import functools
import gzip
import hashlib
import hmac
import http
import json
import logging
import marshal
import math
import mmap
import operator
import os
import re
import secrets
import select
import shutil
import socket
import sqlite3
import ssl
import struct
import sys
import tempfile
import termios
import threading
import time
import types
import urllib.parse

# requests and urllib3 (urllib3's pools carry our upstream calls: send_pooled) are imported
# by the functions that call the upstream, not here: with http.cookiejar they are half of
# this module's import (about 60 ms of 120 on this project's machine), which 'gateway usage'
# never needs (docs/performance.md). An app imports them as it is built (Gateway), never on
# a request; each function's own 'import' of a loaded module costs about 0.1 us.

#: The release (setup.cfg reads it from here; 'gateway --version' prints it).
__version__ = "0.1.0"

__all__ = ["APIError", "Config", "KeyEntry", "KeyStore", "Gateway", "make_app", "main"]

log = logging.getLogger("gateway")
access_log = logging.getLogger("gateway.access")


# ---------------------------------------------------------------------------------------------
# Constants
# ---------------------------------------------------------------------------------------------

#: Sent upstream when the client sent no ``anthropic-version`` (curl users often don't); the
#: SDKs always send one and it is forwarded as received (docs/protocol.md, "Client
#: generations").
DEFAULT_ANTHROPIC_VERSION = "2023-06-01"

#: Client headers forwarded upstream. Everything else (credentials, cookies, host, the RFC 9110
#: 7.6.1 hop-by-hop headers, proxy and forwarding headers, accept-encoding) is dropped: an
#: allowlist cannot leak a header nobody thought of. ``anthropic-*`` must pass unchanged as an
#: open list (docs/protocol.md, "Request headers").
FORWARDED_PREFIXES = ("anthropic-", "x-stainless-", "x-claude-code-")
FORWARDED_HEADERS = frozenset({"user-agent", "x-client-request-id", "x-app"})

#: RFC 9110 5.1 and 5.5: a field name is a token, a field value VCHAR, obs-text, SP and HTAB.
#: A WSGI server hands values over as latin-1 text; anything outside these cannot be sent on
#: as it came (http.client raises on CR/LF and on characters beyond latin-1).
FIELD_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9a-z]+")
FIELD_VALUE = re.compile(r"[\t\x20-\x7e\x80-\xff]*")

#: Upstream response headers relayed to the client (docs/protocol.md, "Response headers"), an
#: allowlist too: framing and hop-by-hop headers are the server's to set (a WSGI app must not
#: emit them, PEP 3333); infrastructure headers and ``anthropic-organization-id`` (our org)
#: stay behind.
RELAYED_PREFIXES = ("anthropic-ratelimit-",)
RELAYED_HEADERS = frozenset({
    "content-type", "request-id", "retry-after", "retry-after-ms", "x-should-retry",
})

#: count_tokens takes "the same message shape" but rejects these fields with 400 "Extra inputs
#: are not permitted" (docs/protocol.md, "count_tokens fields"), so they are dropped before
#: forwarding: the Messages create fields that count_tokens lacks, GA and beta, as the anthropic
#: SDK's own types list them (tests/test_sdk.py derives the set and fails when the API adds
#: one), plus ``temperature``, ``top_p`` and ``top_k``, which older SDKs still send.
COUNT_TOKENS_DROPPED_FIELDS = frozenset({
    "max_tokens", "stream", "stop_sequences", "metadata", "service_tier", "container",
    "inference_geo", "thread", "diagnostics", "fallbacks", "fallback_credit_token",
    "temperature", "top_p", "top_k",
})

DEFAULT_MODELS = types.MappingProxyType({
    "claude-opus-4-8": "claude-opus-4-8",
    "claude-opus-4-7": "claude-opus-4-7",
})

#: Read size for relaying a stream. ``read1`` returns whatever is available up to this size,
#: so it bounds memory per read without ever waiting for the buffer to fill.
STREAM_READ_SIZE = 65536
BODY_READ_SIZE = 262144

#: A refusal that cannot succeed within this many seconds tells clients not to retry. Both
#: SDKs obey ``x-should-retry: false`` before the status; without it both sleep for whatever
#: ``retry-after`` says, hours included, and try twice more (@anthropic-ai/sdk 1.14
#: src/client.ts ``shouldRetry``, ``retryRequest``; anthropic 2.17
#: src/anthropic/_base_client.py ``_should_retry``, ``_calculate_retry_timeout``).
RETRY_HORIZON = 60
NO_RETRY = ("x-should-retry", "false")

KEY_PREFIX = "sk-gw-"
#: What an Anthropic API key (and Claude Code's Anthropic login token) starts with: never one of
#: ours, so when it comes beside a gateway key it is the one to ignore.
ANTHROPIC_KEY_PREFIX = "sk-ant-"
#: The access log's ``error`` for a stream the client abandoned (not counted as an error).
CLIENT_WENT_AWAY = "client went away"
JSON_CONTENT_TYPE = "application/json"
SSE_CONTENT_TYPE = "text/event-stream"


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------

class APIError(Exception):
    """An error answered to the client in Anthropic's envelope.

    Raised anywhere in request handling; rendered once, by ``Gateway._render_error``, as
    ``{"type": "error", "error": {"type": error_type, "message": message}, "request_id": …}``
    with ``status`` and any extra ``headers`` (for example ``Allow`` on a 405).
    """

    def __init__(self, status, error_type, message, headers=(), model=None):
        super().__init__(message)
        self.status = status
        self.error_type = error_type
        self.message = message
        self.headers = list(headers)
        self.model = model  # a configured public model the refusal is about (access log)


#: Seconds a browser may reuse a CORS preflight's answer (Chromium caps it at 7200).
CORS_MAX_AGE = 600

#: Reason phrases that http.HTTPStatus lacks: nginx's 499 and the API's 529 (ERR).
NONSTANDARD_REASONS = {499: "Client Closed Request", 529: "Overloaded"}


def status_line(status):
    """'402 Payment Required': the phrase from http.HTTPStatus, so an upstream status the
    gateway never makes itself still goes out under its own name."""
    try:
        reason = http.HTTPStatus(status).phrase
    except ValueError:
        reason = NONSTANDARD_REASONS.get(status, "Unknown")
    return "%d %s" % (status, reason)


def error_body(error_type, message, request_id):
    return json.dumps({
        "type": "error",
        "error": {"type": error_type, "message": message},
        "request_id": request_id,
    }).encode()


def sse_error_event(message):
    """The event a client gets when the upstream fails after the stream started
    (docs/protocol.md, "Errors inside a stream"): the SDKs raise it as an API error instead of
    silently ending on a truncated stream."""
    data = json.dumps({"type": "error", "error": {"type": "api_error", "message": message}})
    return b"event: error\ndata: " + data.encode() + b"\n\n"


# ---------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------

def _setting(default, doc, unit="", restart=False, secret=False):
    """A ``[gateway]`` setting. docs/configuration.md is generated from these (run
    ``python tests/docs_config.py --write``): ``doc`` says what it does, ``unit`` what its
    number counts, and ``restart`` that a reload (HUP) is not enough for a change to apply.
    A ``secret`` one is left out of the Config's repr and of its errors (SECRET_SETTINGS)."""
    return dataclasses.field(default=default, repr=not secret, metadata={
        "doc": doc, "unit": unit, "restart": restart, "secret": secret})


@dataclasses.dataclass(frozen=True)
class Config:
    """Everything the gateway needs to know, parsed once at the edge.

    Build it with ``Config.from_file(path)`` (the INI file that ``gateway serve`` uses),
    ``Config.from_environ(os.environ)`` (``GATEWAY_CONFIG`` names the file) or directly as
    ``Config(upstream_url=…, keys_file=…)`` when embedding. Paths in an INI file are relative
    to the file. Section ``[gateway]`` holds the settings below; section ``[models]`` maps each
    public model id to its upstream id and, when present, replaces the default map.

    The upstream key comes from ``upstream_key_file`` when the config names one; otherwise
    from ``ANTHROPIC_API_KEY`` when that is set; otherwise from ``upstream.key`` beside the
    config file. The key file is re-read when it changes, so the upstream key can be rotated
    without a restart. Security: ``trust_env`` is off, so ``HTTPS_PROXY`` and
    ``REQUESTS_CA_BUNDLE`` are ignored unless you turn it on (``~/.netrc`` always is);
    ``trusted_proxies`` must list only your own proxies.

    TLS trust: the upstream's certificate is verified against requests' CA bundle
    (``requests.certs.where()``, certifi's file), not the operating system's store, so a slim
    image without CA certificates works as plain requests does. ``upstream_ca_file`` replaces
    that bundle (a private CA: an egress gateway, an internal upstream); with ``trust_env``,
    ``REQUESTS_CA_BUNDLE`` or ``CURL_CA_BUNDLE`` replaces it unless ``upstream_ca_file`` is set.
    """

    upstream_url: str = _setting(
        "https://api.anthropic.com", "Base URL of the upstream Messages API (no /v1).")
    upstream_key_file: str = _setting(
        None, "File of upstream API keys, one per line, first first. Unset: ANTHROPIC_API_KEY "
        "when that is set, else upstream.key beside the config file.")
    keys_file: str = _setting(
        "gateway.keys", "The client key file: name, digest, models, enabled (gateway keys).")
    state_file: str = _setting(
        "gateway.state", "SQLite file the workers share for per-key limits and last use; with "
        "limits_backend, only while Redis is away and limits_backend_down = local. Its "
        "directory, which the workers must be able to write, also holds the client key "
        "file's last good copy.")
    limits_backend: str = _setting(
        None, "One Redis that every host shares for per-key limits and last use: "
        "redis://HOST:PORT/DB, rediss://HOST:PORT/DB or unix://PATH?db=N (the 'redis' "
        "extra). None: per host, in state_file. Never logged: it may hold Redis's password.",
        secret=True)
    limits_lease: float = _setting(
        60.0, "A concurrency slot held by a host that died is free again after this long "
        "(limits_backend); live requests renew theirs every third of it.", unit="seconds")
    limits_backend_down: str = _setting(
        "local", "While limits_backend cannot be reached: local (limits per host, in "
        "state_file), open (no limits) or closed (limited keys get 503).")
    max_body_bytes: int = _setting(
        32 * 1024 * 1024, "Largest request body accepted; larger gets 413 (upstream's limit).",
        unit="bytes")
    body_timeout: float = _setting(
        60.0, "Seconds a client has to send its whole request body; a slower one gets 408.",
        unit="seconds")
    connect_timeout: float = _setting(10.0, "Seconds to connect to the upstream.",
                                      unit="seconds")
    read_timeout: float = _setting(
        600.0, "Idle seconds between upstream reads; long silent thinking is normal.",
        unit="seconds")
    pool_maxsize: int = _setting(
        8, "Idle upstream connections each worker keeps for reuse. A burst opens as many as "
        "it needs; those beyond this number are closed as their requests end.",
        unit="connections")
    trust_env: bool = _setting(
        False, "Take the upstream's proxy (HTTPS_PROXY, HTTP_PROXY, ALL_PROXY, NO_PROXY) and "
        "CA bundle (REQUESTS_CA_BUNDLE, CURL_CA_BUNDLE) from the environment, as requests "
        "does; never .netrc.")
    upstream_proxy: str = _setting(
        None, "Forward proxy for upstream calls (CONNECT for an https upstream); wins over "
        "trust_env's proxy variables. Never logged: it may hold the proxy's password.",
        secret=True)
    upstream_ca_file: str = _setting(
        None, "PEM file of the CA certificates that the upstream's certificate must chain "
        "to, in place of requests' bundle (certifi); re-read when it changes (docs/upstream.md).")
    trusted_proxies: frozenset = _setting(
        frozenset(), "Addresses whose X-Real-IP header names the client (nginx).")
    cors_origins: frozenset = _setting(
        frozenset(), "Browser origins (https://app.example, comma-separated; * for any) whose "
        "pages may call the gateway with fetch (CORS); a key's origins= adds its own. Empty: "
        "no CORS, as before.")
    metrics: bool = _setting(
        False, "Serve Prometheus metrics at GET /metrics (needs the 'metrics' extra). Turning "
        "it on takes a restart: 'gateway serve' prepares the workers' shared counters at start.",
        restart=True)
    metrics_token_file: str = _setting(
        None, "File of the bearer tokens /metrics accepts, one per line (none: no token).")
    models: types.MappingProxyType = dataclasses.field(
        default_factory=lambda: DEFAULT_MODELS, metadata={"doc": "Public id -> upstream id."})
    upstream_key: str = dataclasses.field(default=None, repr=False, compare=False, metadata={
        "doc": "The upstream key itself (from ANTHROPIC_API_KEY); never written anywhere."})
    base_dir: str = dataclasses.field(default="", metadata={
        "doc": "Directory that relative paths are relative to."})

    @classmethod
    def from_environ(cls, environ):
        """The config that ``GATEWAY_CONFIG`` names, or the defaults (relative to the current
        directory) when it names none."""
        path = environ.get("GATEWAY_CONFIG")
        if path:
            return cls.from_file(path, environ)
        return cls._with_environ({}, {}, os.getcwd(), environ)

    @classmethod
    def from_file(cls, path, environ=None):
        """Parse the INI file at ``path``; raise ``ValueError`` naming the file, the line and
        the setting that is wrong (``config gateway.ini, line 7: read_timeout = ten: not a
        number``)."""
        return cls.from_data(read_config_data(path), path, environ)

    @classmethod
    def from_data(cls, data, path, environ=None):
        """The config whose INI file ``path`` held ``data`` (bytes) when it was read: 'gateway
        serve' workers build theirs from the bytes their master checked (served_config)."""
        try:
            sections, lines = _read_ini(decode_utf8(data), path)
        except ValueError as exc:
            raise ValueError("config %s, %s" % (path, exc)) from None
        base_dir = os.path.dirname(os.path.abspath(path))
        return cls._with_environ(sections.get("gateway", {}), sections.get("models", {}),
                                 base_dir, os.environ if environ is None else environ,
                                 lambda *where: "config %s, %s: " % (
                                     path, "line %d" % lines[where] if where in lines
                                     else "[%s] %s" % where))

    @classmethod
    def _with_environ(cls, settings, models, base_dir, environ, at=lambda *where: ""):
        """The Config of these [gateway] and [models] texts. ``at(section, name)`` begins an
        error about that setting: 'config FILE, line N: '."""
        values = {"base_dir": base_dir}
        known = {field.name: field for field in dataclasses.fields(cls)
                 if field.name not in ("models", "upstream_key", "base_dir")}
        for name, text in settings.items():
            if name not in known:
                raise ValueError("%sunknown setting %s in [gateway]; known: %s"
                                 % (at("gateway", name), name, ", ".join(sorted(known))))
            try:
                values[name] = _parse_setting(known[name], text)
            except ValueError as exc:
                raise ValueError(at("gateway", name) + str(exc)) from None
        if models:
            for public, upstream in models.items():
                if not upstream.strip():
                    raise ValueError("%smodel %s maps to nothing in [models]"
                                     % (at("models", public), public))
            values["models"] = types.MappingProxyType(
                {public: upstream.strip() for public, upstream in models.items()})
        if not values.get("upstream_key_file") and environ.get("ANTHROPIC_API_KEY"):
            values["upstream_key"] = environ["ANTHROPIC_API_KEY"].strip()
        return cls(**values)

    def path(self, name):
        """A path setting made absolute against ``base_dir``."""
        return os.path.join(self.base_dir or os.getcwd(), name)

    @property
    def keys_path(self):
        return self.path(self.keys_file)

    @property
    def state_path(self):
        return self.path(self.state_file)

    @property
    def upstream_key_path(self):
        """The upstream key file in use, or None when the key comes from the environment."""
        if self.upstream_key and not self.upstream_key_file:
            return None
        return self.path(self.upstream_key_file or "upstream.key")


def read_config_data(path):
    """The bytes of the INI file at ``path``, or ValueError 'cannot read config PATH: why'."""
    try:
        with open(path, "rb") as file:
            return file.read()
    except OSError as exc:
        raise ValueError("cannot read config %s: %s" % (path, describe(exc))) from None


#: The sections a config file may have; any other (a typo like [gatway]) is an error, since
#: its settings would be silently ignored.
CONFIG_SECTIONS = ("gateway", "models")


def _read_ini(text, path):
    """({section: {name: value}}, {(section, name): line number}) of an INI text, or
    ValueError beginning 'line N: '. configparser parses it; the line numbers, which it
    keeps only for its own errors, come from a scan of the same lines. No error repeats a
    line that is not a setting: it may be a key pasted in the wrong file."""
    parser = configparser.ConfigParser(interpolation=None, default_section="\0")
    parser.optionxform = str  # model ids are case-sensitive
    try:
        parser.read_string(text, source=path)
    except configparser.MissingSectionHeaderError as exc:
        raise ValueError("line %d: a setting before any section: begin with [gateway]"
                         % exc.lineno) from None
    except configparser.DuplicateSectionError as exc:
        raise ValueError("line %d: section [%s] is there twice" % (exc.lineno, exc.section)) \
            from None
    except configparser.DuplicateOptionError as exc:
        raise ValueError("line %d: %s is set twice in [%s]" % (exc.lineno, exc.option,
                                                              exc.section)) from None
    except configparser.ParsingError as exc:
        raise ValueError("line %d: not a setting (expected name = value)"
                         % exc.errors[0][0]) from None
    lines, section = {}, None
    for number, line in enumerate(text.split("\n"), 1):  # configparser's lines: not \f, \r
        stripped = line.strip()
        if not stripped or stripped[0] in "#;":
            continue
        # A value's continuation line may be taken for a setting here: harmless, as the first
        # line that names a setting is the one kept.
        header = parser.SECTCRE.match(stripped)
        if header:
            section = header.group("header")
            lines.setdefault((section, None), number)
        else:
            name = re.split(r"[=:]", stripped, maxsplit=1)[0].strip()
            lines.setdefault((section, name), number)
    for name in parser.sections():
        if name not in CONFIG_SECTIONS:
            raise ValueError("line %d: unknown section [%s]; known: %s" % (
                lines[name, None], name, ", ".join("[%s]" % s for s in CONFIG_SECTIONS)))
    return {name: dict(parser[name]) for name in parser.sections()}, lines


#: Settings whose value may carry a password (``secret``): their errors never repeat it.
SECRET_SETTINGS = frozenset(field.name for field in dataclasses.fields(Config)
                            if field.metadata.get("secret"))


def _parse_setting(field, text):
    """A setting's value from its text, or ValueError 'name = text: what is wrong'."""
    text = text.strip()
    if text.startswith((ANTHROPIC_KEY_PREFIX, KEY_PREFIX)):
        # A key pasted where its file's name goes (upstream_key_file = sk-ant-…) would be
        # repeated by every error and log line that names the setting's value or the path.
        raise ValueError("%s = sk-…: that is a key, not a setting (the upstream key goes in "
                         "the file that upstream_key_file names)" % field.name)
    first, _, more = text.partition("\n")
    if more and field.type not in ("frozenset", frozenset):  # a list may go on over lines
        # An INI line that is indented continues the value above it, so an indented
        # 'read_timeout = ten' under upstream_url read as part of the URL ('the port must…').
        raise ValueError("%s = %s: the line after it is indented, which makes it part of this "
                         "value: unindent it" % (
                             field.name, "…" if field.name in SECRET_SETTINGS else first))
    try:
        return _parse_value(field, text)
    except ValueError as exc:
        if field.name in SECRET_SETTINGS:
            raise
        raise ValueError("%s = %s: %s" % (field.name, text, exc)) from None


def _parse_value(field, text):
    if field.type in ("int", int):
        try:
            value = int(text)
        except ValueError:
            raise ValueError("not a whole number") from None
        if value <= 0:
            raise ValueError("must be positive")
        return value
    if field.type in ("float", float):
        try:
            value = float(text)
        except ValueError:
            raise ValueError("not a number") from None
        if not 0 < value < math.inf:
            raise ValueError("must be a positive, finite number")
        if field.name == "limits_lease" and value < 1:
            # Renewals every lease/3 run from the Deadlines thread, which looks every 0.25 s.
            raise ValueError("must be at least 1 (second)")
        return value
    if field.type in ("bool", bool):
        return _parse_bool(text)
    if field.name == "cors_origins":
        return parse_origins(text, allow_any=True)
    if field.type in ("frozenset", frozenset):
        return frozenset(item.strip() for item in text.split(",") if item.strip())
    if field.name == "upstream_url":
        return parse_upstream_url(text)
    if field.name == "limits_backend":
        return _parse_limits_backend(text)
    if field.name == "limits_backend_down" and text not in LIMITS_DOWN_POLICIES:
        raise ValueError("expected %s" % ", ".join(LIMITS_DOWN_POLICIES))
    if field.name == "upstream_proxy":
        return parse_proxy_url(text)
    return text


#: An origin as a browser sends it (RFC 6454 6.1): scheme://host[:port], nothing after.
ORIGIN = re.compile(r"https?://[a-z0-9.\-\[\]:]+")


def parse_origins(text, allow_any=False):
    """'https://a.example, http://localhost:5173' -> frozenset; ValueError naming the first
    entry that is not an origin. Lower case, as browsers send them; a trailing / dropped."""
    origins = frozenset(item.strip().rstrip("/").lower() for item in text.split(",")
                        if item.strip())
    for origin in sorted(origins):
        if not (ORIGIN.fullmatch(origin) or allow_any and origin == "*"):
            raise ValueError("%r is not an origin like https://app.example" % origin[:80])
    return origins


def _checked_port(parts):
    """The port of ``parts`` (from urlsplit; None when the URL names none), or ValueError
    when it is not a number from 1 to 65535. urlsplit refuses a port past 65535 or not a
    number only when asked for it, and port 0 passes it but reaches no server."""
    try:
        port = parts.port
    except ValueError:
        port = 0
    if port == 0:
        raise ValueError("the port must be a number from 1 to 65535")
    return port


def parse_proxy_url(text):
    """``upstream_proxy`` (or trust_env's proxy), or ValueError saying what is wrong with it
    but never what it is: it may carry the proxy's password. Parsed by urllib3, as the
    workers' pool will parse it (see parse_upstream_url)."""
    import urllib3
    problem = "setting upstream_proxy: expected http://[user:password@]host:port"
    parts = urllib.parse.urlsplit(text)
    try:
        _checked_port(parts)
        parsed = urllib3.util.parse_url(text)
    except ValueError:
        raise ValueError(problem) from None
    if parts.scheme not in ("http", "https") or not parsed.host:
        raise ValueError(problem)
    return text


def parse_upstream_url(text):
    """``upstream_url`` without its trailing slash, or ValueError saying what is wrong.

    Facts -> decision: a looser check (``urlsplit``, which never looks at the port) once
    passed ``http://127.0.0.1:99999``, and urllib3, which builds the workers' connection
    pool, then refused it in every worker as it booted: gunicorn stopped. So the URL is
    parsed here by urllib3 and prepared by requests, exactly as a request will be."""
    import requests
    import urllib3
    parts = urllib.parse.urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError("expected http(s)://host[:port]")
    _checked_port(parts)  # before urllib3, which says only 'failed' of a bad port
    try:
        parsed = urllib3.util.parse_url(text)
    except ValueError as exc:  # urllib3's LocationParseError is one
        raise ValueError(str(exc).replace("Failed to parse: ", "")) from None
    if not parsed.host:
        raise ValueError("no host name")
    if parts.username is not None:
        raise ValueError("no user:password@ here: the upstream key goes in upstream_key_file")
    if parts.query or parts.fragment or text.endswith(("?", "#")):
        raise ValueError("no ?query or #fragment: the gateway appends /v1/messages to it")
    url = text.rstrip("/")
    if parts.path.rstrip("/").endswith("/v1"):
        raise ValueError("remove the /v1 at the end: the gateway adds /v1/messages itself, "
                         "so requests would go to /v1/v1/messages")
    try:
        requests.Request("POST", url + "/v1/messages").prepare()
    except requests.RequestException as exc:
        raise ValueError(str(exc)) from None
    return url


#: What limits_backend_down may say, and what each means while Redis is away (RedisLimits).
LIMITS_DOWN_POLICIES = {
    "local": "limits apply per host, in each host's state_file",
    "open": "limited keys are served without limits",
    "closed": "limited keys get 503",
}


def _parse_limits_backend(text):
    """A Redis URL as redis-py's ``from_url`` reads it; checked here (without importing redis)
    so that a typo fails 'gateway check', never a worker. The error never repeats the URL:
    it may carry a password."""
    parts = urllib.parse.urlsplit(text)
    if not ((parts.scheme in ("redis", "rediss") and parts.hostname)
            or (parts.scheme == "unix" and parts.path)):
        raise ValueError("setting limits_backend: expected redis://HOST:PORT/DB, "
                         "rediss://HOST:PORT/DB or unix://PATH?db=N")
    try:
        _checked_port(parts)
    except ValueError as exc:
        raise ValueError("setting limits_backend: %s" % exc) from None
    return text


def redacted_url(url):
    """``url`` without its user name and password, for logs and 'gateway check'."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = "[%s]" % host
    netloc = host + (":%d" % parts.port if parts.port else "")
    query = "&".join(pair for pair in parts.query.split("&") if pair.startswith("db="))
    return "%s://%s%s%s" % (parts.scheme, netloc, parts.path, "?" + query if query else "")


def _parse_bool(text):
    lowered = text.lower()
    if lowered in ("1", "yes", "true", "on"):
        return True
    if lowered in ("0", "no", "false", "off"):
        return False
    raise ValueError("expected true or false")


# ---------------------------------------------------------------------------------------------
# Client keys: the key file, its digests, and reloading it when it changes
# ---------------------------------------------------------------------------------------------
#
# One key per line, fields separated by white space: four fixed fields, then options.
#
#     name   digest                 models                            enabled   options…
#     alice  sha256:9f86d08...      *                                 enabled
#     ci     sha256:1a2b:77af...    claude-opus-4-8,claude-opus-4-7   disabled  rpm=60
#
# The digest is ``sha256:<hex>`` of the key, or ``sha256:<salt>:<hex>`` of salt + key. Keys made
# by ``gateway keys add`` carry 256 random bits, so a salt adds nothing for them; the salted
# form is for keys imported from elsewhere. ``*`` allows every configured model. Options:
#
#     expires=2027-01-01T00:00:00Z    the key is refused from then on
#     previous=sha256:…               the digest before 'gateway keys rotate', still accepted
#     previous_until=…                until this time (the rotation's grace period)
#     rpm=N  concurrency=N  tokens_per_day=N    limits (see HostState)
#     origins=https://app.example,…   browser origins whose pages may use this key (CORS)

LIMIT_OPTIONS = ("rpm", "concurrency", "tokens_per_day")
#: Salted digests cost a SHA-256 each per request (KeyStore); 'gateway check' warns above this.
SALTED_KEYS_WARNING = 300
TIME_OPTIONS = ("expires", "previous_until")


@dataclasses.dataclass(frozen=True)
class KeyEntry:
    name: str
    digest: bytes
    salt: bytes = b""
    models: frozenset = None  # None: every configured model
    enabled: bool = True
    expires: float = None  # epoch seconds
    previous: tuple = None  # (salt, digest) of the key before a rotation
    previous_until: float = None
    rpm: int = None
    concurrency: int = None
    tokens_per_day: int = None
    origins: frozenset = frozenset()  # CORS, beside the config's cors_origins

    def matches(self, key, now):
        """Whether ``key`` is this entry's key, or its previous key within the grace period.
        Both digests are always computed and compared in constant time."""
        encoded = key.encode("utf-8", "surrogatepass")
        current = _digest_equals(encoded, self.salt, self.digest)
        previous = self.previous is not None and _digest_equals(encoded, *self.previous)
        return current or (previous and now < (self.previous_until or 0))

    def allows(self, public_model):
        return self.models is None or public_model in self.models

    def expired(self, now):
        return self.expires is not None and now >= self.expires

    @property
    def limited(self):
        return any(getattr(self, name) for name in LIMIT_OPTIONS)

    def to_line(self):
        models = ",".join(sorted(self.models)) if self.models is not None else "*"
        fields = [self.name, _format_digest(self.salt, self.digest), models,
                  "enabled" if self.enabled else "disabled"]
        if self.previous is not None:
            fields.append("previous=" + _format_digest(*self.previous))
        for name in TIME_OPTIONS:
            if getattr(self, name) is not None:
                fields.append("%s=%s" % (name, format_time(getattr(self, name))))
        for name in LIMIT_OPTIONS:
            if getattr(self, name):
                fields.append("%s=%d" % (name, getattr(self, name)))
        if self.origins:
            fields.append("origins=" + ",".join(sorted(self.origins)))
        return "\t".join(fields)


def _digest_equals(encoded_key, salt, digest):
    return hmac.compare_digest(hashlib.sha256(salt + encoded_key).digest(), digest)


def _format_digest(salt, digest):
    return "sha256:%s%s" % (salt.hex() + ":" if salt else "", digest.hex())


def _parse_digest(text):
    parts = text.split(":")
    if parts[0] != "sha256" or len(parts) not in (2, 3):
        raise ValueError("digest must be sha256:<hex> or sha256:<salt>:<hex>")
    try:
        salt = bytes.fromhex(parts[1]) if len(parts) == 3 else b""
        digest = bytes.fromhex(parts[-1])
    except ValueError:
        raise ValueError("digest is not hexadecimal") from None
    if len(digest) != 32:
        raise ValueError("a sha256 digest has 64 hex digits")
    return salt, digest


def parse_time(text):
    """'2027-01-01' or '2027-01-01T12:00:00Z' (UTC unless an offset is given) -> epoch."""
    try:
        moment = datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError("%r is not a date or an ISO 8601 time" % text) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=datetime.timezone.utc)
    return moment.timestamp()


def format_time(epoch):
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))


class KeyStore:
    """An immutable set of key entries, as parsed from one version of the key file.

    Looking a key up costs one SHA-256 and one dict lookup, whatever the number of keys:
    unsalted digests (every key ``gateway keys`` makes) are indexed by digest. Why indexing
    by ``sha256(presented key)`` leaks nothing an attacker can use: the dict is keyed by the
    hash, never by the key, so the time a lookup takes depends on the hash's bits, and learning
    bits of the hash of a guess says nothing about any stored key (SHA-256 is preimage
    resistant; a near-miss in hash space is not a near-miss in key space). To find a key by
    timing, an attacker would have to guess one of 2**256 keys ``gateway keys add`` draws,
    which no timing signal shortens. Salted digests (keys imported from elsewhere) cannot be
    indexed, since each needs its own hash; they are compared one by one, in constant time,
    and ``gateway check`` warns when there are many.
    """

    def __init__(self, entries=()):
        self.entries = tuple(entries)
        self._by_name = {}
        self._current = {}  # unsalted sha256(key) -> (position, entry)
        self._previous = {}  # the same for digests from before a rotation
        self._salted = []  # (position, entry) with a salted current or previous digest
        # Every origin some key names (CORS): what a preflight, which carries no key, may
        # pass. Gathered once per key file, not per preflight (3 ms at 100,000 keys).
        self.origins = frozenset().union(*(entry.origins for entry in self.entries))
        for position, entry in enumerate(self.entries):
            self._by_name.setdefault(entry.name, entry)
            previous_salt, previous = entry.previous or (b"", None)
            if entry.salt or previous_salt:
                self._salted.append((position, entry))
            if not entry.salt:
                self._current.setdefault(entry.digest, (position, entry))
            if previous is not None and not previous_salt:
                self._previous.setdefault(previous, (position, entry))

    def find(self, key, now=None):
        """The entry whose digest matches ``key`` (its previous digest within the rotation's
        grace period), or None; the first in the file when several match."""
        now = time.time() if now is None else now
        digest = digest_key(key)
        found = [self._current[digest]] if digest in self._current else []
        previous = self._previous.get(digest)
        if previous is not None and now < (previous[1].previous_until or 0):
            found.append(previous)
        # Every salted entry is compared, with hmac.compare_digest, and the loop never stops
        # early, so the time taken says nothing about which digest came close.
        found += [(position, entry) for position, entry in self.salted_entries(now)
                  if entry.matches(key, now)]
        return min(found, key=lambda hit: hit[0])[1] if found else None

    def salted_entries(self, now):
        """(position, entry) for the entries whose key can only be checked by hashing it with
        the entry's salt: a salted digest, or a salted previous one still in its grace period."""
        return [(position, entry) for position, entry in self._salted
                if entry.salt or now < (entry.previous_until or 0)]

    def get(self, name):
        return self._by_name.get(name)

    def replace(self, name, **changes):
        """A new store with the entry called ``name`` changed (appended when new)."""
        if self.get(name) is None:
            return KeyStore(self.entries + (KeyEntry(name, **changes),))
        return KeyStore(dataclasses.replace(e, **changes) if e.name == name else e
                        for e in self.entries)


def digest_key(key):
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()


def parse_key_file(text):
    """Parse the key file's text into a ``KeyStore``; raise ValueError naming the bad line.

    A name or a digest (current or previous) may appear once: one key under two names would
    be logged and limited as whichever line came first, which is never what an edit meant.
    """
    entries, names, digests = [], {}, {}
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        try:
            entry = _parse_key_line(line)
        except ValueError as exc:
            raise ValueError("line %d: %s" % (number, exc)) from None
        if entry.name in names:
            raise ValueError("line %d: duplicate name %r (also line %d)"
                             % (number, entry.name, names[entry.name]))
        names[entry.name] = number
        for digest in ((entry.salt, entry.digest), entry.previous):
            if digest in digests:  # named by line, never shown: the log must not hold it
                raise ValueError("line %d: the same key digest as line %d"
                                 % (number, digests[digest]))
            if digest is not None:
                digests[digest] = number
        entries.append(entry)
    return KeyStore(entries)


def _parse_key_line(line):
    fields = line.split()
    if len(fields) < 4:
        raise ValueError("expected 4 fields (name digest models enabled), found %d"
                         % len(fields))
    name, digest, models, enabled = fields[:4]
    salt, digest_bytes = _parse_digest(digest)
    if enabled not in ("enabled", "disabled"):
        # The errors name fields by position, never by content: the log must not show a
        # digest that an editing slip put in the wrong place.
        raise ValueError("fourth field must be 'enabled' or 'disabled'")
    allowed = None if models == "*" else frozenset(m for m in models.split(",") if m)
    options = {}
    for number, field in enumerate(fields[4:], 5):
        try:
            option, value = _parse_key_option(field)
        except ValueError as exc:
            raise ValueError("field %d: %s" % (number, exc)) from None
        if option in options:
            raise ValueError("field %d: %s given twice" % (number, option))
        options[option] = value
    return KeyEntry(name, digest_bytes, salt, allowed, enabled == "enabled", **options)


def _parse_key_option(field):
    name, equals, value = field.partition("=")
    if not equals:
        raise ValueError("expected name=value after the fourth field")
    if name == "previous":
        return name, _parse_digest(value)
    if name in TIME_OPTIONS:
        try:
            return name, parse_time(value)
        except ValueError:
            raise ValueError("%s is not a date or an ISO 8601 time" % name) from None
    if name in LIMIT_OPTIONS:
        if not value.isdigit() or int(value) <= 0:
            raise ValueError("%s must be a positive whole number" % name)
        return name, int(value)
    if name == "origins":
        return name, parse_origins(value)
    raise ValueError("unknown option; known: previous, %s, origins"
                     % ", ".join(TIME_OPTIONS + LIMIT_OPTIONS))


class WatchedFile:
    """A file parsed again whenever it changes on disk, keeping the last good version.

    Every worker checks the file's ``stat`` on use (a few microseconds), so an edit reaches
    every process without a restart or a signal. A file that is missing or fails to parse
    keeps the last good value and is logged once per change.

    With ``last_good`` (a ``LastGoodCopy``), each version that parses is also saved there, and
    a process that finds the file broken before it ever loaded it (a worker booting after a
    HUP or a restart) starts from that copy instead of from ``initial``.
    """

    def __init__(self, path, parse, initial, last_good=None, secret=True):
        """``secret``: warn when group or others may read the file (not for CA certificates,
        which are public)."""
        self.path = path
        self._secret = secret
        self._parse = parse
        self._value = initial
        self._last_good = last_good
        self._loaded = False  # whether _value came from the file or its last good copy
        self._signature = ()  # never equal to a real signature, so the first use loads

    def get(self):
        try:
            stat = os.stat(self.path)
            # ctime too: a chmod alone (making an unreadable file readable) changes only it.
            signature = (stat.st_mtime_ns, stat.st_ctime_ns, stat.st_size, stat.st_ino)
        except OSError as exc:
            signature = ("missing", exc.errno)
            if signature != self._signature:
                log.error("cannot read %s (%s); keeping the last good version",
                          self.path, exc.strerror)
                self._fall_back()
                self._signature = signature
            return self._value
        if signature != self._signature:
            # Load first, then publish the signature: a thread that sees the new signature
            # must find the new value. (The other order made a new worker's concurrent first
            # requests read the empty initial key store: 401s at every start and reload.)
            self._reload(stat.st_ctime_ns)
            if self._secret and too_open(stat.st_mode):
                log.warning("%s is readable by group or others (mode %03o): chmod 600 it",
                            self.path, stat.st_mode & 0o777)
            self._signature = signature
        return self._value

    def _reload(self, version):
        try:
            text = read_text(self.path)
            self._value = self._parse(text)
        except FILE_ERRORS as exc:
            log.error("cannot load %s (%s); keeping the last good version", self.path,
                      describe(exc))
            self._fall_back()
            return
        self._loaded = True
        log.info("loaded %s", self.path)  # once per change per worker: rotations show
        if self._last_good is not None:
            self._last_good.save(text, version)

    def _fall_back(self):
        """Before any version loaded, take the last good copy (once): a worker that boots
        while the file is broken must not refuse every key that worked a moment ago."""
        if self._loaded or self._last_good is None:
            return
        self._loaded = True
        try:
            self._value, saved = self._last_good.load(self._parse)
        except FILE_ERRORS as exc:
            log.error("no last good copy of %s to fall back on (%s): %s", self.path,
                      self._last_good.path, describe(exc))
            return
        log.warning("%s is broken; serving %s, the last version of it that parsed (saved "
                    "%s), until it is fixed", self.path, self._last_good.readable_path(),
                    format_time(saved))


class LastGoodCopy:
    """The last version of a file that parsed, saved where the workers may write (beside
    the state file: the config directory is read-only to the service under systemd), so that
    it survives a HUP and a restart. Mode 0600, written atomically.

    Several workers save as each loads a new version, so the copy records which version of
    the file it holds (the file's ctime, which every rename and write moves on, and no tool
    sets back) and, under a lock, is only ever replaced by a newer version, or by the one the
    file holds right now. Without that, a worker that loaded a version a moment late could
    overwrite the copy of the next one, and a broken edit would then bring back keys that
    were removed and lose keys that were added.
    """

    HEADER = "# gateway: the last version of %s that parsed (version %d). Do not edit.\n"
    _HEADER = re.compile(r"# gateway: the last version of (.*) that parsed \(version (\d+)\)")

    def __init__(self, path, source, legacy=None):
        """``legacy``: where an older release saved the copy; read while ``path`` does not
        exist (an upgrade), never written."""
        self.path = path
        self.source = source
        self.legacy = legacy

    def readable_path(self):
        """The copy that ``load`` reads: ``path``, else a copy under the legacy name."""
        if self.legacy and not os.path.lexists(self.path) and os.path.lexists(self.legacy):
            return self.legacy
        return self.path

    def load(self, parse):
        """(value, epoch seconds it was saved) of the copy; FILE_ERRORS when there is none
        (or it is the copy of another file)."""
        path = self.readable_path()
        text = read_text(path)
        if self._header(text.partition("\n")[0])[0] != self.source:
            raise ValueError("it is not a copy of %s" % self.source)
        return parse(text), os.stat(path).st_mtime

    def _header(self, line):
        """(source, version) that a copy's first line names, or (None, -1)."""
        match = self._HEADER.match(line)
        return (match.group(1), int(match.group(2))) if match else (None, -1)

    def save(self, text, version):
        """Keep ``text`` (the file at ``version``, its ctime in ns) unless the copy holds a
        newer version. Failing to save is logged, never raised: serving goes on."""
        try:
            with exclusive_lock(self.path + ".lock", owner_of=self.source):
                saved = self._saved_version()
                if saved == version or (saved > version and not self._current(version)):
                    return
                _write_atomically(self.path, self.HEADER % (self.source, version) + text,
                                  owner_of=self.source)
        except OSError as exc:
            log.warning("cannot save the last good copy of %s as %s (%s): a worker that "
                        "starts while that file is broken will have no keys", self.source,
                        self.path, describe(exc))

    def _saved_version(self):
        """The version the copy holds; -1 when there is none, or it is of another file."""
        try:
            with open(self.path, encoding="utf-8", errors="replace") as file:
                source, version = self._header(file.readline())
        except OSError:
            return -1
        return version if source == self.source else -1

    def _current(self, version):
        try:
            return os.stat(self.source).st_ctime_ns == version
        except OSError:
            return False


def last_good_keys(config):
    """Where the last client key file that parsed is kept: ``<key file's name>.<tag>.last-good``
    in the state file's directory, the one place the service itself may write (beside the
    key file in the default layout, where the state file is).

    The tag (8 hex digits of the SHA-256 of the key file's path, its directory's symlinks
    resolved) is there because two gateways may share a state directory and a key file name
    (/etc/gw-a/gateway.keys and /etc/gw-b/gateway.keys, state in /var/lib/gateway): under one
    name each would overwrite the other's copy, and a worker booting on a broken key file
    would find the other's ("not a copy of") and serve no key. The key file itself is not
    resolved: swapping what a symlinked key file points to keeps it the same file, and its
    copy. The name before the tag (``<key file's name>.last-good``) is still read while the
    tagged copy does not exist, if its first line names this key file."""
    directory = os.path.dirname(config.state_path)
    name = os.path.basename(config.keys_path)
    where = os.path.join(os.path.realpath(os.path.dirname(config.keys_path)), name)
    tag = hashlib.sha256(os.fsencode(where)).hexdigest()[:8]
    return LastGoodCopy(os.path.join(directory, "%s.%s.last-good" % (name, tag)),
                        config.keys_path, legacy=os.path.join(directory, name + ".last-good"))


@contextlib.contextmanager
def exclusive_lock(path, owner_of):
    """Hold an exclusive ``flock`` on the (empty) file ``path``, made if missing. It is opened
    read-only and made readable by all, so a lock file that root made (running 'gateway
    check' or 'gateway keys') never locks the service user out; as root, it is also given to
    the owner of ``owner_of``."""
    fd = os.open(path, os.O_RDONLY | os.O_CREAT, 0o644)
    try:
        if os.geteuid() == 0:
            with contextlib.suppress(OSError):
                reference = os.stat(owner_of)
                os.fchown(fd, reference.st_uid, reference.st_gid)
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _write_atomically(path, text, owner_of=None):
    """Replace ``path`` with ``text``: a temporary file (mode 0600) beside it, flushed to
    disk, then renamed over it, so a reader sees the old or the new version, never half of
    one. When running as root, the file takes the owner and group of ``owner_of`` (else of
    the file it replaces), so the service user can still read it."""
    fd, temporary = tempfile.mkstemp(dir=os.path.dirname(path) or ".",
                                     prefix="." + os.path.basename(path) + "-")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as file:
            file.write(text)
            file.flush()
            os.fsync(file.fileno())  # the rename must not publish an empty file after a crash
        os.chmod(temporary, 0o600)
        _keep_owner(temporary, owner_of or path)
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise


def _keep_owner(temporary, reference):
    try:
        old = os.stat(reference)
    except FileNotFoundError:
        return
    if (old.st_uid, old.st_gid) == (os.geteuid(), os.getegid()):
        return
    try:
        os.chown(temporary, old.st_uid, old.st_gid)
    except PermissionError:
        log.warning("%s is now owned by uid %d, not %d like %s: make sure the gateway can "
                    "read it", reference, os.geteuid(), old.st_uid, reference)


#: What reading and parsing one of our files can raise (see read_parsed).
FILE_ERRORS = (OSError, UnicodeDecodeError, ValueError)


def read_text(path, empty_ok=False):
    """The UTF-8 text at ``path``. An empty file is an error, never a version: it is what a
    reader sees between an in-place rewrite's truncate and its write (a key file emptied on
    purpose keeps a comment; 'gateway keys' writes one). ``empty_ok`` is for the commands,
    which read a file nobody is rewriting."""
    with open(path, "rb") as file:
        data = file.read()
    if not data and not empty_ok:
        raise ValueError("the file is empty")
    return decode_utf8(data)


def decode_utf8(data):
    """``data`` as text; bytes that are not UTF-8 are an error naming their line (an editor's
    line number), not the decoder's byte offset. A byte order mark (Notepad writes one) is
    not part of the first line."""
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError("line %d: not UTF-8 (byte 0x%02x); save the file as UTF-8" % (
            data.count(b"\n", 0, exc.start) + 1, data[exc.start])) from None


def read_parsed(path, parse):
    """``parse`` of the UTF-8 text at ``path`` (see read_text)."""
    return parse(read_text(path))


def describe(exc):
    """An error from FILE_ERRORS in a few words: 'Permission denied', not the errno tuple."""
    return getattr(exc, "strerror", None) or str(exc)


def too_open(mode):
    """Whether group or others may read a file holding secrets (or granting access)."""
    return bool(mode & 0o077)


def parse_secret_lines(text):
    """A file of secrets, one per line, in the order to use them ('#' comments and blank
    lines skipped): the upstream key file (the first key is used until the upstream refuses
    it; see Gateway) and the metrics token file."""
    lines = tuple(line.strip() for line in text.splitlines()
                  if line.strip() and not line.strip().startswith("#"))
    if not lines:
        raise ValueError("the file holds no key")
    return lines


# ---------------------------------------------------------------------------------------------
# Per-key limits and last use: per host in SQLite (HostState), or across hosts in Redis
# ---------------------------------------------------------------------------------------------
#
# Both backends answer the same calls: admit(entry, holder, now) before a limited request (or
# raise the 429), or begin_admit, which returns the function that waits for that answer (Redis
# answers while the gateway prepares the upstream request; the SQLite file at once);
# finish(entry, holder, tokens, now) once its response is complete (release the concurrency
# slot, count the tokens); touch(name, now) for last use. They refuse
# in the same order, with the same messages, from one place: limit_refusal.

#: The order in which limits are checked, and what a client over each one is told.
LIMIT_REFUSALS = (
    ("tokens_per_day", "This key has used its %s for today (UTC)."),
    ("concurrency", "This key already has %s in progress."),
    ("rpm", "This key is limited to %s per minute."),
)


def limit_refusal(entry, option, retry_after):
    """The 429 for ``entry`` over its ``option`` limit: ``retry-after`` in whole seconds,
    rounded up, at least 1 (the SDKs honour it)."""
    message = dict(LIMIT_REFUSALS)[option] % counted(
        getattr(entry, option), "token" if option == "tokens_per_day" else "request")
    headers = [("retry-after", str(max(1, math.ceil(retry_after))))]
    if retry_after > RETRY_HORIZON:  # tokens_per_day: not before midnight UTC
        headers.append(NO_RETRY)
    return APIError(429, "rate_limit_error", message, headers)


def counted(number, noun):
    """'1 request', '2 requests': a refusal that reads well for a limit of one."""
    return "%d %s%s" % (number, noun, "" if number == 1 else "s")


def tokens_counted(usage):
    """What tokens_per_day counts of an answer's usage: input + output."""
    return usage.get("input_tokens", 0) + usage.get("output_tokens", 0)


def _already_answered():
    """What ``begin_admit`` returns when it gave its answer at once: nothing to wait for."""


class HostState:
    """Counters that every worker process on this host shares, in a small SQLite file.

    gunicorn runs several worker processes, so a limit kept in memory would be a limit per
    worker. SQLite (standard library, WAL mode, one short write transaction per limited
    request) makes the limits exact per host without a server to run. Each host counts on its
    own: limits shared by several hosts need ``limits_backend`` (RedisLimits), which falls
    back to this file while Redis is away. Only keys with limits pay for a transaction; last
    use is written at most once a minute per key and process. If the file cannot be used,
    requests are served and the problem is logged: a broken counter must not take the gateway
    down for every key.
    """

    SCHEMA = """
        CREATE TABLE IF NOT EXISTS hits (name TEXT NOT NULL, at REAL NOT NULL);
        CREATE INDEX IF NOT EXISTS hits_by_name ON hits (name, at);
        CREATE TABLE IF NOT EXISTS slots (holder TEXT PRIMARY KEY, name TEXT NOT NULL,
                                          pid INTEGER NOT NULL, at REAL NOT NULL);
        -- An admit reads its key's slots and the stale ones, not every open request of the
        -- host (10,000 open streams cost an admit 1.3 ms without these two).
        CREATE INDEX IF NOT EXISTS slots_by_name ON slots (name, pid);
        CREATE INDEX IF NOT EXISTS slots_by_age ON slots (at);
        CREATE TABLE IF NOT EXISTS tokens (name TEXT NOT NULL, day TEXT NOT NULL,
                                           used INTEGER NOT NULL, PRIMARY KEY (name, day));
        CREATE TABLE IF NOT EXISTS last_use (name TEXT PRIMARY KEY, at REAL NOT NULL);
    """
    #: How many hits each key has (``_recent_hits``), kept by triggers in the file itself, so
    #: that every writer keeps it exact: a gateway of an earlier version too, sharing the
    #: file during an upgrade. Made once per file, counting the hits it already holds.
    HIT_COUNTS = (
        "CREATE TABLE hit_counts (name TEXT PRIMARY KEY, count INTEGER NOT NULL)",
        "INSERT INTO hit_counts SELECT name, count(*) FROM hits GROUP BY name",
        # No UPSERT (SQLite 3.24): a trigger that fails makes every write to hits fail.
        """CREATE TRIGGER hit_added AFTER INSERT ON hits BEGIN
               INSERT OR IGNORE INTO hit_counts VALUES (NEW.name, 0);
               UPDATE hit_counts SET count = count + 1 WHERE name = NEW.name;
           END""",
        """CREATE TRIGGER hit_deleted AFTER DELETE ON hits BEGIN
               UPDATE hit_counts SET count = count - 1 WHERE name = OLD.name;
           END""",
    )
    #: A slot older than this is a leftover (a killed worker, a reused pid), not a request.
    SLOT_MAX_AGE = 4 * 3600
    TOUCH_INTERVAL = 60

    def __init__(self, path):
        self.path = path
        self._lock = threading.Lock()  # one statement or transaction at a time per process
        self._connection = None  # (pid, sqlite3 connection): SQLite's must not cross a fork
        self._touched = {}  # key name -> when this process last wrote its last use

    @contextlib.contextmanager
    def _db(self):
        """This process's one connection, for one statement or transaction at a time.

        Facts -> decision: one connection per thread kept a SQLite handle (and its page
        cache) for every gthread thread that ever wrote, about 200 after a burst of 200
        streams, for the worker's life; and SQLite keeps a closed connection's file open while
        another connection of the process holds a lock on it, so a few shared connections
        would not give those files back either. Every use here is a write or a rare read that
        takes microseconds, and writers queue on the file's lock anyway, so the threads take
        turns on one connection."""
        with self._lock:
            if self._connection is None or self._connection[0] != os.getpid():
                self._connection = (os.getpid(), self._connect())
            db = self._connection[1]
            try:
                yield db
            finally:
                if db.in_transaction:  # its ROLLBACK failed: start afresh next time
                    self._connection = None
                    db.close()

    def _connect(self):
        db = sqlite3.connect(self.path, timeout=10, isolation_level=None,
                             check_same_thread=False)  # one thread at a time: _db's lock
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")  # counters, not ledgers: no fsync per hit
            db.executescript(self.SCHEMA)
            self._count_hits(db)
        except BaseException:
            db.close()
            raise
        return db

    def _count_hits(self, db):
        """Make hit_counts in a file that has none yet, in one transaction with the count of
        the hits already there: two processes opening it at once make it once. A file that
        has it costs no write lock (every worker's first use)."""
        if self._has_hit_counts(db):
            return
        db.execute("BEGIN IMMEDIATE")
        try:
            if not self._has_hit_counts(db):
                for statement in self.HIT_COUNTS:
                    db.execute(statement)
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    @staticmethod
    def _has_hit_counts(db):
        return db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND "
                          "name = 'hit_counts'").fetchone() is not None

    def admit(self, entry, holder, now):
        """Count one request of ``entry`` against its limits, or raise a 429 saying when to
        retry. ``holder`` names the request's concurrency slot until ``release(holder)``."""
        try:
            with self._db() as db:
                db.execute("BEGIN IMMEDIATE")  # one writer at a time: check and count atomically
                try:
                    refusal = self._refusal(db, entry, now)
                    if refusal is None:
                        self._count(db, entry, holder, now)
                    db.execute("COMMIT")
                except BaseException:
                    db.execute("ROLLBACK")
                    raise
        except (sqlite3.Error, OSError) as exc:
            log.error("limits not enforced: cannot use %s (%s)", self.path, exc)
            return
        if refusal is not None:
            raise limit_refusal(entry, *refusal)

    def begin_admit(self, entry, holder, now):
        """``admit``, answered at once (the file is on this host): the caller's function
        to wait for the answer has nothing left to do."""
        self.admit(entry, holder, now)
        return _already_answered

    def _refusal(self, db, entry, now):
        """(option, seconds to wait) for the first limit in LIMIT_REFUSALS order that
        ``entry`` is over, or None."""
        if entry.tokens_per_day:
            day = time.strftime("%Y-%m-%d", time.gmtime(now))
            used = db.execute("SELECT used FROM tokens WHERE name = ? AND day = ?",
                              (entry.name, day)).fetchone()
            if used and used[0] >= entry.tokens_per_day:
                return "tokens_per_day", 86400 - now % 86400
        if entry.concurrency and self._open_slots(db, entry.name, now) >= entry.concurrency:
            return "concurrency", 1
        if entry.rpm and self._recent_hits(db, entry.name, now) >= entry.rpm:
            oldest, = db.execute("SELECT min(at) FROM hits WHERE name = ?",
                                 (entry.name,)).fetchone()
            return "rpm", oldest + 60 - now
        return None

    def _recent_hits(self, db, name, now):
        """How many hits of ``name`` the last minute holds, older ones deleted first.

        Facts -> decision: counting them (``count(*)`` over the key's range of the index)
        made an admit cost in proportion to the key's requests of the last minute: in
        ``--scenario limits`` a key with a high ``rpm`` added 0.34 ms in its first 2 s and
        0.9-1.35 ms by its eighteenth (docs/performance.md). hit_counts keeps the count as the
        hits are added and deleted (HIT_COUNTS), so an admit costs the same at any rate."""
        db.execute("DELETE FROM hits WHERE name = ? AND at <= ?", (name, now - 60))
        count = db.execute("SELECT count FROM hit_counts WHERE name = ?", (name,)).fetchone()
        return count[0] if count else 0

    def _open_slots(self, db, name, now):
        db.execute("DELETE FROM slots WHERE at < ?", (now - self.SLOT_MAX_AGE,))
        for (pid,) in db.execute("SELECT DISTINCT pid FROM slots WHERE name = ?",
                                 (name,)).fetchall():
            if not _process_alive(pid):
                db.execute("DELETE FROM slots WHERE pid = ?", (pid,))
        return db.execute("SELECT count(*) FROM slots WHERE name = ?", (name,)).fetchone()[0]

    def _count(self, db, entry, holder, now):
        if entry.rpm:
            db.execute("INSERT INTO hits VALUES (?, ?)", (entry.name, now))
        if entry.concurrency:
            db.execute("INSERT INTO slots VALUES (?, ?, ?, ?)",
                       (holder, entry.name, os.getpid(), now))

    def finish(self, entry, holder, tokens, now):
        """The request ``holder`` of ``entry`` is complete: free its slot, count its tokens."""
        if entry.concurrency:
            self.release(holder)
        if entry.tokens_per_day and tokens:
            self.add_tokens(entry.name, tokens, now)

    def release(self, holder):
        self._write("DELETE FROM slots WHERE holder = ?", (holder,))

    def add_tokens(self, name, tokens, now):
        day = time.strftime("%Y-%m-%d", time.gmtime(now))
        self._write("INSERT INTO tokens VALUES (?, ?, ?) ON CONFLICT (name, day) "
                    "DO UPDATE SET used = used + excluded.used", (name, day, tokens))

    def touch(self, name, now):
        """Record that ``name`` was used; at most once a minute per key in this process."""
        if now - self._touched.get(name, 0) < self.TOUCH_INTERVAL:
            return
        self._touched[name] = now
        self._write("INSERT INTO last_use VALUES (?, ?) ON CONFLICT (name) "
                    "DO UPDATE SET at = max(at, excluded.at)", (name, now))

    def last_use(self):
        """{key name: epoch seconds of its last recorded use}; {} when there is no file."""
        if not os.path.exists(self.path):
            return {}
        try:
            with self._db() as db:
                return dict(db.execute("SELECT name, at FROM last_use").fetchall())
        except sqlite3.Error:
            return {}

    def _write(self, statement, parameters):
        try:
            with self._db() as db:
                db.execute(statement, parameters)
        except (sqlite3.Error, OSError) as exc:
            log.error("cannot update %s (%s)", self.path, exc)


def _process_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # alive, someone else's
    return True


# -- Across hosts: Redis ----------------------------------------------------------------------
#
# Facts -> decisions (sources: the redis-py 8 source and docs; redis.io command pages; the
# issue trackers of Envoy ratelimit, Kong and LiteLLM, whose users met each of these):
# - Check-then-count from the client races (over-admission under concurrency): the check and
#   the count are one Lua script, atomic in Redis, on Redis's own clock (TIME; hosts' clocks
#   differ), and it writes nothing when it refuses (no +1 stranded per 429).
# - A fixed window admits up to twice the limit across its edge: rpm is a sorted set of the
#   minute's requests (score = when), pruned and counted in the script, exact like SQLite's.
# - Counters of requests in progress leak when a host dies or a stream is cut: a concurrency
#   slot is a lease (sorted set, score = expiry). Each process renews all of its live slots
#   every lease/3, whether bytes flow or not, so a 30-minute stream or a long silent think
#   keeps its slot, and a SIGKILLed host's slots lapse within the lease.
# - Keys written without a TTL pile up or never reset: every key has one.
# - redis-py 8 waits 5 s per connect and per read, with retries: Redis killed cost 3.7 s and
#   Redis frozen (SIGSTOP) 59.6 s per call. Here: 0.25 s, no retry (an admit is sent again
#   only on a connection Redis had closed while idle), and after a failure a breaker that
#   skips Redis for BREAKER_SECONDS (one request probes when they are over).
# - redis-py's default pool fails beyond 100 connections instead of waiting (2,000 greenlets:
#   1,900 errors); a BlockingConnectionPool waits up to its timeout (0 errors, 181 ms worst).
#   One per worker process, made on first use after the fork; its client is thread-safe.
# - System calls are most of an admit call's cost, and through that pool it made seven
#   (strace): the admit and finish calls have connections of their own (ScriptConnections),
#   two system calls an admit call, and an admit call that finds one closed while idle is
#   sent again once; three a finish call, whose connection is checked before it is sent,
#   as the finish call must never be sent twice.
# - Key names: gateway:{name}:…, where {name} is a Redis Cluster hash tag, so each script
#   touches one slot; the name comes from the key file, never the client's key.

#: One round trip admits a limited request. KEYS: tokens (hash: UTC day number -> tokens),
#: slots (zset: holder -> lease expiry, ms), hits (zset: request -> arrival, ms). ARGV:
#: tokens_per_day, concurrency, rpm (0: none), holder, lease in ms. Returns {0, 0} when
#: admitted, else {position in LIMIT_REFUSALS, milliseconds to wait}; a refusal writes nothing.
#: Run again for the same holder (RedisLimits._start_admit sends it again once on a pooled
#: connection found closed, and Redis may have run the first), it finds its own slot or hit
#: and admits again, writing nothing: never refused by its own first run, never counted twice.
REDIS_ADMIT = """
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
local tokens_per_day, concurrency, rpm = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local holder, lease = ARGV[4], tonumber(ARGV[5])
if (rpm > 0 and redis.call('ZSCORE', KEYS[3], holder))
   or (concurrency > 0 and redis.call('ZSCORE', KEYS[2], holder)) then
  return {0, 0}
end
if tokens_per_day > 0 then
  local used = tonumber(redis.call('HGET', KEYS[1], tostring(math.floor(now / 86400000))) or 0)
  if used >= tokens_per_day then return {1, 86400000 - now % 86400000} end
end
if concurrency > 0 and redis.call('ZCOUNT', KEYS[2], '(' .. now, '+inf') >= concurrency then
  return {2, 1000}
end
if rpm > 0 and redis.call('ZCOUNT', KEYS[3], '(' .. (now - 60000), '+inf') >= rpm then
  local oldest = redis.call('ZRANGEBYSCORE', KEYS[3], '(' .. (now - 60000), '+inf',
                            'WITHSCORES', 'LIMIT', 0, 1)
  return {3, tonumber(oldest[2]) + 60000 - now}
end
if rpm > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now - 60000)
  redis.call('ZADD', KEYS[3], now, holder)
  redis.call('PEXPIRE', KEYS[3], 61000)
end
if concurrency > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
  redis.call('ZADD', KEYS[2], now + lease, holder)
  redis.call('PEXPIRE', KEYS[2], lease + 1000)
end
return {0, 0}
"""

#: The request is complete. KEYS: slots, tokens. ARGV: holder ('' when it held no slot),
#: tokens to count (0: none). Today's count is all the tokens hash keeps.
REDIS_FINISH = """
if ARGV[1] ~= '' then redis.call('ZREM', KEYS[1], ARGV[1]) end
local tokens = tonumber(ARGV[2])
if tokens > 0 then
  local day = tostring(math.floor(tonumber(redis.call('TIME')[1]) / 86400))
  redis.call('HINCRBY', KEYS[2], day, tokens)
  for _, field in ipairs(redis.call('HKEYS', KEYS[2])) do
    if field ~= day then redis.call('HDEL', KEYS[2], field) end
  end
  redis.call('EXPIRE', KEYS[2], 172800)
end
return 0
"""

#: Last use of one key, kept if later than the stored one (hosts write theirs up to a renewal
#: apart, in any order), as HostState does. KEYS: last. ARGV: epoch seconds, TTL in seconds.
REDIS_LAST_USE = """
local stored = tonumber(redis.call('GET', KEYS[1]) or 0)
if tonumber(ARGV[1]) > stored then stored = tonumber(ARGV[1]) end
redis.call('SET', KEYS[1], string.format('%.3f', stored), 'EX', ARGV[2])
return 0
"""

#: Renew this process's live slots of one key. KEYS: slots. ARGV: lease in ms, holders. A
#: plain ZADD, not ZADD XX: it puts back a live slot that a Redis restarted empty forgot, so
#: the limit is exact again within one renewal. It cannot resurrect a finished request's slot:
#: renewals and releases of one process are serialized (RedisLimits._lease_lock).
REDIS_RENEW = """
local clock = redis.call('TIME')
local lease = tonumber(ARGV[1])
local expiry = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000) + lease
for i = 2, #ARGV do redis.call('ZADD', KEYS[1], expiry, ARGV[i]) end
redis.call('PEXPIRE', KEYS[1], lease + 1000)
return 0
"""


class RedisLimits:
    """Per-key limits and last use in one Redis that every host shares (``limits_backend``).

    Same calls, order and messages as ``HostState``; exact across any number of hosts and
    workers. A limited request waits for one round trip before it is forwarded (the admit
    script); when it holds a slot or counts tokens, the finish script runs once its response
    is complete, from this process's finisher thread (see finish). Unlimited keys' requests
    never wait on Redis: last use is noted in memory and written with the lease renewal,
    every ``limits_lease / 3`` seconds per process.

    While Redis cannot be reached (an error or a 0.25 s timeout, then nothing for
    BREAKER_SECONDS), ``limits_backend_down`` decides: ``local`` applies the limits per host in
    ``state_file`` (exactly as without Redis), ``open`` applies none, ``closed`` refuses
    limited keys with 503. Requests admitted that way are not counted in Redis afterwards.
    """

    KEY_FORMAT = "gateway:{%s}:%s"  # the braces are Redis Cluster's hash tag
    TIMEOUT = 0.25  # seconds to connect, to read, and to wait for a pooled connection
    # At most this many connections per worker process for the admit calls
    # (ScriptConnections), as many for the finish calls, and for the others (docs/deployment.md
    # has what that asks of Redis's maxclients); calls take 0.1 ms, so few are in use.
    POOL_SIZE = 32
    BREAKER_SECONDS = 5
    # How long a finish call may wait for others to go with it (FinishQueue), unless an
    # admit call of this process waits for it: how much later than at once another host
    # may see a freed slot. Each batch is a wake-up of the finisher, a round trip and a
    # script per call in Redis, and the request in flight meanwhile waits for the cores
    # they take: at one connection, batches 25 ms apart instead of 5 ms cut what a limited
    # key adds over the admit call alone from 50-69 us to 29-36 us (docs/performance.md).
    # A request refused for want of a slot asks again 2 * FINISH_DELAY later, in case
    # another worker was freeing it (_ask_again_for_a_slot).
    FINISH_DELAY = 0.025
    # A request polls for its admit call's answer for up to this long after the call was
    # sent, before it sleeps in the read, while this process's admit calls are answered
    # within it on average (_await_admit).
    ADMIT_POLL = 0.0003
    OWN_OPTIONS = {"socket_timeout", "socket_connect_timeout", "timeout"}  # not in the URL
    LAST_USE_TTL = 400 * 86400  # 'gateway keys list' shows 'never' after a year unused
    SLOTS_TAKEN = 1 + [option for option, _ in LIMIT_REFUSALS].index("concurrency")  # admit's

    def __init__(self, config, local, deadlines, metrics=None):
        try:
            import redis
        except ImportError:
            raise ValueError("limits_backend needs redis-py: pip install "
                             "'gateway[redis]'") from None
        self._redis_module = redis
        self.errors = (redis.RedisError, OSError)
        self.url = config.limits_backend
        self.where = redacted_url(config.limits_backend)
        self.lease_ms = int(config.limits_lease * 1000)
        self.down_policy = config.limits_backend_down
        self.local = local
        self.metrics = metrics
        self._deadlines = deadlines
        self._lock = threading.Lock()  # the client, the breaker and the background work
        # Held from a renewal's look at the live slots until its call is done, and around
        # each release's call: a release is never overtaken by a renewal that re-adds it.
        self._lease_lock = threading.Lock()
        self._pid = None  # the process the client and the renewal belong to
        self._client = self._scripts = None
        self._renewing = False  # the periodic renewal is scheduled in this process
        self._finishing = None  # the finisher's queue, per process (_connect)
        self._down_until = None  # time.monotonic() before which Redis is not tried
        self._opened_at = 0.0  # time.monotonic() when the breaker last opened
        self._live = {}  # holder -> key name: this process's slots in Redis
        self._away = set()  # holders admitted while Redis was away (by down_policy)
        self._touched = {}  # key name -> last use not yet written
        # holder -> key name: a slot Redis may hold that no request of ours holds any more,
        # released with the next renewal that reaches Redis. An admit call that timed out
        # may still run in Redis (queued behind a slow command) and take a slot; a finish
        # call that failed or was skipped by the breaker may not have freed one. Without
        # this, such a slot would refuse the key on every host for a whole lease.
        self._loose = {}
        try:  # no socket yet; a bad option fails 'gateway check' here, not every request
            self._new_pool().make_connection()
        except (TypeError, ValueError) as exc:  # redis-py's words never repeat the URL
            raise ValueError("setting limits_backend: %s" % exc) from None
        # redis-py lets the URL's options replace the arguments of from_url: a URL copied
        # with ?socket_timeout=5 would make every limited request wait 5 s on a frozen Redis.
        timeouts = self.OWN_OPTIONS & set(urllib.parse.parse_qs(urllib.parse.urlsplit(
            self.url).query))
        if timeouts:
            raise ValueError("setting limits_backend: remove %s from the URL: the gateway "
                             "sets its own (%g s)" % (", ".join(sorted(timeouts)), self.TIMEOUT))

    # -- the client, per process ----------------------------------------------------------

    def client(self):
        """This process's client; made on first use, after gunicorn's fork."""
        if self._pid != os.getpid():
            with self._lock:
                if self._pid != os.getpid():
                    self._connect()
        return self._client

    def _new_pool(self):
        from redis.backoff import NoBackoff
        from redis.retry import Retry
        return self._redis_module.BlockingConnectionPool.from_url(
            self.url, max_connections=self.POOL_SIZE, timeout=self.TIMEOUT,
            socket_timeout=self.TIMEOUT, socket_connect_timeout=self.TIMEOUT,
            retry=Retry(NoBackoff(), 0))

    def _connect(self):
        client = self._redis_module.Redis(connection_pool=self._new_pool())
        # Script: EVALSHA, and SCRIPT LOAD again when a restarted Redis answers NOSCRIPT.
        self._scripts = types.SimpleNamespace(
            admit=client.register_script(REDIS_ADMIT),
            finish=client.register_script(REDIS_FINISH),
            renew=client.register_script(REDIS_RENEW),
            last_use=client.register_script(REDIS_LAST_USE))
        self._renewing = False
        self._live, self._away, self._touched, self._loose = {}, set(), {}, {}
        self._finishing = FinishQueue(self._finish_all, self.FINISH_DELAY)
        # A key's admit call packed up to its holder, per key and limits (_admit_command);
        # bounded, so that a key file of more keys than that costs a miss, not memory.
        self._admit_head = functools.lru_cache(maxsize=4096)(self._pack_admit_head)
        self._admit_seconds = 0.0  # admit calls' time, a moving average (_await_admit)
        self._polling = threading.Lock()  # held by the one request that polls at a time
        self._admit_connections = ScriptConnections(self._new_pool(), self.POOL_SIZE,
                                                    self.TIMEOUT, self._redis_module.exceptions)
        self._finish_connections = ScriptConnections(self._new_pool(), self.POOL_SIZE,
                                                     self.TIMEOUT, self._redis_module.exceptions)
        self._client = client
        self._pid = os.getpid()

    def _start_renewing(self):
        """Schedule the periodic renewal, on first need in this process (never in a command
        that only asks Redis a question)."""
        if self._renewing:  # the usual case: no lock on the request path
            return
        with self._lock:
            if not self._renewing:
                self._renewing = True
                self._deadlines.add(self.lease_ms / 3000, self._renew_periodically)
                atexit.register(self._renew_at_exit, os.getpid())

    def _renew_at_exit(self, pid):
        """What this process noted since its last renewal, written as it exits (a worker
        stopped or restarted by a HUP), not lost with it: the last uses of up to a third
        of a lease, and slots whose release may be lost. A slot still live is released
        with them: no request of this process will end it now."""
        if pid != os.getpid():  # a handler inherited across a fork
            return
        with self._lease_lock:
            self._loose.update(self._live)
            self._live.clear()
        self.renew()

    def close(self):
        """Drop this process's connections (a command's, before gunicorn forks workers)."""
        if self._client is not None:
            self._client.connection_pool.disconnect()
            self._admit_connections.disconnect()
            self._finish_connections.disconnect()

    def key(self, name, kind):
        return self.KEY_FORMAT % (name, kind)

    # -- the three calls --------------------------------------------------------------------

    def admit(self, entry, holder, now):
        """Count one request of ``entry`` (429 when over a limit): ``begin_admit`` and its
        answer."""
        self.begin_admit(entry, holder, now)()

    def begin_admit(self, entry, holder, now):
        """Send the admit call of one request of ``entry`` and return the function that
        waits for its answer (429 when over a limit), so that the caller can finish
        preparing the request while the call is on its way (Gateway.limit). It must be
        called exactly once (the gateway's Exchange.admitted does, just before the request
        goes upstream); until then one of this process's pooled connections is the
        request's.

        One round trip, or two when the key's slots are all taken (_ask_again_for_a_slot).
        While Redis is away, ``limits_backend_down`` decides, at once."""
        self.client()  # made in this process (after the fork) on first use
        if entry.tokens_per_day:  # today's count must hold this process's ended requests
            self._finishing.wait_for(entry.name, 2 * self.TIMEOUT)
        if not self._should_try():
            self._admit_away(entry, holder, now)
            return _already_answered
        started = time.monotonic()
        # Read before the call: a finish call of the key queued by then may reach Redis
        # after the admit, even if it is done by the time the answer comes.
        freeing = self._finishing.pending(entry.name)
        try:
            replies = self._start_admit(entry, holder)
        except self.errors as exc:
            self._admit_failed(exc, entry, holder, now)
            return _already_answered
        return functools.partial(self._admit_answer, replies, entry, holder, now, started,
                                 freeing)

    def _admit_answer(self, replies, entry, holder, now, started, freeing):
        """The second half of ``begin_admit``: read the answer (``replies``), ask again when
        the key's slots were all taken (``_ask_again_for_a_slot``), and note the slot as
        live."""
        try:
            (refused, wait_ms), = replies()
            if refused == self.SLOTS_TAKEN:
                (refused, wait_ms), = self._ask_again_for_a_slot(entry, holder, freeing)
        except self.errors as exc:
            self._admit_failed(exc, entry, holder, now)
            return
        self._answered(started)
        if refused:
            raise limit_refusal(entry, LIMIT_REFUSALS[refused - 1][0], wait_ms / 1000)
        if entry.concurrency:
            self._live[holder] = entry.name
            self._start_renewing()

    def _ask_again_for_a_slot(self, entry, holder, freeing):
        """The answer of the admit call sent again after a refusal for want of a slot, once
        the slots that may be being freed are: this process's, whose finish calls of the key
        are queued (``freeing``: made at once and waited for), or another worker's or
        host's, whose finish calls go within FINISH_DELAY of their responses' end (waited
        out, twice over: that delay, and as long for the call to be scheduled and answered
        on a busy host). A refusal writes nothing, so the request is counted once.

        Facts -> decision: a client that sends its next request as soon as it has read the
        answer (a script, an agent's loop) may reach another worker than its last request
        did: behind nginx, whose pool of connections to gunicorn (deploy/nginx.conf) is
        shared by every client, or with a new connection each time. A key with
        ``concurrency = 1`` would be refused that request while the last one's slot waits
        for the other worker's finisher. On one host without Redis the slot is freed at
        once, as the response ends (HostState). The price is on refusals for want of a
        slot: the 429 comes 2 * FINISH_DELAY later, after a second call."""
        if freeing:
            self._finishing.wait_for(entry.name, 2 * self.TIMEOUT)
        else:
            time.sleep(2 * self.FINISH_DELAY)
        return self._start_admit(entry, holder)()

    def _admit_command(self, entry, holder):
        """The admit call for one request, packed as ``_resp_command`` packs ``_admit_call``:
        all but its holder and lease, the same for every request of the key, packed once
        per key and limits (``_admit_head``, made per process in _connect)."""
        return (self._admit_head(entry.name, entry.tokens_per_day or 0, entry.concurrency or 0,
                                 entry.rpm or 0)
                + _resp_bulk(holder.encode()) + _resp_bulk(b"%d" % self.lease_ms))

    def _pack_admit_head(self, name, tokens_per_day, concurrency, rpm):
        items = ("EVALSHA", self._scripts.admit.sha, 3, self.key(name, "tokens"),
                 self.key(name, "slots"), self.key(name, "hits"), tokens_per_day,
                 concurrency, rpm)
        return b"*%d\r\n" % (len(items) + 2) + _resp_bulks(items)  # + holder and lease

    def _admit_call(self, entry, holder):
        """The admit script's (keys, args) for one request."""
        return ([self.key(entry.name, "tokens"), self.key(entry.name, "slots"),
                 self.key(entry.name, "hits")],
                [entry.tokens_per_day or 0, entry.concurrency or 0, entry.rpm or 0, holder,
                 self.lease_ms])

    def _admit_failed(self, exc, entry, holder, now):
        self._failed(exc)
        if entry.concurrency:  # Redis may still run it: release what it takes
            self._loose[holder] = entry.name
            self._start_renewing()
        self._admit_away(entry, holder, now)

    def _admit_away(self, entry, holder, now):
        if self.down_policy == "closed":
            raise APIError(503, "api_error", "Per-key limits cannot be checked right now. "
                           "Retry shortly.", [("retry-after", str(self.BREAKER_SECONDS))])
        if self.down_policy == "local":
            self.local.admit(entry, holder, now)
        if entry.concurrency or entry.tokens_per_day:  # only these get a finish call
            self._away.add(holder)
        if self.metrics is not None:
            self.metrics.limits_admitted_away.labels(self.down_policy).inc()

    def finish(self, entry, holder, tokens, now):
        """Free the slot and count the tokens, as the response is closed: queued for this
        process's finisher thread, which makes the call at once, so the client does not
        wait for it on its connection before its next request is read.

        A client that sends its next request as soon as it has read the answer (a script,
        an agent's loop) must still find the slot free, or a key with ``concurrency = 1``
        would be refused for a request it no longer has in flight: so an admit refused for
        want of a slot waits for the finish calls that may free one and asks again
        (_ask_again_for_a_slot). A key with ``tokens_per_day`` waits for them before it asks, so that
        the day's count holds every request this process has ended. Other admits never
        wait: a key with a slot to spare need not know when its last request's was freed.

        Facts -> decision: waking the finisher thread for every call cost more of the
        gateway's CPU than the call (strace: 15 futex calls a request, the wake-up and the
        GIL passing between it and the request's thread; at one connection that CPU is about
        the whole p50, docs/performance.md). The finisher makes the calls queued within
        FINISH_DELAY of the first in one round trip, so under load it wakes once per
        FINISH_DELAY, not once per request, and an admit that waits for them (above) has
        them sent at once. So another host may see a freed slot up to FINISH_DELAY later;
        this process's own next admit of the key never waits for the delay."""
        if holder in self._away:  # not counted in Redis: only in the file, if at all
            self._away.discard(holder)
            if self.down_policy == "local":
                self.local.finish(entry, holder, tokens, now)
            return
        tokens = tokens if entry.tokens_per_day else 0
        held = self._live.pop(holder, None) is not None
        if held or tokens:
            self._finishing.put(entry.name, (entry.name, holder if held else "", tokens))

    def touch(self, name, now):
        """Note that ``name`` was used; written with the next renewal, not on this request."""
        self.client()
        self._start_renewing()
        self._touched[name] = now

    def last_use(self, names):
        """{key name: epoch seconds of its last use} for ``names``, in one round trip."""
        pipe = self.client().pipeline(transaction=False)
        for name in names:
            pipe.get(self.key(name, "last"))
        return {name: float(value) for name, value in zip(names, pipe.execute())
                if value is not None}

    def _finish_all(self, finishes):
        """Make the finish calls ``finishes`` [(key name, holder or '', tokens)], pipelined:
        one round trip however many the finisher found queued."""
        if self._should_try():
            started = time.monotonic()
            try:
                with self._lease_lock:
                    self._run(self._scripts.finish, [
                        ([self.key(name, "slots"), self.key(name, "tokens")], [holder, tokens])
                        for name, holder, tokens in finishes])
            except self.errors as exc:
                self._failed(exc)
            else:
                self._answered(started)
                return
        # Not made: the tokens are not counted; the slots are released by the next renewal.
        self._loose.update((holder, name) for name, holder, _ in finishes if holder)

    def _run(self, script, calls):
        """Run ``script`` (a redis-py Script, for its text and SHA1) once for each
        ``(keys, args)`` of ``calls``, pipelined on one of this process's finish connections
        (ScriptConnections.take_checked): one round trip. Returns the replies in order; an
        error reply is raised once all are read. Never sent twice: the finish script's
        HINCRBY would count the tokens twice.

        Facts -> decision: the admit and finish calls are the whole of what Redis adds to a
        limited request. Through redis-py's Script call (``Redis.evalsha``: command routing,
        the retry and observability layers, reply callbacks) an admit took 48 us of the
        gateway's CPU and 77 us in all in a tight loop on this project's machine; the same
        EVALSHA sent and read on a pooled connection, 22 us and 43 us. Nothing those layers
        do is wanted here: no call is retried on a timeout or on Redis trouble (an admit is
        sent again only on a connection Redis had closed while idle: _start_admit), and a
        connection whose read failed is dropped here (``_replies``). The calls are packed
        and their replies read by the gateway itself (``_send_commands``, ``_admit_command``,
        ``_ScriptReplies``). Through redis-py's pool, a finish call made seven system calls;
        on its own connections, three (strace, docs/performance.md).

        A Redis restarted empty answers NOSCRIPT; then EVAL sends the script's text, which
        Redis caches again (what Script does). Any other interruption while the replies are
        read (a timeout, gevent's Timeout) drops the connection: a reply may still be on the
        way, and the next caller must not read it as its own."""
        connections = self._finish_connections
        connection = connections.take_checked()
        try:
            _send_commands(connection, "EVALSHA", script.sha, calls,
                           self._redis_module.exceptions)
        except BaseException:
            connections.drop(connection)
            raise
        return self._replies(connections.give_back, connection, script, len(calls),
                             lambda: calls)

    def _start_admit(self, entry, holder):
        """Send the admit call of the request ``holder`` of ``entry`` on one of this
        process's admit connections (ScriptConnections), and return the function that reads
        its answer (NOSCRIPT handled as ``_run`` does) and gives the connection back; it
        must be called exactly once. Between the two, the caller's own work may be
        interrupted: the read still comes (Gateway's _dispatch), and the connection goes back
        with nothing left on it.

        Facts -> decision: what runs before the call is sent delays its answer by as much,
        and after the idle millisecond between one client's requests it runs several times
        slower than in a loop: its caches are cold. On this project's machine, taking the
        connection cost 10.7 us and packing the call 13.4 us there (p50, admit calls 1 ms
        apart, docs/performance.md). So the call is packed from a head packed once per key
        (``_admit_command``), the connection is taken with no lock in the usual case
        (ScriptConnections.take), and the script's (keys, args) for a NOSCRIPT answer are
        made only for such an answer.

        A pooled connection that Redis closed while it sat idle (Redis's ``timeout``
        setting, a proxy's idle timeout, a restart) fails the next call on it at once: a
        broken pipe or a reset when it is sent, or the end of the stream where the reply
        should be. redis-py's pool looks for that before it hands a connection out, at the
        price of three system calls on every call (docs/performance.md); the admit
        connections are not looked at, and instead a call that fails that way on a
        connection that served an earlier call is sent again, once, on it connected anew.
        Nothing else is sent again: not a timeout, not an error on a connection made for
        this call, so a frozen or dead Redis still costs one call, as the admit call is
        never retried on Redis trouble. Sending again is safe even if Redis ran the first
        (it may have, then closed before answering): the admit script finds its own holder
        and admits it again, writing nothing (REDIS_ADMIT)."""
        packed = self._admit_command(entry, holder)
        connections = self._admit_connections
        connection, may_resend = connections.take()  # a reused connection may be closed
        try:
            try:
                _send_packed(connection, packed, self._redis_module.exceptions)
            except self.errors as exc:
                self._resend_admit(may_resend, exc, connection, packed)
                may_resend = False
        except BaseException:
            connections.drop(connection)
            raise
        sent = time.monotonic()
        return functools.partial(self._replies, connections.give_back, connection,
                                 self._scripts.admit, 1,
                                 lambda: [self._admit_call(entry, holder)],
                                 functools.partial(self._read_admit, may_resend, packed, sent))

    def _resend_admit(self, may_resend, exc, connection, packed):
        """After ``exc``, send the admit call ``packed`` again on ``connection`` connected
        anew if it ``may_resend`` and ``exc`` says Redis had closed it; else raise ``exc``."""
        if not (may_resend and _closed_by_redis(exc)):
            raise exc
        self._admit_connections.reconnect(connection)
        _send_packed(connection, packed, self._redis_module.exceptions)

    def _read_admit(self, may_resend, packed, sent, connection, count, exceptions):
        """``_read_replies`` for ``_start_admit`` (the call ``sent`` at that time.monotonic()):
        on a connection found closed that ``may_resend``, the admit call ``packed`` is sent
        again on it connected anew, and its reply read."""
        self._await_admit(connection._sock, sent)
        try:
            replies = _read_replies(connection, count, exceptions)
        except self.errors as exc:
            self._resend_admit(may_resend, exc, connection, packed)
            return _read_replies(connection, count, exceptions)
        # From the send to the answer read: a moving average over about the last eight
        # calls. Threads update it without a lock: an update lost now and then only
        # nudges a heuristic.
        self._admit_seconds += (time.monotonic() - sent - self._admit_seconds) / 8
        return replies

    def _await_admit(self, sock, sent):
        """Poll ``sock`` for the answer to the admit call ``sent`` (time.monotonic()) until it
        is there or ADMIT_POLL has gone by since, without reading it (the read follows
        either way): only while this process's admit calls are answered within ADMIT_POLL
        on average (from the send to the answer read, ``_read_admit``), by one request at a
        time, on a socket of the standard library's class. A call that is not polled for
        is timed with the wake-up that polling saves: near the window, polling stays off
        until the calls are answered well within it.

        Facts -> decision: a thread that sleeps in the read is woken when the answer comes,
        and where its core went idle in the meantime the core must be woken first: on this
        project's machine (a virtual machine, where that takes the hypervisor) a limited
        key added a median 0.203 ms to a request at one connection when the request slept,
        0.154 ms when it polled (seven runs, docs/performance.md). Polling saves the same on
        any host whose idle cores sleep deeply (Linux's SO_BUSY_POLL for network devices;
        adaptive mutexes spin before they sleep, for that reason). Polling spends the CPU while
        it waits, so it is bounded by ADMIT_POLL, and left to one request at a time. Each
        poll lets go of the GIL, so the process's other threads run between them; and
        under load, or with a Redis across a network, the calls take longer than ADMIT_POLL
        on average and nobody polls. Not on TLS sockets (the answer may already be
        decrypted into the SSL object, where no poll of the socket sees it) nor gevent's,
        whose greenlets must wait in the event loop, never spin."""
        if (self._admit_seconds > self.ADMIT_POLL or sock.gettimeout() is not None
                or type(sock) is not _stdlib_socket_class()):
            return
        poll = _unpatched_poll()
        if poll is None or not self._polling.acquire(blocking=False):
            return
        try:
            poller = poll()  # poll(2) with no wait: unlike a receive, it leaves a socket
            poller.register(sock, select.POLLIN)  # error for the read to raise
            while time.monotonic() - sent < self.ADMIT_POLL and not poller.poll(0):
                pass
        finally:
            self._polling.release()

    def _replies(self, give_back, connection, script, count, calls, read=None):
        """The ``count`` replies to ``script``'s calls on ``connection``, which goes back
        (``give_back``) after; the calls' ``(keys, args)`` (from ``calls()``, made only then)
        are sent again with the script's text for any NOSCRIPT answer."""
        exceptions = self._redis_module.exceptions
        try:
            replies = (read or _read_replies)(connection, count, exceptions)
            lost = [n for n, reply in enumerate(replies)
                    if isinstance(reply, exceptions.NoScriptError)]
            if lost:
                sent = calls()
                again = _send_scripts(connection, "EVAL", script.script,
                                      [sent[n] for n in lost], exceptions)
                for number, reply in zip(lost, again):
                    replies[number] = reply
        except BaseException:
            connection.disconnect()
            raise
        finally:
            give_back(connection)
        for reply in replies:
            if isinstance(reply, exceptions.ResponseError):
                raise reply
        return replies

    # -- periodic work: renewals, loose slots, last use -----------------------------------------

    def _renew_periodically(self):
        try:
            self.renew()
        finally:
            self._deadlines.add(self.lease_ms / 3000, self._renew_periodically)

    def renew(self):
        """Renew every live slot of this process, release its loose ones and write the last
        uses noted since the previous call: one pipelined round trip (nothing when there is
        nothing to write)."""
        client = self.client()
        with self._lease_lock:
            live, loose = self._live.copy(), self._loose.copy()
            if not (live or loose or self._touched) or not self._should_try():
                return
            touched, self._touched = self._touched, {}
            touched = touched.copy()  # a request thread may still be noting a use in it
            pipe = client.pipeline(transaction=False)
            for name, holders in _holders_by_name(live).items():
                # Through the Script, so that the pipeline loads it first where a Redis
                # restarted empty no longer has it (redis-py's Pipeline.load_scripts).
                self._scripts.renew(keys=[self.key(name, "slots")],
                                    args=[self.lease_ms] + holders, client=pipe)
            for name, holders in _holders_by_name(loose).items():
                pipe.zrem(self.key(name, "slots"), *holders)  # slots whose release may be lost
            for name, when in touched.items():
                self._scripts.last_use(keys=[self.key(name, "last")],
                                       args=["%.3f" % when, self.LAST_USE_TTL], client=pipe)
            started = time.monotonic()
            try:
                pipe.execute()
            except self.errors as exc:
                self._failed(exc)
            else:
                self._answered(started)
                for holder in loose:
                    self._loose.pop(holder, None)

    # -- the breaker --------------------------------------------------------------------------

    def _should_try(self):
        """False for BREAKER_SECONDS after a failure; then one caller probes at a time."""
        if self._down_until is None:
            return True
        with self._lock:
            if self._down_until is None:
                return True
            if time.monotonic() < self._down_until:
                return False
            self._down_until = time.monotonic() + self.BREAKER_SECONDS  # the others wait
            return True

    def _failed(self, exc):
        if self.metrics is not None:
            self.metrics.limits_backend_errors.inc()
        with self._lock:
            was_up = self._down_until is None
            self._down_until = time.monotonic() + self.BREAKER_SECONDS
            if was_up:
                self._opened_at = time.monotonic()
        if was_up:
            log.error("limits backend %s unreachable (%s): until it answers, %s", self.where,
                      type(exc).__name__, LIMITS_DOWN_POLICIES[self.down_policy])

    def _answered(self, started):
        """A call begun at ``started`` (time.monotonic()) was answered. One begun before the
        breaker opened says nothing about Redis now: a request that got its answer just
        before an outage must not close the breaker (and log 'answers again') behind the
        call that found Redis gone."""
        if self._down_until is None:
            return
        with self._lock:
            recovered = self._down_until is not None and started >= self._opened_at
            if recovered:
                self._down_until = None
        if recovered:
            log.warning("limits backend %s answers again: limits are shared by every host "
                        "again", self.where)

    def check(self):
        """(server version, milliseconds a PING took), or raise what went wrong."""
        client = self.client()
        started = time.perf_counter()
        client.ping()
        elapsed = (time.perf_counter() - started) * 1000
        return client.info("server")["redis_version"], elapsed


def _send_scripts(connection, command, script, calls, exceptions):
    """Send ``command`` (EVALSHA or EVAL) with ``script`` for each ``(keys, args)`` of
    ``calls`` in one write, and read every reply (``_read_replies``)."""
    _send_commands(connection, command, script, calls, exceptions)
    return _read_replies(connection, len(calls), exceptions)


def _send_commands(connection, command, script, calls, exceptions):
    """Send ``command`` with ``script`` for each ``(keys, args)`` of ``calls`` on the socket
    of ``connection`` (one of ScriptConnections'), in one write.

    Facts -> decision: redis-py's ``pack_commands`` and ``send_packed_command``, with its
    reply parser (which ``_ScriptReplies`` replaces), cost an admit call about 15 us of the
    75-95 us of CPU it took on this project's machine (docs/performance.md): they handle
    every type and size a command may carry. These
    commands are a handful of short strings and integers, packed here as the Redis
    protocol's arrays of bulk strings (RESP, https://redis.io/docs/latest/develop/reference/
    protocol-spec/), and sent by ``_send_packed``."""
    _send_packed(connection, b"".join(_resp_command((command, script, len(keys), *keys, *args))
                                      for keys, args in calls), exceptions)


def _send_packed(connection, packed, exceptions):
    """Send the commands ``packed`` on the socket of ``connection``, in one write. Socket
    errors become redis-py's, as its own send makes them: a timeout (Python's, or the
    kernel's EAGAIN on a socket with SO_SNDTIMEO) a TimeoutError, any other a
    ConnectionError caused by the socket's error."""
    try:
        connection._sock.sendall(packed)
    except (socket.timeout, BlockingIOError) as exc:
        raise exceptions.TimeoutError("Timeout writing to socket") from exc
    except OSError as exc:
        raise exceptions.ConnectionError("Error while writing to socket: %s" % exc) from exc


def _resp_command(items):
    """One command as the Redis protocol's array of bulk strings (strings as UTF-8,
    integers in decimal, as redis-py encodes them)."""
    return b"*%d\r\n" % len(items) + _resp_bulks(items)


def _resp_bulks(items):
    return b"".join(_resp_bulk(item.encode() if isinstance(item, str) else b"%d" % item)
                    for item in items)


def _resp_bulk(data):
    return b"$%d\r\n%s\r\n" % (len(data), data)


def _read_replies(connection, count, exceptions):
    """``count`` replies from the socket of ``connection`` (one of ScriptConnections'): an
    error reply is returned in its place, so that none is left unread on the connection
    (``_ScriptReplies``)."""
    return _ScriptReplies(connection, exceptions).read(count)


class _ScriptReplies:
    """The replies of the gateway's scripts read from one connection's socket, as the Redis
    protocol (RESP) writes them: integers, arrays of them, and error replies (each made the
    exception redis-py would make of it, by the connection's own parser). A RESP3 push
    (``>``: news out of band, such as the maintenance notifications redis-py 8 asks servers
    that offer them for, as it talks RESP3 by default) is skipped wherever it comes: it is
    no reply. Anything else, or bytes left over after the replies asked for, is a protocol
    error: the caller drops the connection.

    Facts -> decision: redis-py's reply parser, made for every reply any command can give,
    was the other part of that cost (``_send_commands``); a reply that came whole is read
    here in one receive and a few slices. The end of the stream where a reply should be
    raises redis-py's ConnectionError with its own words (REDIS_CLOSED_WORDS), a timeout its
    TimeoutError, as its parser does."""

    def __init__(self, connection, exceptions):
        self._sock = connection._sock
        self._parse_error = connection._parser.parse_error
        self._exceptions = exceptions
        self._buffer = b""
        self._start = 0  # where the next line begins in _buffer

    def read(self, count):
        replies = [self._reply() for _ in range(count)]
        while self._start != len(self._buffer):  # a push that came with the last reply
            if self._buffer[self._start:self._start + 1] != b">":
                raise self._exceptions.InvalidResponse("Protocol error: data after the "
                                                       "replies")
            self._skip()
        return replies

    def _reply(self):
        line = self._line()
        kind, rest = line[:1], line[1:]
        if kind == b":":
            return self._number(line)
        if kind == b"*":
            return [self._reply() for _ in range(self._number(line))]
        if kind == b"-":
            error = self._parse_error(rest.decode("utf-8", "replace"))
            if isinstance(error, self._exceptions.ConnectionError):  # LOADING: Redis is away
                raise error
            return error
        if kind == b">":
            self._skip_values(self._number(line))
            return self._reply()
        raise self._exceptions.InvalidResponse("Protocol error: unexpected reply %r"
                                               % line[:40])

    def _skip(self):
        """Read past one value of any RESP2 or RESP3 type (a push and what it holds)."""
        line = self._line()
        kind = line[:1]
        if kind in (b"$", b"=", b"!"):  # bulk string, verbatim string, bulk error: bytes
            length = self._number(line)
            if length >= 0:
                self._take(length + 2)  # and their CRLF
        elif kind in (b"*", b">", b"~"):  # array, push, set: values
            self._skip_values(self._number(line))
        elif kind in (b"%", b"|"):  # map, attribute: pairs of values
            self._skip_values(2 * self._number(line))
        elif kind not in (b"+", b"-", b":", b"_", b"#", b",", b"("):  # one line each
            raise self._exceptions.InvalidResponse("Protocol error: unexpected type %r"
                                                   % line[:40])

    def _skip_values(self, count):
        for _ in range(count):
            self._skip()

    def _take(self, size):
        while len(self._buffer) - self._start < size:
            self._receive()
        self._start += size

    def _number(self, line):
        """The integer of an integer reply or the length of an array. Anything else there is
        a protocol error, as redis-py's parsers make it: a ValueError is no Redis trouble to
        the callers (RedisLimits.errors), and would fail the request instead."""
        try:
            return int(line[1:])
        except ValueError:
            raise self._exceptions.InvalidResponse("Protocol error: not a number: %r"
                                                   % line[:40]) from None

    def _line(self):
        end = self._buffer.find(b"\r\n", self._start)
        while end < 0:
            self._receive()
            end = self._buffer.find(b"\r\n", self._start)
        line = self._buffer[self._start:end]
        self._start = end + 2
        return line

    def _receive(self):
        try:
            data = self._sock.recv(65536)
        except (socket.timeout, BlockingIOError) as exc:  # Python's timeout, or the kernel's
            raise self._exceptions.TimeoutError("Timeout reading from socket") from exc
        except OSError as exc:
            raise self._exceptions.ConnectionError("Error while reading from socket: %s"
                                                   % exc) from exc
        if not data:  # the end of the stream
            raise self._exceptions.ConnectionError(REDIS_CLOSED_WORDS) from EOFError()
        self._buffer = self._buffer[self._start:] + data
        self._start = 0


#: What a read that finds the end of the stream raises (_ScriptReplies), in redis-py's own
#: words: its parsers' SERVER_CLOSED_CONNECTION_ERROR (redis/_parsers/socket.py).
REDIS_CLOSED_WORDS = "Connection closed by server."


#: The errors of a socket whose other end closed it: a broken pipe, a reset, TLS's ends of
#: the stream (a peer gone without or with its close_notify), and the end of the stream
#: where a reply should be (EOFError: _ScriptReplies raises its error from one).
CLOSED_SOCKET_ERRORS = (BrokenPipeError, ConnectionResetError, ssl.SSLEOFError,
                        ssl.SSLZeroReturnError, EOFError)


def _closed_by_redis(exc):
    """Whether ``exc``, raised sending or reading on one of ScriptConnections' connections
    (``_send_packed``, ``_ScriptReplies``), says that the other end had closed it: one of
    CLOSED_SOCKET_ERRORS as its cause. Never a timeout (the kernel's, EAGAIN, included) nor
    any other error."""
    return isinstance(exc.__cause__, CLOSED_SOCKET_ERRORS)


class ScriptConnections:
    """The connections of RedisLimits' admit calls, per process, or of its finish calls (a
    second set): at most ``size``, handed out last in, first out, each to one call at a
    time; a caller waits up to ``timeout`` for one when all are taken (as redis-py's
    BlockingConnectionPool does), then fails. An idle one is handed out and given back
    without a lock: a lock is taken only to make one or to wait for one.

    Facts -> decisions: system calls are the dearest part of an admit call on this project's
    machine (docs/performance.md, 29-40 us of CPU for a send and a receive), and through
    redis-py's pool with its timeouts the call made seven: the pool's check of each
    connection it hands out (the socket made non-blocking, a receive that finds nothing, the
    timeout set back), then, as CPython does for a socket with a timeout, a poll before the
    send and one before the receive (strace). Here:

    - no check when a connection is handed out (``take``): one that Redis closed while idle
      fails the call at once, and RedisLimits._start_admit sends it again on it connected
      anew. A call that must never be sent twice (the finish call: its HINCRBY is not
      idempotent) takes one checked first (``take_checked``), in one system call where
      redis-py's check makes three: connected anew if Redis closed it or left data unread
      on it, before anything is sent;
    - on a socket of the standard library's own class (not TLS, not gevent's), the socket
      blocks and the kernel keeps the same timeouts (SO_SNDTIMEO, SO_RCVTIMEO): one system
      call to send and one to receive. A receive that times out fails with EAGAIN after
      the same ``timeout``, reported as redis-py's TimeoutError. gevent's sockets
      keep their own timeouts: a blocking gevent socket would wait in its event loop with
      no bound, and the kernel's timeouts would never apply; TLS ones too, where a timed-out
      receive inside a TLS record would surface as a TLS error, not a timeout.

    redis-py still makes each connection (``pool.make_connection``: the URL's options, AUTH,
    the database, TLS); RedisLimits packs the calls and reads their replies
    (``_send_packed``, ``_ScriptReplies``)."""

    def __init__(self, pool, size, timeout, exceptions):
        self._pool = pool  # redis-py's: makes the connections, and closes them all
        self._size = size
        self._made = 0  # connections made, idle or taken: at most size
        self._idle = []  # connections given back: the last one is taken first
        self._given_back = threading.Condition(threading.Lock())  # for callers that wait
        self._waiting = 0  # callers waiting for a connection to be given back
        self._timeout = timeout
        self._exceptions = exceptions

    def take(self):
        """(a connected connection, whether it served an earlier call: then Redis may have
        closed it while it was idle). An idle one is taken without a lock (list.pop is
        atomic; threading's semaphore is Python code, about 10 us before a call on this
        project's machine, ``RedisLimits._start_admit``)."""
        try:
            connection = self._idle.pop()
        except IndexError:  # none idle: a new one, or wait for one to be given back
            connection = self._new_or_given_back()
        if connection._sock is not None:  # connected: redis-py before 8 has no is_connected
            return connection, True
        try:
            self.reconnect(connection)
        except BaseException:
            self.drop(connection)
            raise
        return connection, False

    def take_checked(self):
        """A connected connection, as ``take`` hands out, that was open with nothing unread
        on it (``_closed_or_unread``) or was connected anew: a call sent on it finds it
        closed only if Redis closed it in the meantime (then the call fails, as on any
        other Redis trouble, and is not sent again)."""
        connection, reused = self.take()
        if reused:
            try:
                if _closed_or_unread(connection, self._exceptions):
                    self.reconnect(connection)
            except BaseException:
                self.drop(connection)
                raise
        return connection

    def reconnect(self, connection):
        """Connect ``connection`` anew: redis-py's connect, then the kernel's timeouts."""
        connection.disconnect()
        connection.connect()
        _kernel_timeouts(connection._sock, self._timeout)

    def _new_or_given_back(self):
        """A new connection while fewer than ``size`` are made, else the next one given
        back, waited for up to the timeout (a lock-free ``take`` may get it first: then the
        waiter looks again)."""
        deadline = time.monotonic() + self._timeout
        with self._given_back:
            self._waiting += 1
            try:
                while self._made >= self._size:
                    try:
                        return self._idle.pop()
                    except IndexError:
                        left = deadline - time.monotonic()
                        if left <= 0:
                            raise self._exceptions.ConnectionError(
                                "No connection available.") from None
                        self._given_back.wait(left)
                self._made += 1
            finally:
                self._waiting -= 1
        try:
            return self._pool.make_connection()
        except BaseException:
            with self._given_back:
                self._made -= 1
                self._given_back.notify()  # a waiter may make one now
            raise

    def give_back(self, connection):
        self._idle.append(connection)
        if self._waiting:  # read after the append: a caller that starts waiting later
            with self._given_back:  # finds the connection in _idle before it waits
                self._given_back.notify()

    def drop(self, connection):
        """Give back ``connection`` closed: a call on it failed, and a reply may still come."""
        connection.disconnect()
        self.give_back(connection)

    def disconnect(self):
        self._pool.disconnect()


def _kernel_timeouts(sock, seconds):
    """Make ``sock`` a blocking socket whose sends and receives the kernel times out after
    ``seconds`` (ScriptConnections), if it is a socket of the standard library's own class on
    Linux; leave any other (TLS, gevent's) as it is."""
    if type(sock) is not _stdlib_socket_class() or not sys.platform.startswith("linux"):
        return
    microseconds = round(seconds * 1000000)
    timeval = struct.pack("@ll", *divmod(microseconds, 1000000))  # struct timeval
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval)
    sock.settimeout(None)


def _closed_or_unread(connection, exceptions):
    """Whether the idle redis-py ``connection`` was closed by Redis (its ``timeout`` setting,
    a proxy, a restart) or has data unread on it (a reply that is not the next call's).

    On a blocking socket of the standard library's class (``_kernel_timeouts``) one receive
    that peeks without waiting tells: EAGAIN, open with nothing unread; b'', closed; data,
    unread data; any other error, not fit for a call. On any other socket, redis-py's own
    check (``can_read``, as its pool makes): SSLSocket.recv takes no flags, and on a socket
    with Python's timeout CPython would poll for up to the timeout before the receive."""
    sock = connection._sock
    if type(sock) is _stdlib_socket_class() and sock.gettimeout() is None:
        try:
            sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except BlockingIOError:
            return False
        except OSError:
            return True
        return True
    try:
        return connection.can_read()
    except (exceptions.ConnectionError, exceptions.TimeoutError, OSError):
        return True


def _stdlib_socket_class():
    """The standard library's ``socket.socket``, also where gevent swapped in its own."""
    monkey = sys.modules.get("gevent.monkey")
    if monkey is not None and monkey.is_object_patched("socket", "socket"):
        return monkey.get_original("socket", "socket")
    return socket.socket


class FinishQueue:
    """Work a background thread does in batches, while callers can wait until the work
    queued under a name is done: RedisLimits' finish calls, per process.

    ``run`` is called with every item queued since its last call, at most ``delay`` seconds
    after the first of them was queued, or at once when a caller waits for one
    (``wait_for``); a name's count of items queued or in flight falls to zero once ``run``
    has returned for them. After each call the thread looks again ``delay`` later, and
    only if nothing came by then does it wait for the next item to wake it: while items
    keep coming, no put wakes it, and it wakes once per ``delay``, not once per item. It is
    started on the first put, so in the process (gunicorn's worker) that needs it.

    Facts -> decision: at one connection a batch was about five requests' finish calls
    (``delay`` was 5 ms then), and the thread was woken three times for it: by the first item, when the delay was
    over, and by the answer. The first of them, a system call on the request's thread as
    its response closed and a thread switch in the way of the next request, is now made
    only when the items had stopped coming (docs/performance.md). The price is one timed
    wake-up more when they stop: the look that finds nothing."""

    def __init__(self, run, delay):
        self._run = run
        self._delay = delay
        mutex = threading.Lock()
        self._changed = threading.Condition(mutex)  # items done: for callers of wait_for
        self._wake = threading.Condition(mutex)  # a first item, or a caller waits: the thread
        self._queued = []
        self._first_at = 0.0  # time.monotonic() when the first of the queued items came
        self._waiting = {}  # name -> items queued or in flight
        self._hurried = 0  # callers in wait_for: the thread does not wait out the delay
        self._ticking = False  # the thread looks at the queue within the delay, unwoken
        self._thread = None

    def put(self, name, item):
        with self._changed:
            first = not self._queued  # else the thread is waiting out the delay, or busy
            if first:
                self._first_at = time.monotonic()
            self._queued.append((name, item))
            self._waiting[name] = self._waiting.get(name, 0) + 1
            if self._thread is None:
                self._thread = threading.Thread(target=self._work, name="limits-finisher",
                                                daemon=True)
                self._thread.start()
                atexit.register(self.drain)
            if first and not self._ticking:  # not while the thread looks again on its own
                self._wake.notify()  # (_ticking); no call either if it is busy

    def pending(self, name):
        """Whether items queued under ``name`` are not done yet."""
        return bool(self._waiting.get(name))  # a dict read: no lock

    def wait_for(self, name, timeout):
        """Until the items queued under ``name`` are done, or ``timeout`` seconds; the thread
        does them without waiting out the delay."""
        if not self.pending(name):
            return
        with self._changed:
            self._hurried += 1
            self._wake.notify()
            try:
                self._changed.wait_for(lambda: not self._waiting.get(name), timeout)
            finally:
                self._hurried -= 1

    def drain(self):
        """Do what is queued now, in this thread (a worker that exits)."""
        self._do(self._take())

    def _work(self):
        while True:
            with self._changed:
                self._wait_for_batch()
            try:
                self._do(self._take())
            except Exception:  # a bug must not stop the thread: every later wait would time out
                log.exception("finish calls failed")

    def _wait_for_batch(self):
        """Until the queued items are due (the lock held). Items queued during the last
        call wait out the delay; if none were, the thread looks again ``delay`` later, and
        what came by then goes at once (none waited longer than the delay); if nothing came,
        it waits for the next put to wake it."""
        if self._queued:
            self._wait_out_delay()
            return
        self._ticking = True
        self._wake.wait(self._delay)  # a put needs no wake-up; a caller of wait_for wakes it
        self._ticking = False
        if not self._queued:
            self._wake.wait_for(lambda: self._queued)
            self._wait_out_delay()

    def _wait_out_delay(self):
        """Until ``delay`` after the first item, unless a caller waits (the lock held)."""
        while not self._hurried:
            left = self._first_at + self._delay - time.monotonic()
            if left <= 0:
                break
            self._wake.wait(left)

    def _take(self):
        with self._changed:
            taken, self._queued = self._queued, []
        return taken

    def _do(self, taken):
        if not taken:
            return
        try:
            self._run([item for _, item in taken])
        finally:
            with self._changed:
                for name, _ in taken:
                    self._waiting[name] -= 1
                    if not self._waiting[name]:
                        del self._waiting[name]
                self._changed.notify_all()


def _holders_by_name(holders):
    """{key name: [holder, ...]} from {holder: key name}: one Redis call per key."""
    by_name = {}
    for holder, name in holders.items():
        by_name.setdefault(name, []).append(holder)
    return by_name


# ---------------------------------------------------------------------------------------------
# Request shaping: pure functions from what the client sent to what the upstream gets
# ---------------------------------------------------------------------------------------------

API_KEY_HEADER = "x-api-key"
BEARER_HEADER = "Authorization: Bearer"


def client_credential(environ):
    """``(key, header)``: the key the client presented and the header it came in, or
    ``(None, None)``.

    Clients may send both headers: the Python SDK sends ``x-api-key`` from
    ``ANTHROPIC_API_KEY`` and ``Authorization: Bearer`` from ``auth_token=`` side by side
    (anthropic ``_client.py`` ``auth_headers``), Claude Code's ``apiKeyHelper`` the same value
    in both. When the two differ and exactly one is an Anthropic key (``sk-ant-…``, a
    developer's own, from the environment), the other is the gateway key; any other pair of
    different values is a 401, since the gateway cannot tell which one the client meant.
    """
    api_key = environ.get("HTTP_X_API_KEY", "").strip()
    scheme, _, token = environ.get("HTTP_AUTHORIZATION", "").strip().partition(" ")
    bearer = token.strip() if scheme.lower() == "bearer" else ""
    if not (api_key and bearer) or api_key == bearer:
        if api_key:
            return api_key, API_KEY_HEADER
        return (bearer, BEARER_HEADER) if bearer else (None, None)
    anthropic_api_key = api_key.startswith(ANTHROPIC_KEY_PREFIX)
    if anthropic_api_key != bearer.startswith(ANTHROPIC_KEY_PREFIX):
        return (bearer, BEARER_HEADER) if anthropic_api_key else (api_key, API_KEY_HEADER)
    raise APIError(401, "authentication_error", "x-api-key and Authorization: Bearer hold two "
                   "different keys: send the gateway key in one of them, or the same in both.")


def client_key(environ):
    """The key the client presented, or None (see ``client_credential``)."""
    return client_credential(environ)[0]


def parse_json_body(raw):
    """The request body as a JSON object, or an APIError 400 saying why not."""
    try:
        body = json.loads(raw, parse_constant=_reject_constant)
    except RecursionError:
        raise APIError(400, "invalid_request_error",
                       "The request body is nested too deeply.") from None
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError
        raise APIError(400, "invalid_request_error",
                       "The request body is not valid JSON: %s" % exc) from None
    if not isinstance(body, dict):
        raise APIError(400, "invalid_request_error",
                       "The request body must be a JSON object.")
    return body


def _reject_constant(name):
    raise ValueError("%s is not valid JSON" % name)


def route_models(body, models, key_entry):
    """Return (body with every model id mapped to its upstream id, public id, upstream id).

    Model ids occur in the top-level ``model``, in ``fallbacks[].model`` and in the advisor
    tool's ``tools[].model`` (docs/protocol.md, "Request bodies and model ids"). Each one must
    be a public id in ``models`` that the key may use; otherwise a client could reach upstream
    models outside our map.
    """
    public = body.get("model")
    if not isinstance(public, str) or not public:
        raise APIError(400, "invalid_request_error", "model: Field required")
    routed = dict(body)
    routed["model"] = _upstream_model(public, models, key_entry)
    fallbacks = body.get("fallbacks")
    if isinstance(fallbacks, list):
        routed["fallbacks"] = [_route_nested(item, models, key_entry, "fallbacks")
                               for item in fallbacks]
    elif fallbacks is not None:
        # "default" (anthropic types/beta/beta_fallbacks_param.py) asks for the upstream's own
        # fallback set: models we cannot see, map or check against the key.
        raise APIError(400, "invalid_request_error",
                       'fallbacks: this gateway serves only the models in its map, so '
                       '"default" (the upstream\'s own fallback models) is not accepted; '
                       'list them instead: [{"model": "<id>"}, ...].')
    tools = body.get("tools")
    if isinstance(tools, list):
        routed["tools"] = [
            _route_nested(tool, models, key_entry, "tools")
            if isinstance(tool, dict) and str(tool.get("type", "")).startswith("advisor_")
            else tool
            for tool in tools]
    return routed, public, routed["model"]


def _route_nested(item, models, key_entry, field):
    # An entry without a model of ours is refused, not passed on: a bare string or a missing
    # model is one the gateway cannot map or check against the key (fail closed).
    if not isinstance(item, dict) or not isinstance(item.get("model"), str):
        raise APIError(400, "invalid_request_error", '%s: each entry needs "model", a string '
                       '(a model id from this gateway\'s map).' % field)
    return dict(item, model=_upstream_model(item["model"], models, key_entry))


def _upstream_model(public, models, key_entry):
    upstream = models.get(public)
    if upstream is None:
        raise APIError(404, "not_found_error",
                       "model: %s. %s" % (public, usable_models(models, key_entry)))
    if not key_entry.allows(public):
        raise APIError(403, "permission_error", "This key may not use model %s. %s"
                       % (public, usable_models(models, key_entry)), model=public)
    return upstream


def usable_models(models, key_entry):
    """'This key may use: a, b.': what a client asking for another model (Claude Code's own
    ids, say) can point its settings at. The message starts as the API's does ('model: <id>')."""
    usable = [model for model in models if key_entry.allows(model)]
    if not usable:
        return "This key may use no model."
    return "This key may use: %s." % ", ".join(usable)


def count_tokens_body(body):
    return {name: value for name, value in body.items()
            if name not in COUNT_TOKENS_DROPPED_FIELDS}


def encode_json(body):
    """Serialise once, compactly, keeping non-ASCII text as UTF-8 rather than 6-byte escapes."""
    try:
        return json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate from a \ud800 escape: keep it escaped
        return json.dumps(body, separators=(",", ":")).encode("ascii")


# Rewriting only what routing changed. Facts -> decision: for a 5 MB image message,
# encode_json took 14 ms and json.loads 10 ms of the gateway's 36 ms (py-spy, tests/benchmark.py),
# yet routing changes a few bytes: the model ids. So the body is parsed one top-level member at
# a time with json's own C scanner, which parses exactly as json.loads does (NaN refused, last
# duplicate wins) and says where each value ends; the bytes sent upstream are then the client's
# own, with only the changed members re-encoded in place.

_JSON_SCANNER = json.JSONDecoder(parse_constant=_reject_constant)
_JSON_SPACE = json.decoder.WHITESPACE


def parse_json_members(raw):
    """``parse_json_body(raw)`` plus its layout: ``(body, layout)``.

    ``layout`` is ``(source, {name: (start, end)})``, where each top-level member's value lies
    in ``source``: ``raw`` itself when it is ASCII (offsets in the text are then offsets in
    the bytes), else ``raw`` decoded. It is None when only a full re-encoding is faithful: a
    body that is not UTF-8, that repeats a top-level name, or that does not parse (then
    ``parse_json_body`` raises its usual 400).
    """
    try:
        layout = _json_members(raw)
    except (ValueError, StopIteration, RecursionError):
        layout = None
    if layout is None:
        return parse_json_body(raw), None
    body, spans, text = layout
    return body, (raw if text.isascii() else text, spans)


def _json_members(raw):
    if json.detect_encoding(raw) != "utf-8":
        return None
    text = raw.decode("utf-8", "surrogatepass")  # as json.loads decodes bytes
    index = _JSON_SPACE.match(text, 0).end()
    if text[index:index + 1] != "{":
        return None
    index = _JSON_SPACE.match(text, index + 1).end()
    body, spans = {}, {}
    while text[index:index + 1] != "}" or spans:
        if text[index:index + 1] != '"':
            return None
        name, index = json.decoder.scanstring(text, index + 1)
        index = _JSON_SPACE.match(text, index).end()
        if text[index:index + 1] != ":" or name in body:
            return None
        start = _JSON_SPACE.match(text, index + 1).end()
        body[name], end = _JSON_SCANNER.scan_once(text, start)
        spans[name] = (start, end)
        index = _JSON_SPACE.match(text, end).end()
        if text[index:index + 1] == "}":
            break
        if text[index:index + 1] != ",":
            return None
        index = _JSON_SPACE.match(text, index + 1).end()
    if _JSON_SPACE.match(text, index + 1).end() != len(text):
        return None
    return body, spans, text


def encode_routed(routed, body, layout):
    """The bytes to send upstream for ``routed``: ``encode_json(routed)`` when ``layout`` is
    None, else the client's bytes with each member whose value routing changed re-encoded."""
    if layout is None or routed.keys() != body.keys():
        return encode_json(routed)
    source, spans = layout
    changed = sorted((spans[name], name) for name in routed if routed[name] != body[name])
    if isinstance(source, bytes):
        source = memoryview(source)  # slices without copies: join copies the body once
    pieces, position = [], 0
    for (start, end), name in changed:
        value = encode_json(routed[name])
        pieces += [source[position:start], value if isinstance(source, memoryview)
                   else value.decode("utf-8")]
        position = end
    if isinstance(source, memoryview):
        return b"".join(pieces + [source[position:]])
    return "".join(pieces + [source[position:]]).encode("utf-8", "surrogatepass")


def upstream_headers(environ, upstream_key):
    """Headers for the upstream request: the client's ``anthropic-*`` and telemetry headers
    verbatim, our key, and identity encoding so the SSE bytes can be relayed as they are."""
    headers = {}
    for name, value in environ.items():
        if not name.startswith("HTTP_"):
            continue
        header = name[5:].replace("_", "-").lower()
        if header.startswith(FORWARDED_PREFIXES) or header in FORWARDED_HEADERS:
            value = value.strip(" \t")  # optional white space, not part of the value
            if not FIELD_NAME.fullmatch(header) or not FIELD_VALUE.fullmatch(value):
                raise APIError(400, "invalid_request_error", "A request header cannot be "
                               "forwarded: it has characters that HTTP does not allow.")
            headers[header] = value
    headers.setdefault("anthropic-version", DEFAULT_ANTHROPIC_VERSION)
    headers["x-api-key"] = upstream_key
    headers["content-type"] = JSON_CONTENT_TYPE
    headers["accept"] = JSON_CONTENT_TYPE
    # Relaying bytes unchanged needs them unencoded (docs/protocol.md, "Compression").
    headers["accept-encoding"] = "identity"
    return headers


def client_headers(upstream):
    """The upstream response headers worth relaying, as a WSGI header list."""
    return [(name, value) for name, value in upstream.items()
            if name.lower() in RELAYED_HEADERS or name.lower().startswith(RELAYED_PREFIXES)]


def upstream_json(raw):
    """The upstream's answer parsed, or None when it is not JSON (a proxy's login page, a
    body cut short, a compression nobody undid)."""
    try:
        return json.loads(raw)
    except (ValueError, RecursionError):
        return None


def usage_from_json(raw):
    """Token counts from a JSON message body, or {} when it has none."""
    return usage_of(upstream_json(raw))


def usage_of(answer):
    return _token_counts(answer.get("usage")) if isinstance(answer, dict) else {}


def undecodable_coding(upstream):
    """The upstream's first content coding that urllib3 cannot undo, or None.

    We ask for identity (docs/protocol.md, "Compression"), yet a proxy on the way may compress
    anyway. gzip and deflate are undone as the bytes pass and the client gets them plain,
    without the header.
    Any other coding (br and zstd when their modules are missing) would reach the client as
    bytes that no header explains, so it is refused instead.
    """
    import urllib3
    decodable = ("", "identity", *urllib3.response.HTTPResponse.CONTENT_DECODERS)
    for coding in upstream.get("content-encoding", "").lower().split(","):
        if coding.strip() not in decodable:
            return coding.strip()
    return None


USAGE_FIELDS = ("input_tokens", "output_tokens", "cache_creation_input_tokens",
                "cache_read_input_tokens")


def _token_counts(usage):
    if not isinstance(usage, dict):
        return {}
    return {name: usage[name] for name in USAGE_FIELDS if isinstance(usage.get(name), int)}


class StreamMeter:
    """Reads token counts from SSE bytes as they pass, without changing or holding them.

    ``message_start`` carries the input and cache counts, each ``message_delta`` the cumulative
    output count (docs/protocol.md, "Responses and streaming"). Only ``data:`` lines that
    start like a ``message_*`` event, and ``event: error`` lines, are collected and parsed;
    every other line is skipped as it streams by, so a large content block costs a scan, not a
    copy.
    """

    _PROBE = 40  # bytes enough to see '"type":"message_' at the start of a data line

    def __init__(self):
        self.usage = {}
        self.finished = False  # message_stop seen
        self.failed = False  # the upstream sent its own ``event: error``
        self._line = bytearray()
        self._skipping = False

    def feed(self, chunk):
        start = 0
        while start < len(chunk):
            end = chunk.find(b"\n", start)
            piece = chunk[start:] if end < 0 else chunk[start:end]
            if not self._skipping:
                self._line += piece
                if end < 0 and len(self._line) >= self._PROBE and not self._interesting():
                    self._skipping = True
                    self._line.clear()
            if end < 0:
                return
            if not self._skipping and self._interesting():
                self._parse(bytes(self._line))
            self._line.clear()
            self._skipping = False
            start = end + 1

    def _interesting(self):
        head = bytes(self._line[:self._PROBE])
        return (head.startswith(b"data:") and b'"message_' in head
                or head.startswith(b"event:") and len(head) < self._PROBE)

    def _parse(self, line):
        if line.startswith(b"event:"):
            # The SSE spec strips one space after the colon; a stray \r stays from CRLF ends.
            self.failed = self.failed or line[6:].strip() == b"error"
            return
        try:
            event = json.loads(line[5:])
        except (ValueError, RecursionError):  # the bytes pass on untouched all the same
            return
        if not isinstance(event, dict):
            return
        kind = event.get("type")
        if kind == "message_start" and isinstance(event.get("message"), dict):
            self.usage.update(_token_counts(event["message"].get("usage")))
        elif kind == "message_delta":
            self.usage.update(_token_counts(event.get("usage")))
        elif kind == "message_stop":
            self.finished = True


def display_name(model_id):
    """'claude-opus-4-8' -> 'Claude Opus 4.8': a readable default for /v1/models."""
    words, version = [], []
    for part in model_id.split("-"):
        (version if part.isdigit() else words).append(part)
    return " ".join([w.capitalize() for w in words] + ([".".join(version)] if version else []))


def model_info(model_id):
    return {"type": "model", "id": model_id, "display_name": display_name(model_id),
            "created_at": "1970-01-01T00:00:00Z"}


def models_page(model_ids, query):
    """One page of the Anthropic model list (docs/protocol.md, "Model list") over
    ``model_ids``, honouring ``limit`` (1-1000, default 20), ``after_id`` and ``before_id``."""
    params = _parse_query(query)
    try:
        limit = int(params.get("limit", "20"))
    except ValueError:
        limit = 0
    if not 1 <= limit <= 1000:
        raise APIError(400, "invalid_request_error", "limit: must be between 1 and 1000")
    ids = list(model_ids)
    if params.get("after_id") in ids:
        ids = ids[ids.index(params["after_id"]) + 1:]
        page, has_more = ids[:limit], len(ids) > limit
    elif params.get("before_id") in ids:
        ids = ids[:ids.index(params["before_id"])]
        page, has_more = ids[-limit:], len(ids) > limit
    else:
        page, has_more = ids[:limit], len(ids) > limit
    return {"data": [model_info(model_id) for model_id in page], "has_more": has_more,
            "first_id": page[0] if page else None, "last_id": page[-1] if page else None}


def _parse_query(query):
    return dict(urllib.parse.parse_qsl(query, keep_blank_values=True))


# ---------------------------------------------------------------------------------------------
# The upstream: one pooled session per process, and relaying what it answers
# ---------------------------------------------------------------------------------------------

class _KeepsAtMost:
    """A connection pool whose ``maxsize`` bounds the idle connections it keeps, not the open
    ones: a burst opens as many as it needs (urllib3 with ``block=False``) and each one that
    comes back to a full pool is closed. urllib3 does exactly that, with a warning each time;
    here it is the design, so it happens quietly."""

    def _put_conn(self, conn):
        if conn is not None and self.pool is not None and self.pool.full():
            conn.close()
            return
        super()._put_conn(conn)


#: The ``_Waiting`` of the exchange that this thread (greenlet, under gevent) is sending, if a
#: ``ClientWatch`` watches its client: each request sets its own, nothing is shared.
_WAITING = contextvars.ContextVar("gateway_waiting", default=None)


class _ReportsSocket:
    """An upstream connection that, before it waits for the answer's headers, hands its socket
    to the exchange's ``_Waiting`` so that ``ClientWatch`` can end the wait."""

    def getresponse(self):
        waiting = _WAITING.get()
        if waiting is not None:
            waiting.upstream = self.sock
        return super().getresponse()


@functools.cache
def _session_classes():
    """The classes of an upstream session (new_session), made once, on first need: they
    subclass requests', urllib3's and http.cookiejar's, which this module does not import
    until it calls the upstream (see its imports). Classes, never changed once made: every
    session and app of the process may share them, as they shared them at module level.

    Returns requests' adapter with pools of ours (_KeepsAtMost, _ReportsSocket), direct and
    through a proxy alike (so ``ClientWatch`` can end a proxied wait too), and a cookie
    policy that stores no cookie: a session's jar would carry one client's upstream cookies
    (e.g. Cloudflare's ``_cfuvid``) into another client's request."""
    import http.cookiejar
    import requests.adapters
    import urllib3

    class HTTPConnection(_ReportsSocket, urllib3.connection.HTTPConnection):
        pass

    class HTTPSConnection(_ReportsSocket, urllib3.connection.HTTPSConnection):
        pass

    class HTTPPool(_KeepsAtMost, urllib3.HTTPConnectionPool):
        ConnectionCls = HTTPConnection

    class HTTPSPool(_KeepsAtMost, urllib3.HTTPSConnectionPool):
        ConnectionCls = HTTPSConnection

    class Adapter(requests.adapters.HTTPAdapter):
        def init_poolmanager(self, *args, **kwargs):
            super().init_poolmanager(*args, **kwargs)
            self.poolmanager.pool_classes_by_scheme = {"http": HTTPPool, "https": HTTPSPool}

        def proxy_manager_for(self, proxy, **proxy_kwargs):
            manager = super().proxy_manager_for(proxy, **proxy_kwargs)
            manager.pool_classes_by_scheme = {"http": HTTPPool, "https": HTTPSPool}
            return manager

    class NoCookies(http.cookiejar.DefaultCookiePolicy):
        def set_ok(self, cookie, request):
            return False

    return Adapter, NoCookies


def new_session(config):
    """The upstream session that every thread of one process shares: urllib3's pools are
    thread-safe, and one per thread left a worker holding as many idle upstream connections as
    it had threads (about 200 after a burst of 200 streams) until it restarted."""
    import requests
    adapter_class, no_cookies = _session_classes()
    session = requests.Session()
    # Nothing reads the environment per request: trust_env's proxy and CA bundle are read
    # once (proxy_for, default_ca_bundle) and settled in the pool; .netrc never is.
    session.trust_env = False
    session.cookies.set_policy(no_cookies())
    session.headers.clear()  # every header we send is chosen by upstream_headers()
    adapter = adapter_class(pool_connections=1, pool_maxsize=config.pool_maxsize,
                            max_retries=0)
    session.mount("https://", adapter)
    session.mount("http://", adapter)
    return session


def tls_context(cafile=None, cadata=None):
    """A TLS context that trusts exactly the given CA certificates (none when given none):
    urllib3's defaults (TLS 1.2 or later, its ciphers), a certificate and the upstream's
    name required. ``cafile`` may be a directory of hashed certificates, as requests allows."""
    import urllib3
    context = urllib3.util.create_urllib3_context(cert_reqs=ssl.CERT_REQUIRED)
    if cafile and os.path.isdir(cafile):
        context.load_verify_locations(capath=cafile)
    elif cafile or cadata:
        context.load_verify_locations(cafile=cafile, cadata=cadata)
    return context


def parse_ca_file(text):
    """``upstream_ca_file``'s PEM text as a TLS context (the parser its WatchedFile runs)."""
    try:
        return tls_context(cadata=text)
    except ssl.SSLError as exc:
        raise ValueError("no CA certificate in PEM form (%s)" % (exc.reason or exc)) from None


def default_ca_bundle(config, environ):
    """The CA bundle that verifies the upstream when ``upstream_ca_file`` is not set: the one
    requests verifies with (``requests.certs.where()``, certifi's file), or with
    ``trust_env`` the ``REQUESTS_CA_BUNDLE`` or ``CURL_CA_BUNDLE`` that would replace it
    (requests ``Session.merge_environment_settings``).

    Facts -> decision: urllib3 falls back to OpenSSL's default paths when a pool is given no
    CA (``connection.py``, ``load_default_certs``), so a pool taken from requests' adapter
    without ``HTTPAdapter.cert_verify`` trusted the system store, not requests' bundle. The
    gateway therefore always hands its pool an explicit context."""
    import requests
    if config.trust_env:
        named = environ.get("REQUESTS_CA_BUNDLE") or environ.get("CURL_CA_BUNDLE")
        if named:
            return named
    return requests.utils.DEFAULT_CA_BUNDLE_PATH


def default_tls(config, environ):
    """The TLS context over ``default_ca_bundle``; ValueError naming the bundle if it does
    not load (a REQUESTS_CA_BUNDLE that names no file said only 'No such file or directory')."""
    import requests
    bundle = default_ca_bundle(config, environ)
    try:
        return tls_context(bundle)
    except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
        named = "" if bundle == requests.utils.DEFAULT_CA_BUNDLE_PATH else \
            " (REQUESTS_CA_BUNDLE or CURL_CA_BUNDLE, read with trust_env)"
        raise ValueError("CA bundle %s%s: %s" % (
            bundle, named, getattr(exc, "reason", None) or describe(exc))) from None


def proxy_for(config, environ):
    """The forward proxy for upstream calls, or None: ``upstream_proxy``, else with
    ``trust_env`` the one requests would pick from ``environ`` (``NO_PROXY`` honoured)."""
    if config.upstream_proxy:
        return config.upstream_proxy
    if config.trust_env:
        import requests
        proxies = requests.utils.get_environ_proxies(config.upstream_url)
        proxy = requests.utils.select_proxy(config.upstream_url, proxies)
        # 'HTTPS_PROXY=proxy:3128' works with requests, which adds the scheme as it connects
        # (HTTPAdapter.get_connection_with_tls_context): so it does here.
        return requests.utils.prepend_scheme_if_needed(proxy, "http") if proxy else None
    return None


def upstream_pool(session, url, tls, proxy=None):
    """The connection pool that ``session``'s adapter keeps for ``url``'s host: direct, or
    through ``proxy`` (a CONNECT tunnel for https; the proxy then sees the host name and
    nothing else), verifying an https upstream with the TLS context ``tls``. A new context
    (an edited ``upstream_ca_file``) gets a new pool; the adapter keeps one pool per manager
    (``pool_connections=1``), so the old one and its idle connections are closed."""
    import urllib3
    adapter = session.get_adapter(url)
    parts = urllib3.util.parse_url(url)
    manager = adapter.proxy_manager_for(proxy) if proxy else adapter.poolmanager
    return manager.connection_from_host(parts.host, parts.port, parts.scheme, pool_kwargs={
        "ssl_context": tls, "cert_reqs": "CERT_REQUIRED"})


def send_pooled(pool, url, body, headers, timeout):
    """POST ``body`` through ``pool`` and return a streaming ``requests.Response``.

    Facts -> decision: ``Session.post`` cost 378 us of CPU per call against a local upstream
    and ``pool.urlopen`` 163 us (CHANGELOG.md, 0.1.0, Performance): the
    difference is ``Session.request`` merging settings, hooks, cookies and environment
    look-ups, and ``HTTPAdapter.send`` preparing and wrapping, none of which changes anything
    for a session with no cookies and no default headers whose proxy and TLS trust are
    settled once, in its pool (``upstream_pool``). So this does what ``HTTPAdapter.send``
    does for our one case: same pool, no retries, no redirects, body undecoded, requests'
    exceptions, and the same ``requests.Response`` to read.
    """
    import requests
    import urllib3
    errors = urllib3.exceptions
    headers["content-length"] = str(len(body))
    try:
        raw = pool.urlopen("POST", url, body=body, headers=headers, retries=False,
                           redirect=False, assert_same_host=False, preload_content=False,
                           decode_content=False, timeout=timeout)
    except errors.NewConnectionError as exc:  # a subclass of ConnectTimeoutError
        raise requests.ConnectionError(exc) from None
    except errors.ConnectTimeoutError as exc:
        raise requests.exceptions.ConnectTimeout(exc) from None
    except errors.ReadTimeoutError as exc:
        raise requests.ReadTimeout(exc) from None
    except errors.SSLError as exc:
        raise requests.exceptions.SSLError(exc) from None
    except (errors.HTTPError, OSError) as exc:
        raise requests.ConnectionError(exc) from None
    response = requests.Response()
    response.status_code = raw.status
    response.headers = requests.structures.CaseInsensitiveDict(raw.headers)
    response.raw = raw
    response.reason = raw.reason
    response.url = url
    return response


def relay_stream(response, exchange):
    """Yield the upstream SSE bytes as they arrive, then close the upstream.

    ``raw.read1`` returns as soon as any bytes are available, for chunked and close-delimited
    framing alike (``iter_content`` waits for EOF on the latter: docs/protocol.md,
    "Close-delimited upstream bodies"). When the client goes away the server calls ``close()``
    on this generator, the ``finally`` closes the upstream response, and the upstream stops
    generating output nobody reads.
    """
    meter = StreamMeter()
    # The error event must start on a fresh event, or the client's parser glues it onto the
    # upstream's half-sent one. A half-sent event cannot be taken back; ending it with a blank
    # line makes the client drop it or fail to parse it, an error either way, never silence.
    separator = b""
    try:
        while True:
            try:
                chunk = response.raw.read1(STREAM_READ_SIZE, decode_content=True)
            except Exception as exc:  # urllib3 and socket errors alike end the stream here
                log.warning("upstream stream failed [%s]: %s", exchange.request_id,
                            type(exc).__name__)
                exchange.error = "upstream stream failed"
                if not meter.failed:
                    yield separator + sse_error_event(
                        "The upstream connection failed during the stream.")
                return
            if not chunk:
                break
            meter.feed(chunk)
            exchange.first_byte()
            separator = b"" if chunk.endswith(b"\n\n") else b"\n\n"
            try:
                yield chunk
            except GeneratorExit:  # the server closed us: the client went away mid-stream
                exchange.error = CLIENT_WENT_AWAY
                raise
        if meter.failed:
            # The upstream's own error event (overloaded_error, say) already told the client;
            # a second one would only hide it (the SDKs raise the first they parse).
            exchange.error = "upstream error event"
        elif not meter.finished:
            exchange.error = "upstream stream ended early"
            yield separator + sse_error_event(
                "The upstream ended the stream before message_stop.")
    finally:
        response.close()
        exchange.usage = meter.usage
        exchange.finish()


class ClosingBody:
    """The WSGI body of a stream: iterates ``iterable`` and, on ``close()``, runs
    ``on_close`` too. A generator the server closes before its first item runs no
    ``finally``, so the cleanup that must always happen (close the upstream, release the
    key's slot, write the access log) is tied to ``close()`` here (Werkzeug's
    ``ClosingIterator`` shape)."""

    def __init__(self, iterable, *on_close):
        self._iterable = iterable
        self._on_close = on_close

    def __iter__(self):
        return iter(self._iterable)

    def close(self):
        try:
            self._iterable.close()
        finally:
            for callback in self._on_close:
                callback()


# ---------------------------------------------------------------------------------------------
# Metrics: Prometheus counters for GET /metrics (off by default; the 'metrics' extra)
# ---------------------------------------------------------------------------------------------
#
# Facts -> decision. gunicorn's workers are separate processes and a scrape reaches one of
# them, so per-process counters would show a random share of the traffic. prometheus_client's
# multiprocess mode (client_python docs, "Multiprocess Mode") keeps each process's values in
# memory-mapped files in PROMETHEUS_MULTIPROC_DIR and adds every file up at scrape time, the
# counters of exited workers included; it must be chosen before prometheus_client is first
# imported, so 'gateway serve' sets that variable before gunicorn forks, and the gunicorn
# config's child_exit hook drops an exited worker's open-streams gauge. Without the variable
# (one process, e.g. embedded) the values live in this app's own registry.
#
# Cost, measured in multiprocess mode: 0.7 us per counter increment and 2.2 us per histogram
# observation (a lock and mmap writes each), about 6 us for a JSON answer (request, three
# token types, duration) and 10 us for a stream; nothing when metrics are off.
# Label values come from the key file and the config, never from the request, so no client
# can create series: a request refused before its key or model is known is labelled "".

#: Seconds: a JSON answer takes seconds, a long stream minutes (read_timeout is per read).
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)

#: Access-log usage field -> value of the ``type`` label of gateway_tokens_total.
TOKEN_TYPES = (("input_tokens", "input"), ("output_tokens", "output"),
               ("cache_creation_input_tokens", "cache_creation"),
               ("cache_read_input_tokens", "cache_read"))


class Metrics:
    """The gateway's Prometheus metrics, fed by each exchange when it finishes."""

    def __init__(self):
        try:
            import prometheus_client
        except ImportError:
            raise ValueError("metrics = true needs prometheus_client: pip install "
                             "'gateway[metrics]'") from None
        self._client = prometheus_client
        self.multiprocess_dir = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
        # In multiprocess mode the scrape reads every metric from the files; registering them
        # too would export them twice (client_python docs), so they join no registry then.
        self.registry = None if self.multiprocess_dir else prometheus_client.CollectorRegistry()
        counter, histogram = prometheus_client.Counter, prometheus_client.Histogram
        self.requests = counter(
            "gateway_requests", "Requests answered, by key name, public model and status.",
            ("key", "model", "status"), registry=self.registry)
        self.tokens = counter(
            "gateway_tokens", "Tokens the upstream reported, by key name, model and type.",
            ("key", "model", "type"), registry=self.registry)
        self.duration = histogram(
            "gateway_upstream_duration_seconds", "Requests the upstream answered: from "
            "arrival to the answer's end (a stream's last byte).", ("model", "stream"),
            buckets=LATENCY_BUCKETS, registry=self.registry)
        self.ttfb = histogram(
            "gateway_upstream_ttfb_seconds", "Streams: from arrival to the first byte "
            "relayed (a JSON answer's first byte is its last: see duration).", ("model",),
            buckets=LATENCY_BUCKETS, registry=self.registry)
        self.limits_backend_errors = counter(
            "gateway_limits_backend_errors", "Calls to the limits backend (Redis) that failed "
            "or timed out.", registry=self.registry)
        self.limits_admitted_away = counter(
            "gateway_limits_admitted_away", "Requests of limited keys admitted while the limits "
            "backend was unreachable, by limits_backend_down (local: per host; open: unchecked).",
            ("mode",), registry=self.registry)
        self.open_streams = prometheus_client.Gauge(
            "gateway_open_streams", "Streams being relayed now, in live workers.",
            multiprocess_mode="livesum", registry=self.registry)
        self._children = {}

    def watch(self, exchange, stream):
        """Called once per request as its response starts: a stream counts as open until
        its exchange finishes, and every exchange is recorded when it finishes."""
        if stream:
            self.open_streams.inc()
            exchange.finishers.append(self._stream_closed)
        exchange.finishers.append(self.record)

    def _stream_closed(self, exchange):
        self.open_streams.dec()

    def record(self, exchange):
        requests, tokens, duration, ttfb = self._series(
            exchange.key_name or "", exchange.public_model or "", exchange.status,
            exchange.stream)
        requests.inc()
        if exchange.upstream_status is None:  # refused or failed before an upstream answer
            return
        for (field, _), child in zip(TOKEN_TYPES, tokens):
            count = exchange.usage.get(field)
            if count:
                child.inc(count)
        duration.observe(time.monotonic() - exchange.started)
        if exchange.stream and exchange.ttfb is not None:
            ttfb.observe(exchange.ttfb)

    def _series(self, key, model, status, stream):
        """The labelled children one kind of exchange updates, made on first use: labels()
        validates and locks on every call, a dict lookup does not. No model means the
        request never reached the upstream: no token or latency series for it."""
        series = self._children.get((key, model, status, stream))
        if series is None:
            requests = self.requests.labels(key, model, str(status))
            series = (requests, (), None, None)
            if model:
                series = (requests,
                          tuple(self.tokens.labels(key, model, kind) for _, kind in TOKEN_TYPES),
                          self.duration.labels(model, "true" if stream else "false"),
                          self.ttfb.labels(model) if stream else None)
            self._children[key, model, status, stream] = series
        return series

    def render(self):
        """(body, content type) in the text format: in multiprocess mode, every worker's
        files added up, through a registry made per scrape as the docs advise."""
        registry = self.registry
        if registry is None:
            import prometheus_client.multiprocess
            registry = self._client.CollectorRegistry()
            prometheus_client.multiprocess.MultiProcessCollector(registry)
        return self._client.generate_latest(registry), self._client.CONTENT_TYPE_LATEST


# ---------------------------------------------------------------------------------------------
# The WSGI application
# ---------------------------------------------------------------------------------------------

class Exchange:
    """What the access log says about one request, filled in as the request moves along."""

    def __init__(self, environ, client_ip):
        self.request_id = "req_gw_" + secrets.token_hex(12)
        self.started = time.monotonic()
        self.method = environ.get("REQUEST_METHOD", "")
        self.path = environ.get("PATH_INFO", "")
        self.client_ip = client_ip
        self.key_name = None
        self.key_origins = frozenset()  # the authenticated key's own CORS origins
        self.public_model = None
        self.upstream_model = None
        self.upstream_request_id = None
        self.upstream_status = None  # set once the upstream answered
        self.stream = False
        self.status = None
        self.ttfb = None
        self.usage = {}
        self.error = None
        self.finishers = []  # called once, with the exchange, when the response is complete
        self.admission = None  # waits for the limits' answer, once (Gateway.limit)
        self._finished = False

    def admitted(self):
        """Wait for the limits' answer to this request, if one is still on its way: a 429
        when they refuse it."""
        admission, self.admission = self.admission, None
        if admission is not None:
            admission()

    def first_byte(self):
        if self.ttfb is None:
            self.ttfb = time.monotonic() - self.started

    def finish(self):
        """Run the finishers, then write the access log; once, however often it is called
        (a stream's generator and its ``ClosingBody`` both call it)."""
        if self._finished:
            return
        self._finished = True
        for finisher in self.finishers:
            try:
                finisher(self)
            except Exception:
                log.exception("cleanup failed [%s]", self.request_id)
        self.log()

    def log(self):
        record = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "request_id": self.request_id, "upstream_request_id": self.upstream_request_id,
            "client_ip": self.client_ip, "method": self.method, "path": self.path,
            "key": self.key_name, "model": self.public_model,
            "upstream_model": self.upstream_model, "status": self.status,
            "stream": self.stream,
            "duration_ms": round((time.monotonic() - self.started) * 1000, 2),
            "ttfb_ms": None if self.ttfb is None else round(self.ttfb * 1000, 2),
        }
        record.update(self.usage)
        if self.error:
            record["error"] = self.error
        access_log.info(json.dumps(record))


class Gateway:
    """The WSGI application. Build it with ``make_app``; each instance owns its config, key
    store and upstream sessions, so several can live in one process."""

    def __init__(self, config):
        import urllib3
        self.config = config
        self.keys = WatchedFile(config.keys_path, parse_key_file, KeyStore(),
                                last_good_keys(config))
        self.state = HostState(config.state_path)  # this host's; limits_backend's fallback
        self._upstream_key_file = (
            WatchedFile(config.upstream_key_path, parse_secret_lines, ())
            if config.upstream_key_path else None)
        # Load both as the worker boots: a last good version must exist before the file can
        # go bad, or a worker that had served nothing yet would have no keys to fall back on.
        self.keys.get()
        if self._upstream_key_file is not None:
            self._upstream_key_file.get()
        self._refused_upstream_keys = set()  # refused with a 401 by the upstream
        self._upstream_lock = threading.Lock()
        self._upstream = None  # (pid, session, pool, tls): made in the process that serves
        self._deadlines = Deadlines()  # body_timeout and lease renewal, for this app
        self._client_watch = ClientWatch()  # clients that leave before the upstream answers
        # parse_upstream_url first: an embedder's Config(upstream_url=...) skips the INI
        # parser, and a URL the pool cannot use must say why as the app is built.
        parse_upstream_url(config.upstream_url)
        upstream = urllib3.util.parse_url(config.upstream_url)
        self._upstream_origin = "%s://%s" % (upstream.scheme, upstream.netloc)
        self._proxy = proxy_for(config, os.environ)
        if self._proxy and not config.upstream_proxy:
            try:
                parse_proxy_url(self._proxy)  # HTTPS_PROXY skipped the INI parser
            except ValueError:  # named as the operator set it, not as upstream_proxy
                raise ValueError("trust_env: the proxy in HTTPS_PROXY, HTTP_PROXY or ALL_PROXY: "
                                 "expected http://[user:password@]host:port") from None
        elif self._proxy:
            parse_proxy_url(self._proxy)  # an embedder's Config skipped the INI parser
        # An http upstream behind a proxy is asked in absolute form, through a pool connected
        # to the proxy (urllib3's ProxyManager does the same); https tunnels with CONNECT.
        self._absolute_form = (self._proxy is not None
                               and config.upstream_url.startswith("http://"))
        self._ca_file = (WatchedFile(config.path(config.upstream_ca_file), parse_ca_file,
                                     tls_context(), secret=False)
                         if config.upstream_ca_file else None)
        self._default_tls = None
        if self._ca_file is not None:
            self._ca_file.get()  # loaded at boot, as the key files are
        elif config.upstream_url.startswith("https://"):
            self._default_tls = default_tls(config, os.environ)
        # Worked out once, not per call: the upstream's path prefix and urllib3's timeout.
        self._upstream_path = upstream.path or ""
        self._timeout = urllib3.Timeout(connect=config.connect_timeout,
                                        read=config.read_timeout)
        # The upstream pool, built now: what a worker cannot build fails as it boots, and so
        # in 'gateway check' and in the master's trial on HUP, which build the app this same
        # way (make_app), never on every request.
        self.upstream_pool()
        # What an absolute-form request tells the proxy (its credentials): the same for every
        # request, so worked out once here rather than on each send.
        self._proxy_headers = (self.session().get_adapter(self._upstream_origin + "/")
                               .proxy_headers(self._proxy) if self._absolute_form else {})
        self.routes = {
            "/v1/messages": {"POST": self.on_messages},
            "/v1/messages/count_tokens": {"POST": self.on_count_tokens},
            "/v1/models": {"GET": self.on_models},
            "/healthz": {"GET": self.on_health},
            "/": {"HEAD": self.on_root, "GET": self.on_root},
        }
        self.metrics = Metrics() if config.metrics else None
        # Same format as the upstream key file; listing two tokens lets a scraper move over.
        self._metrics_tokens = (
            WatchedFile(config.path(config.metrics_token_file), parse_secret_lines, ())
            if config.metrics_token_file else None)
        if self.metrics is not None:
            self.routes["/metrics"] = {"GET": self.on_metrics}
        self.limits = (RedisLimits(config, self.state, self._deadlines, self.metrics)
                       if config.limits_backend else self.state)

    def __call__(self, environ, start_response):
        return self.wsgi_app(environ, start_response)

    def wsgi_app(self, environ, start_response):
        exchange = Exchange(environ, self._client_ip(environ))
        environ["gateway.request_id"] = exchange.request_id
        try:
            status, headers, body = self._dispatch(environ, exchange)
        except APIError as exc:
            status, headers, body = self._render_error(exc, exchange)
        except Exception:
            log.exception("unexpected error [%s]", exchange.request_id)
            status, headers, body = self._render_error(
                APIError(500, "api_error", "Internal server error."), exchange)
        exchange.status = status
        headers += self._cors_headers(environ, exchange, headers)
        if not any(name.lower() == "request-id" for name, _ in headers):
            # Every answer carries one, the gateway's own 200s too (the SDKs expose it as
            # _request_id); the upstream's own is relayed when it sent one.
            headers.append(("request-id", exchange.request_id))
        start_response(status_line(status), headers)
        if self.metrics is not None:
            self.metrics.watch(exchange, stream=not isinstance(body, bytes))
        if isinstance(body, bytes):
            exchange.first_byte()
            exchange.finish()
            # HEAD: the headers GET would send, Content-Length included, and no body.
            return [b""] if environ.get("REQUEST_METHOD") == "HEAD" else [body]
        return body  # a stream: it finishes the exchange when it ends

    def _dispatch(self, environ, exchange):
        path = environ.get("PATH_INFO") or "/"
        methods = self.routes.get(path)
        if methods is None and path.startswith("/v1/models/"):
            methods = {"GET": self.on_model}
        if methods is None:
            raise APIError(404, "not_found_error", "Not found: %s" % path)
        if "GET" in methods:
            methods = dict({"HEAD": methods["GET"]}, **methods)  # RFC 9110 9.3.2
        if (environ.get("REQUEST_METHOD") == "OPTIONS" and environ.get("HTTP_ORIGIN")
                and environ.get("HTTP_ACCESS_CONTROL_REQUEST_METHOD")):
            return self.on_preflight(environ, methods)
        handler = methods.get(environ.get("REQUEST_METHOD", "GET"))
        if handler is None:
            raise APIError(405, "invalid_request_error",
                           "Method %s is not allowed on %s." % (environ.get("REQUEST_METHOD"),
                                                                 path),
                           [("Allow", ", ".join(sorted(methods)))])
        try:
            answer = handler(environ, exchange)
        except Exception:
            exchange.admitted()  # a refusal by the limits comes first, as if asked first
            raise
        except BaseException:  # gevent's Timeout, GreenletExit: no answer to give
            with contextlib.suppress(APIError):  # but the connection must go back
                exchange.admitted()
            raise
        exchange.admitted()  # an endpoint that answers by itself (GET /v1/models)
        return answer

    # -- endpoints ----------------------------------------------------------------------------

    def on_messages(self, environ, exchange):
        key_entry = self.authenticate(environ, exchange)
        body, layout = parse_json_members(self.read_body(environ))
        routed, exchange.public_model, exchange.upstream_model = route_models(
            body, self.config.models, key_entry)
        exchange.stream = body.get("stream") is True
        self.limit(key_entry, exchange)
        return self.forward(environ, exchange, "/v1/messages",
                            encode_routed(routed, body, layout))

    def on_count_tokens(self, environ, exchange):
        key_entry = self.authenticate(environ, exchange)
        # Dropped before routing: a field count_tokens never sees ("fallbacks": "default")
        # cannot reach a model, so it is no reason to refuse.
        body = count_tokens_body(parse_json_body(self.read_body(environ)))
        routed, exchange.public_model, exchange.upstream_model = route_models(
            body, self.config.models, key_entry)
        self.limit(key_entry, exchange)
        return self.forward(environ, exchange, "/v1/messages/count_tokens",
                            encode_json(routed))

    def on_models(self, environ, exchange):
        key_entry = self.authenticate(environ, exchange)
        ids = [m for m in self.config.models if key_entry.allows(m)]
        page = models_page(ids, environ.get("QUERY_STRING", ""))  # a bad ?limit= is a 400
        self.limit(key_entry, exchange)
        return _json_response(200, page)

    def on_model(self, environ, exchange):
        key_entry = self.authenticate(environ, exchange)
        model_id = environ["PATH_INFO"][len("/v1/models/"):]
        if model_id not in self.config.models or not key_entry.allows(model_id):
            raise APIError(404, "not_found_error", "model: %s. %s" % (
                model_id, usable_models(self.config.models, key_entry)))
        self.limit(key_entry, exchange)
        return _json_response(200, model_info(model_id))

    def on_health(self, environ, exchange):
        return _json_response(200, {"status": "ok"})

    def on_root(self, environ, exchange):
        return 200, [("Content-Type", "text/plain"), ("Content-Length", "0")], b""

    def on_metrics(self, environ, exchange):
        # Key names and their usage are for the operator: with metrics_token_file set, only
        # a scraper sending that token reads them (Prometheus: authorization.credentials_file).
        if self._metrics_tokens is not None:
            presented = (client_key(environ) or "").encode()
            if not any(hmac.compare_digest(presented, token.encode())
                       for token in self._metrics_tokens.get()):
                raise APIError(401, "authentication_error", "/metrics needs the metrics token "
                               "as 'Authorization: Bearer'.")
        body, content_type = self.metrics.render()
        return 200, [("Content-Type", content_type), ("Content-Length", str(len(body)))], body

    def on_preflight(self, environ, methods):
        """A browser's CORS preflight (Fetch standard, "CORS-preflight fetch"): it carries no
        key, so an origin that the config or any key allows passes; the request that follows
        is checked against its key (authenticate). The real API answers the browser apps of
        the TypeScript SDK's ``dangerouslyAllowBrowser`` the same way; without CORS configured
        every origin is refused here."""
        origin = environ["HTTP_ORIGIN"]
        if not (self._origin_allowed(origin, frozenset()) or origin in self._key_origins()):
            raise APIError(403, "permission_error", "Origin %s may not call this gateway "
                           "(cors_origins, or a key's origins=)." % origin[:200])
        requested = [name.strip().lower() for name in
                     environ.get("HTTP_ACCESS_CONTROL_REQUEST_HEADERS", "").split(",")]
        headers = [("Access-Control-Allow-Origin", origin),
                   ("Access-Control-Allow-Methods", ", ".join(sorted(methods))),
                   ("Access-Control-Max-Age", str(CORS_MAX_AGE)),
                   ("Vary", "Origin, Access-Control-Request-Headers")]
        if all(FIELD_NAME.fullmatch(name) for name in requested if name):
            allowed = ", ".join(name for name in requested if name)
            if allowed:  # every header the SDK sends is the client's own business
                headers.append(("Access-Control-Allow-Headers", allowed))
        return 204, headers, b""

    def _origin_allowed(self, origin, key_origins):
        allowed = self.config.cors_origins
        return "*" in allowed or origin in allowed or origin in key_origins

    def _key_origins(self):
        """Every origin some key names: what a preflight, which carries no key, may pass."""
        return self.keys.get().origins

    def _cors_headers(self, environ, exchange, headers):
        """CORS headers for a browser's request from an allowed origin (the config's, or the
        authenticated key's), as the real API sends them for browser apps; nothing for any
        other origin, so the browser keeps the answer from the page."""
        origin = environ.get("HTTP_ORIGIN")
        if (not origin or any(name == "Access-Control-Allow-Origin" for name, _ in headers)
                or not self._origin_allowed(origin, exchange.key_origins)):
            return []
        return [("Access-Control-Allow-Origin", origin),
                ("Access-Control-Expose-Headers", "*"), ("Vary", "Origin")]

    # -- stages -------------------------------------------------------------------------------

    def authenticate(self, environ, exchange):
        key, header = client_credential(environ)
        if key is None:
            raise APIError(401, "authentication_error",
                           "Missing API key: send it as 'x-api-key' or "
                           "'Authorization: Bearer'.")
        now = time.time()
        store = self.keys.get()  # one stat of the key file per request, the origins' too
        entry = store.find(key, now)
        if entry is None or not entry.enabled:
            raise APIError(401, "authentication_error", _refused_key_message(key, header))
        if entry.expired(now):
            raise APIError(401, "authentication_error",
                           "This key expired at %s." % format_time(entry.expires))
        origin = environ.get("HTTP_ORIGIN")
        if (origin and not self._origin_allowed(origin, entry.origins)
                and origin in store.origins):
            # Another key lets this origin past the preflight (which carries no key): this
            # one does not, so a page there cannot spend it.
            raise APIError(403, "permission_error", "This key may not be used from %s."
                           % origin[:200])
        exchange.key_name = entry.name
        exchange.key_origins = entry.origins
        self.limits.touch(entry.name, now)
        return entry

    def limit(self, entry, exchange):
        """Ask the key's limits to admit the request and arrange for its slot to be released
        and its tokens counted when the response is complete. The answer (429 when refused)
        is waited for by ``exchange.admitted()``: just before the request is sent upstream
        (``_send``), or once the endpoint returns (``_dispatch``).

        Each endpoint calls this last, once the request is one it will serve: a refusal of
        its own (a model the key may not use, a body too large or not JSON) must not spend
        the key's rpm or hold one of its concurrency slots.

        Facts -> decision: with Redis, the admit call is a round trip to another process
        (about 0.14 ms on this project's machine, docs/performance.md); encoding the body
        and preparing the upstream request take about 0.03 ms, which now run while the call
        is on its way instead of after it."""
        if not entry.limited:
            return
        exchange.admission = self.limits.begin_admit(entry, exchange.request_id, time.time())
        # Arranged before the answer is known: for a refused request, finish finds no slot
        # held (none noted live) and no tokens to count.
        if entry.concurrency or entry.tokens_per_day:
            exchange.finishers.append(lambda ex: self.limits.finish(
                entry, ex.request_id, tokens_counted(ex.usage), time.time()))

    def read_body(self, environ):
        """The request body: 413 over ``max_body_bytes`` (before reading when the length is
        declared), 408 when it takes longer than ``body_timeout`` to arrive, 400 when the
        client sends less than it declared, breaks the chunked framing or goes away."""
        with _body_deadline(environ, self.config.body_timeout, self._deadlines) as expired:
            try:
                return self._read_body(environ)
            except APIError:
                if not expired.is_set():
                    raise
            except Exception as exc:  # wsgi.input's own: a reset, a bad chunk, EOF mid-chunk
                if not expired.is_set():
                    log.info("request body unreadable [%s]: %s",
                             environ.get("gateway.request_id"), type(exc).__name__)
                    raise APIError(400, "invalid_request_error",
                                   "The request body could not be read.") from None
        log.info("request body did not arrive within %g s [%s]", self.config.body_timeout,
                 environ.get("gateway.request_id"))
        raise APIError(408, "timeout_error", "The request body did not arrive within %g "
                       "seconds." % self.config.body_timeout)

    def _read_body(self, environ):
        limit = self.config.max_body_bytes
        too_large = APIError(413, "request_too_large",
                             "Request exceeds the maximum allowed size of %d bytes." % limit)
        length = environ.get("CONTENT_LENGTH", "")
        stream = environ["wsgi.input"]
        if length:
            try:
                length = int(length)
            except ValueError:
                raise APIError(400, "invalid_request_error", "Invalid Content-Length.") from None
            if length > limit:
                raise too_large
            return _read_exactly(stream, length)
        if not environ.get("wsgi.input_terminated"):
            # Neither a length nor a server that ends the stream for us (PEP 3333 leaves
            # reading past CONTENT_LENGTH undefined): there is no body to read.
            return b""
        chunks, size = [], 0
        while True:
            chunk = stream.read(min(BODY_READ_SIZE, limit + 1 - size))
            if not chunk:
                return b"".join(chunks)
            size += len(chunk)
            if size > limit:
                raise too_large
            chunks.append(chunk)

    def forward(self, environ, exchange, path, body):
        import requests
        with self._client_watch.watching(environ) as waiting:
            response = self._send_with_failover(environ, exchange, path, body)
        if waiting is not None and waiting.client_gone:  # gone just as the answer came
            response.close()
            raise _client_went_away(exchange)
        exchange.upstream_request_id = response.headers.get("request-id")
        exchange.upstream_status = response.status_code
        coding = undecodable_coding(response.headers)
        if coding:
            response.close()
            log.error("upstream answered in content coding %r, which the gateway cannot "
                      "decode [%s]", coding[:40], exchange.request_id)
            raise APIError(502, "api_error", "The upstream's answer could not be decoded.")
        headers = client_headers(response.headers)
        streaming = (exchange.stream and response.status_code == 200
                     and response.headers.get("content-type", "").startswith(SSE_CONTENT_TYPE))
        if streaming:
            headers += [("Cache-Control", "no-cache"), ("X-Accel-Buffering", "no")]
            body = ClosingBody(relay_stream(response, exchange), response.close,
                               exchange.finish)
            return response.status_code, headers, body
        exchange.stream = False
        try:
            content = response.content
        except requests.RequestException as exc:
            raise _upstream_error(exc, exchange, self.config) from None
        finally:
            response.close()
        answer = upstream_json(content)
        if answer is None and 200 <= response.status_code < 300:
            # A client would take a 2xx for the answer and fail to parse it, without retrying
            # (docs/protocol.md, "A 200 that is not an answer").
            log.error("upstream answered %d with a body that is not JSON [%s]",
                      response.status_code, exchange.request_id)
            raise APIError(502, "api_error", "The upstream's answer was not JSON.")
        exchange.usage = usage_of(answer)
        headers.append(("Content-Length", str(len(content))))
        return response.status_code, headers, content

    def _send_with_failover(self, environ, exchange, path, body):
        """Send with the first upstream key the upstream has not refused. A 401 answers for
        OUR key (the client's never goes upstream), so the same request goes again with the
        next key; when every key is refused, the client gets a 502 and the operator a
        CRITICAL log line. Refused keys are retried once all are refused, so a fixed account
        recovers by itself."""
        keys = self.upstream_keys()
        usable = [key for key in keys if key not in self._refused_upstream_keys] or keys
        for key in usable:
            response = self._send(environ, exchange, path, body, key)
            if response.status_code == 407:  # an http upstream asked through upstream_proxy
                response.close()
                log.error("the proxy refused the gateway's proxy credentials (407) [%s]: check "
                          "upstream_proxy", exchange.request_id)
                raise APIError(502, "api_error", "The upstream could not be reached.")
            if response.status_code != 401:
                return response
            response.close()
            self._refused_upstream_keys.add(key)
            log.critical("the upstream refused OUR key #%d of %d (401) [%s]: replace it in "
                         "the upstream key file", keys.index(key) + 1, len(keys),
                         exchange.request_id)
        # Not retried (x-should-retry): only the operator can fix it, and Claude Code would
        # otherwise try ten times.
        raise APIError(502, "api_error", "The gateway's upstream credentials were refused. "
                       "The operator has been told.", [NO_RETRY])

    def _send(self, environ, exchange, path, body, upstream_key):
        import requests
        query = environ.get("QUERY_STRING", "")
        headers = upstream_headers(environ, upstream_key)
        # requote_uri: the request target exactly as Session.post would have sent it.
        target = requests.utils.requote_uri(self._upstream_path + path
                                            + ("?" + query if query else ""))
        if self._absolute_form:
            target = self._upstream_origin + target
            headers.update(self._proxy_headers)
        exchange.admitted()  # the limits' answer, before anything goes upstream
        try:
            return send_pooled(self.upstream_pool(), target, body, headers, self._timeout)
        except requests.RequestException as exc:
            waiting = _WAITING.get()
            if waiting is not None and waiting.client_gone:
                raise _client_went_away(exchange) from None
            raise _upstream_error(exc, exchange, self.config) from None

    def upstream_keys(self):
        keys = (self.config.upstream_key,) if self.config.upstream_key else ()
        if self._upstream_key_file is not None:
            keys = self._upstream_key_file.get()
        if not keys:
            log.critical("no upstream key: put it in %s or set ANTHROPIC_API_KEY",
                         self.config.upstream_key_path)
            raise APIError(502, "api_error", "The gateway has no upstream credentials. "
                           "The operator has been told.", [NO_RETRY])
        return keys

    def session(self):
        """This process's upstream session, shared by its threads (``new_session``)."""
        return self._process_upstream()[1]

    def upstream_pool(self):
        """This process's connection pool to the upstream host, shared by its threads."""
        return self._process_upstream()[2]

    def _process_upstream(self):
        # Made on first use in the process that serves: an app built before gunicorn forks
        # (preload_app) must not share its sockets with the workers. Made again, in the same
        # session, when the TLS context changed (an edited upstream_ca_file): the adapter
        # keeps one pool per host, so the old pool and its idle connections are closed.
        tls = self.upstream_tls()
        upstream = self._upstream
        if upstream is None or upstream[0] != os.getpid() or upstream[3] is not tls:
            with self._upstream_lock:
                upstream = self._upstream
                if upstream is None or upstream[0] != os.getpid():
                    session = new_session(self.config)
                elif upstream[3] is not tls:
                    session = upstream[1]
                else:
                    return upstream
                pool = upstream_pool(session, self.config.upstream_url + "/", tls, self._proxy)
                upstream = self._upstream = (os.getpid(), session, pool, tls)
        return upstream

    def upstream_tls(self):
        """The TLS context that verifies the upstream (None for an http upstream)."""
        if self._ca_file is not None:
            return self._ca_file.get()
        return self._default_tls

    def _client_ip(self, environ):
        remote = environ.get("REMOTE_ADDR")
        if remote in self.config.trusted_proxies and environ.get("HTTP_X_REAL_IP"):
            return environ["HTTP_X_REAL_IP"].strip()
        return remote

    def _render_error(self, exc, exchange):
        exchange.error = exc.error_type
        if exc.model and exchange.public_model is None:
            exchange.public_model = exc.model  # the 403's log line names what was asked for
        body = error_body(exc.error_type, exc.message, exchange.request_id)
        headers = [("Content-Type", JSON_CONTENT_TYPE), ("Content-Length", str(len(body))),
                   ("request-id", exchange.request_id)] + exc.headers
        return exc.status, headers, body


class Deadlines:
    """Runs each action once its deadline has passed, from one thread per process.

    Facts -> decision: a ``threading.Timer`` per request starts and stops a thread: 113 us of
    CPU, a fifth of a whole request (0.75 against 0.59 ms per request in tests/benchmark.py).
    Body deadlines are all ``body_timeout`` long and seldom fire, so one thread looks at the
    pending ones every ``TICK`` seconds instead: adding and cancelling one is a dict update
    under a lock, and an action runs at most ``TICK`` late. The thread starts with the first
    deadline, in the process that uses it (a gunicorn worker, not a master that forks).
    """

    TICK = 0.25

    def __init__(self):
        self._lock = threading.Lock()
        self._pending = {}  # token -> (time.monotonic() deadline, action)
        self._owner = None  # the pid whose thread runs the actions

    def add(self, seconds, action):
        token = object()
        with self._lock:
            self._pending[token] = (time.monotonic() + seconds, action)
            if self._owner != os.getpid():
                self._owner = os.getpid()
                threading.Thread(target=self._run, name="gateway-deadlines",
                                 daemon=True).start()
        return token

    def cancel(self, token):
        with self._lock:
            self._pending.pop(token, None)

    def _run(self):
        while True:
            time.sleep(self.TICK)
            now = time.monotonic()
            with self._lock:
                due = [token for token, (when, _) in self._pending.items() if when <= now]
                actions = [self._pending.pop(token)[1] for token in due]
            for action in actions:
                try:
                    action()
                except Exception:
                    log.exception("a deadline's action failed")


def _lent_socket(environ):
    """The client's socket when it is this request's alone, else None: only gunicorn lends it
    (``gunicorn.socket``), and only over HTTP/1 does it carry no other request."""
    sock = environ.get("gunicorn.socket")
    if sock is None or not environ.get("SERVER_PROTOCOL", "").startswith("HTTP/1"):
        return None
    return sock


class _Waiting:
    """One exchange waiting for its upstream's answer: its client's socket, the upstream
    socket once the request is sent (``_ReportsSocket``), and whether the client left."""

    __slots__ = ("client_fd", "upstream", "client_gone")

    def __init__(self, client_fd):
        self.client_fd = client_fd
        self.upstream = None
        self.client_gone = False


class ClientWatch:
    """Notices a client that hangs up while its exchange waits for the upstream's answer, and
    closes that upstream connection: one thread per process looks at every waiting client.

    Facts -> decision: a non-streamed answer with long thinking sends no headers until it is
    complete (minutes), and a thread blocked reading them does not notice its client leave:
    20 clients leaving a hung upstream left 20 upstream requests (and their token bills)
    running for up to ``read_timeout``. gunicorn lends the client socket (``gunicorn.socket``);
    a hang-up makes it readable with nothing to read (EOF) or flags an error. Every ``TICK``
    this thread polls the waiting clients' sockets without blocking and, for each one gone,
    shuts the upstream socket down: the blocked read returns at once and the request fails as
    "client went away" (status 499, as nginx logs it). A client that has sent more bytes
    (pipelining) is never taken for gone, even if it closed after them: only an empty socket
    is read as EOF, as nginx does. Only HTTP/1 sockets are watched (an HTTP/2 socket carries
    other requests); a server without ``gunicorn.socket`` (an embedder's) keeps the old
    behaviour. Under gevent the thread is a greenlet and the poll is the standard library's own,
    non-blocking one. Linux and other POSIX systems with ``poll``; elsewhere nothing is watched.
    """

    TICK = 0.25

    def __init__(self):
        self._lock = threading.Lock()
        self._waiting = set()
        self._owner = None  # the pid whose thread watches
        self._poll = _unpatched_poll()

    @contextlib.contextmanager
    def watching(self, environ):
        """While the body runs, a hang-up of ``environ``'s client closes the upstream
        connection that this thread opens. Yields the ``_Waiting`` (None when unwatched)."""
        sock = _lent_socket(environ)
        if self._poll is None or sock is None:
            yield None
            return
        waiting = _Waiting(sock.fileno())
        with self._lock:
            self._waiting.add(waiting)
            if self._owner != os.getpid():
                self._owner = os.getpid()
                threading.Thread(target=self._run, name="gateway-client-watch",
                                 daemon=True).start()
        token = _WAITING.set(waiting)
        try:
            yield waiting
        finally:
            _WAITING.reset(token)
            with self._lock:  # after this the watcher never touches this exchange's sockets
                self._waiting.discard(waiting)

    def _run(self):
        while True:
            time.sleep(self.TICK)
            try:
                self._check()
            except Exception:
                log.exception("the client watch failed")

    def _check(self):
        with self._lock:
            waiting = [w for w in self._waiting if w.upstream is not None]
        if not waiting:
            return
        poller = self._poll()
        for each in waiting:
            poller.register(each.client_fd, select.POLLIN)
        ready = dict(poller.poll(0))
        gone = [w for w in waiting if ready.get(w.client_fd) and _hung_up(w.client_fd,
                                                                          ready[w.client_fd])]
        with self._lock:
            for each in gone:
                if each in self._waiting and not each.client_gone:
                    each.client_gone = True
                    try:
                        each.upstream.shutdown(socket.SHUT_RDWR)
                    except (OSError, ValueError):  # the upstream closed it meanwhile
                        pass


def _hung_up(fd, events):
    """True when a socket that ``poll`` flagged has hung up: an error, or readable with
    nothing to read (EOF). Bytes waiting to be read (a pipelined request) are not a hang-up."""
    if events & select.POLLNVAL:
        return False
    if events & select.POLLERR:  # a reset
        return True
    try:
        pending = fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0")
    except OSError:
        return False
    return int.from_bytes(pending, sys.byteorder) == 0


def _unpatched_poll():
    """The standard library's ``select.poll``, or None where there is none. gevent's
    monkey-patching swaps in a cooperative poll that waits on its event loop; the watcher only
    ever polls with timeout 0, which the original does without blocking anyone."""
    monkey = sys.modules.get("gevent.monkey")
    if monkey is not None and monkey.is_object_patched("select", "poll"):
        return monkey.get_original("select", "poll")
    return getattr(select, "poll", None)


@contextlib.contextmanager
def _body_deadline(environ, seconds, deadlines):
    """Bound the time a client may take to send its body, and yield an Event set when it ran
    out. A slowloris holds a worker thread for as long as it dribbles: gthread reads the body
    in the thread that runs the app.

    Facts -> decision: a socket timeout bounds each ``recv``, not the body, and gunicorn's
    ``read(n)`` loops over ``recv`` until it has ``n`` bytes, so one byte a second never trips
    it. So at the deadline (``Deadlines``) the socket's read side is shut: the pending ``recv``
    returns EOF at once and the read ends short. Only gunicorn lends the socket
    (``gunicorn.socket``) and only over HTTP/1 is it one request's alone; elsewhere there is no
    deadline. nginx in front makes none: its client_body_timeout counts between two reads, and
    deploy/nginx.conf passes bodies on as they come. A deadline that fires just as the read
    completes costs that connection its keep-alive, nothing more.
    """
    expired = threading.Event()
    sock = _lent_socket(environ)
    if sock is None:
        yield expired
        return

    def cut_off():
        expired.set()
        try:
            sock.shutdown(socket.SHUT_RD)
        except OSError:  # already closed
            pass

    token = deadlines.add(seconds, cut_off)
    try:
        yield expired
    finally:
        deadlines.cancel(token)


def _read_exactly(stream, length):
    # One read for all that is missing (``length`` is already within max_body_bytes): gunicorn
    # copies its read-ahead buffer on every read call, and reading a 5 MB body 256 KiB at a
    # time spent 18 ms doing so (py-spy, tests/benchmark.py).
    chunks, remaining = [], length
    while remaining > 0:
        chunk = stream.read(remaining)
        if not chunk:
            raise APIError(400, "invalid_request_error",
                           "The request body is shorter than its Content-Length.")
        chunks.append(chunk)
        remaining -= len(chunk)
    return b"".join(chunks)


def _refused_key_message(key, header):
    """The real API's wording for the header the client used ('invalid x-api-key', 'Invalid
    bearer token'), and a hint when the key is an Anthropic one rather than ours."""
    message = "invalid x-api-key" if header == API_KEY_HEADER else "Invalid bearer token"
    if key.startswith(ANTHROPIC_KEY_PREFIX):
        message += (" (it is an Anthropic API key; this gateway takes the keys its operator "
                    "gives out)")
    return message


def _json_response(status, payload):
    body = json.dumps(payload).encode()
    return status, [("Content-Type", JSON_CONTENT_TYPE), ("Content-Length", str(len(body)))], body


def _client_went_away(exchange):
    """The error for an exchange whose client left before the upstream answered (ClientWatch):
    nobody reads it; the access log says 499, as nginx does, and "client went away"."""
    log.info("client went away before the upstream answered; upstream connection closed "
             "[%s]", exchange.request_id)
    return APIError(499, CLIENT_WENT_AWAY, "The client went away before the upstream answered.")


def _upstream_error(exc, exchange, config):
    """Map a requests failure before the answer started: timeouts 504, the rest 502
    (WSGIProxy2's mapping). The log names the upstream host and the cause, never a key, a
    header or a URL's path."""
    import requests
    log.error("upstream request to %s failed [%s]: %s (%s)", upstream_host(config.upstream_url),
              exchange.request_id, upstream_failure(exc, config), type(exc).__name__)
    if isinstance(exc, (requests.ReadTimeout, requests.exceptions.ConnectTimeout)):
        return APIError(504, "timeout_error", "The upstream did not answer in time.")
    return APIError(502, "api_error", "The upstream could not be reached.")


def upstream_host(url):
    """'host:port' of an upstream URL, the port filled in for its scheme."""
    import urllib3
    parsed = urllib3.util.parse_url(url)
    return "%s:%d" % (parsed.host, parsed.port or (443 if parsed.scheme == "https" else 80))


def upstream_failure(exc, config):
    """Why an upstream call failed, in a few words an operator can act on: DNS, refused,
    TLS, timeout, reset. Read from the exceptions that requests and urllib3 wrap inside one
    another (socket errors at the bottom), never from a URL or a header."""
    import requests
    import urllib3
    chain = _exception_chain(exc)
    cause = "connection failed"
    if isinstance(exc, requests.exceptions.ConnectTimeout):
        cause = "no connection within connect_timeout (%g s)" % config.connect_timeout
    elif any(isinstance(e, TimeoutError) and "handshake" in str(e) for e in chain):
        # urllib3 bounds the handshake by the connect timeout, and reports a read timeout.
        cause = "TLS handshake timed out (connect_timeout %g s)" % config.connect_timeout
    elif isinstance(exc, requests.ReadTimeout):
        cause = "no answer within read_timeout (%g s)" % config.read_timeout
    else:
        for error in chain:
            if isinstance(error, socket.gaierror):
                cause = "DNS lookup failed: %s" % (error.strerror or error)
            elif isinstance(error, ssl.SSLCertVerificationError):
                cause = "TLS certificate refused: %s (%s)" % (
                    TLS_VERIFY_REASONS.get(error.verify_code, "not trusted"),
                    error.verify_message)
            elif isinstance(error, ssl.SSLError):
                cause = "TLS failed: %s" % (error.reason or type(error).__name__)
            elif isinstance(error, ConnectionRefusedError):
                cause = "connection refused"
            elif isinstance(error, ConnectionResetError):
                cause = "connection reset"
            elif isinstance(error, OSError) and str(error).startswith("Tunnel connection failed"):
                # The proxy's answer to CONNECT (http.client's _tunnel): a 407 (tinyproxy:
                # 401) means the upstream_proxy credentials, not the upstream's, were refused.
                cause = "CONNECT answered %s" % str(error).split(": ", 1)[-1][:80]
            elif isinstance(error, OSError) and error.strerror:
                cause = error.strerror
            else:
                continue
            break
    if any(isinstance(error, urllib3.exceptions.ProxyError) for error in chain):
        return "through the proxy: " + cause
    return cause


def _exception_chain(exc):
    """``exc`` and every exception it wraps: in its args (requests wraps urllib3's there),
    as its cause or context, or as a retry error's ``reason``; outermost first."""
    chain, todo = [], [exc]
    while todo:
        error = todo.pop(0)
        if any(error is seen for seen in chain):
            continue
        chain.append(error)
        todo += [arg for arg in error.args if isinstance(arg, BaseException)]
        todo += [inner for inner in (error.__cause__, error.__context__,
                                     getattr(error, "reason", None))
                 if isinstance(inner, BaseException)]
    return chain


#: OpenSSL's X509_V_ERR_* codes (x509_vfy.h) in the words an operator looks for.
TLS_VERIFY_REASONS = {
    2: "unknown issuer", 18: "unknown issuer (self-signed)",
    19: "unknown issuer (self-signed CA)", 20: "unknown issuer", 21: "unknown issuer",
    9: "not yet valid", 10: "expired", 62: "wrong name", 64: "wrong name",
}


def make_app(config=None):
    """Return the gateway WSGI application.

    ``config`` is a ``Config``; when None, ``Config.from_environ(os.environ)`` is used, so
    ``gunicorn 'gateway:make_app()'`` reads the file that ``GATEWAY_CONFIG`` names.
    """
    if config is None:
        config = Config.from_environ(os.environ)
    return Gateway(config)


# ---------------------------------------------------------------------------------------------
# Operator commands: keys, check, usage, serve
# ---------------------------------------------------------------------------------------------

def generate_key():
    return KEY_PREFIX + secrets.token_urlsafe(32)


class CommandError(Exception):
    """A problem the operator must fix: main() prints 'error: <message>' and exits with
    ``code`` (1 for a state problem, 2 for a usage problem)."""

    def __init__(self, message, code=1):
        super().__init__(message)
        self.code = code


#: A name 'gateway keys add' accepts: one word of letters, digits and ``. _ @ + -``, so that it
#: cannot split into fields, start a comment or need quoting in the access log or a shell.
KEY_NAME = re.compile(r"[\w.@+-]+")
KEY_FILE_HEADER = "# gateway key file: name digest models enabled [options]. Use 'gateway keys'.\n"


def load_key_file(path):
    """Read the key file for editing: its text and its ``KeyStore``; a missing file is an
    empty one. A file that does not parse is an error naming the line to fix."""
    try:
        text = read_text(path, empty_ok=True)  # empty is fine here: no keys yet
    except FileNotFoundError:
        return "", KeyStore()
    except OSError as exc:
        raise CommandError("key file %s: %s" % (path, describe(exc))) from None
    except ValueError as exc:  # not UTF-8
        raise CommandError(_fix_the_line(path, exc)) from None
    try:
        return text, parse_key_file(text)
    except ValueError as exc:
        raise CommandError(_fix_the_line(path, exc)) from None


def _fix_the_line(path, exc):
    return ("key file %s, %s.\nFix or delete that line, then run the command again. Until "
            "then the workers serve the last version that parsed." % (path, exc))


def render_key_file(text, old, new):
    """The key file's text after ``old`` became ``new``: the lines of changed keys rewritten,
    those of removed keys dropped, new keys appended; comments, blank lines and every other
    line kept byte for byte. Returns the text and the names of the lines written anew."""
    old_entries = {entry.name: entry for entry in old.entries}
    new_entries = {entry.name: entry for entry in new.entries}
    lines, written = [], []
    for line in text.splitlines(keepends=True):
        fields = line.split(None, 1)
        name = fields[0] if fields and not fields[0].startswith("#") else None
        if name not in old_entries:  # a comment or a blank line
            lines.append(line)
        elif name in new_entries and new_entries[name] == old_entries[name]:
            lines.append(line)
        elif name in new_entries:
            ending = line[len(line.rstrip("\r\n")):] or "\n"
            lines.append(new_entries[name].to_line() + ending)
            written.append(name)
    if lines and not lines[-1].endswith(("\n", "\r")):
        lines[-1] += "\n"
    if not text:
        lines.append(KEY_FILE_HEADER)
    for entry in new.entries:
        if entry.name not in old_entries:
            lines.append(entry.to_line() + "\n")
            written.append(entry.name)
    return "".join(lines), written


def verify_key_file(text, new, written):
    """Raise CommandError unless ``text``, parsed by the workers' own parser, holds exactly
    ``new``: a file that a worker would refuse (or read differently) is never written."""
    try:
        parsed = parse_key_file(text)
    except ValueError as exc:
        raise CommandError("refusing to write the key file: the new version would not "
                           "parse (%s); nothing was changed" % exc) from None
    found = {entry.name: entry for entry in parsed.entries}
    wanted = {entry.name: entry for entry in new.entries}
    if found.keys() != wanted.keys() or any(
            found[name].to_line() != wanted[name].to_line() for name in written):
        raise CommandError("refusing to write the key file: the new version would not read "
                           "back as written; nothing was changed")


def write_key_file(path, text):
    """Replace the key file atomically, with mode 0600 (see _write_atomically). A symlinked
    key file is written through to its target (the link stays), and the file keeps its owner
    and group when we may set them (root editing the service user's file)."""
    _write_atomically(os.path.realpath(path), text)


def edit_key_file(config, change):
    """Read, change and write the key file under an exclusive lock beside it, so two
    'gateway keys' runs never interleave. ``change(store)`` returns the new store; the new text
    is checked with the workers' parser before it replaces the file."""
    try:
        with exclusive_lock(config.keys_path + ".lock", owner_of=config.keys_path):
            text, store = load_key_file(config.keys_path)
            if not text:
                _refuse_to_start_over(config)
            new = change(store)
            new_text, written = render_key_file(text, store, new)
            verify_key_file(new_text, new, written)
            write_key_file(config.keys_path, new_text)  # its rename is the last thing it does
    except OSError as exc:  # a lock file or directory we may not write, a full disk
        raise CommandError("cannot update %s: %s; nothing was changed (run 'gateway keys' as "
                           "the user that owns the key file)" % (
                               exc.filename or config.keys_path, describe(exc))) from None
    last_good_keys(config).save(new_text, os.stat(config.keys_path).st_ctime_ns)


def _refuse_to_start_over(config):
    """A missing or empty key file is broken to the workers, which serve its last good copy
    meanwhile: an edit that started from nothing would replace every key they serve with the
    new one alone. So the copy is restored first, or deleted to really start over."""
    copy = last_good_keys(config)
    try:
        served = len(copy.load(parse_key_file)[0].entries)
    except FILE_ERRORS:
        return
    if served:
        raise CommandError(
            "key file %s is missing or empty, but the workers serve %d key(s) from its last "
            "good copy %s; nothing was changed. Restore the copy (tail -n +2 %s > %s), or "
            "delete it to start again with no keys" % (
                config.keys_path, served, copy.readable_path(), copy.readable_path(),
                config.keys_path))


def _existing(store, name):
    entry = store.get(name)
    if entry is None:
        raise CommandError("no key named %r" % name)
    return entry


def key_settings(config, args):
    """The KeyEntry fields that the command line sets: only those given, each checked."""
    settings = {}
    if getattr(args, "models", None) is not None:
        settings["models"] = _models_setting(config, args.models)
    if getattr(args, "expires", None) is not None:
        settings["expires"] = _expires_setting(args.expires)
    for name in LIMIT_OPTIONS:
        value = getattr(args, name, None)
        if value is not None:
            settings[name] = value or None  # 0 removes the limit
    if getattr(args, "origins", None) is not None:
        try:
            settings["origins"] = (frozenset() if args.origins.strip() == "none"
                                   else parse_origins(args.origins))
        except ValueError as exc:
            raise CommandError("--origins: %s" % exc, 2) from None
    return settings


def _models_setting(config, text):
    if text.strip() == "*":
        return None
    models = frozenset(m.strip() for m in text.split(",") if m.strip())
    if "*" in models:
        raise CommandError("--models %r: * means every model; give it alone" % text, 2)
    if not models:
        raise CommandError("--models %r names no model: give public ids, comma-separated, or "
                           "* for every model" % text, 2)
    unknown = sorted(models - set(config.models))
    if unknown:
        raise CommandError("unknown model(s) %s; configured: %s"
                           % (", ".join(unknown), ", ".join(config.models)), 2)
    return models


def _expires_setting(text):
    if text == "never":
        return None
    try:
        expires = parse_time(text)
    except ValueError as exc:
        raise CommandError(str(exc), 2) from None
    # An expiry already past would make the key refused from its first request: that is
    # a typo far more often than a wish ('gateway keys disable' refuses a key on purpose).
    if expires <= time.time():
        raise CommandError("--expires %s is in the past: the key would be refused at once "
                           "(to refuse it now, use 'gateway keys disable')"
                           % format_time(expires), 2)
    return expires


def parse_duration(text):
    """'90s', '30m', '24h', '7d' -> seconds (at most 10 years)."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    try:
        seconds = float(text[:-1]) * units[text[-1]]
    except (KeyError, ValueError, IndexError):
        seconds = None
    if seconds is None or not 0 <= seconds <= 3650 * 86400:
        raise CommandError("a duration is a number and s, m, h or d, like 24h (at most "
                           "3650d)", 2)
    return seconds


def cmd_keys_add(config, args):
    if not KEY_NAME.fullmatch(args.name):
        raise CommandError("key name %r: use letters, digits and . _ @ + - only (no spaces, "
                           "commas or other separators)" % args.name, 2)
    settings = key_settings(config, args)
    key = generate_key()

    def add(store):
        if store.get(args.name) is None:
            return store.replace(args.name, digest=digest_key(key), **settings)
        if not args.replace:
            raise CommandError("a key named %r exists; rotate it, revoke it, or add it again "
                               "with --replace" % args.name)
        fresh = KeyEntry(args.name, digest_key(key), **settings)  # in its line's place
        return KeyStore(fresh if e.name == args.name else e for e in store.entries)
    edit_key_file(config, add)
    print("added key %r to %s; it is shown only this once:" % (args.name, config.keys_path))
    print(key)
    return 0


def cmd_keys_rotate(config, args):
    args.grace = args.grace or "24h"
    grace = parse_duration(args.grace)
    key = generate_key()
    now = time.time()
    dropped = []  # the key an earlier rotation gave, when this one comes within its grace

    def rotate(store):
        old = _existing(store, args.name)
        previous, until = (old.salt, old.digest), now + grace
        if old.previous is not None and now < (old.previous_until or 0):
            # Rotated again within the grace period (the new key was lost, or leaked): the
            # key before the first rotation is the one clients still use, and it was
            # promised until then; the key the last rotation printed goes instead.
            previous, until = old.previous, min(old.previous_until, until)
            dropped.append(until)
        return store.replace(args.name, digest=digest_key(key), salt=b"",
                             previous=previous, previous_until=until)
    edit_key_file(config, rotate)
    if dropped:
        print("rotated key %r again within its grace period: the key the last rotation gave "
              "works no more; the key before it works until %s. The new key, shown only once:"
              % (args.name, format_time(dropped[0])))
    else:
        print("rotated key %r; the old key works for %s more. The new key, shown only once:"
              % (args.name, args.grace))
    print(key)
    return 0


def cmd_keys_set(config, args):
    settings = key_settings(config, args)
    if not settings:
        raise CommandError("nothing to set: give --models, --expires, --origins or a limit", 2)
    edit_key_file(config, lambda store: _existing(store, args.name) and store.replace(
        args.name, **settings))
    print("updated key %r" % args.name)
    return 0


def cmd_keys_enable(config, args):
    enabled = args.keys_command == "enable"
    edit_key_file(config, lambda store: _existing(store, args.name) and store.replace(
        args.name, enabled=enabled))
    print("%s key %r" % ("enabled" if enabled else "disabled", args.name))
    return 0


def cmd_keys_revoke(config, args):
    edit_key_file(config, lambda store: _existing(store, args.name) and KeyStore(
        e for e in store.entries if e.name != args.name))
    print("revoked key %r; every worker refuses it from its next request" % args.name)
    return 0


def cmd_keys_list(config, args):
    text, store = load_key_file(config.keys_path)
    fallback = _last_good_keys_note(config) if not text else None
    if fallback:  # an empty list here is not what the workers serve
        print("warning: key file %s is missing or empty: %s" % (config.keys_path, fallback),
              file=sys.stderr)
    last_use = _last_use(config, [e.name for e in store.entries])
    now = time.time()
    rows = [("NAME", "MODELS", "ENABLED", "EXPIRES", "LIMITS", "LAST USE", "OLD KEY")]
    for e in store.entries:
        limits = " ".join("%s=%d" % (n, getattr(e, n)) for n in LIMIT_OPTIONS if getattr(e, n))
        rows.append((e.name, ",".join(sorted(e.models)) if e.models is not None else "*",
                     "yes" if e.enabled else "no", _expiry_cell(e, now), limits or "-",
                     format_time(last_use[e.name]) if e.name in last_use else "never",
                     _old_key_cell(e, now)))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
    return 0


def _expiry_cell(entry, now):
    if entry.expires is None:
        return "-"
    return format_time(entry.expires) + (" (expired)" if entry.expired(now) else "")


def _old_key_cell(entry, now):
    """A rotation's grace period: while it lasts, the key before the rotation works too."""
    if entry.previous is not None and now < (entry.previous_until or 0):
        return "works until " + format_time(entry.previous_until)
    return "-"


def _last_use(config, names):
    """Last use from where the workers record it: Redis when it is the limits backend (the
    state file when Redis does not answer, saying so), else the state file."""
    if config.limits_backend:
        try:
            limits = RedisLimits(config, None, Deadlines())
            return limits.last_use(names)
        except ValueError as exc:  # no redis-py
            problem = str(exc)
        except limits.errors as exc:
            problem = "%s does not answer (%s)" % (limits.where, type(exc).__name__)
        print("warning: %s; last use from this host's %s" % (problem, config.state_path),
              file=sys.stderr)
    return HostState(config.state_path).last_use()


def _check_limits(config):
    """Say where the limits are kept and whether that answers. A Redis that is down is what
    limits_backend_down is for, so only a warning; one that answers and refuses the
    credentials or the commands is a config to fix: a problem (a reload would put every host
    on limits_backend_down until the next one)."""
    if not config.limits_backend:
        print("limits: per host, in %s" % config.state_path)
        return []
    where = redacted_url(config.limits_backend)
    try:
        limits = RedisLimits(config, None, Deadlines())
    except ValueError:  # no redis-py: boot_problem has said so
        return []
    try:
        version, elapsed = limits.check()
    except limits.errors as exc:
        limits.close()
        exceptions = limits._redis_module.exceptions
        if isinstance(exc, (exceptions.AuthenticationError, exceptions.AuthorizationError,
                            exceptions.NoPermissionError)):
            return ["limits backend %s refuses the gateway (%s): check the user name and "
                    "password in limits_backend, and the user's ACL" % (where,
                                                                        type(exc).__name__)]
        print("warning: limits backend %s does not answer (%s): until it does, %s" % (
            where, type(exc).__name__, LIMITS_DOWN_POLICIES[config.limits_backend_down]))
        return []
    limits.close()  # 'gateway serve' forks its workers next: they must not share it
    print("limits: shared by every host in %s (Redis %s, answered in %.1f ms); lease %g s; "
          "while it is down: %s" % (where, version, elapsed, config.limits_lease,
                                    config.limits_backend_down))
    return []


def state_file_problems(config):
    """(directory problem, file problem) the workers would meet with ``state_file``, each None
    when there is none. Its directory must take new files: the state file and SQLite's -wal
    and -shm beside it, the key file's last good copy and its lock. The file, when it exists,
    must be a SQLite database (or empty) that they may read and write.

    Nothing is written to find out. 'gateway check' also runs as root (by hand, from an
    install script) while the workers run as the service user, and a probe file, state file
    or -shm file that root made would stay root's, mode 0600 under the unit's UMask: the
    workers could not open it, the very failure looked for here. So the kernel is asked
    instead (``os.access`` with the effective ids: no file made), and an existing state file
    is only opened read-only for its first bytes. Run as the service user (as the unit's
    ExecReload runs it) the answers are the workers'; root may write almost anywhere, so as
    root only a missing directory, a read-only mount or a file of the wrong kind shows."""
    path = config.state_path
    directory = os.path.dirname(path)
    if not os.path.isdir(directory):
        return ("directory %s %s" % (directory, "is not a directory" if os.path.lexists(
            directory) else "does not exist"), None)
    if not _may(directory, os.W_OK | os.X_OK):
        return "directory %s is not writable by %s" % (directory, _user()), None
    if not os.path.basename(path):
        return None, "%r names no file" % config.state_file
    if not os.path.lexists(path):
        return None, None  # the first worker to count a request makes it
    if os.path.isdir(path):
        return None, "%s is a directory" % path
    if not os.path.isfile(path):
        return None, "%s is not a regular file" % path
    for name in (path, path + "-wal", path + "-shm"):
        if os.path.lexists(name) and not _may(name, os.R_OK | os.W_OK):
            return None, "%s is not readable and writable by %s" % (name, _user())
    try:
        with open(path, "rb") as file:
            head = file.read(16)
    except OSError as exc:
        return None, "%s: %s" % (path, describe(exc))
    if head and head != b"SQLite format 3\x00":  # an empty file becomes a new database
        return None, "%s is not a SQLite database" % path
    return None, None


def _may(path, mode):
    return os.access(path, mode, effective_ids=os.access in os.supports_effective_ids)


def _user():
    import pwd  # here, not at the top: POSIX only, like fcntl
    try:
        return "user %s" % pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        return "uid %d" % os.geteuid()


def _check_state_file(config, store, serving):
    """Report ``state_file`` as the workers would meet it. A directory they cannot write is a
    problem whatever the keys: the key file's last good copy is saved there, and without it
    a worker that starts while the key file is broken refuses every key. A state file they
    cannot use (the directory being fine) costs limits and last use; it is a problem when
    keys have limits that this host enforces (the workers serve them unlimited, logging
    'limits not enforced' on each request), else a warning. 'gateway serve' starts anyway,
    loudly, as the workers serve every valid key: a restart must not take the service down
    for what a reload's check would have refused."""
    directory_problem, file_problem = state_file_problems(config)
    limited = sum(1 for entry in store.entries if entry.limited) if store else 0
    away = " while limits_backend is away" if config.limits_backend else ""
    if directory_problem:
        problem = ("state_file %s: %s: the workers cannot save the key file's last good copy "
                   "there (a worker that starts while the key file is broken will refuse "
                   "every key), nor keep per-key limits%s" % (config.state_path,
                                                              directory_problem, away))
    elif file_problem and limited and (not config.limits_backend
                                       or config.limits_backend_down == "local"):
        problem = ("state_file: %s: the workers serve the %d key(s) with limits without "
                   "enforcing them%s (they log 'limits not enforced')" % (file_problem,
                                                                          limited, away))
    elif file_problem:
        print("warning: state_file: %s: the workers cannot record last use%s ('gateway keys "
              "list' shows 'never')" % (file_problem, away))
        return []
    else:
        return []
    if serving:
        print("WARNING: %s\nWARNING: starting anyway: every valid key is served" % problem)
        return []
    return [problem]


def cmd_check(config, args):
    """Validate what the gateway will run with and say what was found; exit 1 on a problem."""
    serving = getattr(args, "command", None) == "serve"
    problems = []
    print("config: %s" % (os.environ.get("GATEWAY_CONFIG") or "(defaults)"))
    print("upstream: %s" % config.upstream_url)
    print("models: %s" % ", ".join("%s -> %s" % item for item in config.models.items()))
    problem = boot_problem(config)
    if problem:
        problems.append("a worker cannot start with this config: %s" % problem)
    store, key_problems = _check_key_file(config, serving)
    problems += key_problems
    problems += _check_upstream_key(config)
    problems += _check_upstream_ca(config)
    problems += _check_limits(config)
    problems += _check_state_file(config, store, serving)
    if config.metrics:
        problems += _check_metrics(config)
    if getattr(args, "online", False) and not problems:
        problems += check_online(Gateway(config))
    for problem in problems:
        print("problem: %s" % problem)
    print("ok" if not problems else "%d problem(s)" % len(problems))
    return 1 if problems else 0


def _read_client_keys(config):
    """The key file's KeyStore as the commands read it (an empty file holds no key)."""
    return parse_key_file(read_text(config.keys_path, empty_ok=True))


def _check_key_file(config, serving):
    """Report the key file; returns its KeyStore (None when it does not load) and the
    problems found. ``serving``: 'gateway serve' starts on the last good copy of a key file
    that does not load, where 'gateway check' fails on it."""
    store, problems = None, []
    try:
        store = _read_client_keys(config)
        enabled = sum(1 for e in store.entries if e.enabled)
        print("keys: %s: %d key(s), %d enabled" % (config.keys_path, len(store.entries), enabled))
        fallback = _last_good_keys_note(config) if not store.entries else None
        if fallback and not os.path.getsize(config.keys_path):
            print("warning: %s is empty: %s" % (config.keys_path, fallback))
        elif not enabled:
            print("warning: %s holds no enabled key: every request will be refused"
                  % config.keys_path)
        _warn_if_readable_by_others(config.keys_path)
        salted = len(store.salted_entries(time.time()))
        if salted > SALTED_KEYS_WARNING:
            print("warning: %d keys have salted (imported) digests, which every request "
                  "hashes one by one; 'gateway keys rotate' gives each an unsalted one"
                  % salted)
        for entry in store.entries:
            unknown = sorted((entry.models or set()) - set(config.models))
            if unknown:
                problems.append("key %r allows unknown model(s) %s" % (entry.name,
                                                                       ", ".join(unknown)))
    except FILE_ERRORS as exc:
        problem = "key file %s: %s" % (config.keys_path, describe(exc))
        fallback = _last_good_keys_note(config)
        if fallback and serving:
            # A broken key file must not keep the service down (a restart after a bad edit):
            # the workers serve the copy, and say so; 'gateway check' still fails on it.
            print("WARNING: %s\nWARNING: starting anyway: %s" % (problem, fallback))
        else:
            problems.append(problem + ("; meanwhile " + fallback if fallback else
                                       "; a worker that starts now has no key to fall back on: "
                                       "every request will be refused"))
    return store, problems


def _check_upstream_key(config):
    if config.upstream_key_path is None:
        print("upstream key: from ANTHROPIC_API_KEY")
        return []
    try:
        count = len(read_parsed(config.upstream_key_path, parse_secret_lines))
        print("upstream key: %s (%d key(s), readable)" % (config.upstream_key_path, count))
        _warn_if_readable_by_others(config.upstream_key_path)
    except FILE_ERRORS as exc:
        return ["upstream key file %s: %s (or set ANTHROPIC_API_KEY)"
                % (config.upstream_key_path, describe(exc))]
    return []


def _check_upstream_ca(config):
    if not config.upstream_ca_file:
        return []
    path = config.path(config.upstream_ca_file)
    try:
        tls = read_parsed(path, parse_ca_file)
        print("upstream CA: %s (%d certificate(s))" % (path, tls.cert_store_stats()["x509_ca"]))
    except FILE_ERRORS as exc:
        return ["upstream_ca_file %s: %s" % (path, describe(exc))]
    return []


def _last_good_keys_note(config):
    """What the workers fall back on while the key file is broken, or None."""
    copy = last_good_keys(config)
    try:
        store, saved = copy.load(parse_key_file)
    except FILE_ERRORS:
        return None
    return ("the workers serve %s, the last version that parsed (%d key(s), saved %s), until "
            "the key file is fixed" % (copy.readable_path(), len(store.entries),
                                       format_time(saved)))


def _warn_if_readable_by_others(path):
    """The warning each worker logs for a file of secrets or keys that is too open, in the
    same words, for every such file."""
    mode = os.stat(path).st_mode
    if too_open(mode):
        print("warning: %s is readable by group or others (mode %03o): chmod 600 it"
              % (path, mode & 0o777))


def boot_problem(config):
    """What stops a worker from booting with ``config``, or None.

    The app is built exactly as every worker builds it as it boots (make_app), so whatever
    would fail there fails here first: in 'gateway check' (systemd's ExecReload runs it
    before the HUP) and in the master on HUP, which then keeps its previous config rather
    than fork workers that cannot boot (gunicorn stops when a worker fails to boot). The
    app's own log lines ('keeping the last good version') are held back meanwhile: they
    describe a running worker, and the caller reports what it found in its own words.
    """
    quiet, log.disabled = log.disabled, True
    try:
        make_app(config)
    except Exception as exc:  # whatever it is, it would stop every worker
        return str(exc) if isinstance(exc, ValueError) else "%s: %s" % (type(exc).__name__,
                                                                         exc)
    finally:
        log.disabled = quiet
    return None


def credentials_problem(config):
    """Why workers that boot now with ``config`` would refuse every request, or None: a client
    key file that does not load with no last good copy to serve instead, or an upstream key
    file that does not load. Both boot fine, so boot_problem passes them; 'gateway check'
    fails on them, and the master on HUP keeps its previous config (a keys_file or
    upstream_key_file edited to a wrong path must not turn every key into a 401 or a 502)."""
    try:
        _read_client_keys(config)  # as 'gateway check' reads it
    except FILE_ERRORS as exc:
        if _last_good_keys_note(config) is None:
            return "key file %s: %s, and no last good copy of it to serve instead" % (
                config.keys_path, describe(exc))
    if config.upstream_key_path is not None:
        try:
            read_parsed(config.upstream_key_path, parse_secret_lines)
        except FILE_ERRORS as exc:
            return "upstream key file %s: %s" % (config.upstream_key_path, describe(exc))
    return None


def check_online(app):
    """Connect to the upstream as a worker would (same pool, trust and proxy), send one
    ``HEAD /`` without any key (nothing billed, nothing to refuse) and say what was found:
    the certificate's subject, issuer and days to expiry, and the round trips. Returns the
    problems found."""
    import urllib3
    print("online: %s%s" % (app.config.upstream_url, " through proxy %s" % _without_password(
        app._proxy) if app._proxy else ""))
    target = (app._upstream_origin if app._absolute_form else "") + "/"
    headers = {"user-agent": "gateway-check"}
    if app._absolute_form:  # an http upstream asked through the proxy, as send() asks it
        headers.update(app._proxy_headers)
    rounds = []  # (seconds, socket): the first pays for connect and handshake
    try:
        for _ in range(2):
            started = time.monotonic()
            answer = app.upstream_pool().urlopen(
                "HEAD", target, headers=headers, retries=False, redirect=False,
                assert_same_host=False, timeout=app._timeout, preload_content=False)
            rounds.append((time.monotonic() - started, answer.connection.sock))
            certificate = answer.connection.sock.getpeercert() \
                if app._default_tls or app._ca_file else None
            version = answer.connection.sock.version() if certificate is not None else None
            answer.drain_conn()
            answer.release_conn()
    except (urllib3.exceptions.HTTPError, OSError) as exc:
        failure = upstream_failure(exc, app.config)
        if not rounds:
            return ["upstream: cannot reach %s: %s" % (upstream_host(app.config.upstream_url),
                                                       failure)]
        # The upstream answered: the connection it answered on was closed while idle (a
        # plain-http proxy such as tinyproxy closes each one after its answer).
        print("warning: the connection was not kept alive: reusing it failed (%s)" % failure)
    if certificate is not None:
        expires = ssl.cert_time_to_seconds(certificate["notAfter"])
        print("online: %s, certificate subject %s, issuer %s, expires %s (%d days)" % (
            version, _x509_name(certificate.get("subject", ())),
            _x509_name(certificate.get("issuer", ())), format_time(expires),
            (expires - time.time()) // 86400))
    print("online: HEAD / answered %d; round trip %.1f ms with connect%s%s" % (
        answer.status, rounds[0][0] * 1000,
        " and TLS handshake" if certificate is not None else "",
        "" if len(rounds) < 2 else ", %.1f ms %s" % (rounds[1][0] * 1000, (
            "reusing the connection" if rounds[1][1] is rounds[0][1]
            else "on a new connection (the first was closed)"))))
    return []


def _x509_name(name):
    """``getpeercert()``'s ((('commonName', 'x'),), …) as 'commonName=x, …' ('-': empty)."""
    return ", ".join("%s=%s" % pair for rdn in name for pair in rdn) or "-"


def _without_password(url):
    # Rebuilt from its parts: replacing the password's text wherever it first occurs
    # masked the user name or the scheme instead when the password is a part of them.
    parts = urllib.parse.urlsplit(url)
    if parts.password is None:
        return url
    userinfo, _, hostport = parts.netloc.rpartition("@")
    user = userinfo.partition(":")[0]
    return urllib.parse.urlunsplit(parts._replace(netloc="%s:***@%s" % (user, hostport)))


def _check_metrics(config):
    problems = []
    if not config.metrics_token_file:
        print("metrics: GET /metrics, no token: whoever reaches the gateway can read it")
        return problems
    path = config.path(config.metrics_token_file)
    try:
        read_parsed(path, parse_secret_lines)
        print("metrics: GET /metrics, bearer token from %s" % path)
        _warn_if_readable_by_others(path)
    except FILE_ERRORS as exc:
        problems.append("metrics token file %s: %s" % (path, describe(exc)))
    return problems


# -- gateway usage: what each key used, added up from the access log ------------------------

USAGE_GROUPS = ("day", "key", "model")
USAGE_COLUMNS = ("requests", "errors") + USAGE_FIELDS
#: 'gateway usage' counts a request id once when its copies are at most this many records
#: apart. Copies farther apart may count twice: the window is two generations of a set, and
#: a generation takes a chunk's ids at a time, so it reaches back between once and twice this
#: many records (a chunk's more at most), depending on where the chunks fall. Copies come
#: from rotated logs that overlap by a few lines; remembering every id would grow with the log.
USAGE_DEDUP_WINDOW = 100_000
USAGE_CHUNK_BYTES = 1 << 20
USAGE_PENDING = 40_000  # lines whose token counts are held before they are summed (about 6 MB)


def access_records(lines):
    """The access-log records among ``lines``: JSON objects with a request id and a time.

    Other lines (gunicorn's own, errors, tracebacks) are skipped. A record may follow a prefix
    (syslog's or ``journalctl -o short``'s), so it is read from the line's first ``{``. A
    control character in a string (a tab; never written by the gateway, whose json.dumps
    escapes them) does not make the record unreadable (``strict=False``): so a record counts
    whichever way 'gateway usage' reads it (UsageTally's expression takes any such byte, and
    looking for them would cost it a tenth of its time).
    """
    for line in lines:
        start = line.find("{")
        if start < 0:
            continue
        try:
            record = json.loads(line[start:], strict=False)
        except ValueError:
            continue
        if isinstance(record, dict) and "request_id" in record and "time" in record:
            yield record


def _access_line_pattern(backslashes=True, times=True):
    """A regular expression for one access-log line exactly as ``Exchange.log`` writes it
    (json.dumps' separators, its field order, no escapes in the strings it captures), after
    an optional prefix. It reads what 'gateway usage' needs several times faster than
    json.loads; a line it does not match is parsed with json.loads instead (UsageTally), so
    a change to the record costs speed, never a wrong count. Whatever it matches within a
    line is JSON that access_records reads to the same values (``stream``, ``duration_ms``
    and ``ttfb_ms`` as json.dumps writes them, not any run of bytes).

    ``backslashes=False`` gives a faster expression (about a quarter less time) for data
    that holds no backslash, so no escape: there a string is any run of bytes up to the next
    quote, which sre runs through faster than a class that also leaves out backslashes and
    line ends. Such a string could run past the end of a cut-off line into the next, so
    UsageTally checks that no record found holds a line end (group 0). ``times=False``
    captures groups 1 and 2 empty, for a report that needs no time (one object fewer a line
    to make and free, twice).

    Groups: 0 the record from its ``{`` to its ``}``, 1 day, 2 rest of the time, 3 request id,
    4 the key and the model as written, ``"alice", "model": "claude-x"`` or ``"alice",
    "model": null`` ('' when the key is null: nobody's usage), 5 a status of 400 or more,
    6 the token counts as written, ``, "input_tokens": 12, "output_tokens": 3`` (USAGE_FIELDS
    in their order, each optional), 7 an error that counts as one (not CLIENT_WENT_AWAY).
    One group for the key and the model, and one for the four counts: each group is an
    object to make, hash and free on every line, where the counts of a group of the report
    are read back from the text once per many lines (UsageTally._add_pending)."""
    char = r'[^"\\\r\n]' if backslashes else r'[^"]'  # in a JSON string without escapes
    text = r'"%s*"' % char
    other = r'(?:%s|null)' % text
    name = r'"%s+"' % char
    number = r'(?:0|[1-9]\d*)\.\d+'  # json.dumps of a float that round(x, 2) gave
    # "(?:x|)" rather than "(?:x)?": the same match, and sre tries a branch faster than it
    # repeats a group (about a tenth of the expression's time on the benchmark's log). A
    # leading zero is not JSON (json.loads refuses the line), so it is no match either; nor
    # is a count of 100 digits or more (json.loads refuses a line with thousands, where
    # int() would stop the report).
    tokens = "".join(r'(?:, "%s": (?:0|[1-9]\d{0,99})|)' % field for field in USAGE_FIELDS)
    time = r'(\d{4}-\d\d-\d\d)(%s*)' if times else r'\d{4}-\d\d-\d\d%s*()()'
    time %= char
    return re.compile((
        r'(?m)^[^{\n]*(\{"time": "%(time)s", "request_id": "(%(char)s+)", '
        r'"upstream_request_id": %(other)s, "client_ip": %(other)s, "method": %(other)s, '
        r'"path": %(other)s, "key": (?:(%(name)s, "model": (?:%(name)s|null))|'
        r'null, "model": (?:%(name)s|null)), '
        r'"upstream_model": %(other)s, "status": (?:[1-3]\d\d|([4-9]\d\d)), '
        r'"stream": (?:true|false), "duration_ms": %(number)s, '
        r'"ttfb_ms": (?:%(number)s|null)(%(tokens)s)'
        r'(?:, "error": (?:"%(went_away)s"|"(%(char)s+)")|)\})\r?$'
        % {"char": char, "name": name, "other": other, "number": number, "time": time,
           "tokens": tokens, "went_away": CLIENT_WENT_AWAY}).encode()).findall


#: The key and the model of group 4 of _access_line_pattern (None for a null model).
_KEY_AND_MODEL = re.compile(rb'"([^"]*)", "model": (?:"([^"]*)"|null)').fullmatch
#: Each count of USAGE_FIELDS in the token counts of group 6 of _access_line_pattern, joined
#: (a count of 0 is not read: it adds nothing).
_TOKEN_COUNTS = [re.compile(rb'"%s": ([1-9]\d*)' % field.encode()).findall
                 for field in USAGE_FIELDS]
#: What bytes.translate deletes from those token counts to leave their numbers, each after a
#: comma: ``, "input_tokens": 12, "output_tokens": 3`` becomes ``,  12,  3`` (no field's
#: name holds a digit).
_TOKEN_NAMES = b'abcdefghijklmnopqrstuvwxyz_":'


def _one_line(records):
    """Whether the records found by _access_line_pattern, joined, are each within a line as
    bytes.splitlines splits a log (add_chunk): no newline, no carriage return."""
    return b"\n" not in records and b"\r" not in records


def _is_utf8(data):
    """Whether ``data`` is UTF-8: then decoding it with "replace" (as access_records reads a
    line) changes nothing, so the bytes the expression captures are what json.loads reads."""
    if data.isascii():
        return True
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


#: A JSON object key with a \u escape in it ("request_\u0069d": json.loads reads it as
#: "request_id"), or something that might be one.
_ESCAPED_KEY = re.compile(rb'\\u(?:[^"\\\n]|\\.)*"\s*:').search


class UsageTally:
    """Adds access-log records up into one row per group of ``by`` (names from
    USAGE_GROUPS): requests, errors and the four token counts.

    ``since`` (inclusive) and ``until`` (exclusive) are times as the log writes them,
    ``2026-11-25T15:04:28Z``: the strings compare as the times do. A record's time is when
    its answer ended. Records without a key (refused before authentication, health checks)
    are nobody's usage; a request id seen again within USAGE_DEDUP_WINDOW records
    (overlapping copies of a log) counts once. An error is a status of 400 or more, or a
    stream that failed after its 200. Memory stays bounded whatever the log's size: the rows,
    the window of recent ids and one chunk of the log.
    """

    def __init__(self, since=None, until=None, key=None, by=("key", "model"),
                 window=USAGE_DEDUP_WINDOW):
        self.since, self.until, self.key, self.by = since, until, key, tuple(by)
        self._window = window
        self._recent, self._older = set(), set()
        self._rows = {}
        # Not yet added: group -> its lines' token counts as matched (group 6 of
        # _access_line_pattern; the list's length is the group's lines); errors per group;
        # lines in all. A group here is the day, the key and model as written, or both
        # (groups 1 and 4): finer than ``by`` when it names the key or the model alone, and
        # rows of the same names are added together (_add_sums, _add).
        self._pending = collections.defaultdict(list)
        self._pending_errors, self._pending_count = collections.Counter(), 0
        # Added, not yet in the rows: group -> requests, errors and the token counts, so that
        # a group's names are read once, by rows().
        self._sums = {}
        times = "day" in self.by or since is not None or until is not None
        self._find_lines = _access_line_pattern(times=times)
        self._find_plain_lines = _access_line_pattern(backslashes=False, times=times)
        self._group_of = operator.itemgetter(*(
            ([1] if "day" in self.by else []) + ([4] if {"key", "model"} & set(self.by) else [])))

    def rows(self):
        self._add_sums()
        return [self._rows[group] for group in sorted(self._rows)]

    def add_chunk(self, data):
        """Add up the records among ``data``, whole lines of a log as bytes. The lines that
        all look like the gateway's own are read by one regular expression; a chunk with an
        access record it does not match is read line by line. True when the expression read
        it and each request id in it was new (no copy of a request: see UsageWorkers)."""
        found = self._match_chunk(data)
        if found is not None:
            return self._add_found(found)
        for line in data.splitlines():
            found = _is_utf8(line) and self._find_lines(line)
            if found:
                self._add_found(found)
            else:
                for record in access_records([line.decode("utf-8", "replace")]):
                    self.add_record(record)
        return False

    def claim_chunk(self, data):
        """What a worker process does with a chunk (UsageWorkers): add it up as add_chunk
        would if none of its request ids were in the window, which only the parent knows,
        and return those ids (of the records wanted, in the log's order) for the parent to
        check. None, adding nothing, for a chunk that the parent must read itself as one
        process would: a record the expression does not match, or a request id twice.
        The ids are a set: the parent only checks them against its window."""
        found = self._match_chunk(data)
        if found is None:
            return None
        found = self._wanted(found)
        request_ids = set(map(operator.itemgetter(3), found))
        if len(request_ids) != len(found):
            return None
        self._add_lines(found)
        return request_ids

    def remember_claimed(self, request_ids):
        """The parent's half of claim_chunk (``request_ids`` the ids it returned, as a set or
        a list): True, and the ids remembered as add_chunk would have, when none is in the
        window; False, remembering nothing, when one is (copies of the previous chunks: the
        parent reads that chunk itself)."""
        return self._remember_if_new(request_ids)

    def blank(self):
        """A tally with the same options and nothing added (its own window)."""
        return UsageTally(self.since, self.until, self.key, self.by)

    def add_rows(self, rows, sign=1):
        """Add the rows of another tally with the same options (``sign`` -1: take them
        off). A row left with no request is dropped: every row counts one or more."""
        self._add_sums()  # first: a row is dropped only when all of it was taken off
        for row in rows:
            group = tuple(row[field] for field in self.by)
            self._add(group, sign * row["requests"], sign * row["errors"],
                      [sign * row[field] for field in USAGE_FIELDS])
            if not self._rows[group]["requests"]:
                del self._rows[group]

    def _match_chunk(self, data):
        # Every access record in data, matched by the expression, or None when one may
        # not be among them, or may be read otherwise by json.loads (bytes that are not
        # UTF-8: see _is_utf8).
        if not _is_utf8(data):
            return None
        plain = b"\\" not in data
        found = (self._find_plain_lines if plain else self._find_lines)(data)
        # Every record json.loads would read must be among those found: each names its
        # "request_id" (written so, with any separators, unless its letters are escapes,
        # which only \u can spell), and none found may run into the next line (nor past a
        # carriage return, where bytes.splitlines ends a line too).
        if len(found) == data.count(b'"request_id"') and (
                _one_line(b"".join(map(operator.itemgetter(0), found))) if plain
                else _ESCAPED_KEY(data) is None):
            return found
        return None

    def add_record(self, record):
        """Add one record parsed from JSON (see access_records)."""
        name, when = record.get("key"), str(record["time"])
        if not name or (self.key is not None and name != self.key):
            return
        if (self.since is not None and when < self.since) or \
                (self.until is not None and when >= self.until):
            return
        if self._seen(str(record["request_id"]).encode("utf-8", "surrogatepass")):
            return
        self._add(tuple(_usage_group(record, field) for field in self.by), 1,
                  _failed(record), [record.get(field) if isinstance(record.get(field), int)
                                    else 0 for field in USAGE_FIELDS])

    def _add_found(self, found):
        # A whole chunk at a time, in C where it can be: filters as list comprehensions, the
        # de-duplication as set operations (the sums come later: _add_pending).
        found = self._wanted(found)
        fresh = set(map(operator.itemgetter(3), found))
        new = len(fresh) == len(found) and self._remember_if_new(fresh)
        if not new:
            found = [m for m in found if not self._seen(m[3])]
        self._add_lines(found)
        return new

    def _wanted(self, found):
        # The matches that --key, --since and --until keep, of records with a key.
        if self.key is None:
            found = list(filter(operator.itemgetter(4), found))  # with a key
        else:  # the key as group 4 writes it: a quote in it would be an escape, no match
            wanted = b'"%s", "model": ' % self.key.encode("utf-8", "surrogatepass")
            found = [m for m in found if m[4].startswith(wanted)]
        if self.since is not None or self.until is not None:
            since = (self.since or "").encode()
            until = self.until.encode() if self.until is not None else None
            found = [m for m in found if since <= m[1] + m[2] and (
                until is None or m[1] + m[2] < until)]
        return found

    def _add_lines(self, found):
        self._pending_errors.update(map(self._group_of, _failures(found)))
        # Each line's token counts onto its group's list, pending[group].append(m[6]) for
        # every line m, as maps in C; only the counts are kept, not the lines, until they
        # are summed.
        collections.deque(map(list.append, map(self._pending.__getitem__,
                                               map(self._group_of, found)),
                              map(operator.itemgetter(6), found)), maxlen=0)
        self._pending_count += len(found)
        if self._pending_count >= USAGE_PENDING:
            self._add_pending()

    def _add_pending(self):
        # Many records of a group are summed at once, so the cost per group is paid once
        # per USAGE_PENDING records, not once per chunk: their counts joined and read back
        # as numbers in C. When each line has all four (as the gateway writes a response's
        # usage), one json.loads of the numbers alone gives them column after column;
        # otherwise each column is looked for by its name.
        for group, counts in self._pending.items():
            joined = b"".join(counts)
            numbers = json.loads(b"[%s]" % joined.translate(None, _TOKEN_NAMES)[2:])
            if len(numbers) == len(USAGE_FIELDS) * len(counts):
                tokens = [sum(numbers[n::len(USAGE_FIELDS)]) for n in range(len(USAGE_FIELDS))]
            else:
                tokens = [sum(map(int, find(joined))) for find in _TOKEN_COUNTS]
            sums = self._sums.get(group)
            if sums is None:
                sums = self._sums[group] = [0] * len(USAGE_COLUMNS)
            sums[:] = map(operator.add, sums, [len(counts), self._pending_errors[group]] + tokens)
        self._pending.clear()
        self._pending_errors.clear()
        self._pending_count = 0

    def _add_sums(self):
        self._add_pending()
        for group, sums in self._sums.items():
            self._add(self._names(group), sums[0], sums[1], sums[2:])
        self._sums.clear()

    def _names(self, group):
        # The row's names, in the order of ``by``, from a group of _add_lines.
        parts = list(group) if isinstance(group, tuple) else [group]
        names = {"day": parts.pop(0)} if "day" in self.by else {}
        if parts:
            names["key"], names["model"] = _KEY_AND_MODEL(parts[0]).groups()
        # "replace", as access_records reads a line (only UTF-8 is matched: _match_chunk).
        return tuple((names[field] or b"").decode("utf-8", "replace") or "-"
                     for field in self.by)

    def _remember_if_new(self, request_ids):
        """Remember ``request_ids`` (distinct: a set, or a list made of one) and return True
        when none is in the window; False, remembering nothing, when one is."""
        if self._recent.isdisjoint(request_ids) and self._older.isdisjoint(request_ids):
            self._remember(request_ids)
            return True
        return False

    def _seen(self, request_id):
        if request_id in self._recent or request_id in self._older:
            return True
        self._remember((request_id,))
        return False

    def _remember(self, request_ids):
        self._recent.update(request_ids)
        if len(self._recent) >= self._window:
            self._older, self._recent = self._recent, set()

    def _add(self, group, requests, errors, tokens):
        row = self._rows.get(group)
        if row is None:
            row = self._rows[group] = dict(zip(self.by, group),
                                           **dict.fromkeys(USAGE_COLUMNS, 0))
        row["requests"] += requests
        row["errors"] += errors
        for field, count in zip(USAGE_FIELDS, tokens):
            row[field] += count


def _failures(found):
    """The matched lines among ``found`` (see _access_line_pattern) that are errors: a
    status of 400 or more (group 5), or an error (group 7). Few are: two filters in C, and a
    Python loop only over the lines with an error, not to count one with both twice."""
    return list(filter(operator.itemgetter(5), found)) + [
        m for m in filter(operator.itemgetter(7), found) if not m[5]]


def usage_report(records, since=None, until=None, key=None, by=("key", "model")):
    """Add parsed ``records`` up (see UsageTally) into its sorted rows."""
    tally = UsageTally(since, until, key, by)
    for record in records:
        tally.add_record(record)
    return tally.rows()


def _failed(record):
    """A client that walks away is not an error of ours or the upstream's."""
    status = record.get("status")
    failed_stream = record.get("error") not in (None, CLIENT_WENT_AWAY)
    return int(failed_stream or (isinstance(status, int) and status >= 400))


def _usage_group(record, field):
    if field == "day":
        return str(record["time"])[:10]
    return str(record.get(field) or "-")


def usage_total(rows):
    return {column: sum(row[column] for row in rows) for column in USAGE_COLUMNS}


def format_usage_table(rows, by):
    """The report as aligned text: a header, one line per row, and a TOTAL line."""
    headers = [field.upper() for field in by] + ["REQUESTS", "ERRORS", "INPUT", "OUTPUT",
                                                 "CACHE_CREATION", "CACHE_READ"]
    total = dict(usage_total(rows), **{field: "" for field in by})
    total[by[0]] = "TOTAL"
    table = [headers] + [[str(row[column]) for column in tuple(by) + USAGE_COLUMNS]
                         for row in rows + [total]]
    widths = [max(len(line[i]) for line in table) for i in range(len(headers))]
    return "\n".join(
        "  ".join(cell.ljust(width) if i < len(by) else cell.rjust(width)
                  for i, (cell, width) in enumerate(zip(line, widths))).rstrip()
        for line in table)


def read_log_chunks(path, size=USAGE_CHUNK_BYTES):
    """One log file as chunks of whole lines of about ``size`` bytes, ``-`` for standard
    input. gzip is recognised by its magic bytes, whatever the file is called; a .gz cut short
    (logrotate still compressing it) gives what it holds, with a warning."""
    if path == "-":
        yield from _chunks(sys.stdin.buffer, size)
        return
    with open(path, "rb") as file:
        compressed = file.read(2) == b"\x1f\x8b"
    with (gzip.open if compressed else open)(path, "rb") as file:
        try:
            yield from _chunks(file, size)
        except EOFError:
            print("warning: %s ends early; counted what it holds" % path, file=sys.stderr)


def _chunks(file, size):
    pieces, held = [], 0  # read since the last chunk
    while True:
        try:
            # read1: what one read gives, so a cut .gz loses at most that piece.
            piece = file.read1(size)
        except EOFError:
            yield b"".join(pieces)
            raise
        if not piece:
            yield b"".join(pieces)
            return
        pieces.append(piece)
        held += len(piece)
        end = piece.rfind(b"\n") + 1
        if held >= size and end:
            # Up to the piece's last line end, copied once (join takes a memoryview).
            pieces[-1] = memoryview(piece)[:end]
            yield b"".join(pieces)
            pieces, held = [piece[end:]], len(piece) - end


def _usage_by(text):
    by = tuple(field.strip() for field in text.split(",") if field.strip())
    if not by or set(by) - set(USAGE_GROUPS):
        raise argparse.ArgumentTypeError("group by one or more of day,key,model")
    return by


def _log_time(text):
    try:
        return format_time(parse_time(text))
    except ValueError as exc:
        raise CommandError(str(exc), 2) from None


def _oldest_first(paths):
    """The files in the order they were last written, so that the overlap between a log and
    the one rotated before it is read together (UsageTally remembers only recent ids)."""
    def written(path):
        try:
            return os.stat(path).st_mtime if path != "-" else math.inf
        except OSError:
            return -math.inf  # read first: the error is reported before any work
    return sorted(paths, key=written)


#: 'gateway usage' reads this many chunks' worth of bytes (megabytes) of the logs itself
#: before it starts its worker processes, unless the files are larger than that on disk: a
#: smaller log is read before a fork would pay.
USAGE_SERIAL_CHUNKS = 8
#: Chunks a worker of 'gateway usage' may hold: the one it reads and the next five, so that
#: it seldom waits for the parent, which looks for the worker's answers only between the
#: chunks it adds up itself, and not while it sums the token counts it holds (USAGE_PENDING
#: lines, about 30 ms: with three slots the worker waited about a tenth of its time, a few
#: chunks' worth each time the parent summed; docs/performance.md).
USAGE_WORKER_SLOTS = 6
#: Chunks of 'gateway usage' that the parent may hold a process (itself and each worker)
#: before it waits for the oldest to be checked: twice a worker's slots, so that a worker
#: that falls behind by a few chunks leaves the parent reading the next ones itself rather
#: than waiting (with only as many as the slots, the parent waited about a tenth of its
#: time: docs/performance.md).
USAGE_PARENT_HOLDS = 2 * USAGE_WORKER_SLOTS


#: 'gateway usage' runs at most this many processes unless --processes says otherwise: the
#: parent reads, checks and hands out every chunk, so workers beyond a few would wait on it
#: (two processes were measured: docs/performance.md), and each costs about 40 MB.
USAGE_MAX_PROCESSES = 4


def usage_processes():
    """How many processes 'gateway usage' reads the logs in by default: one a core this
    process may run on (``taskset``, a cgroup's cpuset), no more than its cgroup's CPU quota
    (``cgroup_cpu_quota``), and at most USAGE_MAX_PROCESSES."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return 1
    return max(1, min(cores, cgroup_cpu_quota(), USAGE_MAX_PROCESSES))


def cgroup_cpu_quota(root="/sys/fs/cgroup", membership="/proc/self/cgroup"):
    """The CPUs that the cgroup v2 quotas of this process's cgroup and its ancestors allow
    (``cpu.max``: a container's ``--cpus``, a Kubernetes CPU limit, systemd's
    ``CPUQuota=``), rounded up; math.inf with no quota, or where none can be read. The
    cores a process may run on say nothing of these: a one-CPU container on a 64-core
    host still sees 64."""
    try:
        with open(membership) as file:
            path = next(line[3:].strip() for line in file if line.startswith("0::"))
    except (OSError, StopIteration):
        return math.inf
    quota = math.inf
    while True:
        try:
            with open(os.path.join(root, path.lstrip("/"), "cpu.max")) as file:
                limit, period = file.read().split()
            if limit != "max":
                quota = min(quota, math.ceil(int(limit) / int(period)))
        except (OSError, ValueError, ZeroDivisionError):
            pass  # no file (the root cgroup has none), or not one it can read
        if path in ("", "/"):
            return quota
        path = os.path.dirname(path)


def add_up_logs(tally, paths, processes=1, chunk_bytes=USAGE_CHUNK_BYTES):
    """Add the logs at ``paths`` up into ``tally``, oldest first, and return its rows: the
    first USAGE_SERIAL_CHUNKS chunks' worth of bytes here (none when the files are larger
    than that on disk), the rest here and in ``processes`` - 1 worker processes when there
    are two or more and a fork works (UsageWorkers), else here alone. The same rows either
    way."""
    workers, read, tried = None, 0, processes < 2
    # What the files hold on disk, known before they are read: a plain file's size is what
    # it gives, a .gz's is less, so a large log starts the workers at its first chunk.
    on_disk = 0 if tried else _bytes_on_disk(paths)
    try:
        for data in (chunk for path in _oldest_first(paths)
                     for chunk in read_log_chunks(path, chunk_bytes)):
            # Bytes, not chunks: many small rotated files are many small chunks, and
            # would pay for a fork that saves nothing.
            read += len(data)
            if not tried and max(read, on_disk) > USAGE_SERIAL_CHUNKS * chunk_bytes:
                tried = True
                workers = UsageWorkers.start(tally, processes - 1, 2 * chunk_bytes)
            if workers is not None:
                workers.add_chunk(data)
            else:
                tally.add_chunk(data)
        if workers is not None:
            workers.finish()
    finally:
        if workers is not None:
            workers.stop()
    return tally.rows()


def _bytes_on_disk(paths):
    """The sizes of the files at ``paths`` added up (standard input and a file that cannot
    be read count 0: it says so when it is read)."""
    total = 0
    for path in paths:
        if path != "-":
            with contextlib.suppress(OSError):
                total += os.stat(path).st_size
    return total


class UsageWorkers:
    """Worker processes that add chunks of the log up beside the parent (UsageTally), with
    the same answer as the parent alone.

    Each chunk goes to a worker that is free, else the parent adds it up itself the same
    way: without the window of recent request ids, keeping the chunk's ids
    (UsageTally.claim_chunk) in a tally of its own. The parent then checks each chunk's ids
    against the window in the log's order (remember_claimed), as add_chunk would. When they
    are new (the usual case: copies of a request come only where rotated logs overlap), the
    chunk's sums stand; when one is not, or the chunk was left to the parent (a record only
    json.loads reads, an id twice), the parent reads that chunk again as one process would,
    and what was counted of it before is taken off at the end. Where copies are many (the
    same file named twice, logs that overlap by much), reading each chunk twice would cost
    more than one process does: after a chunk read again, the parent reads the next ones
    alone until one is all new (UsageTally.add_chunk's answer). Memory stays bounded: the
    parent holds the chunks in flight until they are checked, USAGE_PARENT_HOLDS a process,
    besides each process's tally."""

    def __init__(self, tally):
        self._tally = tally
        self._claimed_by_parent = tally.blank()
        self._to_subtract = tally.blank()
        self._workers = []
        # Oldest first: (chunk, its worker, or None when the parent claimed it, and then its
        # request ids as claim_chunk returned them).
        self._in_flight = collections.deque()
        self._alone_until_clean = False  # the last chunk checked held a copy of a request
        self.claimed = self.read_again = 0  # chunks whose sums stood, or were read again

    @classmethod
    def start(cls, tally, count, slot_bytes):
        """``count`` workers that take chunks of up to ``slot_bytes``, or None when a
        process, a pipe or shared memory cannot be had (the parent then reads alone)."""
        if not hasattr(os, "fork"):
            return None
        workers = cls(tally)
        try:
            for _ in range(count):
                workers._workers.append(_UsageWorker(tally, slot_bytes, workers._workers))
        except OSError:
            workers.stop()
            return None
        except BaseException:  # Ctrl-C between two forks: the first is reaped all the same
            workers.stop()
            raise
        return workers

    def add_chunk(self, data):
        """Add ``data`` (whole lines) up: in a worker with room, else here; every chunk is
        checked against the window in the log's order, as its turn comes (_settle)."""
        if not data:
            return
        while self._in_flight and (self._alone_until_clean
                                   or self._answered(self._in_flight[0])):
            self._settle()
        if self._alone_until_clean:
            self._alone_until_clean = not self._tally.add_chunk(data)
            return
        free = [worker for worker in self._workers if worker.can_take(data)]
        if free:
            worker = min(free, key=_UsageWorker.chunks_held)
            worker.send(data)
            self._in_flight.append((data, worker, None))
        else:  # every worker has its next chunk: this one is the parent's
            self._in_flight.append((data, None, self._claimed_by_parent.claim_chunk(data)))
        while len(self._in_flight) > USAGE_PARENT_HOLDS * (len(self._workers) + 1):
            self._settle()

    def finish(self):
        """Check every chunk, then add the workers' rows and the parent's own to its tally.
        The workers are asked for their rows first, after the chunks they hold: each sums
        what it holds (up to USAGE_PENDING lines) while the parent sums its own."""
        for worker in self._workers:
            worker.ask_rows()
        claimed_rows = self._claimed_by_parent.rows()
        while self._in_flight:
            self._settle()
        for worker in self._workers:
            self._tally.add_rows(worker.rows())
        self._tally.add_rows(claimed_rows)
        self._tally.add_rows(self._to_subtract.rows(), sign=-1)

    def stop(self):
        for worker in self._workers:
            worker.stop()

    @staticmethod
    def _answered(in_flight):
        _, worker, _ = in_flight
        return worker is None or worker.answered()

    def _settle(self):
        # The oldest chunk in flight, in the log's order (its worker is then free).
        data, worker, request_ids = self._in_flight.popleft()
        if worker is not None:
            request_ids = worker.reply()
        if request_ids is not None and self._tally.remember_claimed(request_ids):
            self.claimed += 1
            return
        self.read_again += 1
        self._alone_until_clean = not self._tally.add_chunk(data)
        if request_ids is not None:
            # counted where it was claimed: taken off at the end
            self._to_subtract.claim_chunk(data)


class _UsageWorker:
    """One forked worker process, the memory it shares with the parent (room for
    USAGE_WORKER_SLOTS chunks) and a pipe each way. The parent copies a chunk into a free
    slot and sends the slot's number and the chunk's length (8 bytes each; a length of 0:
    send your rows and stop), so that it never waits to hand a chunk over; the worker
    answers each in turn with a length (8 bytes) and that many bytes (marshal): the chunk's
    request ids (UsageTally.claim_chunk's, as a list), or the rows."""

    def __init__(self, tally, slot_bytes, others):
        self.slot_bytes = slot_bytes
        self._memory = mmap.mmap(-1, slot_bytes * USAGE_WORKER_SLOTS)  # shared with the fork
        self._free, self._sent = list(range(USAGE_WORKER_SLOTS)), collections.deque()
        ends = []  # closed, with the memory, if the worker cannot be had
        try:
            ends += os.pipe()
            ends += os.pipe()
            from_parent, self._to_worker, self._from_worker, to_parent = ends
            with contextlib.suppress(AttributeError, OSError):  # Linux: the ids in one write
                fcntl.fcntl(to_parent, fcntl.F_SETPIPE_SZ, USAGE_CHUNK_BYTES)
            self.pid = os.fork()
        except BaseException:
            for end in ends:
                os.close(end)
            self._memory.close()
            raise
        if self.pid == 0:  # the worker: it ends here, never returning into the command
            status = 1
            try:
                os.close(self._to_worker)
                os.close(self._from_worker)
                for other in others:  # so that each worker sees its own pipe close
                    other.close()
                status = _usage_worker_main(tally.blank(), self._memory, slot_bytes,
                                            from_parent, to_parent)
            finally:
                os._exit(status)
        os.close(from_parent)
        os.close(to_parent)

    def chunks_held(self):
        return len(self._sent)

    def can_take(self, data):
        return bool(self._free) and len(data) <= self.slot_bytes

    def send(self, data):
        slot = self._free.pop()
        self._memory[slot * self.slot_bytes:slot * self.slot_bytes + len(data)] = data
        self._sent.append(slot)
        self._tell(slot, len(data))

    def answered(self):
        """Whether its answer to the oldest chunk has come (reply would not wait), or the
        worker is gone. poll, not select: a descriptor above 1023 is fine."""
        poller = select.poll()
        poller.register(self._from_worker, select.POLLIN)
        return bool(poller.poll(0))

    def reply(self):
        """The answer to the oldest chunk sent; its slot is free again."""
        answer = self._answer()
        self._free.append(self._sent.popleft())
        return answer

    def ask_rows(self):
        """Ask for the worker's rows: its answer after those to the chunks sent."""
        self._tell(0, 0)

    def rows(self):
        """The worker's rows, once every chunk's answer is read (ask_rows first); then it
        is gone."""
        rows = self._answer()
        self.stop()
        return rows

    def close(self):
        for end in (self._to_worker, self._from_worker):
            with contextlib.suppress(OSError):
                os.close(end)
        self._memory.close()

    def stop(self):
        """Close the pipes (the worker stops at its next read or write) and reap it."""
        if self.pid:
            self.close()
            os.waitpid(self.pid, 0)
            self.pid = None

    def _tell(self, slot, size):
        try:
            os.write(self._to_worker, slot.to_bytes(8, "big") + size.to_bytes(8, "big"))
        except BrokenPipeError:
            raise self._gone() from None

    def _answer(self):
        # A length (8 bytes), then that many bytes of marshal (_usage_worker_main).
        return marshal.loads(self._read(int.from_bytes(self._read(8), "big")))

    def _read(self, size):
        data = bytearray()
        while len(data) < size:
            piece = os.read(self._from_worker, size - len(data))
            if not piece:
                raise self._gone()
            data += piece
        return data

    def _gone(self):
        """The error for a worker whose pipe closed: it is reaped, and the error says how
        it ended (killed by the OOM killer's SIGKILL, an error it printed and exited on)."""
        if not self.pid:  # already reaped
            return CommandError("a worker process of gateway usage stopped before it answered")
        self.close()
        _, status = os.waitpid(self.pid, 0)
        self.pid = None
        how = ("was killed by signal %d" % os.WTERMSIG(status) if os.WIFSIGNALED(status)
               else "exited with status %d" % os.WEXITSTATUS(status))
        return CommandError("a worker process of gateway usage %s before it answered" % how)


def _usage_worker_main(tally, memory, slot_bytes, requests_fd, replies_fd):
    """A worker's life (see _UsageWorker): its exit status."""
    try:
        with open(requests_fd, "rb") as requests_in, open(replies_fd, "wb") as replies:
            while True:
                request = requests_in.read(16)
                if len(request) != 16:
                    return 1  # the parent stopped
                start = int.from_bytes(request[:8], "big") * slot_bytes
                size = int.from_bytes(request[8:], "big")
                if size:
                    answer = tally.claim_chunk(memory[start:start + size])
                    # The set's ids as a list: since Python 3.11 marshal writes a set's items
                    # sorted, for reproducible bytecode (CPython bpo-37596), at ten times the
                    # cost of a list's here.
                    answer = None if answer is None else list(answer)
                else:
                    answer = tally.rows()
                reply = marshal.dumps(answer, 2)  # version 2: several times faster here
                replies.write(len(reply).to_bytes(8, "big") + reply)
                replies.flush()
                if not size:
                    return 0
    except (BrokenPipeError, KeyboardInterrupt):
        return 1  # the parent stopped
    except Exception as exc:  # noqa: BLE001 - told, and the parent stops the command
        print("error: gateway usage worker: %s" % describe(exc), file=sys.stderr)
        return 1


def cmd_usage(config, args):
    """Print the usage table (or JSON) for the access-log files named, or standard input."""
    since = _log_time(args.since) if args.since else None
    until = _log_time(args.until) if args.until else None
    paths = args.files or ["-"]
    if paths == ["-"] and (sys.stdin is None or sys.stdin.isatty()):
        raise CommandError("name the access-log files (plain or .gz), or pipe the log in: "
                           "journalctl -u gateway -o cat | gateway usage -", 2)
    try:
        rows = add_up_logs(UsageTally(since, until, args.key, args.by), paths,
                           args.processes or usage_processes())
    except OSError as exc:
        raise CommandError("%s: %s" % (getattr(exc, "filename", None) or "log",
                                       exc.strerror or exc)) from None
    if args.json:
        print(json.dumps({"since": since, "until": until, "key": args.key,
                          "by": list(args.by), "rows": rows, "total": usage_total(rows)},
                         indent=1))
    else:
        print(format_usage_table(rows, args.by))
    return 0


def find_gunicorn_config(name="gunicorn.conf.py"):
    """deploy/<name> beside this module (a checkout or editable install), else the copy that
    ``pip install`` puts in ``<prefix>/share/gateway``."""
    candidates = [os.path.join(os.path.dirname(os.path.abspath(__file__)), "deploy", name),
                  os.path.join(sys.prefix, "share", "gateway", name)]
    for candidate in candidates:
        if os.path.exists(candidate):
            return candidate
    return None


def served_config_data(environ):
    """The bytes of the INI file that ``GATEWAY_CONFIG`` names (b'' when it names none), as
    'gateway serve' and its HUP check read them for served_config."""
    path = environ.get("GATEWAY_CONFIG")
    return read_config_data(path) if path else b""


def served_config(data, environ):
    """The Config that 'gateway serve' serves: the INI file that ``GATEWAY_CONFIG`` names, as it
    was when its bytes ``data`` were read and checked, or the defaults when it names none."""
    path = environ.get("GATEWAY_CONFIG")
    return Config.from_data(data, path, environ) if path else Config.from_environ(environ)


def reload_problem(data, environ):
    """Why workers must not be forked with the config ``data`` (see served_config) on HUP, or
    None: it does not parse, a worker could not build its app from it (boot_problem), or the
    workers would refuse every request (credentials_problem)."""
    try:
        new = served_config(data, environ)
    except ValueError as exc:
        return str(exc)
    problem = boot_problem(new)
    if problem is not None:
        return "a worker cannot start with %s: %s" % (environ.get("GATEWAY_CONFIG")
                                                       or "the defaults", problem)
    return credentials_problem(new)


def check_reload():
    """The HUP check of the 'gateway serve' master (SERVE_MASTER), in a process of its own:
    read the config file, check it (reload_problem) and write to stdout ``ok`` and the bytes
    that passed, which the master keeps for the workers it forks next, or ``problem`` and why.
    Metrics, if on, are counted in a directory of its own, removed after: this process serves
    nothing, and its files would otherwise pile up beside the workers' on every HUP."""
    made = os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="gateway-check-")
    try:  # anything printed meanwhile goes to the log (stderr), not into the answer
        with contextlib.redirect_stdout(sys.stderr):
            data = served_config_data(os.environ)
            problem = reload_problem(data, os.environ)
    except ValueError as exc:
        problem = str(exc)
    finally:
        shutil.rmtree(made, ignore_errors=True)
    out = sys.stdout.buffer
    out.write(b"ok\n" + data if problem is None else b"problem\n" + problem.encode())
    out.flush()
    return 0


#: The gunicorn master that 'gateway serve' becomes once its checks pass (cmd_serve: exec, so
#: the same pid, which systemd's Type=notify and HUP reach). With one worker it does not import
#: this module: what the app imports (requests, urllib3, ssl, sqlite3: about 9 MB) would sit
#: in the master and count again in the worker's RSS, shared with nothing else. The worker
#: imports it after the fork (load); several gthread workers share the master's copy instead.
#: Every worker builds its app from the config bytes the master last checked. On HUP a process
#: checks the file (check_reload); the master keeps the bytes that passed, or keeps the
#: previous ones and says why, as 'gateway serve' always has (workers that parsed a broken
#: config themselves would fail to boot, and gunicorn stops when a worker cannot boot).
#: Run by SERVE_MASTER_BOOT, with this module's directory and the settings (JSON) as arguments;
#: the config's bytes, as checked, come on the inherited file descriptor ``config_fd``.
SERVE_MASTER = r"""
import json, logging, os, shutil, subprocess, sys
import gunicorn.app.base
import gunicorn.arbiter
import gunicorn.workers.gthread

HERE, SETTINGS = sys.argv[2], json.loads(sys.argv[3])
CHECK = ("import sys; sys.path.insert(0, sys.argv[1]); import gateway; "
         "sys.exit(gateway.check_reload())")


class GatewayMaster(gunicorn.app.base.Application):
    with open(SETTINGS["config_fd"], "rb") as file:
        checked = file.read()  # the config bytes that passed the last check

    def init(self, parser, opts, args):
        return None  # no gunicorn command line: 'gateway serve' has its own

    def load_config(self):
        if SETTINGS["gunicorn_config"]:
            self.load_config_from_file(SETTINGS["gunicorn_config"])
        if SETTINGS["bind"]:
            self.cfg.set("bind", [SETTINGS["bind"]])
        worker, configured = SETTINGS["worker"], self.cfg.settings["worker_class"].get()
        if worker and worker not in str(getattr(configured, "__name__", configured)).lower():
            self.cfg.set("worker_class", worker)

    def check_config(self):
        # The config file, checked in a process of its own (check_reload): its bytes are
        # kept if they pass. False when the check could not run at all.
        try:
            found = subprocess.run([sys.executable, "-c", CHECK, HERE], stdin=subprocess.DEVNULL,
                                   stdout=subprocess.PIPE, timeout=300).stdout
        except (OSError, subprocess.SubprocessError) as exc:
            logging.getLogger("gateway").error("reload: the check did not finish: %s", exc)
            return False
        verdict, _, rest = found.partition(b"\n")
        if verdict == b"ok":
            self.checked = rest
        elif verdict == b"problem":
            logging.getLogger("gateway").error(
                "reload: %s; keeping the previous gateway config",
                rest.decode(errors="replace"))
        return verdict in (b"ok", b"problem")

    def run(self):  # gunicorn's BaseApplication.run, with the arbiter below
        try:
            GatewayArbiter(self).run()
        except RuntimeError as exc:
            print("\nError: %s\n" % exc, file=sys.stderr, flush=True)
            sys.exit(1)

    def load(self):  # in each worker, after the fork
        sys.path.insert(0, HERE)
        import gateway
        return gateway.make_app(gateway.served_config(self.checked, os.environ))


class GatewayArbiter(gunicorn.arbiter.Arbiter):
    def handle_hup(self):
        # A check that cannot run means the gateway.py on disk no longer imports (an upgrade
        # half done, a bad edit): workers forked now would import it, fail to boot, and
        # gunicorn would stop. So the HUP is refused whole, and the workers serve on.
        if self.app.check_config():
            super().handle_hup()
        else:
            logging.getLogger("gateway").error(
                "reload refused: the config check could not run (its errors are above); "
                "the workers keep serving")


master, server = os.getpid(), GatewayMaster()
if server.cfg.workers > 1 and issubclass(server.cfg.worker_class,
                                         gunicorn.workers.gthread.ThreadWorker):
    # Several workers: they share the module's pages, copied on write, where each would
    # load its own, about 3 MB more of real memory per worker (docs/performance.md). Alone,
    # a worker shares nothing, and the master stays lean. gevent's workers must patch first.
    # With what an app imports as it is built (requests, urllib3: _session_classes), which
    # gateway.py leaves to then.
    sys.path.insert(0, HERE)
    import gateway
    gateway._session_classes()
try:
    server.run()
finally:
    # Forked workers leave through here too (gunicorn ends them with SystemExit): only the
    # master removes the metrics directory it was given, once every worker is gone.
    if SETTINGS["metrics_dir_made"] and os.getpid() == master:
        shutil.rmtree(SETTINGS["metrics_dir_made"], ignore_errors=True)
"""

#: The command line of that master (``ps``, ``systemctl status``): a line that names it and
#: runs SERVE_MASTER from an inherited file descriptor (its first argument).
SERVE_MASTER_BOOT = ("import sys; exec(compile(open(int(sys.argv[1])).read(), "
                     "'gateway.SERVE_MASTER', 'exec'))  # gateway serve: the gunicorn master")


def cmd_serve(config, args):
    """Check, then become the gunicorn master (SERVE_MASTER), with the config bytes checked."""
    if args.dev:
        return serve_dev(config, args)
    import importlib.util
    if importlib.util.find_spec("gunicorn") is None:
        print("error: 'gateway serve' runs gunicorn: pip install 'gateway[serve]' (or embed "
              "gateway:make_app() in your own WSGI server)", file=sys.stderr)
        return 2
    if args.worker == "gevent" and importlib.util.find_spec("gevent") is None:
        print("error: --worker gevent needs gevent: pip install 'gateway[gevent]'",
              file=sys.stderr)
        return 2
    # The bytes checked here are the bytes served: the file may change after main read it.
    try:
        data = served_config_data(os.environ)
        config = served_config(data, os.environ)
    except ValueError as exc:
        print("error: %s" % exc, file=sys.stderr)
        return 2
    # Before the check, which builds the app: prometheus_client must be imported with
    # PROMETHEUS_MULTIPROC_DIR set; the workers inherit it through the exec.
    made = prepare_metrics_dir() if config.metrics else None
    if cmd_check(config, args) != 0:
        print("error: fix the problems above before serving", file=sys.stderr)
        if made:
            shutil.rmtree(made, ignore_errors=True)
        return 1
    settings = {"gunicorn_config": args.gunicorn_config or find_gunicorn_config(
        "gunicorn-gevent.conf.py" if args.worker == "gevent" else "gunicorn.conf.py"),
        "bind": args.bind, "worker": args.worker, "metrics_dir_made": made}
    # Unlinked files, read by the new process: the config may hold a password (not for argv).
    with tempfile.TemporaryFile() as program, tempfile.TemporaryFile() as checked:
        for file, content in ((program, SERVE_MASTER.encode()), (checked, data)):
            file.write(content)
            file.flush()
            file.seek(0)
            os.set_inheritable(file.fileno(), True)
        settings["config_fd"] = checked.fileno()
        sys.stdout.flush()
        sys.stderr.flush()
        try:
            os.execv(sys.executable, [sys.executable, "-c", SERVE_MASTER_BOOT,
                                      str(program.fileno()), os.path.dirname(
                                          os.path.abspath(__file__)), json.dumps(settings)])
        except OSError as exc:
            print("error: cannot start the gunicorn master: %s" % describe(exc),
                  file=sys.stderr)
    if made:
        shutil.rmtree(made, ignore_errors=True)
    return 1


def serve_dev(config, args):
    """``gateway serve --dev``: the standard library's ``wsgiref`` server, for development
    where gunicorn cannot be installed. One thread per connection, HTTP/1.0 answers, no
    chunked request bodies, no worker restarts, no graceful reload: never in front of users.
    Streams are still relayed event by event (wsgiref flushes every write)."""
    import socketserver
    import wsgiref.simple_server

    class Server(socketserver.ThreadingMixIn, wsgiref.simple_server.WSGIServer):
        daemon_threads = True  # Ctrl-C must not wait for open streams

    class Handler(wsgiref.simple_server.WSGIRequestHandler):
        def log_message(self, *args):
            pass  # the gateway's JSON line is the access log

    if cmd_check(config, args) != 0:
        print("error: fix the problems above before serving", file=sys.stderr)
        return 1
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    access_log.addHandler(logging.StreamHandler())  # one bare JSON line, as under gunicorn
    access_log.propagate = False
    host, _, port = (args.bind or "127.0.0.1:8080").rpartition(":")
    server = wsgiref.simple_server.make_server(host, int(port), make_app(config), Server,
                                               Handler)
    print("DEVELOPMENT SERVER (wsgiref; use 'gateway serve' without --dev in production) "
          "listening on http://%s:%d" % server.server_address[:2], file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


def prepare_metrics_dir():
    """Give the workers an empty PROMETHEUS_MULTIPROC_DIR before gunicorn forks them
    (client_python: set it before prometheus_client is imported; wipe it between runs).
    The operator's directory is emptied of its ``*.db`` files; without one, a temporary
    directory is made and returned, for removal when serving ends."""
    path = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    made = None
    if path:
        os.makedirs(path, exist_ok=True)
        for name in os.listdir(path):
            if name.endswith(".db"):
                os.unlink(os.path.join(path, name))
    else:
        path = made = os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(
            prefix="gateway-metrics-")
    print("metrics: the workers' counts are added up from %s" % path)
    return made


def build_parser():
    # --config is accepted wherever it is written ('gateway --config F keys add x' and
    # 'gateway keys add x --config F'); SUPPRESS keeps a later parser from resetting it.
    config = argparse.ArgumentParser(add_help=False)
    config.add_argument("--config", metavar="FILE", default=argparse.SUPPRESS,
                        help="the INI config (default: $GATEWAY_CONFIG, else built-in "
                             "defaults relative to the current directory)")
    parser = argparse.ArgumentParser(
        prog="gateway", parents=[config],
        description="Serve the Anthropic Messages API with your own keys.")
    parser.add_argument("--version", action="version", version="gateway " + __version__)
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", parents=[config], help="run the gateway (gunicorn)")
    serve.add_argument("--bind", metavar="HOST:PORT", help="listen address (default from "
                       "deploy/gunicorn.conf.py: 127.0.0.1:8080)")
    serve.add_argument("--gunicorn-config", metavar="FILE", help="another gunicorn config")
    serve.add_argument("--worker", choices=("gthread", "gevent"),
                       help="gunicorn's worker class (default: the gunicorn config's, "
                       "gthread); gevent holds thousands of open streams, with "
                       "deploy/gunicorn-gevent.conf.py unless --gunicorn-config is given")
    serve.add_argument("--dev", action="store_true", help="DEVELOPMENT ONLY: the standard "
                       "library's wsgiref server instead of gunicorn")
    serve.set_defaults(run=cmd_serve)
    check = commands.add_parser("check", parents=[config],
                                help="validate the config, key file and upstream key")
    check.add_argument("--online", action="store_true",
                       help="also connect to the upstream (TLS handshake and one unbilled "
                       "HEAD / without a key) and report its certificate and round trip")
    check.set_defaults(run=cmd_check)
    usage = commands.add_parser(
        "usage", parents=[config], help="requests, errors and tokens per key and model, "
        "from access logs", description="Add up the access log (plain or gzip, rotated or "
        "not; '-' or no FILE reads standard input). Times are UTC; a date means its "
        "midnight, so --since 2026-11-01 --until 2026-12-01 is November.")
    usage.add_argument("files", nargs="*", metavar="FILE", help="access-log files, or -")
    usage.add_argument("--since", metavar="WHEN", help="from this time on (inclusive)")
    usage.add_argument("--until", metavar="WHEN", help="before this time (exclusive)")
    usage.add_argument("--key", metavar="NAME", help="only this key")
    usage.add_argument("--by", type=_usage_by, default=("key", "model"), metavar="FIELDS",
                       help="group by day, key, model or a list of them (default key,model)")
    usage.add_argument("--json", action="store_true", help="rows and total as JSON")
    usage.add_argument("--processes", type=_processes, metavar="N",
                       help="read in N processes (default: one a core it may run on, "
                       "within its CPU quota, at most %d)" % USAGE_MAX_PROCESSES)
    usage.set_defaults(run=cmd_usage)
    keys = commands.add_parser("keys", parents=[config], help="manage client keys")
    key_commands = keys.add_subparsers(dest="keys_command", required=True)

    def key_command(name, run, help, settings=False):
        command = key_commands.add_parser(name, parents=[config], help=help)
        if name != "list":
            command.add_argument("name")
        if settings:
            _add_key_settings(command)
        command.set_defaults(run=run)
        return command
    add = key_command("add", cmd_keys_add, "create a key; prints it once, as the last line",
                      True)
    add.add_argument("--replace", action="store_true", help="if NAME exists, replace it at "
                     "once: a new key, with only the settings given here")
    key_command("list", cmd_keys_list, "names, models, enabled, expiry, limits, last use")
    key_command("set", cmd_keys_set, "change a key's models, expiry or limits", True)
    rotate = key_command("rotate", cmd_keys_rotate,
                         "new key for NAME; the old one works for --grace more")
    rotate.add_argument("--grace", action=_Once, metavar="DURATION",
                        help="how long the old key keeps working (default 24h; 0s: not at all)")
    key_command("disable", cmd_keys_enable, "refuse a key, keeping it for 'enable'")
    key_command("enable", cmd_keys_enable, "accept a disabled key again")
    key_command("revoke", cmd_keys_revoke, "remove a key")
    return parser


def _add_key_settings(command):
    command.add_argument("--models", action=_Once, metavar="ID,ID",
                         help="public models it may use, or * for all (the default)")
    command.add_argument("--expires", action=_Once, metavar="WHEN",
                         help="refuse it from then on: 2027-01-01 or 2027-01-01T12:00:00Z "
                         "(UTC; not in the past), or 'never'")
    command.add_argument("--rpm", action=_Once, type=_limit, metavar="N",
                         help="requests per minute (0: no limit)")
    command.add_argument("--concurrency", action=_Once, type=_limit, metavar="N",
                         help="requests in progress at once (0: no limit)")
    command.add_argument("--tokens-per-day", dest="tokens_per_day", action=_Once, type=_limit,
                         metavar="N", help="input + output tokens per UTC day (0: no limit)")
    command.add_argument("--origins", action=_Once, metavar="ORIGIN,ORIGIN",
                         help="browser origins (https://app.example) whose pages may use it "
                         "(CORS), beside the config's cors_origins; 'none' removes them")


class _Once(argparse.Action):
    """Store an option's value; refuse it given twice ('--rpm 5 --rpm 6': which one?)."""

    def __call__(self, parser, namespace, values, option_string=None):
        if getattr(namespace, self.dest, None) is not None:
            parser.error("%s given twice" % option_string)
        setattr(namespace, self.dest, values)


def _whole_number(least, meaning=""):
    """An argparse type: a whole number (ASCII digits: never negative) of ``least`` or
    more; ``meaning`` follows the least in its error."""
    def parse(text):
        if not (text.isascii() and text.isdigit() and int(text) >= least):
            raise argparse.ArgumentTypeError("%r is not a whole number >= %d%s"
                                             % (text, least, meaning))
        return int(text)
    return parse


_limit = _whole_number(0, " (0: no limit)")  # a limit on the command line
_processes = _whole_number(1)


def main(argv=None):
    """The command line: ``gateway serve|check|keys|usage``. Returns the exit code.

    Reached three ways that all call this function: the ``gateway`` script in a checkout, the
    installed console script, and ``python -m gateway`` (for environments without scripts on
    the PATH).
    """
    args = build_parser().parse_args(argv)
    if getattr(args, "config", None):
        # Workers (and 'gateway:make_app()' under a bare gunicorn) find the file this way.
        os.environ["GATEWAY_CONFIG"] = os.path.abspath(args.config)
    try:
        config = Config.from_environ(os.environ)
    except ValueError as exc:
        print("error: %s" % exc, file=sys.stderr)
        return 2
    try:
        code = args.run(config, args)
        sys.stdout.flush()  # here, where a reader that left early is caught below
        return code
    except CommandError as exc:
        print("error: %s" % exc, file=sys.stderr)
        return exc.code
    except BrokenPipeError:
        # The reader left early ('gateway keys list | head -1'): stop quietly, as Unix tools
        # do. stdout goes to /dev/null so that the flush at exit cannot fail again (Python
        # docs, signal module, "Note on SIGPIPE").
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(main())
