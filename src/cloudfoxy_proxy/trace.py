"""``--trace FILE``: every card exchange of the selected readers, written as
it happens (docs/trace.md).

The pieces:

* :class:`Tracer`: the dispatcher's hook (``Dispatcher.trace``).
  ``RequestRun`` calls :meth:`Tracer.record` for each command result, the
  certificate index :meth:`Tracer.exchange` for its own APDUs; an APDU
  answered at once (no metrics) comes from ``RequestRun``'s own hot path
  through :meth:`Tracer.answered`.  A record's fields are appended to a
  bounded flat list on the reactor thread (one ``extend``, so no object
  per record outlives the call and tracing gives the garbage collector
  no work).  When the list is full the record is dropped and counted
  (:attr:`Tracer.dropped`), logged once a minute.
  Live watchers (:meth:`Tracer.watch`) get each record of their reader
  as a dict, redacted, on the reactor thread.
* :class:`TraceService`: every :data:`FLUSH_EVERY` seconds the reactor
  formats what the list holds for each file in one loop per file, and a
  thread of its own writes each file's text with one ``write`` (the GIL
  is released while the disk works: a slow disk delays the writer, never
  the card); files are reopened on SIGHUP (:meth:`reopen`).
* Formats: :class:`JsonLinesFile` (one JSON object per exchange, the
  source of ``foxyproxy-trace`` and of ``emulated:?replay=``) and
  :class:`PcapngFile` (GSMTAP SIM frames for Wireshark/tshark).
* :func:`as_dict` and :func:`read_records`: one record as the JSON object
  of a line, and the objects of a JSON-lines trace file.
* :func:`records_of`: the record tuples of the queue's flat fields.

A record tuple is ``(time, reader, frontend, identity, peer, event,
command, result, seconds)``: ``time`` wall-clock seconds (float),
``reader`` the canonical reader name, ``frontend`` (``line``, ``rest``,
``api``, ``ram``, ``vpcd``, ``signing`` for the proxy's own certificate
probes), ``identity`` (a name or None), ``peer`` (``host:port`` or ""),
``event`` (``APDU`` or ``RESET``), ``command`` (the command APDU, bytes;
None for RESET), ``result`` (the response APDU or ATR in upper-case hex,
or a result code such as ``C086``), ``seconds`` (float: since the command
began, its wait for the card included).
"""

import fnmatch
import json
import os
import struct
import threading
import time
from math import floor
from time import perf_counter
from json.encoder import encode_basestring_ascii as _js

from twisted.application.service import Service
from twisted.internet.task import LoopingCall

from . import errors
from .access import Identity
from .apdu import SECRET_INS, SM_CLASSES, secret_span
from .logs import Logger
from .parser import APDU, RESET

#: Records each file holds for the writer thread at most; more are dropped (counted).
MAX_BUFFER = 100000
#: Fields of a record (the module docstring's tuple) in :attr:`Tracer.queue`.
FIELDS = 9
#: Seconds between the rounds that format and write the records.
FLUSH_EVERY = 0.05
#: Seconds between warnings about dropped records.
DROP_WARN_EVERY = 60.0

#: GSMTAP (osmocom's pseudo-header, version 2) in UDP to its IANA port.
GSMTAP_PORT = 4729
GSMTAP_VERSION = 2
GSMTAP_TYPE_SIM = 4
GSMTAP_SIM_APDU = 0
#: pcapng link type of the frames: raw IPv4 (LINKTYPE_IPV4).
LINKTYPE_IPV4 = 228


def redacted(command, unredacted=False):
    """``(command, hidden)``: the command APDU (bytes) as a trace keeps it
    and how many data bytes it left out — the data field of a command
    ``apdu.secret_span`` names, cut out (its Lc/Le stay) — or the command
    and 0 (``unredacted``, or nothing secret)."""
    if unredacted or command is None:
        return command, 0
    span = secret_span(command)
    if span is None:
        return command, 0
    start, n = span
    return command[:start] + command[start + n:], n


