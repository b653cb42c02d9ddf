"""The PIV profile (NIST SP 800-73-4): certificates of keys 9C (Digital
Signature) and 9A (PIV Authentication), PIN 80, GENERAL AUTHENTICATE.

The card does raw RSA, so the profile builds the PKCS#1 v1.5 block
(DigestInfo included) itself; ECDSA answers are DER already.
"""

import zlib

from twisted.internet.defer import inlineCallbacks

from ... import errors
from ...errors import CardError
from ...logs import Logger
from ...apdu import find_tlv, parse_tlvs, tlv
from . import (
    CardCertificate, Profile, apdu, ec_input, exchange, pin_failure, pkcs1_block,
    send_chained,
)

PIV_AID_PREFIX = bytes.fromhex("A000000308")
PIN_REF = 0x80

#: (key reference, certificate object tag), in the order aliases are listed.
KEYS = ((0x9C, 0x5FC10A), (0x9A, 0x5FC105))

RSA_ALGORITHMS = {1024: 0x06, 2048: 0x07, 3072: 0x05, 4096: 0x16}
EC_ALGORITHMS = {256: 0x11, 384: 0x14}


def pin_block(pin):
    """The 8-byte VERIFY data, or None when the PIN cannot be a PIV PIN."""
    raw = pin.encode("utf-8")
    if not 6 <= len(raw) <= 8:
        return None
    return raw.ljust(8, b"\xff")


class PivProfile(Profile):
    name = "PIV"
    log = Logger()

    aid = PIV_AID_PREFIX
    select_le = 0

    @inlineCallbacks
    def certificates(self, transmit):
        if not (yield self.select(transmit)):
            return []
        found = []
        for key_ref, tag in KEYS:
            der = yield self.read_certificate(transmit, tag)
            if der is None:
                continue
            cert = CardCertificate.from_der(der, key_ref)
            if cert is None:
                self.log.info("PIV object {tag:06X} does not hold a usable certificate", tag=tag)
                continue
            found.append(cert)
        return found

    @inlineCallbacks
    def read_certificate(self, transmit, tag):
        """The DER certificate in object ``tag``, or None."""
        tag_bytes = tag.to_bytes(3, "big")
        data, sw = yield exchange(transmit, apdu(0x00, 0xCB, 0x3F, 0xFF, b"\x5C\x03" + tag_bytes, 0))
        if sw != 0x9000 or not data:
            return None
        try:
            container = find_tlv(data, 0x53)
            if container is None:
                return None
            inner = dict(parse_tlvs(container))
        except ValueError:
            return None
        der = inner.get(0x70)
        if not der:
            return None
        info = inner.get(0x71, b"\x00")
        if info and info[0] & 0x01:  # gzip-compressed certificate
            try:
                der = zlib.decompress(der, zlib.MAX_WBITS | 32)
            except zlib.error:
                return None
        return der

    @inlineCallbacks
    def verify_pin(self, transmit, pin, cert):
        block = pin_block(pin)
        if block is None:
            raise CardError(errors.BAD_PIN, "not a PIV PIN (6 to 8 characters)")
        if not (yield self.select(transmit)):
            raise CardError(errors.FAILED, "PIV application not found")
        _, sw = yield exchange(transmit, apdu(0x00, 0x20, 0x00, PIN_REF, block))
        if sw == 0x9000:
            return
        failure = pin_failure(sw, "PIV VERIFY")
        if failure is not None:
            raise failure
        if sw == 0x6A80:
            raise CardError(errors.BAD_PIN, "the card refused the PIN's format")
        raise CardError(errors.FAILED, f"PIV VERIFY {sw:04X}")

    @inlineCallbacks
    def sign(self, transmit, cert, digest):
        if cert.key_type == "rsa":
            alg = RSA_ALGORITHMS.get(cert.key_bits)
            challenge = pkcs1_block(digest, cert.key_bits // 8) if alg else None
        else:
            alg = EC_ALGORITHMS.get(cert.key_bits)
            challenge = ec_input(digest, cert.key_bits // 8) if alg else None
        if alg is None:
            raise CardError(errors.FAILED, f"PIV key {cert.key_type} {cert.key_bits} not supported")
        template = tlv(0x7C, tlv(0x82, b"") + tlv(0x81, challenge))
        data, sw = yield send_chained(transmit, 0x00, 0x87, alg, cert.key_ref, template, 0)
        if sw in (0x6982, 0x6983) or sw >> 4 == 0x63C:
            raise CardError(errors.BAD_PIN, f"PIV GENERAL AUTHENTICATE {sw:04X}")
        if sw != 0x9000:
            raise CardError(errors.FAILED, f"PIV GENERAL AUTHENTICATE {sw:04X}")
        try:
            signature = find_tlv(find_tlv(data, 0x7C) or b"", 0x82)
        except ValueError:
            signature = None
        if not signature:
            raise CardError(errors.FAILED, "no signature in the GENERAL AUTHENTICATE answer")
        return signature
