"""The manual cannot drift from the code: README.md and docs/ against Config, the command line
and the files of this repository."""

import argparse
import configparser
import glob
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys

import pytest
import webtest

import gateway
import docs_config
from conftest import ROOT, auth, missing
from upstream import UPSTREAM_KEY

BODY = {"model": "claude-opus-4-8", "max_tokens": 16,
        "messages": [{"role": "user", "content": "Hello"}]}
DOCS = ["README.md", "CHANGELOG.md"] + sorted(os.path.relpath(path, ROOT)
                              for path in glob.glob(os.path.join(ROOT, "docs", "*.md")))
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
# A path of this repository named in backquotes: `deploy/nginx.conf`, `tests/upstream.py`.
CODE_PATH = re.compile(r"`((?:deploy|docs|tests|\.ci)/[\w./-]*|gateway(?:\.py)?|setup\.cfg"
                       r"|pyproject\.toml)`")
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)


def read(doc):
    with open(os.path.join(ROOT, doc), encoding="utf-8") as file:
        return file.read()


def anchors(doc):
    """GitHub's anchor for each heading of ``doc``: lower case, punctuation dropped, spaces to
    hyphens."""
    text = FENCE.sub("", read(doc))
    return {re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
            for heading in re.findall(r"^#+ (.+)$", text, re.M)}


def test_configuration_reference_lists_every_setting_as_config_declares_it():
    assert all(field.metadata["doc"] for field in docs_config.settings())
    block = docs_config.current_block(read("docs/configuration.md"))
    assert block == docs_config.generated_block(), (
        "docs/configuration.md does not match gateway.Config: a setting was added or its "
        "_setting(...) changed. Run 'python tests/docs_config.py --write' and commit the result.")


def test_every_setting_is_read_from_the_ini_file(tmp_path):
    # docs_config lists the fields declared with _setting; each must be an INI setting too.
    names = [field.name for field in docs_config.settings()]
    ini = tmp_path / "gateway.ini"
    ini.write_text("[gateway]\n" + "".join("%s = 1\n" % name for name in names))
    with pytest.raises(ValueError) as error:
        gateway.Config.from_file(str(ini))
    assert "unknown setting" not in str(error.value)
    ini.write_text("[gateway]\nno_such_setting = 1\n")
    with pytest.raises(ValueError, match="known: " + re.escape(", ".join(sorted(names)))):
        gateway.Config.from_file(str(ini))


@pytest.mark.parametrize("doc", DOCS)
def test_ini_examples_parse(doc, tmp_path):
    for number, (language, block) in enumerate(FENCE.findall(read(doc))):
        if language == "ini":
            path = tmp_path / ("example%d.ini" % number)
            path.write_text(block)
            gateway.Config.from_file(str(path))  # raises, naming the setting, if stale


def test_the_fence_finds_the_ini_examples():
    # test_ini_examples_parse checks nothing for a doc whose blocks FENCE does not match.
    found = [doc for doc in DOCS for language, _ in FENCE.findall(read(doc)) if language == "ini"]
    assert "docs/configuration.md" in found and len(found) >= 5


def commands(parser, prefix="gateway"):
    """(command line, its option strings) for every command and subcommand of ``parser``."""
    found = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                options = {option for act in sub._actions for option in act.option_strings
                           if option.startswith("--") and option not in ("--help", "--config")}
                found.append(("%s %s" % (prefix, name), options))
                found += commands(sub, "%s %s" % (prefix, name))
    return found


def test_cli_reference_names_every_command_and_flag():
    # Each command's section names it and its flags; --config (every command's) has its own.
    text = read("docs/cli.md")
    sections = dict(re.findall(r"^## (gateway \w+)\n(.*?)(?=^## |\Z)", text, re.S | re.M))
    missing = [] if "--config FILE" in text else ["--config"]
    missing += [option for action in gateway.build_parser()._actions
                for option in action.option_strings
                if option.startswith("--") and option not in ("--help", "--config")
                and option not in text]  # the top level's own: --version
    for command, options in commands(gateway.build_parser()):
        top = " ".join(command.split()[:2])
        section = sections.get(top, "")
        missing += [command] if command not in section else []
        missing += ["%s %s" % (command, option) for option in sorted(options)
                    if option not in section]
    assert not missing, "docs/cli.md does not mention: " + ", ".join(missing)