def as_dict(record, unredacted=False):
    """One record (the tuple of this module's docstring) as the JSON object
    of its line: ``time`` (UTC, ISO 8601 with microseconds), ``reader``,
    ``frontend``, ``identity``, ``peer``, ``event`` (``apdu``/``reset``),
    ``ms`` (float), then for an APDU ``command`` (hex; ``redacted``: the
    number of data bytes left out of it) and ``response`` (hex), for a
    RESET ``atr``; a command that got a result code instead has
    ``result`` (e.g. ``C086``)."""
    when, reader, frontend, identity, peer, event, command, result, seconds = record
    out = {"time": _utc(when), "reader": reader, "frontend": frontend, "identity": identity,
           "peer": peer, "event": "reset" if event == RESET else "apdu", "ms": round(seconds * 1000, 3)}
    if event != RESET:
        shown, hidden = redacted(command, unredacted)
        out["command"] = shown.hex().upper()
        if hidden:
            out["redacted"] = hidden
    if errors.is_error(result):
        out["result"] = result
    else:
        out["atr" if event == RESET else "response"] = result
    return out


_second = [None, ""]


def _utc(when):
    """``2026-12-07T17:29:18.115818Z`` (the second's text cached)."""
    whole = int(when)
    if _second[0] != whole:
        _second[0], _second[1] = whole, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole))
    return f"{_second[1]}.{int((when - whole) * 1e6):06d}Z"


def records_of(fields):
    """The records (tuples) of ``fields``, a flat list of :data:`FIELDS`
    fields a record (:attr:`Tracer.queue`).  One tuple object is reused
    while nothing else holds it (``zip``): unpack each record, as the
    writers' loops do, and the batch allocates nothing per record."""
    return zip(*(iter(fields),) * FIELDS)


def read_records(lines):
    """The objects of a JSON-lines trace (an iterable of text lines);
    ValueError naming the line for one that is not a trace record."""
    for n, line in enumerate(lines, 1):
        line = line.strip()
        if not line:
            continue
        try:
            record = json.loads(line)
        except ValueError:
            raise ValueError(f"line {n} is not JSON") from None
        if not isinstance(record, dict) or record.get("event") not in ("apdu", "reset"):
            raise ValueError(f"line {n} is not a trace record (no event apdu/reset)")
        yield record


