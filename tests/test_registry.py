import base64

from twisted.trial.unittest import SynchronousTestCase

from cloudfoxy_proxy import errors
from cloudfoxy_proxy.backend import ReaderInfo
from cloudfoxy_proxy.registry import CardQueue, QueueFull, ReaderRegistry


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
        c.abandoned = True  # its client went away
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
