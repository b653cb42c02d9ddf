"""Unit tests of the ``pcsc:`` backend with a fake ``smartcard.scard`` module
and fake single-thread pools: synchronous, no pcscd, no pyscard, no threads.

The fake pools queue jobs; a test runs them when it wants (``run``), which
is how a card that never answers is modelled.  The fake reactor is a Clock
whose ``callFromThread`` calls at once.
"""

import collections
import re
import sys

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from cloudfoxy_proxy import apdu, errors
from cloudfoxy_proxy.interfaces import IBackend
from cloudfoxy_proxy.backends import pcsc, pcsc_thread
from cloudfoxy_proxy.dispatch import Dispatcher, Session
from cloudfoxy_proxy.errors import CardError
from cloudfoxy_proxy.parser import Request, make_command
from cloudfoxy_proxy.registry import ReaderRegistry

ATR = bytes.fromhex("3B951381018073FF01000B")
OTHER_ATR = bytes.fromhex("3B8F8001804F0CA000000306030001000000006A")
SELECT_MF = bytes.fromhex("00A4000C023F00")
GET_CHALLENGE = bytes.fromhex("0084000008")
R0, R1 = "Virtual PCD 00 00", "Virtual PCD 00 01"


# -- fakes ---------------------------------------------------------------------------

class FakeCard:
    def __init__(self, atr=ATR, cold_reset=True):
        self.atr = atr
        self.cold_reset = cold_reset
        self.answers = {}  # apdu bytes -> [response bytes, …] (consumed in order)
        self.received = []
        self.fail_transfer = False
        self.challenges = 0
        self.powered = True  # pcscd powers a card with no handle down (power_down)

    def transmit(self, apdu):
        self.received.append(apdu)
        queued = self.answers.get(apdu)
        if queued:
            return queued.pop(0)
        if apdu == SELECT_MF:
            return b"\x90\x00"
        if apdu == GET_CHALLENGE:
            self.challenges += 1
            return bytes([self.challenges] * 8) + b"\x90\x00"
        return b"\x6D\x00"


