"""``--trace FILE``: every card exchange of the selected readers, written as
it happens (docs/trace.md).

The pieces:

* :class:`Tracer`: the dispatcher's hook (``Dispatcher.trace``).
  ``RequestRun`` calls :meth:`Tracer.record` for each command result, the
  certificate index :meth:`Tracer.exchange` for its own APDUs.  A record is
  one tuple appended to a bounded deque on the reactor thread; nothing is
  formatted or written there.  When the deque is full the record is
  dropped and counted (:attr:`Tracer.dropped`), logged once a minute.
  Live watchers (:meth:`Tracer.watch`) get each record of their reader
  as a dict, redacted, on the reactor thread.
* :class:`TraceService`: a thread that takes what the deque holds every
  :data:`FLUSH_EVERY` seconds, formats it for each file and writes it with
  one ``write`` per file; files are reopened on SIGHUP (:meth:`reopen`).
* Formats: :class:`JsonLinesFile` (one JSON object per exchange, the
  source of ``foxyproxy-trace`` and of ``emulated:?replay=``) and
  :class:`PcapngFile` (GSMTAP SIM frames for Wireshark/tshark).
* :func:`as_dict` and :func:`read_records`: one record as the JSON object
  of a line, and the objects of a JSON-lines trace file.

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
from collections import deque
from time import perf_counter
from json.encoder import encode_basestring_ascii as _js

from twisted.application.service import Service
from twisted.internet.task import LoopingCall

from . import errors
from .apdu import SECRET_INS, SM_CLASSES, secret_span
from .logs import Logger
from .parser import APDU, RESET

#: Records held for the writer thread at most; more are dropped (counted).
MAX_BUFFER = 100000
#: Seconds between the writer thread's rounds.
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


class JsonLinesFile:
    """A trace file of JSON lines (:func:`as_dict` per exchange)."""

    binary = False

    def __init__(self, path, unredacted=False):
        self.path = path
        self.unredacted = unredacted
        self.file = None
        self._quoted = {}  # (reader, frontend, identity, peer) -> their JSON members
        self._hex = {}  # command APDU -> its hex (clients repeat their commands)

    def open(self):
        old, self.file = self.file, open_append(self.path, False)
        if old is not None:
            old.close()

    def write(self, records):
        """One line per record, formatted by hand (what :func:`as_dict`
        gives, as compact JSON): json.dumps of a dict costs several times
        more, and this runs for every APDU while tracing."""
        unredacted = self.unredacted
        quoted = self._quoted
        if len(quoted) > 10000:
            quoted.clear()
        hexes = self._hex
        if len(hexes) > 4096:
            hexes.clear()
        out = []
        for when, reader, frontend, identity, peer, event, command, result, seconds in records:
            names = quoted.get((reader, frontend, identity, peer))
            if names is None:
                names = quoted[(reader, frontend, identity, peer)] = (
                    f'"reader":{_js(reader)},"frontend":{_js(frontend)},'
                    f'"identity":{"null" if identity is None else _js(identity)},"peer":{_js(peer)}')
            head = f'{{"time":"{_utc(when)}",{names},"event":'
            if event == RESET:
                key = "result" if result in errors.MEANING else "atr"
                out.append(f'{head}"reset","ms":{seconds * 1000:.3f},"{key}":"{result}"}}\n')
                continue
            hidden = ""
            if not unredacted and len(command) > 4 and (
                    command[1] in SECRET_INS or command[0] in SM_CLASSES):  # secret_span's own test, inline
                command, n = redacted(command)
                if n:
                    hidden = f',"redacted":{n}'
            key = "result" if result in errors.MEANING else "response"
            text = hexes.get(command)
            if text is None:
                text = hexes[command] = command.hex().upper()
            out.append(f'{head}"apdu","ms":{seconds * 1000:.3f},"command":"{text}"'
                       f'{hidden},"{key}":"{result}"}}\n')
        self.file.write("".join(out))
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
    a well-formed APDU.  The pcapng blocks are dpkt's; a file reopened
    (or appended to) gets a new pcapng section, which readers accept."""

    binary = True

    def __init__(self, path, unredacted=False):
        import dpkt.pcapng  # only when a pcapng trace is asked for

        self._pcapng = dpkt.pcapng
        self.path = path
        self.unredacted = unredacted
        self.file = None
        self.writer = None

    def open(self):
        old, self.file = self.file, open_append(self.path, True)
        self.writer = self._pcapng.Writer(self.file, snaplen=0xFFFF, linktype=LINKTYPE_IPV4)
        self.file.flush()
        if old is not None:
            old.close()

    def write(self, records):
        frames = []
        for r in records:
            command, result = r[6], r[7]
            if r[5] != APDU or errors.is_error(result):
                continue
            if not self.unredacted and len(command) > 4 and (
                    command[1] in SECRET_INS or command[0] in SM_CLASSES):  # secret_span's own test, inline
                span = secret_span(command)
                if span is not None:
                    start, n = span
                    command = command[:start] + bytes(n) + command[start + n:]
            frames.append((r[0], gsmtap_frame(command + bytes.fromhex(result))))
        if frames:
            self.writer.writepkts(frames)
            self.file.flush()

    def close(self):
        if self.file is not None:
            self.file.close()
            self.file = self.writer = None


