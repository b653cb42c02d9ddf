"""The I.CA profile: the Czech trust service provider I.CA's STARCOS
signing cards (the card side: cards/ica.py; facts: docs/signing.md).

* Detection: SELECT of the certificate list EF 3F50/3F10/5630 by path
  (P1 08); on a card that does not select by path (``6A86``, ``6A81``),
  SELECT MF 3F00, DF 3F50, DF 3F10 and EF 5630 by FID, all ``9000``.
* Certificates: EF 5630 holds one descriptor per certificate (READ RECORD
  1, 2, … until ``6A83``); a descriptor's simple-TLV ``10`` gives the DF and
  EF of the certificate, ``12`` its length.  CA certificates (basic
  constraints CA) are kept for CHAIN only; of the end-entity certificates
  the newest (latest notBefore) is the signing certificate, the others are
  listed as not usable (one signing key per card, as FoxyProxy 2.10 has it).
* The signing key: in DF 0604; its id (``84 03 80 kk 00``) is found with
  MSE:SET DST, trying ids 0F down to 01 when the card is probed.
* PIN: VERIFY 86 (the signature PIN, local to DF 0604); a card without it
  (``6A88``) gets VERIFY 81 (the global PIN).  4 to 16 characters, sent as
  they are.
* SIGN: MSE:SET HT and DST (RSA PKCS#1 v1.5 with SHA-1 or SHA-256),
  PSO:HASH with the hash value, PSO:COMPUTE DIGITAL SIGNATURE.  The card
  knows SHA-1 and SHA-256 only: other hashes are ``C084``.
"""

import attr
from cryptography import x509
from twisted.internet.defer import inlineCallbacks

from ... import errors
from ...errors import CardError
from ...logs import Logger
from ..certs import extension
from . import CardCertificate, Profile, apdu, exchange, pin_failure, read_binary

MF, DF_SIGNATURE = 0x3F00, 0x0604
PATH_TO_LIST = (0x3F50, 0x3F10)
EF_CERT_LIST = 0x5630
PIN_LOCAL, PIN_GLOBAL = 0x86, 0x81
KEY_IDS = range(0x0F, 0x00, -1)
MAX_RECORDS = 32
#: Digest length -> the card's hash algorithm byte.
HASH_IDS = {20: 0x10, 32: 0x30}


def select_fid(p1, fid):
    """SELECT by FID, no answer data (P2 0C)."""
    return apdu(0x00, 0xA4, p1, 0x0C, fid.to_bytes(2, "big"))


def simple_tlvs(data):
    """ISO 7816-4 simple-TLV items of ``data`` as [(tag, value)]; stops at
    the first item that runs past the end."""
    items, i = [], 0
    while i + 2 <= len(data):
        tag, n = data[i], data[i + 1]
        i += 2
        if n == 0xFF:
            if i + 2 > len(data):
                break
            n = int.from_bytes(data[i:i + 2], "big")
            i += 2
        if i + n > len(data):
            break
        items.append((tag, bytes(data[i:i + n])))
        i += n
    return items


def parse_descriptor(record):
    """(DF FID, EF FID, length) of a certificate descriptor, or None."""
    outer = simple_tlvs(record)
    if not outer or outer[0][0] != 0x01:
        return None
    fields = dict(simple_tlvs(outer[0][1]))
    where, size = fields.get(0x10), fields.get(0x12)
    if where is None or len(where) != 4 or not size:
        return None
    return (int.from_bytes(where[:2], "big"), int.from_bytes(where[2:], "big"), int.from_bytes(size, "big"))


def _is_ca(cert):
    constraints = extension(cert, x509.BasicConstraints)
    return constraints is not None and constraints.ca


