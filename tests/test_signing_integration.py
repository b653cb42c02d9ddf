"""ENUM, ALIASES, CHAIN and SIGN against a real ``twistd foxyproxy``
process with emulated PIV and OpenPGP cards; every signature is checked
with ``cryptography`` against the CHAIN leaf, and the chain against the
test PKI."""

import base64
import hashlib
import os
import subprocess

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, utils

from support import TWISTD

from cloudfoxy_proxy.cards.pki import get_pki

HASH = {20: hashes.SHA1(), 32: hashes.SHA256(), 48: hashes.SHA384(), 64: hashes.SHA512()}
ALIASES = ["P PIV 00 Signing", "P PIV 00 Authentication", "P PIV 01 Signing", "P PIV 01 Authentication",
           "G OpenPGP 00 Signing", "G OpenPGP 01 Signing"]
PINS = {"P": "123456", "G": "24681357"}


def b64list(text):
    return [base64.b64decode(x).decode() for x in text.split("|")] if text else []


def verify(cert, digest, signature):
    key = cert.public_key()
    algorithm = utils.Prehashed(HASH[len(digest)])
    if isinstance(key, ec.EllipticCurvePublicKey):
        key.verify(signature, digest, ec.ECDSA(algorithm))
    else:
        key.verify(signature, digest, padding.PKCS1v15(), algorithm)


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    directory = str(tmp_path_factory.mktemp("pki"))
    get_pki(directory)  # root and issuing CA (and ca.pem); the proxy adds the card keys
    return directory


@pytest.fixture
def signing_proxy(proxy_factory, keys):
    return proxy_factory(
        "--backend", f"emulated:?type=piv&cards=2&prefix=P&keys={keys}",
        "--backend", f"emulated:?type=openpgp&cards=2&prefix=G&keys={keys}&pin={PINS['G']}",
        "--backend", "emulated:?cards=1&prefix=I",
        "--ca-certs", os.path.join(keys, "ca.pem"))


def test_aliases_enum_chain_sign(signing_proxy, keys):
    pki = get_pki(keys)
    with signing_proxy.client() as c:
        aliases, enum, readers = c.results(">*|\n>1:ALIASES|\n>2:ENUM|\n>3:READERS|\n\n")
        assert b64list(aliases) == ALIASES
        assert b64list(enum) == ["P 00", "P 01", "G 00", "G 01"]
        assert b64list(readers) == ["P 00", "P 01", "G 00", "G 01", "I 00"]
        for alias in ALIASES:
            [chain] = c.results(f">{alias}|\n>1:CHAIN|\n\n")
            certs = [x509.load_der_x509_certificate(base64.b64decode(x)) for x in chain.split(":")]
            assert certs[0].subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value == alias
            assert certs[1:] == [pki.issuer.cert, pki.root.cert]
            for child, parent in zip(certs, certs[1:]):
                child.verify_directly_issued_by(parent)
            pin = PINS[alias[0]]
            for digest in (hashlib.sha1(b"a").digest(), hashlib.sha256(b"b").digest(),
                           hashlib.sha384(b"c").digest(), hashlib.sha512(b"d").digest()):
                [signature] = c.results(f">{alias}:{pin}|\n>1:SIGN:{digest.hex()}|\n\n")
                verify(certs[0], digest, bytes.fromhex(signature))


def test_errors(signing_proxy):
    digest = hashlib.sha256(b"x").digest().hex()
    with signing_proxy.client() as c:
        assert c.results(f">P PIV 01 Signing:000000|\n>1:SIGN:{digest}|\n\n") == ["C085"]
        assert c.results(f">P PIV 01 Signing:000000|\n>1:SIGN:{digest}|\n\n") == ["C085"]  # not presented
        # the card counted one wrong PIN only: 2 tries left
        assert c.results(">P 01|\n>1:APDU:00A4040C05A000000308|\n>2:APDU:00200080|\n\n") == ["9000", "63C2"]
        assert c.results(f">G OpenPGP 00 Signing:123456|\n>1:SIGN:{digest}|\n\n") == ["C085"]  # its PIN is another
        assert c.results(f">Nobody:123456|\n>1:SIGN:{digest}|\n>2:CHAIN|\n\n") == ["C083", "C083"]
        assert c.results(f">P PIV 01 Signing:123456|\n>1:SIGN:ABC|\n>2:SIGN:{digest[:-2]}|\n\n") == ["C084", "C084"]
        assert c.results(f">I 00:123456|\n>1:SIGN:{digest}|\n\n") == ["C081"]
        [ok] = c.results(f">P PIV 01 Signing:123456|\n>1:SIGN:{digest}|\n\n")
        assert len(ok) > 100
    log = signing_proxy.log()
    assert "000000" not in log and "123456" not in log and PINS["G"] not in log


def test_ambiguous_alias(proxy_factory, keys):
    proxy = proxy_factory(
        "--backend", f"emulated:?type=piv&cards=2&prefix=P&keys={keys}",
        "--backend", f"emulated:?type=piv&cards=1&prefix=P&keys={keys}")
    digest = hashlib.sha256(b"x").digest().hex()
    with proxy.client() as c:
        assert b64list(c.results(">*|\n>1:ENUM|\n\n")[0]) == ["P 00", "P 01", "P 00 (2)"]
        assert c.results(f">P PIV 00 Signing:123456|\n>1:SIGN:{digest}|\n>2:CHAIN|\n\n") == ["C082", "C082"]
        assert len(c.results(f">P PIV 01 Signing:123456|\n>1:SIGN:{digest}|\n\n")[0]) > 100


@pytest.mark.parametrize("args, message", [
    (["--ca-certs", "/nonexistent/ca.pem"], "--ca-certs"),
    (["--backend", "emulated:?type=piv&pin=123"], "pin="),
    (["--backend", "emulated:?type=iso7816&pin=123456"], "pin="),
])
def test_bad_options_stop_startup_with_one_line(args, message, tmp_path):
    proc = subprocess.run([TWISTD, "-n", "--pidfile=", "--logfile", str(tmp_path / "log"), "foxyproxy", "-p",
                           "tcp:0:interface=127.0.0.1"] + args, capture_output=True, text=True, timeout=60,
                          cwd=str(tmp_path))
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr
