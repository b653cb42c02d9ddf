"""Readers of all backends, their canonical names, and reader-line resolution
(docs/protocol.md "Reader names and selection"),
plus each card's FIFO queue (section 1.5)."""

import base64
import collections

from . import errors
from .logs import Logger

_REGEX_CHARS = frozenset(".^$*+?()[]{}|\\")

#: The longest reader line (in characters) tried as a regular expression; a
#: longer one can still be a name, an alias or a literal part of a name.
MAX_PATTERN = 256

#: The resolve cache keeps at most this many reader lines, of at most this
#: many characters in all, and only lines that named exactly one reader.
CACHE_ENTRIES = 1024
CACHE_CHARS = 256 * 1024


_PATTERN_OPTIONS = None


def _re2():
    """The re2 module and the options of reader-line patterns, imported at
    the first pattern (RE2 costs about 2 MB of memory: most proxies never
    see one)."""
    global _PATTERN_OPTIONS
    import re2

    if _PATTERN_OPTIONS is None:
        options = re2.Options()
        options.case_sensitive = False
        options.never_capture = True
        options.log_errors = False  # a client's bad pattern is not worth a stderr line
        _PATTERN_OPTIONS = options
    return re2


def compile_pattern(text):
    """A client's reader-line pattern compiled with RE2, or None.

    RE2 (https://github.com/google/re2/wiki/Syntax) runs in time linear in
    the name searched, whatever the pattern, and bounds a compiled
    pattern's memory (8 MiB by default), so no pattern can stall the
    reactor the way a backtracking engine can (``(.*){18}Z``).  None when
    ``text`` is longer than :data:`MAX_PATTERN` characters or RE2 rejects it
    (bad syntax, back-references, too large): such a line matches nothing
    as a pattern.
    """
    if len(text) > MAX_PATTERN:
        return None
    re2 = _re2()
    try:
        pattern = re2.compile(text, _PATTERN_OPTIONS)
    except re2.error:
        return None
    finally:
        # re2.compile keeps the last 128 patterns in an lru_cache: client
        # input, up to 8 MiB each.  Keep nothing.
        re2.purge()
    return pattern


def b64name(name):
    return base64.b64encode(name.encode("utf-8")).decode("ascii")


class QueueFull(Exception):
    """A card's queue already holds ``max_queue`` waiting requests."""


class CardQueue:
    """One command at a time per card; waiting requests are served FIFO.

    A waiter is any object with ``granted()`` and an ``abandoned`` flag.
    ``acquire`` answers at once when the card is free, so an idle card
    costs no Deferred, lock or callback.  A waiter whose client went away
    calls :meth:`leave`: from then on it no longer counts against
    ``max_queue`` nor in ``len()``.
    """

    __slots__ = ("busy", "waiters", "max_queue", "_releasing", "_gone")

    def __init__(self, max_queue):
        self.busy = False
        self.waiters = collections.deque()
        self.max_queue = max_queue
        self._releasing = False
        self._gone = 0  # abandoned waiters still in ``waiters``

    def acquire(self, waiter):
        """True: the card is the caller's now.  False: ``waiter.granted()`` is
        called when its turn comes.  Raises QueueFull."""
        if not self.busy and not self.waiters:
            self.busy = True
            return True
        if len(self.waiters) - self._gone >= self.max_queue:
            raise QueueFull()
        self.waiters.append(waiter)
        return False

    def leave(self, waiter):
        """``waiter``, queued by :meth:`acquire` and not granted yet, gives up
        its place (its ``abandoned`` flag set).  Abandoned waiters are
        skipped when the card is released and swept out once they are half
        of the queue, so each leave costs O(1) amortised and the queue never
        holds more than twice its live waiters."""
        waiter.abandoned = True
        self._gone += 1
        if 2 * self._gone > len(self.waiters):
            self.waiters = collections.deque(w for w in self.waiters if not w.abandoned)
            self._gone = 0

    def release(self):
        """Hand the card to the next live waiter (iteratively, so a long run
        of requests that finish at once cannot nest calls)."""
        if self._releasing or not self.waiters:
            self.busy = False  # nobody waits (the common case), or release() below hands it on
            return
        self._releasing = True
        try:
            self.busy = False
            while not self.busy and self.waiters:
                waiter = self.waiters.popleft()
                if waiter.abandoned:
                    self._gone -= 1
                    continue
                self.busy = True
                waiter.granted()
        finally:
            self._releasing = False

    def __len__(self):
        """Live waiters."""
        return len(self.waiters) - self._gone


def client_of(session):
    """Who a dispatch Session belongs to, for reset generations: its front
    end and identity name (a client's new connection knows what its last
    one knew)."""
    identity = session.identity
    return session.frontend, identity.name if identity is not None else None


