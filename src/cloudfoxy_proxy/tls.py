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

from twisted.internet.interfaces import ISSLTransport

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
