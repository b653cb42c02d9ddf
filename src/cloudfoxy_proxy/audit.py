"""``--audit-log FILE``: who used which card (docs/security.md, "Audit log").

One JSON object per line, appended:

* per request with card commands (``"event": "request"``): ``time`` (UTC,
  ISO 8601), ``identity``, ``peer``, ``frontend``, ``reader`` (the canonical
  name, or null when the reader line named no reader exactly), ``commands``
  (command name -> count), ``count``, ``results`` (result code or ``OK`` ->
  count), ``duration_ms``; for SIGN also ``alias`` (the reader line) and
  ``algorithm`` (the digest algorithm named, if any);
* per failed authentication (``"event": "auth_failure"``): ``time``,
  ``peer``, ``frontend``, ``reason`` and ``identity`` when one was
  recognised.

Never APDU data, PINs, digests, signatures or secrets.  The file is opened
again by :meth:`AuditLog.reopen` (SIGHUP, after logrotate moved it).
"""

import json
import time
from time import perf_counter

from . import errors
from .logs import Logger
from .parser import CARD_COMMANDS, SIGN


class AuditLog:
    """Appends audit records to ``path``; ``clock`` is unused but kept for
    symmetry with the other services (timestamps are wall-clock UTC)."""

    log = Logger()

    def __init__(self, path, clock=None):
        self.path = path
        self.file = None
        self.reopen()

    def reopen(self):
        old, self.file = self.file, open(self.path, "a", encoding="utf-8", buffering=1)
        if old is not None:
            old.close()

    def write(self, record):
        record = dict(time=time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()) + "Z", **record)
        try:
            self.file.write(json.dumps(record, separators=(",", ":"), sort_keys=False) + "\n")
        except (OSError, ValueError):
            self.log.failure("cannot write the audit log {path}", path=self.path)

    def request(self, run):
        """A finished request of the dispatcher (a run.RequestRun); only
        requests with card commands (RESET, APDU, SIGN) that the access
        check let run are written (a refused one is an ``auth_failure``
        line when a wrong secret was presented, on every front end)."""
        identity = run.identity
        if identity is None or identity.__class__ is str or not any(
                c.name in CARD_COMMANDS for c in run.request.commands):
            return  # refused, or no card command got as far as the access check
        session = run.session
        reader = run.reader
        commands, results = {}, {}
        sign = None
        for command in run.request.commands:
            commands[command.name] = commands.get(command.name, 0) + 1
            if command.name == SIGN and command.error is None:
                sign = command
        for _cid, result in run.lines:
            key = result if errors.is_error(result) else "OK"
            results[key] = results.get(key, 0) + 1
        record = {
            "event": "request",
            "identity": getattr(identity, "name", None),
            "peer": session.peer,
            "frontend": session.frontend,
            # the canonical name (also of a reader the identity may not
            # see, named exactly), or null: a reader line that names no
            # reader may be anything the client typed (a mistyped secret)
            "reader": reader.name if hasattr(reader, "name") else (
                run.request.reader if run.d.registry.get(run.request.reader) is not None else None),
            "commands": commands,
            "count": len(run.request.commands),
            "results": results,
            "duration_ms": round((perf_counter() - run.begun) * 1000, 3),
        }
        if sign is not None:
            record["alias"] = (run.request.reader or "").partition(":")[0][:200] if hasattr(reader, "name") else None
            record["algorithm"] = sign.obj[:40] or None
        self.write(record)

    def auth_failure(self, session, reason, identity=None):
        record = {"event": "auth_failure", "peer": session.peer, "frontend": session.frontend,
                  "reason": reason}
        if identity is not None:
            record["identity"] = identity.name
        self.write(record)