class FakeScard:
    """Just enough of pyscard's ``smartcard.scard`` (the real constant values)."""

    SCARD_S_SUCCESS = 0
    SCARD_SCOPE_USER = 0
    SCARD_SHARE_EXCLUSIVE, SCARD_SHARE_SHARED, SCARD_SHARE_DIRECT = 1, 2, 3
    SCARD_PROTOCOL_T0, SCARD_PROTOCOL_T1 = 1, 2
    SCARD_LEAVE_CARD, SCARD_RESET_CARD, SCARD_UNPOWER_CARD = 0, 1, 2
    SCARD_STATE_UNAWARE, SCARD_STATE_IGNORE, SCARD_STATE_CHANGED = 0, 1, 2
    SCARD_STATE_UNKNOWN, SCARD_STATE_UNAVAILABLE, SCARD_STATE_EMPTY = 4, 8, 0x10
    SCARD_STATE_PRESENT = 0x20
    SCARD_E_CANCELLED = 0x80100002
    SCARD_E_INVALID_HANDLE = 0x80100003
    SCARD_E_INVALID_PARAMETER = 0x80100004
    SCARD_E_UNKNOWN_READER = 0x80100009
    SCARD_E_TIMEOUT = 0x8010000A
    SCARD_E_SHARING_VIOLATION = 0x8010000B
    SCARD_E_NO_SMARTCARD = 0x8010000C
    SCARD_F_COMM_ERROR = 0x80100013
    SCARD_E_NOT_TRANSACTED = 0x80100016
    SCARD_E_READER_UNAVAILABLE = 0x80100017
    SCARD_E_NO_SERVICE = 0x8010001D
    SCARD_E_SERVICE_STOPPED = 0x8010001E
    SCARD_E_UNSUPPORTED_FEATURE = 0x8010001F
    SCARD_E_NO_READERS_AVAILABLE = 0x8010002E
    SCARD_W_UNRESPONSIVE_CARD = 0x80100066
    SCARD_W_UNPOWERED_CARD = 0x80100067
    SCARD_W_RESET_CARD = 0x80100068
    SCARD_W_REMOVED_CARD = 0x80100069

    def __init__(self):
        self.up = True
        self.generation = 0  # pcscd instance; contexts of older ones are dead
        self.readers = collections.OrderedDict()  # name -> [card or None, event counter]
        self.contexts = {}  # ctx -> generation
        self.handles = {}  # handle -> dict(ctx, reader, counter, share)
        self.locks = {}  # reader -> handle holding a transaction
        self.calls = []
        self.waits = []  # timeouts asked of SCardGetStatusChange
        self._next = 100
        self.pnp_supported = True

    # -- test controls

    def plug(self, name, card=None):
        self.readers[name] = [card, 0]

    def unplug(self, name):
        del self.readers[name]

    def insert(self, name, card):
        self.readers[name][0] = card
        self.readers[name][1] += 1

    def remove(self, name):
        self.readers[name][0] = None
        self.readers[name][1] += 1

    def restart(self):
        self.generation += 1

    def power_down(self, name):
        """pcscd's power management: a card no program has connected to is
        powered down (pcsc-lite, after its grace period); invisible in
        SCardGetStatusChange, the protocol reads as undefined (0)."""
        assert not any(i["reader"] == name for i in self.handles.values()), "a handle is open"
        self.readers[name][0].powered = False

    def handles_on(self, name):
        return [i["share"] for i in self.handles.values() if i["reader"] == name]

    def card(self, name):
        return self.readers[name][0]

    def open_contexts(self):
        return len(self.contexts)

    # -- helpers

    def _id(self):
        self._next += 1
        return self._next

    def _ctx_ok(self, ctx):
        return self.up and self.contexts.get(ctx) == self.generation

    def _event(self, name):
        card, counter = self.readers[name]
        state = self.SCARD_STATE_PRESENT if card is not None else self.SCARD_STATE_EMPTY
        return (counter << 16) | state

    def _handle(self, h):
        info = self.handles.get(h)
        if info is None:
            return None, self.SCARD_E_INVALID_HANDLE
        if not self._ctx_ok(info["ctx"]):
            return None, self.SCARD_E_NO_SERVICE
        if info["reader"] not in self.readers:
            return None, self.SCARD_E_READER_UNAVAILABLE
        card, counter = self.readers[info["reader"]]
        if counter != info["counter"] or card is None:
            return None, self.SCARD_W_REMOVED_CARD
        if info.get("reset"):
            return None, self.SCARD_W_RESET_CARD
        return info, 0

    def reset_by_another_program(self, name):
        """Another program reset the card: every handle on it is told
        SCARD_W_RESET_CARD until it reconnects (pcsc-lite)."""
        for info in self.handles.values():
            if info["reader"] == name:
                info["reset"] = True

    # -- the API

    def SCardGetErrorMessage(self, hr):
        return "Service not available." if hr == self.SCARD_E_NO_SERVICE else "fake error."

    def SCardEstablishContext(self, scope):
        self.calls.append(("SCardEstablishContext",))
        if not self.up:
            return self.SCARD_E_NO_SERVICE, 0
        ctx = self._id()
        self.contexts[ctx] = self.generation
        return 0, ctx

    def SCardReleaseContext(self, ctx):
        self.calls.append(("SCardReleaseContext", ctx))
        ok = self._ctx_ok(ctx)
        self.contexts.pop(ctx, None)
        return 0 if ok else self.SCARD_E_NO_SERVICE

    def SCardListReaders(self, ctx, groups):
        if not self._ctx_ok(ctx):
            return self.SCARD_E_NO_SERVICE, []
        if not self.readers:
            return self.SCARD_E_NO_READERS_AVAILABLE, []
        return 0, list(self.readers)

    def SCardGetStatusChange(self, ctx, timeout, states):
        self.waits.append(timeout)
        if not self._ctx_ok(ctx):
            return self.SCARD_F_COMM_ERROR, []
        out = []
        changed = False
        for name, current, *_ in states:
            if name == pcsc_thread.PNP_NOTIFICATION:
                if not self.pnp_supported:
                    return self.SCARD_E_UNKNOWN_READER, []
                out.append((name, current, []))
                continue
            if name not in self.readers:
                return self.SCARD_E_UNKNOWN_READER, []
            event = self._event(name)
            if event != current:
                changed = True
                event |= self.SCARD_STATE_CHANGED
            card = self.readers[name][0]
            out.append((name, event, list(card.atr) if card else []))
        return (0 if changed else self.SCARD_E_TIMEOUT), out

    def SCardConnect(self, ctx, name, share, protocols):
        self.calls.append(("SCardConnect", name, share, protocols))
        if not self._ctx_ok(ctx):
            return self.SCARD_E_NO_SERVICE, 0, 0
        if name not in self.readers:
            return self.SCARD_E_UNKNOWN_READER, 0, 0
        card, counter = self.readers[name]
        if share == self.SCARD_SHARE_DIRECT:  # no card needed, none powered up
            h = self._id()
            self.handles[h] = dict(ctx=ctx, reader=name, counter=counter, share=share)
            return 0, h, 0
        if card is None:
            return self.SCARD_E_NO_SMARTCARD, 0, 0
        for info in self.handles.values():
            if info["reader"] == name and (share == self.SCARD_SHARE_EXCLUSIVE
                                           or info["share"] == self.SCARD_SHARE_EXCLUSIVE):
                return self.SCARD_E_SHARING_VIOLATION, 0, 0
        h = self._id()
        self.handles[h] = dict(ctx=ctx, reader=name, counter=counter, share=share)
        card.powered = True
        return 0, h, protocols & self.SCARD_PROTOCOL_T1 or self.SCARD_PROTOCOL_T0

    def SCardReconnect(self, h, share, protocols, init):
        self.calls.append(("SCardReconnect", init))
        info = self.handles.get(h)
        if info is None:
            return self.SCARD_E_INVALID_HANDLE, 0
        if not self._ctx_ok(info["ctx"]):
            return self.SCARD_E_NO_SERVICE, 0
        card, counter = self.readers[info["reader"]]
        if card is None:
            return self.SCARD_E_NO_SMARTCARD, 0
        if init == self.SCARD_UNPOWER_CARD and not card.cold_reset:
            return self.SCARD_E_UNSUPPORTED_FEATURE, 0
        info["counter"] = counter
        info["reset"] = False
        return 0, self.SCARD_PROTOCOL_T1

    def SCardDisconnect(self, h, disposition):
        self.calls.append(("SCardDisconnect", h))
        self.handles.pop(h, None)
        return 0

    def SCardBeginTransaction(self, h):
        self.calls.append(("SCardBeginTransaction",))
        info, hr = self._handle(h)
        if info is None:
            return hr
        self.locks[info["reader"]] = h
        return 0

    def SCardEndTransaction(self, h, disposition):
        self.calls.append(("SCardEndTransaction",))
        for reader, holder in list(self.locks.items()):
            if holder == h:
                del self.locks[reader]
        return 0

    def SCardTransmit(self, h, protocol, apdu):
        self.calls.append(("SCardTransmit", bytes(apdu)))
        info, hr = self._handle(h)
        if info is None:
            return hr, []
        card = self.readers[info["reader"]][0]
        if card.fail_transfer:
            return self.SCARD_E_NOT_TRANSACTED, []
        return 0, list(card.transmit(bytes(apdu)))

    def SCardStatus(self, h):
        self.calls.append(("SCardStatus",))
        direct = self.handles.get(h, {}).get("share") == self.SCARD_SHARE_DIRECT
        if direct:
            info = self.handles[h]
        else:
            info, hr = self._handle(h)
            if info is None:
                return hr, "", 0, 0, []
        card, counter = self.readers[info["reader"]]
        if card is None:
            return 0, info["reader"], (counter << 16) | 0x2, 0, []
        protocol = self.SCARD_PROTOCOL_T1 if card.powered else 0
        return 0, info["reader"], (counter << 16) | 0x34, protocol, list(card.atr)

    def names(self):
        return [c[0] for c in self.calls]


