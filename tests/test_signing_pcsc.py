"""Real middleware on the emulated signing cards: the card is bridged into
vpcd (``--vpcd``) so that OpenSC, yubico-piv-tool and GnuPG's scdaemon use
it through a real pcscd (the PC/SC test rig, tests/pcsc_rig.py).

Debian packages: opensc (pkcs15-tool, pkcs11-tool), yubico-piv-tool,
scdaemon (with gnupg).  A test whose tool is missing fails: tests/run.sh
installs them.
"""

import hashlib
import os
import re
import shutil
import subprocess
import tempfile
import urllib.parse

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, utils

import pcsc_rig as rigmod
from support import ProxyProcess

from cloudfoxy_proxy.cards.openpgp import fingerprint
from cloudfoxy_proxy.cards.pki import get_pki
from cloudfoxy_proxy.signing.profiles import raw_to_der

SLOT = 1
READER = rigmod.reader_name(SLOT)  # "Virtual PCD 00 01"
PKCS11 = "/usr/lib/x86_64-linux-gnu/opensc-pkcs11.so"
SCDAEMON = "/usr/lib/gnupg/scdaemon"


def need(*tools):
    for tool in tools:
        if not (shutil.which(tool) or os.path.exists(tool)):
            pytest.fail(f"{tool} is not installed: tests/run.sh installs it (tests/debian-packages.txt)")


def run(*cmd, timeout=60, **kw):
    proc = subprocess.run(list(cmd), capture_output=True, timeout=timeout, **kw)
    return proc.returncode, proc.stdout.decode("utf-8", "replace"), proc.stderr.decode("utf-8", "replace")


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    directory = str(tmp_path_factory.mktemp("pki"))
    get_pki(directory)
    return directory


@pytest.fixture
def slot(card0):
    """pcscd running, a vicc card in slot 0 (so the tools must pick the
    right reader) and vpcd slot 1 free; slot 1 empty again afterwards."""
    rig = card0
    if rig.card_pid(SLOT) is not None:
        rig.stop_card(SLOT)
    yield rig
    if rig.pcscd is not None and rig.pcscd.poll() is None:
        rig.wait_card(SLOT, False, 10)


@pytest.fixture
def bridged(slot, keys):
    """``bridged(kind)``: a proxy with one emulated ``kind`` card "X 00",
    bridged into vpcd slot 1; the card is present when it returns."""
    started = []

    def start(kind, card=0):
        backend = f"emulated:?type={kind}&cards={card + 1}&prefix=X&keys={keys}"
        p = ProxyProcess("--backend", backend, "--vpcd", f"127.0.0.1:{slot.port(SLOT)}=X {card:02d}").start()
        started.append(p)
        slot.wait_card(SLOT, True, 15)
        return p

    yield start
    for p in started:
        p.stop()


def leaf(keys, cn, kind):
    return get_pki(keys).leaf(cn, kind).cert


# -- PIV ------------------------------------------------------------------------------

def test_opensc_lists_and_reads_the_piv_certificates(bridged, keys):
    need("pkcs15-tool")
    bridged("piv")
    code, out, err = run("pkcs15-tool", "--reader", READER, "--list-certificates")
    assert code == 0, out + err
    assert "PIV Authentication" in out and "Digital Signature" in out, out
    for cert_id, cn, kind in (("01", "X PIV 00 Authentication", "rsa2048"), ("02", "X PIV 00 Signing", "p256")):
        code, pem, err = run("pkcs15-tool", "--reader", READER, "--read-certificate", cert_id)
        assert code == 0, pem + err
        got = x509.load_pem_x509_certificate(pem[pem.index("-----BEGIN"):].encode())
        assert got == leaf(keys, cn, kind)


@pytest.mark.parametrize("cert_id, mechanism, cn, kind", [
    ("02", "ECDSA", "X PIV 00 Signing", "p256"),
    ("01", "SHA256-RSA-PKCS", "X PIV 00 Authentication", "rsa2048"),
])
def test_pkcs11_tool_signs_with_the_piv_card(bridged, keys, tmp_path, cert_id, mechanism, cn, kind):
    need("pkcs11-tool", PKCS11)
    bridged("piv")
    message = b"signed through OpenSC's PKCS#11 module"
    data = hashlib.sha256(message).digest() if mechanism == "ECDSA" else message
    (tmp_path / "in").write_bytes(data)
    code, out, err = run("pkcs11-tool", "--module", PKCS11, "--slot-description", READER,
                         "--login", "--pin", "123456",
                         "--sign", "--id", cert_id, "-m", mechanism,
                         "--input-file", str(tmp_path / "in"), "--output-file", str(tmp_path / "sig"))
    assert code == 0, out + err
    signature = (tmp_path / "sig").read_bytes()
    key = leaf(keys, cn, kind).public_key()
    if mechanism == "ECDSA":  # PKCS#11 gives r || s
        key.verify(raw_to_der(signature), data, ec.ECDSA(utils.Prehashed(hashes.SHA256())))
    else:
        key.verify(signature, message, padding.PKCS1v15(), hashes.SHA256())


def test_yubico_piv_tool_status(bridged):
    need("yubico-piv-tool")
    bridged("piv")
    code, out, err = run("yubico-piv-tool", "--reader", READER, "-a", "status")
    assert code == 0, out + err
    assert re.search(r"Slot 9a:.*?Subject DN:\s+O=CloudFoxy Emulated, ?CN=X PIV 00 Authentication", out, re.S) \
        or "X PIV 00 Authentication" in out, out
    assert "X PIV 00 Signing" in out, out
    assert re.search(r"PIN tries left:\s+3", out), out


