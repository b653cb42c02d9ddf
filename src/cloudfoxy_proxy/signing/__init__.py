"""The signing commands ENUM, ALIASES, CHAIN and SIGN (docs/signing.md):
``index.py`` the certificate index (``CertIndex``, a Service), ``certs.py``
the x509 helpers, ``profiles/`` how to find and use the keys of a kind of
card with APDUs only (PIV, OpenPGP; a new card profile goes there)."""
