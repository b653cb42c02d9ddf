"""``pcsc:`` — the PC/SC readers of this machine (USB readers via pcscd).

``pcsc:?readers=REGEX&mode=shared&protocol=any&chain=0&idle_release=0.5``

* ``readers``  — only readers whose PC/SC name matches this regular
  expression (searched, case-insensitive); default: all readers.
* ``mode``     — ``shared`` (default: other local programs may use the card
  too, and every APDU runs inside a PC/SC transaction so none of their APDUs
  can slip in between) or ``exclusive`` (the proxy holds the card alone).
* ``protocol`` — ``any`` (default), ``t0`` or ``t1``.
* ``chain``    — ``1``: follow ``61xx`` with GET RESPONSE and answer
  ``6Cxx`` by re-sending with that Le; ``0`` (default): the card's exact
  answer.
* ``idle_release`` — seconds (default 0.5; 0: never) without a request or
  card session after which a reader's card handle is let go
  (``SCardDisconnect(SCARD_LEAVE_CARD)``), so programs that want the card
  exclusively get it between the proxy's requests; the next command
  connects again and answers ``C080`` if the card changed meanwhile
  (``_Link._changed_while_released``; docs/pcsc.md).

Threads (no blocking call on the reactor thread): every reader has its own single-thread pool and its
own PC/SC context, so a card that stops answering blocks only its reader;
one more single-thread pool runs the monitor, a loop of bounded
``SCardGetStatusChange`` waits that notices readers and cards coming and
going.  No pyscard call ever runs on the reactor thread.

``pcsc_thread.py`` holds what runs in those threads (``_Link``, one
reader's context and card handle; ``_Monitor``, the reader list) and talks
to the reactor only through return values and exceptions; this module holds
the URL's settings and ``PcscBackend``, which runs on the reactor thread.
"""

import re
import shutil

import attr
from twisted.internet.defer import Deferred, DeferredList
from zope.interface import implementer

from .. import errors
from ..interfaces import IBackend, ReaderInfo
from ..errors import CardError
from ..logs import Logger
from . import float_param, query
from .pcsc_thread import _Down, _Link, _message, _Monitor, abandon_pool, make_thread_pool

MODES = ("shared", "exclusive")
#: Default seconds of idleness before a reader's card handle is let go.
IDLE_RELEASE = 0.5
PROTOCOLS = ("any", "t0", "t1")

INSTALL_PYSCARD = ("pip install '.[pcsc]' from a clone of cloudfoxy-proxy (pyscard builds from source: "
                   "first apt-get install swig libpcsclite-dev gcc python3-dev)")
INSTALL_PCSCD = "install and start it, e.g. apt-get install pcscd && systemctl start pcscd.socket"

# -- configuration -------------------------------------------------------------

def load_scard():
    """pyscard's low-level ``smartcard.scard`` module, or ValueError saying
    what to install."""
    try:
        from smartcard import scard
    except ModuleNotFoundError as e:
        if e.name and e.name.split(".")[0] != "smartcard":
            raise ValueError(f"pyscard cannot be loaded ({e}): {INSTALL_PYSCARD}") from None
        raise ValueError(f"pyscard is not installed: {INSTALL_PYSCARD}") from None
    except ImportError as e:  # e.g. libpcsclite.so.1 missing
        raise ValueError(f"pyscard cannot be loaded ({e}): apt-get install libpcsclite1, "
                         f"then {INSTALL_PYSCARD}") from None
    return scard


def check_service(scard):
    """ValueError with what to do when pcscd does not answer."""
    hr, ctx = scard.SCardEstablishContext(scard.SCARD_SCOPE_USER)
    if hr != scard.SCARD_S_SUCCESS:
        why = _message(scard, hr)
        if hr != scard.SCARD_E_NO_SERVICE:
            raise ValueError(f"pcscd refused a connection ({why}); if it runs, check that this "
                             "user may use it (polkit, see docs/pcsc.md)")
        if shutil.which("pcscd", path="/usr/local/sbin:/usr/sbin:/sbin:/usr/bin") is None:
            raise ValueError(f"pcscd is not installed ({why}): {INSTALL_PCSCD}")
        raise ValueError(f"pcscd is not running ({why}): {INSTALL_PCSCD}")
    scard.SCardReleaseContext(ctx)


