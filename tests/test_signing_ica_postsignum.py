"""The emulated I.CA and PostSignum cards, their profiles, and ENUM,
ALIASES, CHAIN and SIGN on them through the in-memory line protocol."""

import hashlib

from cryptography import x509
from twisted.internet.defer import succeed
from twisted.internet.task import Clock
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from cloudfoxy_proxy import errors
from cloudfoxy_proxy.apdu import parse_tlvs
from cloudfoxy_proxy.cards.ica import IcaCard
from cloudfoxy_proxy.cards.pki import get_pki
from cloudfoxy_proxy.cards.postsignum import PostSignumCard
from cloudfoxy_proxy.signing.index import CertIndex
from cloudfoxy_proxy.signing.profiles import PinBlocked, WrongPin, digest_info
from cloudfoxy_proxy.signing.profiles.ica import IcaProfile, parse_descriptor
from cloudfoxy_proxy.signing.profiles.postsignum import PostSignumProfile
from cloudfoxy_proxy.registry import ReaderRegistry
from support import card_collect, card_tx
from test_signing_commands import Harness, b64list, backend, verify
from test_signing_profiles import Recorder

SHA256 = hashlib.sha256(b"message").digest()
DIGESTS = {n: hashlib.sha512(b"digest").digest()[:n] for n in (20, 32, 48, 64)}


def ica_cert_apdus(card):
    """The certificates of an I.CA card read the way FoxyProxy 2.10 does:
    records of EF 5630, then each certificate by 256-byte pages."""
    ders = []
    for number in range(1, 10):
        card_tx(card, "00A4000C023F00")
        card_tx(card, "00A4010C023F50")
        card_tx(card, "00A4010C023F10")
        assert card_tx(card, "00A4020C025630") == "9000"
        answer = card_tx(card, "00B2%02X0400" % number)
        if answer[-4:] != "9000":
            assert answer == "6A83"
            break
        df, ef, size = parse_descriptor(bytes.fromhex(answer[:-4]))
        card_tx(card, "00A4000C023F00")
        card_tx(card, "00A4010C023F50")
        assert card_tx(card, "00A4010C02%04X" % df) == "9000"
        assert card_tx(card, "00A4020C02%04X" % ef) == "9000"
        der = b""
        page = 0
        while len(der) < size:
            answer = card_tx(card, "00B0%02X0000" % page)
            assert answer[-4:] == "9000"
            der += bytes.fromhex(answer[:-4])
            page += 1
        assert len(der) == size
        ders.append(der)
    return ders


class IcaCardTests(SynchronousTestCase):
    def setUp(self):
        self.card = IcaCard(serial=0, label="T")
        self.pki = get_pki()

    def test_certificates_in_records_and_pages(self):
        ders = ica_cert_apdus(self.card)
        self.assertEqual(ders, [self.card.pair.der, self.pki.issuer.der, self.pki.root.der])

    def test_signature_flow(self):
        card = self.card
        self.assertEqual(card_tx(card, "00A4000C023F00"), "9000")
        self.assertEqual(card_tx(card, "00A4010C020604"), "9000")
        self.assertEqual(card_tx(card, "0020008606313233343536"), "9000")
        self.assertEqual(card_tx(card, "0020008106313233343536"), "9000")
        self.assertEqual(card_tx(card, "002241AA0489021430"), "9000")
        self.assertEqual(card_tx(card, "002241B60A8403800F00 8903132330"), "6A88")  # no key 0F
        self.assertEqual(card_tx(card, "002241B60A8403800200 8903132330"), "9000")
        self.assertEqual(card_tx(card, "002A9E9A00"), "6985")  # no hash yet
        self.assertEqual(card_tx(card, "002A90A0229020" + SHA256.hex()), "9000")
        signature, sw = card_collect(card, "002A9E9A00")
        self.assertEqual((sw, len(signature)), ("9000", 256))
        verify(card.pair.der, SHA256, signature)
        # PIN always: the next signature needs a new VERIFY 86
        self.assertEqual(card_tx(card, "002A90A0229020" + SHA256.hex()), "9000")
        self.assertEqual(card_tx(card, "002A9E9A00"), "6982")

    def test_pin_counter_and_block(self):
        card = self.card
        card_tx(card, "00A4010C020604")
        self.assertEqual(card_tx(card, "0020008604" + b"0000".hex()), "63C2")
        self.assertEqual(card_tx(card, "00200086"), "63C2")
        self.assertEqual(card_tx(card, "0020008604" + b"0000".hex()), "63C1")
        self.assertEqual(card_tx(card, "0020008604" + b"0000".hex()), "6983")
        self.assertEqual(card_tx(card, "0020008606313233343536"), "6983")  # blocked: even the right PIN
        self.assertEqual(card_tx(card, "0020008106313233343536"), "9000")  # the global PIN is another
        card_tx(card, "00A4000C023F00")
        self.assertEqual(card_tx(card, "0020008606313233343536"), "6A88")  # local PIN outside its DF

    def test_bad_commands(self):
        card = self.card
        card_tx(card, "00A4000C023F00")
        card_tx(card, "00A4010C023F50")
        card_tx(card, "00A4010C023F10")
        card_tx(card, "00A4020C025630")
        self.assertEqual(card_tx(card, "00B0000000"), "6981")  # READ BINARY on a record file
        self.assertEqual(card_tx(card, "00B2000400"), "6A86")
        self.assertEqual(card_tx(card, "00B2010500"), "6A86")
        self.assertEqual(card_tx(card, "002241AA0489021499"), "6A80")
        self.assertEqual(card_tx(card, "002A90A0029005"), "6A80")
        self.assertEqual(card_tx(card, "002A9E9A0100"), "6700")


