"""Logging with a process-wide level threshold, and the ``--log-format``
observers.

``--log-level`` is applied twice: at the source (``Logger.emit`` drops our
own events below the threshold before any formatting, which keeps debug
logging free on the hot path) and in the observer ``observer()`` makes,
which drops every other event below it too (Twisted's and other
libraries'), with Twisted's "Starting factory ..."/"Stopping factory ..."
lines counted as debug; only Twisted's one line per listener saying where
it listens ("LineFactory starting on 4001") is kept at every level.

``--log-format json`` writes one JSON object per line (``json_line``)::

    {"time": "2026-12-07T17:40:01.234Z", "level": "info",
     "message": "listener tcp:4001 is ready", "logger": "cloudfoxy_proxy.tap",
     "log_namespace": "cloudfoxy_proxy.tap", "listener": "tcp:4001"}

``time`` is RFC 3339 in UTC (milliseconds), ``level`` one of ``debug``,
``info``, ``warn``, ``error``, ``critical``, ``message`` the rendered line
(as the text format shows it), ``logger`` the namespace (also as
``log_namespace``, Twisted's name for it), then the event's own fields
(``peer``, ``reader``, ``frontend``...) as JSON values: a value JSON has no
type for is written as its ``repr`` (at most 500 characters).  A logged
failure adds ``traceback`` (text); a line from ``twisted.python.log``
with a system other than ``-`` adds ``system``.
"""

import json
import re
import weakref
from datetime import datetime, timezone

from twisted.application.service import Service
from twisted.logger import FileLogObserver, ILogObserver, Logger as _TwistedLogger, LogLevel, formatEvent
from twisted.logger import textFileLogObserver
from zope.interface import implementer

LEVELS = {
    "debug": LogLevel.debug,
    "info": LogLevel.info,
    "warn": LogLevel.warn,
    "warning": LogLevel.warn,
    "error": LogLevel.error,
    "critical": LogLevel.critical,
}
_ORDER = {LogLevel.debug: 0, LogLevel.info: 1, LogLevel.warn: 2, LogLevel.error: 3, LogLevel.critical: 4}
_threshold = 1


def set_level(name):
    """Set the minimum level by name (``debug``, ``info``, ``warn``, ``error``, ``critical``)."""
    global _threshold
    _threshold = _ORDER[LEVELS[name]]


def enabled(level):
    return _ORDER[level] >= _threshold


class Logger(_TwistedLogger):
    def emit(self, level, format=None, **kwargs):
        if _ORDER.get(level, 4) >= _threshold:
            super().emit(level, format, **kwargs)


class RetryLogger(Logger):
    """For ``ClientService._log``: ClientService logs every connection retry
    at info level; for us that is debug (with the peer down that would be a
    line every few seconds forever).  The owner logs the transitions between
    up and down itself, once."""

    def emit(self, level, format=None, **kwargs):
        super().emit(LogLevel.debug if level == LogLevel.info else level, format, **kwargs)


class Levels:
    """``debug``/``info``/``warn``/``error`` over ``emit``."""

    __slots__ = ()

    def debug(self, format, **fields):
        self.emit(LogLevel.debug, format, **fields)

    def info(self, format, **fields):
        self.emit(LogLevel.info, format, **fields)

    def warn(self, format, **fields):
        self.emit(LogLevel.warn, format, **fields)

    def error(self, format, **fields):
        self.emit(LogLevel.error, format, **fields)


class RateLimitedLog(Levels):
    """Log lines a client can cause, at most ``lines`` per ``period`` seconds.

    Use one instance per kind of client-caused event (refused connections,
    refused REST requests, PERSONALIZE, over-long lines...), owned by the
    object that sees the event, with that object's clock::

        self.client_log = RateLimitedLog(clock, Logger(namespace="..."))
        self.client_log.info("client {peer} personalized as {tag!r}", peer=peer, tag=tag)

    Every line should name the peer (``{peer}`` field).  ``debug``,
    ``info``, ``warn`` and ``error`` take a PEP 3101 format and keyword fields
    like ``twisted.logger.Logger``; a line below ``--log-level`` costs
    nothing and counts for nothing.  Within one period the first ``lines``
    lines are written; the rest are counted, and when the period ends one
    summary line says ``N more ... suppressed in the last P s`` (at the
    highest level among them; ``SummaryService`` writes pending summaries
    at shutdown).  So a flood writes at most ``lines + 1``
    lines per period for each instance: with the defaults (10 lines per
    10 s, lines of about 150 bytes) about 165 bytes/s.

    ``clock`` is an ``IReactorTime`` (``seconds``, ``callLater``);
    ``bind(**fields)`` returns a view that adds ``fields`` to every line and
    prefixes the format with ``client {peer}: `` when ``peer`` is one of
    them (for code that logs without knowing its peer, e.g. the parser).
    """

    def __init__(self, clock, logger=None, lines=10, period=10.0, what="client-caused log lines"):
        self.clock = clock
        self.logger = logger if logger is not None else Logger()
        self.lines = lines
        self.period = period
        self.what = what
        self._start = None  # start of the current period
        self._written = 0
        self._suppressed = 0
        self._level = None  # highest level suppressed in this period
        self._summary = None  # DelayedCall of the summary
        _limited.add(self)

    def emit(self, level, format, **fields):
        if not enabled(level):
            return
        now = self.clock.seconds()
        if self._start is None or now - self._start >= self.period:
            if self._summary is not None:
                self._summary.cancel()
                self._report()
            self._start, self._written = now, 0
        if self._written < self.lines:
            self._written += 1
            self.logger.emit(level, format, **fields)
            return
        self._suppressed += 1
        if self._level is None or _ORDER[level] > _ORDER[self._level]:
            self._level = level
        if self._summary is None:
            self._summary = self.clock.callLater(max(0.0, self._start + self.period - now), self._report)

    def _report(self):
        self._summary = None
        n, level, start = self._suppressed, self._level, self._start
        self._suppressed, self._level = 0, None
        self._start = None
        if n:
            seconds = round(min(self.period, self.clock.seconds() - start), 1)
            self.logger.emit(level, "{n} more {what} suppressed in the last {seconds:g} s",
                             n=n, what=self.what, seconds=seconds)

    def flush(self):
        """Write the pending summary now (at shutdown: ``SummaryService``)."""
        if self._summary is not None:
            self._summary.cancel()
            self._report()

    def bind(self, **fields):
        return _BoundLog(self, fields)


