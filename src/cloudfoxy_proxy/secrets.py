"""The one loader of every secret the proxy reads.

Secrets never come from the command line, where ``ps`` shows them: each has
a file option (``--client-password-file``, ``--rest-token-file``,
``--token-file``, ``--password-file``, ``token_file=``/``password_file=``
in backend URLs) and, for the options, an environment variable
(docs/backends.md, README.md's option table).
"""

import os
import sys


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


# -- foxyproxy-credentials: make, rotate and check --credentials entries ----

USAGE = """\
usage: foxyproxy-credentials NAME [--secret-file FILE]
       foxyproxy-credentials --rotate CREDENTIALS NAME [--secret-file FILE]
       foxyproxy-credentials --check CREDENTIALS

  NAME                  make a new client NAME: its [[client]] table (the
                        secret's SHA-256 only) goes to stdout, so
                        `foxyproxy-credentials NAME >> clients.toml` is safe
  --secret-file FILE    write the new secret to FILE (created, mode 0600;
                        an existing FILE is refused) instead of showing it
                        on the terminal (/dev/tty; stderr when there is none)
  --rotate CREDENTIALS  give the existing client NAME of the credentials file
                        a new secret: the file's secret_sha256 is replaced in
                        place (nothing else changes); a running proxy takes
                        it at its next start
  --check CREDENTIALS   validate a credentials file as start-up does: one
                        line naming the file, the client and the problem,
                        exit status 1
"""


def _fail(message, status=1):
    sys.stderr.write(f"foxyproxy-credentials: {message}\n")
    return status


def _check_name(name):
    if not name or name.startswith("-") or any(c in name for c in '"\\\n\r') or name != name.strip():
        raise ValueError(f"{name!r} is not a client name (no quotes, backslashes, "
                         f"line breaks or leading '-')")


def _give_secret(secret, name, path):
    """Hand the secret over: into ``path`` (mode 0600, never an existing
    file) or onto the terminal; never stdout."""
    if path is not None:
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except OSError as e:
            raise ValueError(f"--secret-file {path!r}: {e.strerror}") from None
        with os.fdopen(fd, "w") as f:
            f.write(secret + "\n")
        sys.stderr.write(f"foxyproxy-credentials: the secret for {name!r} is in {path} "
                         f"(mode 0600; give it to the client, then delete the file)\n")
        return
    text = (f"secret for {name!r} (give it to the client; it is stored nowhere):\n"
            f"  {secret}\n")
    try:
        with open("/dev/tty", "w") as tty:
            tty.write(text)
            return
    except OSError:
        pass
    sys.stderr.write(text)


def _new_secret():
    from .access import generate_secret, sha256_hex
    secret = generate_secret()
    return secret, sha256_hex(secret)


def _rotate(credentials, name, secret_file):
    """Replace client ``name``'s ``secret_sha256`` in the file
    ``credentials`` (atomically, keeping its mode); the rest of the text
    is kept as it is."""
    import re
    import tempfile

    from .access import load_credentials
    load_credentials(credentials)  # a broken file is reported, never rewritten
    with open(credentials, encoding="utf-8") as f:
        text = f.read()
    # the [[client]] tables, each from its header to the next header
    starts = [m.start() for m in re.finditer(r"(?m)^[ \t]*\[\[[ \t]*client[ \t]*\]\]", text)]
    bounds = list(zip(starts, starts[1:] + [len(text)]))
    name_rx = re.compile(r'(?m)^[ \t]*name[ \t]*=[ \t]*"' + re.escape(name) + r'"[ \t]*(#.*)?$')
    mine = [(a, b) for a, b in bounds if name_rx.search(text, a, b)]
    if len(mine) != 1:
        raise ValueError(f"--rotate {credentials!r}: no client {name!r} (written as "
                         f'name = "{name}") in the file')
    a, b = mine[0]
    secret, digest = _new_secret()
    table = text[a:b]
    hash_rx = re.compile(r'(?m)^([ \t]*secret_sha256[ \t]*=[ \t]*)"[0-9A-Fa-f]*"')
    if hash_rx.search(table):
        table = hash_rx.sub(lambda m: f'{m.group(1)}"{digest}"', table, count=1)
    else:  # a certificate-only client gets a secret too
        m = name_rx.search(table)
        table = table[:m.end()] + f'\nsecret_sha256 = "{digest}"' + table[m.end():]
    new = text[:a] + table + text[b:]
    folder = os.path.dirname(os.path.abspath(credentials))
    mode = os.stat(credentials).st_mode & 0o7777
    fd, tmp = tempfile.mkstemp(prefix=".credentials-", dir=folder)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(new)
        os.chmod(tmp, mode)
        access = load_credentials(tmp)
        if access.check(secret, None)[0].name != name:
            raise ValueError(f"--rotate {credentials!r}: the new secret does not name {name!r}")
        # the secret is handed over before the file changes: a failure
        # leaves the old file (and the old secret) in force
        _give_secret(secret, name, secret_file)
        os.replace(tmp, credentials)
    except BaseException:
        os.unlink(tmp)
        raise
    sys.stderr.write(f"foxyproxy-credentials: {credentials}: client {name!r} has a new secret "
                     f"(the proxy uses it from its next start; the old one until then)\n")


def main(argv=None):
    """``foxyproxy-credentials``: see ``USAGE``.  Exit status 0, 1 for a
    problem (one line on stderr), 2 for a usage error."""
    import argparse

    class Parser(argparse.ArgumentParser):
        def error(self, message):
            raise SystemExit(_fail(f"{message} (see --help)", 2))

    parser = Parser(prog="foxyproxy-credentials", usage=USAGE, add_help=False)
    parser.add_argument("-h", "--help", action="store_true")
    parser.add_argument("name", nargs="?")
    parser.add_argument("--secret-file")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--rotate", metavar="CREDENTIALS")
    group.add_argument("--check", metavar="CREDENTIALS")
    argv = sys.argv[1:] if argv is None else argv
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:
        return e.code
    if args.help:
        sys.stdout.write(USAGE)
        return 0
    from .access import load_credentials
    try:
        if args.check is not None:
            if args.name is not None or args.secret_file is not None:
                return _fail("--check takes only the credentials file (see --help)", 2)
            access = load_credentials(args.check)
            clients = {i.name for i in list(access.by_hash.values()) + list(access.by_cert.values())}
            sys.stdout.write(f"{args.check}: {len(clients)} client(s), valid\n")
            return 0
        if args.name is None:
            return _fail("give the client's NAME (see --help)", 2)
        _check_name(args.name)
        if args.rotate is not None:
            _rotate(args.rotate, args.name, args.secret_file)
            return 0
        secret, digest = _new_secret()
        _give_secret(secret, args.name, args.secret_file)
        sys.stdout.write(
            f"[[client]]\n"
            f"name = \"{args.name}\"\n"
            f"secret_sha256 = \"{digest}\"\n"
            f"readers = [\"*\"]        # glob patterns over reader names and aliases\n"
            f"# commands = [\"APDU\", \"RESET\", \"READERS\"]\n"
            f"# frontends = [\"line\", \"rest\"]\n")
        return 0
    except ValueError as e:
        message = str(e)
        if args.check is not None or (args.rotate is not None and not message.startswith("--")):
            message = f"--credentials {message}"
        return _fail(message)


if __name__ == "__main__":
    sys.exit(main())
