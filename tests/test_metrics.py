"""GET /metrics: off by default, behind its token, and, under a real 'gateway serve' with two
workers, equal to the requests sent whichever worker served each and whichever answers the
scrape (prometheus_client's multiprocess mode), across a worker restart too."""
import os
import re
import signal
import subprocess
import sys
import threading
import time

import pytest
import requests
import webtest
from prometheus_client.multiprocess import MultiProcessCollector  # the 'test' extra
from prometheus_client.parser import text_string_to_metric_families

import gateway
from conftest import ANY_PORT, CLIENT_KEY, LIMITED_KEY, ROOT, auth, gateway_process
from upstream import abandoned_stream, default_handler, returned_usage

WAIT = 15.0  # every wait below is bounded by this many seconds
METRICS_TOKEN = "metrics-scrape-token-0123456789"
OPUS_8, OPUS_7 = "claude-opus-4-8", "claude-opus-4-7"
MESSAGE = {"model": OPUS_8, "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture(autouse=True)
def single_process_mode(monkeypatch):
    """This process uses prometheus_client's in-memory values; only the gunicorn workers the
    tests start use the multiprocess directory."""
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)


@pytest.fixture
def metrics_ini(config_dir):
    (config_dir / "metrics.token").write_text(METRICS_TOKEN + "\n")
    ini = config_dir / "gateway.ini"
    ini.write_text(ini.read_text().replace(
        "[gateway]\n", "[gateway]\nmetrics = true\nmetrics_token_file = metrics.token\n"))
    return ini


def samples(text):
    """{(sample name, sorted label items): value} of a scrape."""
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def value(scraped, name, **labels):
    return scraped.get((name, tuple(sorted(labels.items()))), 0)


def scrape(url):
    response = requests.get(url + "/metrics", headers={"Authorization": "Bearer " +
                                                       METRICS_TOKEN}, timeout=WAIT)
    assert response.status_code == 200, response.text
    return samples(response.text)


def wait_until(condition, what):
    deadline = time.monotonic() + WAIT
    while not condition():
        assert time.monotonic() < deadline, "waited %.0f s for %s" % (WAIT, what)
        time.sleep(0.05)


def wait_until_equal(observe, expected, what):
    """Poll ``observe()`` until it equals ``expected``; on time-out, show what differs."""
    deadline = time.monotonic() + WAIT
    while True:
        observed = observe()
        if observed == expected:
            return
        if time.monotonic() > deadline:
            differ = {name: (observed.get(name), value) for name, value in expected.items()
                      if observed.get(name) != value}
            raise AssertionError("waited %.0f s for %s; (observed, expected): %r"
                                 % (WAIT, what, differ))
        time.sleep(0.05)


# -- in one process ---------------------------------------------------------------------------

def test_metrics_are_off_by_default(app):
    webtest.TestApp(app).get("/metrics", status=404)


def test_metrics_need_their_token_and_count_requests(metrics_ini):
    client = webtest.TestApp(gateway.make_app(gateway.Config.from_file(str(metrics_ini))))
    client.get("/metrics", status=401)
    client.get("/metrics", headers={"Authorization": "Bearer " + CLIENT_KEY}, status=401)
    client.post_json("/v1/messages", MESSAGE, headers=auth())
    client.post_json("/v1/messages", dict(MESSAGE, stream=True), headers=auth())
    client.get("/v1/models", headers=auth("sk-gw-wrong"), status=401)
    response = client.get("/metrics", headers={"Authorization": "Bearer " + METRICS_TOKEN})
    assert response.content_type == "text/plain"
    scraped = samples(response.text)
    assert value(scraped, "gateway_requests_total", key="alice", model=OPUS_8,
                 status="200") == 2
    assert value(scraped, "gateway_requests_total", key="", model="", status="401") == 3
    for field, kind in gateway.TOKEN_TYPES:
        assert value(scraped, "gateway_tokens_total", key="alice", model=OPUS_8, type=kind) \
            == returned_usage("json")[field] + returned_usage("stream")[field]
    assert value(scraped, "gateway_upstream_duration_seconds_count", model=OPUS_8,
                 stream="false") == 1
    assert value(scraped, "gateway_upstream_duration_seconds_count", model=OPUS_8,
                 stream="true") == 1
    assert value(scraped, "gateway_upstream_ttfb_seconds_count", model=OPUS_8) == 1
    assert value(scraped, "gateway_open_streams") == 0


