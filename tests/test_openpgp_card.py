"""The emulated OpenPGP card (v3.4) at the APDU level."""

import hashlib

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, utils
from twisted.trial.unittest import SynchronousTestCase

from cloudfoxy_proxy.cards.openpgp import HISTORICAL, OpenPgpCard, fingerprint
from cloudfoxy_proxy.apdu import parse_tlvs
from cloudfoxy_proxy.signing.profiles import digest_info, raw_to_der
from support import card_collect, card_tx

PW1 = b"123456".hex()
PW3 = b"12345678".hex()


tx, collect = card_tx, card_collect


def verify(card, ref, pw=PW1):
    return tx(card, "002000%02X%02X" % (ref, len(pw) // 2) + pw)


class OpenPgpCardTests(SynchronousTestCase):
    def setUp(self):
        self.rsa = OpenPgpCard(serial=0, label="Test")
        self.ec = OpenPgpCard(serial=1, label="Test")
        for card in (self.rsa, self.ec):
            self.assertEqual(tx(card, "00A4040006D27600012401"), "9000")

    def test_select_and_aid(self):
        card = OpenPgpCard(serial=0, label="Test")
        self.assertEqual(tx(card, "00CA004F00"), "6D00")  # nothing selected
        self.assertEqual(tx(card, "00A4040006D27600012402"), "6A82")
        self.assertEqual(tx(card, "00A4040006D27600012401"), "9000")
        aid = tx(card, "00CA004F00")
        self.assertEqual(aid[:16], "D276000124010304")  # v3.4
        self.assertEqual(aid[16:20], "FFFF")  # test card
        self.assertEqual(aid[-4:], "9000")
        self.assertEqual(card.atr[-len(HISTORICAL) - 1:-1], HISTORICAL)

    def test_application_related_data(self):
        data, sw = collect(self.rsa, "00CA006E00")
        self.assertEqual(sw, "9000")
        outer = dict(parse_tlvs(data))[0x6E]
        top = dict(parse_tlvs(outer))
        self.assertEqual(top[0x4F][:6], bytes.fromhex("D27600012401"))
        self.assertEqual(top[0x5F52], HISTORICAL)
        disc = dict(parse_tlvs(top[0x73]))
        self.assertEqual(disc[0xC1], bytes.fromhex("010800002000"))  # RSA 2048, e 32 bits
        self.assertEqual(disc[0xC4], bytes([0, 127, 127, 127, 3, 0, 3]))
        self.assertEqual(len(disc[0xC5]), 60)
        self.assertEqual(disc[0xC5][20:40], bytes(20))  # no decryption key
        ec_disc = dict(parse_tlvs(dict(parse_tlvs(dict(parse_tlvs(collect(self.ec, "00CA006E00")[0]))[0x6E]))[0x73]))
        self.assertEqual(ec_disc[0xC1], bytes.fromhex("132A8648CE3D030107"))  # ECDSA P-256

    def test_fingerprint_is_the_openpgp_v4_fingerprint(self):
        fprs = bytes.fromhex(tx(self.rsa, "00CA00C500")[:-4])
        key = self.rsa.sig.key.public_key()
        self.assertEqual(fprs[:20], fingerprint(key, self.rsa.created[0xB6]))
        # independent check of the v4 packet layout for RSA
        n = key.public_numbers().n.to_bytes(256, "big")
        body = b"\x04" + self.rsa.created[0xB6].to_bytes(4, "big") + b"\x01" + b"\x08\x00" + n + b"\x00\x11\x01\x00\x01"
        self.assertEqual(fprs[:20], hashlib.sha1(b"\x99" + len(body).to_bytes(2, "big") + body).digest())

    def test_other_data_objects(self):
        c = self.rsa
        data, sw = collect(c, "00CA006500")
        self.assertEqual((sw, parse_tlvs(data)[0][0]), ("9000", 0x65))
        self.assertEqual(tx(c, "00CA007A00"), "7A05930300000" + "09000")
        self.assertEqual(tx(c, "00CA5F5000"), "9000")
        self.assertEqual(tx(c, "00CA010100"), "9000")
        self.assertEqual(tx(c, "00CA00C400"), "007F7F7F0300039000")
        self.assertEqual(tx(c, "00CA7F7400"), "6A88")
        data, sw = collect(c, "00CA7F2100")
        self.assertEqual(sw, "9000")
        cert = x509.load_der_x509_certificate(dict(parse_tlvs(data))[0x7F21])
        self.assertIn("CN=Test OpenPGP 00 Signing", cert.subject.rfc4514_string())

    def test_public_key_read(self):
        data, sw = collect(self.rsa, "00478100 02 B600 00")
        self.assertEqual(sw, "9000")
        items = dict(parse_tlvs(dict(parse_tlvs(data))[0x7F49]))
        numbers = self.rsa.sig.key.public_key().public_numbers()
        self.assertEqual(int.from_bytes(items[0x81], "big"), numbers.n)
        self.assertEqual(int.from_bytes(items[0x82], "big"), 65537)
        data, sw = collect(self.ec, "00478100 02 A400 00")
        point = dict(parse_tlvs(dict(parse_tlvs(data))[0x7F49]))[0x86]
        self.assertEqual(len(point), 65)
        self.assertEqual(tx(self.rsa, "0047810002B80000"), "6A88")  # no decryption key
        self.assertEqual(tx(self.rsa, "0047800002B60000"), "6982")  # generation needs PW3

    def test_verify(self):
        c = self.rsa
        self.assertEqual(tx(c, "00200081"), "63C3")
        self.assertEqual(verify(c, 0x81, b"000000".hex()), "6982")
        self.assertEqual(tx(c, "00200081"), "63C2")
        self.assertEqual(tx(c, "00200082"), "63C2")  # PW1 is one password for 81 and 82
        self.assertEqual(verify(c, 0x81), "9000")
        self.assertEqual(tx(c, "00200081"), "9000")
        self.assertEqual(tx(c, "00200082"), "63C3")  # 82 not verified
        self.assertEqual(tx(c, "002000FF"[:6] + "84"), "6A86")
        self.assertEqual(tx(c, "0020FF81"), "9000")
        self.assertEqual(tx(c, "00200081"), "63C3")
        self.assertEqual(verify(c, 0x83, PW3), "9000")
        for expected in ("6982", "6982", "6983", "6983"):
            self.assertEqual(verify(c, 0x81, b"000000".hex()), expected)
        self.assertEqual(verify(c, 0x81), "6983")  # blocked

    def test_rsa_signature_counter_and_forced_pin(self):
        c = self.rsa
        digest = hashlib.sha256(b"data").digest()
        info = digest_info(digest)
        cds = "002A9E9A%02X" % len(info) + info.hex() + "00"
        self.assertEqual(tx(c, cds), "6982")
        self.assertEqual(verify(c, 0x81), "9000")
        sig, sw = collect(c, cds)
        self.assertEqual(sw, "9000")
        c.sig.key.public_key().verify(sig, digest, padding.PKCS1v15(), utils.Prehashed(hashes.SHA256()))
        self.assertEqual(tx(c, cds), "6982")  # PW1 valid for one signature only
        self.assertEqual(tx(c, "00CA009300"), "0000019000")
        self.assertEqual(tx(c, "002A9E9A00" if False else "002A9E9A01FF00")[-4:], "6982")
        verify(c, 0x81)
        self.assertEqual(tx(c, "002A9E9A67" + "00" * 103 + "00"), "6700")  # over 40% of the modulus

    def test_ecdsa_raw_signature_and_internal_authenticate(self):
        c = self.ec
        digest = hashlib.sha256(b"data").digest()
        verify(c, 0x81)
        sig, sw = collect(c, "002A9E9A20" + digest.hex() + "00")
        self.assertEqual((sw, len(sig)), ("9000", 64))
        c.sig.key.public_key().verify(raw_to_der(sig), digest, ec.ECDSA(utils.Prehashed(hashes.SHA256())))
        self.assertEqual(tx(c, "0088000020" + digest.hex() + "00"), "6982")
        verify(c, 0x82)
        sig, sw = collect(c, "0088000020" + digest.hex() + "00")
        c.aut.key.public_key().verify(raw_to_der(sig), digest, ec.ECDSA(utils.Prehashed(hashes.SHA256())))
        self.assertEqual(tx(c, "0088000020" + digest.hex() + "00")[-4:], "9000")  # 82 stays valid
        self.assertEqual(tx(c, "002A8086 01 00".replace(" ", "")), "6A88")  # no decryption key

    def test_long_digest_info_by_chaining(self):
        c = self.rsa
        digest = hashlib.sha512(b"data").digest()
        info = digest_info(digest)
        verify(c, 0x81)
        self.assertEqual(tx(c, "102A9E9A10" + info[:16].hex()), "9000")
        sig, sw = collect(c, "002A9E9A%02X" % (len(info) - 16) + info[16:].hex() + "00")
        self.assertEqual(sw, "9000")
        c.sig.key.public_key().verify(sig, digest, padding.PKCS1v15(), utils.Prehashed(hashes.SHA512()))

    def test_get_challenge(self):
        out = tx(self.rsa, "0084000010")
        self.assertEqual((len(out), out[-4:]), (36, "9000"))
