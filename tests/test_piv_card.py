"""The emulated PIV card at the APDU level (NIST SP 800-73-4)."""

import hashlib

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, utils
from twisted.trial.unittest import SynchronousTestCase

from cloudfoxy_proxy.cards.piv import PIV_AID, PivCard, pad_pin, parse_tlvs
from cloudfoxy_proxy.signing.profiles import pkcs1_block
from support import card_collect, card_tx

PIN = pad_pin("123456").hex().upper()


tx, collect = card_tx, card_collect


def ga_template(challenge):
    body = b"\x82\x00\x81" + (bytes([0x82]) + len(challenge).to_bytes(2, "big") if len(challenge) > 255
                             else bytes([0x81, len(challenge)]) if len(challenge) > 127
                             else bytes([len(challenge)])) + challenge
    n = len(body)
    length = bytes([0x82]) + n.to_bytes(2, "big") if n > 255 else bytes([0x81, n]) if n > 127 else bytes([n])
    return b"\x7C" + length + body


class PivCardTests(SynchronousTestCase):
    def setUp(self):
        self.card = PivCard(serial=3, label="Test")
        # no Le: answered anyway, as T=1 cards do
        self.assertTrue(tx(self.card, "00A4040005A000000308").startswith("6139"))

    def test_select_by_partial_and_full_aid_and_unknown(self):
        card = PivCard(serial=3, label="Test")
        data, sw = collect(card, "00A40400 0B" + PIV_AID.hex() + "00")
        self.assertEqual(sw, "9000")
        apt = dict(parse_tlvs(data))[0x61]
        self.assertEqual(dict(parse_tlvs(apt))[0x4F], PIV_AID[5:])
        self.assertEqual(tx(card, "00A4040C05A000000308"), "9000")
        self.assertEqual(tx(card, "00A4040005A000000309"), "6A82")
        self.assertEqual(tx(card, "00A4040003A00000"), "6A82")  # shorter than the RID

    def test_instructions_need_the_application(self):
        card = PivCard(serial=3, label="Test")
        self.assertEqual(tx(card, "00CB3FFF035C017E00"), "6D00")

    def test_discovery_object_and_missing_objects(self):
        data, sw = collect(self.card, "00CB3FFF035C017E00")
        self.assertEqual(sw, "9000")
        disc = dict(parse_tlvs(data))[0x7E]
        self.assertEqual(dict(parse_tlvs(disc))[0x4F], PIV_AID)
        self.assertEqual(tx(self.card, "00CB3FFF055C035FC10B00"), "6A82")  # no key 9D certificate
        self.assertEqual(tx(self.card, "00CB3FFF055C035FC10600"), "6A82")
        self.assertEqual(tx(self.card, "00CB3FFE055C035FC10200"), "6A86")
        self.assertEqual(tx(self.card, "00CB3FFF055D035FC10200"), "6A80")

    def test_chuid_and_ccc(self):
        for tag in ("5FC102", "5FC107"):
            data, sw = collect(self.card, f"00CB3FFF055C03{tag}00")
            self.assertEqual(sw, "9000")
            self.assertEqual(parse_tlvs(data)[0][0], 0x53)

    def test_certificates_le_honoured_with_get_response(self):
        out = tx(self.card, "00CB3FFF055C035FC10520")  # Le 32
        self.assertEqual(len(out), 2 * 32 + 4)
        self.assertEqual(out[-4:-2], "61")
        data = bytes.fromhex(out[:-4])
        first = tx(self.card, "00C0000010")  # Le 16 from the rest
        self.assertEqual(len(first), 2 * 16 + 4)
        data += bytes.fromhex(first[:-4])
        more, sw = collect(self.card, "00C00000" + first[-2:])
        self.assertEqual(sw, "9000")
        data += more
        container = dict(parse_tlvs(data))[0x53]
        inner = dict(parse_tlvs(container))
        self.assertEqual(inner[0x71], b"\x00")
        cert = x509.load_der_x509_certificate(inner[0x70])
        self.assertEqual(cert.subject.rfc4514_string(),
                         "CN=Test PIV 03 Authentication,O=CloudFoxy Emulated")
        data9c, _ = collect(self.card, "00CB3FFF055C035FC10A00")
        cert9c = x509.load_der_x509_certificate(dict(parse_tlvs(dict(parse_tlvs(data9c))[0x53]))[0x70])
        self.assertIn("Test PIV 03 Signing", cert9c.subject.rfc4514_string())
        usage = cert9c.extensions.get_extension_for_class(x509.KeyUsage).value
        self.assertTrue(usage.digital_signature)

    def test_extended_le_gets_everything_at_once(self):
        out = tx(self.card, "00CB3FFF00 0005 5C035FC105 0000")
        self.assertEqual(out[-4:], "9000")
        self.assertGreater(len(out), 1000)

    def test_verify_counter_block_and_status(self):
        c = self.card
        self.assertEqual(tx(c, "0020008000"[:8]), "63C3")  # no data: status
        self.assertEqual(tx(c, "0020008008" + pad_pin("111111").hex()), "63C2")
        self.assertEqual(tx(c, "0020008008" + pad_pin("111111").hex()), "63C1")
        self.assertEqual(tx(c, "00200080"), "63C1")
        self.assertEqual(tx(c, "0020008008" + PIN), "9000")  # right PIN resets the counter
        self.assertEqual(tx(c, "00200080"), "9000")
        self.assertEqual(tx(c, "002000FF" + "")[:4], "6A88")  # P1=00 P2=FF: no such PIN
        self.assertEqual(tx(c, "00"
                            "2000800412345678"), "6A80")  # not 8 bytes
        self.assertEqual(tx(c, "00200081"), "6A88")
        self.assertEqual(tx(c, "00200180"), "6A86")
        self.assertEqual(tx(c, "00 20 FF 80"), "9000")  # reset security status
        self.assertEqual(tx(c, "00200080"), "63C3")
        for left in (2, 1, 0):
            self.assertEqual(tx(c, "0020008008" + pad_pin("999999").hex()), "63C%d" % left)
        self.assertEqual(tx(c, "0020008008" + PIN), "6983")  # blocked
        self.assertEqual(tx(c, "00200080"), "6983")

    def test_rsa_9a_general_authenticate_with_chaining(self):
        c = self.card
        digest = hashlib.sha256(b"data").digest()
        block = pkcs1_block(digest, 256)
        template = ga_template(block)
        self.assertGreater(len(template), 255)
        parts = [template[:255], template[255:]]
        # without the PIN: security status not satisfied
        self.assertEqual(tx(c, "10870 79A FF".replace(" ", "") + parts[0].hex()), "9000")
        self.assertEqual(tx(c, "0087079A%02X" % len(parts[1]) + parts[1].hex() + "00"), "6982")
        self.assertEqual(tx(c, "0020008008" + PIN), "9000")
        self.assertEqual(tx(c, "1087079AFF" + parts[0].hex()), "9000")
        data, sw = collect(c, "0087079A%02X" % len(parts[1]) + parts[1].hex() + "00")
        self.assertEqual(sw, "9000")
        sig = dict(parse_tlvs(dict(parse_tlvs(data))[0x7C]))[0x82]
        self.assertEqual(len(sig), 256)
        # raw RSA: the public operation gives back the block
        pub = c.keys[0x9A][1].cert.public_key().public_numbers()
        self.assertEqual(pow(int.from_bytes(sig, "big"), pub.e, pub.n).to_bytes(256, "big"), block)
        # PIN stays valid for 9A (not PIN-always)
        self.assertEqual(tx(c, "1087079AFF" + parts[0].hex()), "9000")
        self.assertEqual(collect(c, "0087079A%02X" % len(parts[1]) + parts[1].hex() + "00")[1], "9000")

    def test_ecdsa_9c_is_pin_always(self):
        c = self.card
        digest = hashlib.sha256(b"data").digest()
        apdu = "0087119C" + "%02X" % len(ga_template(digest)) + ga_template(digest).hex() + "00"
        self.assertEqual(tx(c, apdu), "6982")
        self.assertEqual(tx(c, "0020008008" + PIN), "9000")
        data, sw = collect(c, apdu)
        self.assertEqual(sw, "9000")
        sig = dict(parse_tlvs(dict(parse_tlvs(data))[0x7C]))[0x82]
        c.keys[0x9C][1].cert.public_key().verify(sig, digest, ec.ECDSA(utils.Prehashed(hashes.SHA256())))
        self.assertEqual(tx(c, apdu), "6982")  # the PIN was used up
        self.assertEqual(tx(c, "00200080"), "9000")  # yet the PIN status is still "verified"

    def test_general_authenticate_errors(self):
        c = self.card
        tx(c, "0020008008" + PIN)
        t = "26" + ga_template(bytes(32)).hex()
        self.assertEqual(tx(c, "0087079C" + t), "6A86")  # wrong algorithm for 9C
        self.assertEqual(tx(c, "0087119D" + t), "6A88")  # no key 9D
        self.assertEqual(tx(c, "0087119C04" + "7C028000"), "6A80")  # not "sign this"
        self.assertEqual(tx(c, "0087119C03" + "7C0582"), "6A80")  # malformed TLV
        self.assertEqual(tx(c, "0087119C27" + ga_template(bytes(33)).hex()), "6A80")  # not 32 bytes
        self.assertEqual(tx(c, "0087079A05" + "1087079A00"), "6A80")

    def test_chaining_must_continue_the_same_command(self):
        c = self.card
        self.assertEqual(tx(c, "1087079A02" + "7C00"), "9000")
        self.assertEqual(tx(c, "00CB3FFF035C017E00"), "6883")
        self.assertEqual(tx(c, "00CB3FFF035C017E00")[-4:], "9000")  # chain state cleared

    def test_reset_clears_pin_and_selection(self):
        c = self.card
        tx(c, "0020008008" + PIN)
        c.reset()
        self.assertEqual(tx(c, "00200080"), "6D00")
        tx(c, "00A4040C05A000000308")
        self.assertEqual(tx(c, "00200080"), "63C3")

    def test_cla_and_yubico_extensions(self):
        self.assertEqual(tx(self.card, "80FD000000"), "6E00")
        self.assertEqual(tx(self.card, "00FD000000"), "0504039000")
        self.assertEqual(tx(self.card, "00F8000000"), "%08X9000" % self.card.yubico_serial)
        self.assertNotEqual(tx(PivCard(serial=4, label="Test"), "00F8000000"), tx(self.card, "00F8000000"))

    def test_keys_are_cached_per_process(self):
        again = PivCard(serial=3, label="Test")
        self.assertEqual(again.keys[0x9A][1].der, self.card.keys[0x9A][1].der)
        self.assertRaises(ValueError, PivCard, serial=1, pin="12345")
