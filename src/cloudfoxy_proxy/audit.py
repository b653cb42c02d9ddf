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
  recognised;
* after records were lost (``"event": "records_lost"``): ``time``,
  ``count`` (records that could not be written), ``since`` (UTC time of the
  first of them) and ``error``; it is the first line written once writing
  works again.

Never APDU data, PINs, digests, signatures or secrets.  The file is opened
again by :meth:`AuditLog.reopen` (SIGHUP, after logrotate moved it).

Write errors (a full disk, EIO) never fail a request: the record is lost
and counted (``lost``, metric ``foxyproxy_audit_records_lost_total``), the
proxy's log says so once and then once per FAULT_LOG_EVERY seconds with a
count, ``reasons()`` makes ``/readyz`` not ready, and every
PROBE_EVERY seconds the ``records_lost`` line is tried again, so writing
is found working again even when no request comes (a load balancer sends
none to a proxy that is not ready).  Each record is one ``write(2)`` to a
file opened ``O_APPEND``; a record written only in part is cut off again,
so the file only ever holds whole lines.
"""

import errno
import json
import os
import time
from time import perf_counter

from twisted.application.service import Service

from . import errors
from .logs import Logger
from .parser import CARD_COMMANDS, SIGN

#: While records are being lost, one log line at most this often (seconds).
FAULT_LOG_EVERY = 60.0
#: While records are being lost, writing is tried again this often (seconds).
PROBE_EVERY = 5.0


def _utc(seconds=None):
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + "Z"


def _reason(e):
    name = errno.errorcode.get(e.errno, "") if isinstance(e, OSError) and e.errno else ""
    text = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
    return f"{name}: {text}" if name else text


class AuditLog(Service):
    """Appends audit records to ``path``.  ``clock`` (an IReactorTime, the
    reactor when None) paces the fault log line and the retries; record
    timestamps are wall-clock UTC.

    ``written`` and ``lost`` count records (metrics); ``failing`` is the
    error text (e.g. ``"ENOSPC: No space left on device"``) while records
    are being lost, else None.  ``stop()`` ends the retries (the service
    tree's stop: it is a Service)."""

    log = Logger()

    def __init__(self, path, clock=None):
        if clock is None:
            from twisted.internet import reactor as clock
        self.path = path
        self.clock = clock
        self.fd = None
        self.written = 0
        self.lost = 0
        self.failing = None
        self._since = None  # wall-clock time of the first lost record of this fault
        self._since_clock = None  # clock time of the same
        self._gap = 0  # lost since the last records_lost line (written first when it works again)
        self._lost_logged = 0  # self.lost at the last log line
        self._next_line = 0.0
        self._probe = None
        self.reopen()

    def reopen(self):
        """Open ``path`` again (SIGHUP): an OSError at start-up; later, one
        log line, and the file opened before stays in use."""
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
        except OSError as e:
            if self.fd is None:
                raise
            self.log.warn("cannot open the audit log {path} again ({error}); still writing to the "
                          "file opened before", path=self.path, error=_reason(e))
            return
        old, self.fd = self.fd, fd
        if old is not None:
            os.close(old)
        if self.failing is not None:
            self._try_again()  # perhaps a new file system: know at once

    def stopService(self):
        self.stop()
        return super().stopService()

    def stop(self):
        if self._probe is not None and self._probe.active():
            self._probe.cancel()
        self._probe = None

    def reasons(self):
        """Why /readyz is not ready because of the audit log ([] when fine)."""
        if self.failing is None:
            return []
        return [f"audit log {self.path} cannot be written ({self.failing}): "
                f"{self.lost} records lost in all, the trail is incomplete"]

    def write(self, record):
        record = dict(time=_utc(), **record)
        line = json.dumps(record, separators=(",", ":"), sort_keys=False) + "\n"
        if self._gap:
            line = self._gap_line() + line
        try:
            self._append(line.encode("utf-8"))
        except (OSError, ValueError) as e:
            self._lost(e)
            return
        self.written += 1
        if self.failing is not None:
            self._recovered()

    def _gap_line(self):
        return json.dumps({"time": _utc(), "event": "records_lost", "count": self._gap,
                           "since": _utc(self._since), "error": self.failing},
                          separators=(",", ":")) + "\n"

    def _append(self, data):
        """One record (or two) as whole lines, or an OSError and nothing
        of it left in the file."""
        fd = self.fd
        done = os.write(fd, data)
        if done == len(data):
            return
        try:
            while done < len(data):
                n = os.write(fd, data[done:])
                if n <= 0:
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                done += n
        except OSError:
            try:  # O_APPEND: the offset is the file's end, just after our part
                os.ftruncate(fd, os.lseek(fd, 0, os.SEEK_CUR) - done)
            except OSError:
                pass
            raise

    def _lost(self, e):
        now = self.clock.seconds()
        self.lost += 1
        self._gap += 1
        if self.failing is None:
            self.failing = _reason(e)
            self._since, self._since_clock = time.time(), now
            self._next_line = now + FAULT_LOG_EVERY
            self._lost_logged = self.lost
            self.log.warn("cannot write the audit log {path} ({error}): audit records are being "
                          "lost (counted in foxyproxy_audit_records_lost_total; /readyz is not ready "
                          "until a write succeeds; requests are still served)",
                          path=self.path, error=self.failing)
            self._schedule()
        else:
            self.failing = _reason(e)
            self._minute()

    def _minute(self):
        """The fault's log line once per FAULT_LOG_EVERY, with a count."""
        now = self.clock.seconds()
        if now < self._next_line:
            return
        seconds = now - self._next_line + FAULT_LOG_EVERY
        self._next_line = now + FAULT_LOG_EVERY
        n, self._lost_logged = self.lost - self._lost_logged, self.lost
        self.log.warn("cannot write the audit log {path} ({error}): {n} audit records lost in the "
                      "last {seconds:.0f} s, {total} since {since}",
                      path=self.path, error=self.failing, n=n, seconds=seconds, total=self._gap,
                      since=_utc(self._since))

    def _schedule(self):
        if self._probe is None or not self._probe.active():
            self._probe = self.clock.callLater(PROBE_EVERY, self._try_again)

    def _try_again(self):
        """While failing: write the records_lost line alone."""
        if self._probe is not None and self._probe.active():
            self._probe.cancel()
        self._probe = None
        if self.failing is None:
            return
        try:
            self._append(self._gap_line().encode("utf-8"))
        except (OSError, ValueError) as e:
            self.failing = _reason(e)
            self._minute()
            self._schedule()
            return
        self._recovered()

    def _recovered(self):
        seconds = self.clock.seconds() - self._since_clock
        self.log.warn("the audit log {path} is written again after {seconds:.1f} s: {n} audit records "
                      "were lost since {since} (a records_lost line in the file says so)",
                      path=self.path, seconds=seconds, n=self._gap, since=_utc(self._since))
        self.failing = None
        self._gap = 0
        self.stop()

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
        if session.on_behalf_of is not None:  # a relaying proxy's client (relay.py)
            record["on_behalf_of"] = session.on_behalf_of
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
