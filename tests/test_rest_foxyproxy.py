"""Compatibility with the original FoxyProxy 2.10.0 (PyPI ``foxyproxy``):
started as ``foxyproxy -p PORT -s http://127.0.0.1:REST_PORT -t TOKEN``
against our proxy A's REST front end, it must list A's emulated cards and
get correct APDU answers, through foxyproxy's own line-protocol port.

foxyproxy 2.10 lives in its own virtualenv (``.venv-foxyproxy`` at the top
of the repository, created here when missing: on Python 3.11 it needs
``cryptography==3.3.2`` to import).  Facts about foxyproxy 2.10 these tests
rely on (read from its source): ``-p`` is its TCP port (it binds all
interfaces), ``-s`` the CloudFoxy URL, ``-t`` the X-Auth-Token; it also
starts a Flask/waitress REST API on the fixed port 4443 (a failure to bind
it is only logged); it answers one request per connection and closes it;
READERS lists at most 2 readers (its ``max_enum_readers`` default); it
names a CloudFoxy card ``/X`` as ``Foxy USB /X`` (``Foxy NET IP-id`` for
``/IP@id``); an unknown reader gets a bare ``C083`` and the connection
closed.
"""

import base64
import re

import pytest
from support import FoxyProxy

TOKEN = "foxyproxy-compat-token"
ATR = "3B8B8001466F7879456D753738313677"
@pytest.fixture
def foxyproxy_against_a(proxy_factory, tmp_path):
    a = proxy_factory("--rest", "tcp:0:interface=127.0.0.1", listeners=2,
                      env={"FOXYPROXY_REST_TOKEN": TOKEN})
    fp = FoxyProxy(f"http://127.0.0.1:{a.ports['Site'][0]}", TOKEN, str(tmp_path))
    try:
        fp.wait_ready()
        yield a, fp
    finally:
        fp.stop()


def test_foxyproxy_210_lists_cards_and_runs_apdus(foxyproxy_against_a):
    a, fp = foxyproxy_against_a
    out = fp.output()
    for i in range(4):
        assert f"Found a new chip '/Emulated_0{i} {ATR}'" in out
    assert "4 chips in total" in out

    listing = fp.request(">*|\n>1:READERS|\n\n")
    assert [base64.b64decode(n).decode() for n in listing[0][1].split("|")] == [
        "Foxy USB /Emulated_00", "Foxy USB /Emulated_01"]  # foxyproxy lists at most 2

    for i in range(4):
        name = f"Foxy USB /Emulated_0{i}"
        assert fp.request(f">{name}|\n>1:RESET|\n\n") == [("1", ATR)]
        assert fp.request(f">{name}|\n>2:APDU:00A4000C023F00|\n\n") == [("2", "9000")]
        challenge = fp.request(f">{name}|\n>3:APDU:0084000008|\n\n")
        assert challenge[0][0] == "3" and re.fullmatch(r"[0-9A-F]{16}9000", challenge[0][1]), challenge
    b64 = base64.b64encode(b"Foxy USB /Emulated_02").decode()
    assert fp.request(f">{b64}|\n>4:APDU:00A4000C023F00|\n\n") == [("4", "9000")]
    assert fp.request(">/Emulated_03|\n>5:APDU:00 A4 00 0C 02 3F 00|\n\n") == [("5", "9000")]
    assert fp.raw(">Foxy USB /Emulated_09|\n>6:APDU:00A4000C023F00|\n\n") == "C083"
