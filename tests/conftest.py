import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

import pytest  # noqa: E402

from support import ProxyProcess  # noqa: E402


@pytest.fixture
def proxy_factory():
    """Start ``twistd foxyproxy`` processes; all are stopped after the test."""
    started = []

    def start(*args, **kw):
        p = ProxyProcess(*args, **kw).start()
        started.append(p)
        return p

    yield start
    for p in started:
        p.stop()


@pytest.fixture
def proxy(proxy_factory):
    """One proxy on the default emulated backend."""
    return proxy_factory()


@pytest.fixture(scope="session")
def pcsc_rig(tmp_path_factory):
    """A running pcscd with vsmartcard's vpcd readers "Virtual PCD 00 00" and
    "Virtual PCD 00 01", and no cards; installs what it needs (as root)."""
    import pcsc_rig as rigmod

    rigmod.ensure_packages()
    rig = rigmod.PcscRig(log_dir=str(tmp_path_factory.mktemp("pcsc-rig")))
    try:
        rig.start()
        yield rig
    finally:
        rig.stop()


@pytest.fixture
def card0(pcsc_rig):
    """``pcsc_rig`` with a vicc iso7816 card present in slot 0."""
    rig = pcsc_rig
    if rig.pcscd is None or rig.pcscd.poll() is not None:
        rig.start()
    if 0 in rig.frozen:
        rig.thaw_card(0)
    if rig.card_pid(0) is None or rig.cards[0].poll() is not None:
        rig.stop_card(0, wait_absent=False)
        rig.start_card(0)
    return rig


def pytest_configure(config):
    """Reserve vpcd's ports before any test opens a client socket, so no
    socket of an earlier test can hold one when the PC/SC rig starts."""
    import pcsc_rig as rigmod

    rigmod.reserve_vpcd_ports()


#: Fixtures that start real processes (a proxy, pcscd and virtual cards).
PROCESS_FIXTURES = {"proxy", "proxy_factory", "pcsc_rig", "card0"}
#: Modules whose every test runs real processes or tools.
INTEGRATION_MODULES = {
    "test_bench_smoke", "test_packaging", "test_pcsc_rig", "test_readme", "test_rest_foxyproxy",
    "test_signing_pcsc",
}


def pytest_collection_modifyitems(config, items):
    """Mark tests that run real processes ``integration``, so that
    ``pytest -m "not integration"`` runs the in-memory suite in seconds:
    every test using a process fixture, every test of a ``*_integration``
    module or of INTEGRATION_MODULES, and tests marked by hand."""
    for item in items:
        module = item.module.__name__.rsplit(".", 1)[-1]
        if (module.endswith("_integration") or module in INTEGRATION_MODULES
                or PROCESS_FIXTURES.intersection(getattr(item, "fixturenames", ()))):
            item.add_marker(pytest.mark.integration)
