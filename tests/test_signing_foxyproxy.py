"""The signing commands next to the original FoxyProxy 2.10 on the same
emulated cards.

Proxy A serves emulated I.CA, PostSignum and OpenPGP cards over its REST
front end.  FoxyProxy 2.10 runs ``foxyproxy -s http://A -c PROFILE`` (its
own profile code driving our cards over CloudFoxy REST); our proxy B runs
``--backend cloudfoxy+http://A`` (the same topology).  One line-protocol
client sends ALIASES, ENUM, CHAIN and SIGN to both.

Facts about FoxyProxy 2.10 these tests rely on (read from its source, and
seen here): its ALIASES entry is the certificate subject written as sorted
``oidName: value`` pairs (``commonName: X, organizationName: Y``), and a
reader line may give any part of it; its ENUM lists at most one reader
(``Foxy USB /NAME``); its ``postsignum`` and ``pgp`` profiles keep the ATR
that CloudFoxy's inventory puts after the reader name and send it back as
part of ``terminal=``, so they never reach a card.  docs/signing.md lists
everything found.
"""

import base64
import hashlib
import os
import subprocess

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, utils

from support import FOXYPROXY_VENV, FoxyProxy, foxyproxy_venv, wait_for

TOKEN = "foxyproxy-signing-token"
PIN = "123456"
HASHES = {20: hashes.SHA1(), 32: hashes.SHA256(), 48: hashes.SHA384(), 64: hashes.SHA512()}


def b64list(text):
    return [base64.b64decode(x).decode() for x in text.split("|")] if text else []


def verify(chain_text, digest, signature_hex):
    leaf = x509.load_der_x509_certificate(base64.b64decode(chain_text.split(":")[0]))
    leaf.public_key().verify(bytes.fromhex(signature_hex), digest, padding.PKCS1v15(),
                             utils.Prehashed(HASHES[len(digest)]))


def one(proxy, reader, command):
    with proxy.client() as c:
        [result] = c.results(f">{reader}|\n>1:{command}|\n\n")
    return result


def start_pair(proxy_factory, tmp_path, backend):
    """A (REST front end, ``backend`` cards) and B (``cloudfoxy+http://A``)."""
    a = proxy_factory("--rest", "tcp:0:interface=127.0.0.1", "--backend", backend, listeners=2,
                      env={"FOXYPROXY_REST_TOKEN": TOKEN})
    url = f"http://127.0.0.1:{a.ports['Site'][0]}"
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    b = proxy_factory("--backend", f"cloudfoxy+{url}?token_file={token_file}")
    return a, b, url


def pin_tries(a, reader, *path):
    """The card's retry counter, from VERIFY without data through A."""
    lines = "".join(f">{i}:APDU:{apdu}|\n" for i, apdu in enumerate(path, 1))
    with a.client() as c:
        results = c.results(f">{reader}|\n{lines}\n")
    assert results[-1][:3] == "63C", results
    return int(results[-1][3], 16)


