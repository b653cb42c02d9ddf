"""Logging with a process-wide level threshold.

twistd owns the log observers, so ``--log-level`` is applied at the source:
``Logger.emit`` drops events below the threshold before any formatting,
which also keeps debug logging free on the hot path.
"""

import weakref

from twisted.application.service import Service
from twisted.logger import Logger as _TwistedLogger, LogLevel

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
