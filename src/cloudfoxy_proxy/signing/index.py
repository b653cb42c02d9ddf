"""The certificate index: which card holds which signing certificate, and
the signing commands ENUM, ALIASES, CHAIN and SIGN (docs/signing.md "The commands").

The proxy never acts on a card behind a client's back.  A card is probed
when it arrives (a registry listener) and nobody holds it (no request on
its queue, no vpcd bridge on it: ``Reader.holder``); a card that arrived
while held is probed lazily, by the first ENUM, ALIASES or CHAIN that finds
it free, or by SIGN.  A client's RESET only marks the card (SIGN, which
holds the card, looks at it again first); nothing is sent to a card after
a reset, so it stays as the reset left it.  A probe tries the card profiles
(``cloudfoxy_proxy.signing.profiles``) in order inside one turn on the card's
queue, and the certificates found are cached.  ENUM, ALIASES and CHAIN
answer from that cache with no APDUs (unless such a lazy probe is due).  The certificate aliases (subject common name, and the full RFC 4514
subject) become extra reader aliases in the registry, so a reader line
naming an alias selects the card that holds it (two cards with one alias:
``C082``).

SIGN runs on the card's queue like RESET and APDU (the dispatcher holds
the card for the whole request): SELECT, VERIFY the PIN and sign, one
uninterrupted sequence bounded by the command timeout.  A PIN the card has
just rejected is never presented to it again in a row: the index keeps a
keyed hash of the last wrong PIN per card (forgotten on success, RESET and
card change) and answers ``C085`` without touching the card.

The cards of a ``tcp://`` / ``tls://`` upstream with an owner id are its
owner's to probe (signing/upstream.py): they are never probed through the
hop; ENUM, ALIASES and CHAIN first ask each such owner's index (one
request, no card command) and SIGN on such a reader is the owner's SIGN.
"""

import base64
import collections
import hashlib
import hmac
import os

from twisted.application.service import Service
from twisted.internet.defer import (
    CancelledError, Deferred, DeferredList, TimeoutError, fail, inlineCallbacks, maybeDeferred, succeed,
)

from .. import errors
from ..errors import CardError
from ..logs import Logger
from .certs import build_chain, der_bytes
from .profiles import HASH_NAMES, HASHES, PROFILES, PinBlocked, WrongPin
from ..registry import QueueFull, b64name
from .upstream import Mirror, remote, reader_text, safe_line


#: Arrival probes run at once; the other arrived cards wait in arrival
#: order.  A backend such as cloudfoxy+http opens one upstream connection
#: per exchange in flight and keeps it: probing 120 cards at once left 120
#: idle connections (about 4 MB) and held up the first clients' commands.
ARRIVAL_PROBES = 8


def parse_digest(data, algorithm=""):
    """SIGN's DATA (hex hash value) as bytes; CardError C084 when it is not
    a SHA-1/256/384/512 value or does not match the named algorithm."""
    try:
        digest = bytes.fromhex("".join(data.split()))
    except ValueError:
        raise CardError(errors.MALFORMED, "SIGN data is not hex") from None
    if len(digest) not in HASHES:
        raise CardError(errors.MALFORMED, f"a {len(digest)}-byte digest is not SHA-1/256/384/512")
    algorithm = algorithm.strip().upper()
    if algorithm and HASH_NAMES.get(algorithm) != len(digest):
        raise CardError(errors.MALFORMED, "SIGN algorithm does not match the digest length")
    return digest


class _Held(Exception):
    """A client holds the card: the probe is not run."""


class _CardState:
    """What the index knows about the card in one reader."""

    __slots__ = ("reader", "present", "atr", "generation", "profile", "certs", "probed",
                 "queued", "running", "again", "wrong_pin", "dirty", "failed", "issuers")

    def __init__(self, reader):
        self.reader = reader
        self.present = False
        self.atr = None
        self.generation = 0
        self.profile = None
        self.certs = ()
        self.probed = False
        self.queued = False  # a probe waits for the card
        self.running = False  # a probe runs now
        self.again = False  # probe once more when the running one ends
        self.wrong_pin = None  # keyed hash of the PIN the card last rejected
        self.dirty = False  # reset by a client since the last probe
        self.failed = False  # the last probe failed: no lazy probe until the card comes again
        self.issuers = ()  # x509 issuer certificates its owner's CHAIN gave (an owner's card)

    def forget(self):
        self.generation += 1
        self.failed = False
        self.profile = None
        self.certs = ()
        self.issuers = ()
        self.probed = False
        self.wrong_pin = None


