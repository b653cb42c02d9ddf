"""Unit tests (in memory, Clock) of audit.py's write faults: a full disk
(``/dev/full`` answers every write ENOSPC), records lost and counted, one
log line per minute, /readyz and the metrics, recovery."""

import errno
import json
import os
import types

import pytest
from twisted.application.service import MultiService
from twisted.internet.task import Clock
from twisted.logger import formatEvent, globalLogPublisher

from test_metrics import get, render, run, samples, setup

from cloudfoxy_proxy import audit as audit_module
from cloudfoxy_proxy import ops
from cloudfoxy_proxy.audit import FAULT_LOG_EVERY, PROBE_EVERY, AuditLog
from cloudfoxy_proxy.frontends import status

from support import memory_core

SELECT_MF = "00A4000C023F00"


@pytest.fixture
def lines():
    """The proxy's log lines (text) while the test runs."""
    events = []
    globalLogPublisher.addObserver(events.append)
    yield events
    globalLogPublisher.removeObserver(events.append)


def audit_lines(events):
    return [formatEvent(e) for e in events if "audit log" in (e.get("log_format") or "")]


def request(d):
    """One request with a card command through the dispatcher: its answer."""
    return run(d, "Emulated 00", f"1:APDU:{SELECT_MF}")


def test_a_full_disk_loses_counted_records_logs_once_per_minute_and_recovers(tmp_path, lines):
    clock, registry, backend, d, m = setup("emulated:?cards=1")
    log = d.audit = AuditLog("/dev/full", clock)
    # every request is still answered; nothing of it reaches the file
    assert [request(d) for _ in range(50)] == [[("1", "9000")]] * 50
    assert log.lost == 50 and log.written == 0
    assert log.failing == "ENOSPC: No space left on device"
    first = audit_lines(lines)
    assert len(first) == 1 and "cannot write the audit log /dev/full (ENOSPC" in first[0]
    assert "Traceback" not in "".join(first)
    # the minute: more losses, and the retries every PROBE_EVERY s, log nothing more ...
    for _ in range(int(FAULT_LOG_EVERY / PROBE_EVERY) - 1):
        clock.advance(PROBE_EVERY)
        request(d)
    assert len(audit_lines(lines)) == 1
    # ... until a minute has passed: one line with the count since the first
    clock.advance(PROBE_EVERY)
    more = audit_lines(lines)[1:]
    assert len(more) == 1, more
    assert "60 audit records lost in the last 60 s, 61 since" in more[0]
    assert log.lost == 61
    # another minute with no requests at all: the retries still give its line
    clock.advance(FAULT_LOG_EVERY)
    assert len(audit_lines(lines)) == 3 and "0 audit records lost in the last 60 s" in audit_lines(lines)[2]
    # writable again (logrotate's SIGHUP after the operator moved the file)
    good = tmp_path / "audit.jsonl"
    log.path = str(good)
    log.reopen()
    assert log.failing is None and log.reasons() == []
    records = [json.loads(line) for line in good.read_text().splitlines()]
    assert [(r["event"], r["count"]) for r in records] == [("records_lost", 61)]
    assert records[0]["error"] == "ENOSPC: No space left on device"
    assert "written again" in audit_lines(lines)[-1] and "61 audit records were lost" in audit_lines(lines)[-1]
    request(d)
    records = [json.loads(line) for line in good.read_text().splitlines()]
    assert [r["event"] for r in records] == ["records_lost", "request"]
    assert log.written == 1 and log.lost == 61
    assert clock.getDelayedCalls() == []  # no retry left once it works


def test_readyz_is_not_ready_while_records_are_lost_and_ready_again_after(tmp_path):
    clock, registry, backend, d, m = setup("emulated:?cards=1")
    top = MultiService()
    top.startService()
    readiness = ops.Readiness(top, registry, [backend], clock)
    path = tmp_path / "audit.jsonl"
    log = d.audit = AuditLog(str(path), clock)
    readiness.checks.append(log.reasons)
    m.audit = log
    site = status.StatusSite(status.StatusResource(m, readiness, clock), memory_core(d, clock))
    request(d)
    assert render(site, "/readyz")[0] == 200
    assert get(samples(m), "foxyproxy_audit_records_total") == 1.0
    assert get(samples(m), "foxyproxy_audit_records_lost_total") == 0.0
    # the disk breaks: the next records are lost
    os.close(log.fd)
    log.fd = os.open("/dev/full", os.O_WRONLY)
    for _ in range(3):
        request(d)
    code, body, _ = render(site, "/readyz")
    assert code == 503
    assert json.loads(body)["reasons"] == [
        f"audit log {path} cannot be written (ENOSPC: No space left on device): "
        "3 records lost in all, the trail is incomplete"]
    assert get(samples(m), "foxyproxy_audit_records_lost_total") == 3.0
    assert get(samples(m, readiness.reasons), "foxyproxy_ready") == 0.0
    # it works again: the next retry writes the records_lost line, ready again
    os.close(log.fd)
    log.fd = os.open(str(path), os.O_WRONLY | os.O_APPEND)
    clock.advance(PROBE_EVERY)
    assert render(site, "/readyz")[0] == 200
    events = [json.loads(line)["event"] for line in path.read_text().splitlines()]
    assert events == ["request", "records_lost"]
    log.stopService()


class ShortWrites:
    """``os`` for audit.py whose write stores ``room`` more bytes, then
    fails ENOSPC (a file system that fills up in the middle of a record)."""

    def __init__(self, room):
        self.room = room

    def __getattr__(self, name):
        return getattr(os, name)

    def write(self, fd, data):
        if self.room <= 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        n = os.write(fd, data[:self.room])
        self.room -= n
        return n


def test_a_record_written_in_part_is_cut_off_again(tmp_path, monkeypatch):
    clock = Clock()
    path = tmp_path / "audit.jsonl"
    log = AuditLog(str(path), clock)
    log.write({"event": "request", "n": 1})
    size = path.stat().st_size
    monkeypatch.setattr(audit_module, "os", ShortWrites(room=10))
    log.write({"event": "request", "n": 2})
    assert path.stat().st_size == size  # nothing of the second record is left
    assert log.lost == 1
    monkeypatch.setattr(audit_module, "os", types.SimpleNamespace(**{
        k: getattr(os, k) for k in dir(os) if not k.startswith("__")}))
    log.write({"event": "request", "n": 3})
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert [(r["event"], r.get("n"), r.get("count")) for r in records] == [
        ("request", 1, None), ("records_lost", None, 1), ("request", 3, None)]
    assert clock.getDelayedCalls() == []


def test_a_failed_reopen_keeps_the_open_file_and_logs_one_line(tmp_path, lines):
    clock = Clock()
    path = tmp_path / "audit.jsonl"
    log = AuditLog(str(path), clock)
    log.path = str(tmp_path / "gone" / "audit.jsonl")
    log.reopen()
    said = audit_lines(lines)
    assert len(said) == 1 and "cannot open the audit log" in said[0] and "still writing" in said[0]
    log.write({"event": "request"})
    assert len(path.read_text().splitlines()) == 1
    assert log.failing is None


def test_metrics_have_no_audit_series_without_an_audit_log():
    clock, registry, backend, d, m = setup("emulated:?cards=1")
    assert not [k for k in samples(m) if k[0].startswith("foxyproxy_audit")]