def from_url(url, settings=None, scard=None):
    params = query(url, {"readers", "mode", "protocol", "chain", "idle_release"})
    idle_release = float_param(params, "idle_release", IDLE_RELEASE, 0.0, 86400.0)
    pattern = params.get("readers")
    if pattern is not None:
        if not pattern.strip():
            raise ValueError("readers= must not be empty (leave it out to use every reader)")
        try:
            pattern = re.compile(pattern, re.IGNORECASE)
        except re.error as e:
            raise ValueError(f"readers={params['readers']!r} is not a regular expression ({e})") from None
    mode = params.get("mode", "shared").strip().lower()
    if mode not in MODES:
        raise ValueError(f"mode={params['mode']!r} is not one of {', '.join(MODES)}")
    protocol = params.get("protocol", "any").strip().lower()
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol={params['protocol']!r} is not one of {', '.join(PROTOCOLS)}")
    chain = params.get("chain", "0").strip().lower()
    if chain not in ("0", "1", "no", "yes", "false", "true"):
        raise ValueError(f"chain={params['chain']!r} must be 0 or 1")
    chain = chain in ("1", "yes", "true")
    if scard is None:
        scard = load_scard()
    check_service(scard)

    def make(reactor):
        return PcscBackend(reactor=reactor, scard=scard, readers=pattern, mode=mode,
                           protocol=protocol, chain=chain, idle_release=idle_release)

    return make


# -- the backend (reactor thread) ----------------------------------------------

class _Worker:
    """A single-thread pool and whether a call is running in it (which it
    may still be after the caller gave up on it)."""

    __slots__ = ("pool", "calls", "since", "idle")

    def __init__(self, pool):
        self.pool = pool
        self.calls = 0  # calls handed to the thread that have not returned
        self.since = None
        self.idle = []  # Deferreds fired when no call is left

    @property
    def busy(self):
        return self.calls > 0


@attr.s(slots=True, eq=False)
class _Reader:
    """One PC/SC reader: its ``_Link`` and ``_Worker``, what the monitor saw."""

    name = attr.ib()
    link = attr.ib()
    worker = attr.ib()
    present = attr.ib(default=False)
    atr = attr.ib(default=None)
    listed = attr.ib(default=False)
    idle = attr.ib(default=None)  # DelayedCall letting the handle go (idle_release)