class FakePool:
    """A single-thread pool whose jobs run when the test says so."""

    def __init__(self, name):
        self.name = name
        self.jobs = collections.deque()
        self.started = self.stopped = self.abandoned = False

    def start(self):
        self.started = True

    def stop(self):
        self.stopped = True

    def callInThreadWithCallback(self, on_result, fn, *args):
        assert self.started and not self.stopped, self.name
        self.jobs.append((on_result, fn, args))

    def callInThread(self, fn, *args):
        self.callInThreadWithCallback(lambda ok, result: None, fn, *args)

    def run(self, n=None):
        """Run queued jobs (all, including ones queued meanwhile, or ``n``)."""
        done = 0
        while self.jobs and (n is None or done < n):
            on_result, fn, args = self.jobs.popleft()
            try:
                result = fn(*args)
            except BaseException:
                on_result(False, Failure())
            else:
                on_result(True, result)
            done += 1
        return done


class FakeReactor(Clock):
    def callFromThread(self, f, *args, **kwargs):
        f(*args, **kwargs)


class Harness:
    def __init__(self, test, readers=(R0, R1), cards=(R0,), readers_re=None, **kw):
        if readers_re is not None:
            kw["readers"] = re.compile(readers_re, re.IGNORECASE)
        self.scard = FakeScard()
        for name in readers:
            self.scard.plug(name, FakeCard() if name in cards else None)
        self.reactor = FakeReactor()
        self.pools = {}
        self.registry = ReaderRegistry()
        self.backend = pcsc.PcscBackend(
            reactor=self.reactor, scard=self.scard, pool_factory=self.pool,
            abandon=self.abandon, **kw)
        self.dispatcher = Dispatcher(self.registry, self.reactor, command_timeout=2.0)
        self.ready = self.backend.start(self.registry)
        self.scan()
        test.assertIsNone(test.successResultOf(self.ready))

    def pool(self, name):
        p = FakePool(name)
        self.pools[name] = p
        return p

    def abandon(self, pool):
        pool.abandoned = True

    @property
    def monitor(self):
        return self.pools["pcsc monitor"]

    def scan(self):
        """One look at the readers (plus whatever the reader threads have queued)."""
        self.reactor.advance(0)
        self.monitor.run(1)
        self.run_readers()

    def run_readers(self):
        for name, p in list(self.pools.items()):
            if name != "pcsc monitor":
                p.run()

    def listed(self):
        return [(r.name, r.present) for r in self.registry.readers]

    def request(self, reader, *commands):
        cmds = [make_command([str(i), *c.split(":")]) for i, c in enumerate(commands, 1)]
        result = self.dispatcher.execute(Request(reader, None, cmds), Session())
        if isinstance(result, Deferred):
            return result
        return [r for _, r in result]

    def results(self, d):
        return [r for _, r in d]


# -- tests ----------------------------------------------------------------------------

class FromUrlTests(SynchronousTestCase):
    def test_defaults(self):
        make = pcsc.from_url("pcsc:", scard=FakeScard())
        backend = make(FakeReactor())
        verifyObject(IBackend, backend)
        self.assertEqual((backend.mode, backend.protocol, backend.chain, backend.readers),
                         ("shared", "any", False, None))
        self.assertEqual(backend.description, "pcsc: all readers, shared, protocol any, idle release 0.5s")

    def test_parameters(self):
        make = pcsc.from_url("pcsc:?readers=^Virtual.*01$&mode=exclusive&protocol=T1&chain=1",
                             scard=FakeScard())
        backend = make(FakeReactor())
        self.assertEqual((backend.mode, backend.protocol, backend.chain), ("exclusive", "t1", True))
        self.assertTrue(backend.readers.search("virtual pcd 00 01"))
        self.assertFalse(backend.readers.search(R0))

    def test_bad_parameters(self):
        for url, message in [
            ("pcsc:?mode=greedy", "mode='greedy' is not one of shared, exclusive"),
            ("pcsc:?protocol=t2", "protocol='t2' is not one of any, t0, t1"),
            ("pcsc:?chain=maybe", "chain='maybe' must be 0 or 1"),
            ("pcsc:?readers=(", "readers='(' is not a regular expression"),
            ("pcsc:?readers=", "readers= must not be empty"),
            ("pcsc:?reader=x", "unknown parameter 'reader'"),
        ]:
            e = self.assertRaises(ValueError, pcsc.from_url, url, None, FakeScard())
            self.assertIn(message, str(e))

    def test_pcscd_not_running(self):
        scard = FakeScard()
        scard.up = False
        e = self.assertRaises(ValueError, pcsc.from_url, "pcsc:", None, scard)
        self.assertRegex(str(e), r"^pcscd is not (running|installed) \(Service not available \(0x8010001D\)\): "
                                 r"install and start it, e\.g\. apt-get install pcscd")

    def test_pcscd_refuses(self):
        scard = FakeScard()
        scard.SCardEstablishContext = lambda scope: (scard.SCARD_F_COMM_ERROR, 0)
        e = self.assertRaises(ValueError, pcsc.from_url, "pcsc:", None, scard)
        self.assertEqual(str(e), "pcscd refused a connection (fake error (0x80100013)); if it runs, "
                                 "check that this user may use it (polkit, see docs/pcsc.md)")

    def test_pyscard_missing(self):
        saved = {k: sys.modules[k] for k in ("smartcard", "smartcard.scard") if k in sys.modules}
        sys.modules["smartcard"] = None
        try:
            e = self.assertRaises(ValueError, pcsc.from_url, "pcsc:", None)
        finally:
            del sys.modules["smartcard"]
            sys.modules.update(saved)
        self.assertEqual(str(e), "pyscard is not installed: pip install '.[pcsc]' from a clone of cloudfoxy-proxy "
                                 "(pyscard builds from source: first apt-get install swig libpcsclite-dev gcc "
                                 "python3-dev)")


