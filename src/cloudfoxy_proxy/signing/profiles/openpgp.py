"""The OpenPGP card profile (v2.0 to v3.4): the cardholder certificate
(DO 7F21), matched to the card key whose public key it carries.

* the signature key (CRT B6): VERIFY PW1 81, PSO: COMPUTE DIGITAL
  SIGNATURE with a DigestInfo (RSA) or the hash (ECDSA);
* the authentication key (CRT A4): VERIFY PW1 82, INTERNAL AUTHENTICATE
  with the same input.

ECDSA answers (``r || s``) are returned as DER ECDSA-Sig-Value.
"""

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from twisted.internet.defer import inlineCallbacks

from ... import errors
from ...errors import CardError
from ...logs import Logger
from ...apdu import find_tlv, parse_tlvs
from . import (
    CardCertificate, Profile, apdu, digest_info, ec_input, exchange, pin_failure,
    raw_to_der, send_chained,
)

OPENPGP_AID = bytes.fromhex("D27600012401")
SIG, AUT = "sig", "aut"
#: key -> (CRT tag, PW1 reference for VERIFY)
KEYS = {SIG: (0xB6, 0x81), AUT: (0xA4, 0x82)}


def _public_numbers_match(key, template):
    """Does the ``7F49`` public key template describe ``key``?"""
    try:
        items = dict(parse_tlvs(template))
    except ValueError:
        return False
    if isinstance(key, rsa.RSAPublicKey):
        numbers = key.public_numbers()
        n, e = items.get(0x81), items.get(0x82)
        return bool(n and e) and int.from_bytes(n, "big") == numbers.n and int.from_bytes(e, "big") == numbers.e
    if isinstance(key, ec.EllipticCurvePublicKey):
        point = items.get(0x86)
        return point == key.public_bytes(serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)
    return False


class OpenPgpProfile(Profile):
    name = "OpenPGP"
    log = Logger()

    aid = OPENPGP_AID

    @inlineCallbacks
    def certificates(self, transmit):
        if not (yield self.select(transmit)):
            return []
        data, sw = yield exchange(transmit, apdu(0x00, 0xCA, 0x7F, 0x21, b"", 0))
        if sw != 0x9000 or not data:
            return []
        try:
            inner = find_tlv(data, 0x7F21)
        except ValueError:
            inner = None
        der = inner if inner else data  # some cards answer without the 7F21 wrapper
        cert = CardCertificate.from_der(der, None)
        if cert is None:
            self.log.info("OpenPGP DO 7F21 does not hold a usable certificate")
            return []
        key = cert.public_key()
        for ref in (SIG, AUT):
            crt = KEYS[ref][0]
            template, sw = yield exchange(transmit, apdu(0x00, 0x47, 0x81, 0x00, bytes([crt, 0x00]), 0))
            if sw != 0x9000:
                continue
            try:
                public = find_tlv(template, 0x7F49)
            except ValueError:
                public = None
            if public and _public_numbers_match(key, public):
                return [CardCertificate(cert.alias, cert.subject, cert.der, ref, cert.key_type,
                                        cert.key_bits, cert.usable, cert.cert)]
        self.log.info("the OpenPGP cardholder certificate matches no signing key on the card")
        return []

    @inlineCallbacks
    def verify_pin(self, transmit, pin, cert):
        raw = pin.encode("utf-8")
        if not 6 <= len(raw) <= 127:
            raise CardError(errors.BAD_PIN, "not an OpenPGP PW1 (6 to 127 characters)")
        if not (yield self.select(transmit)):
            raise CardError(errors.FAILED, "OpenPGP application not found")
        reference = KEYS[cert.key_ref][1]
        _, sw = yield exchange(transmit, apdu(0x00, 0x20, 0x00, reference, raw))
        if sw == 0x9000:
            return
        failure = pin_failure(sw, "OpenPGP VERIFY")
        if failure is not None:
            raise failure
        raise CardError(errors.FAILED, f"OpenPGP VERIFY {sw:04X}")

    @inlineCallbacks
    def sign(self, transmit, cert, digest):
        if cert.key_type == "rsa":
            data = digest_info(digest)
        else:
            data = ec_input(digest, (cert.key_bits + 7) // 8)
        if cert.key_ref == SIG:
            header = (0x2A, 0x9E, 0x9A)
        else:
            header = (0x88, 0x00, 0x00)
        signature, sw = yield send_chained(transmit, 0x00, *header, data, 0)
        if sw in (0x6982, 0x6983):
            raise CardError(errors.BAD_PIN, f"OpenPGP signing {sw:04X}")
        if sw != 0x9000 or not signature:
            raise CardError(errors.FAILED, f"OpenPGP signing {sw:04X}")
        if cert.key_type == "ec":
            signature = raw_to_der(signature)
        return signature
