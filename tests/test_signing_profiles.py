"""The PIV and OpenPGP profiles against the emulated cards, synchronously
(``transmit`` returns already-fired Deferreds)."""

import hashlib
import zlib

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, utils
from twisted.internet.defer import succeed
from twisted.trial.unittest import SynchronousTestCase

from cloudfoxy_proxy import errors
from cloudfoxy_proxy.cards.iso7816 import Iso7816Card
from cloudfoxy_proxy.cards.openpgp import OpenPgpCard
from cloudfoxy_proxy.cards.piv import TAG_CERT_9C, PivCard
from cloudfoxy_proxy.apdu import tlv
from cloudfoxy_proxy.errors import CardError
from cloudfoxy_proxy.signing.profiles import (
    PROFILES, WrongPin, digest_info, exchange, pkcs1_block, raw_to_der, send_chained,
)
from cloudfoxy_proxy.signing.profiles.openpgp import OpenPgpProfile
from cloudfoxy_proxy.signing.profiles.piv import PivProfile

HASH = {20: hashes.SHA1(), 32: hashes.SHA256(), 48: hashes.SHA384(), 64: hashes.SHA512()}
DIGESTS = [hashlib.sha1(b"x").digest(), hashlib.sha256(b"x").digest(),
           hashlib.sha384(b"x").digest(), hashlib.sha512(b"x").digest()]


class Recorder:
    """``transmit`` for a card, recording every command APDU."""

    def __init__(self, card):
        self.card = card
        self.sent = []

    def __call__(self, apdu):
        self.sent.append(apdu.hex().upper())
        return succeed(self.card.transmit(apdu))


def verify_signature(cert, digest, signature):
    key = cert.public_key()
    algorithm = utils.Prehashed(HASH[len(digest)])
    if isinstance(key, ec.EllipticCurvePublicKey):
        key.verify(signature, digest, ec.ECDSA(algorithm))
    else:
        key.verify(signature, digest, padding.PKCS1v15(), algorithm)


class HelperTests(SynchronousTestCase):
    def test_exchange_follows_61xx_and_6cxx(self):
        class Card:
            def __init__(self):
                self.log = []

            def __call__(self, apdu):
                self.log.append(apdu.hex().upper())
                if apdu == bytes.fromhex("00CA000000"):
                    return succeed(bytes.fromhex("6C04"))
                if apdu == bytes.fromhex("00CA000004"):
                    return succeed(bytes.fromhex("AABB6102"))
                return succeed(bytes.fromhex("CCDD9000"))

        card = Card()
        self.assertEqual(self.successResultOf(exchange(card, bytes.fromhex("00CA000000"))),
                         (bytes.fromhex("AABBCCDD"), 0x9000))
        self.assertEqual(card.log, ["00CA000000", "00CA000004", "00C0000002"])

    def test_send_chained_splits_long_data(self):
        sent = []

        def transmit(apdu):
            sent.append(apdu)
            return succeed(b"\x90\x00")

        self.successResultOf(send_chained(transmit, 0, 0x87, 7, 0x9A, bytes(600), 0))
        self.assertEqual([(a[0], a[4], len(a)) for a in sent], [(0x10, 255, 260), (0x10, 255, 260), (0, 90, 96)])

    def test_digest_info_and_blocks(self):
        self.assertEqual(len(digest_info(bytes(32))), 51)
        self.assertRaises(CardError, digest_info, bytes(31))
        block = pkcs1_block(bytes(20), 128)
        self.assertEqual(block, b"\x00\x01" + b"\xff" * (128 - 3 - 35) + b"\x00" + digest_info(bytes(20)))
        self.assertRaises(CardError, pkcs1_block, bytes(64), 64)  # too small a key
        self.assertRaises(CardError, raw_to_der, b"\x01\x02\x03")

    def test_profiles_list(self):
        from cloudfoxy_proxy.signing.profiles.ica import IcaProfile
        from cloudfoxy_proxy.signing.profiles.postsignum import PostSignumProfile

        self.assertEqual(PROFILES, (PivProfile, OpenPgpProfile, PostSignumProfile, IcaProfile))


