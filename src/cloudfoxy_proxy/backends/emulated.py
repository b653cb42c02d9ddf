"""``emulated:`` — built-in virtual cards, the default backend.

``emulated:?cards=4&type=iso7816&latency_ms=0&prefix=Emulated``

Signing cards (``type=piv``, ``openpgp``, ``ica`` or ``postsignum``) take
``pin=`` (default 123456) or ``pin_file=FILE`` (its first line, read by
secrets.read_secret, so no PIN needs the command line), and ``keys=DIR`` (keep their PKI as PEM files in DIR; see
cards/pki.py and docs/signing.md).

``emulated:?replay=FILE&mode=strict|lookup[&reader=NAME]`` serves one card
that answers from a recorded ``--trace`` (cards/replay.py, docs/trace.md).
"""

import attr
from twisted.internet.defer import Deferred
from zope.interface import implementer

from .. import errors
from ..secrets import read_secret
from ..interfaces import IBackend, ReaderInfo
from ..cards.iso7816 import Iso7816Card
from . import float_param, int_param, query


def _piv(**kw):
    from ..cards.piv import PivCard

    return PivCard(**kw)


def _openpgp(**kw):
    from ..cards.openpgp import OpenPgpCard

    return OpenPgpCard(**kw)


def _ica(**kw):
    from ..cards.ica import IcaCard

    return IcaCard(**kw)


def _postsignum(**kw):
    from ..cards.postsignum import PostSignumCard

    return PostSignumCard(**kw)


CARD_TYPES = {"iso7816": Iso7816Card, "piv": _piv, "openpgp": _openpgp, "ica": _ica, "postsignum": _postsignum}
#: Card types that hold keys: they take pin=, keys= and the prefix as label.
SIGNING_TYPES = frozenset(("piv", "openpgp", "ica", "postsignum"))
#: Shortest and longest pin= per signing card type (characters).
PIN_LENGTHS = {"piv": (6, 8), "openpgp": (6, 127), "ica": (4, 16), "postsignum": (4, 16)}


def from_url(url, settings=None):
    params = query(url, {"cards", "type", "latency_ms", "prefix", "pin", "pin_file", "keys",
                         "replay", "mode", "reader"})
    if "replay" in params:
        return _replay(params)
    if "mode" in params or "reader" in params:
        raise ValueError("mode= and reader= are for replay=FILE")
    cards = int_param(params, "cards", 4, 1, 10000)
    latency = float_param(params, "latency_ms", 0.0, 0.0, 600000.0) / 1000.0
    prefix = params.get("prefix", "Emulated").strip()
    if not prefix:
        raise ValueError("prefix= must not be empty")
    kind = params.get("type", "iso7816")
    if kind not in CARD_TYPES:
        raise ValueError(f"type={kind!r} is not one of {', '.join(CARD_TYPES)}")
    factory = CARD_TYPES[kind]
    options = {}
    if kind in SIGNING_TYPES:
        options = _signing_options(params, kind, prefix)
    elif "pin" in params or "pin_file" in params or "keys" in params:
        raise ValueError(f"pin=, pin_file= and keys= are for the signing card types "
                         f"({', '.join(sorted(SIGNING_TYPES))}), not type={kind}")

    def make(reactor):
        return EmulatedBackend(
            clock=reactor, cards=[factory(serial=i, **options) for i in range(cards)],
            latency=latency, prefix=prefix, kind=kind)

    return make


def _replay(params):
    """``emulated:?replay=FILE[&reader=NAME][&mode=strict|lookup][&prefix=P][&latency_ms=N]``:
    one card, ``PREFIX 00``, answering from the JSON-lines trace FILE
    (cards/replay.py, docs/trace.md)."""
    from ..cards.replay import STRICT, ReplayCard, load

    other = sorted(set(params) - {"replay", "mode", "reader", "prefix", "latency_ms"})
    if other:
        raise ValueError(f"replay= takes reader=, mode=, prefix= and latency_ms=, not {', '.join(other)}=")
    latency = float_param(params, "latency_ms", 0.0, 0.0, 600000.0) / 1000.0
    prefix = params.get("prefix", "Emulated").strip()
    if not prefix:
        raise ValueError("prefix= must not be empty")
    path = params["replay"]
    reader, records = load(path, params.get("reader") or None)
    try:
        card = ReplayCard(records, params.get("mode", STRICT), source=f"{path} ({reader})")
    except ValueError as e:
        raise ValueError(f"replay={path!r}, reader {reader!r}: {e}") from None

    def make(reactor):
        return EmulatedBackend(clock=reactor, cards=[card], latency=latency, prefix=prefix, kind="replay")

    return make


def _signing_options(params, kind, prefix):
    if "pin" in params and "pin_file" in params:
        raise ValueError("give pin= or pin_file=, not both")
    pin = read_secret("pin_file", params["pin_file"]) if "pin_file" in params else params.get("pin", "123456")
    shortest, longest = PIN_LENGTHS[kind]
    if not shortest <= len(pin.encode("utf-8")) <= longest:
        raise ValueError(f"pin= must have {shortest} to {longest} characters for type={kind}")
    keys = params.get("keys") or None
    if keys is not None:
        from ..cards.pki import check_keys_dir

        check_keys_dir(keys)
    return {"pin": pin, "label": prefix, "keys": keys}


@implementer(IBackend)
@attr.s(eq=False)
class EmulatedBackend:
    """Cards in readers named ``PREFIX 00``, ``PREFIX 01``…; ``remove`` and
    ``insert`` pull and put back a card, for tests and demos."""

    clock = attr.ib()
    cards = attr.ib()
    latency = attr.ib(default=0.0)
    prefix = attr.ib(default="Emulated")
    kind = attr.ib(default="iso7816")
    _slots = attr.ib(init=False)
    _registry = attr.ib(init=False, default=None)

    def __attrs_post_init__(self):
        self._slots = list(self.cards)

    @property
    def description(self):
        return f"emulated: {len(self.cards)} {self.kind} cards"

    def name(self, index):
        return f"{self.prefix} {index:02d}"

    def start(self, registry):
        self._registry = registry
        self._report()

    def stop(self):
        self._registry = None

    def _report(self):
        if self._registry is not None:
            self._registry.update(self, [
                ReaderInfo(i, self.name(i), present=card is not None,
                           atr=card.atr if card is not None else None)
                for i, card in enumerate(self._slots)])

    def remove(self, index):
        self._slots[index] = None
        self._report()

    def insert(self, index):
        self._slots[index] = self.cards[index]
        self.cards[index].reset()
        self._report()

    def _card(self, key):
        try:
            card = self._slots[key]
        except (IndexError, TypeError):
            raise errors.CardError(errors.NOT_FOUND, f"no emulated reader {key!r}") from None
        if card is None:
            raise errors.CardError(errors.NO_CARD)
        return card

    def reset(self, key):
        return self._later(key, self._card(key).reset())

    def transmit(self, key, apdu):
        try:
            card = self._slots[key]
        except (IndexError, TypeError):
            card = None
        if card is None:
            card = self._card(key)  # raises: no such reader, or no card in it
        result = card.transmit(apdu)
        return self._later(key, result) if self.latency else result

    def _later(self, key, result):
        if not self.latency:
            return result
        d = Deferred(lambda _: call.cancel())
        call = self.clock.callLater(self.latency, self._deliver, d, key, result)
        return d

    def _deliver(self, d, key, result):
        if self._slots[key] is None:
            d.errback(errors.CardError(errors.NO_CARD, "card pulled mid-command"))
        else:
            d.callback(result)
