"""``twistd foxyproxy``: command-line options and the service tree (README.md "Options")."""

import re
import sys

from twisted.python import usage

from . import backends, config_file, frontends, limits, logs, membership, ops
from .backends.service import BackendService
from .dispatch import Dispatcher
from .frontends.base import Core
from .registry import ReaderRegistry
from .frontends.line import DEFAULT_MAX_LINE
from .secrets import read_secret as load_secret

DEFAULT_PORT = "4001"
DEFAULT_BACKEND = "emulated:"


#: Twisted's tcp: endpoints listen with a backlog of 50: a burst of
#: thousands of clients connecting at once then waits on SYN retries.
DEFAULT_BACKLOG = 1024


def endpoint_string(value):
    """A bare port number means ``tcp:N``; TCP listeners get a backlog of
    DEFAULT_BACKLOG unless the string sets one."""
    value = value.strip()
    if value[:len("haproxy:")].lower() == "haproxy:":  # behind a balancer (proxy_protocol.py), any case
        return "haproxy:" + endpoint_string(value[len("haproxy:"):])
    if value.isdigit():
        value = f"tcp:{value}"
    if value.split(":", 1)[0] in ("tcp", "tcp6") and "backlog=" not in value:
        value += f":backlog={DEFAULT_BACKLOG}"
    return value


def check_endpoint(option, value):
    from twisted.internet import reactor
    from twisted.internet.endpoints import serverFromString

    description = endpoint_string(value)
    try:
        from .proxy_protocol import strip_prefix

        strip_prefix(description)  # haproxy: given twice
        serverFromString(reactor, description)
    except Exception as e:
        if description.startswith("systemd:") and isinstance(e, (IndexError, KeyError)):
            raise usage.UsageError(
                f"--{option} {value!r}: no such socket from systemd (LISTEN_FDS and LISTEN_FDNAMES; "
                "was it started by systemd or systemd-socket-activate?)") from None
        raise usage.UsageError(f"--{option} {value!r}: not a valid endpoint ({e})") from None
    return description


def read_secret(option, path, env):
    """``secrets.read_secret`` for an option: a UsageError naming it."""
    try:
        return load_secret(f"--{option}", path, env)
    except ValueError as e:
        raise usage.UsageError(str(e)) from None


class _Once(usage.CoerceParameter):
    """A single-valued option's parser: given twice it is a usage error
    naming it (the last value would win silently)."""

    def __init__(self, inner, seen):
        self.__dict__.update(inner.__dict__)
        self.seen = seen

    def dispatch(self, parameterName, value):
        if parameterName in self.seen:
            raise usage.UsageError(f"--{parameterName} is given twice; it takes one value")
        self.seen.add(parameterName)
        super().dispatch(parameterName, value)


