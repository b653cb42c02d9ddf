"""``--config FILE``: every option in a TOML file, under its command-line
name; the command line overrides the file.

    port = "tcp:4001:interface=127.0.0.1"
    backend = ["cloudfoxy+https://rack:8081?ca=/etc/foxyproxy/ca.pem"]
    vpcd = ["127.0.0.1:35963=CloudFoxy 01"]
    token-file = "/run/credentials/foxyproxy.service/token"

    [limits]              # tables only group keys; the names stay flat
    max-queue = 50

Values: strings (numbers are accepted for numeric options), ``true`` /
``false`` for flags, lists of strings for the repeatable options
(``listen``, ``backend``, ``vpcd``, ``ram-connect``, ``api-cors-origin``, ``trace``, ``trace-readers``).  A repeatable option given on the
command line replaces the file's list.  An unknown key or a bad value stops
start-up with one line naming the file, the line and the key.

tomllib reports line numbers only for syntax errors, not for keys, so the
line of a key is found by scanning the file's text for ``KEY =`` (bare or
quoted, at the start of a line); a key written as part of a dotted name
(``limits.max-queue = 1``) is reported at its table's line or at line 1.
"""

import getopt
import re

from twisted.python import usage

#: Options that may be given more than once: a list in the file.
REPEATABLE = ("listen", "backend", "vpcd", "ram-connect", "api-cors-origin", "trace", "trace-readers",
              "proxy-protocol-from")


def given_options(options, argv):
    """The long names of the options ``argv`` sets (parsed as usage.Options
    would; empty when it does not parse: parseOptions reports that)."""
    try:
        opts, _ = getopt.getopt(argv, options.shortOpt, options.longOpt)
    except getopt.error:
        return set()
    given = set()
    for opt, _ in opts:
        name = opt[2:] if opt.startswith("--") else opt[1:]
        name = options.synonyms.get(name) or options.synonyms.get(name.replace("-", "_"), name)
        given.add(name.replace("_", "-"))
    return given


def line_of(text, key):
    """The 1-based line where ``key = ...`` is written (1 if not found)."""
    pattern = re.compile(r"""^[ \t]*(?:%s|"%s"|'%s')[ \t]*=""" % ((re.escape(key),) * 3), re.M)
    m = pattern.search(text)
    return text.count("\n", 0, m.start()) + 1 if m else 1


def _flatten(path, text, data):
    """(key, value, line) of every option in the parsed file; tables group."""
    out = []
    for key, value in data.items():
        if isinstance(value, dict):
            for sub, subvalue in value.items():
                if isinstance(subvalue, dict):
                    raise usage.UsageError(f"{path}:{line_of(text, sub)}: {key}.{sub}: "
                                           "tables nest one level only")
                out.append((sub, subvalue, line_of(text, sub)))
        else:
            out.append((key, value, line_of(text, key)))
    return out


def apply(options, path, given):
    """Set every option of the file at ``path`` that the command line did
    not (``given``: long names).  Returns ``{option: "PATH:LINE"}`` of what
    it set.
    Raises UsageError with ``PATH:LINE: ...`` for a bad file."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise usage.UsageError(f"--config {path!r}: {e.strerror}") from None
    text = raw.decode("utf-8", "replace")
    try:  # imported here: only --config needs a TOML parser
        import tomllib
    except ModuleNotFoundError:  # Python < 3.11: the same parser, from PyPI
        import tomli as tomllib
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise usage.UsageError(f"{path}: not valid TOML: {e}") from None
    flags = {name.replace("_", "-") for name in options.longOpt if not name.endswith("=")}
    params = {name[:-1] for name in options.longOpt if name.endswith("=")}
    seen = {}
    applied = {}
    for key, value, line in _flatten(path, text, data):
        where = f"{path}:{line}: {key}"
        if key in seen:
            raise usage.UsageError(f"{where}: given twice (also line {seen[key]})")
        seen[key] = line
        if key in ("config", "help", "version") or key not in flags | params:
            raise usage.UsageError(f"{where}: unknown option")
        if key in given:
            continue
        applied[key] = f"{path}:{line}"
        if key in REPEATABLE:
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise usage.UsageError(f"{where}: expected a list of strings, e.g. {key} = [\"...\"]")
            handler = getattr(options, "opt_" + key.replace("-", "_"))
            try:
                for item in value:
                    handler(item)
            except usage.UsageError as e:
                raise usage.UsageError(f"{path}:{line}: {e}") from None
        elif key in flags:
            if not isinstance(value, bool):
                raise usage.UsageError(f"{where}: expected true or false")
            options[key] = 1 if value else 0
        else:
            if isinstance(value, bool) or not isinstance(value, (str, int, float)):
                raise usage.UsageError(f"{where}: expected a string or a number")
            options[key] = str(value)
    return applied


def locate(error, from_file):
    """A UsageError about ``--OPTION`` set from the file, with the file's
    line in front (``from_file`` as returned by :func:`apply`)."""
    message = str(error)
    m = re.match(r"--([\w-]+)", message)
    if m and m.group(1) in from_file:
        return usage.UsageError(f"{from_file[m.group(1)]}: {message}")
    return error
