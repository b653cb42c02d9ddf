"""Who may use which reader, command and front end (docs/security.md).

* :class:`Identity`: one client's name and permissions (reader glob
  patterns, commands, front ends).
* :class:`Access`: the identities of a process and how a presented secret
  or client certificate maps to one.  Three modes:

  - *identities* (``--credentials FILE``, :func:`load_credentials`):
    secrets are stored as SHA-256 hashes, certificates by SHA-256
    fingerprint; every command needs an identity;
  - *simple* (``--client-password-file`` and/or ``--rest-token-file``):
    each secret is one identity with full access; as before, READERS,
    ENUM, ALIASES and CHAIN need no password, card commands do;
  - *open* (no credentials): *protected mode*, loopback (and UNIX-socket)
    clients are served with full access, any other peer gets ``C085``
    (REST: 403) unless ``--allow-anonymous``.

* :class:`Throttle`: failed authentications counted per peer address and
  per identity; after ``FREE`` failures each further answer from that peer
  waits (exponential, capped), and a connection is closed after
  ``CLOSE_AFTER`` failures.

The enforcement itself is ``dispatch.Dispatcher.identify``: front ends only
fill in the ``dispatch.Session`` (``frontend``, ``host``, ``identity`` when
the connection is authenticated otherwise, e.g. by a client certificate).
"""

import base64
import fnmatch
import hashlib
import hmac
import ipaddress
import re
import secrets as _random

from .parser import COMMANDS

#: The front-end names a client's ``frontends`` may list: ``ram`` is the
#: RAMOverHTTP server's clients (who attach a card), ``metrics`` the
#: metrics and status listener.
FRONTENDS = ("line", "rest", "api", "ram", "metrics")
#: Commands an identity's ``commands`` may list (docs/protocol.md "Commands").
KNOWN_COMMANDS = frozenset(COMMANDS - {"EMPTYLINE"})
#: Commands simple mode answers without a password (as before identities).
OPEN_IN_SIMPLE_MODE = frozenset(("READERS", "LIST", "ENUM", "ALIASES", "CHAIN", "PERSONALIZE", "OWNER"))


class Identity:
    """A client: ``name`` (logs, audit trail), ``readers`` (a tuple of
    fnmatch-style, case-sensitive glob patterns over canonical reader names
    and aliases; None: every reader), ``commands`` (frozenset of command
    names; None: all), ``frontends`` (frozenset of front-end names; None:
    all), ``relay`` (True: it may send CLIENT, acting for its own
    clients: another proxy in front of this one, relay.py)."""

    __slots__ = ("name", "readers", "commands", "frontends", "_rx", "resolved", "relay")

    def __init__(self, name, readers=None, commands=None, frontends=None, relay=False):
        self.name = name
        self.relay = bool(relay)
        self.readers = None if readers is None else tuple(readers)
        self.commands = None if commands is None else frozenset(commands)
        self.frontends = None if frontends is None else frozenset(frontends)
        #: reader line -> the one reader it names for this identity (the
        #: dispatcher's cache, emptied when the registry's readers change)
        self.resolved = {}
        self._rx = None if readers is None else re.compile(
            "|".join(f"(?:{fnmatch.translate(p)})" for p in self.readers) or r"(?!)", re.DOTALL)

    def __repr__(self):
        return f"Identity({self.name!r})"

    def _key(self):
        return (self.name, self.readers, self.commands, self.frontends, self.relay)

    def __eq__(self, other):
        return isinstance(other, Identity) and self._key() == other._key()

    def __hash__(self):
        return hash(self._key())

    @property
    def everything(self):
        """True when every reader and every command is allowed."""
        return self.readers is None and self.commands is None

    def sees(self, reader):
        """True when ``reader`` (a registry.Reader) is one of ours: a
        pattern matches its canonical name or one of its aliases (the
        card's and, for signing cards, its certificates' aliases)."""
        rx = self._rx
        if rx is None:
            return True
        match = rx.match
        if match(reader.name):
            return True
        for alias in reader.aliases + reader.extra_aliases:
            if match(alias):
                return True
        return False

    def serves(self, frontend):
        return self.frontends is None or frontend in self.frontends


#: The identity of simple mode's secrets and of protected mode's local clients.
def full_access(name):
    return Identity(name)


def is_local(host):
    """True for loopback addresses (127.0.0.0/8, ::1, IPv4-mapped loopback)
    and for peers without an IP address (UNIX sockets)."""
    if not host:
        return True
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return True  # not an IP peer: a UNIX socket
    mapped = getattr(address, "ipv4_mapped", None)
    return (mapped or address).is_loopback


def sha256_hex(secret):
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


