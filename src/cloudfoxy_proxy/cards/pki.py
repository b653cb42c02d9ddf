"""Keys and a small test PKI for the emulated signing cards, and the base
class those cards share (command chaining, honest 61xx/GET RESPONSE).

The PKI is a root CA and an issuing (intermediate) CA, both EC P-256, and
one leaf certificate per card key, each with subject/authority key
identifiers and key usage ``digitalSignature`` (+ ``nonRepudiation`` for
signing keys).  Everything is generated with ``cryptography`` on first use
and cached for the life of the process (RSA-2048 key generation is the slow
part), so a backend with N cards generates its keys once.

With ``keys=DIR`` (emulated backend URL) the PKI lives in DIR as PEM files:
files that exist are loaded, missing ones are generated and written.  DIR
then also holds ``ca.pem`` (issuing CA + root), ready for ``--ca-certs``.
"""

import datetime
import hashlib
import os
import re
import threading

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.utils import (
    Prehashed, decode_dss_signature,
)
from cryptography.x509.oid import NameOID

from ..apdu import SW_WRONG_LENGTH, CommandAPDU, sw
from .iso7816 import INS_GET_RESPONSE, Card, StatusError

ROOT_CN = "CloudFoxy Emulated Root CA"
ISSUER_CN = "CloudFoxy Emulated Issuing CA"
ORGANIZATION = "CloudFoxy Emulated"

RSA2048 = "rsa2048"
P256 = "p256"

SW_LAST_OF_CHAIN_EXPECTED = 0x6883

_lock = threading.Lock()
_pkis = {}  # keys dir (or None) -> Pki


def _name(cn):
    return x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANIZATION),
        x509.NameAttribute(NameOID.COMMON_NAME, cn),
    ])


def new_key(kind):
    if kind == RSA2048:
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    if kind == P256:
        return ec.generate_private_key(ec.SECP256R1())
    raise ValueError(f"unknown key kind {kind!r}")


def key_kind(key):
    """``rsa2048`` or ``p256`` for a private or public key."""
    if isinstance(key, (rsa.RSAPrivateKey, rsa.RSAPublicKey)) and key.key_size == 2048:
        return RSA2048
    if isinstance(key, (ec.EllipticCurvePrivateKey, ec.EllipticCurvePublicKey)) and \
            isinstance(key.curve, ec.SECP256R1):
        return P256
    raise ValueError("emulated cards use RSA-2048 or EC P-256 keys")


class KeyPair:
    """A private key and its certificate."""

    __slots__ = ("key", "cert")

    def __init__(self, key, cert):
        self.key = key
        self.cert = cert

    @property
    def der(self):
        return self.cert.public_bytes(serialization.Encoding.DER)

    @property
    def kind(self):
        return key_kind(self.key)


def _certificate(subject_cn, public_key, ca, signing=False):
    """A certificate builder for ``public_key``, still to be given its
    issuer and signed (``_sign_builder``)."""
    now = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0)
    subject = _name(subject_cn)
    ski = x509.SubjectKeyIdentifier.from_public_key(public_key)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=3650))
        .add_extension(ski, critical=False)
    )
    if ca:
        builder = builder.add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        usage = dict(key_cert_sign=True, crl_sign=True, digital_signature=True, content_commitment=False)
    else:
        builder = builder.add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        usage = dict(key_cert_sign=False, crl_sign=False, digital_signature=True, content_commitment=signing)
    builder = builder.add_extension(x509.KeyUsage(
        key_encipherment=False, data_encipherment=False, key_agreement=False,
        encipher_only=False, decipher_only=False, **usage), critical=True)
    return builder