@implementer(IBackend)
@attr.s(eq=False)
class PcscBackend:
    """Local PC/SC readers; the registry key and the display name of a
    reader are its PC/SC name, so a reader keeps its name when re-plugged.

    ``reactor`` provides IReactorTime and ``callFromThread``;
    ``scard`` is pyscard's ``smartcard.scard`` (or a stand-in);
    ``pool_factory(name)`` makes a started-later single-thread pool;
    ``abandon(pool)`` stops a pool whose thread is stuck without waiting.
    """

    reactor = attr.ib()
    scard = attr.ib()
    readers = attr.ib(default=None)  # compiled regex, or None for all
    mode = attr.ib(default="shared", validator=attr.validators.in_(MODES))
    protocol = attr.ib(default="any", validator=attr.validators.in_(PROTOCOLS))
    chain = attr.ib(default=False)
    idle_release = attr.ib(default=IDLE_RELEASE)  # seconds; 0: keep handles
    pool_factory = attr.ib(default=make_thread_pool)
    abandon = attr.ib(default=abandon_pool)
    poll_interval = attr.ib(default=0.5)  # seconds per SCardGetStatusChange wait
    retry_interval = attr.ib(default=1.0)  # seconds between tries to reach pcscd
    removal_wait = attr.ib(default=1.0)  # seconds to tell a pulled card from a failed transfer
    stop_timeout = attr.ib(default=3.0)  # seconds stop() waits for threads to finish
    _registry = attr.ib(init=False, default=None)
    _readers = attr.ib(init=False, factory=dict)  # PC/SC name -> _Reader, kept for ever
    _listing = attr.ib(init=False, default=None)
    _monitor = attr.ib(init=False, default=None)
    _monitor_worker = attr.ib(init=False, default=None)
    _epoch = attr.ib(init=False, default=0)
    _service = attr.ib(init=False, default=None)  # True up, False down, None unknown
    _running = attr.ib(init=False, default=False)
    _later = attr.ib(init=False, default=None)
    _ready = attr.ib(init=False, default=None)

    log = Logger()

    @property
    def description(self):
        which = f"readers matching {self.readers.pattern!r}" if self.readers else "all readers"
        return (f"pcsc: {which}, {self.mode}, protocol {self.protocol}" + (", chain" if self.chain else "")
                + (f", idle release {self.idle_release:g}s" if self.idle_release else ""))

    # -- life cycle

    def start(self, registry):
        """Start the monitor; the Deferred fires after the first look at the readers."""
        self._registry = registry
        self._running = True
        wanted = self.readers.search if self.readers else (lambda name: True)
        self._monitor = _Monitor(self.scard, wanted, int(self.poll_interval * 1000))
        self._monitor_worker = _Worker(self.pool_factory("pcsc monitor"))
        self._monitor_worker.pool.start()
        self._ready = Deferred()
        self._scan()
        return self._ready

    def stop(self):
        """Release every context and stop every thread; waits at most
        ``stop_timeout`` seconds for threads stuck in a PC/SC call, which
        are then left to finish on their own."""
        if not self._running:
            return None
        self._running = False
        if self._later is not None and self._later.active():
            self._later.cancel()
        self._later = None
        for reader in self._readers.values():
            self._not_idle(reader)
        waits = []
        if self._monitor_worker is not None:
            waits.append(self._after_idle(self._monitor_worker, self._monitor.close))
        for reader in self._readers.values():
            waits.append(self._after_idle(reader.worker, reader.link.close))
        done = DeferredList(waits, consumeErrors=True)
        done.addTimeout(self.stop_timeout, self.reactor)
        done.addBoth(self._stop_pools)
        return done

    def _after_idle(self, worker, fn):
        """Run ``fn`` in ``worker`` once its current call (if any) ends."""
        if not worker.busy:
            return self._call(worker, fn)
        d = Deferred()
        worker.idle.append(d)
        d.addCallback(lambda _: self._call(worker, fn))
        return d

    def _stop_pools(self, _):
        workers = [r.worker for r in self._readers.values()]
        if self._monitor_worker is not None:
            workers.append(self._monitor_worker)
        for worker in workers:
            if worker.busy:
                self.log.warn("{pool}: thread still stuck in a PC/SC call after {s:.1f}s; "
                              "not waiting for it", pool=worker.pool.name,
                              s=self.reactor.seconds() - worker.since)
                self.abandon(worker.pool)
            else:
                worker.pool.stop()
        self._registry = None
        self._readers = {}
        self._listing = None
        self._monitor = self._monitor_worker = None

    # -- calls into threads

    def _call(self, worker, fn, *args, canceller=None):
        """``fn(*args)`` in ``worker``'s thread; a Deferred for its result.
        Cancelling the Deferred does not stop the thread: ``worker.busy``
        stays set until ``fn`` returns."""
        d = Deferred(canceller)
        if not worker.calls:
            worker.since = self.reactor.seconds()
        worker.calls += 1

        def in_thread(ok, result):
            self.reactor.callFromThread(self._returned, worker, d, ok, result)

        worker.pool.callInThreadWithCallback(in_thread, fn, *args)
        return d

    def _returned(self, worker, d, ok, result):
        worker.calls -= 1
        if d.called:  # the caller gave up (timeout): nobody waits for this
            self.log.info("{pool}: a call given up on returned after {s:.1f}s",
                          pool=worker.pool.name, s=self.reactor.seconds() - worker.since)
        elif ok:
            d.callback(result)
        else:
            d.errback(result)
        if not worker.calls:
            idle, worker.idle = worker.idle, []
            for waiter in idle:
                waiter.callback(None)

    # -- monitor

    def _scan(self):
        self._later = None
        if not self._running:
            return
        d = self._call(self._monitor_worker, self._monitor.scan)
        d.addCallbacks(self._scanned, self._scan_failed)

    def _scan_failed(self, failure):
        self.log.failure("PC/SC monitor failed", failure)
        self._next(self.retry_interval)

    def _scanned(self, result):
        if isinstance(result, _Down):
            if self._service is not False:
                self.log.warn("pcscd is not reachable ({reason}); retrying every {s}s",
                              reason=result.reason, s=self.retry_interval)
                self._service = False
                self._epoch += 1  # every reader context is dead now
                self._report([(r.name, False, None) for r in self._readers.values() if r.listed])
            self._fire_ready()
            self._next(self.retry_interval)
            return
        if self._service is False:
            self.log.info("pcscd is reachable again")
            self._epoch += 1
        self._service = True
        self._report(result.readers)
        self._fire_ready()
        self._next(result.delay)

    def _next(self, delay):
        if not self._running:
            return
        if delay:
            self._later = self.reactor.callLater(delay, self._scan)
        else:
            self._scan()

    def _fire_ready(self):
        ready, self._ready = self._ready, None
        if ready is not None:
            if not self._readers:
                self.log.info("no PC/SC reader {which} yet; waiting for one",
                              which=f"matches {self.readers.pattern!r}" if self.readers else "is connected")
            ready.callback(None)

    def _report(self, snapshot):
        """Apply ((name, present, atr), …) and tell the registry if anything changed."""
        snapshot = tuple(snapshot)
        if snapshot == self._listing:
            return
        self._listing = snapshot
        listed = set()
        for name, present, atr in snapshot:
            listed.add(name)
            reader = self._readers.get(name)
            if reader is None:
                link = _Link(self.scard, name, self.mode, self.protocol, self.chain, self.removal_wait)
                reader = _Reader(name, link, _Worker(self.pool_factory(f"pcsc {name}")))
                reader.worker.pool.start()
                self._readers[name] = reader
            if not reader.listed:
                reader.listed = True
                self.log.info("PC/SC reader {reader}: {state}", reader=name,
                              state="card present" if present else "empty")
            elif present != reader.present and self._service:
                self.log.info("card {what} {reader}", what="inserted in" if present else "removed from",
                              reader=name)
                if not present:  # let go of the handle now, not at the next command
                    self._after_idle(reader.worker, reader.link.forget)
            reader.present = present
            reader.atr = atr
        for reader in self._readers.values():
            if reader.listed and reader.name not in listed:
                reader.listed = False
                reader.present = False
                reader.atr = None
                self._after_idle(reader.worker, reader.link.close)
        if self._registry is not None:
            self._registry.update(self, [
                ReaderInfo(name, name, present=present, atr=atr)
                for name, present, atr in snapshot])

    # -- IBackend

    def _reader(self, key):
        reader = self._readers.get(key)
        if reader is None or not reader.listed or not self._running:
            raise CardError(errors.NOT_FOUND, f"no PC/SC reader {key!r}")
        if not reader.present:
            raise CardError(errors.NO_CARD, f"{key}: no card")
        if reader.worker.busy:
            raise CardError(errors.UPSTREAM, f"{key}: still waiting for the card to answer an "
                                             "earlier command that timed out")
        return reader

    def transmit(self, key, apdu):
        reader = self._reader(key)
        return self._command(reader, reader.link.transmit, apdu, self._epoch)

    def reset(self, key):
        reader = self._reader(key)
        return self._command(reader, reader.link.reset, self._epoch)

    def release(self, key):
        """The dispatcher is done with this card for one request: end its
        transaction in the reader's thread, after the request's commands."""
        reader = self._readers.get(key)
        if reader is None:
            return
        if reader.link.in_transaction:
            reader.worker.pool.callInThread(reader.link.end)
        if self.idle_release and self._running:
            self._not_idle(reader)
            reader.idle = self.reactor.callLater(self.idle_release, self._idle, reader)

    def _not_idle(self, reader):
        idle, reader.idle = reader.idle, None
        if idle is not None and idle.active():
            idle.cancel()

    def _idle(self, reader):
        """``idle_release`` seconds since the last request on ``reader``
        ended: let its handle go, unless a command runs or a card session
        holds the card (its end calls :meth:`release` again)."""
        reader.idle = None
        if not self._running or reader.worker.busy:
            return
        held = self._registry.get(reader.name) if self._registry is not None else None
        if held is not None and held.backend is self and held.holder is not None:
            return
        self._call(reader.worker, reader.link.let_go).addErrback(
            lambda f: self.log.failure("{reader}: letting the idle handle go failed", f,
                                       reader=reader.name))

    def _command(self, reader, fn, *args):
        self._not_idle(reader)
        d = self._call(reader.worker, fn, *args, canceller=lambda d: self._gave_up(reader))
        d.addErrback(self._failed, reader)
        return d

    def _gave_up(self, reader):
        self.log.warn("{reader}: the card did not answer in time; commands to it get C086 "
                      "until it does", reader=reader.name)

    def _failed(self, failure, reader):
        if failure.check(CardError):
            error = failure.value
            if error.code == errors.NO_CARD:
                self.log.debug("{reason}", reason=error.reason)
            else:
                self.log.warn("{reason}", reason=error.reason)
        return failure
