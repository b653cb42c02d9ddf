"""The line protocol's request parser (docs/protocol.md "Requests"), with no I/O.

The server's framer hands it one line at a time (and tells it when it has
consumed everything the client sent so far); it returns a complete
:class:`Request` when one is ready.  Everything here is plain Python and is
unit-tested without a transport.
"""

import attr

from . import errors
from .logs import Logger

#: The longest command APDU: extended case 4 (4 + 3 + 65535 + 2 bytes).
MAX_APDU_BYTES = 65544

#: Every command name the protocol knows (docs/protocol.md "Commands").
RESET, APDU, READERS, LIST, ENUM, ALIASES, CHAIN, SIGN, PERSONALIZE, EMPTYLINE = (
    "RESET", "APDU", "READERS", "LIST", "ENUM", "ALIASES", "CHAIN", "SIGN",
    "PERSONALIZE", "EMPTYLINE",
)
COMMANDS = frozenset(
    (RESET, APDU, READERS, LIST, ENUM, ALIASES, CHAIN, SIGN, PERSONALIZE, EMPTYLINE)
)
#: Between proxies: on whose behalf the next requests are (relay.py).
CLIENT = "CLIENT"
COMMANDS = COMMANDS | {CLIENT}
#: A proxy's owner id, asked by a front (docs/protocol.md "### OWNER").
OWNER = "OWNER"
COMMANDS = COMMANDS | {OWNER}
#: Commands that run on one card, under that card's queue.
CARD_COMMANDS = frozenset((RESET, APDU, SIGN))
#: A line-protocol connection's card session (docs/protocol.md "HOLD and
#: RELEASE"): ``HOLD:IDLE_SECONDS`` holds the reader line's card for the
#: connection, ``RELEASE`` lets it go.
HOLD, RELEASE = "HOLD", "RELEASE"
SESSION_COMMANDS = frozenset((HOLD, RELEASE))
COMMANDS = COMMANDS | SESSION_COMMANDS


@attr.s(slots=True, hash=True)
class Command:
    """``ID:COMMAND[:DATA[:OBJECT]]``; ``error`` is a result code found while parsing.

    A value (compared and hashed by its fields) that nothing changes once
    made; not ``frozen``, which makes building one, once per command line,
    about 3.5 times dearer."""

    id = attr.ib()
    name = attr.ib()
    data = attr.ib(default="")
    obj = attr.ib(default="")
    apdu = attr.ib(default=None)  # the command APDU's bytes, for APDU
    error = attr.ib(default=None)


@attr.s(slots=True)
class Request:
    """One request: a reader line and the commands to run on it.

    ``reader`` is None when the client never named one (a command with no
    reader line); ``""`` and ``"*"`` mean "no particular reader".
    """

    reader = attr.ib()
    password = attr.ib(default=None)
    commands = attr.ib(factory=list)
    wait_for_empty_line = attr.ib(default=False)


def _command_name(field):
    """The upper-case command in a command line's second field, and the
    older spelling's data (``APDU|HEX``), if any."""
    name, bar, rest = field.partition("|")
    return name.strip().upper(), (rest if bar else None)


def parse_apdu(text):
    """Hex (white space allowed) to bytes, or None when it is not a command APDU."""
    try:
        apdu = bytes.fromhex("".join(text.split()))
    except ValueError:
        return None
    if not 4 <= len(apdu) <= MAX_APDU_BYTES:
        return None
    return apdu


def make_command(fields):
    """A :class:`Command` from the ``:``-separated fields of a command line."""
    cid = fields[0].strip()
    if len(fields) > 4:
        return Command(cid, "", error=errors.MALFORMED)
    name, old_data = _command_name(fields[1])
    data = fields[2] if len(fields) > 2 else (old_data or "")
    obj = fields[3] if len(fields) > 3 else ""
    if name not in COMMANDS:
        return Command(cid, name, data, obj, error=errors.FAILED)
    if name == APDU:
        apdu = parse_apdu(data)
        if apdu is None:
            return Command(cid, name, "", obj, error=errors.MALFORMED)
        return Command(cid, name, "", obj, apdu=apdu)
    return Command(cid, name, data.strip(), obj.strip())


