"""Operator faults in the key file (issue 10): whatever 'gateway keys' is given, it writes a
file the workers parse, or refuses with a message and changes nothing; its edits keep the
operator's comments and symlinks; 'keys list' says which keys no longer work.

Every command runs the real './gateway' in a subprocess, as an operator types it.
"""
import os
import subprocess
import sys
import time

import pytest

import gateway
from conftest import ROOT, key_line, last_good_copy


def run(config_dir, *args):
    result = subprocess.run([sys.executable, os.path.join(ROOT, "gateway"), "keys"] + list(args)
                            + ["--config", str(config_dir / "gateway.ini")],
                            capture_output=True, text=True, timeout=30)
    assert "Traceback" not in result.stderr, result.stderr
    return result


def parsed(config_dir):
    return gateway.parse_key_file((config_dir / "gateway.keys").read_text())


# -- 1. nothing the CLI writes can fail to parse ------------------------------------------------

@pytest.mark.parametrize("args, complaint", [
    (["add", "eve", "--rpm", "-5"], "'-5' is not a whole number"),
    (["add", "eve", "--rpm", "abc"], "'abc' is not a whole number"),
    (["add", "eve", "--tokens-per-day", "-1"], "is not a whole number"),
    (["set", "bob", "--concurrency", "-1"], "is not a whole number"),
    (["set", "bob", "--models", ","], "names no model"),
    (["set", "bob", "--models", " , "], "names no model"),
    (["add", "eve", "--models", ""], "names no model"),
    (["add", "eve", "--models", "*,claude-opus-4-8"], "give it alone"),
    (["add", "eve x"], "no spaces"),
    (["add", "eve,x"], "separators"),
    (["add", "#eve"], "separators"),
    (["add", "eve=x"], "separators"),
    (["add", "eve", "--rpm", "5", "--rpm", "6"], "--rpm given twice"),
    (["set", "bob", "--models", "claude-opus-4-8", "--models", "*"], "--models given twice"),
    (["add", "eve", "--expires", "2020-01-01"], "in the past"),
    (["set", "bob", "--expires", "2020-01-01T00:00:00Z"], "in the past"),
    (["rotate", "bob", "--grace=-1h"], "duration"),
    (["rotate", "bob", "--grace", "nand"], "duration"),
    (["rotate", "bob", "--grace", "1e400d"], "duration"),
    (["rotate", "bob", "--grace", "1h", "--grace", "2h"], "--grace given twice"),
    (["add", "alice"], "--replace"),
])
def test_bad_key_commands_are_refused_and_change_nothing(config_dir, args, complaint):
    before = (config_dir / "gateway.keys").read_bytes()
    result = run(config_dir, *args)
    assert result.returncode != 0 and complaint in result.stderr, result.stderr
    assert (config_dir / "gateway.keys").read_bytes() == before


def test_every_write_parses_with_the_workers_parser(config_dir):
    later = time.strftime("%Y-%m-%d", time.gmtime(time.time() + 86400 * 30))
    commands = [["add", "eve", "--rpm", "5", "--concurrency", "2", "--expires", later],
                ["set", "eve", "--rpm", "0", "--tokens-per-day", "100"],
                ["set", "bob", "--models", "claude-opus-4-8, claude-opus-4-7,"],
                ["rotate", "alice", "--grace", "1h"], ["disable", "eve"], ["enable", "eve"],
                ["add", "eve", "--replace", "--models", "*"], ["revoke", "carol"]]
    for args in commands:
        result = run(config_dir, *args)
        assert result.returncode == 0, (args, result.stderr)
        parsed(config_dir)  # raises if a worker could not read it
    store = parsed(config_dir)
    assert [e.name for e in store.entries] == ["alice", "bob", "eve"]
    eve = store.get("eve")
    assert eve.models is None and eve.rpm is None and eve.expires is None  # --replace: fresh
    assert store.get("bob").models == {"claude-opus-4-8", "claude-opus-4-7"}


