"""The ``pcsc:`` backend through a real ``twistd foxyproxy`` on the real stack:
pcscd + vsmartcard's vpcd driver + vicc virtual cards (tests/pcsc_rig.py).

One proxy (``--backend pcsc: --command-timeout 2``) serves the whole
module; the ``cards`` fixture puts a live, unfrozen card in both vpcd slots
before each test and repairs whatever a test broke afterwards.
"""

import os
import subprocess
import threading
import time

import pytest

import pcsc_rig as rigmod
from support import TWISTD, LineClient

SLOT0 = rigmod.reader_name(0)  # "Virtual PCD 00 00"
SLOT1 = rigmod.reader_name(1)  # "Virtual PCD 00 01"
VICC_ATR = "3B951381018073FF01000B"
SELECT_MF = "00A4000C023F00"  # never P2=00 with vicc: it crashes on that
GET_CHALLENGE = "0084000008"
TIMEOUT = 2.0  # --command-timeout of the module's proxy


def b64(name):
    import base64

    return base64.b64encode(name.encode()).decode()


def apdu(client, reader, hex_apdu, cid="1"):
    [(got_id, result)] = client.request(f">{reader}|\n>{cid}:APDU:{hex_apdu}|\n\n")
    assert got_id == cid
    return result


def wait_for(client, reader, want, timeout, allowed=None, command=SELECT_MF):
    """Send ``command`` until the result is ``want``; the seconds it took.
    Every other result must be in ``allowed`` (when given)."""
    t0 = time.monotonic()
    seen = []
    while True:
        result = apdu(client, reader, command)
        if result == want:
            return time.monotonic() - t0
        if allowed is not None:
            assert result in allowed, (result, seen)
        seen.append(result)
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"{reader}: no {want} within {timeout}s; got {seen[-5:]}")
        time.sleep(0.05)


def ensure_card(rig, slot):
    if slot in rig.frozen:
        rig.thaw_card(slot)
    proc = rig.cards.get(slot)
    if proc is None or proc.poll() is not None:
        rig.stop_card(slot, wait_absent=False)
        rig.start_card(slot)


@pytest.fixture(scope="module")
def rig_for_module(pcsc_rig):
    """The session's rig with a card in both slots; afterwards, the rig is
    left as this module found it (cards it added are taken out again)."""
    rig = pcsc_rig
    if rig.pcscd is None or rig.pcscd.poll() is not None:
        rig.start()
    had = {slot for slot in rig.slots if rig.card_pid(slot) is not None}
    yield rig
    for slot in rig.slots:
        if slot in rig.frozen:
            rig.thaw_card(slot)
        if slot not in had:
            rig.stop_card(slot)  # and wait until pcscd reports the slot empty


@pytest.fixture
def cards(rig_for_module):
    """Both slots hold a live, unfrozen card; repaired after the test."""
    rig = rig_for_module
    if rig.pcscd is None or rig.pcscd.poll() is not None:
        rig.start()
    for slot in rig.slots:
        ensure_card(rig, slot)
    yield rig
    for slot in rig.slots:
        if slot in rig.frozen:
            rig.thaw_card(slot)
    if rig.pcscd is None or rig.pcscd.poll() is not None:
        rig.start()
    for slot in rig.slots:
        ensure_card(rig, slot)


@pytest.fixture
def pcsc_proxy(cards, proxy_factory):
    """``twistd foxyproxy --backend pcsc: --command-timeout 2``, serving both cards."""
    proxy = proxy_factory("--backend", "pcsc:", "--command-timeout", str(TIMEOUT))
    with proxy.client() as c:
        for name in (SLOT0, SLOT1):
            wait_for(c, name, "9000", 10.0, allowed={"C083", "C080"})
    return proxy


