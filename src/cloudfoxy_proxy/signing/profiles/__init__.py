"""Card profiles: how to find the signing certificates on a standard card
and how to sign with their keys, using only APDUs.

A profile is a class with four methods, each taking ``transmit``, a
function that sends one command APDU (bytes) to the card and returns a
Deferred firing with the response APDU (bytes).  The caller runs every
profile call inside one uninterrupted turn on the card's queue, so a
profile may rely on the card state it set up (SELECT, VERIFY) for the rest
of that call sequence, and on nothing before it.

* ``detect(transmit)`` -> Deferred[bool]: is this the profile's card?
* ``certificates(transmit)`` -> Deferred[[CardCertificate]]
* ``verify_pin(transmit, pin, cert)``: VERIFY the PIN that ``cert``'s key
  needs; fails with :class:`WrongPin` when the card rejects it.
* ``sign(transmit, cert, digest)`` -> Deferred[bytes]: sign the hash value
  ``digest`` (SHA-1/256/384/512, told apart by length) with ``cert``'s key,
  right after ``verify_pin``.  RSA keys give the PKCS#1 v1.5 signature,
  EC keys a DER ``ECDSA-Sig-Value``, whatever the card returns natively.

Failures are :class:`cloudfoxy_proxy.errors.CardError` (C08x).  Adding a
profile means writing such a class and listing it in :data:`PROFILES`;
nothing else changes.
"""

import attr
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from cryptography.x509.oid import NameOID
from twisted.internet.defer import inlineCallbacks

from ... import errors
from ...apdu import follow_up, run_deferred
from ...errors import CardError

#: Hash value length -> (name, DER DigestInfo prefix).
HASHES = {
    20: ("SHA-1", bytes.fromhex("3021300906052B0E03021A05000414")),
    32: ("SHA-256", bytes.fromhex("3031300D060960864801650304020105000420")),
    48: ("SHA-384", bytes.fromhex("3041300D060960864801650304020205000430")),
    64: ("SHA-512", bytes.fromhex("3051300D060960864801650304020305000440")),
}

#: Names a client may give SIGN's OBJECT field, by digest length.
HASH_NAMES = {
    "SHA1": 20, "SHA-1": 20, "SHA256": 32, "SHA-256": 32,
    "SHA384": 48, "SHA-384": 48, "SHA512": 64, "SHA-512": 64,
}


class WrongPin(CardError):
    """The card rejected the PIN (or the PIN is blocked)."""

    def __init__(self, reason="the card rejected the PIN"):
        super().__init__(errors.BAD_PIN, reason)


@attr.s(frozen=True, slots=True)
class CardCertificate:
    """A certificate on a card whose private key the card holds.

    ``alias``: the subject common name (or the RFC 4514 subject when it has
    none); ``key_ref``: the profile's handle for the key (e.g. ``0x9C``);
    ``key_type``: ``rsa`` or ``ec``; ``key_bits``: modulus or curve size.
    """

    alias = attr.ib()
    subject = attr.ib()
    der = attr.ib(repr=False)
    key_ref = attr.ib()
    key_type = attr.ib()
    key_bits = attr.ib()
    usable = attr.ib(default=True)
    cert = attr.ib(default=None, eq=False, repr=False)

    @classmethod
    def from_der(cls, der, key_ref):
        """None when ``der`` is not a certificate with an RSA or EC key."""
        try:
            cert = x509.load_der_x509_certificate(bytes(der))
            key = cert.public_key()
        except (ValueError, TypeError):
            return None
        if isinstance(key, rsa.RSAPublicKey):
            key_type, bits = "rsa", key.key_size
        elif isinstance(key, ec.EllipticCurvePublicKey):
            key_type, bits = "ec", key.curve.key_size
        else:
            return None
        subject = cert.subject.rfc4514_string()
        cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        alias = str(cns[0].value) if cns else subject
        try:
            usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
            usable = usage.digital_signature or usage.content_commitment
        except x509.ExtensionNotFound:
            usable = True
        return cls(alias, subject, bytes(der), key_ref, key_type, bits, usable, cert)

    def public_key(self):
        return self.cert.public_key()


