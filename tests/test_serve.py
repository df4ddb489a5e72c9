"""The operator contract end to end: the real 'gateway' command, gunicorn included."""
import json
import os
import subprocess
import sys

import pytest
import requests

import gateway

from conftest import ANY_PORT, CLIENT_KEY, ROOT, auth, gateway_process
from test_deploy import booted_workers, wait_for


def run_gateway(*args, env=None):
    return subprocess.run([sys.executable, os.path.join(ROOT, "gateway")] + list(args),
                          capture_output=True, text=True, env=dict(os.environ, **(env or {})),
                          timeout=30)


def test_serve_relays_a_stream_and_logs_one_json_line(config_dir, upstream, tmp_path):
    bind = ANY_PORT
    log_path = tmp_path / "serve.log"
    with gateway_process(["serve", "--config", str(config_dir / "gateway.ini"),
                          "--bind", bind], log_path) as (process, url):
        response = requests.post(url + "/v1/messages?beta=true", headers=auth(), stream=True,
                                 json={"model": "claude-opus-4-8", "max_tokens": 10,
                                       "stream": True, "messages": [{"role": "user",
                                                                     "content": "hi"}]})
        body = response.content
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        assert b"event: message_stop" in body
        assert upstream.last.path == "/v1/messages?beta=true"
    lines = [json.loads(line) for line in log_path.read_text().splitlines()
             if line.startswith("{")]
    access = [line for line in lines if line.get("path") == "/v1/messages"]
    assert len(access) == 1
    assert access[0]["key"] == "alice" and access[0]["stream"] is True
    assert access[0]["upstream_model"] == "claude-opus-4-8-20261101"
    assert access[0]["input_tokens"] == 12 and access[0]["output_tokens"] == 7
    assert CLIENT_KEY not in log_path.read_text()


def test_keys_add_list_revoke(config_dir, app):
    ini = str(config_dir / "gateway.ini")
    added = run_gateway("keys", "add", "dave", "--models", "claude-opus-4-8", "--config", ini)
    assert added.returncode == 0, added.stderr
    new_key = added.stdout.strip().splitlines()[-1]
    assert new_key.startswith("sk-gw-")
    key_file = (config_dir / "gateway.keys").read_text()
    assert new_key not in key_file and "dave" in key_file
    assert os.stat(config_dir / "gateway.keys").st_mode & 0o777 == 0o600

    listed = run_gateway("keys", "list", "--config", ini)
    assert "dave" in listed.stdout and "claude-opus-4-8" in listed.stdout
    assert "sha256" not in listed.stdout

    import webtest
    client = webtest.TestApp(app)
    ok = client.get("/v1/models", headers={"Authorization": "Bearer " + new_key})
    assert [m["id"] for m in ok.json["data"]] == ["claude-opus-4-8"]

    revoked = run_gateway("keys", "revoke", "dave", "--config", ini)
    assert revoked.returncode == 0
    refused = client.get("/v1/models", headers={"Authorization": "Bearer " + new_key},
                         status=401)
    assert refused.json["error"]["type"] == "authentication_error"


def test_keys_add_refuses_unknown_model_and_duplicate_name(config_dir):
    ini = str(config_dir / "gateway.ini")
    unknown = run_gateway("keys", "add", "eve", "--models", "gpt-4", "--config", ini)
    assert unknown.returncode == 2 and "gpt-4" in unknown.stderr
    duplicate = run_gateway("keys", "add", "alice", "--config", ini)
    assert duplicate.returncode == 1 and "exists" in duplicate.stderr


def test_check_reports_what_it_found(config_dir):
    ini = str(config_dir / "gateway.ini")
    good = run_gateway("check", "--config", ini)
    assert good.returncode == 0, good.stdout
    assert "3 key(s), 2 enabled" in good.stdout and good.stdout.strip().endswith("ok")
    (config_dir / "upstream.key").unlink()
    bad = run_gateway("check", "--config", ini)
    assert bad.returncode == 1 and "upstream key file" in bad.stdout


def test_check_warns_about_many_salted_keys(config_dir):
    ini = str(config_dir / "gateway.ini")
    lines = ["k%d sha256:0102:%s * enabled\n" % (n, "%064x" % n)
             for n in range(gateway.SALTED_KEYS_WARNING + 1)]
    (config_dir / "gateway.keys").write_text("".join(lines[:-1]))
    assert "salted" not in run_gateway("check", "--config", ini).stdout
    (config_dir / "gateway.keys").write_text("".join(lines))
    warned = run_gateway("check", "--config", ini)
    assert warned.returncode == 0 and "warning: 301 keys have salted" in warned.stdout


def test_check_reports_a_broken_key_file_and_config(config_dir):
    ini = str(config_dir / "gateway.ini")
    (config_dir / "gateway.keys").write_text("alice not-a-digest * enabled\n")
    bad = run_gateway("check", "--config", ini)
    assert bad.returncode == 1 and "line 1" in bad.stdout
    (config_dir / "gateway.ini").write_text("[gateway]\nmax_body_byte = 3\n")
    typo = run_gateway("check", "--config", ini)
    assert typo.returncode == 2 and "max_body_byte" in typo.stderr


def test_serve_refuses_to_start_without_an_upstream_key(config_dir):
    (config_dir / "upstream.key").unlink()
    result = run_gateway("serve", "--config", str(config_dir / "gateway.ini"))
    assert result.returncode == 1 and "upstream key" in result.stdout


def test_python_dash_m_reaches_the_same_main(config_dir):
    result = subprocess.run([sys.executable, "-m", "gateway", "keys", "list", "--config",
                             str(config_dir / "gateway.ini")], cwd=ROOT, capture_output=True,
                            text=True, timeout=30)
    assert result.returncode == 0 and "alice" in result.stdout