def test_select_mf_and_get_challenge(cards, pcsc_proxy):
    with pcsc_proxy.client() as c:
        got = c.request(f">{SLOT0}|\n>1:APDU:{SELECT_MF}|\n>2:APDU:{GET_CHALLENGE}|\n"
                        f">3:APDU:{GET_CHALLENGE}|\n\n")
    assert [cid for cid, _ in got] == ["1", "2", "3"]
    assert got[0][1] == "9000"
    first, second = got[1][1], got[2][1]
    for challenge in (first, second):
        assert len(challenge) == 20 and challenge.endswith("9000"), challenge
    assert first != second  # real random bytes from the card


def test_readers_lists_both_slots(cards, pcsc_proxy):
    with pcsc_proxy.client() as c:
        [(_, listing)] = c.request(">*|\n>1:READERS|\n\n")
    assert listing.split("|") == [b64(SLOT0), b64(SLOT1)]


def test_reset_returns_the_atr(cards, pcsc_proxy):
    with pcsc_proxy.client() as c:
        got = c.results(f">{SLOT1}|\n>1:RESET|\n>2:APDU:{GET_CHALLENGE}|\n>3:RESET|\n\n")
    assert got[0] == VICC_ATR
    assert got[1].endswith("9000") and len(got[1]) == 20
    assert got[2] == VICC_ATR


def test_reader_selected_by_pattern(cards, pcsc_proxy):
    with pcsc_proxy.client() as c:
        assert c.results(f">00 01$|\n>1:APDU:{SELECT_MF}|\n\n") == ["9000"]
        assert c.results(f">virtual pcd|\n>1:APDU:{SELECT_MF}|\n\n") == ["C082"]


def test_card_removed_and_reinserted(cards, pcsc_proxy):
    rig = cards
    with pcsc_proxy.client() as c:
        assert apdu(c, SLOT0, SELECT_MF) == "9000"
        rig.kill_card(0)  # pulled without warning
        # the first command after the pull already fails with C080 (a
        # transfer error until pcscd notices, then the backend's presence
        # view); never a C086 or a hang
        took = wait_for(c, SLOT0, "C080", 2.0, allowed={"9000"})
        assert took < 2.0
        assert apdu(c, SLOT0, GET_CHALLENGE) == "C080"
        assert c.results(f">{SLOT0}|\n>1:RESET|\n\n") == ["C080"]
        # the other reader is unaffected
        assert apdu(c, SLOT1, SELECT_MF) == "9000"
        # put a card back: service resumes with no proxy restart
        rig.start_card(0)
        wait_for(c, SLOT0, "9000", 2.0, allowed={"C080"})
        result = apdu(c, SLOT0, GET_CHALLENGE)
        assert result.endswith("9000") and len(result) == 20
        assert c.results(f">{SLOT0}|\n>1:RESET|\n\n") == [VICC_ATR]


def test_card_removed_with_wait(cards, pcsc_proxy):
    """pcscd already knows the card is gone: C080 at once."""
    rig = cards
    rig.stop_card(1)  # waits until pcscd reports the slot empty
    with pcsc_proxy.client() as c:
        took = wait_for(c, SLOT1, "C080", 2.0, allowed={"9000"})
        assert took < 2.0
        t0 = time.monotonic()
        assert apdu(c, SLOT1, SELECT_MF) == "C080"
        assert time.monotonic() - t0 < 0.5
        rig.start_card(1)
        wait_for(c, SLOT1, "9000", 2.0, allowed={"C080"})


