"""``BackendService``: starts and stops one backend (an ``IBackend``, see
``interfaces.py``) with the application, retrying a failed start."""

import sys

import attr
from twisted.application.service import Service
from twisted.internet.defer import maybeDeferred
from twisted.python.failure import Failure

from ..interfaces import IBackend, provides
from ..logs import Logger


@attr.s(eq=False)
class BackendService(Service):
    """Starts and stops one backend with the application.

    A start that raises ValueError is a configuration error: one line on
    stderr and the proxy exits (status 1).  Any other failed start is a
    runtime error: the backend is shown as not ready (``ready`` False, one
    warning per attempt) and started again after a back-off doubling from
    RETRY_MIN up to RETRY_MAX seconds, never given up.  ``clock``: an
    IReactorTime (default: the reactor).
    """

    backend = attr.ib(validator=provides(IBackend))
    registry = attr.ib()
    clock = attr.ib(default=None)
    ready = attr.ib(init=False, default=False)
    _failures = attr.ib(init=False, default=0)
    _retry = attr.ib(init=False, default=None)
    log = Logger()

    RETRY_MIN = 1.0
    RETRY_MAX = 60.0

    def startService(self):
        Service.startService(self)
        if self.clock is None:
            from twisted.internet import reactor

            self.clock = reactor
        self.log.info("starting backend {backend}", backend=self.backend.description)
        try:
            result = self.backend.start(self.registry)
        except ValueError as e:
            sys.stderr.write(f"twistd foxyproxy: backend {self.backend.description}: {e}\n")
            sys.stderr.flush()
            raise SystemExit(1)
        except Exception:
            self._failed(Failure())
            return None
        return maybeDeferred(lambda: result).addCallbacks(self._started, self._failed)

    def _attempt(self):
        self._retry = None
        if not self.running:
            return None
        return maybeDeferred(self.backend.start, self.registry).addCallbacks(
            self._started, self._failed)

    def _started(self, _):
        self.ready = True
        if self._failures:
            self.log.info("backend {backend} started (after {n} failed attempts)",
                          backend=self.backend.description, n=self._failures)
        self._failures = 0

    def _failed(self, failure):
        self.ready = False
        if not self.running:
            return
        self._failures += 1
        delay = min(self.RETRY_MAX, self.RETRY_MIN * 2 ** min(self._failures - 1, 16))
        why = failure.getErrorMessage() or failure.type.__name__
        self.log.warn("backend {backend} is not ready: starting it failed ({why}); "
                      "trying again in {delay:g}s", backend=self.backend.description,
                      why=f"{failure.type.__name__}: {why}" if failure.type.__name__ not in why else why,
                      delay=delay)
        # Undo whatever the failed start did before trying again.
        maybeDeferred(self.backend.stop).addErrback(lambda f: None)
        self._retry = self.clock.callLater(delay, self._attempt)

    def stopService(self):
        Service.stopService(self)
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        self._retry = None
        return maybeDeferred(self.backend.stop)
