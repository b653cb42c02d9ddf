"""``pcsc:`` — the PC/SC readers of this machine (USB readers via pcscd).

``pcsc:?readers=REGEX&mode=shared&protocol=any&chain=0``

* ``readers``  — only readers whose PC/SC name matches this regular
  expression (searched, case-insensitive); default: all readers.
* ``mode``     — ``shared`` (default: other local programs may use the card
  too, and every APDU runs inside a PC/SC transaction so none of their APDUs
  can slip in between) or ``exclusive`` (the proxy holds the card alone).
* ``protocol`` — ``any`` (default), ``t0`` or ``t1``.
* ``chain``    — ``1``: follow ``61xx`` with GET RESPONSE and answer
  ``6Cxx`` by re-sending with that Le; ``0`` (default): the card's exact
  answer.

Threads (STYLE.md 7): every reader has its own single-thread pool and its
own PC/SC context, so a card that stops answering blocks only its reader;
one more single-thread pool runs the monitor, a loop of bounded
``SCardGetStatusChange`` waits that notices readers and cards coming and
going.  No pyscard call ever runs on the reactor thread.

Everything below ``_Link`` and ``_Monitor`` runs in those threads and only
talks to the reactor through return values and exceptions; everything in
``PcscBackend`` runs on the reactor thread.
"""

import re
import shutil
import threading
import time

import attr
from twisted.internet.defer import Deferred, DeferredList
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from .. import errors
from ..apdu import follow_up, run_sync
from ..interfaces import IBackend, ReaderInfo
from ..errors import CardError
from ..logs import Logger
from . import query

#: pcsc-lite's pseudo reader whose state changes when a reader is plugged in.
PNP_NOTIFICATION = "\\\\?PnP?\\Notification"

MODES = ("shared", "exclusive")
PROTOCOLS = ("any", "t0", "t1")

INSTALL_PYSCARD = "pip install 'cloudfoxy-proxy[pcsc]' (needs swig and libpcsclite-dev)"
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


def from_url(url, config, scard=None):
    params = query(url, {"readers", "mode", "protocol", "chain"})
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
                           protocol=protocol, chain=chain)

    return make


def make_thread_pool(name):
    """A single-thread pool whose thread never keeps the process alive (a
    thread stuck in a PC/SC call must not block exit)."""
    pool = ThreadPool(minthreads=1, maxthreads=1, name=name)
    pool.threadFactory = _daemon_thread
    return pool


def _daemon_thread(*args, **kwargs):
    thread = threading.Thread(*args, **kwargs)
    thread.daemon = True
    return thread


def abandon_pool(pool):
    """Stop a pool whose thread is stuck in a PC/SC call without waiting for
    it: its thread exits when the call returns (if ever)."""
    _daemon_thread(target=pool.stop, name=f"stop {pool.name}").start()


def _message(scard, hr):
    try:
        text = scard.SCardGetErrorMessage(hr).strip().rstrip(".")
    except Exception:
        text = "PC/SC error"
    return f"{text} (0x{hr & 0xFFFFFFFF:08X})"


# -- reader threads -------------------------------------------------------------

class _Retry(Exception):
    """The APDU was not sent (stale handle, reset card, dead context): try once more."""


