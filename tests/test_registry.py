import base64

from twisted.trial.unittest import SynchronousTestCase

from cloudfoxy_proxy import errors
from cloudfoxy_proxy.interfaces import ReaderInfo
from cloudfoxy_proxy.registry import CACHE_CHARS, CACHE_ENTRIES, MAX_PATTERN, CardQueue, QueueFull, ReaderRegistry


class Waiter:
    def __init__(self, log, name):
        self.log, self.name, self.abandoned = log, name, False

    def granted(self):
        self.log.append(self.name)


class QueueTests(SynchronousTestCase):
    def test_fifo_and_bound(self):
        q = CardQueue(max_queue=2)
        log = []
        self.assertTrue(q.acquire(Waiter(log, "a")))
        self.assertFalse(q.acquire(Waiter(log, "b")))
        c = Waiter(log, "c")
        self.assertFalse(q.acquire(c))
        self.assertRaises(QueueFull, q.acquire, Waiter(log, "d"))
        q.release()
        self.assertEqual(log, ["b"])
        q.leave(c)  # its client went away
        q.release()
        self.assertEqual(log, ["b"])
        self.assertFalse(q.busy)
        self.assertTrue(q.acquire(Waiter(log, "e")))

    def test_release_chain_does_not_recurse(self):
        q = CardQueue(max_queue=10000)
        log = []

        class Quick(Waiter):
            def granted(self):
                log.append(self.name)
                q.release()  # finishes at once

        self.assertTrue(q.acquire(Waiter(log, "first")))
        for i in range(5000):
            q.acquire(Quick(log, i))
        q.release()
        self.assertEqual(log, list(range(5000)))
        self.assertFalse(q.busy)


    def test_left_waiters_do_not_count(self):
        q = CardQueue(max_queue=3)
        log = []
        self.assertTrue(q.acquire(Waiter(log, "holder")))
        gone = [Waiter(log, f"gone{i}") for i in range(3)]
        for w in gone:
            self.assertFalse(q.acquire(w))
        self.assertRaises(QueueFull, q.acquire, Waiter(log, "refused"))
        for w in gone:
            q.leave(w)
        self.assertEqual(len(q), 0)
        live = [Waiter(log, f"live{i}") for i in range(3)]
        for w in live:
            self.assertFalse(q.acquire(w))  # the queue is full of live waiters only now
        self.assertEqual(len(q), 3)
        self.assertRaises(QueueFull, q.acquire, Waiter(log, "refused"))
        for _ in range(4):
            q.release()
        self.assertEqual(log, ["live0", "live1", "live2"])
        self.assertFalse(q.busy)
        self.assertEqual(len(q.waiters), 0)

    def test_leaving_keeps_the_queue_small_and_in_order(self):
        q = CardQueue(max_queue=10)
        log = []
        q.acquire(Waiter(log, "holder"))
        keep = Waiter(log, "keep")
        q.acquire(keep)
        for i in range(10000):  # clients that queue and go, again and again
            w = Waiter(log, i)
            q.acquire(w)
            q.leave(w)
            self.assertLessEqual(len(q.waiters), 3)  # never more than twice the live waiters (+1)
        last = Waiter(log, "last")
        q.acquire(last)
        self.assertEqual(len(q), 2)
        q.release()
        q.release()
        self.assertEqual(log, ["keep", "last"])


class B:
    pass