def synced(reader, session):
    """``session`` (and its client) now knows the card's current generation."""
    session.seen[reader] = reader.known[client_of(session)] = reader.generation


def changed_behind(reader, session):
    """True when the card in ``reader`` changed behind ``session`` since
    its last command on it (or, on a new connection, since its client's
    last); ``session`` knows the current generation afterwards."""
    generation = reader.generation
    last = session.seen.get(reader)
    if last is None:
        last = reader.known.get(client_of(session))
    synced(reader, session)
    return last is not None and last != generation


class Reader:
    """One reader as the registry knows it.  The same object stays for the
    same (backend, key) for the life of the process, so its name and its
    card queue survive the reader vanishing and coming back."""

    __slots__ = ("name", "backend", "key", "aliases", "extra_aliases", "present", "queue", "info",
                 "release", "batch", "for_client", "holder", "held_since", "exclusive", "generation", "known")

    def __init__(self, name, backend, key, queue):
        self.name = name
        self.backend = backend
        self.key = key
        self.queue = queue
        #: the backend's optional ``release(key)``: called when a request is done with the card
        self.release = getattr(backend, "release", None)
        #: the backend's optional ``transmit_batch(key, steps)`` (IBackend)
        self.batch = getattr(backend, "transmit_batch", None)
        #: the backend's optional ``for_client(session, identity)`` (IBackend)
        self.for_client = getattr(backend, "for_client", None)
        self.aliases = ()
        self.extra_aliases = ()  # from the certificate index (set_extra_aliases)
        self.present = False
        self.info = None
        #: the dispatch Session that holds the card between its requests (a
        #: vpcd bridge while connected to vpcd), or None; the proxy's own
        #: work on the card (certificate probes) never runs while it is set
        self.holder = None
        #: with ``holder``: since when (the dispatcher clock's seconds), for the status page
        self.held_since = None
        #: with ``holder``: other sessions' card commands get C086 at once
        self.exclusive = False
        #: the card's reset generation (docs/backends.md, "Resets"): +1 at
        #: every reset, power cycle or swap; a connection whose last command
        #: saw an older one gets C080 once (run.RequestRun._changed)
        self.generation = 0
        #: client -> the generation it last saw (a client: front end and
        #: identity name, see :func:`client_of`; bounded by the configured
        #: identities): what a new connection of that client is taken to know
        self.known = {}

    def done(self):
        """The card's current turn is over (a request, a card session or
        the proxy's own probe): the backend may end its per-request state
        (``release(key)``: pcsc: ends its transaction and starts counting
        ``idle_release``), then the queue's next waiter gets the card."""
        if self.release is not None:
            self.release(self.key)
        self.queue.release()

    def __repr__(self):
        return f"<Reader {self.name!r}>"


def place(backend):
    """Where a backend's cards are, for names of dropped backends
    (ReaderRegistry.drop): its upstream's owner id when it knows one
    (``owner``: the same owner at a new address has the same cards),
    else its address (``where``, e.g. ``tcp://host:4001``), else None."""
    owner = getattr(backend, "owner", None)
    if owner:
        return ("owner", owner)
    return getattr(backend, "where", None)


def _listing_key(backend):
    owner = getattr(backend, "owner", None)
    return (1, owner) if owner else (0, "")