class MonitorTests(SynchronousTestCase):
    def test_readers_reported(self):
        h = Harness(self)
        verifyObject(IBackend, h.backend)
        self.assertEqual(h.listed(), [(R0, True), (R1, False)])
        self.assertEqual(h.registry.get(R0).info.atr, ATR)
        self.assertIsNone(h.registry.get(R1).info.atr)
        self.assertEqual(h.pools[f"pcsc {R0}"].started, True)
        # the first look does not wait; later ones wait at most poll_interval
        h.scan()
        self.assertEqual(h.scard.waits, [0, 500])

    def test_readers_filter(self):
        h = Harness(self, readers=(R0, R1, "Other Reader 00"), readers_re="01$|other")
        self.assertEqual([n for n, _ in h.listed()], [R1, "Other Reader 00"])

    def test_card_inserted_and_removed(self):
        h = Harness(self)
        h.scard.insert(R1, FakeCard(atr=OTHER_ATR))
        h.scan()
        self.assertEqual(h.listed(), [(R0, True), (R1, True)])
        self.assertEqual(h.registry.get(R1).info.atr, OTHER_ATR)
        h.scard.remove(R0)
        h.scan()
        self.assertEqual(h.listed(), [(R0, False), (R1, True)])

    def test_reader_unplugged_and_replugged_keeps_its_name(self):
        h = Harness(self)
        d = h.request(R0, "APDU:00A4000C023F00")
        h.run_readers()
        self.assertEqual(h.results(self.successResultOf(d)), ["9000"])
        h.scard.unplug(R0)
        h.scan()
        self.assertEqual(h.listed(), [(R1, False)])
        self.assertEqual(h.request(R0, "APDU:00A4000C023F00"), ["C083"])
        self.assertEqual(h.scard.handles, {})  # the old handle was let go
        h.scard.plug(R0, FakeCard())
        h.scan()
        self.assertEqual(h.listed(), [(R1, False), (R0, True)])
        d = h.request(R0, "APDU:0084000008")
        h.run_readers()
        self.assertEqual(h.results(self.successResultOf(d)), ["01010101010101019000"])
        self.assertEqual(len(h.pools), 3)  # the reader kept its thread

    def test_pcscd_restart(self):
        h = Harness(self)
        d = h.request(R0, "APDU:00A4000C023F00")
        h.run_readers()
        self.assertEqual(h.results(self.successResultOf(d)), ["9000"])
        h.scard.up = False
        h.scard.restart()
        h.scan()
        self.assertEqual(h.listed(), [(R0, False), (R1, False)])
        self.assertEqual(h.request(R0, "APDU:00A4000C023F00"), ["C080"])
        # no busy loop while pcscd is down: the next try is retry_interval later
        h.monitor.run()
        self.assertEqual(h.monitor.jobs, collections.deque())
        h.reactor.advance(1.0)
        self.assertEqual(len(h.monitor.jobs), 1)
        h.scan()  # still down
        self.assertEqual(h.listed(), [(R0, False), (R1, False)])
        h.scard.up = True
        h.reactor.advance(1.0)
        h.scan()
        self.assertEqual(h.listed(), [(R0, True), (R1, False)])
        # the card was powered down with pcscd: the client that used it is
        # told once (docs/backends.md, "Resets"), then served
        self.assertEqual(h.request(R0, "APDU:0084000008"), ["C080"])
        d = h.request(R0, "APDU:0084000008")
        h.run_readers()
        self.assertEqual(h.results(self.successResultOf(d)), ["01010101010101019000"])

    def test_pnp_unsupported(self):
        h = Harness(self)
        h.scard.pnp_supported = False
        h.scan()
        h.reactor.advance(0.1)
        h.scan()
        h.reactor.advance(0.1)
        h.scard.insert(R1, FakeCard())
        h.scan()
        self.assertEqual(h.listed(), [(R0, True), (R1, True)])
        self.assertFalse(h.backend._monitor.pnp)

    def test_no_readers(self):
        h = Harness(self, readers=())
        self.assertEqual(h.listed(), [])
        h.scan()
        self.assertEqual(h.scard.waits, [0, 500])  # a bounded wait on the PnP pseudo reader
        h.scard.plug(R0, FakeCard())
        h.scan()
        self.assertEqual(h.listed(), [(R0, True)])