def fingerprint(text):
    """A SHA-256 fingerprint as 32 bytes, from hex with or without ``:``;
    ValueError otherwise."""
    raw = bytes.fromhex(text.replace(":", "").strip())
    if len(raw) != 32:
        raise ValueError("not a SHA-256 fingerprint (32 bytes in hex)")
    return raw


class Access:
    """The identities of the process; see the module docstring.

    ``simple``: ``[(secret, frontend or None)]`` for simple mode;
    ``by_hash`` maps SHA-256 digests of secrets to identities, ``by_cert``
    certificate fingerprints (32 bytes) to identities.
    """

    def __init__(self, by_hash=None, by_cert=None, simple=(), allow_anonymous=False):
        self.by_hash = dict(by_hash or {})
        self.by_cert = dict(by_cert or {})
        self.simple = []
        self.allow_anonymous = allow_anonymous
        self.anonymous = full_access("anonymous")
        self.anonymous.relay = True  # open mode: loopback only unless --allow-anonymous (relay.py)
        self.add_simple(simple)

    def __eq__(self, other):
        """Same secrets, certificates, identities and settings (config checks)."""
        return isinstance(other, Access) and (
            self.by_hash, self.by_cert, self.simple, self.allow_anonymous) == (
            other.by_hash, other.by_cert, other.simple, other.allow_anonymous)

    __hash__ = None

    def _modes(self):
        #: ``identities``, ``simple`` or ``open`` (see the module docstring)
        self.mode = "identities" if self.by_hash or self.by_cert else ("simple" if self.simple else "open")
        #: the mode of each front end: in simple mode, a front end no
        #: secret applies to is open (protected mode)
        self.modes = {f: self.mode if self.mode != "simple" or any(
            only is None or only == f for _s, only, _i in self.simple) else "open" for f in FRONTENDS}
        #: the RAM daemon's triggers carry no secret by design (<img> tags):
        #: always protected mode, loopback clients only
        self.modes["ram-daemon"] = "open"
        #: front end -> commands answered without a secret there (simple
        #: mode's listings; none in protected mode or with identities)
        self.open_commands = {f: OPEN_IN_SIMPLE_MODE if m == "simple" else frozenset()
                              for f, m in self.modes.items()}

    def add_simple(self, simple):
        """Add simple mode's secrets: ``(secret, frontend or None[, name])``
        each, an identity with full access named ``name`` (default: the
        front end's name, or ``client``)."""
        for secret, frontend, *name in simple:
            if not secret:
                raise ValueError("an empty secret would let anybody in")
            name = name[0] if name else ("client" if frontend is None else frontend)
            self.simple.append((secret, frontend, full_access(name)))
        self._modes()

    def check(self, given, frontend):
        """The identity a presented secret (str, e.g. the reader line's
        password before any ``:PIN``) proves and the rest after it (the PIN
        of SIGN, or None); ``(None, None)`` when it proves none."""
        raw = given.encode("utf-8")
        for secret, only, identity in self.simple:
            if only is not None and only != frontend:
                continue
            s = secret.encode("utf-8")
            n = len(s)
            if hmac.compare_digest(raw[:n], s) and (len(raw) == n or raw[n:n + 1] == b":"):
                return identity, (given[len(secret) + 1:] or None)
        if self.by_hash:
            secret, colon, rest = given.partition(":")
            identity = self.by_hash.get(hashlib.sha256(secret.encode("utf-8")).digest())
            if identity is not None:
                return identity, (rest or None)
        return None, None

    def for_certificate(self, der):
        """The identity whose ``cert_sha256`` is the fingerprint of this
        DER certificate, or None."""
        return self.by_cert.get(hashlib.sha256(der).digest())


