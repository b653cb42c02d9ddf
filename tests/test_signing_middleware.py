"""OpenSC's own self-test (``pkcs11-tool --test``) on the emulated PIV and
OpenPGP cards, bridged into a real pcscd through vpcd (``--vpcd``): the
cards must pass it with no error, random numbers included, and each card
must be its own PKCS#11 token (its own serial number).

GnuPG on the OpenPGP card (``gpg --card-status``, a signature by
scdaemon): tests/test_signing_pcsc.py.  The I.CA and PostSignum cards
have no OpenSC driver to test them with (docs/signing.md)."""

import re

import pytest

from test_signing_pcsc import PKCS11, READER, bridged, keys, need, run, slot  # noqa: F401 (fixtures)


def token_serial(out):
    match = re.search(r"serial num\s*:\s*(\S+)", out)
    assert match, out
    return match.group(1)


@pytest.mark.parametrize("kind", ["piv", "openpgp"])
def test_pkcs11_tool_self_test(bridged, kind):  # noqa: F811
    need("pkcs11-tool", PKCS11)
    proxy = bridged(kind)
    code, out, err = run("pkcs11-tool", "--module", PKCS11, "--slot-description", READER,
                         "--login", "--pin", "123456", "--test", timeout=300)
    assert code == 0 and "No errors" in out, out + err + proxy.log()[-3000:]
    assert re.search(r"C_GenerateRandom\(buf, \d+\) seems to work", out) or "random" in out.lower(), out