# APDU helpers -----------------------------------------------------------------------

def apdu(cla, ins, p1, p2, data=b"", le=None):
    """A short command APDU; ``le`` 0 means 256."""
    out = bytes([cla, ins, p1, p2])
    if data:
        if len(data) > 255:
            raise ValueError("data too long for a short APDU")
        out += bytes([len(data)]) + bytes(data)
    if le is not None:
        out += bytes([le & 0xFF])
    return out


def status(response):
    if len(response) < 2:
        raise CardError(errors.FAILED, "response APDU shorter than a status word")
    return response[-2] << 8 | response[-1]


@inlineCallbacks
def exchange(transmit, command):
    """Send ``command`` with its ``61xx``/``6Cxx`` follow-ups
    (``apdu.follow_up``).  (data, status word); CardError (C08x) for an
    answer without a status word or a GET RESPONSE chain that does not end."""
    response = yield run_deferred(follow_up(command), transmit)
    sw = status(response)
    if sw >> 8 == 0x61:
        raise CardError(errors.FAILED, "endless GET RESPONSE")
    return (bytes(response[:-2]), sw)


@inlineCallbacks
def send_chained(transmit, cla, ins, p1, p2, data, le=0):
    """Send ``data`` with ISO 7816-4 command chaining when it is longer than
    255 bytes; (data, status word) of the last part."""
    parts = [data[i:i + 255] for i in range(0, len(data), 255)] or [b""]
    for part in parts[:-1]:
        response = yield transmit(apdu(cla | 0x10, ins, p1, p2, part))
        sw = status(response)
        if sw != 0x9000:
            return (b"", sw)
    result = yield exchange(transmit, apdu(cla, ins, p1, p2, parts[-1], le))
    return result


def digest_info(digest):
    """DER DigestInfo of a hash value, the hash told by its length."""
    name_prefix = HASHES.get(len(digest))
    if name_prefix is None:
        raise CardError(errors.MALFORMED, "digest length is not SHA-1/256/384/512")
    return name_prefix[1] + bytes(digest)


def pkcs1_block(digest, size):
    """EMSA-PKCS1-v1_5 block for a raw-RSA card: 00 01 FF.. 00 DigestInfo."""
    info = digest_info(digest)
    if len(info) > size - 11:
        raise CardError(errors.FAILED, "key too small for this digest")
    return b"\x00\x01" + b"\xff" * (size - 3 - len(info)) + b"\x00" + info


def ec_input(digest, size):
    """A hash value for a card's ECDSA: the leftmost ``size`` bytes (the
    ECDSA truncation for curves of whole-byte size), left-padded with zeros
    when shorter (the same integer)."""
    return bytes(digest[:size]).rjust(size, b"\x00")


def raw_to_der(raw):
    """``r || s`` (as OpenPGP cards answer) to a DER ECDSA-Sig-Value."""
    if not raw or len(raw) % 2:
        raise CardError(errors.FAILED, "malformed ECDSA signature from the card")
    half = len(raw) // 2
    return encode_dss_signature(int.from_bytes(raw[:half], "big"), int.from_bytes(raw[half:], "big"))


class Profile:
    """Base of the profiles; see the module documentation."""

    name = "?"

    def select(self, transmit):
        """SELECT the card application: a Deferred for True when it is there."""
        raise NotImplementedError

    def detect(self, transmit):
        return self.select(transmit)

    def certificates(self, transmit):
        raise NotImplementedError

    def verify_pin(self, transmit, pin, cert):
        raise NotImplementedError

    def sign(self, transmit, cert, digest):
        raise NotImplementedError


def _profiles():
    from .openpgp import OpenPgpProfile
    from .piv import PivProfile

    return (PivProfile, OpenPgpProfile)


#: The profile classes, tried in this order on every card.
PROFILES = _profiles()
