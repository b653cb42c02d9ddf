"""Owner ids (docs/protocol.md "### OWNER", docs/tcp.md "Owner-stable names").

An *owner* is a proxy whose cards other proxies (*fronts*) serve through
``tcp://`` / ``tls://`` backends.  It answers the line command ``OWNER``
with its id (``--owner-id NAME``, default the host name); a front names
that owner's readers ``<owner id>/<upstream name>`` unless the backend URL
gives ``prefix=``.  So the same name is the same card on every front,
whatever order the owners answered in.

* :func:`check_owner_id` / :func:`default_owner_id`: what an id may be;
* :class:`OwnerClaims`: one per reader registry (:func:`claims`), the
  owner ids that name the process's upstream backends' readers, so that a
  second upstream named by an id already taken is refused (as is one whose
  reader names another backend has); a conflict found while
  the process is still starting (before every upstream configured at
  start has answered or failed once) stops it with one line on stderr
  (:func:`stop_process`), later the newcomer is refused with a log line.
"""

import atexit
import os
import re
import socket
import sys
import weakref

from . import errors
from .logs import Logger

#: An owner id: 1..63 characters of letters, digits, ``.``, ``_`` and ``-``.
OWNER_ID = re.compile(r"[A-Za-z0-9._-]{1,63}")

log = Logger(namespace="cloudfoxy_proxy.owners")


def check_owner_id(text):
    """``text`` if it is a usable owner id, else ValueError saying why."""
    if not isinstance(text, str) or not OWNER_ID.fullmatch(text):
        raise ValueError(f"{text!r} is not an owner id: 1 to 63 characters of A-Z a-z 0-9 . _ -")
    if errors.is_error(text):
        raise ValueError(f"{text!r} is not an owner id: it reads as the result code {text}")
    return text


def is_owner_id(text):
    """True when an upstream's OWNER answer is an owner id (not a result code)."""
    return isinstance(text, str) and OWNER_ID.fullmatch(text) is not None and not errors.is_error(text)


def default_owner_id(hostname=None):
    """The default ``--owner-id``: the host name (``socket.gethostname()``),
    or its first label when the whole name is not an owner id (too long);
    ValueError when neither is."""
    name = socket.gethostname() if hostname is None else hostname
    for candidate in (name, name.split(".", 1)[0]):
        if is_owner_id(candidate):
            return candidate
    raise ValueError(f"the host name {name!r} is not an owner id (1 to 63 characters of "
                     "A-Z a-z 0-9 . _ -): give --owner-id NAME")


def stop_process(message):
    """A conflict found at start-up: ``message`` as one line on stderr (and
    in the log), then the reactor stops and the process exits with status 1."""
    from twisted.internet import reactor

    err = sys.__stderr__ or sys.stderr  # twistd sends sys.stderr to the log
    err.write(f"twistd foxyproxy: {message}\n")
    err.flush()
    log.critical("{refusal}: stopping", refusal=message)
    atexit.register(_exit_1)  # after twistd's own clean-up (pid file, logs)
    if reactor.running:
        reactor.stop()


def _exit_1():
    for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        try:
            stream.flush()
        except Exception:
            pass
    os._exit(1)


class OwnerClaims:
    """The owner ids of one process's upstream backends (one instance per
    reader registry: :func:`claims`).

    A backend calls :meth:`begin` when it starts, :meth:`settled` once its
    upstream answered its first OWNER/READERS request (or the first attempt
    failed), :meth:`claim` before listing an owner's readers, :meth:`refused`
    when it does not list them, and :meth:`release` when it stops.
    ``starting`` is True until every backend that began while it was True
    has settled: a conflict found then is known at start-up and calls
    ``fatal(message)`` (default :func:`stop_process`)."""

    def __init__(self, fatal=stop_process):
        self.fatal = fatal
        self.starting = True
        self._owners = {}  # owner id -> the backend holding it
        self._unsettled = set()  # id() of backends that began while starting, not settled yet

    def begin(self, backend):
        if self.starting:
            self._unsettled.add(id(backend))

    def settled(self, backend):
        self._unsettled.discard(id(backend))
        if self.starting and not self._unsettled:
            self.starting = False

    def claim(self, backend, owner):
        """None when ``backend`` may list the readers of ``owner`` (it holds
        the id from now on), else the backend that holds it."""
        holder = self._owners.setdefault(owner, backend)
        return None if holder is backend else holder

    def holder(self, owner):
        """The backend that holds ``owner``, or None."""
        return self._owners.get(owner)

    def refused(self, backend, message):
        """``backend`` does not list an upstream's readers (``message`` says
        why): fatal while starting, else the caller logs it."""
        if self.starting:
            self.fatal(message)
            return True
        return False

    def release(self, backend):
        for owner, holder in list(self._owners.items()):
            if holder is backend:
                del self._owners[owner]
        self.settled(backend)


_CLAIMS = weakref.WeakKeyDictionary()


def claims(registry):
    """The :class:`OwnerClaims` of the backends of ``registry``."""
    found = _CLAIMS.get(registry)
    if found is None:
        found = _CLAIMS[registry] = OwnerClaims()
    return found