class PostSignumCardTests(SynchronousTestCase):
    def setUp(self):
        self.card = PostSignumCard(serial=3, label="T")

    def test_files(self):
        card = self.card
        self.assertEqual(card_tx(card, "00A4040010A0000000770103000610000000000002")[-4:], "9000")
        self.assertEqual(card_tx(card, "00A408000410001003")[-4:], "9000")
        number = card_tx(card, "00B0000010")
        self.assertRegex(bytes.fromhex(number[:-4]).decode(), r"^\d{16}$")
        self.assertEqual(number[-4:], "9000")
        self.assertEqual(card_tx(card, "00A408000614009001200200")[-4:], "9000")
        header = card_tx(card, "00B0000004")
        self.assertEqual(header, card.pair.der[:4].hex().upper() + "9000")
        size = 4 + int(header[4:8], 16)
        der = b""
        while len(der) < size:  # 100 bytes a time, offset in P1-P2
            answer = card_tx(card, "00B0%04X%02X" % (len(der), min(100, size - len(der))))
            self.assertEqual(answer[-4:], "9000")
            der += bytes.fromhex(answer[:-4])
        self.assertEqual(der, card.pair.der)

    def _block(self, digest):
        info = digest_info(digest)
        return b"\x00\x01" + b"\xff" * (256 - 3 - len(info)) + b"\x00" + info

    def test_signature_with_chaining(self):
        card = self.card
        card_tx(card, "00A4040010A0000000770103000610000000000002")
        self.assertEqual(card_tx(card, "0020001006313233343536"), "9000")
        self.assertEqual(card_tx(card, "0022F303"), "9000")
        self.assertEqual(card_tx(card, "0022F1B80383010E"), "9000")
        data = b"\x00" + self._block(SHA256)
        self.assertEqual(card_tx(card, "102A8086" + "81" + data[:129].hex() + "00"), "9000")
        answer = card_tx(card, "002A8086" + "80" + data[129:].hex() + "00")
        self.assertEqual(answer[-4:], "9000")
        verify(card.pair.der, SHA256, bytes.fromhex(answer[:-4]))

    def test_last_part_still_marked_chained_gives_no_signature(self):
        # FoxyProxy 2.10's postsignum profile sends both parts with CLA 10:
        # ISO 7816-4 reads that as "more to come", so there is no answer yet.
        card = self.card
        card_tx(card, "0020001006313233343536")
        card_tx(card, "0022F1B80383010E")
        data = b"\x00" + self._block(SHA256)
        self.assertEqual(card_tx(card, "102A8086" + "81" + data[:129].hex() + "00"), "9000")
        self.assertEqual(card_tx(card, "102A8086" + "80" + data[129:].hex() + "00"), "9000")

    def test_refusals(self):
        card = self.card
        data = (b"\x00" + self._block(SHA256)).hex()
        self.assertEqual(card_tx(card, "0022F1B80383010F"), "6A88")
        self.assertEqual(card_tx(card, "002A8086000101" + data), "6982")  # no PIN
        card_tx(card, "0020001006313233343536")
        self.assertEqual(card_tx(card, "002A8086000101" + data), "6985")  # no MSE:SET
        self.assertEqual(card_tx(card, "0020001004" + b"9999".hex()), "63C2")
        self.assertEqual(card_tx(card, "0020001004" + b"9999".hex()), "63C1")
        self.assertEqual(card_tx(card, "0020001004" + b"9999".hex()), "6983")
        self.assertEqual(card_tx(card, "00200010"), "6983")
        self.assertEqual(card_tx(card, "0020001106313233343536"), "6A88")


