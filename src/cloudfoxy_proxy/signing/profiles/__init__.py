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


class PinBlocked(WrongPin):
    """The card's PIN is blocked (``6983``): no PIN is accepted any more."""


def pin_failure(sw, step):
    """The WrongPin to raise for VERIFY's status word ``sw`` (``63Cx``,
    ``6982``, ``6983``), or None when ``sw`` is no PIN verdict.  ``step``
    names the command in the reason, e.g. ``"PIV VERIFY"``."""
    if sw == 0x6983 or sw == 0x63C0:
        return PinBlocked(f"{step} {sw:04X}: the PIN is blocked")
    if sw >> 4 == 0x63C or sw == 0x6982:
        return WrongPin(f"{step} {sw:04X}")
    return None


def foxyproxy_subject(cert):
    """The subject of ``cert`` (an x509.Certificate) as FoxyProxy 2.10
    names a certificate in ALIASES: its ``oidName: value`` pairs, sorted as
    strings, joined by ``", "`` (``commonName: Jan Novák, organizationName:
    …``).  The OID names are the ones the cryptography package gives."""
    return ", ".join(sorted(f"{a.oid._name}: {a.value}" for a in cert.subject))


@attr.s(frozen=True, slots=True)
class CardCertificate:
    """A certificate on a card whose private key the card holds.

    ``alias``: the subject common name (or the RFC 4514 subject when it has
    none); ``foxyproxy``: the subject as FoxyProxy 2.10's ALIASES writes it
    (``foxyproxy_subject``); ``key_ref``: the profile's handle for the key (e.g. ``0x9C``);
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
    foxyproxy = attr.ib(default=None, eq=False, repr=False)

    @property
    def names(self):
        """Every name a reader line may give for this certificate."""
        return (self.alias, self.subject) if self.foxyproxy is None else (self.alias, self.subject, self.foxyproxy)

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
        return cls(alias, subject, bytes(der), key_ref, key_type, bits, usable, cert, foxyproxy_subject(cert))

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
def exchange(transmit, command, chain_end=False):
    """Send ``command`` with its ``61xx``/``6Cxx`` follow-ups
    (``apdu.follow_up``).  (data, status word); CardError (C08x) for an
    answer without a status word or a GET RESPONSE chain that does not end.

    A card that another client left in the middle of a chained command
    answers ``6883`` (last command of the chain expected) and forgets the
    chain: the command is then sent once more, unless it is itself the end
    of a chain (``chain_end``)."""
    response = yield run_deferred(follow_up(command), transmit)
    sw = status(response)
    if sw == 0x6883 and not chain_end:
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
    result = yield exchange(transmit, apdu(cla, ins, p1, p2, parts[-1], le), chain_end=len(parts) > 1)
    return result


@inlineCallbacks
def read_binary(transmit, length, cla=0x00):
    """``length`` bytes of the current EF from offset 0, by READ BINARY
    with the offset in P1-P2 (at most 256 bytes a command): bytes, or None
    when the card answers an error or less than asked."""
    if not 0 < length <= 0x7FFF:
        return None
    out = b""
    while len(out) < length:
        chunk = min(length - len(out), 256)
        offset = len(out)
        data, sw = yield exchange(transmit, apdu(cla, 0xB0, offset >> 8, offset & 0xFF, b"", chunk))
        if sw not in (0x9000, 0x6282) or not data:
            return None
        out += data[:chunk]
    return out


def der_length(header):
    """The whole length of the DER element starting with ``header`` (its
    first 4 bytes at least), or None when it is not a definite length."""
    if len(header) < 2:
        return None
    first = header[1]
    if first < 0x80:
        return 2 + first
    n = first & 0x7F
    if not 1 <= n <= 3 or len(header) < 2 + n:
        return None
    return 2 + n + int.from_bytes(header[2:2 + n], "big")


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
    #: The application's AID (DF name) for the default ``select``, and the
    #: Le to send with it (None: none).
    aid = None
    select_le = None

    @inlineCallbacks
    def select(self, transmit):
        """SELECT the card application by ``aid``: a Deferred for True when
        the card answers 9000."""
        if self.aid is None:
            raise NotImplementedError
        _, sw = yield exchange(transmit, apdu(0x00, 0xA4, 0x04, 0x00, self.aid, self.select_le))
        return sw == 0x9000

    def detect(self, transmit):
        return self.select(transmit)

    def certificates(self, transmit):
        raise NotImplementedError

    def verify_pin(self, transmit, pin, cert):
        raise NotImplementedError

    def sign(self, transmit, cert, digest):
        raise NotImplementedError


def _profiles():
    from .ica import IcaProfile
    from .openpgp import OpenPgpProfile
    from .piv import PivProfile
    from .postsignum import PostSignumProfile

    return (PivProfile, OpenPgpProfile, PostSignumProfile, IcaProfile)


#: The profile classes, tried in this order on every card.
PROFILES = _profiles()