def load_credentials(path, allow_anonymous=False):
    """An :class:`Access` from a ``--credentials`` TOML file (docs/security.md).

    Raises ValueError with one line naming the problem (and the client)."""
    try:
        import tomllib
    except ImportError:  # Python < 3.11
        import tomli as tomllib
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as e:
        raise ValueError(f"{path!r}: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"{path!r}: not valid TOML ({e})") from None
    unknown = sorted(set(data) - {"client"})
    if unknown:
        raise ValueError(f"{path!r}: unknown table or key {unknown[0]!r} (only [[client]] tables)")
    clients = data.get("client", [])
    if not isinstance(clients, list) or not clients:
        raise ValueError(f"{path!r}: no [[client]] table")
    by_hash, by_cert, names = {}, {}, set()
    for n, client in enumerate(clients, 1):
        where = f"{path!r}, client {n}"
        if not isinstance(client, dict):
            raise ValueError(f"{where}: not a table")
        name = client.get("name")
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"{where}: name = \"...\" is missing")
        where = f"{path!r}, client {name!r}"
        if name in names:
            raise ValueError(f"{where}: the name is used twice")
        names.add(name)
        bad = sorted(set(client) - {"name", "secret_sha256", "cert_sha256", "readers", "commands",
                                    "frontends", "relay"})
        if bad:
            raise ValueError(f"{where}: unknown key {bad[0]!r}")
        readers = _strings(client, "readers", where, default=[])
        commands = _strings(client, "commands", where)
        if commands is not None:
            commands = [c.upper() for c in commands]
            if "READERS" in commands:
                commands.append("OWNER")  # a front asks it with READERS (docs/protocol.md "### OWNER")
            wrong = sorted(set(commands) - KNOWN_COMMANDS)
            if wrong:
                raise ValueError(f"{where}: unknown command {wrong[0]!r} in commands "
                                 f"(use {', '.join(sorted(KNOWN_COMMANDS))})")
        frontends = _strings(client, "frontends", where)
        if frontends is not None:
            wrong = sorted(set(frontends) - set(FRONTENDS))
            if wrong:
                raise ValueError(f"{where}: unknown front end {wrong[0]!r} in frontends "
                                 f"(use {', '.join(FRONTENDS)})")
        relay = client.get("relay", False)
        if not isinstance(relay, bool):
            raise ValueError(f"{where}: relay must be true or false")
        if relay and commands is not None and "CLIENT" not in commands:
            commands.append("CLIENT")  # what relay = true allows (relay.py), whatever commands lists
        identity = Identity(name, readers, commands, frontends, relay)
        digest = client.get("secret_sha256")
        cert = client.get("cert_sha256")
        if digest is None and cert is None:
            raise ValueError(f"{where}: give secret_sha256 and/or cert_sha256")
        for value, table, parse, what, hint, same in (
                (digest, by_hash, bytes.fromhex, "secret_sha256 must be 64 hex digits",
                 "make one with foxyproxy-credentials", "secret"),
                (cert, by_cert, fingerprint, "cert_sha256 must be a SHA-256 fingerprint",
                 "openssl x509 -noout -fingerprint -sha256", "certificate")):
            if value is None:
                continue
            try:
                raw = parse(value) if isinstance(value, str) else b""
            except ValueError:
                raw = b""
            if len(raw) != 32:
                raise ValueError(f"{where}: {what} ({hint})")
            if raw in table:
                raise ValueError(f"{where}: the same {same} as client {table[raw].name!r}")
            table[raw] = identity
    return Access(by_hash, by_cert, allow_anonymous=allow_anonymous)


def _strings(client, key, where, default=None):
    value = client.get(key, default)
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"{where}: {key} must be a list of strings")
    return value


class Throttle:
    """Failed authentications per peer address and per identity.

    ``failed(host, now)`` returns the seconds the failure's answer must
    wait: nothing for the first ``FREE`` failures of a peer, then
    ``BASE * 2**k`` (capped at ``CAP``), and the answers of one peer are
    spaced by those delays one after another (so parallel connections do
    not multiply its rate).  A peer's count is forgotten ``FORGET`` seconds
    after its last failure; at most ``MAX_PEERS`` peers are remembered
    (the oldest first out).
    """

    FREE = 3
    BASE = 0.25
    CAP = 4.0
    CLOSE_AFTER = 10  # failures on one connection
    FORGET = 900.0
    MAX_PEERS = 10000
    MAX_WAIT = 60.0  # a failure that would wait longer is answered at once and its connection closed

    def __init__(self):
        self.peers = {}  # host -> [failures, time of the last, time the next answer may go]
        self.identities = {}  # identity name -> failures

    def failed(self, host, now):
        """Count a failure of ``host``: the seconds its answer waits, or
        None when it would wait more than MAX_WAIT (close instead)."""
        peers = self.peers
        state = peers.pop(host, None)
        if state is None or now - state[1] > self.FORGET:
            state = [0, now, now]
        peers[host] = state
        while len(peers) > self.MAX_PEERS:
            del peers[next(iter(peers))]
        state[0] += 1
        state[1] = now
        extra = state[0] - self.FREE
        if extra <= 0:
            return 0.0
        delay = min(self.CAP, self.BASE * 2 ** min(extra - 1, 16))
        at = max(now, state[2]) + delay
        if at - now > self.MAX_WAIT:
            return None
        state[2] = at
        return at - now

    def failures(self, host):
        state = self.peers.get(host)
        return state[0] if state else 0

    def identity_failed(self, name):
        self.identities[name] = self.identities.get(name, 0) + 1


def generate_secret():
    """A new client secret: 32 random bytes, URL-safe base64 (no ``:``)."""
    return base64.urlsafe_b64encode(_random.token_bytes(32)).decode("ascii").rstrip("=")