class CommandTests(SynchronousTestCase):
    def test_transmit_in_a_transaction(self):
        h = Harness(self)
        d = h.backend.transmit(R0, SELECT_MF)
        self.assertNoResult(d)
        h.run_readers()
        self.assertEqual(self.successResultOf(d), b"\x90\x00")
        self.assertEqual(h.scard.names()[-3:], ["SCardConnect", "SCardBeginTransaction",
                                                "SCardTransmit"])
        connect = [c for c in h.scard.calls if c[0] == "SCardConnect"][0]
        self.assertEqual(connect[2:], (h.scard.SCARD_SHARE_SHARED, 3))
        # the next command of the same request runs in the same transaction,
        # on the same handle
        d = h.backend.transmit(R0, GET_CHALLENGE)
        h.run_readers()
        self.assertEqual(self.successResultOf(d), b"\x01" * 8 + b"\x90\x00")
        self.assertEqual(h.scard.names().count("SCardConnect"), 1)
        self.assertEqual(h.scard.names()[-2:], ["SCardTransmit", "SCardTransmit"])
        # the dispatcher is done with the card: the transaction ends
        h.backend.release(R0)
        h.run_readers()
        self.assertEqual(h.scard.names()[-1], "SCardEndTransaction")
        d = h.backend.transmit(R0, SELECT_MF)
        h.run_readers()
        self.assertEqual(h.scard.names()[-2:], ["SCardBeginTransaction", "SCardTransmit"])

    def test_exclusive_t0(self):
        h = Harness(self, mode="exclusive", protocol="t0")
        d = h.backend.transmit(R0, SELECT_MF)
        h.run_readers()
        self.assertEqual(self.successResultOf(d), b"\x90\x00")
        self.assertNotIn("SCardBeginTransaction", h.scard.names())
        connect = [c for c in h.scard.calls if c[0] == "SCardConnect"][0]
        self.assertEqual(connect[2:], (h.scard.SCARD_SHARE_EXCLUSIVE, h.scard.SCARD_PROTOCOL_T0))

    def test_exact_answer_by_default(self):
        h = Harness(self)
        card = h.scard.card(R0)
        card.answers[bytes.fromhex("00B0000000")] = [bytes.fromhex("6C10")]
        card.answers[bytes.fromhex("00A40000023F00")] = [bytes.fromhex("610C")]
        self.assertEqual(self._tx(h, "00B0000000"), "6C10")
        self.assertEqual(self._tx(h, "00A40000023F00"), "610C")

    def _tx(self, h, hexstr):
        d = h.backend.transmit(R0, bytes.fromhex(hexstr))
        h.run_readers()
        return self.successResultOf(d).hex().upper()

    def test_chain(self):
        h = Harness(self, chain=True)
        card = h.scard.card(R0)
        card.answers[bytes.fromhex("00B0000000")] = [bytes.fromhex("6C03")]
        card.answers[bytes.fromhex("00B0000003")] = [bytes.fromhex("AABBCC9000")]
        self.assertEqual(self._tx(h, "00B0000000"), "AABBCC9000")
        h.backend.release(R0)  # end of that request
        h.run_readers()
        card.answers[bytes.fromhex("01A40000023F00")] = [bytes.fromhex("AA6102")]
        card.answers[bytes.fromhex("01C0000002")] = [bytes.fromhex("BBCC6101")]
        card.answers[bytes.fromhex("01C0000001")] = [bytes.fromhex("DD9000")]
        self.assertEqual(self._tx(h, "01A40000023F00"), "AABBCCDD9000")
        h.backend.release(R0)
        h.run_readers()
        # the whole chain ran inside one transaction
        names = h.scard.names()
        last = len(names) - 1 - names[::-1].index("SCardBeginTransaction")
        self.assertEqual(names[last:], ["SCardBeginTransaction"] + ["SCardTransmit"] * 3
                         + ["SCardEndTransaction"])

    def test_chain_helpers(self):
        le = apdu.with_le
        self.assertEqual(le(bytes.fromhex("00B00000"), 5).hex(), "00b0000005")
        self.assertEqual(le(bytes.fromhex("00B0000000"), 5).hex(), "00b0000005")
        self.assertEqual(le(bytes.fromhex("00A4040002A000"), 9).hex(), "00a4040002a00009")
        self.assertEqual(le(bytes.fromhex("00A4040002A00000"), 9).hex(), "00a4040002a00009")
        cla = apdu.get_response_cla
        self.assertEqual([cla(c) for c in (0x00, 0x03, 0x0C, 0x80, 0x81, 0x45, 0x90)],
                         [0x00, 0x03, 0x00, 0x00, 0x01, 0x45, 0x00])

    def test_empty_reader_fails_at_once(self):
        h = Harness(self)
        e = self.assertRaises(CardError, h.backend.transmit, R1, SELECT_MF)
        self.assertEqual(e.code, errors.NO_CARD)
        e = self.assertRaises(CardError, h.backend.reset, R1)
        self.assertEqual(e.code, errors.NO_CARD)
        self.assertEqual(h.pools[f"pcsc {R1}"].jobs, collections.deque())
        e = self.assertRaises(CardError, h.backend.transmit, "Nope", SELECT_MF)
        self.assertEqual(e.code, errors.NOT_FOUND)

    def test_answer_without_status_word(self):
        """vpcd answers a command with no bytes when its card goes away:
        C080 once pcscd reports the card gone; while it does not, the empty
        answer is passed on (the dispatcher answers C086 for it)."""
        h = Harness(self)
        self._tx(h, "00A4000C023F00")
        card = h.scard.card(R0)
        card.answers[SELECT_MF] = [b"", b""]
        d = h.backend.transmit(R0, SELECT_MF)
        h.run_readers()
        self.assertEqual(self.successResultOf(d), b"")
        h.scard.remove(R0)
        d = h.backend.transmit(R0, SELECT_MF)
        h.run_readers()
        self.assertEqual(self.failureResultOf(d, CardError).value.code, errors.NO_CARD)

    def test_card_pulled_before_pcscd_noticed(self):
        """A transfer error while the card is still reported present: the
        backend looks again, sees the card gone, and answers C080."""
        h = Harness(self)
        self._tx(h, "00A4000C023F00")
        h.scard.card(R0).fail_transfer = True
        h.scard.remove(R0)  # what pcscd will report
        d = h.backend.transmit(R0, SELECT_MF)
        h.run_readers()
        self.assertEqual(self.failureResultOf(d, CardError).value.code, errors.NO_CARD)
        self.assertEqual(h.scard.handles, {})

    def test_transfer_error_with_card_present(self):
        h = Harness(self, removal_wait=0.0)
        h.scard.card(R0).fail_transfer = True
        d = h.backend.transmit(R0, SELECT_MF)
        h.run_readers()
        error = self.failureResultOf(d, CardError).value
        self.assertEqual(error.code, errors.UPSTREAM)
        self.assertIn("transmit: fake error (0x80100016)", error.reason)

    def test_card_pulled_then_reinserted_between_commands(self):
        """pcscd says SCARD_W_REMOVED_CARD: the next command gets C080 (its
        session state is gone; the APDU is never sent), the handle is
        reconnected, and later commands go to the new card."""
        h = Harness(self)
        self.assertEqual(self._tx(h, "00A4000C023F00"), "9000")
        h.scard.remove(R0)
        h.scard.insert(R0, FakeCard())
        d = h.request(R0, "APDU:0084000008")
        h.run_readers()
        self.assertEqual(h.results(self.successResultOf(d)), ["C080"])
        self.assertEqual(h.scard.card(R0).received, [])  # never reached the new card
        self.assertIn(("SCardReconnect", h.scard.SCARD_LEAVE_CARD), h.scard.calls)
        self.assertEqual(self._tx(h, "0084000008"), "01010101010101019000")

    def test_reset_by_another_program_is_c080_once(self):
        """SCARD_W_RESET_CARD (another program reset the card) at the first
        APDU of a request, or in the middle of one: that command gets C080,
        the card is reconnected, the next command runs."""
        h = Harness(self)
        self.assertEqual(self._tx(h, "00A4000C023F00"), "9000")
        h.scard.reset_by_another_program(R0)
        d = h.request(R0, "APDU:00A4000C023F00", "APDU:00A4000C023F00")
        h.run_readers()
        h.run_readers()
        self.assertEqual(h.results(self.successResultOf(d)), ["C080", "9000"])
        self.assertEqual(self._tx(h, "00A4000C023F00"), "9000")
        # the reset lands between two commands of one request (no transaction: exclusive mode)
        h = Harness(self, mode="exclusive")
        d = h.backend.transmit(R0, SELECT_MF)
        h.run_readers()
        self.assertEqual(self.successResultOf(d).hex().upper(), "9000")
        h.scard.reset_by_another_program(R0)
        d = h.backend.transmit(R0, SELECT_MF)
        h.run_readers()
        error = self.failureResultOf(d, CardError).value
        self.assertEqual(error.code, errors.NO_CARD)
        self.assertIn("reset or removed by another program", error.reason)
        d = h.backend.transmit(R0, SELECT_MF)
        h.run_readers()
        self.assertEqual(self.successResultOf(d).hex().upper(), "9000")

    def test_removed_card_noticed_then_reinserted(self):
        h = Harness(self)
        self.assertEqual(self._tx(h, "00A4000C023F00"), "9000")
        h.scard.remove(R0)
        h.scan()
        self.assertEqual(h.scard.handles, {})  # let go when the card left
        self.assertEqual(h.request(R0, "APDU:00A4000C023F00"), ["C080"])
        h.scard.insert(R0, FakeCard())
        h.scan()
        self.assertEqual(self._tx(h, "00A4000C023F00"), "9000")

    def test_sharing_violation(self):
        h = Harness(self)
        other_ctx = h.scard.SCardEstablishContext(0)[1]
        h.scard.SCardConnect(other_ctx, R0, h.scard.SCARD_SHARE_EXCLUSIVE, 3)
        d = h.backend.transmit(R0, SELECT_MF)
        h.run_readers()
        error = self.failureResultOf(d, CardError).value
        self.assertEqual(error.code, errors.UPSTREAM)
        self.assertIn("another program holds the card", error.reason)

    def test_context_dies_between_commands(self):
        """pcscd restarted but the monitor has not noticed yet: the dead
        context is replaced and the command (never sent) is tried again."""
        h = Harness(self)
        self.assertEqual(self._tx(h, "00A4000C023F00"), "9000")
        h.scard.restart()
        self.assertEqual(self._tx(h, "0084000008"), "01010101010101019000")

    def test_pcscd_gone_during_command(self):
        h = Harness(self)
        self.assertEqual(self._tx(h, "00A4000C023F00"), "9000")
        h.scard.up = False
        d = h.backend.transmit(R0, SELECT_MF)
        h.run_readers()
        error = self.failureResultOf(d, CardError).value
        self.assertEqual(error.code, errors.UPSTREAM)
        self.assertIn("pcscd", error.reason)

    def test_reset_is_cold(self):
        h = Harness(self)
        d = h.backend.reset(R0)
        h.run_readers()
        self.assertEqual(self.successResultOf(d), ATR)
        self.assertEqual([c for c in h.scard.calls if c[0] == "SCardReconnect"],
                         [("SCardReconnect", h.scard.SCARD_UNPOWER_CARD)])

    def test_reset_warm_when_cold_unsupported(self):
        h = Harness(self)
        h.scard.card(R0).cold_reset = False
        d = h.backend.reset(R0)
        h.run_readers()
        self.assertEqual(self.successResultOf(d), ATR)
        self.assertEqual([c[1] for c in h.scard.calls if c[0] == "SCardReconnect"],
                         [h.scard.SCARD_UNPOWER_CARD, h.scard.SCARD_RESET_CARD])

    def test_reset_new_card(self):
        h = Harness(self)
        self.assertEqual(self._tx(h, "00A4000C023F00"), "9000")
        h.scard.remove(R0)
        h.scard.insert(R0, FakeCard(atr=OTHER_ATR))
        d = h.backend.reset(R0)
        h.run_readers()
        self.assertEqual(self.successResultOf(d), OTHER_ATR)

    def test_reset_card_gone(self):
        h = Harness(self)
        self.assertEqual(self._tx(h, "00A4000C023F00"), "9000")
        h.scard.remove(R0)
        d = h.backend.reset(R0)
        h.run_readers()
        self.assertEqual(self.failureResultOf(d, CardError).value.code, errors.NO_CARD)

    def test_through_the_dispatcher(self):
        h = Harness(self)
        d = h.request(R0, "RESET", "APDU:00A4000C023F00", "APDU:0084000008")
        h.run_readers()
        self.assertEqual(h.results(self.successResultOf(d)),
                         [ATR.hex().upper(), "9000", "01010101010101019000"])


