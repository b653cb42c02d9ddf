"""Backend URLs (docs/backends.md; the schemes in README.md "Options"): the scheme picks the module, which is
imported only when used (so pyscard and treq load only when needed).

Each module has ``from_url(url, settings)``: it validates the URL (raising
ValueError with a message for the user) and returns ``make(reactor)``,
which builds the IBackend.  ``settings`` is a ``BackendSettings`` (built by
tap.py from the command line), never twistd's options dict.
"""

import importlib
import re
from urllib.parse import parse_qsl, urlsplit

import attr
from attr.validators import instance_of, optional

SCHEMES = {
    "emulated": "cloudfoxy_proxy.backends.emulated",
    "pcsc": "cloudfoxy_proxy.backends.pcsc",
    "cloudfoxy+http": "cloudfoxy_proxy.backends.rest",
    "cloudfoxy+https": "cloudfoxy_proxy.backends.rest",
    "tcp": "cloudfoxy_proxy.backends.tcp",
    "tls": "cloudfoxy_proxy.backends.tcp",
}


def _positive(inst, attribute, value):
    if not value > 0:
        raise ValueError(f"{attribute.name} must be positive: {value!r}")


@attr.s(frozen=True, kw_only=True)
class BackendSettings:
    """What a backend URL falls back on from the command line (docs/backends.md):

    * ``token`` — str or None: ``--token-file``/``FOXYPROXY_TOKEN``, the
      CloudFoxy REST token of ``cloudfoxy+http(s)://`` without ``token_file=``;
    * ``password`` — str or None: ``--password-file``/``FOXYPROXY_PASSWORD``,
      the upstream password of ``tcp://``/``tls://`` without ``password_file=``;
    * ``command_timeout`` — seconds (> 0): ``--command-timeout``.
    """

    token = attr.ib(default=None, validator=optional(instance_of(str)))
    password = attr.ib(default=None, validator=optional(instance_of(str)))
    command_timeout = attr.ib(default=15.0, converter=float, validator=_positive)


def from_url(url, settings=BackendSettings()):
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    module = SCHEMES.get(scheme)
    if module is None:
        known = ", ".join(f"{s}:" for s in SCHEMES)
        raise ValueError(f"unknown backend {url!r} (known: {known})")
    return importlib.import_module(module).from_url(url, settings)


#: Readers kept per upstream backend unless ``readers_max=`` says otherwise.
READERS_MAX = 10000
#: The longest reader name kept from an upstream, in UTF-8 bytes.
MAX_NAME = 256


class ReaderCap:
    """The bounds on one upstream's reader list (docs/backends.md): at most
    ``limit`` readers, names of at most MAX_NAME bytes.  A backend calls
    :meth:`begin`, then :meth:`fits` per name and :meth:`too_many` for the
    names past the limit, then :meth:`end`, which logs one warning saying
    how many were dropped whenever that changes."""

    def __init__(self, where, limit):
        self.where = where
        self.limit = limit
        self.many = self.long = self.bad = 0
        self.example = ""
        self._last = (0, 0, 0)

    def begin(self):
        self.many = self.long = self.bad = 0

    def invalid(self, token):
        """A name the listing could not carry (e.g. not base64 UTF-8)."""
        if not self.bad:
            self.example = token[:100]
        self.bad += 1

    def fits(self, name):
        if len(name) > MAX_NAME // 4 and len(name.encode("utf-8")) > MAX_NAME:
            self.long += 1
            return False
        return True

    def too_many(self, count):
        self.many += count

    def end(self, log):
        now = (self.many, self.long, self.bad)
        if now != self._last and (self.many or self.long):
            log.warn("{where} lists more readers than are kept: dropped {many} over "
                     "readers_max={limit} and {long} with a name over {max_name} bytes",
                     where=self.where, many=self.many, limit=self.limit, long=self.long,
                     max_name=MAX_NAME)
        if now != self._last and self.bad:
            log.warn("{where} listed {bad} reader name(s) that are not base64 UTF-8, "
                     "e.g. {example!r}: ignored", where=self.where, bad=self.bad,
                     example=self.example)
        self._last = now


#: Readers given to the registry per reactor turn when a backend reports a long list.
UPDATE_CHUNK = 1000