def test_hup_applies_a_new_config_and_survives_a_broken_one(config_dir, upstream, tmp_path):
    import signal
    import time
    ini = config_dir / "gateway.ini"
    log_path = tmp_path / "serve.log"

    def models(url):
        return [m["id"] for m in requests.get(url + "/v1/models", headers=auth(),
                                              timeout=10).json()["data"]]

    def after_hup(process, url, expected):
        """HUP, then wait (bounded) until every answer shows ``expected``."""
        process.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if all(models(url) == expected for _ in range(6)):
                return
            time.sleep(0.1)
        raise AssertionError("the reload did not take effect:\n" + log_path.read_text())

    with gateway_process(["serve", "--config", str(ini), "--bind",
                          ANY_PORT], log_path) as (process, url):
        assert models(url) == ["claude-opus-4-8", "claude-opus-4-7"]
        ini.write_text(ini.read_text() + "claude-opus-5 = claude-opus-5-20270101\n")
        after_hup(process, url, ["claude-opus-4-8", "claude-opus-4-7", "claude-opus-5"])
        ini.write_text("[gateway]\nno_such_setting = 1\n")
        process.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 20
        while "keeping the previous gateway config" not in log_path.read_text():
            assert time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.1)
        for _ in range(6):
            assert models(url)[-1] == "claude-opus-5"
        assert process.poll() is None


@pytest.mark.parametrize("workers", [1, 2])
def test_a_hup_when_gateway_py_no_longer_imports_is_refused(config_dir, upstream, tmp_path,
                                                            workers):
    """An upgrade half done or a bad edit leaves a gateway.py that does not import, and then
    a bare HUP comes: workers forked from it would fail to boot and gunicorn would stop. The
    HUP is refused whole; the workers it would have replaced serve on."""
    import shutil
    import signal
    code = tmp_path / "code"
    code.mkdir()
    for name in ("gateway", "gateway.py"):
        shutil.copy(os.path.join(ROOT, name), code / name)
    shutil.copytree(os.path.join(ROOT, "deploy"), code / "deploy")
    log_path = tmp_path / "serve.log"
    with gateway_process(["serve", "--config", str(config_dir / "gateway.ini"), "--bind",
                          ANY_PORT], log_path, env={"WEB_CONCURRENCY": str(workers)},
                         root=str(code)) as (process, url):
        assert requests.get(url + "/v1/models", headers=auth(), timeout=10).status_code == 200
        wait_for(lambda: len(booted_workers(log_path)) >= workers, "the workers", timeout=30)
        (code / "gateway.py").write_text("this is not python (\n")
        process.send_signal(signal.SIGHUP)
        wait_for(lambda: "reload refused" in log_path.read_text(), "the refusal", timeout=30)
        for _ in range(6):
            assert requests.get(url + "/v1/models", headers=auth(),
                                timeout=10).status_code == 200
        assert process.poll() is None
        assert log_path.read_text().count("Booting worker") == workers  # none since
        assert "SyntaxError" in log_path.read_text()  # the check's own words, in the log


@pytest.mark.parametrize("workers", [1, 2])
def test_the_master_imports_the_gateway_only_to_share_it(config_dir, upstream, tmp_path,
                                                         workers):
    """With one worker, the gunicorn master ('gateway serve' itself after its checks: the
    same pid) does not hold what gateway.py imports, which the worker would count again in
    its RSS; with several, it does, so that they share those pages. sqlite3's extension
    module, which gunicorn never loads, shows which. The workers have it, and serve.
    Several workers share requests and urllib3 too, which gateway.py imports only as an app
    is built: the master's modules, as gunicorn's when_ready sees them, hold them then."""
    def loaded(pid):
        with open("/proc/%d/maps" % pid) as file:
            return "_sqlite3" in file.read()
    modules_path = tmp_path / "master-modules"
    gunicorn_config = tmp_path / "gunicorn.conf.py"
    gunicorn_config.write_text(
        "exec(open(%r).read())\n"
        "deploy_when_ready = when_ready\n"
        "def when_ready(server):\n"
        "    import sys\n"
        "    with open(%r, 'w') as file:\n"
        "        file.write(' '.join(sys.modules))\n"
        "    deploy_when_ready(server)\n" % (os.path.join(ROOT, "deploy", "gunicorn.conf.py"),
                                     str(modules_path)))
    log_path = tmp_path / "serve.log"
    with gateway_process(["serve", "--config", str(config_dir / "gateway.ini"), "--bind",
                          ANY_PORT, "--gunicorn-config", str(gunicorn_config)], log_path,
                         env={"WEB_CONCURRENCY": str(workers)}) as (process, url):
        assert requests.get(url + "/v1/models", headers=auth(), timeout=10).status_code == 200
        # Each worker logs before it loads the app: wait for both, in that order (all() of
        # no worker is true).
        wait_for(lambda: len(booted_workers(log_path)) >= workers, "the workers", timeout=30)
        wait_for(lambda: all(map(loaded, booted_workers(log_path))), "sqlite3 in the workers",
                 timeout=30)
        assert len(booted_workers(log_path)) == workers
        assert loaded(process.pid) == (workers > 1)
    master_modules = set(modules_path.read_text().split())
    for module in ("gateway", "requests", "requests.adapters", "urllib3", "http.cookiejar"):
        assert (module in master_modules) == (workers > 1), module


def test_version_is_the_release_that_setup_cfg_builds():
    import configparser
    result = run_gateway("--version")
    assert result.returncode == 0 and result.stdout == "gateway %s\n" % gateway.__version__
    setup = configparser.ConfigParser()
    setup.read(os.path.join(ROOT, "setup.cfg"))
    assert setup["metadata"]["version"] == "attr: gateway.__version__"