class IdleReleaseTests(SynchronousTestCase):
    """idle_release: the card handle is let go after that many seconds
    without a request; the next command connects again, C080 only when the
    card changed meanwhile (and then once for every client that used it)."""

    def request(self, h, session, *apdus):
        cmds = [make_command([str(i), "APDU", a]) for i, a in enumerate(apdus, 1)]
        d = h.dispatcher.execute(Request(R0, None, cmds), session)
        if isinstance(d, Deferred):
            h.run_readers()
            d = self.successResultOf(d)
        return [r for _, r in d]

    def other_program_exclusive(self, h):
        """Another local program's SCardConnect(SCARD_SHARE_EXCLUSIVE): its result."""
        s = h.scard
        _, ctx = s.SCardEstablishContext(s.SCARD_SCOPE_USER)
        hr, handle, _ = s.SCardConnect(ctx, R0, s.SCARD_SHARE_EXCLUSIVE, s.SCARD_PROTOCOL_T1)
        if hr == 0:
            s.SCardDisconnect(handle, s.SCARD_LEAVE_CARD)
        s.SCardReleaseContext(ctx)
        return hr

    def test_handle_let_go_after_idle_release(self):
        h = Harness(self, idle_release=5.0)
        a = Session("a")
        self.assertEqual(self.request(h, a, "00A4000C023F00"), ["9000"])
        self.assertEqual(h.scard.handles_on(R0), [h.scard.SCARD_SHARE_SHARED])
        self.assertEqual(self.other_program_exclusive(h), h.scard.SCARD_E_SHARING_VIOLATION)
        h.reactor.advance(4.9)
        h.run_readers()
        self.assertEqual(h.scard.handles_on(R0), [h.scard.SCARD_SHARE_SHARED])
        h.reactor.advance(0.1)
        h.run_readers()
        self.assertEqual(h.scard.handles_on(R0), [])
        self.assertEqual(h.scard.locks, {})
        self.assertEqual(self.other_program_exclusive(h), 0)
        # the card was not powered down nor swapped: no C080, the handle is back
        self.assertEqual(self.request(h, a, "0084000008"), ["01010101010101019000"])
        self.assertEqual(h.scard.handles_on(R0), [h.scard.SCARD_SHARE_SHARED])
        self.assertEqual(h.reactor.getDelayedCalls()[-1].getTime(), 10.0)

    def test_requests_keep_the_handle(self):
        h = Harness(self, idle_release=5.0)
        a = Session("a")
        for _ in range(4):
            self.assertEqual(self.request(h, a, "00A4000C023F00"), ["9000"])
            h.reactor.advance(3.0)
            h.run_readers()
        self.assertEqual(h.scard.names().count("SCardConnect"), 1)
        self.assertEqual(h.scard.handles_on(R0), [h.scard.SCARD_SHARE_SHARED])

    def test_zero_keeps_the_handle(self):
        h = Harness(self, idle_release=0)
        self.assertEqual(self.request(h, Session("a"), "00A4000C023F00"), ["9000"])
        h.reactor.advance(3600)
        h.run_readers()
        self.assertEqual(h.scard.handles_on(R0), [h.scard.SCARD_SHARE_SHARED])

    def test_no_release_while_a_card_session_holds_it(self):
        h = Harness(self, idle_release=5.0)
        holder = Session("holder")
        opened = h.dispatcher.hold(R0, holder)
        card = self.successResultOf(opened)
        self.assertEqual(self.request(h, holder, "00A4000C023F00"), ["9000"])
        h.reactor.advance(60)
        h.run_readers()
        self.assertEqual(h.scard.handles_on(R0), [h.scard.SCARD_SHARE_SHARED])
        card.close()
        h.run_readers()
        h.reactor.advance(5.0)
        h.run_readers()
        self.assertEqual(h.scard.handles_on(R0), [])

    def test_powered_down_meanwhile_is_c080_once_per_client(self):
        h = Harness(self, idle_release=5.0)
        a, b = Session("a"), Session("b", frontend="rest")
        self.assertEqual(self.request(h, a, "00A4000C023F00"), ["9000"])
        self.assertEqual(self.request(h, b, "00A4000C023F00"), ["9000"])
        h.reactor.advance(5.0)
        h.run_readers()
        h.scard.power_down(R0)
        sent = len(h.scard.card(R0).received)
        # a: C080 from the reconnect (the APDU is not sent), then its next one runs
        self.assertEqual(self.request(h, a, "00A4000C023F00", "00A4000C023F00"), ["C080", "9000"])
        self.assertEqual(len(h.scard.card(R0).received), sent + 1)
        # b is told once too, by the dispatcher, and a new connection of a's client is not
        self.assertEqual(self.request(h, b, "00A4000C023F00"), ["C080"])
        self.assertEqual(self.request(h, b, "00A4000C023F00"), ["9000"])
        self.assertEqual(self.request(h, Session("a2"), "00A4000C023F00"), ["9000"])

    def test_powered_down_while_another_program_held_it(self):
        """A command while another program holds the card exclusively gets
        C086; the comparison with the released card waits for the next
        connect that works."""
        h = Harness(self, idle_release=5.0)
        a = Session("a")
        self.assertEqual(self.request(h, a, "00A4000C023F00"), ["9000"])
        h.reactor.advance(5.0)
        h.run_readers()
        s = h.scard
        _, ctx = s.SCardEstablishContext(s.SCARD_SCOPE_USER)
        hr, other, _ = s.SCardConnect(ctx, R0, s.SCARD_SHARE_EXCLUSIVE, s.SCARD_PROTOCOL_T1)
        self.assertEqual(hr, 0)
        self.assertEqual(self.request(h, a, "00A4000C023F00"), ["C086"])
        s.SCardDisconnect(other, s.SCARD_LEAVE_CARD)
        s.power_down(R0)
        self.assertEqual(self.request(h, a, "00A4000C023F00"), ["C080"])
        self.assertEqual(self.request(h, a, "00A4000C023F00"), ["9000"])

    def test_swapped_meanwhile_is_c080(self):
        h = Harness(self, idle_release=5.0)
        a = Session("a")
        self.assertEqual(self.request(h, a, "00A4000C023F00"), ["9000"])
        h.reactor.advance(5.0)
        h.run_readers()
        h.scard.remove(R0)  # between two looks of the monitor
        h.scard.insert(R0, FakeCard())
        self.assertEqual(self.request(h, a, "00A4000C023F00"), ["C080"])
        self.assertEqual(self.request(h, a, "00A4000C023F00"), ["9000"])

    def test_other_atr_meanwhile_is_c080(self):
        h = Harness(self, idle_release=5.0)
        a = Session("a")
        self.assertEqual(self.request(h, a, "00A4000C023F00"), ["9000"])
        h.reactor.advance(5.0)
        h.run_readers()
        h.scard.card(R0).atr = OTHER_ATR
        self.assertEqual(self.request(h, a, "00A4000C023F00"), ["C080"])
        self.assertEqual(self.request(h, a, "00A4000C023F00"), ["9000"])

    def test_from_url(self):
        backend = pcsc.from_url("pcsc:?idle_release=0.5", scard=FakeScard())(FakeReactor())
        self.assertEqual(backend.idle_release, 0.5)
        for url, message in [("pcsc:?idle_release=-1", "idle_release=-1 is out of range"),
                             ("pcsc:?idle_release=soon", "idle_release='soon' is not a number")]:
            e = self.assertRaises(ValueError, pcsc.from_url, url, None, FakeScard())
            self.assertIn(message, str(e))


