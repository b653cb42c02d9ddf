"""OpenSC's own self-test (``pkcs11-tool --test``) on the emulated PIV and
OpenPGP cards, bridged into a real pcscd through vpcd (``--vpcd``): the
cards must pass it with no error, random numbers included, and each card
is its own PKCS#11 token (its token serial comes from the card's own
identifiers, pki.card_number).

GnuPG on the OpenPGP card (``gpg --card-status``, a signature by
scdaemon): tests/test_signing_pcsc.py.  The I.CA and PostSignum cards
have no OpenSC driver to test them with (docs/signing.md)."""

import re

import pytest

from cloudfoxy_proxy.cards.pki import card_number
from test_signing_pcsc import PKCS11, READER, bridged, keys, need, run, slot  # noqa: F401 (fixtures)

#: What OpenSC makes the token serial of: the last 8 bytes of the PIV
#: GUID; the OpenPGP AID's manufacturer and serial number.
EXPECTED_SERIAL = {
    "piv": card_number("piv", "X", 0, 16)[8:].hex(),
    "openpgp": "ffff" + card_number("openpgp", "X", 0, 4).hex(),
}


@pytest.mark.parametrize("kind", ["piv", "openpgp"])
def test_pkcs11_tool_self_test(bridged, kind):  # noqa: F811
    need("pkcs11-tool", PKCS11)
    proxy = bridged(kind)
    code, out, err = run("pkcs11-tool", "--module", PKCS11, "--slot-description", READER,
                         "--login", "--pin", "123456", "--test", timeout=300)
    assert code == 0 and "No errors" in out, out + err + proxy.log()[-3000:]
    assert re.search(r"C_GenerateRandom\(\):\s+seeding \(C_SeedRandom\) not supported\s+seems to be OK", out), out
    code, out, err = run("pkcs11-tool", "--module", PKCS11, "--list-token-slots")
    assert code == 0, out + err
    ours = [s for s in out.split("Slot ") if READER in s]  # OpenPGP: one slot per PIN
    serials = {m.lower() for s in ours for m in re.findall(r"serial num\s*:\s*(\S+)", s)}
    assert len(serials) == 1 and serials.pop().endswith(EXPECTED_SERIAL[kind]), out