@pytest.mark.parametrize("doc", DOCS)
def test_relative_links_point_at_files_and_headings_that_exist(doc):
    broken = []
    for target in LINK.findall(FENCE.sub("", read(doc))):
        if re.match(r"[a-z]+:", target):
            continue  # https:, mailto:
        path, _, anchor = target.partition("#")
        linked = os.path.normpath(os.path.join(os.path.dirname(doc), path)) if path else doc
        if not os.path.exists(os.path.join(ROOT, linked)):
            broken.append(target)
        elif anchor and linked.endswith(".md") and anchor not in anchors(linked):
            broken.append(target)
    assert not broken, "%s links to what does not exist: %s" % (doc, ", ".join(broken))


@pytest.mark.parametrize("doc", DOCS)
def test_repository_paths_named_exist(doc):
    missing = [path for path in CODE_PATH.findall(read(doc))
               if not os.path.exists(os.path.join(ROOT, path))]
    assert not missing, "%s names paths that do not exist: %s" % (doc, ", ".join(missing))


def test_the_paths_named_are_found_by_the_pattern():
    # The two checks above must be able to fail: the patterns see what the docs name.
    assert "tests/test_deploy.py" in CODE_PATH.findall(read("docs/deployment.md"))
    assert "operations.md#rotating-keys-without-downtime" in LINK.findall(
        read("docs/keys-and-limits.md"))
    assert "rotating-keys-without-downtime" in anchors("docs/operations.md")