class ResetGenerationTests(SynchronousTestCase):
    """The dispatcher's reset generation over pcsc: a C080 one client got
    (another program reset the card) reaches every other client once."""

    def test_reset_by_another_program_reaches_every_client_once(self):
        h = Harness(self, idle_release=0)
        sessions = [Session("a"), Session("b"), Session("c", frontend="api")]
        for s in sessions:
            self.assertEqual(IdleReleaseTests.request(self, h, s, "00A4000C023F00"), ["9000"])
        h.scard.reset_by_another_program(R0)
        got = [IdleReleaseTests.request(self, h, s, "00A4000C023F00") for s in sessions]
        self.assertEqual(got, [["C080"]] * 3)
        got = [IdleReleaseTests.request(self, h, s, "00A4000C023F00") for s in sessions]
        self.assertEqual(got, [["9000"]] * 3)

    def test_a_clients_reset_reaches_the_others_once(self):
        h = Harness(self, idle_release=0)
        a, b = Session("a"), Session("b", frontend="api")
        self.assertEqual(IdleReleaseTests.request(self, h, b, "00A4000C023F00"), ["9000"])
        d = h.dispatcher.execute(Request(R0, None, [make_command(["1", "RESET"]),
                                                    make_command(["2", "APDU", "00A4000C023F00"])]), a)
        h.run_readers()
        h.run_readers()
        self.assertEqual([r for _, r in self.successResultOf(d)], [ATR.hex().upper(), "9000"])
        self.assertEqual(IdleReleaseTests.request(self, h, b, "00A4000C023F00"), ["C080"])
        self.assertEqual(IdleReleaseTests.request(self, h, b, "00A4000C023F00"), ["9000"])
        self.assertEqual(IdleReleaseTests.request(self, h, a, "00A4000C023F00"), ["9000"])


