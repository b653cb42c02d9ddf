"""The thread side of the ``pcsc:`` backend (see ``pcsc.py``): everything
here runs on a reader's own single-thread pool (``_Link``) or on the
monitor's (``_Monitor``), calls pyscard, and talks to the reactor only
through return values and exceptions.  Nothing here touches the reactor.
"""

import threading
import time

import attr
from twisted.python.threadpool import ThreadPool

from .. import errors
from ..apdu import follow_up, run_sync
from ..errors import CardError

#: pcsc-lite's pseudo reader whose state changes when a reader is plugged in.
PNP_NOTIFICATION = "\\\\?PnP?\\Notification"


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


def dead_results(scard):
    """Results meaning the context or handle is dead (pcscd restarted or gone)."""
    s = scard
    return {s.SCARD_E_NO_SERVICE, s.SCARD_E_SERVICE_STOPPED, s.SCARD_F_COMM_ERROR,
            s.SCARD_E_INVALID_HANDLE}


def release_context(scard, ctx):
    """``SCardReleaseContext(ctx)`` unless ``ctx`` is None, ignoring every error."""
    if ctx is not None:
        try:
            scard.SCardReleaseContext(ctx)
        except Exception:
            pass


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
        #: (event counter, ATR) of the card when the handle was let go while
        #: idle (let_go), None otherwise: compared when connecting again
        self.released = None
        s = scard
        self.dead = dead_results(s)
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
        self.released = None
        release_context(self.scard, ctx)

    def forget(self):
        """Disconnect from a card that left; keep the context."""
        self.released = None  # the registry tells the clients (a presence change)
        self._drop_handle()

    def let_go(self):
        """The reader is idle: end any transaction and disconnect
        (SCARD_LEAVE_CARD), remembering pcscd's event counter and the ATR,
        so that programs wanting the card exclusively get it meanwhile."""
        s = self.scard
        if self.handle is None:
            return
        self.end()
        hr, _name, state, _protocol, atr = s.SCardStatus(self.handle)
        self.released = (state >> 16, bytes(atr)) if hr == s.SCARD_S_SUCCESS else None
        self._drop_handle()

    def _changed_while_released(self):
        """Why the card cannot be the one let go by :meth:`let_go` in the
        state it was (a string), or None: pcscd's event counter moved (card
        pulled, swapped), the ATR differs, or the card's protocol is unset
        (pcscd powered the idle card down: pcsc-lite does a few seconds
        after the last program disconnects).  Looked at through an
        SCARD_SHARE_DIRECT handle, which neither powers the card up nor
        negotiates a protocol.  A reset by another program that also
        connected meanwhile is not seen."""
        s = self.scard
        counter, atr = self.released
        hr, handle, _active = s.SCardConnect(self.ctx, self.name, s.SCARD_SHARE_DIRECT, 0)
        if hr != s.SCARD_S_SUCCESS:
            return None  # the real connect says what is wrong
        try:
            hr, _name, state, protocol, now = s.SCardStatus(handle)
        finally:
            s.SCardDisconnect(handle, s.SCARD_LEAVE_CARD)
        if hr != s.SCARD_S_SUCCESS:
            return None
        if state >> 16 != counter:
            return "the card was removed or swapped"
        if bytes(now) != atr:
            return "the card's ATR changed"
        if not protocol:
            return "pcscd powered the idle card down"
        return None

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
            changed = self._changed_while_released() if self.released is not None else None
            hr, handle, active = s.SCardConnect(self.ctx, self.name, self.share, self.protocols)
            if hr in self.dead:
                self.close()
                raise _Retry()
            if hr != s.SCARD_S_SUCCESS:
                raise self._error("connect", hr)  # (what was let go is still compared next time)
            self.handle, self.active = handle, active
            self.released = None
            if changed:
                # the APDU is not sent: C080, as for SCARD_W_RESET_CARD
                raise CardError(errors.NO_CARD, f"{self.name}: connected again after an idle "
                                                f"release: {changed}; its session state is gone")

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
        self._check(self._reconnect(s.SCARD_LEAVE_CARD), "reconnect")

    def _check(self, hr, what):
        """The result ``hr`` of ``what`` on the handle: _Retry when the
        context is dead, CardError (handle dropped) for any other failure."""
        if hr in self.dead:
            self.close()
            raise _Retry()
        if hr != self.scard.SCARD_S_SUCCESS:
            self._drop_handle()
            raise self._error(what, hr)

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
        self._check(hr, "reset")
        hr, _name, _state, _protocol, atr = s.SCardStatus(self.handle)
        self._check(hr, "status")
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
        self.dead = dead_results(scard)

    def close(self):
        ctx, self.ctx = self.ctx, None
        release_context(self.scard, ctx)

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