class ProfileTests(SynchronousTestCase):
    def test_each_profile_finds_only_its_card(self):
        index = CertIndex(ReaderRegistry(), Clock())
        for kind, name in (("piv", "PIV"), ("openpgp", "OpenPGP"), ("ica", "I.CA"),
                           ("postsignum", "PostSignum"), ("iso7816", None)):
            card = backend(Clock(), kind, "X", cards=1).cards[0]
            profile, certs = self.successResultOf(index.scan(Recorder(card)))
            self.assertEqual(profile.name if profile else None, name, kind)

    def test_probe_leaves_other_cards_as_they_were(self):
        from cloudfoxy_proxy.cards.iso7816 import Iso7816Card

        card = Iso7816Card(serial=0)
        self.assertEqual(card_tx(card, "00A4040C0AF0434C4F5544464F5859"), "9000")  # the card's DF 5000
        index = CertIndex(ReaderRegistry(), Clock())
        transmit = Recorder(card)
        self.assertEqual(self.successResultOf(index.scan(transmit)), (None, []))
        self.assertEqual(card.df.fid, 0x5000)
        self.assertEqual(len(transmit.sent), 4)  # PIV, OpenPGP, PostSignum, I.CA: one SELECT each

    def test_ica_detected_by_fid_when_path_is_refused(self):
        card = IcaCard(serial=1, label="T")

        def transmit(apdu):
            if apdu[:3] == bytes.fromhex("00A408"):
                return succeed(bytes.fromhex("6A86"))
            return succeed(card.transmit(apdu))

        self.assertTrue(self.successResultOf(IcaProfile().select(transmit)))
        self.assertEqual(len([c for c in self.successResultOf(IcaProfile().certificates(transmit))
                              if c.usable]), 1)

    def test_ica_certificates(self):
        card = IcaCard(serial=1, label="T")
        certs = self.successResultOf(IcaProfile().certificates(Recorder(card)))
        pki = get_pki()
        self.assertEqual([(c.der, c.usable, c.key_ref) for c in certs], [
            (card.pair.der, True, 0x02), (pki.issuer.der, False, None), (pki.root.der, False, None)])
        self.assertEqual(certs[0].alias, "T I.CA 01 Signing")

    def test_ica_wrong_and_blocked_pin(self):
        card = IcaCard(serial=1, label="T", pin="2468")
        transmit = Recorder(card)
        profile = IcaProfile()
        [cert] = [c for c in self.successResultOf(profile.certificates(transmit)) if c.usable]
        for _ in range(2):
            self.assertIsInstance(self.failureResultOf(profile.verify_pin(transmit, "1111", cert)).value, WrongPin)
        failure = self.failureResultOf(profile.verify_pin(transmit, "1111", cert))
        self.assertIsInstance(failure.value, PinBlocked)
        self.assertEqual(failure.value.code, errors.BAD_PIN)
        self.assertEqual(card.pins[0x81].tries, 3)  # VERIFY 81 never sent after 86 answered

    def test_ica_sign_hashes(self):
        card = IcaCard(serial=1, label="T")
        transmit = Recorder(card)
        profile = IcaProfile()
        [cert] = [c for c in self.successResultOf(profile.certificates(transmit)) if c.usable]
        for n in (20, 32):
            self.successResultOf(profile.verify_pin(transmit, "123456", cert))
            verify(cert.der, DIGESTS[n], self.successResultOf(profile.sign(transmit, cert, DIGESTS[n])))
        for n in (48, 64):
            self.assertEqual(self.failureResultOf(profile.sign(transmit, cert, DIGESTS[n])).value.code,
                             errors.MALFORMED)

    def test_postsignum_certificate_and_hashes(self):
        card = PostSignumCard(serial=2, label="T")
        transmit = Recorder(card)
        profile = PostSignumProfile()
        [cert] = self.successResultOf(profile.certificates(transmit))
        self.assertEqual((cert.der, cert.key_ref, cert.alias), (card.pair.der, 0x0E, "T PostSignum 02 Signing"))
        for n, digest in DIGESTS.items():
            self.successResultOf(profile.verify_pin(transmit, "123456", cert))
            verify(cert.der, digest, self.successResultOf(profile.sign(transmit, cert, digest)))
        self.assertEqual(self.failureResultOf(profile.verify_pin(transmit, "123", cert)).value.code,
                         errors.BAD_PIN)
        self.assertEqual(card.pin.tries, 3)  # not sent to the card


    def test_a_card_left_mid_chain_is_recovered(self):
        card = PostSignumCard(serial=2, label="T")
        self.assertEqual(card_tx(card, "102A808603000102"), "9000")  # another client's unfinished chain
        transmit = Recorder(card)
        profile = PostSignumProfile()
        [cert] = self.successResultOf(profile.certificates(transmit))
        self.assertEqual(transmit.sent[:2], ["00A4040010A0000000770103000610000000000002"] * 2)
        card_tx(card, "102A808603000102")
        self.successResultOf(profile.verify_pin(transmit, "123456", cert))
        verify(cert.der, SHA256, self.successResultOf(profile.sign(transmit, cert, SHA256)))