class Options(usage.Options):
    synopsis = "[options]"
    longdesc = (
        "A smart-card access proxy: clients speak the CloudFoxy/FoxyProxy line "
        "protocol (default port 4001) and reach cards on the configured backends. "
        "Backend URLs: emulated:?cards=4&type=iso7816&latency_ms=0&prefix=Emulated "
        "(the default). The protocol, every backend and front end: README.md and docs/ "
        "of the cloudfoxy-proxy source repository."
    )

    optFlags = [
        ["allow-anonymous", None,
         "Serve clients from non-loopback addresses with no credentials (without it and without "
         "--credentials or a client password, only loopback clients are served: protected mode)."],
        ["no-signing", None,
         "Do not look for certificates on cards: no card is probed when it arrives or "
         "after RESET, and ENUM, ALIASES, CHAIN and SIGN answer C081."],
        ["trace-unredacted", None,
         "Keep PINs and secure-channel data in --trace files and the live trace (lab use only)."],
    ]

    optParameters = [
        ["port", "p", DEFAULT_PORT,
         "Line-protocol listener: a port number or a Twisted endpoint string."],
        ["command-timeout", None, "15",
         "Seconds allowed for every backend call; a client gets C086 instead of a hang."],
        ["queue-timeout", None, None,
         "Seconds a request (or card session) may wait in a card's queue behind a busy card or "
         "one held by a card session; then it gets C086 and the card never runs it. Apart from "
         "--command-timeout, the bound on the command's own time on the card (default: the same)."],
        ["max-line-length", None, str(DEFAULT_MAX_LINE),
         "Longest accepted line in bytes (the default fits the longest extended APDU in hex)."],
        ["max-commands-per-request", None, "1000",
         "Commands in one request; a longer batch is run in parts of this size."],
        ["max-connections", None, str(limits.DEFAULT_MAX_CONNECTIONS),
         "Client connections served at once, all front ends together; when full, the idle "
         "connection of the address holding the most is closed, or the newcomer is."],
        ["max-connections-per-peer", None, str(limits.DEFAULT_PER_PEER),
         "Connections one peer address may hold, all front ends together; when full, its least "
         "recently active idle connection is closed, or the newcomer is."],
        ["idle-timeout", None, str(int(limits.DEFAULT_IDLE_TIMEOUT)),
         "Close client connections idle this many seconds (not those waiting on a card); 0: never."],
        ["header-timeout", None, "10",
         "Seconds an HTTP client has to send a whole request head once it started one "
         "(never more than --idle-timeout); then the connection is closed."],
        ["max-buffered-bytes", None, str(limits.DEFAULT_BUFFER_BUDGET),
         "Bytes all client connections together may hold unprocessed beyond 4096 each; over it, "
         "a long partial line is dropped (C084; REST: 431) or reading pauses."],
        ["max-queue", None, "100",
         "Requests waiting per card; more are answered C086."],
        ["client-password-file", None, None,
         "Require this password (file's first line) on clients' reader lines "
         "(READER:PASSWORD) for card commands; env FOXYPROXY_CLIENT_PASSWORD."],
        ["credentials", None, None,
         "TOML file of client identities: secrets as SHA-256 hashes, client-certificate "
         "fingerprints, permitted readers, commands and front ends (docs/security.md)."],
        ["audit-log", None, None,
         "Append one JSON line per card request and per failed authentication to this file; "
         "reopened on SIGHUP."],
        ["log-level", None, "info", "debug, info, warn, error or critical."],
        ["rest", None, None,
         "Serve the CloudFoxy REST API (/api/v1/basic, /inventory, /hello) on this endpoint."],
        ["rest-token-file", None, None,
         "File with the token REST clients must send as X-Auth-Token; env FOXYPROXY_REST_TOKEN."],
        ["token-file", None, None,
         "File with the X-Auth-Token for cloudfoxy+http(s) backends; env FOXYPROXY_TOKEN."],
        ["password-file", None, None,
         "File with the reader-line password for tcp:// and tls:// backends; env FOXYPROXY_PASSWORD."],
        ["owner-id", None, None,
         "This proxy's id as an owner (1-63 of A-Z a-z 0-9 . _ -; default: the host name): it answers "
         "OWNER with it, and fronts (tcp:// backends) name its readers ID/READER."],
        ["ca-certs", None, None, "File or directory of issuer certificates used to complete CHAIN."],
        ["api", None, None, "Serve the HTTP/JSON and WebSocket API (docs/api.md) on this endpoint."],
        ["api-token-file", None, None,
         "File with the bearer token API clients must send; env FOXYPROXY_API_TOKEN."],
        ["metrics", None, None,
         "Serve Prometheus /metrics, /healthz, /readyz and the status page / on this endpoint."],
        ["metrics-token-file", None, None,
         "File with a token required on --metrics (Authorization: Bearer, or Basic password); "
         "/healthz and /readyz stay open; env FOXYPROXY_METRICS_TOKEN."],
        ["config", None, None,
         "TOML file with options under their command-line names; the command line overrides it."],
        ["register", None, None,
         "etcd://HOST:PORT/PREFIX[?advertise=tcp://HOST:PORT&ttl=SECONDS]: register this proxy as "
         "owner --owner-id under a lease, for fronts watching PREFIX (docs/tcp.md)."],
        ["log-format", None, "text", "text (human-readable) or json (one JSON object per line)."],
        ["drain-timeout", None, "5",
         "On SIGTERM, seconds in-flight requests may finish before they are answered C086."],
        ["drain-announce", None, "0",
         "On SIGTERM, seconds /readyz answers 503 while everything still serves (a balancer's "
         "health check takes the proxy out), before the drain; a second SIGTERM cuts it short."],
        ["ready-min-upstreams", None, "1",
         "With tcp:// or tls:// backends: ready (/readyz 200) while at least this many of them are "
         "up and list readers."],
        ["ram", None, None,
         "RAMOverHTTP server on this endpoint (ssl: for HTTPS): ram-client/ocf-cc.jar users "
         "attach their card at POST /rt/<secret>; it becomes reader 'RAM <NAME>'."],
        ["ram-token-file", None, None, "Lines 'NAME SECRET' for --ram (required with it)."],
        ["ram-max-sessions", None, "100", "RAM sessions at once; more are answered 204."],
        ["ram-session-timeout", None, "60",
         "Seconds a RAM client may be silent once it could have posted (after an answer with nothing "
         "to run, or once its script is no longer waited for: --command-timeout) before its session ends."],
        ["ram-done-after", None, "0",
         "End a RAM session (its client gets 204: done) once its card has had no command for "
         "this many seconds; 0: never (sessions end when the client stops or the proxy does)."],
        ["ram-daemon", None, None,
         "OCF-daemon-compatible trigger listener (GET /x.png?url=&sessionId=&reader=); "
         "default tcp:27001:interface=127.0.0.1 when --ram-approved-urls is given."],
        ["ram-approved-urls", None, None,
         "File of RAM server URLs (exact, or a prefix ending in /) the daemon may connect to."],
        ["ram-reader", None, None,
         "The RAM daemon's reader for approved URLs whose line names none (a trigger's reader= "
         "may only repeat it)."],
    ]

    def __init__(self):
        super().__init__()
        seen = set()
        for name, *_ in self.optParameters:
            self._dispatch[name] = _Once(self._dispatch[name], seen)
        ops.name_inherited_sockets()  # before Twisted's systemd: endpoint reads them
        self["listen"] = []
        self["backend"] = []
        self["vpcd"] = []
        self["ram-connect"] = []
        self["api-cors-origin"] = []
        self["trace"] = []
        self["trace-readers"] = []
        self["proxy-protocol-from"] = []

    def opt_trace(self, value):
        """Write an APDU trace of the card exchanges to FILE (repeatable): FILE.pcapng is
        pcapng (GSMTAP SIM frames for Wireshark), anything else JSON lines; mode 0600,
        reopened on SIGHUP (docs/trace.md)."""
        self["trace"].append(value)

    def opt_trace_readers(self, value):
        """Trace only readers whose name matches this glob (repeatable; default: all)."""
        self["trace-readers"].append(value)

    def opt_version(self):
        """Show the versions of cloudfoxy-proxy, Twisted and Python, and exit."""
        import platform

        from twisted import copyright

        from . import __version__

        print(f"cloudfoxy-proxy {__version__} (Twisted {copyright.version}, "
              f"{platform.python_implementation()} {platform.python_version()})")
        sys.exit(0)

    def opt_ram_connect(self, value):
        """URL=READER: let the RAMOverHTTP server at URL drive the card READER
        (resolved like a reader line) for one session, from start-up;
        URL?session=ID presets JSESSIONID; repeatable."""
        url, eq, reader = value.partition("=")
        # the URL may hold "=" (?session=ID): READER follows the last "=" after the path
        head, q, query = url.partition("?")
        if q:
            url, eq, reader = value.rpartition("=")
        if not (eq and reader and url.lower().startswith(("http://", "https://"))):
            raise usage.UsageError(f"--ram-connect {value!r}: expected URL=READER, "
                                   "e.g. https://host/rt/service=Emulated 00")
        self["ram-connect"].append((url, reader))

    def opt_api_cors_origin(self, value):
        """A browser origin (scheme://host[:port]) allowed to call --api (repeatable)."""
        from urllib.parse import urlsplit

        parts = urlsplit(value)
        if value == "*" or parts.scheme not in ("http", "https") or not parts.hostname or (
                parts.path not in ("", "/") or parts.query or parts.fragment or parts.username):
            raise usage.UsageError(f"--api-cors-origin {value!r}: give an origin like https://app.example:8443 "
                                   "(no '*', no path)")
        self["api-cors-origin"].append(value.rstrip("/"))

    def opt_proxy_protocol_from(self, value):
        """A balancer's address or network (CIDR) whose connections to haproxy: listeners may carry
        a PROXY header naming the client (repeatable; default loopback: 127.0.0.0/8 and ::1);
        a PROXY-protocol connection from anywhere else is closed."""
        from .proxy_protocol import trusted_networks

        try:
            trusted_networks([value])
        except ValueError as e:
            raise usage.UsageError(f"--proxy-protocol-from {e}") from None
        self["proxy-protocol-from"].append(value)

    def opt_listen(self, value):
        """One more line-protocol listener, a Twisted endpoint string (repeatable)."""
        self["listen"].append(value)

    def opt_backend(self, value):
        """A card source URL (repeatable); emulated: when none is given."""
        self["backend"].append(value)

    def opt_vpcd(self, value):
        """HOST:PORT=READER[?exclusive=1]: bridge the card READER (resolved like a
        reader line) into the vpcd slot listening on HOST:PORT (slot n: port
        35963+n); exclusive=1 reserves the card for the bridge; repeatable."""
        where, eq, reader = value.partition("=")
        host, colon, port = where.rpartition(":")
        if not (eq and colon and host and port.isdigit() and 0 < int(port) < 65536):
            raise usage.UsageError(f"--vpcd {value!r}: expected HOST:PORT=READER, e.g. 127.0.0.1:35963=Emulated 00")
        exclusive = False
        name, q, tail = reader.rpartition("?")
        if q and re.fullmatch(r"\w+=[^&=]*(&\w+=[^&=]*)*", tail):
            params = dict(p.split("=", 1) for p in tail.split("&"))
            unknown = sorted(set(params) - {"exclusive"})
            if unknown or params.get("exclusive") not in ("0", "1"):
                raise usage.UsageError(f"--vpcd {value!r}: the only parameter is exclusive=0 or exclusive=1")
            reader, exclusive = name, params["exclusive"] == "1"
        self["vpcd"].append((host.strip("[]"), int(port), reader, exclusive))

    def parseOptions(self, options=None):
        if options is None:
            options = sys.argv[1:]
        self.given = config_file.given_options(self, options)
        try:
            super().parseOptions(options)
        except usage.UsageError as e:
            if self.parent is None:
                raise
            # Under twistd: one line naming the problem, not the whole usage text.
            sys.stderr.write(f"twistd foxyproxy: {e}\n")
            sys.stderr.flush()
            raise SystemExit(1)

    def postOptions(self):
        from_file = {}
        if self["config"]:
            from_file = config_file.apply(self, self["config"], getattr(self, "given", set()))
        try:
            self._validate()
        except usage.UsageError as e:
            raise config_file.locate(e, from_file) from None

    def _validate(self):
        self["endpoints"] = [check_endpoint("port", self["port"])] + [
            check_endpoint("listen", v) for v in self["listen"]]
        self["command-timeout"] = self._number("command-timeout", float, 0.001, 3600)
        self["queue-timeout"] = (self["command-timeout"] if self["queue-timeout"] is None
                                 else self._number("queue-timeout", float, 0.001, 3600))
        self["max-line-length"] = self._number("max-line-length", int, 1024, 64 * 1024 * 1024)
        self["max-commands-per-request"] = self._number("max-commands-per-request", int, 1, 1000000)
        self["max-connections"] = self._number("max-connections", int, 1, 1000000)
        self["max-connections-per-peer"] = self._number("max-connections-per-peer", int, 1, 1000000)
        self["idle-timeout"] = self._number("idle-timeout", float, 0, 86400 * 365)
        self["header-timeout"] = self._number("header-timeout", float, 0.1, 3600)
        self["max-buffered-bytes"] = self._number("max-buffered-bytes", int, 65536, 1 << 40)
        self["max-queue"] = self._number("max-queue", int, 1, 1000000)
        self["drain-timeout"] = self._number("drain-timeout", float, 0, 3600)
        self["drain-announce"] = self._number("drain-announce", float, 0, 3600)
        self["ready-min-upstreams"] = self._number("ready-min-upstreams", int, 0, 100000)
        if self["log-format"] not in ("text", "json"):
            raise usage.UsageError(f"--log-format {self['log-format']!r}: use text or json")
        self["metrics-token"] = None
        if self["metrics"] is not None:
            self["metrics"] = check_endpoint("metrics", self["metrics"])
            self["metrics-token"] = read_secret(
                "metrics-token-file", self["metrics-token-file"], "FOXYPROXY_METRICS_TOKEN")
        level = self["log-level"].strip().lower()
        if level not in logs.LEVELS:
            raise usage.UsageError(
                f"--log-level {self['log-level']!r}: use one of debug, info, warn, error, critical")
        self["log-level"] = level
        self["client-password"] = read_secret(
            "client-password-file", self["client-password-file"], "FOXYPROXY_CLIENT_PASSWORD")
        self["token"] = read_secret("token-file", self["token-file"], "FOXYPROXY_TOKEN")
        self["password"] = read_secret("password-file", self["password-file"], "FOXYPROXY_PASSWORD")
        from .owners import check_owner_id, default_owner_id

        try:
            self["owner-id"] = (default_owner_id() if self["owner-id"] is None
                                else check_owner_id(self["owner-id"]))
        except ValueError as e:
            raise usage.UsageError(f"--owner-id: {e}") from None
        self["rest-token"] = None
        if self["rest"] is not None:
            self["rest"] = check_endpoint("rest", self["rest"])
            self["rest-token"] = read_secret(
                "rest-token-file", self["rest-token-file"], "FOXYPROXY_REST_TOKEN")
            if not self["rest-token"] and not self["credentials"]:
                raise usage.UsageError(
                    "--rest needs a token: --rest-token-file FILE, env FOXYPROXY_REST_TOKEN, "
                    "or client secrets in --credentials FILE")
        if self["api"] is not None:
            self["api"] = check_endpoint("api", self["api"])
            self["api-token"] = read_secret("api-token-file", self["api-token-file"], "FOXYPROXY_API_TOKEN")
            if not self["api-token"] and not self["credentials"]:
                raise usage.UsageError("--api needs a token: --api-token-file FILE, env FOXYPROXY_API_TOKEN, "
                                       "or client secrets in --credentials FILE")
        self._validate_ram()
        for option, needs in (("rest-token-file", "rest"), ("api-token-file", "api"),
                              ("metrics-token-file", "metrics"), ("ram-token-file", "ram"),
                              ("ram-reader", "ram-daemon"), ("api-cors-origin", "api")):
            if self[option] and not self[needs]:
                raise usage.UsageError(f"--{option} is given without --{needs}")
        if self["audit-log"]:
            try:
                open(self["audit-log"], "a", encoding="utf-8").close()
            except OSError as e:
                raise usage.UsageError(f"--audit-log {self['audit-log']!r}: cannot open it for "
                                       f"appending ({e.strerror})") from None
        for path in self["trace"]:
            from .trace import open_append

            try:
                open_append(path, True).close()
            except OSError as e:
                raise usage.UsageError(f"--trace {path!r}: cannot open it for appending "
                                       f"({e.strerror})") from None
        if (self["trace-readers"] or self["trace-unredacted"]) and not self["trace"]:
            raise usage.UsageError(f"--{'trace-readers' if self['trace-readers'] else 'trace-unredacted'} "
                                   "is given without --trace")
        self["access"] = self._access()
        settings = backends.BackendSettings(
            token=self["token"], password=self["password"], command_timeout=self["command-timeout"])
        makers = []
        self._validate_membership()
        static = [u for u in self["backend"] if not membership.is_etcd(u)]
        for url in static if self["etcd-watches"] else static or [DEFAULT_BACKEND]:
            try:
                makers.append(backends.from_url(url, settings))
            except ValueError as e:
                raise usage.UsageError(f"--backend {url!r}: {e}") from None
        self["backend-makers"] = makers
        self["backend-urls"] = static if self["etcd-watches"] else static or [DEFAULT_BACKEND]
        self["backend-settings"] = settings
        self["ca-cert-list"] = []
        if self["ca-certs"]:
            from .signing.certs import load_ca_certs

            try:
                self["ca-cert-list"] = load_ca_certs(self["ca-certs"])
            except ValueError as e:
                raise usage.UsageError(f"--ca-certs: {e}") from None

    def _validate_membership(self):
        """``--backend etcd://...``, ``--register`` and ``--owner-id`` (docs/tcp.md, "Membership")."""
        self["etcd-watches"] = []
        for url in self["backend"]:
            if membership.is_etcd(url):
                try:
                    self["etcd-watches"].append(membership.watch_source(url))
                except ValueError as e:
                    raise usage.UsageError(f"--backend {url!r}: {e}") from None
        self["register-source"] = None
        if self["register"] is not None:
            try:
                self["register-source"] = membership.register_source(self["register"])
            except ValueError as e:
                raise usage.UsageError(f"--register {self['register']!r}: {e}") from None
            if self["register-source"].advertise is None and not any(  # membership.line_listener's
                    e.startswith(("tcp:", "tcp6:", "systemd:")) for e in self["endpoints"]):
                raise usage.UsageError(f"--register {self['register']!r}: no -p or --listen is a plain TCP "
                                       "address to advertise (haproxy:, ssl:, mtls: and unix: are not); "
                                       "add ?advertise=tcp://HOST:PORT")

    def _validate_ram(self):
        """--ram, --ram-token-file, --ram-daemon and friends (docs/ramoverhttp.md)."""
        from .secrets import read_named_secrets

        self["ram-max-sessions"] = self._number("ram-max-sessions", int, 1, 100000)
        self["ram-session-timeout"] = self._number("ram-session-timeout", float, 1, 86400)
        self["ram-done-after"] = self._number("ram-done-after", float, 0, 86400 * 365)
        self["ram-tokens"] = {}
        if self["ram"] is not None:
            self["ram"] = check_endpoint("ram", self["ram"])
            if not self["ram-token-file"] and not self["credentials"]:
                raise usage.UsageError("--ram needs --ram-token-file FILE (lines NAME SECRET) or client "
                                       "secrets in --credentials FILE")
        if self["ram"] is not None and self["ram-token-file"]:
            try:
                self["ram-tokens"] = read_named_secrets("--ram-token-file", self["ram-token-file"])
            except ValueError as e:
                raise usage.UsageError(str(e)) from None
            for name, secret in self["ram-tokens"].items():
                if not re.fullmatch(r"[A-Za-z0-9._~-]+", secret):
                    raise usage.UsageError(f"--ram-token-file: the secret of {name!r} must be URL path "
                                           "characters (A-Z a-z 0-9 . _ ~ -)")
        if self["ram-approved-urls"] is not None or self["ram-daemon"] is not None:
            from .frontends.ramclient import DEFAULT_DAEMON, read_approved_urls

            if self["ram-approved-urls"] is None:
                raise usage.UsageError("--ram-daemon needs --ram-approved-urls FILE")
            try:
                self["ram-approved-url-list"] = read_approved_urls(self["ram-approved-urls"])
            except ValueError as e:
                raise usage.UsageError(str(e)) from None
            self["ram-daemon"] = check_endpoint("ram-daemon", self["ram-daemon"] or DEFAULT_DAEMON)

    def _access(self):
        """The access.Access of the options (docs/security.md)."""
        from .access import Access, load_credentials

        # The single-token options: each secret one identity with full
        # access on its front end (simple mode); --ram-token-file's NAMEs
        # are the identities of RAM clients (reader "RAM NAME").
        simple = [(self[key], frontend) for key, frontend in (
            ("client-password", "line"), ("rest-token", "rest"), ("api-token", "api"),
            ("metrics-token", "metrics")) if self.get(key)]
        simple += [(secret, "ram", name) for name, secret in (self.get("ram-tokens") or {}).items()]
        if self["credentials"]:
            try:
                access = load_credentials(self["credentials"], self["allow-anonymous"])
            except ValueError as e:
                raise usage.UsageError(f"--credentials {e}") from None
            access.add_simple(simple)
            return access
        return Access(simple=simple, allow_anonymous=bool(self["allow-anonymous"]))

    def _number(self, option, kind, low, high):
        value = self[option]
        try:
            number = kind(value)
        except (TypeError, ValueError):
            what = "a whole number" if kind is int else "a number"
            raise usage.UsageError(f"--{option} {value!r}: not {what}") from None
        if not low <= number <= high:
            raise usage.UsageError(f"--{option} {value!r}: must be between {low} and {high}")
        return number