def card_transmit(reader, trace=None):
    """``transmit(apdu) -> Deferred[bytes]`` straight to the reader's backend.
    Only for use while holding the card's queue.  ``trace``: a
    trace.Tracer that records each exchange (``--trace``), or None."""
    backend, key = reader.backend, reader.key

    def transmit(apdu):
        try:
            result = backend.transmit(key, apdu)
        except Exception:
            result = fail()
        d = result if isinstance(result, Deferred) else succeed(result)
        if trace is not None:
            trace.follow(d, reader, "signing", apdu)
        return d

    return transmit


class _Turn:
    """One turn on a card's queue for ``work(transmit)``: waits its turn,
    runs, releases the card; ``result`` fires with work's outcome."""

    __slots__ = ("reader", "work", "clock", "timeout", "result", "abandoned", "trace")

    def __init__(self, reader, work, clock, timeout, trace=None):
        self.trace = trace
        self.reader = reader
        self.work = work
        self.clock = clock
        self.timeout = timeout
        self.result = Deferred()
        self.abandoned = False

    def start(self):
        try:
            got = self.reader.queue.acquire(self)
        except QueueFull:
            self.result.errback(CardError(errors.UPSTREAM, "card queue full"))
            return self.result
        if got:
            self.granted()
        return self.result

    def granted(self):
        d = maybeDeferred(self.work, card_transmit(self.reader, self.trace))
        d.addTimeout(self.timeout, self.clock)
        d.addBoth(self._finished)

    def _finished(self, outcome):
        self.reader.done()  # pcsc: ends the probe's transaction, as after a request
        self.result.callback(outcome)  # a Failure outcome errbacks


