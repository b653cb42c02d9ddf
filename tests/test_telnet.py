"""Telnet commands in the line protocol's stream (RFC 854/855): the pure
stripper, and the line protocol with it, in memory."""

from twisted.trial.unittest import SynchronousTestCase

from cloudfoxy_proxy.frontends.telnet import TelnetStripper
from test_server import ATR, Harness, take

IAC, SE, NOP, SB, WILL, WONT, DO, DONT, AYT = 255, 240, 241, 250, 251, 252, 253, 254, 246

#: What plink -telnet sends on connecting (captured from putty-tools 0.78).
PLINK = bytes([IAC, WILL, 31, IAC, WILL, 32, IAC, WILL, 24, IAC, WILL, 39,
               IAC, DO, 1, IAC, WILL, 3, IAC, DO, 3])
#: A terminal-type and a window-size subnegotiation (RFC 1091, RFC 1073),
#: the window size holding an escaped 255.
SUBNEGOTIATION = bytes([IAC, SB, 24, 0]) + b"XTERM" + bytes([IAC, SE]) + bytes(
    [IAC, SB, 31, 0, IAC, IAC, 0, 24, IAC, SE])


def feed_all(chunks):
    stripper = TelnetStripper()
    return b"".join(stripper.feed(c) for c in chunks), stripper.idle


class StripperTests(SynchronousTestCase):
    def test_plain_data_is_returned_as_is(self):
        data = b">Emulated 00|\n>1:RESET|\n\n"
        self.assertIs(TelnetStripper().feed(data), data)

    def test_every_kind_of_command_is_removed(self):
        for option in (WILL, WONT, DO, DONT):
            self.assertEqual(feed_all([b"a" + bytes([IAC, option, 1]) + b"b"]), (b"ab", True))
        self.assertEqual(feed_all([b"a" + bytes([IAC, NOP, IAC, AYT]) + b"b"]), (b"ab", True))
        self.assertEqual(feed_all([b"x" + SUBNEGOTIATION + b"y"]), (b"xy", True))
        self.assertEqual(feed_all([PLINK + b">Emulated 00|\r\n"]), (b">Emulated 00|\r\n", True))

    def test_iac_iac_is_a_data_byte(self):
        self.assertEqual(feed_all([b"a" + bytes([IAC, IAC]) + b"b"]), (b"a\xffb", True))

    def test_split_at_every_byte(self):
        stream = PLINK + b">Emulated 00|\r\n" + SUBNEGOTIATION + b">1:RESET|\r\n" + bytes(
            [IAC, DO, 1]) + b">2:APDU:00A4000C023F00|\r\n\r\n"
        want = b">Emulated 00|\r\n>1:RESET|\r\n>2:APDU:00A4000C023F00|\r\n\r\n"
        self.assertEqual(feed_all([stream[i:i + 1] for i in range(len(stream))]), (want, True))
        for cut in range(len(stream)):
            self.assertEqual(feed_all([stream[:cut], stream[cut:]]), (want, True), cut)

    def test_half_read_command_is_remembered(self):
        stripper = TelnetStripper()
        self.assertEqual(stripper.feed(bytes([IAC, SB, 24])), b"")
        self.assertFalse(stripper.idle)
        self.assertEqual(stripper.feed(b"no IAC here"), b"")  # still inside the subnegotiation
        self.assertEqual(stripper.feed(bytes([IAC, SE]) + b"data"), b"data")
        self.assertTrue(stripper.idle)

    def test_subnegotiation_ended_by_another_command(self):
        # IAC SB ... IAC WILL 3 (no IAC SE): the WILL ends it and is a command itself.
        self.assertEqual(feed_all([bytes([IAC, SB, 24, 1, IAC, WILL, 3]) + b"z"]), (b"z", True))


class LineProtocolTelnetTests(SynchronousTestCase):
    def setUp(self):
        self.h = Harness()
        self.proto, self.t = self.h.connect()

    def test_negotiation_before_the_reader_line(self):
        self.proto.dataReceived(PLINK + b">Emulated 00|\r\n>1:RESET|\r\n>2:APDU:00A4000C023F00|\r\n\r\n")
        self.assertEqual(take(self.t), f">1:{ATR}\n>2:9000\n@@\n")

    def test_commands_between_and_inside_lines_split_across_reads(self):
        stream = (PLINK + b">Emul" + bytes([IAC, NOP]) + b"ated 00|\r\n" + SUBNEGOTIATION
                  + b">1:RESET|\r\n" + bytes([IAC, DONT, 1]) + b">2:APDU:00A4000C023F00|\r\n\r\n")
        for i in range(len(stream)):
            self.proto.dataReceived(stream[i:i + 1])
        # every line arrived in its own read: each is answered as it completes (rule 2)
        self.assertEqual(take(self.t), f">1:{ATR}\n@@\n>2:9000\n@@\n")

    def test_negotiation_alone_gets_no_answer(self):
        self.proto.dataReceived(PLINK)
        self.proto.dataReceived(bytes([IAC, SB, 24]))
        self.proto.dataReceived(bytes([1, IAC, SE]))
        self.assertEqual(self.t.value(), b"")  # never a negotiation of our own, never a stray @@
