"""TLS for listeners: the ``mtls:`` server endpoint (mutual TLS) and the
identity of a connection's verified client certificate (docs/security.md).

``mtls:PORT:privateKey=KEY:certKey=CERT:caCerts=CA[:interface=ADDR][:backlog=N]``
listens like Twisted's ``ssl:`` endpoint but requires a client certificate
signed by one of the certificates in the PEM file ``CA``; the handshake
fails without one.  The server offers TLS 1.2 and 1.3 only, and on TLS 1.2
only forward-secret AEAD suites (ECDHE with AES-GCM or ChaCha20-Poly1305);
TLS 1.3's suites are all forward-secret.  ``certKey`` may hold the server
certificate followed by its intermediate certificates.
"""

from twisted.internet.interfaces import IStreamServerEndpoint, ISSLTransport
from zope.interface import implementer

#: OpenSSL cipher string of the TLS 1.2 suites offered: ECDHE key exchange,
#: AEAD encryption (no static-RSA, no CBC).
TLS12_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20"


def _pem_certificates(path, what):
    from OpenSSL import crypto

    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise ValueError(f"{what} {path!r}: {e.strerror}") from None
    marker = b"-----BEGIN CERTIFICATE-----"
    certs = []
    for part in data.split(marker)[1:]:
        try:
            certs.append(crypto.load_certificate(crypto.FILETYPE_PEM, marker + part))
        except crypto.Error:
            raise ValueError(f"{what} {path!r}: a certificate in it is not valid PEM") from None
    if not certs:
        raise ValueError(f"{what} {path!r}: no PEM certificate in it")
    return certs


def server_options(private_key, cert_key, ca_certs):
    """A CertificateOptions requiring client certificates signed by a
    certificate of the PEM file ``ca_certs``; ValueError naming the file
    when one cannot be read."""
    from OpenSSL import crypto
    from twisted.internet.ssl import AcceptableCiphers, CertificateOptions, TLSVersion

    try:
        with open(private_key, "rb") as f:
            key = crypto.load_privatekey(crypto.FILETYPE_PEM, f.read())
    except OSError as e:
        raise ValueError(f"privateKey {private_key!r}: {e.strerror}") from None
    except crypto.Error:
        raise ValueError(f"privateKey {private_key!r}: not a PEM private key") from None
    chain = _pem_certificates(cert_key, "certKey")
    cas = _pem_certificates(ca_certs, "caCerts")
    return CertificateOptions(
        privateKey=key, certificate=chain[0], extraCertChain=chain[1:] or None,
        verify=True, caCerts=cas, requireCertificate=True,
        raiseMinimumTo=TLSVersion.TLSv1_2,
        acceptableCiphers=AcceptableCiphers.fromOpenSSLCipherString(TLS12_CIPHERS))


def mtls_endpoint(reactor, port, privateKey=None, certKey=None, caCerts=None, interface="",
                  backlog="1024"):
    """The endpoint of an ``mtls:`` string (see the module docstring)."""
    from twisted.internet.endpoints import SSL4ServerEndpoint

    missing = [name for name, value in (("privateKey", privateKey), ("certKey", certKey),
                                        ("caCerts", caCerts)) if not value]
    if missing:
        raise ValueError(f"mtls: needs {', '.join(m + '=FILE' for m in missing)}")
    if not str(port).isdigit():
        raise ValueError(f"mtls: port {port!r} is not a number")
    options = server_options(privateKey, certKey, caCerts)
    return SSL4ServerEndpoint(reactor, int(port), options, backlog=int(backlog), interface=interface)


def negotiate_alpn(endpoint, protocols):
    """Make a TLS server ``endpoint`` choose in ALPN the first of
    ``protocols`` (bytes, e.g. ``[b"http/1.1"]``; none for the line
    protocol) that the client offers, and go on without ALPN when it
    offers none of them (RFC 7301 section 3.2 allows it).

    Twisted's own choice (``_sslverify.setupForALPN``, Twisted 22.10 to
    26.10) answers such a client with an ``internal_error`` alert, so a
    listener refused every curl, browser or Prometheus client (they offer
    ``h2`` and ``http/1.1``) unless its factory listed one of them.  The
    choice is set on the endpoint's OpenSSL context before it makes any
    connection (pyOpenSSL refuses later changes); the context factory is
    the endpoint's private ``_sslContextFactory``
    (``twisted_internals.tls_options``).  Endpoints
    without TLS are left alone."""
    from .twisted_internals import tls_options

    options = tls_options(endpoint)
    if options is None:
        return
    from OpenSSL.SSL import NO_OVERLAPPING_PROTOCOLS

    ours = tuple(protocols)

    def select(_connection, offered):
        for protocol in ours:
            if protocol in offered:
                return protocol
        return NO_OVERLAPPING_PROTOCOLS

    options.getContext().set_alpn_select_callback(select)


@implementer(IStreamServerEndpoint)
class HalfClosingTLSEndpoint:
    """A TLS server endpoint (what ``ssl:`` and ``mtls:`` give) whose
    connections treat the client's ``close_notify`` like a TCP half-close:
    a request followed by close_notify is answered, then the proxy sends
    its own close_notify and closes (``twisted_internals.half_closing_tls_protocol``).
    Listens like ``SSL4ServerEndpoint`` (``reactor.listenSSL`` is
    ``listenTCP`` under a ``TLSMemoryBIOFactory``).  ``under``, when set,
    wraps the TLS factory: what it reads comes before the handshake (a
    PROXY header: ``proxy_protocol``)."""

    under = None

    def __init__(self, reactor, port, options, backlog=50, interface=""):
        self._reactor = reactor
        self._port = port
        self._sslContextFactory = options  # where twisted_internals.tls_options looks
        self._backlog = backlog
        self._interface = interface

    def listen(self, factory):
        from twisted.internet.defer import execute
        from twisted.protocols.tls import TLSMemoryBIOFactory

        from .twisted_internals import half_closing_tls_protocol

        tls = TLSMemoryBIOFactory(self._sslContextFactory, False, factory)
        tls.protocol = half_closing_tls_protocol()
        if self.under is not None:
            tls = self.under(tls)
        return execute(self._reactor.listenTCP, self._port, tls, backlog=self._backlog,
                       interface=self._interface)


def half_closing(endpoint):
    """``endpoint`` with TLS half-close answered (HalfClosingTLSEndpoint)
    when it is a TLS server endpoint; other endpoints unchanged."""
    from .twisted_internals import tls_server_parts

    parts = tls_server_parts(endpoint)
    return endpoint if parts is None else HalfClosingTLSEndpoint(*parts)


def peer_certificate_der(transport):
    """The DER bytes of the client certificate a TLS connection presented
    (verified by the ``mtls:`` endpoint), or None."""
    if not ISSLTransport.providedBy(transport):
        return None
    try:
        cert = transport.getPeerCertificate()
    except Exception:
        return None
    if cert is None:
        return None
    from OpenSSL import crypto

    return crypto.dump_certificate(crypto.FILETYPE_ASN1, cert)


def certificate_identity(transport, access):
    """The access.Identity whose ``cert_sha256`` is the fingerprint of the
    connection's client certificate, or None."""
    if not access.by_cert:
        return None
    der = peer_certificate_der(transport)
    return None if der is None else access.for_certificate(der)