class CertIndex(Service):
    """Probes cards, caches their certificates, answers the signing commands.

    ``registry``: the ReaderRegistry; ``clock``: bounds each probe with
    ``timeout`` seconds; ``profiles``: profile classes to try; ``ca_certs``:
    extra issuer certificates (x509 objects) for CHAIN.

    A twisted ``Service`` (tap.py adds it to the application):
    ``startService`` starts watching the registry (``start``, idempotent:
    tap.py calls it while building the application so that the index
    listens before any backend adds a reader), ``stopService`` cancels the
    pending arrival probes (``stop``).
    """

    log = Logger()

    def __init__(self, registry, clock, timeout=15.0, profiles=PROFILES, ca_certs=(), secret=None):
        self.registry = registry
        self.clock = clock
        self.timeout = timeout
        self.profiles = [p() for p in profiles]
        self.ca_certs = list(ca_certs)
        self._secret = secret or os.urandom(32)
        self._cards = {}  # Reader -> _CardState
        #: the text before the first ":" of every FoxyProxy name seen (reader_line's quick test)
        self._foxyproxy_heads = set()
        self._arrivals = collections.deque()  # readers whose arrival probe waits
        self._arrival_call = None  # the DelayedCall that starts waiting arrival probes
        self._probing = 0  # arrival probes running
        self.started = False
        #: a trace.Tracer for the index's own APDUs (``--trace``), or None
        self.trace = None
        self._mirrors = {}  # backend -> upstream.Mirror (an owner's certificates)
        self._mirror_call = None  # DelayedCall: ask the owners whose readers arrived
        self._mirror_due = set()
        self._owners_failing = set()  # backends whose owner could not be asked (logged once)

    def start(self):
        """Watch the registry (probing the cards it already has)."""
        if not self.started:
            self.started = True
            self.registry.watch(self._changed, self._card_reset)

    def startService(self):
        Service.startService(self)
        self.start()

    def stopService(self):
        Service.stopService(self)
        self.stop()

    # Tracking cards ------------------------------------------------------------------
    def _state(self, reader):
        state = self._cards.get(reader)
        if state is None:
            state = self._cards[reader] = _CardState(reader)
        return state

    def _changed(self, registry):
        listed = set()
        for reader in registry.readers:
            listed.add(reader)
            state = self._state(reader)
            atr = reader.info.atr if reader.info is not None else None
            if remote(reader):  # its owner probes it
                if reader.present and not state.present:
                    state.present = True
                    self._mirror_due.add(reader.backend)
                    if self._mirror_call is None:
                        self._mirror_call = self.clock.callLater(0, self._ask_owners)
                elif not reader.present and state.present:
                    self._departed(state)
                continue
            if reader.present and (not state.present or atr != state.atr):
                self._arrived(state, atr)
            elif not reader.present and state.present:
                self._departed(state)
        for reader, state in list(self._cards.items()):
            if reader not in listed and state.present:
                self._departed(state)

    def _arrived(self, state, atr):
        state.present = True
        state.atr = atr
        state.forget()
        self.registry.set_extra_aliases(state.reader, ())
        # Later, not inside the registry's update (the backend may still be
        # in the middle of reporting its readers).
        self._arrivals.append(state.reader)
        if self._arrival_call is None:
            self._arrival_call = self.clock.callLater(0, self._start_arrivals)

    def _departed(self, state):
        state.present = False
        state.atr = None
        state.forget()
        self.registry.set_extra_aliases(state.reader, ())

    def _card_reset(self, reader, _session):
        """A client is about to reset the card in ``reader`` (its request
        holds the card): forget the last wrong PIN, and have SIGN look at
        the card again first.  Nothing is sent to the card.  Cheap: RESET
        is on the hot path."""
        state = self._cards.get(reader)
        if state is not None:
            state.wrong_pin = None
            state.dirty = True

    def stop(self):
        """Cancel pending arrival probes (for an orderly shutdown)."""
        self._arrivals.clear()
        call, self._mirror_call = self._mirror_call, None
        if call is not None and call.active():
            call.cancel()
        call, self._arrival_call = self._arrival_call, None
        if call is not None and call.active():
            call.cancel()

    @staticmethod
    def free(reader):
        """Nobody holds the card in ``reader``: no request on its queue, no
        vpcd bridge on it."""
        return reader.holder is None and not reader.queue.busy and not reader.queue.waiters

    def _start_arrivals(self):
        """Start waiting arrival probes, up to :data:`ARRIVAL_PROBES` at once
        (a loop, not a recursion: a probe may end at once)."""
        self._arrival_call = None
        while self._arrivals and self._probing < ARRIVAL_PROBES:
            reader = self._arrivals.popleft()
            self._probing += 1
            self._probe_if_free(reader).addBoth(self._arrival_done)

    def _arrival_done(self, _):
        self._probing -= 1
        if self._arrivals and self._arrival_call is None:
            self._arrival_call = self.clock.callLater(0, self._start_arrivals)

    def _probe_if_free(self, reader):
        """The arrival probe, unless a client holds the card (then ENUM,
        ALIASES, CHAIN or SIGN probe it later) or a lazy one did it already:
        a Deferred that fires when it is over."""
        state = self._cards.get(reader)
        if reader.holder is None and state is not None and not state.probed:
            return self.probe(reader)
        return succeed(None)

    def _due(self):
        """The present, never-probed cards that nobody holds: the lazy probes
        ENUM, ALIASES and CHAIN wait for."""
        return [s.reader for s in self._present_states()
                if not (s.probed or s.failed or s.queued or s.running or remote(s.reader))
                and self.free(s.reader)]

    # Owners' certificates (signing/upstream.py) ------------------------------------
    def _ask_owners(self):
        self._mirror_call = None
        due, self._mirror_due = self._mirror_due, set()
        for backend in due:
            self.ask_owner(backend)

    def ask_owner(self, backend):
        """Learn the certificates of ``backend``'s owner (its ENUM, ALIASES
        and CHAIN): a Deferred that fires (with None) when the index knows
        them, or knows that the owner could not be asked (logged)."""
        mirror = self._mirrors.get(backend)
        if mirror is None:
            mirror = self._mirrors[backend] = Mirror(backend)
        d = mirror.refresh()
        d.addCallbacks(self._owner_said, self._owner_failed, (backend,), None, (backend,))
        return d

    def _owner_said(self, found, backend):
        self._owners_failing.discard(backend)
        for reader in self.registry.readers:
            if reader.backend is not backend:
                continue
            state = self._state(reader)
            certs, issuers = found.get(reader.key, ((), ()))
            if tuple(certs) != state.certs or not state.probed:
                state.issuers = tuple(issuers)
                self._store(state, None, certs)

    def _owner_failed(self, failure, backend):
        if backend in self._owners_failing:
            return  # said once until it answers again
        self._owners_failing.add(backend)
        self.log.info("asking the certificates of {upstream} failed: {why} (ENUM, ALIASES and "
                      "CHAIN answer from what it said last)",
                      upstream=getattr(backend, "where", backend), why=failure.getErrorMessage())

    def _owners(self):
        """The backends of the present readers whose owner probes them."""
        return list(dict.fromkeys(s.reader.backend for s in self._present_states() if remote(s.reader)))

    # Probing -----------------------------------------------------------------------
    def probe(self, reader):
        """Probe the card in ``reader`` in a turn of its own; a Deferred
        that fires (with None) when the index is up to date."""
        if remote(reader):
            return succeed(None)  # its owner probes it
        state = self._state(reader)
        if state.queued:
            return succeed(None)  # the queued probe runs after whatever caused this one
        if state.running:
            state.again = True
            return succeed(None)
        if not reader.present or reader.holder is not None:
            return succeed(None)
        state.queued = True
        generation = state.generation
        turn = _Turn(reader, lambda transmit: self._started(state, transmit), self.clock, self.timeout,
                     self.trace)
        d = turn.start()
        d.addBoth(self._probed, state, generation)
        return d

    def _started(self, state, transmit):
        state.queued = False
        if state.reader.holder is not None:
            raise _Held()  # a client took the card while the probe waited for it
        state.running = True
        return self.scan(transmit, state.profile)

    @inlineCallbacks
    def scan(self, transmit, first=None):
        """(profile, certificates) of the card behind ``transmit``; the
        profile ``first`` (the card's last time) is tried first, so a probe
        of a known card sends as few APDUs as it can."""
        profiles = self.profiles
        if first is not None and first in profiles:
            profiles = [first] + [p for p in profiles if p is not first]
        for profile in profiles:
            if (yield profile.detect(transmit)):
                certs = yield profile.certificates(transmit)
                return (profile, list(certs))
        return (None, [])

    def _probed(self, outcome, state, generation):
        state.queued = state.running = False
        reader = state.reader
        if isinstance(outcome, tuple):
            if state.generation == generation and state.present:
                self._store(state, *outcome)
            return self._again(state)
        if outcome.check(_Held):
            return self._again(state)
        state.failed = state.generation == generation
        if outcome.check(CardError) and outcome.value.code == errors.NO_CARD:
            pass
        elif outcome.check(CardError):
            self.log.info("probing {reader} failed: {code}", reader=reader.name, code=outcome.value.code)
        elif outcome.check(TimeoutError, CancelledError):
            self.log.warn("probing {reader} timed out", reader=reader.name)
        else:
            self.log.failure("probing {reader} failed", outcome, reader=reader.name)
        return self._again(state)

    def _again(self, state):
        if state.again:
            state.again = False
            self.probe(state.reader)
        return None

    def _store(self, state, profile, certs):
        state.profile = profile
        state.certs = tuple(certs)
        state.probed = True
        names = []
        for cert in certs:
            for name in (cert.alias, cert.subject):  # listed as the reader's aliases
                if name not in names:
                    names.append(name)
            if cert.foxyproxy is not None:
                self._foxyproxy_heads.add(cert.foxyproxy.split(":", 1)[0])
        self.registry.set_extra_aliases(state.reader, names)
        if profile is not None:
            usable = [c.alias for c in certs if c.usable]
            self.log.info("{reader}: {profile} card with {n} signing certificate(s): {aliases}",
                          reader=state.reader.name, profile=profile.name, n=len(usable),
                          aliases=", ".join(usable))

    # Lookups (no APDUs) ------------------------------------------------------------
    def reader_line(self, request):
        """Undo the line protocol's split at ``:`` of a FoxyProxy 2.10 alias
        (``>commonName: X, organizationName: Y:PIN|`` parses as reader
        ``commonName``): when the reader line is a known certificate's
        FoxyProxy name, optionally followed by ``:`` and a password/PIN,
        ``request.reader`` becomes the certificate's RFC 4514 subject (an
        alias of its reader) and ``request.password`` the rest (None when
        there is none).  Other requests are left alone."""
        if request.password is None or request.reader not in self._foxyproxy_heads:
            return
        line = f"{request.reader}:{request.password}"
        for _state, cert in self.entries():
            name = cert.foxyproxy
            if name is not None and line.startswith(name) and (
                    len(line) == len(name) or line[len(name)] == ":"):
                request.reader, request.password = cert.subject, (line[len(name) + 1:] or None)
                return

    def _present_states(self):
        for reader in self.registry.readers:
            state = self._cards.get(reader)
            if state is not None and state.present and reader.present:
                yield state

    def entries(self, sees=None):
        """(state, certificate) of every usable certificate on a present card
        (in a reader ``sees`` accepts, when given)."""
        for state in self._present_states():
            if sees is not None and not sees(state.reader):
                continue
            for cert in state.certs:
                if cert.usable:
                    yield state, cert

    def lookup(self, text, sees=None):
        """The (state, certificate) a reader line names; raises CardError.

        Certificate alias or full subject first (two certificates: C082);
        otherwise the reader (docs/protocol.md "Reader names and selection") and its card's first usable
        certificate.  ``sees`` (None: every reader) limits both to the
        readers it accepts: another reader's certificates and name are not
        there at all (C083, as for a reader that does not exist)."""
        if text is None:
            raise CardError(errors.NOT_FOUND, "no reader line")
        hits = [(s, c) for s, c in self.entries(sees) if text in c.names]
        if len(hits) > 1:
            raise CardError(errors.AMBIGUOUS, "alias on more than one card")
        if hits:
            return hits[0]
        reader = self.registry.resolve(text, sees=sees)
        return reader_entry(self._cards.get(reader), reader, text)

    # Commands --------------------------------------------------------------------------
    def enum(self, data="", sees=None):
        """ENUM: readers whose card holds a usable signing certificate
        (those ``sees(reader)`` accepts, when given)."""
        data = data.strip()
        limit = None
        if data:
            if not data.isdigit():
                return errors.MALFORMED
            limit = int(data)
        names = []
        for state, _cert in self.entries(sees):
            if state.reader.name not in names:
                names.append(state.reader.name)
        if limit is not None:
            names = names[:limit]
        return "|".join(b64name(n) for n in names)

    def aliases(self, sees=None):
        """ALIASES: base64 of every usable certificate's alias."""
        return "|".join(b64name(cert.alias) for _state, cert in self.entries(sees))

    def chain(self, text, sees=None):
        """CHAIN: base64 DER certificates, leaf first, joined by ``:``."""
        try:
            state, cert = self.lookup(text, sees)
        except CardError as e:
            return e.code
        pool = [c.cert for c in state.certs if c.cert is not None and c is not cert] + list(
            state.issuers) + self.ca_certs
        return ":".join(base64.b64encode(der_bytes(c)).decode("ascii") for c in build_chain(cert.cert, pool))

    def command(self, name, command, request, sees=None):
        """ENUM, ALIASES or CHAIN for the dispatcher: a result string, or a
        Deferred for it when cards nobody holds have not been probed yet
        (they are probed first, each in its own turn on its queue)."""
        due = self._due()
        owners = self._owners()
        if due or owners:
            d = DeferredList([self.probe(reader) for reader in due] + [self.ask_owner(b) for b in owners],
                             consumeErrors=True)
            return d.addCallback(lambda _: self._command(name, command, request, sees))
        return self._command(name, command, request, sees)

    def _command(self, name, command, request, sees=None):
        """``sees(reader)``, when given, hides the other readers (access.Identity.sees)."""
        if name == "ENUM":
            return self.enum(command.data, sees)
        if name == "ALIASES":
            return self.aliases(sees)
        if name == "CHAIN":
            return self.chain(request.reader, sees)
        return errors.FAILED

    def sign(self, reader, text, pin, data, algorithm=""):
        """SIGN on ``reader``, whose card the caller holds: the signature
        (bytes) or a Deferred for it.  ``text`` is the reader line (the
        alias), ``pin`` the PIN.  Raises or fails with CardError."""
        digest = parse_digest(data, algorithm)
        if not reader.present:
            raise CardError(errors.NO_CARD)
        if not pin:
            raise CardError(errors.BAD_PIN, "no PIN on the reader line")
        if remote(reader):
            return self._sign_at_owner(reader, text, pin, data, algorithm)
        state = self._state(reader)
        tag = hmac.new(self._secret, pin.encode("utf-8"), hashlib.sha256).digest()
        if state.wrong_pin is not None and hmac.compare_digest(state.wrong_pin, tag):
            self.log.info("SIGN on {reader}: refused to present the PIN the card rejected last time",
                          reader=reader.name)
            raise CardError(errors.BAD_PIN, "the same wrong PIN again")
        return self._sign(state, text, pin, tag, digest)

    def _sign_at_owner(self, reader, text, pin, data, algorithm):
        """SIGN on an owner's card: the owner's SIGN.  A reader line that
        named a certificate (alias, subject) names it to the owner too (its
        subject, else its alias), so the owner signs with that certificate
        wherever it is now, or answers that it is gone; one that named the
        reader names the upstream reader (its card's first certificate)."""
        state = self._cards.get(reader)
        named = [c for c in (state.certs if state is not None else ()) if text in c.names]
        line = reader_text(reader.key)
        if named:
            line = next((n for n in (named[0].subject, named[0].alias) if safe_line(n)), None)
            if line is None:
                raise CardError(errors.FAILED, "the certificate has no name a reader line can carry")
        command = "SIGN:" + "".join(data.split()) + (":" + algorithm.strip() if algorithm.strip() else "")
        d = reader.backend.ask([command], reader=line, pin=pin)
        return d.addCallback(_signature)

    def _sign_failed(self, state, error):
        # The reason names status words and steps, never the PIN.
        self.log.info("SIGN on {reader} failed: {code} ({reason})", reader=state.reader.name,
                      code=error.code, reason=error.reason)

    @inlineCallbacks
    def _sign(self, state, text, pin, tag, digest):
        transmit = card_transmit(state.reader, self.trace)
        by_alias = text in state.reader.extra_aliases and text != state.reader.name
        if not state.probed or state.dirty:
            # The card arrived or was reset and its probe has not run yet:
            # we hold the card, so probe it here.
            generation = state.generation
            state.dirty = False
            profile, certs = yield self.scan(transmit, state.profile)
            if state.generation == generation and state.present:
                self._store(state, profile, certs)
            if by_alias and not any(text in c.names for c in state.certs):
                raise CardError(errors.NOT_FOUND, "the alias is no longer on this card")
        state_cert = reader_entry(state, state.reader, text)
        cert = state_cert[1]
        profile = state.profile
        try:
            yield profile.verify_pin(transmit, pin, cert)
        except WrongPin as e:
            state.wrong_pin = tag
            if isinstance(e, PinBlocked):
                self.log.warn("SIGN on {reader}: the card's PIN is blocked ({reason})",
                              reader=state.reader.name, reason=e.reason)
            else:
                self.log.info("SIGN on {reader}: wrong PIN ({reason})", reader=state.reader.name, reason=e.reason)
            raise
        except CardError as e:
            self._sign_failed(state, e)
            raise
        state.wrong_pin = None
        try:
            signature = yield profile.sign(transmit, cert, digest)
        except CardError as e:
            self._sign_failed(state, e)
            raise
        self.log.info("SIGN on {reader} with {alias!r}: {hash}", reader=state.reader.name,
                      alias=cert.alias, hash=HASHES[len(digest)][0])
        return signature


def _signature(results):
    """The owner's SIGN result as signature bytes; raises CardError."""
    [result] = results
    if errors.is_error(result):
        raise CardError(result, f"the owner answered SIGN with {result}")
    try:
        return bytes.fromhex(result)
    except ValueError:
        raise CardError(errors.UPSTREAM, "the owner's SIGN answer is not hex") from None


def reader_entry(state, reader, text):
    """The certificate ``text`` names on the card in ``reader`` (its alias
    or subject), else that card's first usable certificate."""
    if state is None or not state.present or not reader.present:
        raise CardError(errors.NO_CARD)
    usable = [c for c in state.certs if c.usable]
    named = [c for c in usable if text in c.names]
    if len(named) > 1:
        raise CardError(errors.AMBIGUOUS, "alias names two certificates on one card")
    if named:
        return state, named[0]
    if not usable:
        raise CardError(errors.FAILED, "no signing certificate on this card")
    return state, usable[0]
