"""Logging with a process-wide level threshold.

twistd owns the log observers, so ``--log-level`` is applied at the source:
``Logger.emit`` drops events below the threshold before any formatting,
which also keeps debug logging free on the hot path.
"""

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