class CommandTests(SynchronousTestCase):
    def setUp(self):
        clock = Clock()
        self.ica = backend(clock, "ica", "C")
        self.ps = backend(clock, "postsignum", "S")
        self.h = Harness(extra=[self.ica, self.ps])
        self.pki = get_pki()

    def test_listing(self):
        aliases = b64list(self.h.result(">*|\n>1:ALIASES|\n\n"))
        for name in ("C I.CA 00 Signing", "C I.CA 01 Signing", "S PostSignum 00 Signing", "S PostSignum 01 Signing"):
            self.assertEqual(aliases.count(name), 1, name)
        self.assertNotIn("CloudFoxy Emulated Issuing CA", aliases)  # CA certificates are not signing aliases
        enum = b64list(self.h.result(">*|\n>1:ENUM|\n\n"))
        self.assertTrue({"C 00", "C 01", "S 00", "S 01"} <= set(enum), enum)

    def test_chains(self):
        chain = self.h.chain("C I.CA 00 Signing")
        self.assertEqual(chain, [self.ica.cards[0].pair.der, self.pki.issuer.der, self.pki.root.der])
        self.assertEqual(self.h.chain("S PostSignum 01 Signing"), [self.ps.cards[1].pair.der])
        h = Harness(extra=[backend(Clock(), "postsignum", "S", cards=1)],
                    ca_certs=[self.pki.issuer.cert, self.pki.root.cert])
        self.assertEqual(len(h.chain("S PostSignum 00 Signing")), 3)

    def test_sign(self):
        for alias, card, sizes in (("C I.CA 01 Signing", self.ica.cards[1], (20, 32)),
                                   ("S PostSignum 00 Signing", self.ps.cards[0], (20, 32, 48, 64))):
            for n in sizes:
                verify(card.pair.der, DIGESTS[n], bytes.fromhex(self.h.sign(alias, "123456", DIGESTS[n])))
        self.assertEqual(self.h.sign("C I.CA 01 Signing", "123456", DIGESTS[64]), errors.MALFORMED)
        x509.load_der_x509_certificate(self.h.chain("C 00")[0])  # a reader name: its signing certificate

    def test_wrong_pin_never_twice_and_blocked_in_the_log(self):
        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        for alias, card, tries in (("C I.CA 00 Signing", self.ica.cards[0], lambda c: c.pins[0x86].tries),
                                   ("S PostSignum 00 Signing", self.ps.cards[0], lambda c: c.pin.tries)):
            self.assertEqual(self.h.sign(alias, "1111"), errors.BAD_PIN)
            before = self.h.apdus()
            self.assertEqual(self.h.sign(alias, "1111"), errors.BAD_PIN)
            self.assertEqual((tries(card), self.h.apdus()), (2, before))  # not presented again
            self.assertEqual(self.h.sign(alias, "2222"), errors.BAD_PIN)
            self.assertEqual(self.h.sign(alias, "3333"), errors.BAD_PIN)
            self.assertEqual(tries(card), 0)
            self.assertEqual(self.h.sign(alias, "123456"), errors.BAD_PIN)  # blocked
        text = "\n".join(formatEvent(e) for e in events)
        self.assertIn("SIGN on C 00: wrong PIN (I.CA VERIFY 86 63C2)", text)
        self.assertIn("SIGN on C 00: the card's PIN is blocked (I.CA VERIFY 86 6983: the PIN is blocked)", text)
        self.assertIn("SIGN on S 00: the card's PIN is blocked (PostSignum VERIFY 6983: the PIN is blocked)",
                      text)
        for secret in ("1111", "2222", "3333", "123456"):
            self.assertNotIn(secret, text)