def test_add_replace_gives_a_new_key_in_the_same_place(config_dir):
    old = parsed(config_dir).get("bob")
    result = run(config_dir, "add", "bob", "--replace")
    assert result.returncode == 0, result.stderr
    new_key = result.stdout.splitlines()[-1]
    store = parsed(config_dir)
    assert [e.name for e in store.entries] == ["alice", "bob", "carol"]
    assert store.find(new_key).name == "bob" and store.get("bob").digest != old.digest
    assert store.get("bob").models is None  # only the settings given on this command line


def test_a_digest_under_two_names_is_refused_by_the_parser():
    text = key_line("alice", "sk-same") + "# copied\n" + key_line("alice2", "sk-same")
    with pytest.raises(ValueError, match=r"line 3: the same key digest as line 1"):
        gateway.parse_key_file(text)
    entry = gateway.KeyEntry("old", gateway.digest_key("sk-new"),
                             previous=(b"", gateway.digest_key("sk-same")), previous_until=1)
    with pytest.raises(ValueError, match="line 2: the same key digest as line 1"):
        gateway.parse_key_file(entry.to_line() + "\n" + key_line("other", "sk-same"))


def test_an_option_given_twice_on_a_line_is_refused_by_the_parser():
    line = key_line("alice", "sk-a").rstrip("\n") + " rpm=5 rpm=60\n"
    with pytest.raises(ValueError, match="line 1: field 6: rpm given twice"):
        gateway.parse_key_file(line)


def test_a_broken_key_file_names_the_line_to_fix_and_is_left_alone(config_dir):
    path = config_dir / "gateway.keys"
    path.write_text(path.read_text() + "ci sha256:%s * enabled rpm=-5\n" % ("0" * 64))
    before = path.read_bytes()
    for args in (["set", "ci", "--rpm", "5"], ["add", "dave"], ["list"]):
        result = run(config_dir, *args)
        assert result.returncode == 1
        assert "line 4: field 5: rpm must be a positive whole number" in result.stderr
        assert "Fix or delete that line" in result.stderr
    assert path.read_bytes() == before
    path.write_text(before.decode().replace("rpm=-5", "rpm=5"))  # the fix it asked for
    assert run(config_dir, "set", "ci", "--rpm", "6").returncode == 0
    assert parsed(config_dir).get("ci").rpm == 6


def test_a_file_that_would_not_read_back_is_never_written(config_dir, monkeypatch):
    """The last line of defence: the new text is parsed before the rename."""
    before = (config_dir / "gateway.keys").read_bytes()
    config = gateway.Config.from_file(str(config_dir / "gateway.ini"))
    monkeypatch.setattr(gateway.KeyEntry, "to_line", lambda self: "%s not-a-digest" % self.name)
    with pytest.raises(gateway.CommandError, match="would not parse.*line 4"):
        gateway.edit_key_file(config, lambda store: store.replace(
            "eve", digest=gateway.digest_key("sk-eve")))
    assert (config_dir / "gateway.keys").read_bytes() == before
    assert not [name for name in os.listdir(config_dir) if name.startswith(".gateway.keys-")]