class _Link:
    """One reader's PC/SC context and card handle.  Used only from that
    reader's own thread, one call at a time."""

    def __init__(self, scard, name, mode, protocol, chain=False, removal_wait=1.0):
        self.scard = scard
        self.name = name
        self.share = scard.SCARD_SHARE_EXCLUSIVE if mode == "exclusive" else scard.SCARD_SHARE_SHARED
        self.transactions = mode != "exclusive"
        self.protocols = {"any": scard.SCARD_PROTOCOL_T0 | scard.SCARD_PROTOCOL_T1,
                          "t0": scard.SCARD_PROTOCOL_T0,
                          "t1": scard.SCARD_PROTOCOL_T1}[protocol]
        self.chain = chain
        self.removal_wait = removal_wait
        self.ctx = None
        self.handle = None
        self.active = None  # the protocol in use
        self.epoch = None
        self.in_transaction = False  # one PC/SC transaction spans a whole request
        s = scard
        #: results meaning the context or handle is dead (pcscd restarted or gone)
        self.dead = {s.SCARD_E_NO_SERVICE, s.SCARD_E_SERVICE_STOPPED, s.SCARD_F_COMM_ERROR,
                     s.SCARD_E_INVALID_HANDLE}
        #: results meaning "reconnect first; nothing was sent to the card"
        self.stale = {s.SCARD_W_REMOVED_CARD, s.SCARD_W_RESET_CARD, s.SCARD_W_UNPOWERED_CARD}
        #: stale results that also mean the card lost its session state (reset
        #: by another program, or removed and put back): the command gets C080
        self.lost = {s.SCARD_W_REMOVED_CARD, s.SCARD_W_RESET_CARD}
        self.no_card = {s.SCARD_E_NO_SMARTCARD, s.SCARD_W_REMOVED_CARD}

    # -- plumbing

    def _error(self, what, hr):
        s = self.scard
        text = f"{self.name}: {what}: {_message(s, hr)}"
        if hr in self.no_card:
            return CardError(errors.NO_CARD, text)
        if hr == s.SCARD_E_UNKNOWN_READER:
            return CardError(errors.NOT_FOUND, text)
        if hr == s.SCARD_E_SHARING_VIOLATION:
            return CardError(errors.UPSTREAM, text + " (another program holds the card)")
        return CardError(errors.UPSTREAM, text)

    def close(self):
        """Disconnect and release the context, ignoring every error."""
        self._drop_handle()
        ctx, self.ctx = self.ctx, None
        if ctx is not None:
            try:
                self.scard.SCardReleaseContext(ctx)
            except Exception:
                pass

    def forget(self):
        """Disconnect from a card that left; keep the context."""
        self._drop_handle()

    def _drop_handle(self):
        s = self.scard
        handle, self.handle, self.active = self.handle, None, None
        self.in_transaction = False
        if handle is not None:
            try:
                s.SCardDisconnect(handle, s.SCARD_LEAVE_CARD)
            except Exception:
                pass

    def _ensure(self, epoch):
        """A context (of the current pcscd, ``epoch``) and a card handle."""
        s = self.scard
        if self.ctx is not None and self.epoch != epoch:
            self.close()
        if self.ctx is None:
            hr, ctx = s.SCardEstablishContext(s.SCARD_SCOPE_USER)
            if hr != s.SCARD_S_SUCCESS:
                raise CardError(errors.UPSTREAM, f"{self.name}: pcscd: {_message(s, hr)}")
            self.ctx, self.epoch = ctx, epoch
        if self.handle is None:
            hr, handle, active = s.SCardConnect(self.ctx, self.name, self.share, self.protocols)
            if hr in self.dead:
                self.close()
                raise _Retry()
            if hr != s.SCARD_S_SUCCESS:
                raise self._error("connect", hr)
            self.handle, self.active = handle, active

    def _reconnect(self, init):
        s = self.scard
        hr, active = s.SCardReconnect(self.handle, self.share, self.protocols, init)
        if hr == s.SCARD_S_SUCCESS:
            self.active = active
        return hr

    def _twice(self, fn, *args):
        try:
            return fn(*args)
        except _Retry:
            pass
        try:
            return fn(*args)
        except _Retry:
            raise CardError(errors.UPSTREAM, f"{self.name}: the card or pcscd kept failing") from None

    # -- commands

    def transmit(self, apdu, epoch):
        """The response APDU (bytes) to ``apdu``; CardError on failure."""
        return self._twice(self._transmit, apdu, epoch)

    def reset(self, epoch):
        """Cold-reset the card (warm if the reader cannot); the new ATR."""
        return self._twice(self._reset, epoch)

    def _transmit(self, apdu, epoch):
        s = self.scard
        self._ensure(epoch)
        if self.transactions and not self.in_transaction:
            # The request's first APDU opens a transaction that its last
            # command's end closes (end(), from the backend's release()), so
            # no other local program can slip APDUs into one request.
            hr = s.SCardBeginTransaction(self.handle)
            if hr in self.stale:
                self._recover(hr)
                if hr in self.lost:
                    raise self._session_lost(hr)
                hr = s.SCardBeginTransaction(self.handle)
            if hr in self.dead:
                self.close()
                raise _Retry()
            if hr != s.SCARD_S_SUCCESS:
                raise self._error("begin transaction", hr)
            self.in_transaction = True
        try:
            if self.chain:
                return run_sync(follow_up(apdu), self._send)
            return self._send(apdu)
        except BaseException:
            self.end()
            raise

    def end(self):
        """End the request's transaction, if one is open (errors ignored)."""
        if self.in_transaction:
            self.in_transaction = False
            if self.handle is not None:
                try:
                    self.scard.SCardEndTransaction(self.handle, self.scard.SCARD_LEAVE_CARD)
                except Exception:
                    pass

    def _session_lost(self, hr):
        """The C080 a command gets when pcscd says the card was reset or
        removed since our last command (the APDU was not sent; the handle
        is reconnected, so later commands run on the card as it is now)."""
        return CardError(errors.NO_CARD, f"{self.name}: card reset or removed by another program "
                                         f"since the last command; its session state is gone "
                                         f"({_message(self.scard, hr)})")

    def _recover(self, hr):
        """After a result saying the handle is stale (card removed and maybe
        back, or reset by another program): reconnect, else CardError."""
        s = self.scard
        again = self._reconnect(s.SCARD_LEAVE_CARD)
        if again in self.dead:
            self.close()
            raise _Retry()
        if again != s.SCARD_S_SUCCESS:
            self._drop_handle()
            raise self._error("reconnect", again)

    def _send(self, apdu):
        s = self.scard
        hr, response = s.SCardTransmit(self.handle, self.active, list(apdu))
        if hr == s.SCARD_S_SUCCESS:
            if len(response) < 2 and self._gone():
                # vpcd answers with nothing when its card goes away mid-command.
                self._drop_handle()
                raise CardError(errors.NO_CARD, f"{self.name}: card removed during the command")
            return bytes(response)  # the dispatcher refuses one without SW1 SW2
        if hr in self.stale:
            self._recover(hr)
            if hr in self.lost:
                raise self._session_lost(hr)
            raise _Retry()  # the APDU was not sent: pcsc-lite checks first
        if hr in self.dead:
            self.close()
            raise _Retry()
        # The transfer failed (0x80100016 when a card is pulled before pcscd
        # has noticed): C080 if the card turns out to be gone.
        if self._gone():
            self._drop_handle()
            raise CardError(errors.NO_CARD, f"{self.name}: card removed during the command")
        raise self._error("transmit", hr)

    def _gone(self):
        """Whether the card leaves within ``removal_wait`` (pcscd notices a
        removal on its next poll, up to ~0.4 s later)."""
        s = self.scard
        hr, states = s.SCardGetStatusChange(self.ctx, 0, [(self.name, s.SCARD_STATE_UNAWARE)])
        if hr != s.SCARD_S_SUCCESS:
            return hr in self.no_card or hr == s.SCARD_E_UNKNOWN_READER
        first = states[0][1]
        deadline = time.monotonic() + self.removal_wait
        event = first
        while True:
            if not event & s.SCARD_STATE_PRESENT or event >> 16 != first >> 16:
                return True  # absent, or pulled and put back (pcsc-lite counts events)
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            hr, states = s.SCardGetStatusChange(
                self.ctx, max(1, int(left * 1000)), [(self.name, event & ~s.SCARD_STATE_CHANGED)])
            if hr == s.SCARD_E_TIMEOUT:
                return False
            if hr != s.SCARD_S_SUCCESS:
                return hr == s.SCARD_E_UNKNOWN_READER
            event = states[0][1]

    def _reset(self, epoch):
        s = self.scard
        self.end()
        self._ensure(epoch)
        hr = self._reconnect(s.SCARD_UNPOWER_CARD)
        if hr != s.SCARD_S_SUCCESS and hr not in self.dead and hr not in self.no_card:
            hr = self._reconnect(s.SCARD_RESET_CARD)  # the reader cannot power off: warm reset
        if hr in self.dead:
            self.close()
            raise _Retry()
        if hr != s.SCARD_S_SUCCESS:
            self._drop_handle()
            raise self._error("reset", hr)
        hr, _name, _state, _protocol, atr = s.SCardStatus(self.handle)
        if hr in self.dead:
            self.close()
            raise _Retry()
        if hr != s.SCARD_S_SUCCESS:
            self._drop_handle()
            raise self._error("status", hr)
        return bytes(atr)