class IcaProfile(Profile):
    name = "I.CA"
    log = Logger()

    @inlineCallbacks
    def _select_path(self, transmit, *steps):
        """SELECT each (P1, FID) in turn; True when all answer 9000."""
        for p1, fid in steps:
            _, sw = yield exchange(transmit, select_fid(p1, fid))
            if sw != 0x9000:
                return False
        return True

    @inlineCallbacks
    def select(self, transmit):
        """SELECT EF 5630 by path from the MF (one command that changes
        nothing on a card without it); by FID, step by step, on a card that
        does not select by path."""
        path = b"".join(fid.to_bytes(2, "big") for fid in PATH_TO_LIST + (EF_CERT_LIST,))
        _, sw = yield exchange(transmit, apdu(0x00, 0xA4, 0x08, 0x0C, path))
        if sw == 0x9000:
            return True
        if sw not in (0x6A86, 0x6A81):
            return False
        found = yield self._select_path(transmit, (0x00, MF), *((0x01, fid) for fid in PATH_TO_LIST),
                                        (0x02, EF_CERT_LIST))
        return found

    @inlineCallbacks
    def certificates(self, transmit):
        if not (yield self.select(transmit)):
            return []
        places = []
        for number in range(1, MAX_RECORDS + 1):
            record, sw = yield exchange(transmit, apdu(0x00, 0xB2, number, 0x04, b"", 0))
            if sw != 0x9000:
                break
            place = parse_descriptor(record)
            if place is None:
                self.log.info("I.CA certificate descriptor {n} not understood", n=number)
            elif place not in places:
                places.append(place)
        found = []
        for df, ef, size in places:
            steps = ((0x00, MF), (0x01, PATH_TO_LIST[0]), (0x01, df), (0x02, ef))
            der = (yield read_binary(transmit, size)) if (yield self._select_path(transmit, *steps)) else None
            cert = CardCertificate.from_der(der, None) if der else None
            if cert is None:
                self.log.info("I.CA certificate {df:04X}/{ef:04X} not readable", df=df, ef=ef)
                continue
            found.append(cert)
        users = sorted((c for c in found if not _is_ca(c.cert)),
                       key=lambda c: c.cert.not_valid_before_utc, reverse=True)
        key_id = (yield self.find_key(transmit)) if users else None
        if users and key_id is None:
            self.log.info("I.CA card: no signing key answers MSE:SET")
        out = []
        for cert in found:
            if users and cert is users[0] and key_id is not None:
                out.append(attr.evolve(cert, key_ref=key_id))
            else:
                out.append(attr.evolve(cert, usable=False))
        return out

    @inlineCallbacks
    def find_key(self, transmit):
        """The id of the signing key in DF 0604, or None."""
        if not (yield self._select_path(transmit, (0x00, MF), (0x01, DF_SIGNATURE))):
            return None
        for key_id in KEY_IDS:
            _, sw = yield exchange(transmit, mse_dst(key_id, HASH_IDS[32]))
            if sw == 0x9000:
                return key_id
        return None

    @inlineCallbacks
    def verify_pin(self, transmit, pin, cert):
        raw = pin.encode("utf-8")
        if not 4 <= len(raw) <= 16:
            raise CardError(errors.BAD_PIN, "not an I.CA PIN (4 to 16 characters)")
        if not (yield self._select_path(transmit, (0x00, MF), (0x01, DF_SIGNATURE))):
            raise CardError(errors.FAILED, "I.CA signature DF 0604 not found")
        for reference in (PIN_LOCAL, PIN_GLOBAL):
            _, sw = yield exchange(transmit, apdu(0x00, 0x20, 0x00, reference, raw))
            if sw == 0x9000:
                return
            failure = pin_failure(sw, f"I.CA VERIFY {reference:02X}")
            if failure is not None:
                raise failure
            if sw not in (0x6A88, 0x6A86):  # no such PIN on this card: try the next
                break
        raise CardError(errors.FAILED, f"I.CA VERIFY {sw:04X}")

    @inlineCallbacks
    def sign(self, transmit, cert, digest):
        hash_id = HASH_IDS.get(len(digest))
        if hash_id is None:
            raise CardError(errors.MALFORMED, "I.CA cards sign SHA-1 and SHA-256 hash values only")
        steps = (
            ("MSE:SET HT", apdu(0x00, 0x22, 0x41, 0xAA, bytes([0x89, 0x02, 0x14, hash_id]))),
            ("MSE:SET DST", mse_dst(cert.key_ref, hash_id)),
            ("PSO:HASH", apdu(0x00, 0x2A, 0x90, 0xA0, bytes([0x90, len(digest)]) + bytes(digest))),
        )
        for step, command in steps:
            _, sw = yield exchange(transmit, command)
            if sw != 0x9000:
                raise CardError(errors.FAILED, f"I.CA {step} {sw:04X}")
        signature, sw = yield exchange(transmit, apdu(0x00, 0x2A, 0x9E, 0x9A, b"", 0))
        if sw in (0x6982, 0x6983):
            raise CardError(errors.BAD_PIN, f"I.CA PSO:COMPUTE DIGITAL SIGNATURE {sw:04X}")
        if sw != 0x9000 or not signature:
            raise CardError(errors.FAILED, f"I.CA PSO:COMPUTE DIGITAL SIGNATURE {sw:04X}")
        return signature


def mse_dst(key_id, hash_id):
    """MSE:SET DST: RSA PKCS#1 v1.5 with hash ``hash_id`` and key ``key_id``."""
    return apdu(0x00, 0x22, 0x41, 0xB6, bytes([0x84, 0x03, 0x80, key_id, 0x00, 0x89, 0x03, 0x13, 0x23, hash_id]))