def raise_file_limit():
    """Allow as many open files as the hard limit permits (many clients)."""
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft < hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ImportError, ValueError, OSError):
        pass


# --help shows each opt_ method's docstring as it is: one line of words each
for _method in vars(Options).values():
    if callable(_method) and getattr(_method, "__name__", "").startswith("opt_") and _method.__doc__:
        _method.__doc__ = " ".join(_method.__doc__.split())


_LOOPBACK_INTERFACE = re.compile(r"(?:^|:)interface=(?:127\.[0-9.]+|\\:\\:1|::1|localhost)(?::|$)")


def warn_open_listeners(listeners, access):
    """Say at start-up which listeners outside loopback have no
    authentication: ``listeners`` is ``[(endpoint, option, front end)]``."""
    from .logs import Logger

    log = Logger(namespace="cloudfoxy_proxy.access")
    for description, option, frontend in listeners:
        if access.modes.get(frontend, access.mode) != "open":
            continue
        if description.removeprefix("haproxy:").startswith(("unix:", "systemd:")) or \
                _LOOPBACK_INTERFACE.search(description):
            continue
        shown = description.removesuffix(f":backlog={DEFAULT_BACKLOG}")  # our default, not the user's words
        if access.allow_anonymous:
            log.warn("listener {listener} ({option}) is reachable from outside loopback with NO "
                     "authentication (--allow-anonymous): anyone who reaches it is served with full access",
                     listener=shown, option=option)
        else:
            # protected mode is safe: an information, not a warning
            advice = ("its triggers carry no secret: bind it to loopback to silence this" if frontend == "ram-daemon"
                      else "to serve other machines give --credentials FILE (docs/security.md) "
                           "or --allow-anonymous")
            log.info("listener {listener} ({option}) is reachable from outside loopback with no "
                     "authentication, so it serves loopback clients only (protected mode); {advice}",
                     listener=shown, option=option, advice=advice)