class ReaderRegistry:
    """All readers of all backends.

    Backends call :meth:`update` with their full current reader list; the
    registry gives each a canonical name unique across backends and keeps
    it stable.  ``resolve`` turns a reader line into one reader.
    """

    log = Logger()

    def __init__(self, max_queue=100):
        self.max_queue = max_queue
        self._known = {}  # (id(backend), key) -> Reader, never forgotten
        self._names = {}  # canonical name -> Reader (every name ever given)
        self._current = {}  # id(backend) -> [Reader] listed now
        self._reported = set()  # id(backend) of those that have reported at least once
        #: (place, key, asked name) -> canonical name, of dropped backends' readers
        #: (their names stay reserved: see drop)
        self._retired = {}
        self._b64 = {}  # canonical name -> its base64 (names never change)
        self._order = []  # backends in the order they first reported
        self._listeners = []
        self._reset_listeners = []
        self._cache = {}  # reader line -> Reader (see _remember)
        self._cache_chars = 0
        self._exact = {}
        self._aliases = {}
        self._folded = []  # casefolded names of ``readers``
        self.readers = []
        self.listing = ""

    def add_listener(self, callback):
        """``callback(registry)`` after every change to the reader set."""
        self._listeners.append(callback)

    def add_reset_listener(self, callback):
        """``callback(reader, session)`` just before a client's RESET of the
        card in ``reader`` runs (``session``: the dispatch Session of the
        client that sent it)."""
        self._reset_listeners.append(callback)

    def watch(self, changed, reset):
        """``add_listener(changed)`` and ``add_reset_listener(reset)``, then
        ``changed(self)`` once for the readers already there."""
        self.add_listener(changed)
        self.add_reset_listener(reset)
        changed(self)

    def card_reset(self, reader, session):
        """The dispatcher is about to reset the card in ``reader`` for
        ``session``: a new generation that ``session`` knows of."""
        reader.generation += 1
        synced(reader, session)
        for callback in self._reset_listeners:
            callback(reader, session)

    def card_lost(self, reader, session):
        """The card's state is gone behind its clients (a backend answered
        ``C080``: reset by another program, pulled, swapped): a new
        generation; ``session``, which got that ``C080``, knows of it."""
        reader.generation += 1
        synced(reader, session)

    def update(self, backend, infos):
        """Replace ``backend``'s readers with ``infos`` (ReaderInfo objects).

        Cheap when little changes: a list equal to the last one costs one
        pass and no rebuild; "reader added/removed" is logged per name for
        a few readers and summarised (the first LOG_NAMES names and a
        count) for many.
        """
        bid = id(backend)
        if bid not in self._current:
            self._order.append(backend)
        known = self._known
        previous = self._current.get(bid, ())
        changed = False
        current = []
        for info in infos:
            reader = known.get((bid, info.key))
            if reader is None:
                reader = Reader(self._name_for(backend, info), backend, info.key, CardQueue(self.max_queue))
                known[(bid, info.key)] = reader
                self._names[reader.name] = reader
            if reader.info != info:
                if reader.info is not None and (info.present, info.atr) != (
                        reader.info.present, reader.info.atr):
                    reader.generation += 1  # a card left, came or changed (docs/backends.md, "Resets")
                reader.info = info
                reader.present = info.present
                reader.aliases = tuple(info.aliases)
                changed = True
            current.append(reader)
        self._current[bid] = current
        if not changed and current == list(previous) and bid in self._reported:
            return
        self._reported.add(bid)
        before = {r.name for r in previous}
        after = {r.name for r in current}
        self._log_names("added", [r.name for r in current if r.name not in before])
        self._log_names("removed", [r.name for r in previous if r.name not in after])
        self._rebuild()

    def prepare(self, backend, infos):
        """Make the Reader objects (names, queues) for ``infos`` without
        listing them, so that a later :meth:`update` with a long list costs
        less at once (a backend may prepare a long list in chunks)."""
        bid = id(backend)
        known = self._known
        encoded = self._b64
        for info in infos:
            if (bid, info.key) not in known:
                reader = Reader(self._name_for(backend, info), backend, info.key, CardQueue(self.max_queue))
                known[(bid, info.key)] = reader
                self._names[reader.name] = reader
                encoded[reader.name] = b64name(reader.name)

    #: How many names a summarised "readers added/removed" line shows.
    LOG_NAMES = 10

    def _log_names(self, what, names):
        if len(names) <= self.LOG_NAMES:
            for name in names:
                self.log.info("reader {what}: {reader}", what=what, reader=name)
        else:
            self.log.info("{count} readers {what}: {names} and {more} more", count=len(names),
                          what=what, names=", ".join(names[:self.LOG_NAMES]),
                          more=len(names) - self.LOG_NAMES)

    def drop(self, backend):
        """Forget ``backend`` (membership: an upstream removed at run time):
        its readers leave the listing at once (a reader line naming one
        answers ``C083``), a card session held on one of them ends, and
        requests already queued for one are answered by the backend, which
        the caller stops (``C086``).  Their names stay reserved: no other
        card is ever given one of them, only a reader of a backend at the
        same place (:func:`place`) reporting the same upstream reader
        under the same name (the same upstream come back) gets its name
        again.  Returns how many readers left the listing."""
        bid = id(backend)
        if bid not in self._current and backend not in self._order:
            return 0
        readers = self._current.pop(bid, [])
        self._order = [b for b in self._order if b is not backend]
        self._reported.discard(bid)
        where = place(backend)
        for (known_bid, key), reader in list(self._known.items()):
            if known_bid != bid:
                continue
            del self._known[(known_bid, key)]  # id() may be reused by a later backend
            if where is not None and reader.info is not None:
                self._retired[(where, key, reader.info.name)] = reader.name
            holder = reader.holder
            card = getattr(holder, "card", None) if holder is not None else None
            if card is not None and card.reader is reader:
                card.close("backend dropped")
            reader.present = False
        self._log_names("removed", [r.name for r in readers])
        self._rebuild()
        return len(readers)

    def _name_for(self, backend, info):
        """A new reader's canonical name: its old one when it is a dropped
        backend's reader come back (see :meth:`drop`), else unique."""
        where = place(backend) if self._retired else None
        if where is not None:
            name = self._retired.pop((where, info.key, info.name), None)
            if name is not None:
                return name
        return self._unique(info.name)
    def taken(self, backend, names):
        """The names among ``names`` that were given to a reader of another
        backend (listed now or earlier: a name, once given, stays that
        reader's)."""
        given = self._names
        return [n for n in names if n in given and given[n].backend is not backend]

    def reported(self, backend):
        """True once ``backend`` has called :meth:`update` (readiness)."""
        return id(backend) in self._current

    def set_extra_aliases(self, reader, aliases):
        """More names for ``reader`` besides its backend's (the certificate
        index's aliases of the card in it); ``()`` removes them."""
        aliases = tuple(aliases)
        if aliases != reader.extra_aliases:
            reader.extra_aliases = aliases
            self._rebuild()

    def _unique(self, name):
        if name not in self._names:
            return name
        n = 2
        while f"{name} ({n})" in self._names:
            n += 1
        return f"{name} ({n})"

    def _rebuild(self):
        # Owners' readers in the order of their owner ids, after the other
        # backends' (first come): the same READERS on every front of a tier
        # whichever owner answered first (docs/scale-out.md).
        self.readers = [r for b in sorted(self._order, key=_listing_key) for r in self._current.get(id(b), ())]
        encoded = self._b64
        names = []
        exact = {}
        aliases = {}
        for r in self.readers:
            name = r.name
            b64 = encoded.get(name)
            if b64 is None:
                b64 = encoded[name] = b64name(name)
            names.append(b64)
            exact[name] = r
            hits = aliases.get(b64)
            if hits is None:
                aliases[b64] = [r]
            else:
                hits.append(r)
            for alias in r.aliases + r.extra_aliases:
                hits = aliases.get(alias)
                if hits is None:
                    aliases[alias] = [r]
                else:
                    hits.append(r)
        self.listing = "|".join(names)
        self._exact = exact
        self._aliases = aliases
        self._folded = [r.name.casefold() for r in self.readers]
        self._cache = {}
        self._cache_chars = 0
        for callback in self._listeners:
            callback(self)

    def get(self, name):
        """The listed reader with this canonical name, or None."""
        return self._exact.get(name) if self.readers else None

    def resolve(self, text, patterns=True, sees=None):
        """The one reader a reader line names; raises CardError C083/C082.

        ``patterns=False`` stops after the exact name and the aliases
        (REST ``terminal=``, which names one card exactly).  ``sees``
        (``access.Identity.sees``; None: every reader) chooses among the
        readers it accepts only: another reader is not there at all."""
        if sees is not None:
            return self._one([r for r in self.match(text, patterns) if sees(r)] if text is not None else [], text)
        if not patterns:
            return self._one(self.match(text, patterns=False), text)
        cache = self._cache
        found = cache.get(text)
        if found is None:
            found = self._one(self.match(text) if text is not None else [], text)
            self._remember(text, found)
        return found

    def _remember(self, text, reader):
        """Cache a line that named one reader, within CACHE_ENTRIES lines
        and CACHE_CHARS characters (oldest first out)."""
        size = len(text)
        if size > CACHE_CHARS // 16:
            return
        cache = self._cache
        while cache and (len(cache) >= CACHE_ENTRIES or self._cache_chars + size > CACHE_CHARS):
            oldest = next(iter(cache))
            del cache[oldest]
            self._cache_chars -= len(oldest)
        cache[text] = reader
        self._cache_chars += size

    @staticmethod
    def _one(matches, text):
        if len(matches) == 1:
            return matches[0]
        code = errors.AMBIGUOUS if matches else errors.NOT_FOUND
        raise errors.CardError(code, f"reader {text[:200]!r}" if text is not None else "no reader line")

    def match(self, text, patterns=True):
        """Every listed reader a reader line matches, by the rules of
        docs/protocol.md "Reader names and selection": exact name, then alias, then ``""``/``*`` (every
        reader), then a case-insensitive literal part of names, and only
        when that matched nothing a case-insensitive regular expression
        (:func:`compile_pattern`) searched in names.  ``patterns=False``:
        exact name and aliases only."""
        if not self.readers:
            return []
        reader = self._exact.get(text)
        if reader is not None:
            return [reader]
        hits = self._aliases.get(text)
        if hits:
            return list(hits)
        if not patterns:
            return []
        if text in ("", "*"):
            return list(self.readers)
        folded = text.casefold()
        found = [r for r, name in zip(self.readers, self._folded) if folded in name]
        if found or len(text) > MAX_PATTERN or not _REGEX_CHARS.intersection(text):
            return found
        rx = compile_pattern(text)
        if rx is None:
            return []
        return [r for r in self.readers if rx.search(r.name)]
