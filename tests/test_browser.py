"""Browser apps, proven in a real headless Chromium (Debian's chromium package).

A page served from one origin calls the gateway, on another origin, with ``fetch``: the
CORS preflight, a streamed answer read event by event (the fake upstream holds event 2 back
until the page has reported event 1), and a JSON answer. A page on an origin the gateway does
not name gets no answer it may read. Each page reports what it saw with a POST to the server
it came from (same origin, so no CORS involved), which the test waits for; no DevTools
protocol and no download are needed.
"""
import json
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from wsgiref.simple_server import make_server

import pytest

import gateway
from conftest import CLIENT_KEY, _QuietHandler, _ThreadingWSGIServer, required, stop_process

WAIT = 30  # seconds; a browser on a busy 2-core machine starts slowly

PAGE = """<!doctype html><meta charset="utf-8"><title>gateway test</title><script>
const GATEWAY = %(gateway)s, KEY = %(key)s;
const HEADERS = {"x-api-key": KEY, "anthropic-version": "2023-06-01",
                 "content-type": "application/json",
                 "anthropic-dangerous-direct-browser-access": "true"};
const report = (path, data) => fetch(path, {method: "POST", body: JSON.stringify(data)});
const ask = (stream) => fetch(GATEWAY + "/v1/messages", {method: "POST", headers: HEADERS,
  body: JSON.stringify({model: "claude-opus-4-8", max_tokens: 16, stream: stream,
                        messages: [{role: "user", content: "Hello"}]})});
async function run() {
  const seen = {};
  try {
    const streamed = await ask(true);
    seen.status = streamed.status;
    seen.request_id = streamed.headers.get("request-id");
    const reader = streamed.body.getReader(), decoder = new TextDecoder();
    let text = "";
    while (true) {
      const {done, value} = await reader.read();
      if (done) break;
      const first = !text.includes("\\n\\n");
      text += decoder.decode(value, {stream: true});
      if (first && text.includes("\\n\\n")) await report("/first-event", {text: text});
    }
    seen.stream = text;
    const answered = await ask(false);
    seen.json = await answered.json();
  } catch (error) {
    seen.error = String(error);
  }
  await report("/result", seen);
}
run();
</script>"""


class PageServer:
    """Serves the page on its own origin and collects what the page reports."""

    def __init__(self):
        self.reports = {"/first-event": threading.Event(), "/result": threading.Event()}
        self.data = {}
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                body = server.page.encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/html; charset=utf-8")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self):
                data = self.rfile.read(int(self.headers["Content-Length"]))
                server.data[self.path] = json.loads(data)
                self.send_response(204)
                self.end_headers()
                server.reports[self.path].set()

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.origin = "http://127.0.0.1:%d" % self.httpd.server_address[1]
        self.page = ""
        threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True).start()

    def wait(self, path):
        assert self.reports[path].wait(WAIT), "the page never reported %s" % path
        return self.data[path]

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def chromium():
    return required("chromium", "apt-get install chromium")


@pytest.fixture
def pages():
    made = []
    yield lambda: made.append(PageServer()) or made[-1]
    for page in made:
        page.close()


@pytest.fixture
def gateway_for(config_dir):
    """``gateway_for(origins)``: the gateway, with ``cors_origins`` set, on a loopback
    server of its own (another origin than the pages'); yields its base URL."""
    servers = []

    def serve(origins):
        ini = config_dir / "gateway.ini"
        ini.write_text(ini.read_text().replace(
            "[gateway]\n", "[gateway]\ncors_origins = %s\n" % ", ".join(origins)))
        app = gateway.make_app(gateway.Config.from_file(str(ini)))
        server = make_server("127.0.0.1", 0, app, server_class=_ThreadingWSGIServer,
                             handler_class=_QuietHandler)
        threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
        servers.append(server)
        return "http://127.0.0.1:%d" % server.server_address[1]
    yield serve
    for server in servers:
        server.shutdown()
        server.server_close()


def open_in_chromium(chromium, url, profile):
    """Headless Chromium on ``url`` with a fresh profile and nothing that phones home."""
    return subprocess.Popen(
        [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--no-first-run", "--no-default-browser-check", "--user-data-dir=%s" % profile, url],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def test_a_page_on_a_named_origin_streams_from_the_gateway(chromium, pages, gateway_for,
                                                           upstream, tmp_path):
    page = pages()
    base = gateway_for([page.origin])
    page.page = PAGE % {"gateway": json.dumps(base), "key": json.dumps(CLIENT_KEY)}
    upstream.gate = threading.Event()  # the upstream holds event 2 back until this is set
    browser = open_in_chromium(chromium, page.origin + "/", tmp_path / "profile")
    try:
        first = page.wait("/first-event")
        assert first["text"].startswith("event: message_start\n")
        assert not upstream.stream_finished.is_set()
        upstream.gate.set()
        seen = page.wait("/result")
    finally:
        stop_process(browser, WAIT)
    assert "error" not in seen, seen
    assert seen["status"] == 200 and seen["request_id"] == "req_upstream_stream"
    assert "event: message_stop" in seen["stream"] and '"text":"lo"' in seen["stream"]
    assert seen["json"]["content"][0]["text"] == "Hello!"
    assert not upstream.gate_timed_out.is_set(), "the gateway held event 1 back"
    # both requests reached the upstream (after their preflights), with our key, not the page's
    assert len(upstream.received) == 2
    assert all(r.headers.get("x-api-key") != CLIENT_KEY for r in upstream.received)


def test_a_page_on_an_origin_not_named_is_refused(chromium, pages, gateway_for, upstream,
                                                  tmp_path):
    named, stranger = pages(), pages()
    base = gateway_for([named.origin])
    stranger.page = PAGE % {"gateway": json.dumps(base), "key": json.dumps(CLIENT_KEY)}
    browser = open_in_chromium(chromium, stranger.origin + "/", tmp_path / "profile")
    try:
        seen = stranger.wait("/result")
    finally:
        stop_process(browser, WAIT)
    assert seen == {"error": "TypeError: Failed to fetch"}
    assert upstream.received == []  # the preflight failed: the request itself never came