# -- OpenPGP --------------------------------------------------------------------------------

@pytest.fixture
def gnupghome():
    home = tempfile.mkdtemp(prefix="gnupg-", dir="/tmp")  # short: socket paths are limited
    os.chmod(home, 0o700)
    with open(os.path.join(home, "scdaemon.conf"), "w") as f:
        f.write(f"disable-ccid\nreader-port {READER}\n")
    env = dict(os.environ, GNUPGHOME=home)
    yield env
    subprocess.run(["gpgconf", "--kill", "all"], env=env, capture_output=True, timeout=30)
    shutil.rmtree(home, ignore_errors=True)


def test_gpg_card_status(bridged, gnupghome, keys):
    need("gpg", SCDAEMON)
    proxy = bridged("openpgp")
    code, out, err = run("gpg", "--batch", "--card-status", env=gnupghome)
    assert code == 0, out + err + proxy.log()[-3000:]
    assert re.search(r"Application ID \.+: D276000124010304FFFF", out), out
    assert re.search(r"Version \.+: 3\.4", out), out
    signing = get_pki(keys).leaf("X OpenPGP 00 Signing", "rsa2048")
    created = int(signing.cert.not_valid_before_utc.timestamp())
    fpr = fingerprint(signing.key.public_key(), created).hex().upper()
    spaced = " ".join(fpr[i:i + 4] for i in range(0, 40, 4))
    assert re.search(r"Signature key \.+: " + spaced[:24], out), (spaced, out)
    assert re.search(r"Signature counter : 0", out), out


class Assuan:
    """A line-by-line Assuan client for ``scdaemon --server``."""

    def __init__(self, env):
        self.proc = subprocess.Popen([SCDAEMON, "--server"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, env=env)
        self.expect_ok()

    def line(self):
        raw = self.proc.stdout.readline()
        if not raw:
            raise AssertionError("scdaemon closed the connection")
        return raw.rstrip(b"\n")

    def expect_ok(self, inquiries=None):
        data = b""
        while True:
            raw = self.line()
            if raw.startswith(b"OK"):
                return data
            if raw.startswith(b"ERR"):
                raise AssertionError(raw.decode())
            if raw.startswith(b"D "):
                data += urllib.parse.unquote_to_bytes(raw[2:])
            elif raw.startswith(b"INQUIRE "):
                keyword = raw.split()[1].decode()
                answer = (inquiries or {})[keyword]
                self.send(f"D {answer}")
                self.send("END")

    def send(self, text):
        self.proc.stdin.write(text.encode() + b"\n")
        self.proc.stdin.flush()

    def command(self, text, **inquiries):
        self.send(text)
        return self.expect_ok(inquiries)

    def close(self):
        try:
            self.send("BYE")
        except OSError:
            pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)


@pytest.mark.parametrize("card, kind", [(0, "rsa2048"), (1, "p256")])
def test_scdaemon_pksign(bridged, gnupghome, keys, card, kind):
    need(SCDAEMON)
    bridged("openpgp", card)
    digest = hashlib.sha256(b"signed by scdaemon").digest()
    scd = Assuan(gnupghome)
    try:
        scd.command("SERIALNO openpgp")
        scd.command(f"SETDATA {digest.hex().upper()}")
        # scdaemon wants the PIN NUL-terminated
        signature = scd.command("PKSIGN --hash=sha256 OPENPGP.1", NEEDPIN="123456%00")
    finally:
        scd.close()
    key = leaf(keys, f"X OpenPGP {card:02d} Signing", kind).public_key()
    if kind == "p256":  # scdaemon passes on the card's r || s
        assert len(signature) == 64
        key.verify(raw_to_der(signature), digest, ec.ECDSA(utils.Prehashed(hashes.SHA256())))
    else:
        assert len(signature) == 256
        key.verify(signature, digest, padding.PKCS1v15(), utils.Prehashed(hashes.SHA256()))



# -- a card pulled mid-SIGN, on real processes -----------------------------------------

def test_card_pulled_mid_sign_answers_c080(slot, keys):
    """Proxy A bridges a slow emulated PIV card into vpcd; proxy B serves it
    from PC/SC.  A SIGN on B, and A killed while the SIGN's APDUs are on the
    card: pcscd reports the card removed and B answers C080."""
    import base64
    import threading
    import time

    a = ProxyProcess("--backend", f"emulated:?type=piv&cards=1&prefix=X&keys={keys}&latency_ms=400",
                     "--vpcd", f"127.0.0.1:{slot.port(SLOT)}=X 00").start()
    b = None
    try:
        slot.wait_card(SLOT, True, 15)
        b = ProxyProcess("--backend", "pcsc:", "--command-timeout", "30").start()
        alias = "X PIV 00 Signing"
        with b.client(timeout=60) as c:
            deadline = time.monotonic() + 90
            while alias.encode() not in b"".join(base64.b64decode(x) for x in
                                                  c.results(">*|\n>1:ALIASES|\n\n")[0].split("|") if x):
                assert time.monotonic() < deadline, "B never indexed the bridged card"
                time.sleep(0.5)
            digest = hashlib.sha256(b"pulled mid-SIGN").hexdigest()
            started = time.monotonic()
            killer = threading.Timer(0.6, a.kill)
            killer.start()
            assert c.request(f">{alias}:123456|\n>2:SIGN:{digest}|\n\n") == [("2", "C080")]
            killer.join()
            assert time.monotonic() - started < 10
    finally:
        if b is not None:
            b.stop()
        a.stop()