class StuckCardTests(SynchronousTestCase):
    """A card that never answers holds its reader's thread; the reactor side
    answers C086 at the command timeout and fails fast until it returns."""

    def test_timeout_then_fail_fast_then_recovery(self):
        h = Harness(self, cards=(R0, R1))
        pool0 = h.pools[f"pcsc {R0}"]
        d = h.request(R0, "APDU:0084000008", "APDU:00A4000C023F00")
        self.assertNoResult(d)
        self.assertEqual(len(pool0.jobs), 1)
        h.reactor.advance(2.0)  # the command timeout
        # the first command timed out; the second failed fast, without
        # queueing behind the stuck one
        self.assertEqual(h.results(self.successResultOf(d)), ["C086", "C086"])
        self.assertEqual(len(pool0.jobs), 1)
        self.assertEqual(h.request(R0, "RESET"), ["C086"])
        # the other reader is not affected
        d1 = h.request(R1, "APDU:00A4000C023F00")
        h.pools[f"pcsc {R1}"].run()
        self.assertEqual(h.results(self.successResultOf(d1)), ["9000"])
        # the monitor keeps working
        h.scard.remove(R1)
        h.reactor.advance(0)
        h.monitor.run(1)  # (not h.scan(): that would let the stuck job finish)
        self.assertEqual(h.listed(), [(R0, True), (R1, False)])
        # the card answers at last: its late answer is dropped, service resumes
        pool0.run()
        d = h.request(R0, "APDU:00A4000C023F00")
        pool0.run()
        self.assertEqual(h.results(self.successResultOf(d)), ["9000"])

    def test_stop_does_not_wait_for_a_stuck_thread(self):
        h = Harness(self, cards=(R0, R1))
        d = h.request(R0, "APDU:0084000008")
        h.reactor.advance(2.0)
        self.assertEqual(h.results(self.successResultOf(d)), ["C086"])
        h.reactor.advance(0)
        stopped = h.backend.stop()
        h.monitor.run()
        h.pools[f"pcsc {R1}"].run()
        self.assertNoResult(stopped)
        h.reactor.advance(h.backend.stop_timeout)
        self.successResultOf(stopped)
        pool0 = h.pools[f"pcsc {R0}"]
        self.assertTrue(pool0.abandoned)
        self.assertFalse(pool0.stopped)
        self.assertTrue(h.pools[f"pcsc {R1}"].stopped)
        self.assertTrue(h.monitor.stopped)
        self.assertEqual(h.reactor.getDelayedCalls(), [])


class StopTests(SynchronousTestCase):
    def test_stop_releases_everything(self):
        h = Harness(self, cards=(R0, R1))
        for reader in (R0, R1):
            d = h.backend.transmit(reader, SELECT_MF)
            h.run_readers()
            self.successResultOf(d)
        self.assertEqual(h.scard.open_contexts(), 3)
        h.reactor.advance(0)
        stopped = h.backend.stop()
        self.assertNoResult(stopped)  # the monitor is in its wait
        h.monitor.run()
        h.run_readers()
        self.successResultOf(stopped)
        self.assertEqual(h.scard.open_contexts(), 0)
        self.assertEqual(h.scard.handles, {})
        self.assertTrue(all(p.stopped and not p.abandoned for p in h.pools.values()))
        self.assertEqual(h.reactor.getDelayedCalls(), [])
        e = self.assertRaises(CardError, h.backend.transmit, R0, SELECT_MF)
        self.assertEqual(e.code, errors.NOT_FOUND)
        self.assertIsNone(h.backend.stop())

    def test_stop_while_pcscd_down(self):
        h = Harness(self)
        h.scard.up = False
        h.scan()
        self.assertEqual(len(h.reactor.getDelayedCalls()), 1)  # the retry
        stopped = h.backend.stop()
        h.monitor.run()
        h.run_readers()
        self.successResultOf(stopped)
        self.assertEqual(h.reactor.getDelayedCalls(), [])
