"""x509 helpers of the signing commands: CA certificates for CHAIN
(``load_ca_certs``) and issuer chains (``build_chain``), with the
``cryptography`` package."""

import os

from cryptography import x509
from cryptography.hazmat.primitives import serialization


def load_ca_certs(path):
    """Certificates (PEM, several per file, or DER) from a file or every
    file of a directory; ValueError with a clear message otherwise."""
    if os.path.isdir(path):
        files = [os.path.join(path, n) for n in sorted(os.listdir(path))
                 if os.path.isfile(os.path.join(path, n))]
        strict = False
    elif os.path.isfile(path):
        files, strict = [path], True
    else:
        raise ValueError(f"{path!r} is neither a file nor a directory")
    certs = []
    for name in files:
        try:
            with open(name, "rb") as f:
                data = f.read()
        except OSError as e:
            raise ValueError(f"{name!r}: {e.strerror}") from None
        found = _parse_certs(data)
        if not found and strict:
            raise ValueError(f"{name!r} holds no PEM or DER certificate")
        certs.extend(found)
    if not certs:
        raise ValueError(f"no certificates in {path!r}")
    return certs


def _parse_certs(data):
    if b"-----BEGIN CERTIFICATE-----" in data:
        try:
            return x509.load_pem_x509_certificates(data)
        except ValueError:
            return []
    try:
        return [x509.load_der_x509_certificate(data)]
    except ValueError:
        return []


def der_bytes(cert):
    """The DER encoding of an x509 certificate."""
    return cert.public_bytes(serialization.Encoding.DER)


def extension(cert, kind, default=None):
    """The value of ``cert``'s extension of class ``kind`` (e.g.
    ``x509.BasicConstraints``), or ``default`` when it has none."""
    try:
        return cert.extensions.get_extension_for_class(kind).value
    except x509.ExtensionNotFound:
        return default


def _ski(cert):
    value = extension(cert, x509.SubjectKeyIdentifier)
    return None if value is None else value.digest


def _aki(cert):
    value = extension(cert, x509.AuthorityKeyIdentifier)
    return None if value is None else value.key_identifier


def _issued(child, parent):
    """Did ``parent`` issue ``child`` (names, key identifiers, signature)?"""
    if child.issuer != parent.subject:
        return False
    aki, ski = _aki(child), _ski(parent)
    if aki is not None and ski is not None and aki != ski:
        return False
    try:
        child.verify_directly_issued_by(parent)
    except (ValueError, TypeError, Exception):  # InvalidSignature and unsupported keys
        return False
    return True


def build_chain(leaf, pool, limit=10):
    """``leaf`` then its issuers found in ``pool`` (x509 certificates), up
    to a self-signed certificate or the first missing issuer."""
    chain = [leaf]
    current = leaf
    while len(chain) < limit:
        if current.issuer == current.subject and _issued(current, current):
            break
        parent = next((c for c in pool if c not in chain and _issued(current, c)), None)
        if parent is None:
            break
        chain.append(parent)
        current = parent
    return chain
