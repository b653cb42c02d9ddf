"""The interface every card source implements, and the service that runs one."""

import attr
from twisted.application.service import Service
from twisted.internet.defer import maybeDeferred
from zope.interface import Attribute, Interface

from .logs import Logger


class IBackend(Interface):
    """A source of cards: emulated, local PC/SC, CloudFoxy REST, a TCP upstream.

    ``reset`` and ``transmit`` return their result directly when they can
    (the fast path: no Deferred is made) or a Deferred for it.  A failure is
    a raised or errbacked :class:`cloudfoxy_proxy.errors.CardError` carrying
    the result code for the client; anything else is treated as a bug
    (``C090``).  The caller bounds every call with the command timeout and
    cancels the Deferred when it expires, and never calls a backend for a
    card that is still busy with a previous command.

    Optionally a backend has ``release(key)``: called when a request is done
    with the card (after its last command), e.g. to end a PC/SC transaction
    that spans the request.
    """

    description = Attribute("A short human description for logs, e.g. 'emulated: 4 cards'.")

    def start(registry):
        """Begin serving.  Report readers with ``registry.update(self, infos)``
        now and again whenever the set changes.  May return a Deferred."""

    def stop():
        """Stop, releasing threads and connections.  May return a Deferred."""

    def reset(key):
        """Reset the card in reader ``key``; the ATR as bytes."""

    def transmit(key, apdu):
        """Send the command APDU (bytes) to reader ``key``; the response APDU as bytes."""


@attr.s(slots=True, frozen=True)
class ReaderInfo:
    """What a backend says about one of its readers.

    ``key`` is the backend's own handle for it; ``name`` the preferred
    display name (the registry makes it unique); ``aliases`` other names a
    reader line may use; ``present`` whether a card is in it.
    """

    key = attr.ib()
    name = attr.ib()
    aliases = attr.ib(default=(), converter=tuple)
    present = attr.ib(default=True)
    atr = attr.ib(default=None)


def provides(interface):
    """An attrs validator: the value provides ``interface``."""

    def validate(inst, attribute, value):
        if not interface.providedBy(value):
            raise TypeError(f"{attribute.name} must provide {interface.__name__}: {value!r}")

    return validate


@attr.s(eq=False)
class BackendService(Service):
    """Starts and stops one backend with the application."""

    backend = attr.ib(validator=provides(IBackend))
    registry = attr.ib()
    log = Logger()

    def startService(self):
        Service.startService(self)
        self.log.info("starting backend {backend}", backend=self.backend.description)
        d = maybeDeferred(self.backend.start, self.registry)
        d.addErrback(
            lambda f: self.log.failure("backend {backend} failed to start", f,
                                       backend=self.backend.description)
        )
        return d

    def stopService(self):
        Service.stopService(self)
        return maybeDeferred(self.backend.stop)