class RequestParser:
    """Turns lines into requests for one connection.

    Remembers the connection's sticky reader line, the request being
    built and whether it waits for an empty line (``EMPTYLINE``).
    """

    log = Logger()

    def __init__(self, max_commands=1000):
        self.max_commands = max_commands
        self.reader = None  # (reader, password) of the last reader line
        self._pending = None
        self._carry_wait = False

    def line(self, raw):
        """Feed one line (bytes without its ``\\n``); return a complete Request or None."""
        text = raw.decode("utf-8", "replace").strip()
        if not text:
            return self._end_of_request()
        first = text[0]
        if first == ">":
            bar = text.rfind("|")
            return self._content(text[1:bar] if bar > 0 else text[1:])
        if first == "#":
            self.log.debug("client signal {signal!r}", signal=text[:200])
        return None

    def end_of_input(self):
        """Everything received so far was consumed, with no partial line:
        complete the pending request unless it waits for an empty line."""
        req = self._pending
        if req is not None and req.commands and not req.wait_for_empty_line:
            self._pending = None
            return req
        return None

    def overlong(self, prefix):
        """A line longer than the limit was dropped; ``prefix`` is its start.
        If it looks like a command line, its ID gets ``C084``."""
        text = prefix.decode("utf-8", "replace").lstrip()
        if not text.startswith(">") or ":" not in text:
            self.log.info("dropped an over-long line that is not a command")
            return None
        self.log.info("dropped an over-long command line")
        return self._add(Command(text[1:].split(":", 1)[0].strip(), "", error=errors.MALFORMED))

    def _end_of_request(self):
        req, self._pending = self._pending, None
        self._carry_wait = False
        if req is not None and req.commands:
            return req
        return None

    def _content(self, content):
        fields = content.split(":")
        n = len(fields)
        if n == 3 and fields[1] == APDU:
            # The common line, ``ID:APDU:HEX``, in one pass: what
            # make_command gives for it.
            data = fields[2]
            try:
                apdu = bytes.fromhex(data)
            except ValueError:
                apdu = parse_apdu(data)  # white space inside a byte, or not hex
            else:
                if not 4 <= len(apdu) <= MAX_APDU_BYTES:
                    apdu = None
            if apdu is None:
                return self._add(Command(fields[0].strip(), APDU, "", "", error=errors.MALFORMED))
            return self._add(Command(fields[0].strip(), APDU, "", "", apdu))
        req = self._pending
        if req is None:
            # Start of a request: a line whose second field is a known
            # command is a command line for the sticky reader (or for no
            # reader at all, which card commands answer with C083);
            # anything else is a reader line.
            if 2 <= n <= 4 and _command_name(fields[1])[0] in COMMANDS:
                return self._add(make_command(fields))
            self._start(fields)
            return None
        if n == 1:
            # A new reader line ends the current request.
            done = self._end_of_request()
            self._start(fields)
            return done
        return self._add(make_command(fields))

    def _start(self, fields):
        reader = fields[0].strip()
        password = ":".join(fields[1:]) if len(fields) > 1 else None
        self.reader = (reader, password)
        self._pending = Request(reader, password, wait_for_empty_line=self._carry_wait)

    def _add(self, command):
        req = self._pending
        if req is None:
            reader, password = self.reader if self.reader else (None, None)
            req = self._pending = Request(reader, password, wait_for_empty_line=self._carry_wait)
        if command.name == EMPTYLINE and command.error is None:
            req.wait_for_empty_line = True
            return None
        req.commands.append(command)
        if len(req.commands) >= self.max_commands:
            # Bounded memory: a request that reaches the limit runs now; the
            # commands after it form the next request on the same reader.
            self._pending = None
            self._carry_wait = req.wait_for_empty_line
            return req
        return None
