"""I.CA and PostSignum cards through the other backends, on real
processes: proxy A holds the emulated cards; proxy B reaches them over
the TCP line protocol (``tcp://A``) or through a real pcscd (A bridges the
card into vpcd, B uses ``pcsc:``), and answers ALIASES, CHAIN and SIGN.
(The REST backend: tests/test_signing_foxyproxy.py.)"""

import base64
import hashlib
import time

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, utils

from support import ProxyProcess
from test_signing_pcsc import SLOT, keys, slot  # noqa: F401 (fixtures)

PIN = "123456"


def b64list(text):
    return [base64.b64decode(x).decode() for x in text.split("|")] if text else []


def one(proxy, reader, command):
    with proxy.client(timeout=60) as c:
        [result] = c.results(f">{reader}|\n>1:{command}|\n\n")
    return result


def wait_alias(proxy, alias, timeout=60):
    deadline = time.monotonic() + timeout
    while alias not in b64list(one(proxy, "*", "ALIASES")):
        assert time.monotonic() < deadline, f"{alias} never listed"
        time.sleep(0.3)


def check_signing(proxy, alias, chain_length):
    chain = one(proxy, alias, "CHAIN").split(":")
    assert len(chain) == chain_length, chain
    leaf = x509.load_der_x509_certificate(base64.b64decode(chain[0]))
    assert leaf.subject.rfc4514_string().startswith(f"CN={alias},")
    for digest, algorithm in ((hashlib.sha1(b"x").digest(), hashes.SHA1()),
                              (hashlib.sha256(b"x").digest(), hashes.SHA256())):
        signature = bytes.fromhex(one(proxy, f"{alias}:{PIN}", f"SIGN:{digest.hex()}"))
        leaf.public_key().verify(signature, digest, padding.PKCS1v15(), utils.Prehashed(algorithm))
    assert one(proxy, f"{alias}:0000", f"SIGN:{'00' * 32}") == "C085"


def test_tcp_backend(proxy_factory):
    a = proxy_factory("--backend", "emulated:?type=ica&cards=1&prefix=C",
                      "--backend", "emulated:?type=postsignum&cards=1&prefix=S")
    b = proxy_factory("--backend", f"tcp://127.0.0.1:{a.port}")
    wait_alias(b, "C I.CA 00 Signing")
    wait_alias(b, "S PostSignum 00 Signing")
    check_signing(b, "C I.CA 00 Signing", 3)
    check_signing(b, "S PostSignum 00 Signing", 1)


def test_pcsc_backend(slot, keys):  # noqa: F811
    for kind, alias, chain_length in (("ica", "X I.CA 00 Signing", 3),
                                      ("postsignum", "X PostSignum 00 Signing", 1)):
        a = ProxyProcess("--backend", f"emulated:?type={kind}&cards=1&prefix=X&keys={keys}",
                         "--vpcd", f"127.0.0.1:{slot.port(SLOT)}=X 00").start()
        b = None
        try:
            slot.wait_card(SLOT, True, 15)
            b = ProxyProcess("--backend", "pcsc:").start()
            wait_alias(b, alias)
            check_signing(b, alias, chain_length)
        finally:
            if b is not None:
                b.stop()
            a.stop()
            slot.wait_card(SLOT, False, 15)
