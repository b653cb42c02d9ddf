from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from cloudfoxy_proxy import errors
from cloudfoxy_proxy.backends import emulated
from cloudfoxy_proxy.apdu import BadLength, make_atr, parse_command
from cloudfoxy_proxy.cards.iso7816 import APP_AID, Iso7816Card
from cloudfoxy_proxy.registry import ReaderRegistry


def tx(card, hexstr):
    return card.transmit(bytes.fromhex(hexstr)).hex().upper()


class ApduTests(SynchronousTestCase):
    def test_cases(self):
        c = parse_command(bytes.fromhex("00A4000C023F00"))
        self.assertEqual((c.data, c.ne), (b"\x3f\x00", None))
        self.assertEqual(parse_command(bytes.fromhex("00B0000000")).ne, 256)
        self.assertEqual(parse_command(bytes.fromhex("00A40000023F0000")).ne, 256)
        c = parse_command(bytes.fromhex("00B00000000000"))
        self.assertEqual((c.ne, c.extended), (65536, True))
        c = parse_command(bytes.fromhex("00D60000000003AABBCC0100"))
        self.assertEqual((c.data, c.ne), (b"\xaa\xbb\xcc", 256))
        for bad in ["00A4", "00A4000C03FF", "00A4000C0000", "00A4000C00000201"]:
            self.assertRaises(BadLength, parse_command, bytes.fromhex(bad))

    def test_atr_checksum(self):
        atr = make_atr(b"FoxyEmu7816")
        x = 0
        for b in atr[1:]:
            x ^= b
        self.assertEqual(x, 0)


class CardTests(SynchronousTestCase):
    def setUp(self):
        self.card = Iso7816Card(serial=7, random_bytes=lambda n: bytes(range(n)))

    def test_select_variants(self):
        c = self.card
        self.assertEqual(tx(c, "00A4000C023F00"), "9000")
        self.assertEqual(tx(c, "00A4040C" + "%02X" % len(APP_AID) + APP_AID.hex()), "9000")
        self.assertEqual(tx(c, "00A4040C05F0434C4F55"), "9000")  # partial AID
        self.assertEqual(tx(c, "00A4020C025001"), "9000")
        self.assertEqual(tx(c, "00A4030C"), "9000")  # parent of the app DF: MF
        self.assertEqual(tx(c, "00A4080C0450005002"), "9000")  # path from MF
        self.assertEqual(tx(c, "00A4090C025001"), "9000")  # path from current DF (app)
        self.assertEqual(tx(c, "00A4000C021234"), "6A82")
        self.assertEqual(tx(c, "00A4010C025001"), "6A82")  # an EF is not a DF
        self.assertEqual(tx(c, "00A4050C00"), "6A86")
        self.assertEqual(tx(c, "00A4070C023F00"), "6A86")
        self.assertEqual(tx(c, "00A4000C033F0000"), "6700")

    def test_fcp_and_get_response(self):
        c = self.card
        self.assertEqual(tx(c, "00A40000023F00"), "610C")  # no Le: answer waits for GET RESPONSE
        self.assertEqual(tx(c, "00C0000005"), "620A820138" + "610" + "7")
        self.assertEqual(tx(c, "00C0000007"), "83023F008A01059000")
        self.assertEqual(tx(c, "00C0000007"), "6985")  # nothing left
        self.assertEqual(tx(c, "00A40000023F0000"), "620A82013883023F008A01059000")

    def test_read_and_update_binary(self):
        c = self.card
        self.assertEqual(tx(c, "00B0000004"), "6986")  # no current EF
        tx(c, "00A4080C0450005001")
        self.assertEqual(tx(c, "00D6000403A1B2C3"), "9000")
        self.assertEqual(tx(c, "00B0000008"), "00000000A1B2C3009000")
        self.assertEqual(tx(c, "00B0003E04"), "00006282")  # 2 bytes before the end
        self.assertEqual(tx(c, "00B0004001"), "6B00")
        self.assertEqual(tx(c, "00D6003F020102"), "6700")
        self.assertEqual(tx(c, "00B00000"), "6700")
        tx(c, "00A4000C022F02")
        self.assertEqual(tx(c, "00B0000000"), "5A080000000000000007" + "9000")
        self.assertEqual(tx(c, "00D6000001FF"), "6982")
        # a long file read with an extended Le, and by short EF identifier
        tx(c, "00A4080C0450005002")
        out = tx(c, "00B00000000400")
        self.assertEqual(out, bytes(i & 0xFF for i in range(1024)).hex().upper() + "9000")
        self.assertEqual(tx(c, "00B0820202"), "02039000")  # SFI 2 = EF 5002

    def test_challenge_and_unsupported(self):
        c = self.card
        self.assertEqual(tx(c, "0084000008"), "00010203040506079000")
        self.assertEqual(tx(c, "00840000"), "6700")
        self.assertEqual(tx(c, "0084000108"), "6A86")
        self.assertEqual(tx(c, "0020008100"), "6D00")
        self.assertEqual(tx(c, "80A4000C023F00"), "6E00")
        self.assertEqual(tx(c, "00A4"), "6700")

    def test_real_randomness(self):
        card = Iso7816Card(serial=1)
        self.assertNotEqual(tx(card, "0084000008"), tx(card, "0084000008"))

    def test_reset_keeps_files_clears_state(self):
        c = self.card
        tx(c, "00A4080C0450005001")
        tx(c, "00D6000001AA")
        self.assertEqual(c.reset(), c.atr)
        self.assertEqual(tx(c, "00B0000001"), "6986")
        tx(c, "00A4080C0450005001")
        self.assertEqual(tx(c, "00B0000001"), "AA9000")


class BackendTests(SynchronousTestCase):
    def test_url_parsing(self):
        clock = Clock()
        b = emulated.from_url("emulated:?cards=3&latency_ms=5&prefix=Rack")(clock)
        self.assertEqual((len(b.cards), b.latency, b.name(2)), (3, 0.005, "Rack 02"))
        for bad in ["emulated:?cards=0", "emulated:?cards=x", "emulated:?type=nope", "emulated:?colour=red",
                    "emulated:?prefix=", "emulated:?cards=1&cards=2", "emulated:?latency_ms=-1"]:
            self.assertRaises(ValueError, emulated.from_url, bad, {})

    def test_latency_uses_clock_and_cancel(self):
        clock = Clock()
        b = emulated.from_url("emulated:?cards=1&latency_ms=50")(clock)
        b.start(ReaderRegistry())
        got = []
        b.transmit(0, bytes.fromhex("00A4000C023F00")).addCallback(got.append)
        clock.advance(0.049)
        self.assertEqual(got, [])
        clock.advance(0.002)
        self.assertEqual(got, [b"\x90\x00"])
        d = b.reset(0)
        d.cancel()
        self.failureResultOf(d)
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_pulled_card(self):
        clock = Clock()
        registry = ReaderRegistry()
        b = emulated.from_url("emulated:?cards=2&latency_ms=10")(clock)
        b.start(registry)
        d = b.transmit(1, bytes.fromhex("0084000008"))
        b.remove(1)
        self.assertFalse(registry.get("Emulated 01").present)
        clock.advance(1)
        self.assertEqual(self.failureResultOf(d, errors.CardError).value.code, errors.NO_CARD)
        e = self.assertRaises(errors.CardError, b.transmit, 1, b"\x00\x84\x00\x00\x08")
        self.assertEqual(e.code, errors.NO_CARD)
        b.insert(1)
        d = b.transmit(1, bytes.fromhex("00A4000C023F00"))
        clock.advance(1)
        self.assertEqual(self.successResultOf(d), b"\x90\x00")
