"""Backend URLs (CLI.md "Backends"): the scheme picks the module, which is
imported only when used (so pyscard and treq load only when needed).

Each module has ``from_url(url, config)``: it validates the URL (raising
ValueError with a message for the user) and returns ``make(reactor)``,
which builds the IBackend.
"""

import importlib
from urllib.parse import parse_qsl, urlsplit

SCHEMES = {
    "emulated": "cloudfoxy_proxy.backends.emulated",
    "pcsc": "cloudfoxy_proxy.backends.pcsc",
    "cloudfoxy+http": "cloudfoxy_proxy.backends.rest",
    "cloudfoxy+https": "cloudfoxy_proxy.backends.rest",
    "tcp": "cloudfoxy_proxy.backends.tcp",
    "tls": "cloudfoxy_proxy.backends.tcp",
}


def from_url(url, config):
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    module = SCHEMES.get(scheme)
    if module is None:
        known = ", ".join(f"{s}:" for s in SCHEMES)
        raise ValueError(f"unknown backend {url!r} (known: {known})")
    return importlib.import_module(module).from_url(url, config)


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


def int_param(params, key, default, low, high):
    value = params.get(key)
    if value is None:
        return default
    try:
        number = int(value)
    except ValueError:
        raise ValueError(f"{key}={value!r} is not a whole number") from None
    if not low <= number <= high:
        raise ValueError(f"{key}={number} is out of range {low}..{high}")
    return number


def float_param(params, key, default, low, high):
    value = params.get(key)
    if value is None:
        return default
    try:
        number = float(value)
    except ValueError:
        raise ValueError(f"{key}={value!r} is not a number") from None
    if not low <= number <= high:
        raise ValueError(f"{key}={value} is out of range {low}..{high}")
    return number
