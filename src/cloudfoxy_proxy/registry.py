"""Readers of all backends, their canonical names, and reader-line resolution
(PROTOCOL.md section 1.4), plus each card's FIFO queue (section 1.5)."""

import base64
import collections
import re

from . import errors
from .logs import Logger

_REGEX_CHARS = frozenset(".^$*+?()[]{}|\\")


def b64name(name):
    return base64.b64encode(name.encode("utf-8")).decode("ascii")


class QueueFull(Exception):
    """A card's queue already holds ``max_queue`` waiting requests."""


class CardQueue:
    """One command at a time per card; waiting requests are served FIFO.

    A waiter is any object with ``granted()`` and an ``abandoned`` flag.
    ``acquire`` answers at once when the card is free, so an idle card
    costs no Deferred, lock or callback.
    """

    __slots__ = ("busy", "waiters", "max_queue", "_releasing")

    def __init__(self, max_queue):
        self.busy = False
        self.waiters = collections.deque()
        self.max_queue = max_queue
        self._releasing = False

    def acquire(self, waiter):
        """True: the card is the caller's now.  False: ``waiter.granted()`` is
        called when its turn comes.  Raises QueueFull."""
        if not self.busy and not self.waiters:
            self.busy = True
            return True
        if len(self.waiters) >= self.max_queue:
            raise QueueFull()
        self.waiters.append(waiter)
        return False

    def release(self):
        """Hand the card to the next live waiter (iteratively, so a long run
        of requests that finish at once cannot nest calls)."""
        if self._releasing:
            self.busy = False
            return
        self._releasing = True
        try:
            self.busy = False
            while not self.busy and self.waiters:
                waiter = self.waiters.popleft()
                if waiter.abandoned:
                    continue
                self.busy = True
                waiter.granted()
        finally:
            self._releasing = False

    def __len__(self):
        return len(self.waiters)


class Reader:
    """One reader as the registry knows it.  The same object stays for the
    same (backend, key) for the life of the process, so its name and its
    card queue survive the reader vanishing and coming back."""

    __slots__ = ("name", "backend", "key", "aliases", "extra_aliases", "present", "queue", "info",
                 "release")

    def __init__(self, name, backend, key, queue):
        self.name = name
        self.backend = backend
        self.key = key
        self.queue = queue
        #: the backend's optional ``release(key)``: called when a request is done with the card
        self.release = getattr(backend, "release", None)
        self.aliases = ()
        self.extra_aliases = ()  # from the certificate index (set_extra_aliases)
        self.present = False
        self.info = None

    def __repr__(self):
        return f"<Reader {self.name!r}>"


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
        self._order = []  # backends in the order they first reported
        self._listeners = []
        self._cache = {}
        self._exact = {}
        self._aliases = {}
        self.readers = []
        self.listing = ""

    def add_listener(self, callback):
        """``callback(registry)`` after every change to the reader set."""
        self._listeners.append(callback)

    def update(self, backend, infos):
        """Replace ``backend``'s readers with ``infos`` (ReaderInfo objects)."""
        bid = id(backend)
        if bid not in self._current:
            self._order.append(backend)
        current = []
        for info in infos:
            reader = self._known.get((bid, info.key))
            if reader is None:
                reader = Reader(self._unique(info.name), backend, info.key, CardQueue(self.max_queue))
                self._known[(bid, info.key)] = reader
                self._names[reader.name] = reader
            reader.info = info
            reader.present = info.present
            reader.aliases = tuple(info.aliases)
            current.append(reader)
        before = {r.name for r in self._current.get(bid, ())}
        after = {r.name for r in current}
        self._current[bid] = current
        for name in sorted(after - before):
            self.log.info("reader added: {reader}", reader=name)
        for name in sorted(before - after):
            self.log.info("reader removed: {reader}", reader=name)
        self._rebuild()

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
        self.readers = [r for b in self._order for r in self._current.get(id(b), ())]
        self.listing = "|".join(b64name(r.name) for r in self.readers)
        exact = {}
        aliases = {}
        for r in self.readers:
            exact[r.name] = r
            for alias in (b64name(r.name),) + r.aliases + r.extra_aliases:
                aliases.setdefault(alias, []).append(r)
        self._exact = exact
        self._aliases = aliases
        self._cache = {}
        for callback in self._listeners:
            callback(self)

    def get(self, name):
        """The listed reader with this canonical name, or None."""
        return self._exact.get(name) if self.readers else None

    def resolve(self, text):
        """The one reader a reader line names; raises CardError C083/C082."""
        cache = self._cache
        found = cache.get(text)
        if found is None:
            found = self._resolve(text)
            if len(cache) > 1000:
                cache.clear()
            cache[text] = found
        if isinstance(found, Reader):
            return found
        raise errors.CardError(found, f"reader {text!r}")

    def _resolve(self, text):
        if text is None:
            return errors.NOT_FOUND
        matches = self.match(text)
        if not matches:
            return errors.NOT_FOUND
        if len(matches) > 1:
            return errors.AMBIGUOUS
        return matches[0]

    def match(self, text):
        """Every listed reader a reader line matches, by the rules of
        PROTOCOL.md 1.4: exact name, then alias, then pattern."""
        if not self.readers:
            return []
        reader = self._exact.get(text)
        if reader is not None:
            return [reader]
        hits = self._aliases.get(text)
        if hits:
            return list(hits)
        if text in ("", "*"):
            return list(self.readers)
        if _REGEX_CHARS.intersection(text):
            try:
                rx = re.compile(text, re.IGNORECASE)
            except re.error:
                rx = None
            if rx is not None:
                return [r for r in self.readers if rx.search(r.name)]
        folded = text.casefold()
        return [r for r in self.readers if folded in r.name.casefold()]