_limited = weakref.WeakSet()


class SummaryService(Service):
    """Writes every RateLimitedLog's pending summary when the process stops,
    so a flood just before shutdown is still counted in the log."""

    def stopService(self):
        for limited in list(_limited):
            limited.flush()
        return super().stopService()


class _BoundLog(Levels):
    """``RateLimitedLog.bind``: the same limiter, with fields added."""

    __slots__ = ("_limited", "_fields", "_prefix")

    def __init__(self, limited, fields):
        self._limited = limited
        self._fields = fields
        self._prefix = "client {peer}: " if "peer" in fields else ""

    def emit(self, level, format, **fields):
        self._limited.emit(level, self._prefix + format, **self._fields, **fields)


# -- the --log-format observers ----------------------------------------------

#: Twisted's per-factory lines (twisted.internet.protocol.Factory.doStart and
#: doStop): one pair per outgoing connection, so debug, not info.
_FACTORY_FORMATS = frozenset(("Starting factory {factory!r}", "Stopping factory {factory!r}"))
#: keys of Twisted's legacy events (twisted.python.log.msg) that are its
#: bookkeeping, not fields; ``log_*`` keys are all bookkeeping
_LEGACY_KEYS = frozenset(("message", "format", "isError", "system", "time", "failure", "why"))
_OURS = ("time", "level", "message", "logger", "log_namespace", "traceback", "system")
_REPR_LIMIT = 500


def event_level(event):
    """The level an event is written at: its ``log_level`` (info when it
    has none), debug for Twisted's factory start/stop lines."""
    if event.get("log_format") in _FACTORY_FORMATS:
        return LogLevel.debug
    return event.get("log_level") or LogLevel.info


_PORT_LINE = re.compile(r"\w+(?: \(TLS\))? starting on \d+")


def _announces_a_port(event):
    """Twisted's one line per listener saying where it listens
    (``LineFactory starting on 4001``): kept at every level, since it is
    the only place a log says which port a ``tcp:0`` listener got."""
    return event.get("log_namespace") == "log_legacy" and bool(_PORT_LINE.fullmatch(formatEvent(event)))


@implementer(ILogObserver)
class LevelFilter:
    """An ``ILogObserver`` passing to ``observer`` only the events at or
    above ``--log-level`` (``set_level``), at their ``event_level``."""

    def __init__(self, observer):
        self.observer = observer

    def __call__(self, event):
        level = event_level(event)
        if _ORDER.get(level, 4) < _threshold and not _announces_a_port(event):
            return
        if level is not event.get("log_level"):
            event = dict(event, log_level=level)
        self.observer(event)


def _plain(value):
    """``value`` if JSON writes it as it is, else its ``repr`` (bounded)."""
    try:
        json.dumps(value, allow_nan=False)
        return value
    except (TypeError, ValueError, RecursionError):
        text = repr(value)
        return text if len(text) <= _REPR_LIMIT else text[:_REPR_LIMIT] + "..."


def json_line(event):
    """One event as one line of JSON (``str``, no newline): the shape in the
    module docstring."""
    when = datetime.fromtimestamp(event.get("log_time", 0), timezone.utc)
    namespace = event.get("log_namespace", "")
    record = {
        "time": when.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        "level": event_level(event).name,
        "message": formatEvent(event),
        "logger": namespace,
        "log_namespace": namespace,
    }
    failure = event.get("log_failure")
    if failure is not None:
        try:
            record["traceback"] = failure.getTraceback()
        except Exception as e:  # a failure that cannot be shown still leaves its line
            record["traceback"] = f"(traceback unavailable: {e!r})"
    system = event.get("log_system")
    if isinstance(system, str) and system != "-":
        record["system"] = system
    legacy = namespace == "log_legacy" or "isError" in event
    for key, value in event.items():
        if key.startswith("log_") or key in _OURS or (legacy and key in _LEGACY_KEYS) or not isinstance(key, str):
            continue
        record[key] = _plain(value)
    return json.dumps(record, ensure_ascii=False, allow_nan=False)


def observer(format, out):
    """The ``--log-format`` observer (``text`` or ``json``) writing to the
    file object ``out``, filtered by ``--log-level`` (``LevelFilter``)."""
    if format == "json":
        return LevelFilter(FileLogObserver(out, lambda event: json_line(event) + "\n"))
    return LevelFilter(textFileLogObserver(out))