def test_ica_same_aliases_chains_and_signatures(proxy_factory, tmp_path):
    a, b, url = start_pair(proxy_factory, tmp_path, "emulated:?type=ica&cards=2&prefix=E")
    fp = FoxyProxy(url, TOKEN, str(tmp_path), signer="ica")
    try:
        fp.wait_ready()
        assert "#### Content of all cards analyzed" in fp.output()
        ours = wait_for(lambda: b64list(one(b, "*", "ALIASES")) if len(b64list(one(b, "*", "ALIASES"))) == 2
                        else None)
        assert ours == ["E I.CA 00 Signing", "E I.CA 01 Signing"]
        theirs = b64list(fp.request(">*|\n>1:ALIASES|\n\n")[0][1])
        assert sorted(theirs) == sorted(f"commonName: {cn}, organizationName: CloudFoxy Emulated" for cn in ours)
        # a migrating client keeps FoxyProxy's ALIASES strings: they name the same certificate here
        for entry in theirs:
            cn = entry.split(", ")[0].split(": ", 1)[1]
            chain = one(b, cn, "CHAIN")
            assert one(b, entry, "CHAIN") == chain
            digest = hashlib.sha256(entry.encode()).digest()
            signature = one(b, f"{entry}:{PIN}", f"SIGN:{digest.hex()}")
            verify(chain, digest, signature)
            assert signature == one(b, f"{cn}:{PIN}", f"SIGN:{digest.hex()}")
            assert one(b, f"{entry}:9999", f"SIGN:{digest.hex()}") == "C085"  # the PIN after the name counts
            with b.client() as c:  # the card's reader too: a card command on the alias's reader line
                assert c.results(f">{entry}|\n>1:APDU:00A4000C023F00|\n\n") == ["9000"]
        with b.client() as c:  # ENUM beside such a reader line: the readers with signing certificates
            assert b64list(c.results(f">{theirs[0]}|\n>1:ENUM|\n\n")[0]) == ["CloudFoxy E_00", "CloudFoxy E_01"]

        assert b64list(one(b, "*", "ENUM")) == ["CloudFoxy E_00", "CloudFoxy E_01"]
        theirs_enum = b64list(fp.request(">*|\n>1:ENUM|\n\n")[0][1])
        assert len(theirs_enum) == 1 and theirs_enum[0] in ("Foxy USB /E_00", "Foxy USB /E_01")  # one at most

        for cn in ours:
            chain = one(b, cn, "CHAIN")
            assert len(chain.split(":")) == 3  # leaf, issuing CA, root: all from the card
            assert fp.request(f">{cn}|\n>1:CHAIN|\n\n") == [("1", chain)]
            for n in (20, 32):
                digest = hashlib.sha512(cn.encode()).digest()[:n]
                mine = one(b, f"{cn}:{PIN}", f"SIGN:{digest.hex()}")
                [(_, theirs_sig)] = fp.request(f">{cn}:{PIN}|\n>1:SIGN:{digest.hex()}|\n\n")
                verify(chain, digest, mine)
                verify(chain, digest, theirs_sig)
                assert mine == theirs_sig.upper()  # RSA PKCS#1 v1.5 is deterministic

        # A wrong PIN costs one try on each side, however often it is sent.
        path = ("00A4000C023F00", "00A4010C020604", "00200086")
        digest = hashlib.sha256(b"x").hexdigest()
        for _ in range(2):
            assert fp.request(f">E I.CA 00 Signing:9999|\n>1:SIGN:{digest}|\n\n") == [("1", "C085")]
            assert one(b, "E I.CA 01 Signing:9999", f"SIGN:{digest}") == "C085"
        assert (pin_tries(a, "E 00", *path), pin_tries(a, "E 01", *path)) == (2, 2)
        verify(one(b, "E I.CA 01 Signing", "CHAIN"), bytes.fromhex(digest),
               one(b, f"E I.CA 01 Signing:{PIN}", f"SIGN:{digest}"))
        assert pin_tries(a, "E 01", *path) == 3  # a good PIN resets the counter
    finally:
        fp.stop()


def test_postsignum_foxyproxy_never_reaches_the_card(proxy_factory, tmp_path):
    a, b, url = start_pair(proxy_factory, tmp_path, "emulated:?type=postsignum&cards=1&prefix=S")
    fp = FoxyProxy(url, TOKEN, str(tmp_path), signer="postsignum")
    try:
        out = wait_for(lambda: fp.output() if fp.output().count("TypeError") >= 2 else None, timeout=30)
        assert out, fp.output()
        # terminal= carries the inventory line's ATR, which names no reader
        assert "Found a new chip '/S_00 3B" in out and "error status code 404" in out
        assert "reader['name']" in out and "TCP API of FoxyProxy is up" not in out
    finally:
        fp.stop()
    # Ours on the same card, through B.
    cn = "S PostSignum 00 Signing"
    assert wait_for(lambda: b64list(one(b, "*", "ALIASES")) == [cn])
    assert b64list(one(b, "*", "ENUM")) == ["CloudFoxy S_00"]
    chain = one(b, cn, "CHAIN")
    assert len(chain.split(":")) == 1  # the card holds no CA certificate; --ca-certs adds them
    for n in (20, 32, 48, 64):
        digest = hashlib.sha512(b"postsignum").digest()[:n]
        verify(chain, digest, one(b, f"{cn}:{PIN}", f"SIGN:{digest.hex()}"))


