"""The README's session reproduces byte for byte against a real proxy, with
the real ``nc`` (netcat-openbsd, installed by tests/run.sh)."""

import os
import re
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def readme_session():
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        text = f.read()
    block = re.search(r"```console\n(.*?)```", text, re.S).group(1)
    steps = []
    for line in block.splitlines(keepends=True):
        if line.startswith("$ "):
            steps.append([line[2:].strip(), ""])
        else:
            steps[-1][1] += line
    return steps


def test_readme_session_byte_for_byte(proxy):
    steps = readme_session()
    assert len(steps) >= 3
    for command, expected in steps:
        assert command.endswith("| nc -N 127.0.0.1 4001")
        command = command.replace("127.0.0.1 4001", f"127.0.0.1 {proxy.port}")
        out = subprocess.run(["bash", "-c", command], capture_output=True, timeout=20)
        assert out.returncode == 0, out.stderr
        assert out.stdout.decode() == expected


def test_readme_has_exactly_two_setup_commands():
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        text = f.read()
    setup = text.split("## Set up", 1)[1].split("\n## ", 1)[0]
    commands = re.findall(r"```sh\n(.*?)```", setup, re.S)
    assert [c.strip() for c in commands] == [
        "python3 -m venv .venv && .venv/bin/pip install . && .venv/bin/twistd -n foxyproxy",
        "bash tests/run.sh",
    ]
    with open(os.path.join(ROOT, ".ci", "run"), encoding="utf-8") as f:
        assert "bash tests/run.sh" in f.read()


def test_readme_first_command_in_a_fresh_copy(tmp_path):
    """The first set-up command, verbatim, in a copy of the tree with no
    virtualenv: it installs, starts on port 4001, and serves READERS."""
    import shutil
    import signal
    import time

    setup = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read().split("## Set up", 1)[1]
    command = re.findall(r"```sh\n(.*?)```", setup, re.S)[0].strip()
    copy = tmp_path / "cloudfoxy-proxy"
    shutil.copytree(ROOT, copy, ignore=shutil.ignore_patterns(
        ".venv*", ".git", "build", "*.egg-info", "__pycache__", ".pytest_cache", ".tox"))
    log = open(tmp_path / "out.log", "wb")
    env = dict(os.environ)
    if os.environ.get("CLOUDFOXY_TEST_WHEELS"):  # offline: the install phase's wheels (tests/provision.py)
        env.update(PIP_NO_INDEX="1", PIP_FIND_LINKS=os.environ["CLOUDFOXY_TEST_WHEELS"])
    proc = subprocess.Popen(["bash", "-c", command], cwd=str(copy), env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        text = ""
        while time.monotonic() < deadline and "LineFactory starting on 4001" not in text:
            assert proc.poll() is None, (tmp_path / "out.log").read_text()
            time.sleep(0.5)
            text = (tmp_path / "out.log").read_text(errors="replace")
        assert "LineFactory starting on 4001" in text, text
        time.sleep(0.3)
        out = subprocess.run(["bash", "-c", r"printf '>*|\n>1:READERS|\n\n' | nc -N 127.0.0.1 4001"],
                             capture_output=True, timeout=20)
        assert out.stdout.decode() == (">1:RW11bGF0ZWQgMDA=|RW11bGF0ZWQgMDE=|RW11bGF0ZWQgMDI=|"
                                       "RW11bGF0ZWQgMDM=\n@@\n")
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(15)
        except ProcessLookupError:
            pass  # it ended by itself (the assertion above says why)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)
        log.close()


def docs_command_lines():
    """Every ``twistd -n`` command line in a code block of docs/*.md, as
    (file, line)."""
    import glob

    found = []
    for path in sorted(glob.glob(os.path.join(ROOT, "docs", "*.md"))):
        inside = False
        with open(path, encoding="utf-8") as f:
            for line in f:
                if line.startswith("```"):
                    inside = not inside
                elif inside and re.search(r"(^|[\s/])twistd -n\b", line):
                    found.append((os.path.basename(path), line.strip()))
    return found


def test_docs_commands_start_beside_a_running_proxy():
    """No docs command writes twistd.pid ("Another twistd server is
    running" beside the README's proxy); README says what to do about 4001."""
    lines = docs_command_lines()
    assert len(lines) >= 15
    assert [(f, line) for f, line in lines if "--pidfile=" not in line] == []
    readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    assert "give `--pidfile=`" in readme and "-p tcp:4011" in readme
