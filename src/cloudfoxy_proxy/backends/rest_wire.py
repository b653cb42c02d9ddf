"""The wire of ``cloudfoxy+http(s)://`` (see ``rest.py``): CloudFoxy's
REST paths and limits, the pure parsers of its answers (docs/rest.md
"Readers" and "Commands") and the HTTP plumbing under treq (bounded body
reads, failure descriptions, TLS policy, one-server endpoint factory)."""

import re
from urllib.parse import quote

import attr
from twisted.internet import error as ierror
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Protocol
from twisted.web import client as wclient
from twisted.web.http import PotentialDataLoss
from twisted.web.iweb import IAgentEndpointFactory, IPolicyForHTTPS
from zope.interface import implementer

from .. import errors
from ..errors import CardError
from . import MAX_NAME, tls_material

BASIC = "/api/v1/basic"
INVENTORY = "/api/v1/inventory"
HELLO = "/api/v1/hello"

#: Tries of one command while the card's answer says "hardware error" (SW1 C0).
HW_TRIES = 3
#: Idle persistent connections are closed after this many seconds, well
#: before servers usually drop them, so a request never races the server
#: closing an idle connection (such a request could not be safely retried).
IDLE_TIMEOUT = 20.0
#: Largest body accepted: an extended response APDU in hex is ~128 KiB.
MAX_BODY = 1024 * 1024
#: Bytes of an inventory line per card: a name, white space, an ATR in hex.
INVENTORY_BYTES_PER_CARD = MAX_NAME + 2 + 2 * 33 + 2
#: How soon to ask again while the first inventory has not come (doubles up to ``poll``).
FIRST_RETRY = 0.5

_HEX = re.compile(r"[0-9A-Fa-f]*\Z")
#: Characters left as they are in query values (terminal names are ``/IP@id``).
_SAFE = "/@:"
_PLAIN = re.compile(r"[0-9A-Za-z/@:._~-]*\Z")  # values quote() would leave as they are


def quote_value(value):
    """A query value percent-encoded, except the characters of ``_SAFE``."""
    return value if _PLAIN.match(value) else quote(value, safe=_SAFE)


# --- parsing of the server's answers (pure) --------------------------------

def body_lines(body):
    """The result lines of a body: ``null`` and empty lines are ignored."""
    text = body.decode("utf-8", "replace") if isinstance(body, bytes) else body
    return [line.strip() for line in text.splitlines() if line.strip() and line.strip() != "null"]


def parse_hex(line, what):
    """``line`` (hex, white space allowed) as bytes; CardError(C086) if it is not."""
    text = "".join(line.split())
    if len(text) % 2 or not _HEX.match(text):  # lengths: the dispatcher checks them
        raise CardError(errors.UPSTREAM, f"malformed {what} {line[:80]!r}")
    return bytes.fromhex(text)


def looks_like_atr(token):
    token = token.upper()
    return len(token) >= 4 and len(token) % 2 == 0 and token[:2] in ("3B", "3F") and bool(_HEX.match(token))


def parse_inventory(body, limit=None):
    """``[(native_name, atr_or_None)]`` from ``/api/v1/inventory``: one card a
    line, ``/IP@id`` optionally followed by white space and the ATR.  With
    ``limit``: ``(cards, more)``, the first ``limit`` cards and how many
    lines were left unread (counted, not parsed)."""
    cards = []
    seen = set()
    text = body.decode("utf-8", "replace") if isinstance(body, bytes) else body
    room = 2 * limit + 64 if limit is not None else -1
    while text is not None:
        # Split no further than needed: lines past the limit are only counted.
        lines = text.split("\n", room)
        text = lines.pop() if len(lines) > room >= 0 else None
        for i, line in enumerate(lines):
            line = line.strip()
            if not line or line == "null":
                continue
            if limit is not None and len(cards) >= limit:
                more = sum(1 for rest in lines[i:] if rest.strip() not in ("", "null"))
                return cards, more + (text.count("\n") + 1 if text is not None else 0)
            name, atr = line, None
            parts = line.rsplit(None, 1)
            if len(parts) == 2 and looks_like_atr(parts[1]):
                name, atr = parts[0].strip(), bytes.fromhex(parts[1])
            if name not in seen:
                seen.add(name)
                cards.append((name, atr))
    return cards if limit is None else (cards, 0)


def parse_uptime(body):
    """The server's uptime in seconds: line 2, second token, of ``/api/v1/hello``."""
    lines = body_lines(body)
    try:
        return int(lines[1].split()[1])
    except (IndexError, ValueError):
        raise CardError(errors.UPSTREAM, f"malformed hello {' | '.join(lines)[:120]!r}") from None


def hardware_error(line, reset):
    """True when the first answer line reports a CloudFoxy hardware error:
    SW1 ``C0`` of a response APDU (for a reset, a bare ``C0xx`` status
    instead of an ATR; an ATR never starts with ``C0``)."""
    text = "".join(line.split()).upper()
    if reset:
        return len(text) == 4 and text.startswith("C0")
    return text[-4:-2] == "C0"


