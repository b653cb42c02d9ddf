"""A card that answers from a recorded trace (``emulated:?replay=FILE``,
docs/trace.md "Replay").

The trace is a JSON-lines ``--trace`` file; the card replays the records
of one reader: its ATR is the one of the first recorded reset, and each
command APDU is answered with the recorded response:

* ``strict`` (the default): in recorded order.  The first command that
  differs from the next recorded one (or comes after the trace's end) is
  answered ``C081`` and logged once with both commands; every later
  command is answered ``C081`` too (a test that diverged has failed).
  Resets are not compared (PC/SC stacks power cards on and off as their
  timers say): a reset answers the ATR and passes over recorded resets.
* ``lookup``: by the command's bytes, whatever the order; the n-th time a
  command comes it gets its n-th recorded response (the last one again
  once they run out); a command never recorded is answered ``C081``.

Commands are compared as the trace kept them: a redacted command (a
VERIFY's PIN left out) matches whatever data of that length the client
sends, so a replayed card accepts any PIN of the recorded length.
"""

from .. import errors
from ..errors import CardError
from ..logs import Logger
from ..trace import read_records, redacted

STRICT, LOOKUP = "strict", "lookup"
#: Divergences logged at most per card in lookup mode (each one is a client's input).
MAX_LOGGED = 20


def load(path, reader=None):
    """``(reader name, records)``: the records of ``reader`` (None: the
    trace must hold exactly one reader) in the JSON-lines trace ``path``;
    ValueError with a message for the user."""
    try:
        with open(path, encoding="utf-8") as f:
            records = list(read_records(f))
    except OSError as e:
        raise ValueError(f"replay={path!r}: cannot read it ({e.strerror})") from None
    except ValueError as e:
        raise ValueError(f"replay={path!r}: {e} (a JSON-lines --trace file is needed, not pcapng)") from None
    names = sorted({r.get("reader") for r in records if isinstance(r.get("reader"), str)})
    if reader is None:
        if len(names) != 1:
            raise ValueError(f"replay={path!r} holds {len(names)} readers ({', '.join(names) or 'none'}): "
                             "name one with reader=")
        reader = names[0]
    elif reader not in names:
        raise ValueError(f"replay={path!r} has no records of reader {reader!r} (it has: {', '.join(names)})")
    return reader, [r for r in records if r.get("reader") == reader]


def _bytes(text, what, n):
    try:
        return bytes.fromhex(text)
    except (TypeError, ValueError):
        raise ValueError(f"record {n}: {what} is not hex") from None


class ReplayCard:
    """The card of the module docstring: ``records`` of one reader (dicts
    of trace.as_dict), ``mode`` ``strict`` or ``lookup``, ``source`` names
    the trace in log lines.  ``transmit(apdu)`` returns the response bytes
    or raises CardError; ``reset()`` returns the ATR."""

    log = Logger()

    def __init__(self, records, mode=STRICT, source="trace"):
        if mode not in (STRICT, LOOKUP):
            raise ValueError(f"mode={mode!r}: use strict or lookup")
        self.mode = mode
        self.source = source
        self.events = []  # ("reset", None) or (command key, response bytes or a result code)
        self.atr = None
        for n, r in enumerate(records, 1):
            if r["event"] == "reset":
                if self.atr is None and "atr" in r:
                    self.atr = _bytes(r["atr"], "atr", n)
                self.events.append(("reset", None))
                continue
            key = (r.get("command", "").upper(), r.get("redacted", 0))
            _bytes(key[0], "command", n)
            answer = r.get("result") if "result" in r else _bytes(r.get("response"), "response", n)
            self.events.append((key, answer))
        if self.atr is None:
            raise ValueError("the trace holds no reset of this reader, so no ATR to answer with "
                             "(record a session that starts with a reset, e.g. a PC/SC connect)")
        self.position = 0
        self.diverged = False
        self.logged = 0
        self._seen = {}  # lookup: key -> times asked
        self._answers = {}  # lookup: key -> [answers]
        for key, answer in self.events:
            if key != "reset":
                self._answers.setdefault(key, []).append(answer)
        self.redacts = any(key != "reset" and key[1] for key, _ in self.events)

    def reset(self):
        while self.position < len(self.events) and self.events[self.position][0] == "reset":
            self.position += 1
        return self.atr

    def _key(self, apdu, hidden_expected):
        shown, hidden = redacted(apdu) if hidden_expected else (apdu, 0)
        return (shown.hex().upper(), hidden)

    def transmit(self, apdu):
        if self.mode == LOOKUP:
            return self._lookup(apdu)
        if self.diverged:
            raise CardError(errors.FAILED, "replay diverged earlier")
        self.reset()  # recorded resets here are passed over
        if self.position >= len(self.events):
            return self._diverge(apdu, None)
        key, answer = self.events[self.position]
        if self._key(apdu, key[1]) != key:
            return self._diverge(apdu, key)
        self.position += 1
        return self._answer(answer)

    def _lookup(self, apdu):
        key = self._key(apdu, False)
        answers = self._answers.get(key)
        if answers is None and self.redacts:
            key = self._key(apdu, True)
            answers = self._answers.get(key)
        if answers is None:
            if self.logged < MAX_LOGGED:
                self.logged += 1
                self.log.error("replay of {source}: command {command} was never recorded; answered C081"
                               "{more}", source=self.source, command=self._shown(apdu),
                               more=" (no more such lines for this card)" if self.logged == MAX_LOGGED else "")
            raise CardError(errors.FAILED, "not in the trace")
        n = self._seen.get(key, 0)
        self._seen[key] = n + 1
        return self._answer(answers[min(n, len(answers) - 1)])

    @staticmethod
    def _shown(apdu):
        shown, hidden = redacted(apdu)
        return shown.hex().upper() + (f" ({hidden} data bytes not shown)" if hidden else "")

    def _diverge(self, apdu, key):
        self.diverged = True
        number = sum(1 for k, _ in self.events[:self.position] if k != "reset") + 1
        recorded = "the end of the trace" if key is None else "the recorded " + key[0] + (
            f" ({key[1]} data bytes not shown)" if key[1] else "")
        self.log.error("replay of {source} diverged at command {number}: got {command}, expected "
                       "{recorded}; this and every later command answered C081",
                       source=self.source, number=number, command=self._shown(apdu), recorded=recorded)
        raise CardError(errors.FAILED, "replay diverged")

    @staticmethod
    def _answer(answer):
        if isinstance(answer, str):
            raise CardError(answer, "as recorded")
        return answer
