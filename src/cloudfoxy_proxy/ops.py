"""Running as a service: readiness, systemd notification, draining on
stop, reopening logs on SIGHUP and the ``--log-format`` observer.

See docs/deployment.md for how these fit a systemd unit.
"""

import collections
import gc
import os
import signal
import socket
import sys

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import MultiService, Service
from twisted.internet.defer import Deferred, DeferredList, maybeDeferred
from twisted.internet.task import LoopingCall
from twisted.logger import ILogObserver
from twisted.python import logfile

from . import errors, logs
from .logs import Logger
from .twisted_internals import forget_exit_signal, listening

log = Logger()


def sd_notify(state, environ=os.environ):
    """Send ``state`` (e.g. ``"READY=1"``) to systemd's ``NOTIFY_SOCKET``;
    False when there is none or it cannot be reached.

    The protocol is one datagram on a unix socket (sd_notify(3); a name
    starting with ``@`` is in the abstract namespace).  Written here in a
    few lines rather than depending on a package: the pure-Python
    ``sdnotify`` package is these same few lines,
    and ``systemd-python`` needs libsystemd's headers and a compiler to
    install.
    """
    path = environ.get("NOTIFY_SOCKET")
    if not path:
        return False
    if path.startswith("@"):
        path = "\0" + path[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.connect(path)
            s.sendall(state.encode("utf-8"))
        return True
    except OSError as e:
        log.warn("cannot notify systemd at {path}: {error}", path=environ.get("NOTIFY_SOCKET"),
                 error=e.strerror)
        return False


def name_inherited_sockets(environ=os.environ):
    """Name socket-activated descriptors that came without names.

    sd_listen_fds_with_names(3): when ``LISTEN_FDNAMES`` is not set (e.g.
    ``systemd-socket-activate`` without ``--fdname``), each descriptor's
    name is ``unknown``.  Twisted's ``systemd:`` endpoint instead drops
    every descriptor whose name is missing, so this sets the default names
    before Twisted reads the environment (when ``twisted.internet.endpoints``
    is first imported; Options() runs before that under twistd).
    """
    if environ.get("LISTEN_FDNAMES") is not None or environ.get("LISTEN_PID") != str(os.getpid()):
        return
    try:
        count = int(environ.get("LISTEN_FDS", ""))
    except ValueError:
        return
    environ["LISTEN_FDNAMES"] = ":".join(["unknown"] * count)


#: Seconds after the proxy is first ready that the memory start-up freed
#: goes back to the operating system (:func:`release_memory`).
RELEASE_AFTER = 1.0


def release_memory():
    """Give the heap memory that start-up used and freed (imports, parsing,
    the first probes) back to the operating system: a collection, then
    glibc's ``malloc_trim(0)`` (nothing elsewhere).  An idle proxy holds
    about 1 MB less."""
    gc.collect()
    try:
        import ctypes

        ctypes.CDLL(None).malloc_trim(0)
    except (ImportError, OSError, AttributeError):  # not glibc
        pass


class Readiness:
    """Ready once every backend has reported its readers at least once
    (for backends with an ``up`` property or method: reported while up,
    e.g. a REST backend's first inventory rather than its empty
    placeholder) and every listener of ``top`` listens.  ``reasons()`` lists what is missing (empty when
    ready); ``on_ready`` callbacks run once, the first time it is.

    Upstream proxies (backends with an ``upstream_state``: ``tcp://``,
    ``tls://``) are counted instead, *now*: at least ``min_upstreams``
    (``--ready-min-upstreams``) of them must be ``"up"`` and list readers,
    so one owner down or silent does not take a front out of its
    balancer while others serve (and N says how many must).

    ``checks``: more callables, each returning a list of reasons (strings)
    that hold *now*, e.g. ``audit.AuditLog.reasons`` (records being lost):
    unlike a backend's first report, these can make a ready proxy not
    ready again, and ready once they pass.  ``stopping`` (set on SIGTERM
    for ``--drain-announce``): a reason of its own while the proxy still
    serves.

    ``upstream_tier`` (True for a front whose upstreams come and go: an
    ``etcd://`` watch, or ``tcp://`` upstreams at start-up that SIGHUP may
    drop): the upstream rule holds even while it has no upstream at all, so
    a front whose owners all left is not ready (else it would be, with no
    reader to serve)."""

    upstream_tier = False

    def __init__(self, top, registry, backends, clock, poll=0.1, min_upstreams=1):
        self.top = top
        self.registry = registry
        self.backends = backends
        self.clock = clock
        self.min_upstreams = min_upstreams
        self.stopping = None  # a reason while announcing the stop
        self.ready = False
        self._reported = set()  # id() of backends that have reported their readers
        self._callbacks = []
        self.checks = []
        self._loop = LoopingCall(self.check)
        self._loop.clock = clock
        self._poll = poll
        registry.add_listener(lambda _registry: self.check())

    def on_ready(self, callback):
        self._callbacks.append(callback)

    def start(self):
        if not self._loop.running:
            self._loop.start(self._poll, now=True)

    def stop(self):
        if self._loop.running:
            self._loop.stop()

    def reasons(self):
        missing = [self.stopping] if self.stopping else []
        upstreams = [b for b in self.backends if hasattr(b, "upstream_state")]
        if upstreams or self.upstream_tier:
            missing.extend(self.upstream_reasons(upstreams))
        for backend in self.backends:
            if id(backend) in self._reported or hasattr(backend, "upstream_state"):
                continue
            up = getattr(backend, "up", True)  # a property (tcp://, cloudfoxy+http://) or a method
            if callable(up):
                up = up()
            if self.registry.reported(backend) and up:
                self._reported.add(id(backend))  # at least once is enough
            else:
                missing.append(f"backend {backend.description} has not reported its readers")
        for service in self.listeners():
            if not listening(service):
                missing.append(f"listener {getattr(service, 'description', service.endpoint)} "
                               "is not listening")
        for check in self.checks:
            missing.extend(check())
        return missing

    def upstream_reasons(self, upstreams):
        """[] when at least ``min_upstreams`` of ``upstreams`` are up and
        list readers, else one reason naming each that is not."""
        listed = collections.Counter(id(r.backend) for r in self.registry.readers)
        serving, others = 0, []
        for backend in upstreams:
            state = backend.upstream_state
            if state == "up" and listed[id(backend)]:
                serving += 1
            else:
                others.append(f"{getattr(backend, 'where', backend.description)} {state if state != 'up' else 'lists no readers'}")
        if serving >= self.min_upstreams:
            return []
        return [f"{serving} of {len(upstreams)} upstreams up with readers, "
                f"--ready-min-upstreams {self.min_upstreams} needed" + (f" ({', '.join(others)})" if others else "")]

    def listeners(self):
        found = []
        stack = [self.top]
        while stack:
            service = stack.pop()
            if isinstance(service, StreamServerEndpointService):
                found.append(service)
            elif isinstance(service, MultiService):
                stack.extend(service)
        return found

    def check(self):
        if self.ready or not self.top.running:
            return
        if not self.reasons():
            self.ready = True
            self.stop()
            log.info("ready: every listener listens and every backend has reported")
            callbacks, self._callbacks = self._callbacks, []
            for callback in callbacks:
                callback()


class ProxyService(MultiService):
    """The service tree's top: on stop, first announces it for
    ``drain_announce`` seconds (``/readyz`` answers 503 while everything
    still serves, so a balancer's health check sends new clients
    elsewhere; a second SIGTERM ends the announcement at once), then stops
    every listener, lets requests in flight finish for up to
    ``drain_timeout`` seconds, answers the rest ``C086``, then stops the
    backends and everything else.  Tells systemd READY=1 / STOPPING=1,
    and reopens the log file on SIGHUP when ``logfile`` (a
    twisted.python.logfile.LogFile) is set."""

    def __init__(self, clock, drain_timeout=5.0, drain_announce=0.0):
        super().__init__()
        self.clock = clock
        self.drain_timeout = drain_timeout
        self.drain_announce = drain_announce
        #: installs a signal handler (``_on_signal``; tests replace it)
        self.on_signal = _on_signal
        #: the frontends.base.Core every front end was built with (tap.py)
        self.core = None
        self.dispatcher = None
        self.readiness = None
        self.logfile = None
        self.observer = None
        #: more things to reopen on SIGHUP (callables), e.g. an audit log
        self.reopeners = []

    def setServiceParent(self, parent):
        # twistd's application asks its components for a log observer
        # (twisted.application.app.AppLogger.start) before it starts logging.
        if self.observer is not None and hasattr(parent, "setComponent"):
            parent.setComponent(ILogObserver, self.observer)
        super().setServiceParent(parent)

    def startService(self):
        # the handlers first: once a listener listens, a client (logrotate) may
        # send SIGHUP, whose default action would end the process
        if self.logfile is not None or self.reopeners:
            _on_signal(signal.SIGHUP, self.reopen_logs)
        if self.logfile is not None:
            _on_signal(signal.SIGUSR1, self.logfile.rotate)  # as twistd's own observer does
        super().startService()
        if self.readiness is not None:
            self.readiness.on_ready(lambda: sd_notify("READY=1"))
            self.readiness.on_ready(self._release_later)
            self.readiness.start()

    _release = None

    def _release_later(self):
        self._release = self.clock.callLater(RELEASE_AFTER, release_memory)

    def reopen_logs(self):
        """SIGHUP: open the log file again (after logrotate moved it), and
        whatever else registered in ``reopeners``."""
        if self.logfile is not None:
            self.logfile.reopen()
            log.info("reopened log file {path}", path=self.logfile.path)
        for reopen in self.reopeners:
            try:
                reopen()
            except Exception:
                log.failure("reopening on SIGHUP failed")

    def stopService(self):
        sd_notify("STOPPING=1")
        if self.readiness is not None:
            self.readiness.stop()
        if self._release is not None and self._release.active():
            self._release.cancel()
        if self.drain_announce > 0 and self.readiness is not None:
            return self._announce().addCallback(lambda _: self._stop_listeners())
        return self._stop_listeners()

    def _announce(self):
        """``/readyz`` 503 for ``drain_announce`` seconds while every
        listener still serves; a second SIGTERM cuts it short."""
        seconds = self.drain_announce
        self.readiness.stopping = f"stopping: the drain begins in {seconds:g}s (--drain-announce)"
        log.info("stopping: /readyz answers 503 for {s:g}s while every client is still served; "
                 "then the drain", s=seconds)
        done = Deferred()
        timer = self.clock.callLater(seconds, done.callback, None)

        def now():
            if timer.active():
                timer.cancel()
                log.info("stopping: a second SIGTERM ends the announcement; draining now")
                done.callback(None)

        self.on_signal(signal.SIGTERM, now)  # the reactor is stopping already: twistd's handler has done its part
        return done

    def _stop_listeners(self):
        listeners = [s for s in self if isinstance(s, StreamServerEndpointService) and s.running]
        d = DeferredList([maybeDeferred(s.stopService) for s in listeners])
        d.addCallback(lambda _: self._drain())
        d.addCallback(lambda _: self._stop_rest())
        return d

    def _drain(self):
        """Read no new requests, let those in flight finish (up to
        drain_timeout), answer the rest C086, then close every client
        connection once its answers are written."""
        dispatcher = self.dispatcher
        clients = client_connections(self.clock)
        for transport in clients:
            transport.pauseProducing()  # requests not read yet stay unread: never half-run
        done = Deferred()
        deadline = self.clock.seconds() + self.drain_timeout
        if dispatcher is not None and dispatcher.pending:
            log.info("stopping: {n} requests in flight; waiting up to {s}s for them",
                     n=len(dispatcher.pending), s=self.drain_timeout)

        def poll():
            if dispatcher is not None and dispatcher.pending:
                if self.clock.seconds() < deadline:
                    self.clock.callLater(0.02, poll)
                    return
                log.warn("stopping: answering {n} unfinished requests {code}",
                         n=len(dispatcher.pending), code=errors.UPSTREAM)
                dispatcher.give_up(errors.UPSTREAM)
            closing = client_connections(self.clock)
            for transport in closing:
                closer = getattr(transport.protocol, "loseConnection", None)  # TLS: close_notify
                if closer is None:
                    # FIN once the answers are written; a client still sending
                    # sees a clean end of its answers before the socket closes
                    closer = getattr(transport, "loseWriteConnection", transport.loseConnection)
                closer()
            wait_closed(closing, self.clock.seconds() + 1.0)

        def wait_closed(closing, until):
            if any(t.connected for t in closing) and self.clock.seconds() < until:
                self.clock.callLater(0.02, wait_closed, closing, until)
            else:
                done.callback(None)

        poll()
        return done

    def _stop_rest(self):
        # twistd re-raises the signal that stopped the reactor once it has
        # run down (the process then dies of SIGTERM); the stop here is
        # orderly, so the process exits 0 instead, as a drained service should.
        forget_exit_signal(self.clock, signal.SIGTERM)
        Service.stopService(self)
        return DeferredList([maybeDeferred(s.stopService) for s in reversed(list(self)) if s.running])


def client_connections(reactor):
    """Connections that clients made to our listeners (not our own
    connections to upstreams), from the reactor's IReactorFDSet."""
    from twisted.internet import tcp, unix

    if not hasattr(reactor, "getReaders"):
        return []
    found = {}
    for selectable in list(reactor.getReaders()) + list(reactor.getWriters()):
        if isinstance(selectable, (tcp.Server, unix.Server)) and selectable.connected:
            found[id(selectable)] = selectable
    return list(found.values())


def _on_signal(signum, callback):
    from twisted.internet import reactor

    signal.signal(signum, lambda *_: reactor.callFromThread(callback))


def log_observer(format, twistd_options):
    """The observer for ``--log-format`` (``text`` or ``json``) writing
    where twistd would (its ``--logfile``, else stdout under ``-n``), and
    the LogFile it writes (None for stdout), for SIGHUP.  None, None when
    twistd was told to use another observer (``--logger``, ``--syslog``)."""
    if twistd_options is None or twistd_options.get("logger") or twistd_options.get("syslog"):
        return None, None
    name = twistd_options.get("logfile")
    if name == "-" or (twistd_options.get("nodaemon") and not name):
        out, lf = sys.stdout, None
    else:
        lf = out = logfile.LogFile.fromFullPath(name or "twistd.log")
    return logs.observer(format, out), lf

