"""The one loader of every secret the proxy reads.

Secrets never come from the command line, where ``ps`` shows them: each has
a file option (``--client-password-file``, ``--rest-token-file``,
``--token-file``, ``--password-file``, ``token_file=``/``password_file=``
in backend URLs) and, for the options, an environment variable
(docs/backends.md, README.md's option table).
"""

import os


def read_secret(option, path=None, env=None, environ=None):
    """The secret for ``option`` (its name as the user wrote it, e.g.
    ``--token-file`` or ``token_file``), as ``str``.

    From the file ``path`` when given (not None): its first line, without surrounding
    white space.  Else from the environment variable ``env`` when it is set
    (``environ`` defaults to ``os.environ``).  None when neither is given.

    Raises ValueError with a one-line message naming the option (or the
    variable) when the file cannot be read, or when the value is empty or
    only white space: an empty secret would switch a check off, so it is
    never taken as "no secret".
    """
    if path is not None:
        if not path:
            raise ValueError(f"{_name(option)}: no file name given")
        try:
            with open(path, "rb") as f:
                first = f.readline()
        except OSError as e:
            raise ValueError(f"{_name(option)} {path!r}: {e.strerror}") from None
        value = first.decode("utf-8", "replace").strip()
        if not value:
            raise ValueError(f"{_name(option)} {path!r}: the file is empty (its first line holds no secret)")
        return value
    if env is not None:
        environ = os.environ if environ is None else environ
        if env in environ:
            value = environ[env].strip()
            if not value:
                raise ValueError(f"env {env} is set but empty (the secret for {_name(option)}); "
                                 f"give the secret or unset it")
            return value
    return None


def _name(option):
    """``--token-file`` for options, ``token_file=`` for URL parameters."""
    return option if option.startswith("-") else f"{option}="


def read_named_secrets(option, path):
    """Named secrets from the file ``path``: one ``NAME SECRET`` a line
    (blank lines and ``#`` comments skipped), as {NAME: SECRET}.

    Raises ValueError with a one-line message naming the option, the file
    and the line when the file cannot be read, a line has no secret (an
    empty secret would switch a check off), a name or a secret appears
    twice, or the file names nobody.  The secrets themselves are never
    part of a message.
    """
    if not path:
        raise ValueError(f"{_name(option)}: no file name given")
    try:
        with open(path, "rb") as f:
            text = f.read(1 << 20).decode("utf-8")
    except OSError as e:
        raise ValueError(f"{_name(option)} {path!r}: {e.strerror}") from None
    except UnicodeDecodeError:
        raise ValueError(f"{_name(option)} {path!r}: not UTF-8 text") from None
    found = {}
    seen = set()
    for n, line in enumerate(text.splitlines(), 1):
        fields = line.split()
        if not fields or fields[0].startswith("#"):
            continue
        if len(fields) != 2:
            raise ValueError(f"{_name(option)} {path!r} line {n}: expected NAME SECRET"
                             + (" (no secret)" if len(fields) == 1 else ""))
        name, secret = fields
        if name in found:
            raise ValueError(f"{_name(option)} {path!r} line {n}: the name {name!r} is given twice")
        if secret in seen:
            raise ValueError(f"{_name(option)} {path!r} line {n}: the same secret as an earlier line")
        found[name] = secret
        seen.add(secret)
    if not found:
        raise ValueError(f"{_name(option)} {path!r}: no NAME SECRET line in the file")
    return found