class RegistryTests(SynchronousTestCase):
    def setUp(self):
        self.r = ReaderRegistry()
        self.a, self.b = B(), B()
        self.r.update(self.a, [ReaderInfo(1, "CloudFoxy 10.0.0.1@1", aliases=["/10.0.0.1@1", "Foxy NET 10.0.0.1-1"]),
                               ReaderInfo(2, "CloudFoxy 10.0.0.1@2")])
        self.r.update(self.b, [ReaderInfo("x", "Virtual PCD 00 00"), ReaderInfo("y", "CloudFoxy 10.0.0.1@2")])

    def names(self):
        return [x.name for x in self.r.readers]

    def test_unique_canonical_names(self):
        self.assertEqual(self.names(), ["CloudFoxy 10.0.0.1@1", "CloudFoxy 10.0.0.1@2",
                                        "Virtual PCD 00 00", "CloudFoxy 10.0.0.1@2 (2)"])
        self.assertEqual(self.r.listing.split("|")[2], base64.b64encode(b"Virtual PCD 00 00").decode())

    def test_resolution_order(self):
        self.assertEqual(self.r.resolve("CloudFoxy 10.0.0.1@2").key, 2)  # exact beats pattern
        self.assertEqual(self.r.resolve("/10.0.0.1@1").key, 1)
        self.assertEqual(self.r.resolve("Foxy NET 10.0.0.1-1").key, 1)
        self.assertEqual(self.r.resolve(base64.b64encode(b"Virtual PCD 00 00").decode()).key, "x")
        self.assertEqual(self.r.resolve("virtual").key, "x")  # case-insensitive substring
        self.assertEqual(self.r.resolve("^Virt.*00$").key, "x")  # regular expression
        self.assertEqual(self.r.resolve(r"@1$").key, 1)

    def test_errors(self):
        for text, code in [("nothing", errors.NOT_FOUND), ("CloudFoxy", errors.AMBIGUOUS),
                           ("*", errors.AMBIGUOUS), ("", errors.AMBIGUOUS), (None, errors.NOT_FOUND),
                           ("[unclosed", errors.NOT_FOUND)]:
            e = self.assertRaises(errors.CardError, self.r.resolve, text)
            self.assertEqual(e.code, code, text)

    def test_single_reader_star(self):
        r = ReaderRegistry()
        r.update(self.a, [ReaderInfo(1, "Only")])
        self.assertEqual(r.resolve("*").name, "Only")
        self.assertEqual(r.resolve("").name, "Only")

    def test_names_stable_across_replug(self):
        pcsc = self.r.resolve("Virtual PCD 00 00")
        self.r.update(self.b, [ReaderInfo("y", "CloudFoxy 10.0.0.1@2")])
        self.assertRaises(errors.CardError, self.r.resolve, "Virtual PCD 00 00")
        # another backend now reports the same name: it must not steal it
        self.r.update(self.a, [ReaderInfo(3, "Virtual PCD 00 00")])
        self.r.update(self.b, [ReaderInfo("x", "Virtual PCD 00 00"), ReaderInfo("y", "CloudFoxy 10.0.0.1@2")])
        self.assertIs(self.r.resolve("Virtual PCD 00 00"), pcsc)
        self.assertIn("Virtual PCD 00 00 (2)", self.names())

    def test_listener_and_cache_invalidation(self):
        seen = []
        self.r.add_listener(lambda reg: seen.append(len(reg.readers)))
        self.assertEqual(self.r.resolve("virtual").key, "x")
        self.r.update(self.b, [])
        self.assertEqual(seen, [2])
        self.assertRaises(errors.CardError, self.r.resolve, "virtual")


class RealNamesTests(SynchronousTestCase):
    """Real PC/SC names are full of regex characters: a literal part selects."""

    NAMES = ["Yubico YubiKey OTP+FIDO+CCID 00 00",
             "SCM Microsystems Inc. SCR 3310 [CCID Interface] (21120844306107) 00 00",
             "ACS ACR1252 Dual Reader [ACR1252 Dual Reader PICC] 00 00",
             "ACS ACR1252 Dual Reader [ACR1252 Dual Reader SAM] 00 01"]

    def setUp(self):
        self.r = ReaderRegistry()
        self.r.update(B(), [ReaderInfo(i, n, aliases=["alias.*"] if i == 3 else ()) for i, n in enumerate(self.NAMES)])

    def key(self, text):
        return self.r.resolve(text).key

    def test_literal_parts_with_regex_characters(self):
        self.assertEqual(self.key("YubiKey OTP+FIDO+CCID"), 0)
        self.assertEqual(self.key("otp+fido+ccid 00 00"), 0)  # case-insensitive
        self.assertEqual(self.key("SCR 3310 [CCID Interface] (21120844306107)"), 1)
        self.assertEqual(self.key("Inc. SCR"), 1)
        self.assertEqual(self.key("[ACR1252 Dual Reader PICC]"), 2)
        self.assertEqual(self.key("Reader SAM]"), 3)

    def test_order_exact_alias_literal_then_pattern(self):
        self.assertEqual(self.key("alias.*"), 3)  # an alias before any pattern
        # "[ACR1252 Dual Reader" is a literal part of two names (C082) and a
        # bad regex: a literal match means the pattern is never tried
        e = self.assertRaises(errors.CardError, self.r.resolve, "[ACR1252 Dual Reader")
        self.assertEqual(e.code, errors.AMBIGUOUS)
        # no literal match: then a regular expression, case-insensitive
        self.assertEqual(self.key("yubikey.*fido"), 0)
        self.assertEqual(self.key("SAM\\] 00 0[0-9]$"), 3)
        self.assertEqual(self.key("^scm"), 1)
        # "a+" matches literally nowhere; as a regex it is in every name: C082
        e = self.assertRaises(errors.CardError, self.r.resolve, "Dual+ Reader")
        self.assertEqual(e.code, errors.AMBIGUOUS)

    def test_exact_only(self):
        self.assertEqual(self.r.resolve(self.NAMES[1], patterns=False).key, 1)
        self.assertEqual(self.r.resolve("alias.*", patterns=False).key, 3)
        for text in ("YubiKey", "^scm", "*", ""):
            e = self.assertRaises(errors.CardError, self.r.resolve, text, patterns=False)
            self.assertEqual(e.code, errors.NOT_FOUND, text)

    def test_patterns_rejected_by_re2_or_too_long_match_nothing(self):
        for text in ("a\\1", "(?P<n>x)(?P=n)", "(?=Yubico)", "\\pL{1000}", "[unclosed", "(.*){18}Z"):
            e = self.assertRaises(errors.CardError, self.r.resolve, text)
            self.assertEqual(e.code, errors.NOT_FOUND, text)
        self.assertEqual(self.key("^Yubico" + "(x?)" * 60), 0)  # 247 characters: a pattern
        e = self.assertRaises(errors.CardError, self.r.resolve, "^Yubico" + "(x?)" * 63)
        self.assertEqual(e.code, errors.NOT_FOUND)  # 259 characters: not a pattern any more
        self.assertLess(len("^Yubico" + "(x?)" * 60), MAX_PATTERN)


