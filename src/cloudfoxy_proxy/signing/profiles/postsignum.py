"""The PostSignum profile: Česká pošta's PostSignum signing cards
(Oberthur IAS; the card side: cards/postsignum.py; facts: docs/signing.md).

* Detection: SELECT by AID ``A0 00 00 00 77 01 03 00 06 10 00 00 00 00 00 02``.
* The certificate: EF 1400/9001/2002 (SELECT by path), plain DER read
  with READ BINARY; its key is 0E.  The card holds no CA certificates:
  CHAIN adds issuers from ``--ca-certs``.
* PIN: VERIFY 10, the PIN as it is (4 to 16 characters).
* SIGN: MSE:RESTORE 03, MSE:SET ``B8 {83 01 0E}``, then PSO:DECIPHER with
  ``00`` and the PKCS#1 v1.5 block ``00 01 FF.. 00 DigestInfo`` built here
  (the card's raw RSA makes it the signature), sent with command chaining.
  RSA keys only; any of SHA-1/256/384/512.
"""

from twisted.internet.defer import inlineCallbacks

from ... import errors
from ...errors import CardError
from ...logs import Logger
from . import (
    CardCertificate, Profile, apdu, der_length, exchange, pin_failure, pkcs1_block,
    read_binary, send_chained,
)

POSTSIGNUM_AID = bytes.fromhex("A0000000770103000610000000000002")
CERT_PATH = bytes.fromhex("140090012002")
KEY_ID = 0x0E
PIN_REF = 0x10


class PostSignumProfile(Profile):
    name = "PostSignum"
    log = Logger()

    aid = POSTSIGNUM_AID

    @inlineCallbacks
    def certificates(self, transmit):
        if not (yield self.select(transmit)):
            return []
        _, sw = yield exchange(transmit, apdu(0x00, 0xA4, 0x08, 0x0C, CERT_PATH))
        if sw != 0x9000:
            self.log.info("PostSignum card without certificate EF 1400/9001/2002 ({sw:04X})", sw=sw)
            return []
        header = yield read_binary(transmit, 4)
        size = der_length(header or b"")
        der = (yield read_binary(transmit, size)) if size else None
        cert = CardCertificate.from_der(der, KEY_ID) if der else None
        if cert is None or cert.key_type != "rsa":
            self.log.info("PostSignum EF 2002 does not hold a usable RSA certificate")
            return []
        return [cert]

    @inlineCallbacks
    def verify_pin(self, transmit, pin, cert):
        raw = pin.encode("utf-8")
        if not 4 <= len(raw) <= 16:
            raise CardError(errors.BAD_PIN, "not a PostSignum PIN (4 to 16 characters)")
        if not (yield self.select(transmit)):
            raise CardError(errors.FAILED, "PostSignum application not found")
        _, sw = yield exchange(transmit, apdu(0x00, 0x20, 0x00, PIN_REF, raw))
        if sw == 0x9000:
            return
        failure = pin_failure(sw, "PostSignum VERIFY")
        if failure is not None:
            raise failure
        raise CardError(errors.FAILED, f"PostSignum VERIFY {sw:04X}")

    @inlineCallbacks
    def sign(self, transmit, cert, digest):
        block = pkcs1_block(digest, cert.key_bits // 8)
        for step, command in (("MSE:RESTORE", apdu(0x00, 0x22, 0xF3, 0x03)),
                              ("MSE:SET", apdu(0x00, 0x22, 0xF1, 0xB8, bytes([0x83, 0x01, cert.key_ref])))):
            _, sw = yield exchange(transmit, command)
            if sw != 0x9000:
                raise CardError(errors.FAILED, f"PostSignum {step} {sw:04X}")
        signature, sw = yield send_chained(transmit, 0x00, 0x2A, 0x80, 0x86, b"\x00" + block, 0)
        if sw in (0x6982, 0x6983):
            raise CardError(errors.BAD_PIN, f"PostSignum PSO:DECIPHER {sw:04X}")
        if sw != 0x9000 or len(signature) != len(block):
            raise CardError(errors.FAILED, f"PostSignum PSO:DECIPHER {sw:04X}")
        return signature
