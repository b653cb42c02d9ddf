"""What every front end is built from: the :class:`Core` it is given and the
:class:`Listener` it listens with.

A front end (``interfaces.IFrontend``) turns its typed settings into one
service with ``make_service(settings, core)``; ``tap.makeService`` builds
the core once and then loops over the configured front ends
(``frontends.TABLE``).  Front ends import this module and the core
(``dispatch``, ``limits``, ``access``…), never ``tap``.
"""

import sys

import attr
from twisted.application.internet import StreamServerEndpointService
from twisted.internet.error import CannotListenError
from zope.interface import implementer

from ..interfaces import IFrontend
from ..twisted_internals import raise_listen_errors


class FrontendStats:
    """Counters of one front end (``line``, ``rest``...), read by
    ``--metrics``.  Any object with these five attributes can stand for a
    front end."""

    __slots__ = ("connections", "requests", "auth_failures", "bytes_in", "bytes_out")

    def __init__(self):
        self.connections = 0  # open now
        self.requests = 0
        self.auth_failures = 0
        self.bytes_in = 0
        self.bytes_out = 0


class Listener(StreamServerEndpointService):
    """A listening endpoint that fails start-up with one clear line naming
    the endpoint and the option that gave it (e.g. ``cannot listen on
    tcp:4001 (--api): Address already in use``) instead of a traceback.

    ``on_start`` (callables) run once it listens; ``on_stop`` run first
    when it stops, e.g. to answer a front end's held requests before the
    drain."""

    def __init__(self, endpoint, factory, description, option=None):
        super().__init__(endpoint, factory)
        self.description = description
        self.option = option
        self.on_start = []
        self.on_stop = []
        raise_listen_errors(self)

    def privilegedStartService(self):
        try:
            super().privilegedStartService()
        except CannotListenError as e:
            reason = getattr(e.socketError, "strerror", None) or str(e.socketError)
            self._fail(reason)
        except Exception as e:  # e.g. a TLS key file that cannot be read
            self._fail(str(e) or e.__class__.__name__)

    def startService(self):
        super().startService()
        for start in self.on_start:
            start()

    def stopService(self):
        for stop in self.on_stop:
            stop()
        return super().stopService()

    def _fail(self, reason):
        option = f" ({self.option})" if self.option else ""
        sys.stderr.write(f"twistd foxyproxy: cannot listen on {self.description}{option}: {reason}\n")
        sys.stderr.flush()
        raise SystemExit(1)


@implementer(IFrontend)
class OneListener:
    """An IFrontend with one listener, given by the option ``option`` (an
    endpoint string): ``settings`` is one ``settings_of(options)`` when the
    option is given, none otherwise; ``listeners`` names its endpoint."""

    name = option = None

    def settings(self, options):
        return [self.settings_of(options)] if options.get(self.option) else []

    def settings_of(self, options):
        raise NotImplementedError

    def listeners(self, settings):
        return [(settings.endpoint, "--" + self.option)]


@attr.s(kw_only=True, eq=False)
class Core:
    """What a front end is given: the parts of the process it may use.

    * ``reactor``: the reactor (an ``IReactorTime`` as the clock, and the
      endpoint reactor);
    * ``dispatcher``: runs requests (``dispatch.Dispatcher``); its
      ``access`` (``access.Access``) and ``audit`` (``audit.AuditLog`` or
      None) are the process's identities and audit trail, and
      ``Dispatcher.identify`` is the one access check;
    * ``registry``: the readers (``registry.ReaderRegistry``);
    * ``limits``: connection limits and the buffer budget shared by every
      listener (``limits.ConnectionLimits``);
    * ``service``: the service tree's top (``ops.ProxyService``);
    * ``backends``: the IBackend objects in order (a front end may add one:
      ``add_backend``);
    * ``stats``: front-end name -> counters (``metrics.FrontendStats``:
      connections, requests, auth_failures, bytes_in, bytes_out), read by
      ``--metrics`` at scrape time;
    * ``readiness``: ``ops.Readiness`` (``/readyz``);
    * ``header_timeout``: seconds an HTTP client has to send a whole
      request head (``--header-timeout``), and a balancer a PROXY header;
    * ``proxy_from``: the networks (``ipaddress``) whose connections may
      start with a PROXY header on ``haproxy:`` listeners
      (``--proxy-protocol-from``; ``proxy_protocol.py``).
    """

    # (the parts are not in the repr: they are large, and some hold secrets)
    reactor = attr.ib(repr=False)
    dispatcher = attr.ib(repr=False)
    registry = attr.ib(repr=False)
    limits = attr.ib(repr=False)
    service = attr.ib(repr=False)
    backends = attr.ib(factory=list, repr=False)
    stats = attr.ib(factory=dict, repr=False)
    readiness = attr.ib(default=None, repr=False)
    header_timeout = attr.ib(default=10.0, converter=float)
    proxy_from = attr.ib(default=None, repr=False)

    @property
    def access(self):
        return self.dispatcher.access

    @property
    def clock(self):
        return self.reactor

    def counters(self, name, counters=None):
        """The counters of the front end ``name`` (``counters`` when given,
        else a new FrontendStats), registered for metrics."""
        if counters is None:
            counters = self.stats.get(name) or FrontendStats()
        self.stats[name] = counters
        return counters

    def add_backend(self, backend):
        """Serve ``backend``'s readers like any configured backend's."""
        from ..backends.service import BackendService

        self.backends.append(backend)
        BackendService(backend, self.registry).setServiceParent(self.service)

    def listen(self, description, factory, option):
        """A Listener on the endpoint string ``description`` (given by the
        command-line ``option``) serving ``factory``'s connections under
        the shared limits.  ``haproxy:DESCRIPTION`` reads a PROXY header
        first (``proxy_protocol.py``): the front end sees the client's
        address."""
        from twisted.internet.endpoints import serverFromString
        from twisted.internet.interfaces import IProtocolNegotiationFactory

        from .. import proxy_protocol
        from ..tls import half_closing, negotiate_alpn

        behind_balancer, inner = proxy_protocol.strip_prefix(description)
        endpoint = half_closing(serverFromString(self.reactor, inner))
        negotiate_alpn(endpoint, factory.acceptableProtocols()
                       if IProtocolNegotiationFactory.providedBy(factory) else ())
        if behind_balancer:
            trusted = self.proxy_from
            if trusted is None:
                trusted = proxy_protocol.trusted_networks(proxy_protocol.DEFAULT_TRUSTED)
            endpoint = proxy_protocol.proxy_endpoint(endpoint, trusted, self.reactor, self.header_timeout,
                                                     self.limits.client_log, self.limits)
        return Listener(endpoint, self.limits.wrap(factory), description, option)
