"""The vpcd bridge on the real stack: ``twistd foxyproxy --vpcd`` makes an
emulated card appear in a real pcscd (vsmartcard's vpcd driver, the PC/SC
test rig) and PC/SC programs (pyscard, opensc-tool) use it like any card.

The bridge is the virtual card, so these tests use a vpcd slot with no
vicc card in it (slot 1).  They leave the slot empty when they finish.
"""

import re
import statistics
import subprocess
import time

import pytest

import pcsc_rig as rigmod
from support import LineClient, ProxyProcess, free_port

SLOT = 1
READER = rigmod.reader_name(SLOT)  # "Virtual PCD 00 01"
EMULATED_ATR = bytes.fromhex("3B8B8001466F7879456D753738313677")
SELECT_MF = "00A4000C023F00"
GET_CHALLENGE = "0084000008"
SELECT_APP = "00A4040C0AF0434C4F5544464F5859"
SELECT_EF = "00A4020C025001"
READ_BINARY = "00B0000004"


@pytest.fixture
def slot(pcsc_rig):
    """pcscd running and vpcd slot 1 free (no vicc); empty again afterwards."""
    rig = pcsc_rig
    if rig.pcscd is None or rig.pcscd.poll() is not None:
        rig.start()
    if rig.card_pid(SLOT) is not None:
        rig.stop_card(SLOT)
    yield rig
    # every bridge is stopped by then (see the bridge fixture)
    if rig.pcscd is not None and rig.pcscd.poll() is None:
        rig.wait_card(SLOT, False, 10)


@pytest.fixture
def bridge(slot):
    """Start ``twistd foxyproxy --vpcd 127.0.0.1:<slot 1>=READER ARGS``;
    waits for the card to appear; all are stopped after the test."""
    started = []

    def start(reader="Emulated 00", *args, wait=True):
        p = ProxyProcess("--vpcd", f"127.0.0.1:{slot.port(SLOT)}={reader}", *args).start()
        started.append(p)
        if wait:
            slot.wait_card(SLOT, True, 15)
        return p

    yield start
    for p in started:
        p.stop()


def connect(name=READER):
    from smartcard.System import readers

    matches = [r for r in readers() if str(r) == name]
    assert matches, f"{name!r} not in {[str(r) for r in readers()]}"
    conn = matches[0].createConnection()
    conn.connect()
    return conn


def close(conn):
    from smartcard.Exceptions import CardConnectionException

    try:
        conn.disconnect()
    except CardConnectionException:
        pass
    conn.release()


def send(conn, apdu_hex):
    data, sw1, sw2 = conn.transmit(list(bytes.fromhex(apdu_hex)))
    return bytes(data), (sw1 << 8) | sw2


def test_card_appears_with_the_emulated_atr(bridge, slot):
    bridge()
    assert slot.card_present(SLOT)
    assert slot.atr(SLOT) == EMULATED_ATR
    conn = connect()
    try:
        assert bytes(conn.getATR()) == EMULATED_ATR
    finally:
        close(conn)


def test_apdus_through_pyscard(bridge):
    bridge()
    conn = connect()
    try:
        assert send(conn, SELECT_MF) == (b"", 0x9000)
        c1, sw1 = send(conn, GET_CHALLENGE)
        c2, sw2 = send(conn, GET_CHALLENGE)
        assert (len(c1), sw1, len(c2), sw2) == (8, 0x9000, 8, 0x9000)
        assert c1 != c2
        assert send(conn, SELECT_APP) == (b"", 0x9000)
        assert send(conn, SELECT_EF) == (b"", 0x9000)
        data, sw = send(conn, READ_BINARY)
        assert (len(data), sw) == (4, 0x9000)
        # a card-level error is the card's status word, and the card stays
        assert send(conn, "00A4000C020000")[1] == 0x6A82
        assert send(conn, SELECT_MF) == (b"", 0x9000)
    finally:
        close(conn)