def makeService(config, reactor=None):
    """The service tree: the core (registry, backends, dispatcher, limits,
    audit, certificate index), then one service per configured front end
    (frontends.TABLE)."""
    if reactor is None:
        from twisted.internet import reactor

    # Every timeout on a monotonic clock, before anything here schedules
    # one (a wall-clock step must not move --command-timeout or idle timeouts).
    from .twisted_internals import use_monotonic_clock

    use_monotonic_clock(reactor)
    logs.set_level(config["log-level"])
    raise_file_limit()
    top = ops.ProxyService(reactor, config.get("drain-timeout", 5.0), config.get("drain-announce", 0.0))
    top.observer, top.logfile = ops.log_observer(config.get("log-format", "text"),
                                                 getattr(config, "parent", None))
    logs.SummaryService().setServiceParent(top)
    registry = ReaderRegistry(max_queue=config["max-queue"])
    dispatcher = Dispatcher(registry, reactor, config["command-timeout"], access=config.get("access"),
                            queue_timeout=config.get("queue-timeout"))
    # One account of connections for every front end (limits.py).
    core = top.core = Core(
        reactor=reactor, dispatcher=dispatcher, registry=registry, service=top,
        limits=limits.ConnectionLimits(
            reactor, max_connections=config["max-connections"],
            per_peer=config["max-connections-per-peer"], idle_timeout=config["idle-timeout"],
            buffered_bytes=config["max-buffered-bytes"]),
        header_timeout=config.get("header-timeout", 10.0))
    if config.get("proxy-protocol-from"):  # haproxy: listeners (proxy_protocol.py)
        from .proxy_protocol import trusted_networks

        core.proxy_from = trusted_networks(config["proxy-protocol-from"])
    upstreams = membership.UpstreamSet(top, core, config.get("backend-settings") or backends.BackendSettings())
    for url, make in zip(config.get("backend-urls") or [None] * len(config["backend-makers"]),
                         config["backend-makers"]):
        backend = make(reactor)
        core.backends.append(backend)
        service = BackendService(backend, registry)
        service.setServiceParent(top)
        if url is not None:
            upstreams.adopt(url, backend, service, membership.CONFIG)
    if config.get("audit-log"):
        from .audit import AuditLog

        dispatcher.audit = AuditLog(config["audit-log"], reactor)
        dispatcher.audit.setServiceParent(top)  # its stop ends the write retries
        top.reopeners.append(dispatcher.audit.reopen)
    # Certificates on signing cards (ENUM, ALIASES, CHAIN, SIGN): probes
    # cards as they arrive, so it watches the registry before backends start.
    if not config.get("no-signing"):
        from .signing.index import CertIndex

        dispatcher.signing = CertIndex(registry, reactor, config["command-timeout"],
                                       ca_certs=config.get("ca-cert-list", ()))
        dispatcher.signing.start()  # listening now: before any backend adds a reader
        dispatcher.signing.setServiceParent(top)  # stopService cancels pending probes
    if config.get("trace"):
        from .trace import TraceService, Tracer, trace_file

        unredacted = bool(config.get("trace-unredacted"))
        dispatcher.trace = Tracer(config.get("trace-readers") or (), unredacted)
        if dispatcher.signing is not None:
            dispatcher.signing.trace = dispatcher.trace
        tracing = TraceService(dispatcher.trace, [trace_file(p, unredacted) for p in config["trace"]], reactor)
        tracing.setServiceParent(top)
        top.reopeners.append(tracing.reopen)
        if unredacted:
            logs.Logger(namespace="cloudfoxy_proxy.trace").warn(
                "--trace-unredacted: PINs, PUKs and secure-channel data are written IN CLEAR to "
                "{files}; for lab use only, never with real users' cards", files=", ".join(config["trace"]))
    top.dispatcher = dispatcher
    dispatcher.owner_id = config.get("owner-id")
    top.readiness = core.readiness = ops.Readiness(
        top, registry, core.backends, reactor, min_upstreams=config.get("ready-min-upstreams", 1))
    # a front whose owners all left (etcd, SIGHUP) is not ready: ops.Readiness.upstream_tier
    top.readiness.upstream_tier = bool(config.get("etcd-watches")) or any(
        hasattr(b, "upstream_state") for b in core.backends)
    if dispatcher.audit is not None:
        top.readiness.checks.append(dispatcher.audit.reasons)  # not ready while records are lost
    listening = []
    for frontend in frontends.configured(config):
        for settings in frontend.settings(config):
            listening += [(d, o, frontend.name) for d, o in frontend.listeners(settings)]
            frontend.make_service(settings, core).setServiceParent(top)
    warn_open_listeners(listening, dispatcher.access)
    # Membership (docs/tcp.md): SIGHUP re-reads --config's backends; etcd watches and registration.
    if config.get("config"):
        top.reopeners.append(membership.ConfigReload(
            config["config"], upstreams, getattr(config, "given", ())).reload)
    for source in config.get("etcd-watches") or ():
        membership.EtcdWatch(source, upstreams, reactor).setServiceParent(top)
    if config.get("register-source") is not None:
        membership.EtcdRegistration(config["register-source"], config["owner-id"], reactor,
                                    listener=lambda: membership.line_listener(top)).setServiceParent(top)
    return top
