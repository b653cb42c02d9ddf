"""Small command-line edges: --version, a clean --help, a single-valued
option given twice."""

import re
import subprocess

import pytest
from twisted import copyright
from twisted.python import usage

import cloudfoxy_proxy
from cloudfoxy_proxy import tap
from support import TWISTD

SINGLE = [p[0] for p in tap.Options.optParameters]


@pytest.mark.parametrize("name", SINGLE)
def test_a_single_valued_option_given_twice_is_an_error_naming_it(name):
    with pytest.raises(usage.UsageError) as e:
        tap.Options().parseOptions([f"--{name}=a", f"--{name}", "b"])
    assert str(e.value) == f"--{name} is given twice; it takes one value"


def test_repeatable_options_stay_repeatable():
    o = tap.Options()
    o.parseOptions(["--no-signing", "--backend", "emulated:?cards=1", "--backend", "emulated:?cards=2&prefix=B",
                    "--listen", "tcp:0:interface=127.0.0.1", "--listen", "tcp:0:interface=127.0.0.1"])
    assert o["backend"] == ["emulated:?cards=1", "emulated:?cards=2&prefix=B"] and len(o["listen"]) == 2


@pytest.mark.integration
def test_twistd_duplicate_short_and_long_option_one_line():
    r = subprocess.run([TWISTD, "-n", "--pidfile=", "foxyproxy", "-p", "tcp:0", "--port=tcp:1"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1
    assert r.stderr.splitlines() == ["twistd foxyproxy: --port is given twice; it takes one value"]
    r = subprocess.run([TWISTD, "-n", "--pidfile=", "foxyproxy", "--ram", "tcp:0", "--ram", "tcp:1"],
                       capture_output=True, text=True, timeout=60)
    assert r.stderr.splitlines() == ["twistd foxyproxy: --ram is given twice; it takes one value"]


@pytest.mark.integration
def test_version_shows_ours_and_twisteds():
    r = subprocess.run([TWISTD, "foxyproxy", "--version"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0
    assert re.fullmatch(rf"cloudfoxy-proxy {re.escape(cloudfoxy_proxy.__version__)} "
                        rf"\(Twisted {re.escape(copyright.version)}, \w+ [0-9.]+\)\n", r.stdout), r.stdout


@pytest.mark.integration
def test_help_is_clean():
    r = subprocess.run([TWISTD, "foxyproxy", "--help"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0
    text = r.stdout
    # descriptions start in column 36; no runs of spaces inside one
    described = [line[35:] for line in text.splitlines() if line.startswith("  ") and len(line) > 35]
    assert described and not [d for d in described if re.search(r"\S {2,}\S", d)]
    assert "--backend" in text and "--version" in text
    assert "See docs/ for" not in text and "source repository" in text


def test_default_start_line_is_calm_information_without_endpoint_internals():
    from twisted.logger import LogLevel, formatEvent, globalLogPublisher

    from cloudfoxy_proxy.access import Access

    o = tap.Options()
    o.parseOptions(["--no-signing"])
    events = []
    globalLogPublisher.addObserver(events.append)
    try:
        tap.warn_open_listeners([(o["endpoints"][0], "--port", "line")], Access())
        tap.warn_open_listeners([(o["endpoints"][0], "--port", "line")], Access(allow_anonymous=True))
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert o["endpoints"] == ["tcp:4001:backlog=1024"]  # what Twisted is given
    mine = [e for e in events if e.get("log_namespace") == "cloudfoxy_proxy.access"]
    assert [e["log_level"] for e in mine] == [LogLevel.info, LogLevel.warn]
    calm = formatEvent(mine[0])
    assert calm == ("listener tcp:4001 (--port) is reachable from outside loopback with no authentication, "
                    "so it serves loopback clients only (protected mode); to serve other machines give "
                    "--credentials FILE (docs/security.md) or --allow-anonymous")
    assert "backlog" not in formatEvent(mine[1]) and "NO authentication" in formatEvent(mine[1])