def _sign_builder(builder, issuer_name, issuer_key):
    builder = builder.issuer_name(issuer_name).add_extension(
        x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _slug(text):
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()


class Pki:
    """Root CA, issuing CA and leaf key pairs by common name.

    ``directory``: where PEM files are loaded from and written to (None:
    memory only).
    """

    def __init__(self, directory=None):
        self.directory = directory
        self._leaves = {}
        self.root = self._pair("root", lambda: self._make_root())
        self.issuer = self._pair("issuer", lambda: self._make_issuer())
        if directory is not None:
            path = os.path.join(directory, "ca.pem")
            if not os.path.exists(path):
                self._write(path, self.ca_pem())

    def _make_root(self):
        key = new_key(P256)
        builder = _certificate(ROOT_CN, key.public_key(), ca=True)
        return KeyPair(key, _sign_builder(builder, _name(ROOT_CN), key))

    def _make_issuer(self):
        key = new_key(P256)
        builder = _certificate(ISSUER_CN, key.public_key(), ca=True)
        return KeyPair(key, _sign_builder(builder, self.root.cert.subject, self.root.key))

    def leaf(self, cn, kind, signing=True):
        """The key pair whose certificate's subject CN is ``cn``."""
        with _lock:
            pair = self._leaves.get((cn, kind))
            if pair is None:
                def make():
                    key = new_key(kind)
                    builder = _certificate(cn, key.public_key(), ca=False, signing=signing)
                    return KeyPair(key, _sign_builder(builder, self.issuer.cert.subject, self.issuer.key))

                pair = self._pair(f"{_slug(cn)}-{kind}", make)
                if pair.kind != kind:
                    raise ValueError(f"{cn}: the key in {self.directory} is not {kind}")
                self._leaves[(cn, kind)] = pair
            return pair

    def ca_pem(self):
        """The issuing CA and the root, PEM (for ``--ca-certs``)."""
        return b"".join(p.cert.public_bytes(serialization.Encoding.PEM) for p in (self.issuer, self.root))

    # Files ------------------------------------------------------------------
    def _pair(self, stem, make):
        if self.directory is None:
            return make()
        key_path = os.path.join(self.directory, stem + ".key.pem")
        cert_path = os.path.join(self.directory, stem + ".crt.pem")
        if os.path.exists(key_path) and os.path.exists(cert_path):
            with open(key_path, "rb") as f:
                key = serialization.load_pem_private_key(f.read(), password=None)
            with open(cert_path, "rb") as f:
                cert = x509.load_pem_x509_certificate(f.read())
            return KeyPair(key, cert)
        pair = make()
        self._write(key_path, pair.key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
        self._write(cert_path, pair.cert.public_bytes(serialization.Encoding.PEM))
        return pair

    @staticmethod
    def _write(path, data):
        tmp = f"{path}.{os.getpid()}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)


def get_pki(directory=None):
    """The process's PKI for ``directory`` (None: in memory), made once."""
    if directory is not None:
        directory = os.path.abspath(directory)
    with _lock:
        pki = _pkis.get(directory)
    if pki is None:
        if directory is not None:
            os.makedirs(directory, exist_ok=True)
        made = Pki(directory)
        with _lock:
            pki = _pkis.setdefault(directory, made)
    return pki


def check_keys_dir(directory):
    """A clear ValueError unless ``directory`` is usable for ``keys=``."""
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise ValueError(f"keys={directory!r} is not a directory")
    parent = directory if os.path.isdir(directory) else os.path.dirname(os.path.abspath(directory))
    if not os.access(parent, os.W_OK | os.X_OK) and not os.path.isdir(directory):
        raise ValueError(f"keys={directory!r} cannot be created")


def card_number(kind, label, serial, size):
    """``size`` bytes that tell one emulated card from every other: made
    from its type, its label (the backend's prefix) and its position, so a
    card keeps them across restarts and no two cards of a proxy share them
    (PIV GUID and card serial, OpenPGP AID serial number, ...)."""
    return hashlib.sha256(f"{kind}\0{label}\0{serial}".encode("utf-8")).digest()[:size]


# Card-side cryptography (what a card's chip does) -------------------------------

def raw_rsa(key, block):
    """RSA private-key operation on a modulus-sized block (no padding)."""
    numbers = key.private_numbers()
    n = numbers.public_numbers.n
    m = int.from_bytes(block, "big")
    if m >= n:
        raise ValueError("input not smaller than the modulus")
    size = (key.key_size + 7) // 8
    # CRT: about three times faster than pow(m, d, n).
    s1 = pow(m, numbers.dmp1, numbers.p)
    s2 = pow(m, numbers.dmq1, numbers.q)
    h = (numbers.iqmp * (s1 - s2)) % numbers.p
    return (s2 + h * numbers.q).to_bytes(size, "big")


def pkcs1_type1(data, size):
    """EMSA-PKCS1-v1_5 encoding of ``data`` (a DigestInfo) to ``size`` bytes."""
    if len(data) > size - 11:
        raise ValueError("data too long for the modulus")
    return b"\x00\x01" + b"\xff" * (size - 3 - len(data)) + b"\x00" + bytes(data)


def ecdsa_p256(key, digest):
    """ECDSA over a hash value as a card does it: the leftmost 256 bits of
    ``digest`` (shorter values are taken as they are); DER signature."""
    digest = bytes(digest[:32]).rjust(32, b"\x00")
    return key.sign(digest, ec.ECDSA(Prehashed(hashes.SHA256())))


def der_to_raw(der, size=32):
    r, s = decode_dss_signature(der)
    return r.to_bytes(size, "big") + s.to_bytes(size, "big")


# Shared card behaviour -------------------------------------------------------------

class CardPin:
    """A PIN as a card keeps it: the value (bytes), a retry counter and
    whether it is verified.  ``verify(cmd)`` answers ISO 7816-4 VERIFY on
    it: P1 00 with data presents the PIN (``63Cx`` when wrong, x tries
    left; ``6983`` when blocked), P1 00 without data asks for the status,
    P1 FF without data forgets the verification."""

    __slots__ = ("value", "limit", "tries", "verified")

    def __init__(self, value, tries=3):
        self.value = bytes(value)
        self.limit = self.tries = tries
        self.verified = False

    def verify(self, cmd):
        if cmd.p1 == 0xFF and not cmd.data:
            self.verified = False
            return b"", 0x9000
        if cmd.p1 != 0x00:
            raise StatusError(0x6A86)
        if not cmd.data:
            if self.verified:
                return b"", 0x9000
            raise StatusError(0x63C0 | self.tries if self.tries else 0x6983)
        if not self.tries:
            raise StatusError(0x6983)
        if cmd.data != self.value:
            self.tries -= 1
            self.verified = False
            raise StatusError(0x63C0 | self.tries if self.tries else 0x6983)
        self.tries = self.limit
        self.verified = True
        return b"", 0x9000



class SigningCard(Card):
    """An emulated card that accepts ISO 7816-4 command chaining (CLA bit
    0x10): the parts of a chained command are collected and the command
    runs once, on its last part, as if it had been sent whole."""

    def __init__(self, *args, **kw):
        self._chain = None  # (ins, p1, p2, data so far)
        super().__init__(*args, **kw)

    def reset(self):
        self._chain = None
        return super().reset()

    def check_cla(self, cla):
        return cla in (0x00, 0x10)

    def forget_pending(self):
        self._chain = None
        super().forget_pending()

    def assemble(self, cmd):
        """Collects a chained command's parts (CLA 0x10): 9000 for each but
        the last, then the whole command."""
        chain = self._chain
        if cmd.cla == 0x10:
            if chain is not None and chain[:3] != (cmd.ins, cmd.p1, cmd.p2):
                self._chain = None
                return sw(SW_LAST_OF_CHAIN_EXPECTED)
            data = (chain[3] if chain else b"") + cmd.data
            if len(data) > 65535:
                self._chain = None
                return sw(SW_WRONG_LENGTH)
            self._chain = (cmd.ins, cmd.p1, cmd.p2, data)
            self._rest = b""
            return sw(0x9000)
        if chain is not None:
            self._chain = None
            if chain[:3] != (cmd.ins, cmd.p1, cmd.p2):
                return sw(SW_LAST_OF_CHAIN_EXPECTED)
            cmd = CommandAPDU(cmd.cla, cmd.ins, cmd.p1, cmd.p2, chain[3] + cmd.data, cmd.ne, cmd.extended)
        return cmd

    def answer_length(self, cmd):
        if cmd.ne is None and cmd.ins != INS_GET_RESPONSE:
            # Like T=1 cards (YubiKey, OpenPGP cards): a command without Le
            # still gets its answer, up to 256 bytes, then 61xx.
            return CommandAPDU(cmd.cla, cmd.ins, cmd.p1, cmd.p2, cmd.data, 256, cmd.extended)
        return cmd