def test_an_unreadable_token_file_refuses_every_scrape(metrics_ini):
    os.unlink(metrics_ini.parent / "metrics.token")
    client = webtest.TestApp(gateway.make_app(gateway.Config.from_file(str(metrics_ini))))
    client.get("/metrics", headers={"Authorization": "Bearer " + METRICS_TOKEN}, status=401)
    check = subprocess.run([sys.executable, os.path.join(ROOT, "gateway"), "check", "--config",
                            str(metrics_ini)], capture_output=True, text=True, timeout=30)
    assert check.returncode == 1 and "metrics token file" in check.stdout


# -- under gunicorn, two workers --------------------------------------------------------------

def two_workers(tmp_path):
    """deploy/gunicorn.conf.py with two workers, whatever this machine's core count."""
    path = tmp_path / "gunicorn.conf.py"
    path.write_text("exec(open(%r).read())\nworkers = 2\n"
                    % os.path.join(ROOT, "deploy", "gunicorn.conf.py"))
    return str(path)


def workers_that_served(directory):
    """Pids whose own counter file holds a request of alice's: which workers served."""
    pids = set()
    for name in os.listdir(directory):
        match = re.fullmatch(r"counter_(\d+)\.db", name)
        if not match:
            continue
        for metric in MultiProcessCollector.merge([os.path.join(directory, name)]):
            if any(s.name == "gateway_requests_total" and s.labels.get("key") == "alice"
                   and s.value for s in metric.samples):
                pids.add(int(match.group(1)))
    return pids


def read_first_event(response):
    received = b""
    while b"\n\n" not in received:
        chunk = response.raw.read1(65536)
        assert chunk, "the stream ended before its first event"
        received += chunk
    return received


def read_rest(response):
    """The rest of a body begun with read1 (iter_content would reparse the chunking)."""
    rest = b""
    for _ in range(10000):
        chunk = response.raw.read1(65536)
        if not chunk:
            return rest
        rest += chunk
    raise AssertionError("the stream did not end")