FOXYPROXY_POSTSIGNUM_SIGN = """
import sys
from foxyproxy.csp import TokenRecord
from foxyproxy.csp.postsignum import CryptoPostSignum
url, token, reader, pin, digest = sys.argv[1:]
csp = CryptoPostSignum({'upstream': url, 'token': token, 'signer': 'postsignum', 'register': False})
record = TokenRecord()
record.name, record.short_name, record.reader = 'commonName: x', 'x', reader
csp.storage.cert_names.append(record)
session = csp.server.getupstreamconnection()
print('RESULT=' + str(csp.sign(session, 'x', digest, password=pin)))
"""


def test_postsignum_foxyproxy_sign_flow_ends_without_signature(proxy_factory, tmp_path):
    """FoxyProxy's own postsignum SIGN code, given the reader name its
    start-up cannot find, on our card: it sends the second half of the
    PSO:DECIPHER data with CLA 10 (more to come), so the card never
    computes and FoxyProxy returns an empty signature."""
    a, b, url = start_pair(proxy_factory, tmp_path, "emulated:?type=postsignum&cards=1&prefix=S")
    digest = hashlib.sha256(b"postsignum").hexdigest()
    foxyproxy_venv()
    python = os.path.join(FOXYPROXY_VENV, "bin", "python")
    done = subprocess.run([python, "-c", FOXYPROXY_POSTSIGNUM_SIGN, url, TOKEN, "/S_00", PIN, digest],
                          capture_output=True, text=True, timeout=120, env=dict(os.environ, HOME=str(tmp_path)))
    assert "RESULT=\n" in done.stdout, done.stdout + done.stderr
    cn = "S PostSignum 00 Signing"
    assert wait_for(lambda: b64list(one(b, "*", "ALIASES")) == [cn])
    verify(one(b, cn, "CHAIN"), bytes.fromhex(digest), one(b, f"{cn}:{PIN}", f"SIGN:{digest}"))


def test_pgp_foxyproxy_lists_nothing(proxy_factory, tmp_path):
    a, b, url = start_pair(proxy_factory, tmp_path, "emulated:?type=openpgp&cards=2&prefix=G")
    fp = FoxyProxy(url, TOKEN, str(tmp_path), signer="pgp")
    try:
        fp.wait_ready()
        out = fp.output()
        assert "Token '/G_00 3B" in out and "is not recognized as a PGP token" in out
        # terminal= carries the inventory line's ATR ("/G_00 <ATR>"), which names no reader
        assert "error status code 404" in out
        assert fp.raw(">*|\n>1:ALIASES|\n\n") == ""  # aliases() returns None: closed, no answer
        assert fp.request(">*|\n>1:ENUM|\n\n") == [("1", "")]
        assert fp.raw(">G OpenPGP 00 Signing|\n>1:CHAIN|\n\n") == "C083"
        assert fp.raw(f">G OpenPGP 00 Signing:{PIN}|\n>1:SIGN:{'00' * 32}|\n\n") == "C083"
    finally:
        fp.stop()
    ours = wait_for(lambda: b64list(one(b, "*", "ALIASES")) if len(b64list(one(b, "*", "ALIASES"))) == 2
                    else None)
    assert ours == ["G OpenPGP 00 Signing", "G OpenPGP 01 Signing"]
    chain = one(b, ours[0], "CHAIN")  # card 00: RSA-2048
    digest = hashlib.sha256(b"pgp").digest()
    verify(chain, digest, one(b, f"{ours[0]}:{PIN}", f"SIGN:{digest.hex()}"))
