"""The certificates of an owner's cards as a front sees them (docs/tcp.md
"Certificates at the owner").

A front's ``tcp://`` / ``tls://`` reader of an upstream that has an owner id
(docs/protocol.md "### OWNER") is never probed through the hop: the owner
probes its own cards once, and the front asks the owner's index with the
line commands ENUM, ALIASES and CHAIN (no card command).  One
:class:`Mirror` per such backend keeps what it learnt: ENUM and ALIASES in
one request tell which upstream readers hold usable certificates and every
alias, in the owner's order (reader by reader); ``CHAIN`` on a reader line
naming the reader gives its first certificate (so where its aliases start),
``CHAIN`` on an alias the others.  A certificate is fetched again only when
the aliases of its reader changed.  SIGN goes to the owner as a SIGN
command (signing/index.py ``CertIndex.sign``).
"""

import base64

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from twisted.internet.defer import Deferred, gatherResults, inlineCallbacks
from twisted.python.failure import Failure

from .. import errors
from ..errors import CardError
from ..logs import Logger
from .profiles import CardCertificate


def remote(reader):
    """True when the certificates of the card in ``reader`` are its owner's
    to probe: a reader of a ``tcp://`` / ``tls://`` upstream that answered
    OWNER with an id (one without an id, e.g. FoxyProxy 2.10, is probed
    through the hop as before)."""
    backend = reader.backend
    return getattr(backend, "owner", None) is not None and hasattr(backend, "ask")


def safe_line(text):
    """True when ``text`` can be a reader line as it is: the upstream's
    parser reads it back (no ``:`` or ``|``, no leading or trailing blanks,
    one line)."""
    return bool(text) and text == text.strip() and not any(c in text for c in ":|\r\n")


def reader_text(name):
    """An upstream reader name as a reader line: itself, or its base64 (which
    a proxy accepts for a canonical name) when it cannot be one."""
    return name if safe_line(name) else base64.b64encode(name.encode("utf-8")).decode("ascii")


def names(result):
    """The base64 names of an ENUM or ALIASES answer; [] for a result code."""
    if not result or errors.is_error(result):
        return []
    found = []
    for token in result.split("|"):
        token = token.strip()
        if token:
            try:
                found.append(base64.b64decode(token, validate=True).decode("utf-8"))
            except ValueError:
                pass
    return found


def chain(result):
    """The x509 certificates of a CHAIN answer, leaf first; [] for a result
    code or anything that is not base64 DER."""
    if not result or errors.is_error(result):
        return []
    try:
        return [x509.load_der_x509_certificate(base64.b64decode(p, validate=True)) for p in result.split(":")]
    except ValueError:
        return []


def _checked(results):
    """``results`` of :meth:`TcpBackend.ask`, unless one says the owner
    could not answer (``C086``, ``C090``): then CardError, and what was
    learnt before stays."""
    for result in results:
        if result in (errors.UPSTREAM, errors.INTERNAL):
            raise CardError(result, f"the owner answered {result}")
    return results


class Mirror:
    """The certificates of one upstream (``backend``, a TcpBackend with an
    owner id), by upstream reader name.  :meth:`refresh` gives a Deferred
    firing with ``{upstream reader name: (certificates, issuers)}``:
    CardCertificate objects (aliases in the owner's order) and the x509
    issuer certificates its CHAIN answers carried, for readers whose card
    holds a usable certificate.  One refresh at a time: one asked while
    another runs gets that one's outcome."""

    log = Logger()

    def __init__(self, backend):
        self.backend = backend
        self._cache = {}  # upstream reader name -> (aliases, certificates, issuers)
        self._waiting = None  # Deferreds of callers of the refresh that runs, or None

    def refresh(self):
        d = Deferred()
        if self._waiting is not None:
            self._waiting.append(d)
            return d
        self._waiting = [d]
        self._run().addBoth(self._done)
        return d

    def _done(self, outcome):
        waiting, self._waiting = self._waiting, None
        for d in waiting:
            if isinstance(outcome, Failure):
                d.errback(outcome)
            else:
                d.callback(outcome)

    @inlineCallbacks
    def _run(self):
        enum, listed = _checked((yield self.backend.ask(["ENUM", "ALIASES"])))
        readers = list(dict.fromkeys(names(enum)))
        aliases = names(listed)
        cache = {r: self._cache[r] for r in readers if r in self._cache}
        firsts = {}
        for attempt in range(2):
            fetch = [r for r in readers if r not in cache and r not in firsts]
            if fetch:
                answers = yield gatherResults([self.backend.ask(["CHAIN"], reader=reader_text(r)) for r in fetch])
                for r, [answer] in zip(fetch, map(_checked, answers)):
                    firsts[r] = chain(answer)
            starts = self._split(readers, aliases, cache, firsts)
            lost = [r for r, s in starts.items() if s is None and r in cache]
            if not lost:
                break
            for r in lost:  # its first alias is not where it was: ask again
                del cache[r]
        found = {}
        for i, r in enumerate(readers):
            start = starts.get(r)
            if start is None:
                continue
            end = min((s for s in starts.values() if s is not None and s > start), default=len(aliases))
            block = tuple(aliases[start:end])
            if r in cache and cache[r][0] == block:
                found[r] = cache[r]
                continue
            leaf_chain = firsts.get(r)
            if leaf_chain is None:
                [answer] = _checked((yield self.backend.ask(["CHAIN"], reader=reader_text(r))))
                leaf_chain = chain(answer)
            chains = [leaf_chain]
            others = [a for a in block[1:] if safe_line(a)]
            if others:
                answers = yield gatherResults([self.backend.ask(["CHAIN"], reader=a) for a in others])
                chains += [chain(answer) for [answer] in map(_checked, answers)]
            certs, issuers = [], []
            for got in chains:
                if not got:
                    continue
                cert = CardCertificate.from_der(got[0].public_bytes(Encoding.DER), None)
                if cert is not None and cert.usable and cert not in certs:
                    certs.append(cert)
                issuers.extend(c for c in got[1:] if c not in issuers)
            found[r] = (block, certs, issuers)
        self._cache = found
        return {r: (certs, issuers) for r, (_block, certs, issuers) in found.items()}

    @staticmethod
    def _split(readers, aliases, cache, firsts):
        """Where each reader's aliases start in ALIASES (None: not found)."""
        starts, at = {}, 0
        for r in readers:
            first = cache[r][0][0] if r in cache and cache[r][0] else None
            if first is None and firsts.get(r):
                leaf = CardCertificate.from_der(firsts[r][0].public_bytes(Encoding.DER), None)
                first = leaf.alias if leaf is not None else None
            start = None
            if first is not None:
                try:
                    start = aliases.index(first, at)
                except ValueError:
                    pass
            starts[r] = start
            if start is not None:
                at = start + 1
        return starts
