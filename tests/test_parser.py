from twisted.trial.unittest import SynchronousTestCase

from cloudfoxy_proxy import errors
from cloudfoxy_proxy.parser import MAX_APDU_BYTES, Command, RequestParser, parse_apdu


def feed(parser, text, end=True):
    """Feed lines; return the completed requests (end-of-input checked at the end)."""
    done = []
    for line in text.splitlines():
        r = parser.line(line.encode("utf-8"))
        if r is not None:
            done.append(r)
    if end:
        r = parser.end_of_input()
        if r is not None:
            done.append(r)
    return done


class ParserTests(SynchronousTestCase):
    def test_basic_request_ended_by_empty_line(self):
        p = RequestParser()
        [r] = feed(p, ">CloudFoxy 1.2.3.4@12|\n>2342:RESET|\n>2343:APDU:00A4040008A00000000300000000|\n\n", end=False)
        self.assertEqual(r.reader, "CloudFoxy 1.2.3.4@12")
        self.assertIsNone(r.password)
        self.assertEqual([c.id for c in r.commands], ["2342", "2343"])
        self.assertEqual(r.commands[0].name, "RESET")
        self.assertEqual(r.commands[1].apdu, bytes.fromhex("00A4040008A00000000300000000"))

    def test_reader_password_and_missing_bar(self):
        p = RequestParser()
        [r] = feed(p, ">Emulated 00:1234\n>1:apdu:00a4000c023f00\n")
        self.assertEqual((r.reader, r.password), ("Emulated 00", "1234"))
        self.assertEqual(r.commands[0].name, "APDU")

    def test_old_apdu_spelling_and_whitespace(self):
        p = RequestParser()
        [r] = feed(p, ">R|\n>1:APDU|00 A4 00 0C 02 3F 00|\n>2:APDU:00 A4 00 0C\t02 3F00|\n")
        self.assertEqual([c.apdu for c in r.commands], [bytes.fromhex("00A4000C023F00")] * 2)
        self.assertEqual([c.error for c in r.commands], [None, None])

    def test_everything_after_last_bar_dropped(self):
        p = RequestParser()
        [r] = feed(p, ">R|junk\n>1:RESET|trailing\n")
        self.assertEqual(r.reader, "R")
        self.assertEqual(r.commands[0].name, "RESET")

    def test_comments_and_junk_ignored(self):
        p = RequestParser()
        [r] = feed(p, "#hello\n\xff\xfb\x01garbage\nGET / HTTP/1.0\n>R|\n#x\n>1:RESET|\n")
        self.assertEqual(r.reader, "R")
        self.assertEqual(len(r.commands), 1)

    def test_crlf_and_surrounding_whitespace(self):
        p = RequestParser()
        self.assertIsNone(p.line(b"  >R|  \r"))
        r = p.line(b"\r")
        self.assertIsNone(r)  # a reader line alone gets no answer
        self.assertEqual(p.reader, ("R", None))

    def test_end_of_input_completes_without_empty_line(self):
        p = RequestParser()
        self.assertIsNone(p.line(b">R|"))
        self.assertIsNone(p.end_of_input())  # no command yet
        self.assertIsNone(p.line(b">7:APDU:00A4000C023F00|"))
        r = p.end_of_input()
        self.assertEqual([c.id for c in r.commands], ["7"])
        self.assertIsNone(p.end_of_input())

    def test_emptyline_waits_for_the_empty_line(self):
        p = RequestParser()
        feed(p, ">R|\n>1:EMPTYLINE|\n>2:RESET|", end=False)
        self.assertIsNone(p.end_of_input())
        self.assertIsNone(p.line(b">3:APDU:00A4000C023F00|"))
        self.assertIsNone(p.end_of_input())
        r = p.line(b"")
        self.assertEqual([c.id for c in r.commands], ["2", "3"])
        self.assertFalse(any(c.name == "EMPTYLINE" for c in r.commands))

    def test_sticky_reader(self):
        p = RequestParser()
        feed(p, ">Emulated 01:pw|\n>1:RESET|\n")
        [r] = feed(p, ">2:APDU:00A4000C023F00|\n")
        self.assertEqual((r.reader, r.password), ("Emulated 01", "pw"))
        # A first line whose second field is not a command is a reader line.
        [r] = feed(p, ">Other:secret|\n>3:RESET|\n")
        self.assertEqual((r.reader, r.password), ("Other", "secret"))

    def test_new_reader_line_ends_request(self):
        p = RequestParser()
        done = feed(p, ">A|\n>1:RESET|\n>B|\n>2:RESET|\n", end=False)
        self.assertEqual(len(done), 1)
        self.assertEqual(done[0].reader, "A")
        [r] = feed(p, "")
        self.assertEqual((r.reader, [c.id for c in r.commands]), ("B", ["2"]))

    def test_command_without_reader(self):
        p = RequestParser()
        [r] = feed(p, ">1:APDU:00A4000C023F00|\n")
        self.assertIsNone(r.reader)

    def test_unknown_command_and_bad_fields(self):
        p = RequestParser()
        [r] = feed(p, ">R|\n>1:FROB|\n>2:APDU:zz|\n>3:APDU:0A4|\n>4:APDU:00A4|\n>5:a:b:c:d|\n>6:APDU|\n")
        self.assertEqual([c.error for c in r.commands], [
            errors.FAILED, errors.MALFORMED, errors.MALFORMED, errors.MALFORMED,
            errors.MALFORMED, errors.MALFORMED])

    def test_apdu_length_limits(self):
        self.assertIsNone(parse_apdu("00" * 3))
        self.assertEqual(len(parse_apdu("00" * MAX_APDU_BYTES)), MAX_APDU_BYTES)
        self.assertIsNone(parse_apdu("00" * (MAX_APDU_BYTES + 1)))

    def test_invalid_utf8_is_not_fatal(self):
        p = RequestParser()
        self.assertIsNone(p.line(b">\xff\xfe|"))
        r = p.line(b">1:RESET|")
        self.assertIsNone(r)
        r = p.line(b"")
        self.assertEqual(r.reader, "\ufffd\ufffd")

    def test_overlong_line_gets_c084_for_its_id(self):
        p = RequestParser()
        p.line(b">R|")
        self.assertIsNone(p.overlong(b">42:APDU:0000000000"))
        self.assertIsNone(p.overlong(b"no id here"))
        r = p.line(b"")
        self.assertEqual(r.commands, [Command("42", "", error=errors.MALFORMED)])

    def test_max_commands_splits_the_batch(self):
        p = RequestParser(max_commands=3)
        done = feed(p, ">R|\n>0:EMPTYLINE|\n" + "".join(f">{i}:RESET|\n" for i in range(1, 8)), end=False)
        self.assertEqual([[c.id for c in r.commands] for r in done], [["1", "2", "3"], ["4", "5", "6"]])
        self.assertIsNone(p.end_of_input())  # the batch still waits for its empty line
        r = p.line(b"")
        self.assertEqual([c.id for c in r.commands], ["7"])
        self.assertEqual(r.reader, "R")

    def test_empty_line_with_nothing_pending(self):
        p = RequestParser()
        self.assertIsNone(p.line(b""))
        self.assertIsNone(p.end_of_input())