class IdentityTests(SynchronousTestCase):
    """Every emulated signing card tells itself apart (what middleware uses
    as a token serial), and the PIV card answers a challenge request."""

    def identities(self, label, serial):
        from cloudfoxy_proxy.cards.openpgp import OpenPgpCard
        from cloudfoxy_proxy.cards.piv import PivCard

        piv = PivCard(serial=serial, label=label)
        card_tx(piv, "00A4040005A000000308")
        chuid, _ = card_collect(piv, "00CB3FFF055C035FC102")
        pgp = OpenPgpCard(serial=serial, label=label)
        card_tx(pgp, "00A4040006D27600012401")
        aid, _ = card_collect(pgp, "00CA004F00")
        ica = IcaCard(serial=serial, label=label)
        card_tx(ica, "00A4000C022F02")
        ica_number = card_tx(ica, "00B0000000")
        ps = PostSignumCard(serial=serial, label=label)
        card_tx(ps, "00A408000410001003")
        ps_number = card_tx(ps, "00B0000010")
        guid = dict(parse_tlvs(dict(parse_tlvs(chuid))[0x53]))[0x34]
        yubico = card_tx(piv, "00F8000000")
        return [("piv guid", guid[-8:]), ("piv serial", yubico), ("openpgp", aid[10:14]),
                ("ica", ica_number), ("postsignum", ps_number)]

    def test_unique_per_card(self):
        seen = {}
        for label in ("A", "B"):
            for serial in (0, 1, 2):
                for kind, value in self.identities(label, serial):
                    key = (kind, value)
                    self.assertNotIn(key, seen, f"{label} {serial} {kind} same as {seen.get(key)}")
                    seen[key] = (label, serial)
        self.assertEqual(self.identities("A", 1), self.identities("A", 1))  # stable across starts

    def test_piv_challenge_for_key_9b(self):
        from cloudfoxy_proxy.cards.piv import PivCard

        piv = PivCard(serial=0, label="T", random_bytes=lambda n: bytes(range(n)))
        card_tx(piv, "00A4040005A000000308")
        self.assertEqual(card_tx(piv, "0087009B047C02810000"), "7C0A81080001020304050607" + "9000")
        self.assertEqual(card_tx(piv, "0087039B047C02810000")[-4:], "9000")
        self.assertEqual(card_tx(piv, "0087089B047C02810000"), "6A86")  # not the key's algorithm
        self.assertEqual(card_tx(piv, "0087009B047C02800000"), "6A80")  # witness: not supported

    def test_openpgp_decipher_with_the_authentication_key(self):
        from cryptography.hazmat.primitives.asymmetric import padding as asym_padding

        from cloudfoxy_proxy.cards.openpgp import OpenPgpCard

        card = OpenPgpCard(serial=0, label="T")
        card_tx(card, "00A4040006D27600012401")
        secret = b"a session key"
        ciphertext = card.aut.cert.public_key().encrypt(secret, asym_padding.PKCS1v15())
        data = b"\x00" + ciphertext
        first = "102A8086" + "%02X" % 255 + data[:255].hex()
        last = "002A8086" + "%02X" % (len(data) - 255) + data[255:].hex() + "00"
        self.assertEqual(card_tx(card, "002A808602" + "0011"), "6A88")  # no decryption key of its own
        self.assertEqual(card_tx(card, "0022418403830103"), "6A86")
        self.assertEqual(card_tx(card, "00224184"[:6] + "B803830103"), "9000")
        self.assertEqual(card_tx(card, first), "9000")
        self.assertEqual(card_tx(card, last), "6982")  # PW1 82 first
        self.assertEqual(card_tx(card, "0020008206313233343536"), "9000")
        card_tx(card, first)
        self.assertEqual(card_tx(card, last), secret.hex().upper() + "9000")