def test_per_apdu_time_stays_sub_millisecond_scale(bridge):
    """Not a benchmark (bench/vpcd_latency.py is): catches the ~44 ms
    delayed-ACK stall per APDU that TCP_QUICKACK avoids."""
    bridge()
    conn = connect()
    try:
        samples = []
        for _ in range(100):
            t = time.perf_counter()
            assert send(conn, SELECT_MF)[1] == 0x9000
            samples.append(time.perf_counter() - t)
    finally:
        close(conn)
    assert statistics.median(samples) < 0.015, sorted(samples)[::10]


def _opensc(*args):
    r = subprocess.run(["opensc-tool", *args], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, (args, r.stdout, r.stderr)
    return r.stdout


def test_opensc_tool(bridge):
    bridge()
    listing = _opensc("--list-readers")
    rows = {m.group(3).strip(): (int(m.group(1)), m.group(2))
            for m in re.finditer(r"^(\d+)\s+(Yes|No)\s+(.*)$", listing, re.M)}
    index, card = rows[READER]
    assert card == "Yes", listing
    atr = _opensc("--reader", str(index), "--atr").strip()
    assert bytes.fromhex(atr.replace(":", "")) == EMULATED_ATR
    out = _opensc("--reader", str(index), "--send-apdu", "00:A4:00:0C:02:3F:00")
    assert "Received (SW1=0x90, SW2=0x00)" in out, out
    out = _opensc("--reader", str(index), "--send-apdu", "00:84:00:00:08")
    assert "Received (SW1=0x90, SW2=0x00):" in out, out
    hex_line = out.split("Received (SW1=0x90, SW2=0x00):", 1)[1].strip().splitlines()[0]
    assert len(bytes.fromhex(hex_line[:8 * 3])) == 8, out


def test_stopping_the_bridge_removes_the_card_and_restarting_inserts_it(bridge, slot):
    from smartcard.Exceptions import CardConnectionException

    proxy = bridge()
    conn = connect()
    try:
        assert send(conn, SELECT_MF) == (b"", 0x9000)
        proxy.stop()
        took = slot.wait_card(SLOT, False, 5)
        assert took < 2.0
        with pytest.raises(CardConnectionException):
            send(conn, SELECT_MF)
    finally:
        close(conn)
    bridge()
    conn = connect()
    try:
        assert bytes(conn.getATR()) == EMULATED_ATR
        assert send(conn, SELECT_MF) == (b"", 0x9000)
    finally:
        close(conn)


def test_reconnects_after_pcscd_restart(bridge, slot):
    proxy = bridge()
    slot.restart_pcscd(restart_cards=True)
    slot.wait_card(SLOT, True, 15)  # back-off is capped at 3 s
    conn = connect()
    try:
        assert send(conn, SELECT_MF) == (b"", 0x9000)
    finally:
        close(conn)
    assert proxy.proc.poll() is None
    log = proxy.log()
    assert log.count("connected to vpcd") >= 2, log
    assert "Traceback" not in log, log


def test_upstream_failure_removes_the_card_until_it_is_back(bridge, slot):
    """Proxy A bridges a card of proxy C (tcp:// backend).  When C stops,
    the next APDU fails upstream (C086): the bridge leaves vpcd, so pcscd
    reports the card removed; when C is back the card is inserted again."""
    from smartcard.Exceptions import CardConnectionException

    port = free_port()
    upstream = ProxyProcess(port=f"tcp:{port}:interface=127.0.0.1").start()
    try:
        proxy = bridge("Emulated 00", "--backend", f"tcp://127.0.0.1:{port}?prefix=Up ")
        conn = connect()
        try:
            assert send(conn, SELECT_MF) == (b"", 0x9000)
            upstream.stop()
            with pytest.raises(CardConnectionException):
                send(conn, SELECT_MF)
        finally:
            close(conn)
        slot.wait_card(SLOT, False, 5)
        time.sleep(1.0)  # retries keep failing while C is down
        assert not slot.card_present(SLOT)
        upstream = ProxyProcess(port=f"tcp:{port}:interface=127.0.0.1").start()
        slot.wait_card(SLOT, True, 15)
        conn = connect()
        try:
            assert bytes(conn.getATR()) == EMULATED_ATR
            assert send(conn, SELECT_MF) == (b"", 0x9000)
        finally:
            close(conn)
        log = proxy.log()
        assert "failed (C086)" in log, log
        # while the upstream is down its readers are listed absent: said once, not per retry
        assert log.count("not connected: no card in Up Emulated 00") == 1, log
    finally:
        upstream.stop()


def test_two_cards_in_two_slots(slot, proxy_factory):
    """One proxy, ``--vpcd`` twice: two cards, each in its own slot."""
    if slot.card_pid(0) is not None:
        slot.stop_card(0)
    proxy = proxy_factory("--vpcd", f"127.0.0.1:{slot.port(0)}=Emulated 00",
                          "--vpcd", f"127.0.0.1:{slot.port(1)}=Emulated 01")
    try:
        slot.wait_card(0, True, 15)
        slot.wait_card(1, True, 15)
        conns = [connect(rigmod.reader_name(0)), connect(rigmod.reader_name(1))]
        try:
            # each slot reaches its own card: EF 2F02 holds the card's serial
            serials = []
            for conn in conns:
                assert send(conn, SELECT_MF) == (b"", 0x9000)
                assert send(conn, "00A4020C022F02") == (b"", 0x9000)
                serials.append(send(conn, "00B000000A"))
            assert serials == [(bytes.fromhex("5A080000000000000000"), 0x9000),
                               (bytes.fromhex("5A080000000000000001"), 0x9000)]
        finally:
            for conn in conns:
                close(conn)
    finally:
        proxy.stop()
        slot.wait_card(0, False, 10)


def test_unknown_reader_never_appears(bridge, slot):
    proxy = bridge("No Such Reader", wait=False)
    time.sleep(1.5)  # > 3 pcscd polls
    assert not slot.card_present(SLOT)
    assert proxy.proc.poll() is None
    assert "not connected: no such reader" in proxy.log()


def test_full_loop_through_a_second_proxy(bridge, slot):
    """emulated card -> proxy A (bridge) -> vpcd/pcscd -> proxy B (pcsc:) ->
    line-protocol client."""
    bridge()
    b = ProxyProcess("--backend", f"pcsc:?readers={READER}").start()
    try:
        deadline = time.monotonic() + 10
        with LineClient(port=b.port) as c:
            while True:
                got = c.results(f">{READER}|\n>1:RESET|\n>2:APDU:{SELECT_MF}|\n\n")
                if got[0] not in ("C080", "C083") or time.monotonic() > deadline:
                    break
                time.sleep(0.1)
            assert got == [EMULATED_ATR.hex().upper(), "9000"], b.log()
            got = c.results(f">1:APDU:{GET_CHALLENGE}|\n>2:APDU:{SELECT_APP}|\n"
                            f">3:APDU:{SELECT_EF}|\n>4:APDU:{READ_BINARY}|\n\n")
            assert re.fullmatch(r"[0-9A-F]{16}9000", got[0]), got
            assert got[1:3] == ["9000", "9000"]
            assert re.fullmatch(r"[0-9A-F]{8}9000", got[3]), got
    finally:
        b.stop()


def _scard_connect(reader=READER):
    from smartcard import scard

    hr, ctx = scard.SCardEstablishContext(scard.SCARD_SCOPE_USER)
    assert hr == 0
    hr, card, proto = scard.SCardConnect(ctx, reader, scard.SCARD_SHARE_SHARED,
                                         scard.SCARD_PROTOCOL_T0 | scard.SCARD_PROTOCOL_T1)
    assert hr == 0, hex(hr & 0xFFFFFFFF)
    return ctx, card, proto


def _scard_tx(card, proto, apdu_hex):
    from smartcard import scard

    hr, resp = scard.SCardTransmit(card, proto, list(bytes.fromhex(apdu_hex)))
    return hr & 0xFFFFFFFF, bytes(resp).hex().upper()


def _scard_close(ctx, card):
    from smartcard import scard

    scard.SCardDisconnect(card, scard.SCARD_LEAVE_CARD)
    scard.SCardReleaseContext(ctx)


def _line(proxy, text):
    with LineClient(port=proxy.port) as c:
        return c.results(text)


def test_reset_by_another_client_is_seen_by_the_pcsc_program(bridge, slot):
    """A line client resets the bridged card while a PC/SC program has a
    transaction on it: the program's next transmit fails instead of
    answering from the reset card, pcscd then reports the card removed
    (SCARD_W_REMOVED_CARD), and after SCardReconnect the program finds the
    card as the reset left it."""
    from smartcard import scard

    proxy = bridge()
    ctx, card, proto = _scard_connect()
    try:
        assert scard.SCardBeginTransaction(card) == 0
        assert _scard_tx(card, proto, "00A4080C0450005001") == (0, "9000")  # SELECT EF 5000/5001
        assert _scard_tx(card, proto, READ_BINARY)[0] == 0
        assert _line(proxy, ">Emulated 00|\n>1:RESET|\n\n") == [EMULATED_ATR.hex().upper()]
        hr, resp = _scard_tx(card, proto, READ_BINARY)
        assert hr != 0 and resp == "", (hex(hr), resp)  # never an answer of the reset card
        deadline = time.monotonic() + 3
        while hr != scard.SCARD_W_REMOVED_CARD & 0xFFFFFFFF and time.monotonic() < deadline:
            time.sleep(0.1)
            hr, resp = _scard_tx(card, proto, READ_BINARY)
        assert hr == scard.SCARD_W_REMOVED_CARD & 0xFFFFFFFF, hex(hr)
        scard.SCardEndTransaction(card, scard.SCARD_LEAVE_CARD)
        slot.wait_card(SLOT, True, 5)  # inserted again
        hr, proto = scard.SCardReconnect(card, scard.SCARD_SHARE_SHARED,
                                         scard.SCARD_PROTOCOL_T0 | scard.SCARD_PROTOCOL_T1,
                                         scard.SCARD_LEAVE_CARD)
        assert hr == 0, hex(hr & 0xFFFFFFFF)
        assert _scard_tx(card, proto, READ_BINARY) == (0, "6986")  # no current EF since the reset
        assert _scard_tx(card, proto, "00A4080C0450005001") == (0, "9000")
        assert _scard_tx(card, proto, READ_BINARY)[0] == 0
    finally:
        _scard_close(ctx, card)
    assert "reset by another client" in proxy.log()


def test_exclusive_bridge_reserves_the_card(bridge, slot):
    proxy = bridge("Emulated 00?exclusive=1")
    started = time.monotonic()
    assert _line(proxy, f">Emulated 00|\n>1:RESET|\n>2:APDU:{SELECT_MF}|\n\n") == ["C086", "C086"]
    assert time.monotonic() - started < 1.0  # at once
    assert _line(proxy, f">Emulated 01|\n>1:APDU:{SELECT_MF}|\n\n") == ["9000"]  # other cards: as usual
    conn = connect()
    try:
        assert send(conn, SELECT_MF) == (b"", 0x9000)  # the PC/SC program keeps the card
        assert send(conn, GET_CHALLENGE)[1] == 0x9000
    finally:
        close(conn)
    assert "exclusive: other clients get C086" in proxy.log()


PIV_GET_DATA = "00CB3FFF055C035FC10500"  # GET DATA (X.509 cert for digital signature), no SELECT before it
PIV_SELECT_LE_1 = "00A4040005A00000030801"  # SELECT PIV, Le=1: one byte now, 61xx for the rest


def test_no_probe_behind_a_pcsc_program_after_its_reset(bridge, slot):
    """Signing on, an emulated PIV card bridged: after the program's own
    reset the proxy sends nothing to the card, so GET DATA without SELECT
    still answers 6D00 a second later and a pending 61xx answer can still be
    fetched with GET RESPONSE 0.7 s after the reset (3 of 3)."""
    from smartcard import scard

    proxy = bridge("Emulated 00", "--backend", "emulated:?type=piv&cards=1")
    ctx, card, proto = _scard_connect()
    protocols = scard.SCARD_PROTOCOL_T0 | scard.SCARD_PROTOCOL_T1
    try:
        for _ in range(3):
            hr, proto = scard.SCardReconnect(card, scard.SCARD_SHARE_SHARED, protocols, scard.SCARD_RESET_CARD)
            assert hr == 0, hex(hr & 0xFFFFFFFF)
            reset_at = time.monotonic()
            assert _scard_tx(card, proto, PIV_GET_DATA) == (0, "6D00")
            time.sleep(max(0.0, reset_at + 1.0 - time.monotonic()))
            assert _scard_tx(card, proto, PIV_GET_DATA) == (0, "6D00")  # still nothing selected

            hr, proto = scard.SCardReconnect(card, scard.SCARD_SHARE_SHARED, protocols, scard.SCARD_RESET_CARD)
            assert hr == 0, hex(hr & 0xFFFFFFFF)
            reset_at = time.monotonic()
            hr, first = _scard_tx(card, proto, PIV_SELECT_LE_1)
            assert hr == 0 and len(first) == 6 and first[2:4] == "61", first
            rest = int(first[4:], 16)
            time.sleep(max(0.0, reset_at + 0.7 - time.monotonic()))
            hr, answer = _scard_tx(card, proto, "00C00000" + first[4:])  # GET RESPONSE
            assert hr == 0 and len(answer) == 2 * rest + 4 and answer.endswith("9000"), (first, answer)
    finally:
        _scard_close(ctx, card)
    assert "PIV card with" in proxy.log()  # signing was on: the card was probed when it arrived


def test_pcsc_power_up_reset_reaches_every_line_connection_once(bridge, slot):
    """pcscd powers the idle bridged card down and a PC/SC program's connect
    powers it up: the bridge resets the backend card, and each of two line
    connections that had state on it gets C080 exactly once, then the card
    as the reset left it (6986: no current EF) and its data after a new
    SELECT; a line connection that resets first gets no C080."""
    proxy = bridge()
    with LineClient(port=proxy.port) as a, LineClient(port=proxy.port) as b:
        assert a.results(">Emulated 00|\n>1:APDU:00A4080C0450005001|\n>2:APDU:00D6000004CAFEBABE|\n\n") \
            == ["9000", "9000"]
        assert b.results(">Emulated 00|\n>1:APDU:00A4080C0450005001|\n>2:APDU:00B0000004|\n\n") \
            == ["9000", "CAFEBABE9000"]
        time.sleep(1.5)  # no PC/SC program connected: pcscd powers the vpcd card down
        ctx, card, proto = _scard_connect()  # ... and up: the bridge resets the card
        _scard_close(ctx, card)
        for c in (a, b):  # (one card: its current EF is every client's)
            assert c.results(f">Emulated 00|\n>1:APDU:{READ_BINARY}|\n\n") == ["C080"]
        for c in (a, b):
            assert c.results(f">Emulated 00|\n>1:APDU:{READ_BINARY}|\n\n") == ["6986"]
        assert b.results(">Emulated 00|\n>1:APDU:00A4080C0450005001|\n>2:APDU:00B0000004|\n\n") \
            == ["9000", "CAFEBABE9000"]
        assert a.results(f">Emulated 00|\n>1:APDU:{READ_BINARY}|\n\n") == ["CAFEBABE9000"]
    with LineClient(port=proxy.port) as c:
        assert c.results(">Emulated 00|\n>1:RESET|\n>2:APDU:00A4080C0450005001|\n\n") \
            == [EMULATED_ATR.hex().upper(), "9000"]
