"""Certificates probed once, at the owner (docs/tcp.md "Certificates at the
owner"), between real ``twistd foxyproxy`` processes: an owner with emulated
PIV, OpenPGP and plain cards; a front (``tcp://`` to it) answers ENUM,
ALIASES and CHAIN from the owner's index and sends SIGN to the owner, and
its start costs the owner no card command."""

import base64
import hashlib
import os
import re
import time
import urllib.request

import pytest
from cryptography import x509

from support import HOST
from test_signing_integration import ALIASES, PINS, b64list, keys, verify  # noqa: F401 (keys: fixture)

from cloudfoxy_proxy.cards.pki import get_pki

pytestmark = pytest.mark.integration


def card_commands(proxy):
    """The owner's card commands so far (APDU, RESET, SIGN), by kind (its /metrics)."""
    [port] = proxy.ports["StatusSite"]
    text = urllib.request.urlopen(f"http://{HOST}:{port}/metrics", timeout=10).read().decode()
    counts = {}
    for kind, value in re.findall(r'foxyproxy_reader_commands_total\{[^}]*kind="(\w+)"[^}]*\} (\S+)', text):
        if kind in ("APDU", "RESET", "SIGN"):
            counts[kind] = counts.get(kind, 0) + int(float(value))
    return counts


def results(proxy, text):
    with proxy.client(timeout=60) as c:
        return c.results(text)


def test_front_answers_from_the_owners_index(proxy_factory, keys):  # noqa: F811
    pki = get_pki(keys)
    owner = proxy_factory(
        "--owner-id", "rack1", "--metrics", f"tcp:0:interface={HOST}",
        "--backend", f"emulated:?type=piv&cards=2&prefix=P&keys={keys}",
        "--backend", f"emulated:?type=openpgp&cards=2&prefix=G&keys={keys}&pin={PINS['G']}",
        "--backend", "emulated:?cards=1&prefix=I",
        "--ca-certs", os.path.join(keys, "ca.pem"), listeners=2)
    assert b64list(results(owner, ">*|\n>1:ALIASES|\n\n")[0]) == ALIASES  # the owner probed its cards
    before = card_commands(owner)
    front = proxy_factory("--backend", f"tcp://{HOST}:{owner.port}")
    deadline = time.monotonic() + 20
    while len(b64list(results(front, ">*|\n>1:READERS|\n\n")[0])) < 5:
        assert time.monotonic() < deadline, front.log()
        time.sleep(0.1)
    time.sleep(1.0)  # what the front does once its readers arrived
    assert card_commands(owner) == before  # the front's start ran no card command at the owner

    aliases, enum = results(front, ">*|\n>1:ALIASES|\n>2:ENUM|\n\n")
    assert b64list(aliases) == ALIASES
    assert b64list(enum) == ["rack1/P 00", "rack1/P 01", "rack1/G 00", "rack1/G 01"]
    assert b64list(results(front, ">*|\n>1:ENUM:2|\n\n")[0]) == ["rack1/P 00", "rack1/P 01"]
    for alias in ALIASES:
        [chain] = results(front, f">{alias}|\n>1:CHAIN|\n\n")
        assert [chain] == results(owner, f">{alias}|\n>1:CHAIN|\n\n")
        certs = [x509.load_der_x509_certificate(base64.b64decode(x)) for x in chain.split(":")]
        assert certs[1:] == [pki.issuer.cert, pki.root.cert]
        digest = hashlib.sha256(alias.encode()).digest()
        [signature] = results(front, f">{alias}:{PINS[alias[0]]}|\n>1:SIGN:{digest.hex()}|\n\n")
        verify(certs[0], digest, bytes.fromhex(signature))
    # a reader name of the front selects the card's first certificate, at the owner too
    [chain] = results(front, ">rack1/P 01|\n>1:CHAIN|\n\n")
    assert [chain] == results(owner, ">P PIV 01 Signing|\n>1:CHAIN|\n\n")
    digest = hashlib.sha1(b"x").digest()
    [signature] = results(front, f">rack1/P 01:{PINS['P']}|\n>1:SIGN:{digest.hex()}|\n\n")
    verify(x509.load_der_x509_certificate(base64.b64decode(chain.split(":")[0])), digest, bytes.fromhex(signature))
    # errors: the owner's own answers
    assert results(front, f">G OpenPGP 00 Signing:000000|\n>1:SIGN:{digest.hex()}|\n\n") == ["C085"]
    assert results(front, f">G OpenPGP 00 Signing:{PINS['G']}|\n>1:SIGN:abc|\n\n") == ["C084"]
    assert results(front, ">no such alias|\n>1:CHAIN|\n\n") == ["C083"]
    assert results(front, f">rack1/I 00:1234|\n>1:SIGN:{digest.hex()}|\n\n") == ["C081"]  # no certificate
    after = card_commands(owner)
    assert {k: after.get(k, 0) - before.get(k, 0) for k in ("APDU", "RESET")} == {"APDU": 0, "RESET": 0}
    assert after.get("SIGN", 0) - before.get("SIGN", 0) == len(ALIASES) + 3  # + P 01, wrong PIN, no cert
    assert "probing" not in front.log()