_GSMTAP = struct.pack(">BBBBHbbIBBBB", GSMTAP_VERSION, 4, GSMTAP_TYPE_SIM, 0, 0, 0, 0, 0,
                      GSMTAP_SIM_APDU, 0, 0, 0)  # hdr_len 4 words; no timeslot, ARFCN, frame number


_IP = struct.Struct(">BBHHHBBH4s4s")
_UDP = struct.Struct(">HHHH")
_LOOPBACK = b"\x7f\0\0\1"


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
    ``unredacted``: live watchers get secrets too (``--trace-unredacted``)."""

    log = Logger()

    def __init__(self, patterns=(), unredacted=False, max_buffer=MAX_BUFFER):
        self.patterns = list(patterns)
        self.unredacted = unredacted
        self.max_buffer = max_buffer
        self.queue = deque()
        self.dropped = 0
        self.files = 0  # TraceServices writing the queue (0: records go to watchers only)
        self.watchers = {}  # reader name -> [callables taking a record dict]
        self._selected = {}  # Reader -> bool
        #: wall-clock time minus perf_counter: records take one clock reading
        self.wall = time.time() - perf_counter()

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
        The hot path of tracing: a few attribute reads and one append."""
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
                  identity.name if identity is not None and identity.__class__ is not str else None,
                  session.peer, name, command.apdu, value, seconds)
        queue = self.queue
        if self.files:
            if len(queue) < self.max_buffer:
                queue.append(record)
            else:
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
        if self.files:
            queue = self.queue
            if len(queue) >= self.max_buffer:
                self.dropped += 1
            else:
                queue.append(record)
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
    """Writes ``tracer``'s records to ``files`` (:func:`trace_file`) from a
    thread of its own; logs dropped records at most once a minute on
    ``clock``; :meth:`reopen` (SIGHUP) opens the files again."""

    log = Logger()

    def __init__(self, tracer, files, clock, flush_every=FLUSH_EVERY):
        self.tracer = tracer
        self.files = list(files)
        self.clock = clock
        self.flush_every = flush_every
        self._stop = threading.Event()
        self._reopen = False
        self._thread = None
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
        self._warn = LoopingCall(self.warn_dropped)
        self._warn.clock = self.clock
        self._warn.start(DROP_WARN_EVERY, now=False)

    def stopService(self):
        Service.stopService(self)
        self.tracer.files -= 1
        if self._warn is not None and self._warn.running:
            self._warn.stop()
        self._stop.set()
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

    def _run(self):
        queue = self.tracer.queue
        stop = self._stop
        while True:
            stopping = stop.wait(self.flush_every)
            self.flush(queue)
            if stopping:
                return

    def flush(self, queue=None):
        """Write what the queue holds now (the writer thread's round)."""
        queue = self.tracer.queue if queue is None else queue
        if self._reopen:
            self._reopen = False
            for f in self.files:
                try:
                    f.open()
                except OSError as e:
                    self._say(f"trace: cannot reopen {f.path}: {e.strerror}; still writing the old file")
        n = len(queue)
        if not n:
            return
        pop = queue.popleft
        records = [pop() for _ in range(n)]
        for f in self.files:
            try:
                f.write(records)
            except Exception as e:  # the writer thread goes on whatever happens
                self._say(f"trace: cannot write {f.path}: {e!r}")

    def _say(self, text):
        """Log ``text`` from the writer thread, at most once a minute."""
        now = time.monotonic()
        if now < self._quiet_until:
            return
        self._quiet_until = now + DROP_WARN_EVERY
        self.clock.callFromThread(self.log.error, "{text}", text=text)