def foxy_name(native):
    """The name foxyproxy 2.10 shows for a CloudFoxy terminal (its
    ``encode_cf_reader``): ``/IP@id`` -> ``Foxy NET IP-id``."""
    if native.startswith("/") and native.find("@") > 1:
        return "Foxy NET " + native[1:].replace("@", "-")
    return "Foxy USB " + native


# --- HTTP plumbing -----------------------------------------------------------

def request_url(text):
    """``text`` as the URL to give treq: a str, or for an IPv6 literal host
    (``http://[::1]:8081/...``) a hyperlink EncodedURL whose ``to_uri()``
    leaves the host alone (hyperlink IDNA-encodes every host, which fails
    on the colons: hyperlink issue #188)."""
    if "://[" not in text:
        return text
    from hyperlink import EncodedURL

    class _LiteralHostURL(EncodedURL):
        def to_uri(self):
            host = self.host
            return EncodedURL.to_uri(self.replace(host="ip-literal.invalid")).replace(host=host)

    return _LiteralHostURL.from_text(text)


class _Body(Protocol):
    """Collects a response body; the Deferred's cancel aborts the transfer
    (treq's own ``content()`` cannot be cancelled)."""

    def __init__(self, limit):
        self.limit = limit
        self.chunks = []
        self.size = 0
        self.deferred = Deferred(self._cancel)

    def dataReceived(self, data):
        self.size += len(data)
        if self.size > self.limit:
            d, self.deferred = self.deferred, None
            self.transport.stopProducing()
            if d is not None and not d.called:
                d.errback(CardError(errors.UPSTREAM, f"response body over {self.limit} bytes"))
            return
        self.chunks.append(data)

    def connectionLost(self, reason):
        d, self.deferred = self.deferred, None
        if d is None or d.called:
            return
        if reason.check(wclient.ResponseDone, PotentialDataLoss):
            d.callback(b"".join(self.chunks))
        else:
            d.errback(reason)

    def _cancel(self, d):
        self.deferred = None
        if self.transport is not None:
            self.transport.stopProducing()


def read_body(response, limit=MAX_BODY):
    """A cancellable Deferred for the whole body of ``response``."""
    collector = _Body(limit)
    d = collector.deferred
    response.deliverBody(collector)
    return d


def describe(failure):
    """A short human reason for a failed HTTP exchange (for one log line)."""
    value = failure.value
    reasons = getattr(value, "reasons", None)
    if reasons:
        return "; ".join(_reason(r) for r in reasons)
    if isinstance(value, ierror.ConnectionRefusedError):
        return "connection refused"
    if isinstance(value, ierror.ConnectError):
        return f"cannot connect ({value})"
    text = str(value) or type(value).__name__
    return f"{type(value).__name__}: {text}" if type(value).__name__ not in text else text


def _reason(failure):
    """One inner failure of a twisted.web client error, readably."""
    from OpenSSL import SSL

    if failure.check(SSL.Error):
        try:
            details = ", ".join(item[-1] for item in failure.value.args[0] if item[-1])
        except (IndexError, TypeError):
            details = str(failure.value)
        return f"TLS failed: {details or 'handshake error'}"
    if failure.check(ierror.ConnectionDone, ierror.ConnectionLost):
        return "connection closed by the server before the answer"
    return failure.getErrorMessage() or failure.type.__name__


@implementer(IPolicyForHTTPS)
@attr.s(frozen=True)
class TLSPolicy:
    """Verifies the server's certificate and host name (service-identity)
    against ``trust_root`` (None: the system's CAs), optionally presenting
    ``client_cert`` (a PrivateCertificate)."""

    trust_root = attr.ib(default=None)
    client_cert = attr.ib(default=None)

    def creatorForNetloc(self, hostname, port):
        from twisted.internet.ssl import optionsForClientTLS

        return optionsForClientTLS(hostname.decode("ascii"), trustRoot=self.trust_root,
                                   clientCertificate=self.client_cert)


@implementer(IAgentEndpointFactory)
class OneServer:
    """Endpoints for the Agent, made once per (scheme, host, port) rather
    than once per request as Agent's default does (that re-encodes the host
    name with IDNA and, for https, builds new TLS options every time)."""

    def __init__(self, reactor, policy, timeout):
        self.reactor = reactor
        self.policy = policy
        self.timeout = timeout
        self.cache = {}

    def endpointForURI(self, uri):
        return self.endpoint(uri.scheme, uri.host, uri.port)

    def endpoint(self, scheme, host, port):
        if isinstance(host, str):
            host = host.encode("idna")
        key = (scheme, host, port)
        endpoint = self.cache.get(key)
        if endpoint is None:
            if scheme not in (b"http", b"https"):
                raise wclient.SchemeNotSupported(f"unsupported scheme {scheme!r}")
            from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS

            endpoint = HostnameEndpoint(self.reactor, host, port, timeout=self.timeout)
            if scheme == b"https":
                endpoint = wrapClientTLS(self.policy.creatorForNetloc(host, port), endpoint)
            self.cache[key] = endpoint
        return endpoint


class QuietHTTP11ClientFactory(wclient._HTTP11ClientFactory):
    noisy = False


def load_tls(params):
    """A TLSPolicy from ``ca=``, ``cert=``, ``key=``; ValueError if a file is bad."""
    return TLSPolicy(*tls_material(params))
