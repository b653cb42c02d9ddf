"""``--audit-log`` on a real ``twistd foxyproxy`` whose audit file system
fills up: a 16 KiB tmpfs mounted in a mount namespace of the proxy's own
(nothing outside sees it; the test reaches it through
``/proc/PID/root``).  Requests keep being answered, the lost records are
counted in the metrics, /readyz is 503 while they are lost and 200 again
once the space is back (with no request needed), the proxy's log has one
line per minute about it, and the trail holds whole JSON lines only, with a
``records_lost`` line where the gap is."""

import ctypes
import errno
import json
import os
import time

import pytest

from support import wait_for
from test_operations_integration import http, metrics_proxy, scrape, value

SELECT_MF = "00A4000C023F00"
CLONE_NEWNS = 0x00020000
MS_REC, MS_PRIVATE = 0x4000, 0x40000

pytestmark = pytest.mark.integration


def private_tmpfs(mountpoint, size):
    """A preexec_fn: the child gets a mount namespace of its own with a
    tmpfs of ``size`` at ``mountpoint``."""
    libc = ctypes.CDLL(None, use_errno=True)

    def preexec():
        if libc.unshare(CLONE_NEWNS) != 0:
            os._exit(97)
        if libc.mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None) != 0:
            os._exit(98)
        if libc.mount(b"tmpfs", mountpoint.encode(), b"tmpfs", 0, f"size={size}".encode()) != 0:
            os._exit(99)

    return preexec


def fill(path):
    """Write ``path`` until the file system is full."""
    with open(path, "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"x" * 512)
        except OSError as e:
            assert e.errno == errno.ENOSPC


def fault_lines(log):
    return [line for line in log.splitlines() if "cannot write the audit log" in line]


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")
def test_a_full_audit_disk_loses_counted_records_not_requests_and_readyz_follows(proxy_factory, tmp_path):
    mnt = tmp_path / "audit-fs"
    mnt.mkdir()
    p = metrics_proxy(proxy_factory, "--no-signing", "--audit-log", str(mnt / "audit.jsonl"),
                      preexec_fn=private_tmpfs(str(mnt), "16k"))
    inside = f"/proc/{p.proc.pid}/root{mnt}"  # the proxy's tmpfs, seen from here
    assert not os.listdir(mnt)  # the tmpfs is not in our mount namespace
    wait_for(lambda: http(p.metrics_port, "/readyz")[0] == 200, what="ready")
    with p.client() as c:
        for _ in range(5):
            assert c.results(f">Emulated 00|\n>1:APDU:{SELECT_MF}|\n\n") == ["9000"]
        fill(f"{inside}/filler")
        # 65 s of requests at 4 per second with the disk full: all answered
        # (the first few still fit in the audit file's last page)
        began = time.monotonic()
        sent, first_lost = 0, None
        while time.monotonic() - began < 65:
            assert c.results(f">Emulated 00|\n>1:APDU:{SELECT_MF}|\n\n") == ["9000"]
            sent += 1
            if first_lost is None:
                status, body = http(p.metrics_port, "/readyz")
                if status == 503:
                    first_lost = sent
                    reason = json.loads(body)["reasons"][0]
                    assert f"audit log {mnt}/audit.jsonl cannot be written (ENOSPC" in reason
                else:
                    assert sent < 100, "the audit log never failed"
            time.sleep(0.25)
    assert first_lost is not None
    samples = scrape(p.metrics_port)
    lost = value(samples, "foxyproxy_audit_records_lost_total")
    written = value(samples, "foxyproxy_audit_records_total")
    assert lost == sent - first_lost + 1  # every request from the first loss on: each counted
    assert written == 5 + first_lost - 1
    assert value(samples, "foxyproxy_ready") == 0
    # one line at the first loss and one a minute later, with the count
    said = fault_lines(p.log())
    assert len(said) == 2, said
    assert "audit records are being lost" in said[0]
    assert "audit records lost in the last 60 s" in said[1]
    assert "Traceback" not in p.log()
    # the space comes back: ready again without any request (the retry)
    os.unlink(f"{inside}/filler")
    wait_for(lambda: http(p.metrics_port, "/readyz")[0] == 200, timeout=10, what="ready again")
    with p.client() as c:
        assert c.results(f">Emulated 00|\n>1:APDU:{SELECT_MF}|\n\n") == ["9000"]
    wait_for(lambda: "written again" in p.log(), timeout=5, what="the recovery line")
    with open(f"{inside}/audit.jsonl") as f:
        records = [json.loads(line) for line in f]  # whole JSON lines only
    events = [r["event"] for r in records]
    assert events == ["request"] * int(written) + ["records_lost", "request"]
    assert records[-2]["count"] == lost and records[-2]["error"].startswith("ENOSPC")
    assert value(scrape(p.metrics_port), "foxyproxy_audit_records_total") == written + 1