# -- monitor thread -------------------------------------------------------------

@attr.s(frozen=True)
class _Down:
    """The monitor could not reach pcscd."""

    reason = attr.ib()


@attr.s(frozen=True)
class _Scan:
    """One look at the readers: ``readers`` is ((name, present, atr), …);
    ``delay`` seconds to wait before the next look."""

    readers = attr.ib()
    delay = attr.ib(default=0.0)


class _Monitor:
    """Reader list and card presence through bounded SCardGetStatusChange
    waits.  Used only from the monitor's own thread, one call at a time."""

    def __init__(self, scard, wanted, poll_ms):
        self.scard = scard
        self.wanted = wanted
        self.poll_ms = poll_ms
        self.ctx = None
        self.states = {}
        self.atrs = {}
        self.pnp = True
        self.pnp_state = 0
        self.unknown = None  # reader list of the last SCARD_E_UNKNOWN_READER
        self.fresh = True  # no wait on the first look with a new context
        s = scard
        self.dead = {s.SCARD_E_NO_SERVICE, s.SCARD_E_SERVICE_STOPPED, s.SCARD_F_COMM_ERROR,
                     s.SCARD_E_INVALID_HANDLE}

    def close(self):
        ctx, self.ctx = self.ctx, None
        if ctx is not None:
            try:
                self.scard.SCardReleaseContext(ctx)
            except Exception:
                pass

    def _down(self, what, hr):
        self.close()
        return _Down(f"{what}: {_message(self.scard, hr)}")

    def scan(self):
        """Wait (at most ``poll_ms``) for a change; a _Scan or a _Down."""
        s = self.scard
        if self.ctx is None:
            hr, ctx = s.SCardEstablishContext(s.SCARD_SCOPE_USER)
            if hr != s.SCARD_S_SUCCESS:
                return _Down(f"SCardEstablishContext: {_message(s, hr)}")
            self.ctx, self.states, self.atrs, self.pnp_state = ctx, {}, {}, 0
            self.fresh = True
        hr, names = s.SCardListReaders(self.ctx, [])
        if hr == s.SCARD_E_NO_READERS_AVAILABLE:
            names = []
        elif hr in self.dead:
            return self._down("SCardListReaders", hr)
        elif hr != s.SCARD_S_SUCCESS:
            return _Scan(self._snapshot(list(self.states)), delay=self.poll_ms / 1000.0)
        names = [n for n in names if self.wanted(n)]
        for gone in set(self.states) - set(names):
            del self.states[gone]
            self.atrs.pop(gone, None)
        asked = [(n, self.states.get(n, s.SCARD_STATE_UNAWARE)) for n in names]
        if self.pnp:
            asked.append((PNP_NOTIFICATION, self.pnp_state))
        if not asked:
            return _Scan((), delay=self.poll_ms / 1000.0)
        fresh = self.fresh or any(n not in self.states for n in names)
        self.fresh = False
        hr, result = s.SCardGetStatusChange(self.ctx, 0 if fresh else self.poll_ms, asked)
        delay = 0.0
        if hr == s.SCARD_S_SUCCESS:
            self.unknown = None
            for name, event, atr in result:
                if name == PNP_NOTIFICATION:
                    self.pnp_state = event & ~s.SCARD_STATE_CHANGED
                else:
                    self.states[name] = event & ~s.SCARD_STATE_CHANGED
                    self.atrs[name] = bytes(atr)
        elif hr in self.dead:
            return self._down("SCardGetStatusChange", hr)
        elif hr == s.SCARD_E_UNKNOWN_READER:
            # A reader left between listing and waiting: list again soon.  If
            # the same list fails twice, the PnP pseudo reader is unsupported.
            if self.unknown == names and self.pnp:
                self.pnp = False
            self.unknown = names
            delay = 0.1
        elif hr != s.SCARD_E_TIMEOUT:
            delay = self.poll_ms / 1000.0
        return _Scan(self._snapshot([n for n in names if n in self.states]), delay)

    def _snapshot(self, names):
        s = self.scard
        out = []
        for name in names:
            event = self.states[name]
            present = bool(event & s.SCARD_STATE_PRESENT) and not event & (
                s.SCARD_STATE_UNKNOWN | s.SCARD_STATE_UNAVAILABLE | s.SCARD_STATE_IGNORE)
            out.append((name, present, (self.atrs.get(name) or None) if present else None))
        return tuple(out)


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


class _Reader:
    __slots__ = ("name", "link", "worker", "present", "atr", "listed")

    def __init__(self, name, link, worker):
        self.name = name
        self.link = link
        self.worker = worker
        self.present = False
        self.atr = None
        self.listed = False


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
        return f"pcsc: {which}, {self.mode}, protocol {self.protocol}" + (", chain" if self.chain else "")

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
        if reader is not None and reader.link.in_transaction:
            reader.worker.pool.callInThread(reader.link.end)

    def _command(self, reader, fn, *args):
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
