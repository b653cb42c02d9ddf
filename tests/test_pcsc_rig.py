"""Tests of the PC/SC test rig (tests/pcsc_rig.py): a real pcscd with
vsmartcard's vpcd driver and vicc virtual cards, checked with pyscard."""

import time

import pytest

import pcsc_rig as rigmod

SLOT0 = rigmod.reader_name(0)  # "Virtual PCD 00 00"
SLOT1 = rigmod.reader_name(1)  # "Virtual PCD 00 01"
GET_CHALLENGE = [0x00, 0x84, 0x00, 0x00, 0x08]
SELECT_MF = [0x00, 0xA4, 0x00, 0x0C, 0x02, 0x3F, 0x00]


# Fixtures pcsc_rig and card0 live in tests/conftest.py.


# -- helpers using pyscard directly ------------------------------------------

def _connect(name):
    from smartcard.System import readers

    reader = [r for r in readers() if str(r) == name][0]
    conn = reader.createConnection()
    conn.connect()
    return conn


def _close(conn):
    from smartcard.Exceptions import CardConnectionException

    try:
        conn.disconnect()
        conn.release()
    except CardConnectionException:
        pass


def _present(name):
    from smartcard import scard

    hr, ctx = scard.SCardEstablishContext(scard.SCARD_SCOPE_USER)
    assert hr == scard.SCARD_S_SUCCESS, scard.SCardGetErrorMessage(hr)
    try:
        hr, states = scard.SCardGetStatusChange(
            ctx, 0, [(name, scard.SCARD_STATE_UNAWARE)])
        assert hr == scard.SCARD_S_SUCCESS, scard.SCardGetErrorMessage(hr)
        return bool(states[0][1] & scard.SCARD_STATE_PRESENT)
    finally:
        scard.SCardReleaseContext(ctx)


def _wait_present(name, present, timeout):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if _present(name) == present:
            return time.monotonic() - t0
        time.sleep(0.02)
    return None


# -- tests ---------------------------------------------------------------------

def test_readers_listed(pcsc_rig):
    from smartcard.System import readers

    names = [str(r) for r in readers()]
    assert SLOT0 in names
    assert SLOT1 in names
    assert pcsc_rig.reader_names == [SLOT0, SLOT1]


def test_select_mf_and_get_challenge(card0):
    conn = _connect(SLOT0)
    try:
        assert bytes(conn.getATR()) == bytes.fromhex("3B 95 13 81 01 80 73 FF 01 00 0B")
        data, sw1, sw2 = conn.transmit(SELECT_MF)
        assert (data, sw1, sw2) == ([], 0x90, 0x00)
        data1, sw1, sw2 = conn.transmit(GET_CHALLENGE)
        assert (sw1, sw2) == (0x90, 0x00)
        assert len(data1) == 8
        data2, sw1, sw2 = conn.transmit(GET_CHALLENGE)
        assert (sw1, sw2) == (0x90, 0x00)
        assert len(data2) == 8
        assert data1 != data2
    finally:
        _close(conn)


def test_card_removal_and_reinsertion(card0):
    from smartcard import scard
    from smartcard.Exceptions import CardConnectionException, NoCardException

    rig = card0
    conn = _connect(SLOT0)
    try:
        assert conn.transmit(GET_CHALLENGE)[1:] == (0x90, 0x00)
        rig.stop_card(0, wait_absent=False)
        took = _wait_present(SLOT0, False, 2.0)
        assert took is not None, "card still present 2 s after vicc stopped"

        # the old handle now reports the removal
        with pytest.raises(CardConnectionException) as exc:
            conn.transmit(GET_CHALLENGE)
        assert exc.value.hresult == scard.SCARD_W_REMOVED_CARD
        # and a new connection finds no card
        with pytest.raises(NoCardException):
            _connect(SLOT0)

        rig.start_card(0)
        assert _present(SLOT0)
        # the old handle needs a reconnect after reinsertion
        conn.reconnect()
        assert conn.transmit(GET_CHALLENGE)[1:] == (0x90, 0x00)
    finally:
        _close(conn)
    conn = _connect(SLOT0)
    try:
        data, sw1, sw2 = conn.transmit(GET_CHALLENGE)
        assert (len(data), sw1, sw2) == (8, 0x90, 0x00)
    finally:
        _close(conn)


def test_restart_pcscd_needs_new_context(card0):
    from smartcard import scard

    rig = card0
    hr, ctx = scard.SCardEstablishContext(scard.SCARD_SCOPE_USER)
    assert hr == scard.SCARD_S_SUCCESS
    try:
        rig.restart_pcscd()  # vicc dies with pcscd; the rig restarts it
        assert rig.card_pid(0) is not None and _present(SLOT0)
        hr, _ = scard.SCardListReaders(ctx, [])
        assert hr == scard.SCARD_E_NO_SERVICE  # old context is dead
    finally:
        scard.SCardReleaseContext(ctx)
    conn = _connect(SLOT0)  # a new context works
    try:
        assert conn.transmit(GET_CHALLENGE)[1:] == (0x90, 0x00)
    finally:
        _close(conn)
