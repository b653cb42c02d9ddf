"""``--trace`` and ``emulated:?replay=`` on the real stack (docs/trace.md):

* an OpenSC session (``pkcs11-tool -L``, ``--read-object``) on the emulated
  PIV card through the vpcd bridge (real pcscd + vpcd, the PC/SC rig) is
  recorded, then replayed by a proxy whose only card is the replay: the
  same output, byte for byte;
* Debian's ``tshark`` decodes every recorded command of a pcapng trace;
* a trace taken through each front end names it;
* SIGHUP reopens the trace after it was moved.
"""

import json
import os
import shutil
import signal
import subprocess
import time

import pytest

import pcsc_rig as rigmod
from support import LineClient, ProxyProcess, wait_for

SLOT = 1
READER = rigmod.reader_name(SLOT)  # "Virtual PCD 00 01"
PKCS11 = "/usr/lib/x86_64-linux-gnu/opensc-pkcs11.so"
PIV_AID = "A00000030800001000"


def need(*tools):
    for tool in tools:
        if not (shutil.which(tool) or os.path.exists(tool)):
            pytest.fail(f"{tool} is not installed: tests/run.sh installs it (tests/debian-packages.txt)")


def records(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


@pytest.fixture
def slot(pcsc_rig):
    """pcscd running and vpcd slot 1 free (no vicc); empty again afterwards."""
    rig = pcsc_rig
    if rig.pcscd is None or rig.pcscd.poll() is not None:
        rig.start()
    if rig.card_pid(SLOT) is not None:
        rig.stop_card(SLOT)
    yield rig
    if rig.pcscd is not None and rig.pcscd.poll() is None:
        rig.wait_card(SLOT, False, 10)


def opensc_session(tmp_path, name):
    """What an OpenSC user sees: the token list and the PIV authentication
    certificate (DER), read through pcscd."""
    listing = subprocess.run(["pkcs11-tool", "--module", PKCS11, "-L"], capture_output=True, timeout=60)
    assert listing.returncode == 0, listing.stderr
    out = tmp_path / f"{name}.der"
    read = subprocess.run(["pkcs11-tool", "--module", PKCS11, "--slot-description", READER,
                           "--read-object", "--type", "cert", "--id", "01", "--output-file", str(out)],
                          capture_output=True, timeout=60)
    assert read.returncode == 0, read.stderr
    return listing.stdout, out.read_bytes()


def test_opensc_session_on_the_piv_card_replays_identically(slot, tmp_path):
    need("pkcs11-tool", PKCS11)
    trace = str(tmp_path / "piv.jsonl")
    vpcd = f"127.0.0.1:{slot.port(SLOT)}=Emulated 00"
    live = ProxyProcess("--backend", "emulated:?type=piv&cards=1", "--vpcd", vpcd, "--trace", trace).start()
    try:
        slot.wait_card(SLOT, True, 15)
        listing, cert = opensc_session(tmp_path, "live")
    finally:
        live.stop()
    slot.wait_card(SLOT, False, 15)
    assert READER.encode() in listing and b"PIV" in listing, listing
    assert cert[:1] == b"\x30" and len(cert) > 300  # a DER certificate
    recorded = records(trace)
    assert any(r["frontend"] == "vpcd" and r["event"] == "reset" for r in recorded)
    assert any(r["frontend"] == "vpcd" and r.get("command", "").startswith("00A40400") for r in recorded)

    # The replaying proxy has no card but the recording.
    replay = ProxyProcess("--backend", f"emulated:?replay={trace}", "--vpcd", vpcd).start()
    try:
        slot.wait_card(SLOT, True, 15)
        again = opensc_session(tmp_path, "replayed")
    finally:
        replay.stop()
    slot.wait_card(SLOT, False, 15)
    assert "diverged" not in replay.log(), replay.log()
    assert again == (listing, cert)


def test_tshark_decodes_every_recorded_command(proxy_factory, tmp_path):
    need("tshark")
    pcap = str(tmp_path / "t.pcapng")
    jsonl = str(tmp_path / "t.jsonl")
    proxy = proxy_factory("--backend", "emulated:?type=piv&cards=1", "--trace", pcap, "--trace", jsonl)
    commands = ["00A4040009" + PIV_AID, "00CB3FFF055C035FC10200", "0020008008313233343536FFFF",
                "00840000" + "08", "00B0000004"]
    with LineClient(port=proxy.port) as c:
        lines = c.request(">Emulated 00|\n" + "".join(f">{i}:APDU:{a}|\n" for i, a in enumerate(commands))
                          + "\n")
    assert len(lines) == len(commands)
    wait_for(lambda: sum(r["frontend"] == "line" for r in records(jsonl)) == len(commands), 10)
    line = [r for r in records(jsonl) if r["frontend"] == "line"]
    out = subprocess.run(["tshark", "-r", pcap, "-T", "fields", "-e", "gsm_sim.apdu.ins",
                          "-e", "gsm_sim.apdu.sw"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    rows = [row.split("\t") for row in out.stdout.splitlines()]
    # every exchange of the JSON-lines trace is a frame with its instruction and status word
    every = records(jsonl)
    assert len(rows) == len(every)
    for row, r in zip(rows, every):
        assert int(row[0], 16) == int(r["command"][2:4], 16), (row, r)
        # the dissector reads a response as P3 data bytes then SW1 SW2 (T=0): a short
        # error answer to a command with Le (READ BINARY's 6D00 here) shows no status word
        if row[1:] and row[1]:
            assert int(row[1], 16) == int(r["response"][-4:], 16), (row, r)
    assert sum(bool(row[1:] and row[1]) for row in rows) >= len(rows) - 1
    summary = subprocess.run(["tshark", "-r", pcap], capture_output=True, text=True, timeout=60).stdout
    assert "GSM SIM" in summary and "ISO/IEC 7816-4 SELECT Application a00000030800001000" in summary, summary
    assert "VERIFY" in summary and "313233343536" not in summary
    assert line[2]["redacted"] == 8 and line[2]["command"] == "0020008008"


def test_every_front_end_is_named_in_the_trace(proxy_factory, tmp_path):
    """The line protocol, the HTTP/JSON API and REST all reach the card
    through the dispatcher: each exchange is in the trace with its front
    end, identity and peer."""
    import urllib.request

    trace = str(tmp_path / "t.jsonl")
    token = tmp_path / "token"
    token.write_text("secret-token-1234567890\n")
    proxy = proxy_factory("--trace", trace, "--no-signing", "--api", "tcp:0:interface=127.0.0.1",
                          "--api-token-file", str(token), "--rest", "tcp:0:interface=127.0.0.1",
                          "--rest-token-file", str(token), listeners=3)
    with LineClient(port=proxy.port) as c:
        assert c.results(">Emulated 00|\n>1:APDU:00A4000C023F00|\n\n") == ["9000"]
    api = urllib.request.Request(
        f"http://127.0.0.1:{proxy.ports['ApiSite'][0]}/api/v1/readers/Emulated%2001/transmit",
        data=json.dumps({"apdus": ["00A4000C023F00"]}).encode(),
        headers={"Authorization": "Bearer secret-token-1234567890"})
    with urllib.request.urlopen(api, timeout=10) as r:
        assert json.load(r)["responses"] == ["9000"]
    rest = urllib.request.Request(
        f"http://127.0.0.1:{proxy.ports['Site'][0]}/api/v1/basic?terminal=Emulated%2002&apdu=00B0000004",
        headers={"X-Auth-Token": "secret-token-1234567890"})
    with urllib.request.urlopen(rest, timeout=10) as r:
        r.read()
    wait_for(lambda: len(records(trace)) == 3, 10)
    got = {(r["frontend"], r["reader"], r["command"]) for r in records(trace)}
    assert got == {("line", "Emulated 00", "00A4000C023F00"), ("api", "Emulated 01", "00A4000C023F00"),
                   ("rest", "Emulated 02", "00B0000004")}
    for r in records(trace):
        assert r["peer"].startswith("127.0.0.1:") and r["identity"], r


def test_sighup_reopens_the_trace(proxy_factory, tmp_path):
    trace = str(tmp_path / "t.jsonl")
    proxy = proxy_factory("--trace", trace, "--no-signing")
    with LineClient(port=proxy.port) as c:
        c.results(">Emulated 00|\n>1:APDU:00A4000C023F00|\n\n")
        wait_for(lambda: os.path.exists(trace) and records(trace), 10)
        os.rename(trace, trace + ".1")
        proxy.proc.send_signal(signal.SIGHUP)
        time.sleep(0.3)  # the writer reopens at its next round (every 50 ms)
        c.results(">Emulated 00|\n>2:APDU:00B0000004|\n\n")
        wait_for(lambda: os.path.exists(trace) and records(trace), 10)
    assert [r["command"] for r in records(trace)] == ["00B0000004"]
    assert [r["command"] for r in records(trace + ".1")] == ["00A4000C023F00"]
    assert os.stat(trace).st_mode & 0o777 == 0o600


def test_live_trace_over_the_api_websocket(proxy_factory, tmp_path):
    """An API identity follows one reader's exchanges over the WebSocket,
    redacted like the files; a reader it may not see does not exist for it."""
    from support import ApiAgent

    creds = tmp_path / "creds.toml"
    import hashlib

    creds.write_text("".join(
        f'[[client]]\nname = "{name}"\nsecret_sha256 = "{hashlib.sha256(secret.encode()).hexdigest()}"\n'
        f'readers = {readers}\n\n' for name, secret, readers in (
            ("watcher", "watcher-secret-0123456789", '["Emulated 00"]'),
            ("user", "user-secret-0123456789abc", '["*"]'))))
    trace = str(tmp_path / "t.jsonl")
    proxy = proxy_factory("--backend", "emulated:?type=piv&cards=2", "--trace", trace, "--no-signing",
                          "--credentials", str(creds), "--api", "tcp:0:interface=127.0.0.1", listeners=2)
    base = f"http://127.0.0.1:{proxy.ports['ApiSite'][0]}"
    with ApiAgent(base, "watcher-secret-0123456789") as agent:
        assert agent.ws_open() == {"open": True}
        agent.ws_send({"id": 1, "trace": "Emulated 00"})
        assert agent.ws_recv()["msg"] == {"id": 1, "traced": "Emulated 00"}
        agent.ws_send({"id": 2, "trace": "Emulated 01"})
        assert agent.ws_recv()["msg"]["error"]["code"] == "C083"
        with LineClient(port=proxy.port) as c:
            assert c.results(">Emulated 01:user-secret-0123456789abc|\n>1:APDU:00B0000004|\n\n")
            assert c.results(">Emulated 00:user-secret-0123456789abc|\n>1:APDU:00A4040009"
                             + PIV_AID + "|\n>2:APDU:0020008008313233343536FFFF|\n\n")[1] == "9000"
        first = agent.ws_recv()["msg"]
        second = agent.ws_recv()["msg"]
        assert first["event"] == "trace" and first["record"]["command"] == "00A4040009" + PIV_AID
        assert first["record"]["identity"] == "user" and first["record"]["reader"] == "Emulated 00"
        assert second["record"]["command"] == "0020008008" and second["record"]["redacted"] == 8
        assert "313233343536" not in json.dumps(second)
        agent.ws_send({"id": 3, "untrace": "Emulated 00"})
        assert agent.ws_recv()["msg"] == {"id": 3, "untraced": "Emulated 00"}


def test_sign_with_a_pin_leaves_no_pin_in_the_trace(proxy_factory, tmp_path):
    """SIGN presents the reader line's PIN to the card itself (the
    certificate index's VERIFY, front end ``signing``): redacted too."""
    import hashlib

    jsonl, pcap = str(tmp_path / "t.jsonl"), str(tmp_path / "t.pcapng")
    proxy = proxy_factory("--backend", "emulated:?type=piv&cards=1", "--trace", jsonl, "--trace", pcap)
    digest = hashlib.sha256(b"trace me").hexdigest()
    with LineClient(port=proxy.port) as c:
        wait_for(lambda: "Emulated PIV 00 Signing" in " ".join(c.results(">Emulated 00|\n>1:ALIASES|\n\n")), 10)
        [signature] = c.results(f">Emulated PIV 00 Signing:123456|\n>1:SIGN:{digest}|\n\n")
    assert not signature.startswith("C08"), signature
    wait_for(lambda: any(r.get("redacted") and r["frontend"] == "signing" for r in records(jsonl)), 10)
    time.sleep(0.2)
    assert b"313233343536" not in open(jsonl, "rb").read().upper()  # the PIN's hex
    assert b"123456" not in open(pcap, "rb").read()  # the PIN's bytes
