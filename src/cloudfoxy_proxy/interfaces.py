"""The interfaces of the core: ``IBackend`` (what every card source implements),
``IFrontend`` (what every way in implements), ``ReaderInfo`` (one reader a
backend reports) and the attrs validator ``provides``.

The service that starts and stops a backend is ``backends/service.py``.
"""

import attr
from zope.interface import Attribute, Interface


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

    Optionally a backend that fronts another queue (an upstream proxy, a
    CloudFoxy server) has ``transmit_batch(key, steps)``: ``steps`` is a
    list of ``("RESET", None)`` and ``("APDU", command_bytes)``, to run
    back to back on the card (as one upstream request); it returns (or
    gives a Deferred for) a list with one result per step: the ATR or
    response APDU as bytes, or a CardError for that step.  Raising or
    errbacking a CardError fails every step with its code.  The dispatcher
    uses it for a request's run of two or more RESET/APDU commands, bounded
    by the command timeout times the number of steps.

    Optionally a backend that fronts another proxy's cards has
    ``hold(key, idle_timeout, lost)``, used by every card session
    (``sessions.CardSession``, whatever front end opened it) once this
    proxy granted it the card: hold the card there too, so that the other
    proxy's other clients are kept off it (docs/tcp.md "Card sessions
    through a front").  It returns (or raises a CardError instead of) a
    Deferred firing with a held card -- an object with ``reset``,
    ``transmit`` and ``transmit_batch`` as here (the session's card
    commands then go to it), ``release()`` (the session ended),
    ``set_idle_timeout(seconds)`` (the session's idle timeout changed: keep
    the card there as long) and ``description`` -- or with None when the source cannot hold cards (the
    session is then held on this proxy only), or failing with a CardError
    (``C086``: no turn there, unreachable).  ``idle_timeout`` is the
    session's (seconds, None: none); ``lost(why)`` is called if the held
    card is lost before ``release()`` (the session then ends).

    Optionally a backend that fronts another proxy has
    ``for_client(session, identity)``: called right before each
    ``reset``/``transmit``/``transmit_batch`` (and SIGN's commands) made
    for a client's request, with its ``dispatch.Session`` and
    ``access.Identity`` (or None), so that the upstream learns on whose
    behalf it runs (the tcp:// backend's CLIENT, relay.py).  Calls without
    it before them are the proxy's own.

    The dispatcher checks every result (:func:`bad_result`): a response
    APDU of 2..65,538 bytes, an ATR of 2..33 bytes; anything else reaches
    the client as ``C086``.  Backends pass on what their source gave them
    and need no checks of their own.
    """

    description = Attribute("A short human description for logs, e.g. 'emulated: 4 cards'.")

    def start(registry):
        """Begin serving.  Report readers with ``registry.update(self, infos)``
        now and again whenever the set changes.  May return a Deferred.
        Raising ValueError means a configuration error (the proxy refuses
        to start); any other failure is retried (see BackendService)."""

    def stop():
        """Stop, releasing threads and connections.  May return a Deferred."""

    def reset(key):
        """Reset the card in reader ``key``; the ATR as bytes."""

    def transmit(key, apdu):
        """Send the command APDU (bytes) to reader ``key``; the response APDU as bytes."""


class IFrontend(Interface):
    """A way in for clients: the line protocol, CloudFoxy REST, the JSON API,
    RAMOverHTTP, the vpcd bridge, metrics/status...

    A front end never talks to a backend: it turns its wire protocol into
    requests for ``core.dispatcher`` (``frontends.base.Core``), whose
    ``identify`` is the one access check.  ``tap.makeService`` imports a
    front end's module only when its option is given (``frontends.TABLE``),
    then calls ``settings`` and, for each settings object, ``make_service``.
    """

    name = Attribute("The front end's name: in --credentials ``frontends``, audit lines, metrics labels.")

    def settings(options):
        """Typed settings (attrs instances) from the validated command-line
        options (a dict-like ``tap.Options``): one per service to build,
        none when the front end is not configured."""

    def make_service(settings, core):
        """An ``IService`` serving one ``settings`` with ``core``
        (``frontends.base.Core``); a listener is a ``frontends.base.Listener``
        from ``core.listen``, so its connections count in the shared limits."""

    def listeners(settings):
        """``[(endpoint description, option)]``: where ``settings`` listens
        for clients (the start-up warning about listeners reachable from
        outside loopback without authentication names them)."""


#: A response APDU: at most 65,536 data bytes (extended Le, ISO 7816-4
#: 5.1) and SW1 SW2.
MAX_RESPONSE = 65538
#: An ATR: TS and T0 at least, 33 bytes at most (ISO 7816-3 8.2.1).
MIN_ATR, MAX_ATR = 2, 33


def bad_result(value, atr):
    """Why ``value`` (a backend's answer to a RESET when ``atr``, else to an
    APDU) cannot go to a client, or None when it can."""
    if not isinstance(value, bytes):
        return f"a {type(value).__name__} instead of bytes"
    n = len(value)
    if atr:
        if not MIN_ATR <= n <= MAX_ATR:
            return f"an ATR of {n} bytes (ISO 7816-3: {MIN_ATR}..{MAX_ATR})"
    elif not 2 <= n <= MAX_RESPONSE:
        return f"a response APDU of {n} bytes (2..{MAX_RESPONSE}: data and SW1 SW2)"
    return None


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


def settle(d, results, batch):
    """Fire ``d``, the Deferred of one backend call answered by ``results``
    (one per step, bytes or a CardError): the whole list for a
    ``transmit_batch`` call (``batch``), else the one result, a CardError
    as the call's failure."""
    if batch:
        d.callback(results)
    elif isinstance(results[0], Exception):
        d.errback(results[0])
    else:
        d.callback(results[0])