class PivProfileTests(SynchronousTestCase):
    def setUp(self):
        self.card = PivCard(serial=5, label="Prof")
        self.t = Recorder(self.card)
        self.p = PivProfile()

    def test_detect(self):
        self.assertTrue(self.successResultOf(self.p.detect(self.t)))
        self.assertFalse(self.successResultOf(self.p.detect(Recorder(Iso7816Card(serial=0)))))
        self.assertFalse(self.successResultOf(self.p.detect(Recorder(OpenPgpCard(serial=0, label="Prof")))))

    def test_certificates(self):
        certs = self.successResultOf(self.p.certificates(self.t))
        self.assertEqual([(c.alias, c.key_ref, c.key_type, c.key_bits) for c in certs],
                         [("Prof PIV 05 Signing", 0x9C, "ec", 256),
                          ("Prof PIV 05 Authentication", 0x9A, "rsa", 2048)])
        self.assertEqual(certs[0].subject, "CN=Prof PIV 05 Signing,O=CloudFoxy Emulated")
        self.assertTrue(all(c.usable for c in certs))

    def test_compressed_certificate(self):
        der = self.card.keys[0x9C][1].der
        packed = zlib.compress(der)
        gz = zlib.compressobj(wbits=31)
        packed = gz.compress(der) + gz.flush()
        self.card.objects[TAG_CERT_9C] = tlv(0x70, packed) + tlv(0x71, b"\x01") + tlv(0xFE, b"")
        certs = self.successResultOf(self.p.certificates(self.t))
        self.assertEqual(certs[0].der, der)

    def test_sign_every_hash_with_both_keys(self):
        certs = self.successResultOf(self.p.certificates(self.t))
        for cert in certs:
            for digest in DIGESTS:
                self.successResultOf(self.p.verify_pin(self.t, "123456", cert))
                signature = self.successResultOf(self.p.sign(self.t, cert, digest))
                verify_signature(cert, digest, signature)

    def test_sign_sequence_is_select_verify_authenticate(self):
        cert = self.successResultOf(self.p.certificates(self.t))[0]
        self.t.sent.clear()
        self.successResultOf(self.p.verify_pin(self.t, "123456", cert))
        self.successResultOf(self.p.sign(self.t, cert, DIGESTS[1]))
        self.assertEqual([a[:8] for a in self.t.sent], ["00A40400", "00200080", "0087119C"])
        self.assertNotIn("123456", "".join(self.t.sent[:1] + self.t.sent[2:]))

    def test_wrong_pin(self):
        cert = self.successResultOf(self.p.certificates(self.t))[0]
        f = self.failureResultOf(self.p.verify_pin(self.t, "654321", cert), WrongPin)
        self.assertEqual(f.value.code, errors.BAD_PIN)
        self.assertEqual(self.card.pin_tries, 2)

    def test_impossible_pin_is_not_sent(self):
        cert = self.successResultOf(self.p.certificates(self.t))[0]
        self.t.sent.clear()
        for pin in ("12345", "123456789"):
            f = self.failureResultOf(self.p.verify_pin(self.t, pin, cert), CardError)
            self.assertEqual(f.value.code, errors.BAD_PIN)
        self.assertEqual(self.t.sent, [])
        self.assertEqual(self.card.pin_tries, 3)

    def test_sign_without_pin_is_c085(self):
        cert = self.successResultOf(self.p.certificates(self.t))[0]
        f = self.failureResultOf(self.p.sign(self.t, cert, DIGESTS[1]), CardError)
        self.assertEqual(f.value.code, errors.BAD_PIN)


class OpenPgpProfileTests(SynchronousTestCase):
    def setUp(self):
        self.p = OpenPgpProfile()

    def card(self, serial):
        card = OpenPgpCard(serial=serial, label="Prof")
        return card, Recorder(card)

    def test_detect(self):
        card, t = self.card(0)
        self.assertTrue(self.successResultOf(self.p.detect(t)))
        self.assertFalse(self.successResultOf(self.p.detect(Recorder(PivCard(serial=0, label="Prof")))))

    def test_certificates_and_signing_rsa_and_ec(self):
        for serial, kind in ((0, "rsa"), (1, "ec")):
            card, t = self.card(serial)
            [cert] = self.successResultOf(self.p.certificates(t))
            self.assertEqual((cert.alias, cert.key_ref, cert.key_type), (f"Prof OpenPGP {serial:02d} Signing", "sig", kind))
            for digest in DIGESTS:
                self.successResultOf(self.p.verify_pin(t, "123456", cert))
                signature = self.successResultOf(self.p.sign(t, cert, digest))
                verify_signature(cert, digest, signature)
            self.assertEqual(card.signature_counter, 4)

    def test_certificate_of_the_authentication_key(self):
        card, t = self.card(1)
        # 7F21 now holds the authentication key's certificate
        card.sig = type(card.sig)(card.sig.key, card.aut.cert)
        [cert] = self.successResultOf(self.p.certificates(t))
        self.assertEqual(cert.key_ref, "aut")
        self.successResultOf(self.p.verify_pin(t, "123456", cert))
        self.assertEqual(t.sent[-1][:8], "00200082")
        signature = self.successResultOf(self.p.sign(t, cert, DIGESTS[1]))
        self.assertEqual(t.sent[-1][:8], "00880000")
        verify_signature(cert, DIGESTS[1], signature)

    def test_certificate_matching_no_key_is_ignored(self):
        card, t = self.card(0)
        other = OpenPgpCard(serial=2, label="Prof")
        # 7F21 shows another card's certificate: it matches neither key here
        card.sig = type(card.sig)(card.sig.key, other.sig.cert)
        self.assertEqual(self.successResultOf(self.p.certificates(t)), [])

    def test_wrong_pin(self):
        card, t = self.card(0)
        [cert] = self.successResultOf(self.p.certificates(t))
        self.failureResultOf(self.p.verify_pin(t, "000000", cert), WrongPin)
        self.assertEqual(card.pw1.tries, 2)
        f = self.failureResultOf(self.p.verify_pin(t, "12345", cert), CardError)  # too short, not sent
        self.assertEqual(f.value.code, errors.BAD_PIN)
        self.assertEqual(card.pw1.tries, 2)