def test_frozen_card_times_out_and_other_reader_keeps_working(cards, pcsc_proxy):
    rig = cards
    stop = threading.Event()
    other = {"ok": 0, "bad": []}

    def hammer_slot1():
        with pcsc_proxy.client() as c:
            while not stop.is_set() and other["ok"] < 100000:
                result = apdu(c, SLOT1, SELECT_MF)
                if result == "9000":
                    other["ok"] += 1
                else:
                    other["bad"].append(result)

    with pcsc_proxy.client(timeout=15) as c:
        assert apdu(c, SLOT0, SELECT_MF) == "9000"
        rig.freeze_card(0)
        worker = threading.Thread(target=hammer_slot1)
        worker.start()
        try:
            t0 = time.monotonic()
            assert apdu(c, SLOT0, GET_CHALLENGE) == "C086"
            took = time.monotonic() - t0
            assert TIMEOUT - 0.2 <= took <= TIMEOUT + 1.5, took
            # the reader's thread is still stuck: later commands fail fast
            t0 = time.monotonic()
            assert c.results(f">{SLOT0}|\n>1:APDU:{SELECT_MF}|\n>2:RESET|\n\n") == ["C086", "C086"]
            assert time.monotonic() - t0 < 0.5
            # READERS and the other reader are not held up
            [(_, listing)] = c.request(">*|\n>1:READERS|\n\n")
            assert listing.split("|") == [b64(SLOT0), b64(SLOT1)]
            ok_before = other["ok"]
            time.sleep(0.3)
            assert other["ok"] > ok_before
        finally:
            stop.set()
            worker.join(15)
            rig.thaw_card(0)
        assert other["bad"] == [] and other["ok"] > 10
        # thawed: the stuck call completes and the reader serves again
        wait_for(c, SLOT0, "9000", 3.0, allowed={"C086"})


def test_shutdown_with_a_frozen_card_is_bounded(cards, pcsc_proxy):
    """A thread stuck on a frozen card does not hold up the proxy's exit."""
    rig = cards
    with pcsc_proxy.client(timeout=15) as c:
        assert apdu(c, SLOT0, SELECT_MF) == "9000"
        rig.freeze_card(0)
        try:
            assert apdu(c, SLOT0, SELECT_MF) == "C086"
            t0 = time.monotonic()
            pcsc_proxy.stop(timeout=15)
            took = time.monotonic() - t0
        finally:
            rig.thaw_card(0)
    # twistd ends a SIGTERM shutdown by re-raising the signal: -15 is a clean exit
    assert pcsc_proxy.proc.returncode in (0, -15), pcsc_proxy.log()[-3000:]
    assert "Server Shut Down." in pcsc_proxy.log()
    assert took < 6.0, took
    assert "thread still stuck in a PC/SC call" in pcsc_proxy.log()