def open_append(path, binary):
    """``path`` opened for appending, created with mode 0600 (an existing
    file is set to 0600 too: a trace holds card data)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        os.fchmod(fd, 0o600)
    except OSError:
        pass  # not ours: appending is still allowed
    return os.fdopen(fd, "ab" if binary else "a", **({} if binary else {"encoding": "utf-8"}))


#: "000" to "999": the digits of a number below 1000, three of them.
_DIGITS = tuple(f"{n:03d}" for n in range(1000))
#: "0.000" to "0.999": a duration below 1 ms in microseconds, as milliseconds.
_SUB_MS = tuple(f"0.{n:03d}" for n in range(1000))


class JsonLinesFile:
    """A trace file of JSON lines: :func:`as_dict` per exchange, as compact
    JSON, one object a line (UTF-8; every non-ASCII character escaped).

    :meth:`lines` formats a batch of records by hand: json.dumps of a dict
    costs several times more, and this runs for every APDU while tracing.
    What repeats is cached: the ``reader`` to ``command`` members of each
    (reader, front end, identity, peer, command), the text of the second,
    and the end of a line with a short response."""

    binary = False

    def __init__(self, path, unredacted=False):
        self.path = path
        self.unredacted = unredacted
        self.file = None
        #: (reader, frontend, identity, peer) -> [its last command APDU, its :meth:`_middle`]
        self._names = {}
        #: (reader, frontend, identity, peer, command APDU) -> :meth:`_middle` (clients repeat their commands)
        self._middles = {}
        self._tails = {}  # a short response or result code -> :meth:`_tail`
        self._second = (None, "")  # (whole second, its '{"time":"...' text)

    def open(self):
        old, self.file = self.file, open_append(self.path, False)
        if old is not None:
            old.close()

    def lines(self, records):
        """``records`` (tuples of this module's docstring) as their lines
        (one str, a newline after each line)."""
        names_of = self._names
        if len(names_of) > 10000:
            names_of.clear()
        tails = self._tails
        if len(tails) > 4096:
            tails.clear()
        digits, sub_ms = _DIGITS, _SUB_MS
        second, head = self._second
        last, tail = None, None  # the last response and its line end (mostly 9000 again)
        out = []
        add = out.extend  # the pieces of every line in one list, joined once: no str per line
        # the caches are keyed so that no key hashes a new object (a command
        # or response is a new object each time; names are the same objects)
        for when, reader, frontend, identity, peer, event, command, result, seconds in records:
            try:
                names = names_of[reader, frontend, identity, peer]  # [last command, its middle]
            except KeyError:
                names = names_of[reader, frontend, identity, peer] = [b"", None]
            if names[0] == command:
                middle = names[1]
            else:
                middle = self._middle(reader, frontend, identity, peer, event, command)
                if event == APDU and middle[2]:
                    names[0], names[1] = command, middle
            whole = floor(when)  # floor: cheaper than int() on a float, the same for a time
            if second != whole:
                second, head = whole, time.strftime('{"time":"%Y-%m-%dT%H:%M:%S.', time.gmtime(whole))
            # the microseconds and milliseconds as digits from tables: several
            # times cheaper than formatting the numbers
            us = floor((when - whole) * 1e6)
            took = floor(seconds * 1e6 + 0.5)
            if result != last or event != APDU:
                tail = tails.get(result) if event == APDU else None
                if tail is None:
                    tail = self._tail(event, result)
                last = result if event == APDU else None
            add((head, digits[us // 1000], digits[us % 1000], middle[0],
                 sub_ms[took] if took < 1000 else f"{took // 1000}.{digits[took % 1000]}", middle[1], tail))
        self._second = second, head
        return "".join(out)

    def _middle(self, reader, frontend, identity, peer, event, command):
        """The text of a line around its ``ms`` value: ``('Z",' and the
        ``reader`` to ``ms`` members, the ``command`` member with
        ``redacted`` when data was left out, True when it may be cached)``;
        cached (per names and command) unless it hid a secret."""
        key = (reader, frontend, identity, peer, command)
        middle = self._middles.get(key)
        if middle is not None:
            return middle
        names = (f'Z","reader":{_js(reader)},"frontend":{_js(frontend)},'
                 f'"identity":{"null" if identity is None else _js(identity)},"peer":{_js(peer)},"event":')
        if event == RESET:
            return names + '"reset","ms":', "", False
        shown, hidden = redacted(command, self.unredacted)
        if hidden:
            return names + '"apdu","ms":', f',"command":"{shown.hex().upper()}","redacted":{hidden}', False
        if len(self._middles) > 10000:
            self._middles.clear()
        middle = self._middles[key] = names + '"apdu","ms":', f',"command":"{command.hex().upper()}"', True
        return middle

    def _tail(self, event, result):
        """The last member of a line, ``"response"``, ``"atr"`` or
        ``"result"`` (a result code), and its end; an APDU's cached when
        ``result`` is short (status words, result codes: they repeat)."""
        kind = ("result" if len(result) == 4 and result in errors.MEANING
                else "atr" if event == RESET else "response")
        tail = f',"{kind}":"{result}"}}\n'
        if event == APDU and len(result) <= 16:
            self._tails[result] = tail
        return tail

    def format(self, records):
        """``records`` as the text :meth:`put` appends (:meth:`lines`)."""
        return self.lines(records)

    def put(self, text):
        """Append ``text`` (:meth:`format`) with one write."""
        self.file.write(text)
        self.file.flush()

    def close(self):
        if self.file is not None:
            self.file.close()
            self.file = None


class PcapngFile:
    """A pcapng trace: one frame per APDU exchange, IPv4/UDP to port 4729
    holding a GSMTAP v2 header of type SIM (4), sub-type APDU (0), and the
    command APDU followed by its response APDU — what Wireshark's GSM SIM
    dissector decodes (``ISO/IEC 7816-4 SELECT ...`` with the status
    word's meaning).  Resets and commands answered with a result code are
    not written (the dissector has no frame for them; the JSON-lines
    format keeps them).  Redacted data bytes are zeros, so the frame stays
    a well-formed APDU.

    The blocks, little-endian, as "PCAP Next Generation (pcapng) Capture
    File Format" (IETF draft-ietf-opsawg-pcapng) defines them: each
    :meth:`open` writes a Section Header Block (§4.1: version 1.0, section
    length -1 = not given) and one Interface Description Block (§4.2: link
    type 228 = raw IPv4, snap length 65535, no options: timestamps in
    microseconds), so a file reopened (or appended to) starts a new
    section, which readers accept; each frame is an Enhanced Packet Block
    (§4.3: interface 0, the timestamp in microseconds as two 32-bit
    halves, high first, captured = original length, data padded to 32
    bits, no options).  :meth:`frames` builds them from the parts cached
    per payload length (:func:`_epb_heads`)."""

    binary = True

    def __init__(self, path, unredacted=False):
        self.path = path
        self.unredacted = unredacted
        self.file = None
        self._heads = {}  # payload length -> (EPB type+length+interface, lengths+IP+UDP+GSMTAP, padding+length)

    def open(self):
        old, self.file = self.file, open_append(self.path, True)
        self.file.write(_SHB + _IDB)
        self.file.flush()
        if old is not None:
            old.close()

    def frames(self, records):
        """``records`` (tuples of this module's docstring) as their
        Enhanced Packet Blocks (one bytes); a RESET or a result code has
        no frame."""
        heads_of = self._heads
        if len(heads_of) > 4096:
            heads_of.clear()
        unredacted = self.unredacted
        meaning = errors.MEANING
        stamp = _TIMESTAMP
        out = []
        add = out.extend
        last = response = None  # the last response (mostly 9000 again) and its bytes
        for when, _reader, _frontend, _identity, _peer, event, command, result, _seconds in records:
            if event != APDU:
                continue
            if result != last:  # a new object each time: compared, not hashed, when it repeats
                if len(result) == 4 and result in meaning:
                    continue
                last, response = result, bytes.fromhex(result)
            if not unredacted and len(command) > 4 and (
                    command[1] in SECRET_INS or command[0] in SM_CLASSES):  # secret_span's own test, inline
                span = secret_span(command)
                if span is not None:
                    start, n = span
                    command = command[:start] + bytes(n) + command[start + n:]
            n = len(command) + len(response)
            heads = heads_of.get(n)
            if heads is None:
                heads = heads_of[n] = _epb_heads(n)
            us = floor(when * 1e6 + 0.5)  # rounded; floor: cheaper than round() or int()
            add((heads[0], stamp(us >> 32, us & 0xFFFFFFFF), heads[1], command, response, heads[2]))
        return b"".join(out)

    def format(self, records):
        """``records`` as the bytes :meth:`put` appends (:meth:`frames`)."""
        return self.frames(records)

    def put(self, frames):
        """Append ``frames`` (:meth:`format`) with one write."""
        self.file.write(frames)
        self.file.flush()

    def close(self):
        if self.file is not None:
            self.file.close()
            self.file = None


_GSMTAP = struct.pack(">BBBBHbbIBBBB", GSMTAP_VERSION, 4, GSMTAP_TYPE_SIM, 0, 0, 0, 0, 0,
                      GSMTAP_SIM_APDU, 0, 0, 0)  # hdr_len 4 words; no timeslot, ARFCN, frame number


_IP = struct.Struct(">BBHHHBBH4s4s")
_UDP = struct.Struct(">HHHH")
_LOOPBACK = b"\x7f\0\0\1"
#: IPv4 + UDP + GSMTAP header bytes in front of a frame's payload.
_HEADERS = 20 + 8 + len(_GSMTAP)

#: pcapng Section Header Block (§4.1): type, length 28, byte-order magic,
#: version 1.0, section length -1 (not given), length again.
_SHB = struct.pack("<IIIHHqI", 0x0A0D0D0A, 28, 0x1A2B3C4D, 1, 0, -1, 28)
#: pcapng Interface Description Block (§4.2): type 1, length 20, link
#: type, reserved, snap length, length again; no options.
_IDB = struct.pack("<IIHHII", 1, 20, LINKTYPE_IPV4, 0, 0xFFFF, 20)
#: An Enhanced Packet Block's (§4.3) bytes besides its padded data: type,
#: length, interface, timestamp high and low, captured and original
#: length (7 x 4) and the length again at its end.
_EPB_OVERHEAD = 7 * 4 + 4
_TIMESTAMP = struct.Struct("<II").pack


def _epb_heads(n):
    """The parts of an Enhanced Packet Block around a payload of ``n``
    bytes that are the same in every such frame: (type, length and
    interface; captured and original length, IPv4, UDP and GSMTAP headers;
    padding and the length again)."""
    captured = _HEADERS + n
    padded = (captured + 3) & ~3
    total = _EPB_OVERHEAD + padded
    return (struct.pack("<III", 6, total, 0),
            struct.pack("<II", captured, captured) + gsmtap_frame(bytes(n))[:_HEADERS],
            bytes(padded - captured) + struct.pack("<I", total))


def _ip_checksum_base():
    words = struct.unpack(">10H", _IP.pack(0x45, 0, 0, 0, 0, 64, 17, 0, _LOOPBACK, _LOOPBACK))
    return sum(words)


#: The IPv4 header's one's-complement sum without its total length field.
_IP_SUM = _ip_checksum_base()


def gsmtap_frame(payload):
    """An IPv4 packet 127.0.0.1 -> 127.0.0.1, UDP 4729 -> 4729, carrying
    the 16-byte GSMTAP header (version 2, type SIM, sub-type APDU) and
    ``payload`` (command APDU then response APDU)."""
    udp_length = 8 + len(_GSMTAP) + len(payload)
    total = 20 + udp_length
    s = _IP_SUM + total
    s = (s & 0xFFFF) + (s >> 16)
    s = (s & 0xFFFF) + (s >> 16)
    return b"".join((_IP.pack(0x45, 0, total, 0, 0, 64, 17, ~s & 0xFFFF, _LOOPBACK, _LOOPBACK),
                     _UDP.pack(GSMTAP_PORT, GSMTAP_PORT, udp_length, 0), _GSMTAP, payload))


def trace_file(path, unredacted=False):
    """The trace file for ``path``: pcapng when it ends ``.pcapng``, else JSON lines."""
    kind = PcapngFile if path.lower().endswith(".pcapng") else JsonLinesFile
    return kind(path, unredacted)


class Tracer:
    """The hook the dispatcher calls (``Dispatcher.trace``); see the module
    docstring.  ``patterns``: reader-name globs (none: every reader);
    ``unredacted``: live watchers get secrets too (``--trace-unredacted``);
    ``max_buffer``: records held for the writer at most."""

    log = Logger()

    def __init__(self, patterns=(), unredacted=False, max_buffer=MAX_BUFFER):
        self.patterns = list(patterns)
        self.unredacted = unredacted
        self._files = 0
        self.max_buffer = max_buffer
        #: the fields of the records the writer thread has not taken yet,
        #: :data:`FIELDS` a record, flat (see the module docstring); a list,
        #: not a deque: the writer takes them with a slice and a slice deletion
        self.queue = []
        self.dropped = 0
        self.watchers = {}  # reader name -> [callables taking a record dict]
        self._selected = {}  # Reader -> bool
        #: wall-clock time minus perf_counter: records take one clock reading
        self.wall = time.time() - perf_counter()

    @property
    def max_buffer(self):
        return self._max_buffer

    @max_buffer.setter
    def max_buffer(self, records):
        self._max_buffer = records
        self._room = records * FIELDS if self._files else 0  # the queue's length at most

    @property
    def files(self):
        """TraceServices writing the queue (0: records go to live watchers only)."""
        return self._files

    @files.setter
    def files(self, n):
        self._files = n
        self.max_buffer = self._max_buffer

    def traces(self, reader):
        """True when ``reader`` (a registry Reader) is traced."""
        selected = self._selected.get(reader)
        if selected is None:
            name = reader.name
            selected = not self.patterns or any(fnmatch.fnmatchcase(name, p) for p in self.patterns)
            if len(self._selected) > 10000:
                self._selected.clear()
            self._selected[reader] = selected
        return selected

    def record(self, run, value):
        """``run`` (a run.RequestRun, ``i`` at the command) got ``value``
        (its result line); keeps it when it is a RESET or APDU that ran on
        a traced card.  Moves ``run.started`` on when metrics do not.
        (An APDU answered at once without metrics comes through
        :meth:`answered` instead.)"""
        command = run.request.commands[run.i]
        name = command.name
        if (name != APDU and name != RESET) or not run.holding or command.error is not None:
            return  # not a card command, not on the card (refused, queued), or not parsed
        reader = run.reader
        selected = self._selected.get(reader)
        if selected is None:
            selected = self.traces(reader)
        if not selected:
            return
        now = perf_counter()
        seconds = now - run.started
        if run.d.metrics is None:
            run.started = now
        identity = run.identity
        session = run.session
        record = (now + self.wall, reader.name, session.frontend,
                  identity.name if identity.__class__ is Identity else None,
                  session.peer, name, command.apdu, value, seconds)
        queue = self.queue
        if len(queue) < self._room:  # no room while no file is written (files == 0)
            queue.extend(record)
        elif self.files:
            self.dropped += 1
        if self.watchers:
            self._tell(record)

    def answered(self, run, reader, command, response):
        """The hot path of tracing, from ``RequestRun``'s own (no metrics):
        ``run`` holding ``reader`` got ``response`` (the response APDU,
        upper-case hex) to ``command`` (the command APDU, bytes); kept when
        ``reader`` is traced, and ``run.started`` moves on."""
        if self._selected.get(reader) or self.traces(reader):
            now = perf_counter()
            identity = run.identity
            session = run.session
            record = (now + self.wall, reader.name, session.frontend,
                      identity.name if identity.__class__ is Identity else None,  # or None, or a result code
                      session.peer, APDU, command, response, now - run.started)
            run.started = now
            queue = self.queue
            if len(queue) < self._room:  # no room while no file is written (files == 0)
                queue.extend(record)
            elif self._files:
                self.dropped += 1
            if self.watchers:
                self._tell(record)

    def exchange(self, reader, frontend, command, result, seconds):
        """An APDU the proxy sent itself (``frontend`` says who, e.g.
        ``signing``): ``command`` bytes, ``result`` bytes or a result code."""
        if self.traces(reader):
            self.add((perf_counter() + self.wall, reader.name, frontend, None, "", APDU, command,
                      result.hex().upper() if isinstance(result, bytes) else result, seconds))

    def follow(self, d, reader, frontend, command):
        """Record the exchange of ``command`` once ``d`` (a Deferred of the
        response bytes) fires; ``d``'s result passes through unchanged."""
        if not self.traces(reader):
            return
        started = perf_counter()

        def done(result):
            if isinstance(result, bytes):
                value = result
            else:  # a Failure
                value = result.value.code if isinstance(result.value, errors.CardError) else errors.UPSTREAM
            self.exchange(reader, frontend, command, value, perf_counter() - started)
            return result

        d.addBoth(done)

    def add(self, record):
        """Keep one record (the module docstring's tuple) for the writer,
        or drop and count it when ``max_buffer`` are waiting; tell live
        watchers."""
        queue = self.queue
        if len(queue) < self._room:  # no room while no file is written (files == 0)
            queue.extend(record)
        elif self.files:
            self.dropped += 1
        if self.watchers:
            self._tell(record)

    def _tell(self, record):
        watchers = self.watchers.get(record[1])
        if watchers:
            shown = as_dict(record, self.unredacted)
            for watcher in list(watchers):
                try:
                    watcher(shown)
                except Exception:
                    self.log.failure("trace watcher failed")

    def watch(self, reader_name, watcher):
        """Call ``watcher(record_dict)`` (:func:`as_dict`, redacted unless
        ``--trace-unredacted``) for every exchange on the reader named
        ``reader_name`` that is traced; returns a function that stops it."""
        self.watchers.setdefault(reader_name, []).append(watcher)

        def stop():
            watchers = self.watchers.get(reader_name)
            if watchers and watcher in watchers:
                watchers.remove(watcher)
                if not watchers:
                    del self.watchers[reader_name]

        return stop


class TraceService(Service):
    """Writes ``tracer``'s records to ``files`` (:func:`trace_file`):
    every ``flush_every`` seconds the reactor formats what the queue holds
    (:meth:`format`), and a thread of its own writes it (the GIL is
    released while the disk works: a slow disk delays the writer, never
    the card); logs dropped records at most once a minute on ``clock``;
    :meth:`reopen` (SIGHUP) opens the files again.

    The records are formatted on the reactor thread, which made them,
    rather than in the writer thread: a batch read where it is still in
    the cache, and objects freed by the thread that allocated them, cost
    the process less CPU than every record crossing to the other core."""

    log = Logger()

    def __init__(self, tracer, files, clock, flush_every=FLUSH_EVERY):
        self.tracer = tracer
        self.files = list(files)
        self.clock = clock
        self.flush_every = flush_every
        self._stop = threading.Event()
        self._wake = threading.Event()  # formatted chunks are waiting
        #: batches formatted, not written yet: ([(file, chunk)], records)
        #: (appended by the reactor, taken by the writer with a slice)
        self._pending = []
        self._writing = threading.Lock()  # one writer of the files at a time: the thread or flush()
        self._reopen = False
        self._thread = None
        self._format = None
        self._warn = None
        self._warned_dropped = 0
        self._quiet_until = 0.0
        for f in self.files:
            f.open()  # now: a file that cannot be opened stops start-up

    def startService(self):
        Service.startService(self)
        self.tracer.files += 1
        self._thread = threading.Thread(target=self._run, name="foxyproxy-trace", daemon=True)
        self._thread.start()
        self._format = LoopingCall(self.format)
        self._format.clock = self.clock
        self._format.start(self.flush_every, now=False)
        self._warn = LoopingCall(self.warn_dropped)
        self._warn.clock = self.clock
        self._warn.start(DROP_WARN_EVERY, now=False)

    def stopService(self):
        Service.stopService(self)
        self.tracer.files -= 1
        for call in (self._format, self._warn):
            if call is not None and call.running:
                call.stop()
        self.format()
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(10)
        if self._thread is None or not self._thread.is_alive():
            self.flush()  # what came after the thread's last round
        self.warn_dropped()
        for f in self.files:
            f.close()

    def reopen(self):
        """Open the files again at the writer's next round (after logrotate moved them)."""
        self._reopen = True

    def warn_dropped(self):
        dropped = self.tracer.dropped
        if dropped != self._warned_dropped:
            self.log.warn("trace: {n} records dropped since the last warning (the trace files are "
                          "written too slowly; {total} in all)", n=dropped - self._warned_dropped,
                          total=dropped)
            self._warned_dropped = dropped

    def format(self):
        """The reactor's round: what the queue holds now, formatted for each
        file and left for the writer thread.  When the writer has
        ``tracer.max_buffer`` records still to write (a slow disk), these
        records are dropped and counted instead."""
        tracer = self.tracer
        queue = tracer.queue
        n = len(queue)  # whole records: each went in with one extend
        if not n:
            return
        fields = queue[:n]
        del queue[:n]
        records = n // FIELDS
        if sum(waiting for _chunks, waiting in self._pending[:]) + records > tracer.max_buffer:
            tracer.dropped += records
            return
        chunks = []
        for f in self.files:
            try:
                chunk = f.format(records_of(fields))
            except Exception as e:  # a bug: the other files and the card go on
                self._say(f"trace: cannot format records for {f.path}: {e!r}")
                continue
            if chunk:
                chunks.append((f, chunk))
        self._pending.append((chunks, records))
        self._wake.set()

    def _run(self):
        stop, wake = self._stop, self._wake
        while True:
            wake.wait(self.flush_every)
            wake.clear()
            stopping = stop.is_set()
            self.write()
            if stopping:
                return

    def flush(self):
        """Format and write what the queue holds now, and every batch not
        written yet, in the calling thread."""
        self.format()
        self.write()

    def write(self):
        """Write the formatted batches (the writer thread's round), one
        write per file and batch; first open the files again if
        :meth:`reopen` asked.  Taking the batches (and the reactor thread
        taking the records) is a slice and a slice deletion of a list,
        each atomic under the GIL, as are the reactor thread's ``append``
        of a batch and ``extend`` of a record's fields, so neither waits
        for the other."""
        with self._writing:
            if self._reopen:
                self._reopen = False
                for f in self.files:
                    try:
                        f.open()
                    except OSError as e:
                        self._say(f"trace: cannot reopen {f.path}: {e.strerror}; still writing the old file")
            pending = self._pending
            n = len(pending)
            batches = pending[:n]
            del pending[:n]
            for chunks, _records in batches:
                for f, chunk in chunks:
                    try:
                        f.put(chunk)
                    except Exception as e:  # the writer thread goes on whatever happens
                        self._say(f"trace: cannot write {f.path}: {e!r}")

    def _say(self, text):
        """Log ``text`` (from either thread), at most once a minute."""
        now = time.monotonic()
        if now < self._quiet_until:
            return
        self._quiet_until = now + DROP_WARN_EVERY
        self.clock.callFromThread(self.log.error, "{text}", text=text)