def test_the_embedding_access_log_recipe_feeds_gateway_usage(app, tmp_path, capsys):
    text = read("docs/embedding.md")
    recipe = re.search(r"<!-- access-log-example.*?\n```python\n(.*?)```", text, re.S).group(1)
    log_path = tmp_path / "access.log"
    assert "/var/log/gateway/access.log" in recipe
    logger = logging.getLogger("gateway.access")
    saved = logger.handlers[:], logger.level, logger.propagate
    try:
        exec(recipe.replace("/var/log/gateway/access.log", str(log_path)), {})
        client = webtest.TestApp(app)
        client.post_json("/v1/messages", BODY, headers=auth())
        client.post_json("/v1/messages", dict(BODY, model="claude-foo"), headers=auth(),
                         status=404)
    finally:
        for handler in logger.handlers[len(saved[0]):]:
            handler.close()
        logger.handlers[:], logger.level, logger.propagate = saved
    capsys.readouterr()
    assert gateway.main(["usage", "--json", str(log_path)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["total"]["requests"] == 2 and report["total"]["errors"] == 1
    assert {row["key"] for row in report["rows"]} == {"alice"}


def doc_block(doc, marker, after=0):
    """The fenced code block that follows ``marker`` in ``doc`` (``after`` more blocks on)."""
    text = read(doc)
    start = text.index(marker)
    return [block for _, block in FENCE.findall(text[start:])][after]


def test_the_readme_quick_start_runs_as_written(upstream, tmp_path):
    # The README's start command and then its curl, in one bash session as a reader types
    # them (the curl uses the KEY that the start command set), and all of it a second time in
    # the same directory, as a reader coming back the next day does. The stand-ins: .venv holds
    # the checkout's gateway instead of a pip install, 'gateway serve' listens on a free port
    # (--bind) that the curl is pointed at, GATEWAY_CONFIG points it at the fake upstream, the
    # upstream key is its key, and the session waits for 'Listening at' before the curl.
    if not shutil.which("curl"):
        missing("curl is not installed (the README's curl example)")
    start = doc_block("README.md", "<!-- start-command")
    curl = doc_block("README.md", "<!-- curl-example")
    shown = json.loads(doc_block("README.md", "<!-- curl-example", after=1))
    assert "sk-ant-your-upstream-key" in start and "127.0.0.1:8080" in curl
    assert "$KEY" in curl and start.rstrip().endswith("&")
    venv = tmp_path / ".venv" / "bin"
    venv.mkdir(parents=True)
    (venv / "pip").write_text("#!/bin/sh\nexit 0\n")
    (venv / "gateway").write_text(
        '#!/bin/sh\nif [ "$1" = serve ]; then shift; set -- serve --bind 127.0.0.1:0 "$@"; fi\n'
        'exec "%s" "%s" "$@"\n' % (sys.executable, os.path.join(ROOT, "gateway")))
    for script in ("pip", "gateway"):
        (venv / script).chmod(0o755)
    (tmp_path / "gateway.ini").write_text("[gateway]\nupstream_url = %s\n" % upstream.url)
    no_venv = ('python3() { if [ "$1 $2" = "-m venv" ]; then return 0; fi; '
               'command python3 "$@"; }\n')
    wait = ('for i in $(seq 300); do grep -q "Booting worker" "$LOG" && break; sleep 0.1; done\n'
            'ADDRESS=$(grep -o "Listening at: http://[0-9.:]*" "$LOG" | tail -n 1 '
            '| cut -d/ -f3)\n')
    session = (no_venv + start.replace("sk-ant-your-upstream-key", UPSTREAM_KEY) + wait
               + curl.replace("127.0.0.1:8080", "$ADDRESS").rstrip() + ' > "$ANSWER"\n'
               + "kill %1; wait\n")
    env = dict(os.environ, GATEWAY_CONFIG=str(tmp_path / "gateway.ini"))
    env.pop("KEY", None)
    keys = []
    for run in ("first", "second"):
        log_path, answer = tmp_path / (run + ".log"), tmp_path / (run + ".json")
        env.update(LOG=str(log_path), ANSWER=str(answer))
        returncode = run_session(session, env, tmp_path, log_path)
        assert returncode == 0, log_path.read_text()
        assert json.loads(answer.read_text()) == shown, log_path.read_text()
        assert upstream.last.headers["x-api-key"] == UPSTREAM_KEY
        access = [json.loads(line) for line in log_path.read_text().splitlines()
                  if line.startswith("{")]
        assert [line["key"] for line in access] == ["me"]
        keys.append(gateway.parse_key_file((tmp_path / "gateway.keys").read_text()).get("me"))
    assert keys[0].digest != keys[1].digest  # the second run gave 'me' a new key


def run_session(session, env, cwd, log_path, timeout=60):
    """Run ``session`` in bash, its output in ``log_path``; its exit status. A session still
    running after ``timeout`` seconds fails the test with what it logged, once every process
    it started (its own process group: the gateway's master and workers) is killed, so that
    none is left to disturb the tests after it."""
    with open(log_path, "wb") as log:
        session = subprocess.Popen(["bash", "-c", session], stdout=log, stderr=subprocess.STDOUT,
                                   env=env, cwd=str(cwd), start_new_session=True)
        try:
            return session.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(session.pid, signal.SIGKILL)
            session.wait()
            pytest.fail("still running after %d s; it logged:\n%s"
                        % (timeout, log_path.read_text()))


def test_installation_lists_every_extra():
    parser = configparser.ConfigParser()
    parser.read(os.path.join(ROOT, "setup.cfg"))
    extras = set(parser["options.extras_require"])
    listed = set(re.findall(r"^\| `(\w+)` \|", read("docs/installation.md"), re.M))
    assert extras <= listed, "docs/installation.md does not list the extras %s" % (
        ", ".join(sorted(extras - listed)))


@pytest.mark.parametrize("index", ["README.md", "docs/README.md"])
def test_every_topic_is_in_the_index(index):
    linked = {os.path.normpath(os.path.join(os.path.dirname(index), target.partition("#")[0]))
              for target in LINK.findall(read(index))}
    topics = {doc for doc in DOCS if doc.startswith("docs/") and doc != "docs/README.md"}
    assert topics <= linked, "%s does not link to %s" % (index, ", ".join(sorted(topics - linked)))


def test_api_reference_names_the_headers_and_fields_the_code_passes():
    text = read("docs/api.md")
    named = (["`%s`" % name for name in gateway.FORWARDED_HEADERS | gateway.RELAYED_HEADERS
              | gateway.COUNT_TOKENS_DROPPED_FIELDS]
             + ["`%s*`" % prefix for prefix in gateway.FORWARDED_PREFIXES
                + gateway.RELAYED_PREFIXES])
    missing = sorted(name for name in named if name not in text)
    assert not missing, "docs/api.md does not name " + ", ".join(missing)


def test_installation_names_every_test_requirement():
    parser = configparser.ConfigParser()
    parser.read(os.path.join(ROOT, "setup.cfg"))
    names = {re.split(r"[<>=\[]", line.strip())[0]
             for line in parser["options.extras_require"]["test"].split("\n") if line.strip()}
    row = re.search(r"^\| `test` \|.*$", read("docs/installation.md"), re.M).group(0)
    others = {name for extra in parser["options.extras_require"] if extra != "test"
              for name in [re.split(r"[<>=\[]", line.strip())[0] for line in
                           parser["options.extras_require"][extra].split("\n") if line.strip()]}
    others |= set(parser["options.extras_require"])  # 'gevent' is the gevent extra's
    unnamed = sorted(name for name in names - others if "`%s`" % name not in row)
    assert not unnamed, "docs/installation.md's test row does not name " + ", ".join(unnamed)