def test_two_clients_on_two_readers_in_parallel(cards, pcsc_proxy):
    rounds = 150
    results = {}
    barrier = threading.Barrier(2)

    def run(reader):
        with pcsc_proxy.client() as c:
            barrier.wait(10)
            t0 = time.monotonic()
            got = []
            for i in range(rounds):
                got.extend(c.results(f">{reader}|\n>a{i}:APDU:{SELECT_MF}|\n>b{i}:APDU:{GET_CHALLENGE}|\n\n"))
            results[reader] = (got, t0, time.monotonic())

    threads = [threading.Thread(target=run, args=(r,)) for r in (SLOT0, SLOT1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert set(results) == {SLOT0, SLOT1}
    for reader, (got, _, _) in results.items():
        assert got[0::2] == ["9000"] * rounds
        challenges = got[1::2]
        assert all(len(r) == 20 and r.endswith("9000") for r in challenges)
        assert len(set(challenges)) == rounds
    (_, start0, end0), (_, start1, end1) = results[SLOT0], results[SLOT1]
    assert max(start0, start1) < min(end0, end1)  # the two runs overlapped


def test_transaction_keeps_other_programs_out(cards, pcsc_proxy):
    """mode=shared wraps every APDU in a PC/SC transaction: while another
    program holds one, the proxy waits (here until the command timeout)."""
    from smartcard import scard

    hr, ctx = scard.SCardEstablishContext(scard.SCARD_SCOPE_USER)
    assert hr == scard.SCARD_S_SUCCESS
    handle = None
    try:
        hr, handle, _ = scard.SCardConnect(ctx, SLOT1, scard.SCARD_SHARE_SHARED,
                                           scard.SCARD_PROTOCOL_ANY)
        assert hr == scard.SCARD_S_SUCCESS
        assert scard.SCardBeginTransaction(handle) == scard.SCARD_S_SUCCESS
        with pcsc_proxy.client() as c:
            t0 = time.monotonic()
            assert apdu(c, SLOT1, SELECT_MF) == "C086"
            assert time.monotonic() - t0 >= TIMEOUT - 0.2
            scard.SCardEndTransaction(handle, scard.SCARD_LEAVE_CARD)
            wait_for(c, SLOT1, "9000", 3.0, allowed={"C086"})
    finally:
        if handle is not None:
            scard.SCardDisconnect(handle, scard.SCARD_LEAVE_CARD)
        scard.SCardReleaseContext(ctx)


def test_exclusive_mode(cards, proxy_factory):
    """mode=exclusive: the proxy holds the card; other programs cannot connect."""
    from smartcard import scard

    excl = proxy_factory("--backend", "pcsc:?readers=00 01$&mode=exclusive&protocol=t1",
                         "--command-timeout", str(TIMEOUT))
    with excl.client() as c:
        wait_for(c, SLOT1, "9000", 5.0, allowed={"C083", "C080"})
        [(_, listing)] = c.request(">*|\n>1:READERS|\n\n")
        assert listing == b64(SLOT1)
        hr, ctx = scard.SCardEstablishContext(scard.SCARD_SCOPE_USER)
        try:
            hr, handle, _ = scard.SCardConnect(ctx, SLOT1, scard.SCARD_SHARE_SHARED,
                                               scard.SCARD_PROTOCOL_ANY)
            assert hr == scard.SCARD_E_SHARING_VIOLATION
        finally:
            scard.SCardReleaseContext(ctx)
        assert c.results(f">{SLOT1}|\n>1:RESET|\n>2:APDU:{SELECT_MF}|\n\n") == [VICC_ATR, "9000"]
    excl.stop()
    # stopped: the card is free again
    hr, ctx = scard.SCardEstablishContext(scard.SCARD_SCOPE_USER)
    try:
        hr, handle, _ = scard.SCardConnect(ctx, SLOT1, scard.SCARD_SHARE_EXCLUSIVE,
                                           scard.SCARD_PROTOCOL_ANY)
        assert hr == scard.SCARD_S_SUCCESS
        scard.SCardDisconnect(handle, scard.SCARD_LEAVE_CARD)
    finally:
        scard.SCardReleaseContext(ctx)


def test_pcscd_restart_is_survived(cards, pcsc_proxy):
    rig = cards
    with pcsc_proxy.client() as c:
        assert apdu(c, SLOT0, SELECT_MF) == "9000"
        rig.restart_pcscd()  # the cards die with pcscd; the rig restarts them
        t0 = time.monotonic()
        for name in (SLOT0, SLOT1):
            wait_for(c, name, "9000", 5.0, allowed={"C080", "C086"})
        assert time.monotonic() - t0 < 5.0
        result = apdu(c, SLOT1, GET_CHALLENGE)
        assert result.endswith("9000") and len(result) == 20
        assert c.results(f">{SLOT0}|\n>1:RESET|\n\n") == [VICC_ATR]
    assert "pcscd is not reachable" in pcsc_proxy.log()
    assert "pcscd is reachable again" in pcsc_proxy.log()


def test_start_without_pcscd_fails_with_one_line(cards, tmp_path):
    rig = cards
    rig.stop_pcscd()
    try:
        r = subprocess.run(
            [TWISTD, "-n", "--pidfile=", "--logfile", str(tmp_path / "log"), "foxyproxy",
             "-p", "tcp:0:interface=127.0.0.1", "--backend", "pcsc:"],
            capture_output=True, text=True, timeout=60, cwd=str(tmp_path))
    finally:
        rig.start()
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("twistd foxyproxy: --backend 'pcsc:': pcscd is not running"), lines
    assert "Traceback" not in r.stdout + r.stderr


def test_bad_url_fails_with_one_line(tmp_path):
    r = subprocess.run(
        [TWISTD, "-n", "--pidfile=", "--logfile", str(tmp_path / "log"), "foxyproxy",
         "-p", "tcp:0:interface=127.0.0.1", "--backend", "pcsc:?mode=greedy"],
        capture_output=True, text=True, timeout=60, cwd=str(tmp_path),
        env=dict(os.environ))
    assert r.returncode != 0
    assert r.stderr.strip().splitlines() == [
        "twistd foxyproxy: --backend 'pcsc:?mode=greedy': mode='greedy' is not one of shared, exclusive"]


def test_client_sees_readers_by_line_client(cards, pcsc_proxy):
    """A line client on a fresh connection, APDUPlay style (no empty line)."""
    c = LineClient(port=pcsc_proxy.port)
    try:
        c.send(f">{SLOT0}|\n>1:APDU:{SELECT_MF}|\n")
        assert c.read_response() == [("1", "9000")]
    finally:
        c.close()


def test_card_reset_by_another_program_is_c080_once(cards, pcsc_proxy):
    """Another local program resets the card between two of our requests:
    pcscd tells the proxy SCARD_W_RESET_CARD, the next command gets C080
    (its session state is gone), then the card works again (docs/pcsc.md)."""
    from smartcard import scard

    with pcsc_proxy.client() as c:
        assert apdu(c, SLOT0, SELECT_MF) == "9000"
        hr, ctx = scard.SCardEstablishContext(scard.SCARD_SCOPE_USER)
        assert hr == scard.SCARD_S_SUCCESS
        try:
            hr, handle, _ = scard.SCardConnect(ctx, SLOT0, scard.SCARD_SHARE_SHARED, scard.SCARD_PROTOCOL_ANY)
            assert hr == scard.SCARD_S_SUCCESS
            hr, _ = scard.SCardReconnect(handle, scard.SCARD_SHARE_SHARED, scard.SCARD_PROTOCOL_ANY,
                                         scard.SCARD_RESET_CARD)
            assert hr == scard.SCARD_S_SUCCESS
            scard.SCardDisconnect(handle, scard.SCARD_LEAVE_CARD)
        finally:
            scard.SCardReleaseContext(ctx)
        assert c.request(f">{SLOT0}|\n>1:APDU:{SELECT_MF}|\n>2:APDU:{SELECT_MF}|\n\n") == [
            ("1", "C080"), ("2", "9000")]
        assert apdu(c, SLOT0, GET_CHALLENGE).endswith("9000")
        assert apdu(c, SLOT1, SELECT_MF) == "9000"  # the other card never noticed


def _exclusive_connect(reader, timeout):
    """Another program's SCardConnect(SCARD_SHARE_EXCLUSIVE), retried until
    it works or ``timeout`` seconds pass: (seconds it took, handle, context,
    protocol);
    AssertionError naming the last result otherwise."""
    from smartcard import scard

    hr, ctx = scard.SCardEstablishContext(scard.SCARD_SCOPE_USER)
    assert hr == scard.SCARD_S_SUCCESS
    t0 = time.monotonic()
    while True:
        hr, handle, protocol = scard.SCardConnect(ctx, reader, scard.SCARD_SHARE_EXCLUSIVE,
                                                  scard.SCARD_PROTOCOL_ANY)
        if hr == scard.SCARD_S_SUCCESS:
            return time.monotonic() - t0, handle, ctx, protocol
        if time.monotonic() - t0 > timeout:
            scard.SCardReleaseContext(ctx)
            raise AssertionError(f"exclusive SCardConnect kept failing: 0x{hr & 0xFFFFFFFF:08X}")
        time.sleep(0.05)


def test_idle_release_lets_an_exclusive_program_in(cards, proxy_factory):
    """idle_release=1: a second after the last request the proxy lets the
    handle go; a program's SCARD_SHARE_EXCLUSIVE connect then works, and
    while it holds the card the proxy answers C086 (sharing violation).
    After it left, pcscd powers the unused card down: every connection
    that used the card gets C080 exactly once, then the card's answers."""
    from smartcard import scard

    proxy = proxy_factory("--backend", "pcsc:?readers=00 01$&idle_release=1",
                          "--command-timeout", str(TIMEOUT))
    with proxy.client() as a, proxy.client() as b:
        wait_for(a, SLOT1, "9000", 10.0, allowed={"C083", "C080"})
        assert apdu(b, SLOT1, SELECT_MF) == "9000"
        hr, ctx = scard.SCardEstablishContext(scard.SCARD_SCOPE_USER)
        hr, handle, _ = scard.SCardConnect(ctx, SLOT1, scard.SCARD_SHARE_EXCLUSIVE,
                                           scard.SCARD_PROTOCOL_ANY)
        scard.SCardReleaseContext(ctx)
        assert hr == scard.SCARD_E_SHARING_VIOLATION  # just used: the proxy holds it
        took, handle, ctx, protocol = _exclusive_connect(SLOT1, 5.0)
        assert took < 1.5, took
        try:
            hr, answer = scard.SCardTransmit(handle, protocol, list(bytes.fromhex(SELECT_MF)))
            assert (hr, bytes(answer).hex().upper()) == (0, "9000")
            assert apdu(a, SLOT1, SELECT_MF) == "C086"  # the program has it alone
        finally:
            scard.SCardDisconnect(handle, scard.SCARD_LEAVE_CARD)
            scard.SCardReleaseContext(ctx)
        time.sleep(2.0)  # pcscd powers the unused card down (vpcd: within 0.8 s)
        assert a.results(f">{SLOT1}|\n>1:APDU:{SELECT_MF}|\n>2:APDU:{GET_CHALLENGE}|\n\n")[0] == "C080"
        assert apdu(a, SLOT1, SELECT_MF) == "9000"
        assert apdu(b, SLOT1, SELECT_MF) == "C080"
        assert apdu(b, SLOT1, SELECT_MF) == "9000"


def test_idle_release_reconnect_is_not_a_reset(cards, proxy_factory):
    """While another program keeps a shared handle (so pcscd keeps the card
    powered), the proxy's release and reconnect change nothing: no C080."""
    from smartcard import scard

    proxy = proxy_factory("--backend", "pcsc:?readers=00 01$&idle_release=0.5",
                          "--command-timeout", str(TIMEOUT))
    hr, ctx = scard.SCardEstablishContext(scard.SCARD_SCOPE_USER)
    hr, handle, _ = scard.SCardConnect(ctx, SLOT1, scard.SCARD_SHARE_SHARED, scard.SCARD_PROTOCOL_ANY)
    assert hr == scard.SCARD_S_SUCCESS
    try:
        with proxy.client() as a:
            wait_for(a, SLOT1, "9000", 10.0, allowed={"C083", "C080"})
            for _ in range(3):
                time.sleep(1.5)  # released after 0.5 s each time
                assert apdu(a, SLOT1, SELECT_MF) == "9000"
    finally:
        scard.SCardDisconnect(handle, scard.SCARD_LEAVE_CARD)
        scard.SCardReleaseContext(ctx)


def test_reset_by_another_program_reaches_every_connection_once(cards, pcsc_proxy):
    """Another program resets the card (SCardReconnect SCARD_RESET_CARD):
    each of two line connections that used it gets C080 once, then data."""
    from smartcard import scard

    with pcsc_proxy.client() as a, pcsc_proxy.client() as b:
        assert apdu(a, SLOT0, SELECT_MF) == "9000"
        assert apdu(b, SLOT0, SELECT_MF) == "9000"
        hr, ctx = scard.SCardEstablishContext(scard.SCARD_SCOPE_USER)
        hr, handle, _ = scard.SCardConnect(ctx, SLOT0, scard.SCARD_SHARE_SHARED, scard.SCARD_PROTOCOL_ANY)
        assert hr == scard.SCARD_S_SUCCESS
        hr, _ = scard.SCardReconnect(handle, scard.SCARD_SHARE_SHARED, scard.SCARD_PROTOCOL_ANY,
                                     scard.SCARD_RESET_CARD)
        assert hr == scard.SCARD_S_SUCCESS
        scard.SCardDisconnect(handle, scard.SCARD_LEAVE_CARD)
        scard.SCardReleaseContext(ctx)
        assert [apdu(a, SLOT0, SELECT_MF) for _ in range(2)] == ["C080", "9000"]
        assert [apdu(b, SLOT0, SELECT_MF) for _ in range(2)] == ["C080", "9000"]