class ReaderUpdates:
    """Hands one backend's reader lists to the registry without blocking the
    reactor for long: a list of more than UPDATE_CHUNK readers has its new
    readers prepared UPDATE_CHUNK at a time, one reactor turn each, then is
    applied at once (cheap by then).  A newer list replaces one still being
    prepared; :meth:`stop` abandons it."""

    def __init__(self, registry, backend, clock):
        self.registry = registry
        self.backend = backend
        self.clock = clock
        self._pending = None  # DelayedCall of the next chunk

    def update(self, items, make=None):
        """Report ``items`` (ReaderInfo objects, or anything ``make`` turns
        into one, made a chunk at a time)."""
        self.stop()
        items = list(items)
        if len(items) <= UPDATE_CHUNK:
            self.registry.update(self.backend, [make(i) for i in items] if make else items)
        else:  # from the next turn on: this one read and parsed the list
            self._pending = self.clock.callLater(0, self._step, items, make, [], 0)

    def _step(self, items, make, infos, start):
        self._pending = None
        if start >= len(items):
            self.registry.update(self.backend, infos)
            return
        chunk = items[start:start + UPDATE_CHUNK]
        chunk = [make(i) for i in chunk] if make else chunk
        infos.extend(chunk)
        self.registry.prepare(self.backend, chunk)
        self._pending = self.clock.callLater(0, self._step, items, make, infos,
                                             start + UPDATE_CHUNK)

    def stop(self):
        pending, self._pending = self._pending, None
        if pending is not None and pending.active():
            pending.cancel()


def query(url, allowed):
    """The URL's query as a dict; an unknown or repeated key is an error."""
    params = {}
    for key, value in parse_qsl(urlsplit(url).query, keep_blank_values=True, strict_parsing=False):
        if key not in allowed:
            raise ValueError(f"unknown parameter {key!r} in {url!r} (known: {', '.join(sorted(allowed))})")
        if key in params:
            raise ValueError(f"parameter {key!r} given twice in {url!r}")
        params[key] = value
    return params


def _number_param(params, key, default, low, high, kind, what):
    value = params.get(key)
    if value is None:
        return default
    try:
        number = kind(value)
    except ValueError:
        raise ValueError(f"{key}={value!r} is not {what}") from None
    if not low <= number <= high:
        shown = number if kind is int else value
        raise ValueError(f"{key}={shown} is out of range {low}..{high}")
    return number


def int_param(params, key, default, low, high):
    """URL parameter ``key`` as a whole number in ``low..high`` (``default``
    when absent); ValueError naming the parameter otherwise."""
    return _number_param(params, key, default, low, high, int, "a whole number")


def float_param(params, key, default, low, high):
    """URL parameter ``key`` as a number in ``low..high`` (``default`` when
    absent); ValueError naming the parameter otherwise."""
    return _number_param(params, key, default, low, high, float, "a number")


def read_file(option, path):
    """The bytes of a file named by a URL parameter; ValueError naming it."""
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise ValueError(f"{option}={path!r}: {e.strerror}") from None


_PEM_CERT = re.compile(rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.S)


def tls_material(params):
    """``ca=`` (PEM file, one or more certificates) as a trust root and
    ``cert=``/``key=`` as a client certificate; each None when not given."""
    from twisted.internet import ssl

    trust_root = None
    if params.get("ca"):
        blocks = _PEM_CERT.findall(read_file("ca", params["ca"]))
        if not blocks:
            raise ValueError(f"ca={params['ca']!r}: no PEM certificate in it")
        try:
            trust_root = ssl.trustRootFromCertificates([ssl.Certificate.loadPEM(b) for b in blocks])
        except Exception as e:
            raise ValueError(f"ca={params['ca']!r}: not a usable certificate ({e})") from None
    client = None
    if params.get("key") and not params.get("cert"):
        raise ValueError("key= needs cert= (the client certificate)")
    if params.get("cert"):
        pem = read_file("cert", params["cert"])
        if params.get("key"):
            pem += b"\n" + read_file("key", params["key"])
        try:
            client = ssl.PrivateCertificate.loadPEM(pem)
        except Exception as e:
            raise ValueError(f"cert={params['cert']!r}: not a usable certificate and private key "
                             f"(key= may be left out when the file holds both) ({e})") from None
    return trust_root, client