def test_metrics_add_up_every_worker(metrics_ini, upstream, tmp_path):
    directory = tmp_path / "prometheus"
    bind = ANY_PORT
    log_path = tmp_path / "serve.log"
    sent = {"json": 0, "stream": 0, "abandoned": 0}
    with gateway_process(["serve", "--config", str(metrics_ini), "--bind", bind,
                          "--gunicorn-config", two_workers(tmp_path)], log_path,
                         env={"PROMETHEUS_MULTIPROC_DIR": str(directory)}) as (process, url):
        assert requests.get(url + "/metrics", timeout=WAIT).status_code == 401

        # A stream held open counts in the gauge, whichever worker relays it or answers.
        upstream.gate = threading.Event()
        with requests.post(url + "/v1/messages", json=dict(MESSAGE, stream=True),
                           headers=auth(), stream=True, timeout=WAIT) as held:
            read_first_event(held)
            wait_until(lambda: value(scrape(url), "gateway_open_streams") == 1, "1 open stream")
            upstream.gate.set()
            assert b"message_stop" in read_rest(held)
        sent["stream"] += 1

        for _ in range(4):
            assert requests.post(url + "/v1/messages", json=MESSAGE, headers=auth(),
                                 timeout=WAIT).status_code == 200
            sent["json"] += 1
            assert b"message_stop" in requests.post(
                url + "/v1/messages", json=dict(MESSAGE, stream=True), headers=auth(),
                timeout=WAIT).content
            sent["stream"] += 1
        upstream.handler = abandoned_stream
        with requests.post(url + "/v1/messages", json=dict(MESSAGE, stream=True),
                           headers=auth(), stream=True, timeout=WAIT) as left:
            read_first_event(left)
        assert upstream.client_gone.wait(WAIT), "the gateway never hung up on the upstream"
        upstream.handler = default_handler
        sent["abandoned"] += 1
        for _ in range(3):
            assert requests.get(url + "/v1/models", headers=auth("sk-gw-wrong"),
                                timeout=WAIT).status_code == 401
        assert requests.post(url + "/v1/messages", json=MESSAGE, headers=auth(LIMITED_KEY),
                             timeout=WAIT).status_code == 403
        # Each request above came on a new connection, so the kernel spread them; should one
        # worker have taken them all, more go until the other serves too (bounded).
        for _ in range(100):
            if len(workers_that_served(directory)) >= 2:
                break
            assert requests.post(url + "/v1/messages", json=MESSAGE, headers=auth(),
                                 timeout=WAIT).status_code == 200
            sent["json"] += 1
        assert len(workers_that_served(directory)) >= 2

        streams = sent["stream"] + sent["abandoned"]
        expected = {
            ("gateway_requests_total", (("key", "alice"), ("model", OPUS_8),
                                        ("status", "200"))): sum(sent.values()),
            # the three wrong keys and the scrape without its token
            ("gateway_requests_total", (("key", ""), ("model", ""), ("status", "401"))): 4,
            # a configured model the key may not use: named, as in the access log
            ("gateway_requests_total", (("key", "bob"), ("model", OPUS_8), ("status", "403"))): 1,
            ("gateway_upstream_duration_seconds_count", (("model", OPUS_8),
                                                         ("stream", "false"))): sent["json"],
            ("gateway_upstream_duration_seconds_count", (("model", OPUS_8),
                                                         ("stream", "true"))): streams,
            ("gateway_upstream_ttfb_seconds_count", (("model", OPUS_8),)): streams,
            ("gateway_open_streams", ()): 0,
        }
        for field, kind in gateway.TOKEN_TYPES:
            expected["gateway_tokens_total", (("key", "alice"), ("model", OPUS_8),
                                              ("type", kind))] = sum(
                returned_usage(answer)[field] * count for answer, count in sent.items())

        def observed():
            scraped = scrape(url)
            return {name: scraped.get(name, 0) for name in expected}
        # A stream's figures are written after its last byte reached the client: poll.
        wait_until_equal(observed, expected, "the scrape to equal what was sent")

        # A restart of the workers (HUP) keeps the counts; the exited workers' gauge files
        # go (gunicorn's child_exit hook), so the gauge still says 0.
        old = workers_that_served(directory)
        assert all(os.path.exists(directory / ("gauge_livesum_%d.db" % pid)) for pid in old)
        process.send_signal(signal.SIGHUP)
        wait_until(lambda: not any(os.path.exists(directory / ("gauge_livesum_%d.db" % pid))
                                   for pid in old), "the old workers' gauge files to go")
        wait_until_equal(observed, expected, "the counts to survive the restart")


def test_serve_makes_and_removes_its_own_metrics_directory(metrics_ini, upstream, tmp_path):
    bind = ANY_PORT
    log_path = tmp_path / "serve.log"
    with gateway_process(["serve", "--config", str(metrics_ini), "--bind", bind],
                         log_path) as (_, url):
        made = re.search(r"metrics: the workers' counts are added up from (\S+)",
                         log_path.read_text()).group(1)
        assert os.path.isdir(made)
        assert requests.post(url + "/v1/messages", json=MESSAGE, headers=auth(),
                             timeout=WAIT).status_code == 200
        wait_until(lambda: value(scrape(url), "gateway_requests_total", key="alice",
                                 model=OPUS_8, status="200") == 1, "one request counted")
    assert not os.path.exists(made)


def test_an_unexpected_model_label_cannot_come_from_the_client(metrics_ini):
    """Label values come from the key file and the config: an unknown model in the body is
    refused before it could become a series."""
    client = webtest.TestApp(gateway.make_app(gateway.Config.from_file(str(metrics_ini))))
    client.post_json("/v1/messages", dict(MESSAGE, model="x" * 200), headers=auth(),
                     status=404)
    text = client.get("/metrics", headers={"Authorization": "Bearer " + METRICS_TOKEN}).text
    assert "x" * 200 not in text
    assert value(samples(text), "gateway_requests_total", key="alice", model="",
                 status="404") == 1