@pytest.mark.parametrize("buffered", [False, True])
@pytest.mark.parametrize("args", [["list"], ["add", "dave"]])
def test_a_reader_that_leaves_early_gets_no_traceback(config_dir, args, buffered):
    """'gateway keys list | head -1': the pipe is closed before the command writes (its read
    end closed first), with stdout written at once or at exit."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    env = {name: value for name, value in os.environ.items() if name != "PYTHONUNBUFFERED"}
    if not buffered:
        env["PYTHONUNBUFFERED"] = "1"
    try:
        result = subprocess.run([sys.executable, os.path.join(ROOT, "gateway"), "keys"] + args
                                + ["--config", str(config_dir / "gateway.ini")],
                                stdout=write_end, stderr=subprocess.PIPE, text=True, env=env,
                                timeout=30)
    finally:
        os.close(write_end)
    assert (result.returncode, result.stderr) == (1, "")
    parsed(config_dir)


# -- 5. edits keep comments, blank lines and symlinks --------------------------------------------

def test_edits_keep_comments_blank_lines_and_untouched_lines(config_dir):
    path = config_dir / "gateway.keys"
    lines = path.read_text().splitlines(keepends=True)
    text = ("# team keys: ask ops before adding\n\n" + lines[0] + "\n# CI, owner: build team\n"
            + lines[1].replace(" ", "   ") + lines[2] + "# end\n")
    path.write_text(text)
    assert run(config_dir, "set", "bob", "--rpm", "60").returncode == 0
    assert run(config_dir, "add", "dave").returncode == 0
    assert run(config_dir, "revoke", "carol").returncode == 0
    new = path.read_text().splitlines(keepends=True)
    assert new[:4] == ["# team keys: ask ops before adding\n", "\n", lines[0],
                       "\n"] and new[4] == "# CI, owner: build team\n"
    assert new[5].startswith("bob\t") and new[5].rstrip().endswith("rpm=60")
    assert new[6] == "# end\n" and new[7].startswith("dave\t") and len(new) == 8
    assert parsed(config_dir).get("bob").rpm == 60


def test_edits_write_through_a_symlink_to_its_target(config_dir, tmp_path):
    real = tmp_path / "secrets"
    real.mkdir()
    target = real / "keys.real"
    os.replace(config_dir / "gateway.keys", target)
    os.chmod(target, 0o644)
    os.symlink(target, config_dir / "gateway.keys")
    assert run(config_dir, "add", "dave").returncode == 0
    assert os.path.islink(config_dir / "gateway.keys")
    assert os.readlink(config_dir / "gateway.keys") == str(target)
    assert "dave" in target.read_text() and os.stat(target).st_mode & 0o777 == 0o600
    assert not [name for name in os.listdir(real) if name.startswith(".keys.real-")]
    assert parsed(config_dir).get("dave") is not None


# -- 6. keys list says which keys no longer work -----------------------------------------------

def test_list_shows_expired_keys_and_a_rotation_grace_period(config_dir):
    path = config_dir / "gateway.keys"
    lines = path.read_text().splitlines()
    lines[1] += " expires=2020-01-01T00:00:00Z"  # bob expired long ago
    path.write_text("\n".join(lines) + "\n")
    assert run(config_dir, "rotate", "alice", "--grace", "2h").returncode == 0
    listed = run(config_dir, "list").stdout.splitlines()
    assert listed[0].split()[-2:] == ["OLD", "KEY"]
    alice = next(line for line in listed if line.startswith("alice"))
    bob = next(line for line in listed if line.startswith("bob"))
    carol = next(line for line in listed if line.startswith("carol"))
    until = gateway.format_time(parsed(config_dir).get("alice").previous_until)
    assert alice.endswith("works until " + until)
    assert "2020-01-01T00:00:00Z (expired)" in bob and bob.endswith("-")
    assert "expired" not in carol and carol.endswith("-")
    assert run(config_dir, "rotate", "alice", "--grace", "0s").returncode == 0
    alice = next(line for line in run(config_dir, "list").stdout.splitlines()
                 if line.startswith("alice"))
    assert "works until" not in alice  # the grace period is over at once


def test_a_second_rotation_within_the_grace_period_keeps_the_key_clients_still_use(config_dir):
    """The first rotation promised the old key until its grace period ends; a second one (the
    new key lost, or leaked) keeps that promise and drops the key the first one printed."""
    from conftest import CLIENT_KEY
    first = run(config_dir, "rotate", "alice", "--grace", "2h")
    promised = parsed(config_dir).get("alice").previous_until
    second = run(config_dir, "rotate", "alice", "--grace", "24h")
    assert second.returncode == 0, second.stderr
    assert "the key the last rotation gave works no more; the key before it works until %s" \
        % gateway.format_time(promised) in second.stdout
    alice, now = parsed(config_dir).get("alice"), time.time()
    assert alice.matches(CLIENT_KEY, now) and alice.previous_until == promised
    assert not alice.matches(first.stdout.splitlines()[-1], now)
    assert alice.matches(second.stdout.splitlines()[-1], now)
    assert run(config_dir, "rotate", "alice", "--grace", "0s").returncode == 0  # end it now
    assert not parsed(config_dir).get("alice").matches(CLIENT_KEY, time.time())


# -- 2. a broken key file never locks a valid key out: HUP, restart, boot ---------------------

def _served(url, key):
    import requests
    return requests.post(url + "/v1/messages", headers={"x-api-key": key,
                         "anthropic-version": "2023-06-01"}, timeout=20,
                         json={"model": "claude-opus-4-8", "max_tokens": 5,
                               "messages": [{"role": "user", "content": "hi"}]}).status_code


def _wait_for(log_path, pattern, count):
    import re
    deadline = time.monotonic() + 30
    while len(re.findall(pattern, log_path.read_text())) < count:
        assert time.monotonic() < deadline, log_path.read_text()
        time.sleep(0.05)


def test_a_broken_key_file_survives_hup_and_restart_on_the_last_good_copy(config_dir,
                                                                         tmp_path):
    import signal
    from conftest import ANY_PORT, CLIENT_KEY, gateway_process
    path = config_dir / "gateway.keys"
    copy = last_good_copy(config_dir / "gateway.ini")
    serve = ["serve", "--config", str(config_dir / "gateway.ini"), "--bind",
             ANY_PORT]
    hand_added = "sk-gw-test-hand-added-0123456789abcdefghij"
    with gateway_process(serve, tmp_path / "first.log") as (process, url):
        added = run(config_dir, "add", "dave")  # a key made by the CLI...
        dave = added.stdout.splitlines()[-1]
        with open(path, "a") as file:  # ...and one added by hand, seen only by the workers
            file.write(key_line("erin", hand_added))
        for key in (CLIENT_KEY, dave, hand_added):
            assert _served(url, key) == 200
        assert "erin" in copy.read_text() and os.stat(copy).st_mode & 0o777 == 0o600
        with open(path, "a") as file:  # the 3 a.m. edit: a line no parser takes
            file.write("frank sha256:0123 * enabled\n")
        settings = {}  # the workers that deploy/gunicorn.conf.py starts here
        with open(os.path.join(ROOT, "deploy", "gunicorn.conf.py")) as file:
            exec(file.read(), settings)
        workers = settings["workers"]
        process.send_signal(signal.SIGHUP)
        _wait_for(tmp_path / "first.log", r"is broken; serving .*last-good", workers)
        for _ in range(6):  # every worker now booted on the broken file
            for key in (CLIENT_KEY, dave, hand_added):
                assert _served(url, key) == 200
        assert process.poll() is None
    # A full restart with the file still broken: it starts, loudly, and serves the same keys.
    with gateway_process(serve, tmp_path / "second.log") as (process, url):
        log = (tmp_path / "second.log").read_text()
        assert "WARNING: key file %s: line 6" % path in log
        assert "starting anyway: the workers serve %s" % copy in log
        for key in (CLIENT_KEY, dave, hand_added):
            assert _served(url, key) == 200
    check = subprocess.run([sys.executable, os.path.join(ROOT, "gateway"), "check", "--config",
                            str(config_dir / "gateway.ini")], capture_output=True, text=True,
                           timeout=30)
    assert check.returncode == 1 and "meanwhile the workers serve" in check.stdout


def test_serve_refuses_a_broken_key_file_when_there_is_no_last_good_copy(config_dir):
    (config_dir / "gateway.keys").write_text("frank sha256:0123 * enabled\n")
    result = subprocess.run([sys.executable, os.path.join(ROOT, "gateway"), "serve",
                             "--config", str(config_dir / "gateway.ini")],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 1 and "line 1: a sha256 digest" in result.stdout


def test_the_last_good_copy_only_moves_forward(tmp_path):
    source = tmp_path / "gateway.keys"
    source.write_text(key_line("alice", "sk-a"))
    copy = gateway.LastGoodCopy(str(tmp_path / "gateway.keys.last-good"), str(source))
    current = os.stat(source).st_ctime_ns
    copy.save(key_line("alice", "sk-a") + key_line("bob", "sk-b"), current)
    # A worker that loaded an older version a moment late must not overwrite the newer one...
    source.write_text("broken\n")
    copy.save(key_line("alice", "sk-a"), current - 1)
    store, _ = copy.load(gateway.parse_key_file)
    assert [e.name for e in store.entries] == ["alice", "bob"]
    # ...but the version the file holds right now always wins (even with the clock set back).
    source.write_text(key_line("carol", "sk-c"))
    copy.save(key_line("carol", "sk-c"), os.stat(source).st_ctime_ns)
    assert [e.name for e in copy.load(gateway.parse_key_file)[0].entries] == ["carol"]
    # A copy names its file: another key file's copy is never served.
    other = gateway.LastGoodCopy(copy.path, str(tmp_path / "other.keys"))
    with pytest.raises(ValueError, match="not a copy of"):
        other.load(gateway.parse_key_file)


def _instance(directory, state_dir, name, key):
    """A gateway config in ``directory`` whose key file holds ``name``, state in state_dir."""
    directory.mkdir()
    (directory / "gateway.keys").write_text(key_line(name, key))
    (directory / "gateway.ini").write_text("[gateway]\nstate_file = %s\n"
                                           % (state_dir / "gateway.state"))
    return gateway.Config.from_file(str(directory / "gateway.ini"))


def test_two_gateways_sharing_a_state_directory_keep_their_own_copies(tmp_path):
    """/etc/gw-a/gateway.keys and /etc/gw-b/gateway.keys, both with state in one directory:
    each keeps its own last good copy, and a worker booting on a broken key file serves
    its own instance's keys (one shared name: the other's copy, 'not a copy of', no keys)."""
    state = tmp_path / "state"
    state.mkdir()
    a = _instance(tmp_path / "gw-a", state, "alice", "sk-alice")
    b = _instance(tmp_path / "gw-b", state, "bob", "sk-bob")
    gateway.make_app(a)  # each saves its copy as it loads its key file
    gateway.make_app(b)
    for config, name, key in ((a, "alice", "sk-alice"), (b, "bob", "sk-bob")):
        with open(config.keys_path, "w") as file:
            file.write("broken\n")
        served = gateway.make_app(config).keys.get().find(key)
        assert served is not None and served.name == name, "%s serves no key" % config.keys_path


def test_a_copy_under_the_name_before_the_tag_is_still_served(config_dir, caplog):
    """An upgrade: the copy an older release saved as gateway.keys.last-good is served while
    there is no tagged one, if it is a copy of this key file."""
    from conftest import CLIENT_KEY
    config = gateway.Config.from_file(str(config_dir / "gateway.ini"))
    old = config_dir / "gateway.keys.last-good"
    text = (config_dir / "gateway.keys").read_text()
    old.write_text(gateway.LastGoodCopy.HEADER % (config.keys_path, 1) + text)
    (config_dir / "gateway.keys").write_text("broken\n")
    assert gateway.make_app(config).keys.get().find(CLIENT_KEY).name == "alice"
    assert "is broken; serving %s" % old in caplog.text
    assert not last_good_copy(config_dir / "gateway.ini").exists()
    old.write_text(gateway.LastGoodCopy.HEADER % ("/etc/gw-b/gateway.keys", 1) + text)
    assert gateway.make_app(config).keys.get().find(CLIENT_KEY) is None  # another file's
    (config_dir / "gateway.keys").write_text(text)  # fixed: saved under the tagged name
    gateway.make_app(config)
    assert last_good_copy(config_dir / "gateway.ini").read_text().endswith(text)


def test_a_worker_booting_on_a_broken_file_uses_the_copy_and_says_so(config_dir, caplog):
    config = gateway.Config.from_file(str(config_dir / "gateway.ini"))
    gateway.make_app(config)  # loads the key file, so saves its copy
    (config_dir / "gateway.keys").write_text("alice sha256:0123 * enabled\n")
    app = gateway.make_app(config)
    from conftest import CLIENT_KEY
    assert app.keys.get().find(CLIENT_KEY).name == "alice"
    assert "is broken; serving %s" % last_good_copy(config_dir / "gateway.ini") in caplog.text
    os.unlink(config_dir / "gateway.keys")  # missing at boot: the same
    assert gateway.make_app(config).keys.get().find(CLIENT_KEY).name == "alice"


def test_an_edit_never_starts_over_from_a_missing_or_empty_file_the_workers_fall_back_from(
        config_dir):
    """Workers serve the last good copy while the file is missing or empty: 'keys add' must
    not write a file holding only the new key, which they would load, refusing every other."""
    from conftest import CLIENT_KEY
    config = gateway.Config.from_file(str(config_dir / "gateway.ini"))
    gateway.make_app(config)  # a worker loads the file: its last good copy is saved
    path, copy = config_dir / "gateway.keys", last_good_copy(config_dir / "gateway.ini")
    for breakage in (lambda: path.write_text(""), path.unlink):
        breakage()
        before = path.read_bytes() if path.exists() else None
        result = run(config_dir, "add", "dave")
        assert result.returncode == 1, result.stdout
        assert "missing or empty, but the workers serve 3 key(s) from its last good copy " \
            "%s; nothing was changed" % copy in result.stderr
        assert (path.read_bytes() if path.exists() else None) == before
        listed = run(config_dir, "list")
        assert "warning: key file %s is missing or empty: the workers serve %s, the last " \
            "version that parsed (3 key(s)" % (path, copy) in listed.stderr
        assert gateway.make_app(config).keys.get().find(CLIENT_KEY).name == "alice"
    subprocess.run("tail -n +2 %s > %s" % (copy, path), shell=True, check=True)  # as it says
    assert run(config_dir, "add", "dave").returncode == 0
    assert [e.name for e in parsed(config_dir).entries] == ["alice", "bob", "carol", "dave"]
    path.unlink()
    copy.unlink()  # starting over on purpose
    assert run(config_dir, "add", "dave").returncode == 0
    assert [e.name for e in parsed(config_dir).entries] == ["dave"]


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to make files another user owns")
def test_lock_files_root_made_do_not_lock_the_service_user_out():
    """'gateway check' or 'gateway keys' run once as root leaves root's lock files behind; the
    service user must still edit keys and save the last good copy. (In process, with the
    effective uid switched: the interpreter may live where another user cannot run it.)"""
    import pathlib
    import shutil
    import tempfile
    directory = pathlib.Path(tempfile.mkdtemp(prefix="gateway-owner-"))  # pytest's is 0700
    try:
        _as_the_service_user(directory, 65534)
    finally:
        shutil.rmtree(directory)


def _as_the_service_user(directory, nobody):
    (directory / "gateway.ini").write_text("[gateway]\n")
    (directory / "gateway.keys").write_text(key_line("alice", "sk-a"))
    for path in (directory, directory / "gateway.ini", directory / "gateway.keys"):
        os.chown(path, nobody, nobody)
    copy = last_good_copy(directory / "gateway.ini")
    for lock in (directory / "gateway.keys.lock", copy.with_name(copy.name + ".lock")):
        lock.write_text("")  # root's, mode 0644
    os.chmod(directory, 0o755)
    config = gateway.Config.from_file(str(directory / "gateway.ini"))

    def add(name):
        gateway.edit_key_file(config, lambda store: store.replace(
            name, digest=gateway.digest_key("sk-" + name)))
    os.setegid(nobody)
    os.seteuid(nobody)
    try:
        add("dave")
    finally:
        os.seteuid(0)
        os.setegid(0)
    assert "dave" in copy.read_text() and os.stat(copy).st_uid == nobody
    add("erin")  # as root: what it writes goes to the key file's owner, not to root
    for path in (directory / "gateway.keys", copy):
        assert os.stat(path).st_uid == nobody and os.stat(path).st_mode & 0o777 == 0o600
    assert "erin" in copy.read_text()


def test_bytes_that_are_not_utf8_are_named_by_line(config_dir):
    path = config_dir / "gateway.keys"
    path.write_bytes(path.read_bytes() + b"# caf\xe9 (latin-1)\n")
    result = run(config_dir, "list")
    assert result.returncode == 1
    assert "line 4: not UTF-8 (byte 0xe9)" in result.stderr and "position" not in result.stderr
    with pytest.raises(ValueError, match=r"line 4: not UTF-8"):
        gateway.read_parsed(str(path), gateway.parse_key_file)  # what a worker logs
