"""What a proxy started with the default options imports: the libraries and
modules of the features it does not use are not loaded (they cost memory:
bench/idle_rss.py), and one a client's request needs is loaded then.

A real ``twistd -n foxyproxy`` on loopback; a test-only ``sitecustomize``
(on PYTHONPATH) writes the names in ``sys.modules`` to a file on SIGUSR2,
which neither Twisted nor the proxy handles."""

import os
import signal
import textwrap
import time

import pytest

from support import ProxyProcess

SITECUSTOMIZE = textwrap.dedent("""
    import os, signal, sys

    def _dump(*_):
        path = os.environ["FOXYPROXY_TEST_MODULES"]
        with open(path + ".tmp", "w") as f:
            f.write("\\n".join(sorted(sys.modules)))
        os.replace(path + ".tmp", path)

    signal.signal(signal.SIGUSR2, _dump)
""")

#: Imported only by an option (or a request) the default configuration lacks.
NOT_BY_DEFAULT = [
    "re2",  # reader-line patterns
    "tomllib",  # --config, --credentials
    "autobahn", "txaio",  # --api WebSocket
    "treq", "twisted.web", "httptools",  # cloudfoxy+http backends, HTTP front ends
    "orjson", "ujson", "cbor2", "msgpack", "multipart",
    "prometheus_client",  # --metrics
    "dpkt",  # --trace FILE.pcapng
    "smartcard",  # pcsc: backends
    "cloudfoxy_proxy.trace", "cloudfoxy_proxy.audit", "cloudfoxy_proxy.metrics",
    "cloudfoxy_proxy.frontends.http", "cloudfoxy_proxy.frontends.rest", "cloudfoxy_proxy.frontends.api",
    "cloudfoxy_proxy.frontends.status", "cloudfoxy_proxy.frontends.ram", "cloudfoxy_proxy.frontends.vpcd",
    "cloudfoxy_proxy.backends.rest", "cloudfoxy_proxy.backends.pcsc", "cloudfoxy_proxy.backends.tcp",
]


def modules(proxy, path):
    """The module names of the running proxy, dumped on SIGUSR2."""
    if os.path.exists(path):
        os.unlink(path)
    os.kill(proxy.proc.pid, signal.SIGUSR2)
    deadline = time.monotonic() + 10
    while not os.path.exists(path):
        assert time.monotonic() < deadline, f"no module list written: {proxy.log()[-2000:]}"
        time.sleep(0.02)
    with open(path) as f:
        return set(f.read().split())


@pytest.mark.integration
def test_default_options_import_no_unused_feature(tmp_path):
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(SITECUSTOMIZE)
    dump = str(tmp_path / "modules.txt")
    env = {"PYTHONPATH": str(hook), "FOXYPROXY_TEST_MODULES": dump}
    proxy = ProxyProcess(env=env).start()
    try:
        with proxy.client() as c:
            assert c.results(">Emulated 00|\n>1:APDU:00A4000C023F00|\n\n") == ["9000"]
        loaded = modules(proxy, dump)
        # the dump is of the proxy: what the default configuration does use is there
        assert {"cloudfoxy_proxy.frontends.line", "cloudfoxy_proxy.backends.emulated",
                "cloudfoxy_proxy.signing.index", "twisted.internet.epollreactor"} <= loaded
        assert sorted(m for m in NOT_BY_DEFAULT if m in loaded) == []
        # a reader line that is a pattern (no reader's name holds it literally) loads RE2, and works
        with proxy.client() as c:
            assert c.results(">emulated 0[0]$|\n>1:APDU:00A4000C023F00|\n\n") == ["9000"]
        assert "re2" in modules(proxy, dump)
    finally:
        proxy.stop()
