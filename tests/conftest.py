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
