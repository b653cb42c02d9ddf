"""The host-side ISO 7816-4 follow-up (apdu.follow_up), driven both ways."""

from twisted.internet.defer import succeed
from twisted.trial.unittest import SynchronousTestCase

from cloudfoxy_proxy import apdu, errors
from cloudfoxy_proxy.errors import CardError
from cloudfoxy_proxy.signing.profiles import exchange


class Card:
    """Answers from a table; logs what it was sent (hex)."""

    def __init__(self, answers, default="6F00"):
        self.answers = {bytes.fromhex(k): bytes.fromhex(v) for k, v in answers.items()}
        self.default = bytes.fromhex(default)
        self.sent = []

    def __call__(self, command):
        self.sent.append(command.hex().upper())
        return self.answers.get(command, self.default)


class FollowUpTests(SynchronousTestCase):
    def test_6cxx_then_61xx_on_a_further_logical_channel(self):
        card = Card({"45CA000000": "6C04", "45CA000004": "AABB6102", "45C0000002": "CCDD9000"})
        self.assertEqual(apdu.run_sync(apdu.follow_up(bytes.fromhex("45CA000000")), card),
                         bytes.fromhex("AABBCCDD9000"))
        self.assertEqual(card.sent, ["45CA000000", "45CA000004", "45C0000002"])

    def test_deferred_driver_gives_the_same(self):
        card = Card({"01CA000000": "AA6101", "01C0000001": "BB9000"})
        d = apdu.run_deferred(apdu.follow_up(bytes.fromhex("01CA000000")), lambda c: succeed(card(c)))
        self.assertEqual(self.successResultOf(d), bytes.fromhex("AABB9000"))
        self.assertEqual(card.sent, ["01CA000000", "01C0000001"])

    def test_one_round_limit(self):
        card = Card({}, default="AA6101")
        result = apdu.run_sync(apdu.follow_up(bytes.fromhex("00CA000000")), card)
        self.assertEqual(len(card.sent), 1 + apdu.MAX_GET_RESPONSE)
        self.assertEqual(result, b"\xAA" * (apdu.MAX_GET_RESPONSE + 1) + b"\x61\x01")
        # the profiles' exchange refuses the unfinished chain
        f = self.failureResultOf(exchange(lambda c: succeed(card(c)), bytes.fromhex("00CA000000")), CardError)
        self.assertEqual(f.value.code, errors.FAILED)

    def test_follow_up_answer_without_status_word_is_returned_alone(self):
        card = Card({"00CA000000": "AA6101", "00C0000001": "BB"})
        self.assertEqual(apdu.run_sync(apdu.follow_up(bytes.fromhex("00CA000000")), card), b"\xBB")

    def test_find_tlv_and_tlv(self):
        data = apdu.tlv(0x7C, apdu.tlv(0x82, b"") + apdu.tlv(0x81, b"\x01" * 300))
        self.assertEqual(data[:4], bytes([0x7C, 0x82, 0x01, 0x32]))
        self.assertEqual(apdu.find_tlv(apdu.find_tlv(data, 0x7C), 0x81), b"\x01" * 300)
        self.assertIsNone(apdu.find_tlv(data, 0x53))