class CacheTests(SynchronousTestCase):
    def setUp(self):
        self.r = ReaderRegistry()
        self.r.update(B(), [ReaderInfo(1, "Virtual PCD 00 00"), ReaderInfo(2, "Virtual PCD 00 01")])

    def test_only_readers_are_cached(self):
        for i in range(5000):
            self.assertRaises(errors.CardError, self.r.resolve, f"{i:06}" + "x" * 1000)
            self.assertRaises(errors.CardError, self.r.resolve, "Virtual")  # C082
        self.assertEqual(self.r._cache, {})
        self.assertEqual(self.r.resolve("00 01").key, 2)
        self.assertEqual(list(self.r._cache), ["00 01"])

    def test_bounded_by_entries_and_characters(self):
        r = ReaderRegistry()
        names = [f"reader {i:05} " + "n" * 400 for i in range(800)]
        r.update(B(), [ReaderInfo(i, n) for i, n in enumerate(names)])
        for i, name in enumerate(names):  # exact names: 413 characters each
            self.assertEqual(r.resolve(name).key, i)
            self.assertLessEqual(r._cache_chars, CACHE_CHARS)
        self.assertEqual(r._cache_chars, sum(map(len, r._cache)))
        self.assertEqual(len(r._cache), CACHE_CHARS // 413)  # bounded by the characters
        self.assertIn(names[-1], r._cache)  # the newest stay, the oldest went first
        self.assertNotIn(names[0], r._cache)
        short = ReaderRegistry()
        short.update(B(), [ReaderInfo(i, f"short {i:05}") for i in range(1500)])
        for i in range(1500):
            self.assertEqual(short.resolve(f"short {i:05}").key, i)
            self.assertLessEqual(len(short._cache), CACHE_ENTRIES)
        self.assertEqual(len(short._cache), CACHE_ENTRIES)  # bounded by the count

    def test_cleared_when_the_readers_change(self):
        self.assertEqual(self.r.resolve("00 00").key, 1)
        self.r.update(self.r.readers[0].backend, [ReaderInfo(2, "Virtual PCD 00 01")])
        self.assertEqual(self.r._cache, {})
        self.assertEqual(self.r._cache_chars, 0)
        self.assertRaises(errors.CardError, self.r.resolve, "00 00")


class Owner:
    def __init__(self, owner):
        self.owner = owner


class ListingOrderTests(SynchronousTestCase):
    def test_owners_in_id_order_whoever_reports_first(self):
        """Fronts of a tier list the same READERS whatever order their
        owners answered in: owners' readers by owner id, after the other
        backends' (kept in the order they first reported)."""
        listings = []
        for order in ((0, 1, 2, 3), (3, 2, 1, 0), (2, 0, 3, 1)):
            r = ReaderRegistry()
            backends = [Owner("rack2"), B(), Owner("rack1"), B()]
            names = ["rack2/Emulated 00", "Local 00", "rack1/Emulated 00", "Local 01"]
            for i in order:
                r.update(backends[i], [ReaderInfo(0, names[i])])
            listings.append([x.name for x in r.readers])
        others = {"Local 00", "Local 01"}
        for listing in listings:
            self.assertEqual(listing[2:], ["rack1/Emulated 00", "rack2/Emulated 00"])
            self.assertEqual(set(listing[:2]), others)
        self.assertEqual(listings[0][:2], ["Local 00", "Local 01"])  # first come among the others
        self.assertEqual(listings[1][:2], ["Local 01", "Local 00"])
