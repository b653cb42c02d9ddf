"""An honest in-process ISO 7816-4 card: a small file system, SELECT,
READ BINARY, UPDATE BINARY, GET CHALLENGE and GET RESPONSE.

Every answer is computed from the card's state; nothing is canned.
"""

import os

from ..apdu import (
    SW_CLA_NOT_SUPPORTED, SW_EOF_WARNING, SW_INS_NOT_SUPPORTED,
    SW_NO_CURRENT_EF, SW_NOT_ALLOWED, SW_NOT_FOUND, SW_OK, SW_SECURITY,
    SW_WRONG_LENGTH, SW_WRONG_OFFSET, SW_WRONG_P1P2, BadLength,
    make_atr, parse_command, sw, tlv,
)

INS_SELECT = 0xA4
INS_READ_BINARY = 0xB0
INS_UPDATE_BINARY = 0xD6
INS_GET_CHALLENGE = 0x84
INS_GET_RESPONSE = 0xC0

#: The AID of the emulated card's application DF ("CLOUDFOXY" under the
#: proprietary F0 RID range).
APP_AID = bytes.fromhex("F0434C4F5544464F5859")
ISO_ATR_HISTORICAL = b"FoxyEmu7816"


class StatusError(Exception):
    """Ends a command with a status word and no data."""

    def __init__(self, status):
        super().__init__(status)
        self.status = status


class Card:
    """Base of every emulated card, holding their one transmit path: APDU
    parsing, CLA checks, dispatch by INS, GET RESPONSE for answers longer
    than Ne (``61xx``).

    Subclasses set ``atr`` and fill ``handlers`` (INS -> method taking a
    CommandAPDU and returning ``(data, status)``).  Hooks: ``check_cla``;
    ``assemble(cmd)`` (a whole command, or the response APDU to answer at
    once: command chaining, ``cards/pki.py``); ``answer_length(cmd)`` (the
    command whose Ne bounds the answer); ``forget_pending()`` (drops what
    a malformed APDU ends).
    """

    atr = make_atr(ISO_ATR_HISTORICAL)

    def __init__(self, **kw):
        super().__init__(**kw)
        self.handlers = {INS_GET_RESPONSE: self.get_response}
        self._rest = b""  # data waiting for GET RESPONSE

    def reset(self):
        self._rest = b""
        return self.atr

    def check_cla(self, cla):
        return cla & 0xFC == 0x00  # interindustry, logical channels 0-3

    def forget_pending(self):
        self._rest = b""

    def assemble(self, cmd):
        return cmd

    def answer_length(self, cmd):
        return cmd

    def transmit(self, apdu):
        try:
            cmd = parse_command(apdu)
        except BadLength:
            self.forget_pending()
            return sw(SW_WRONG_LENGTH)
        cmd = self.assemble(cmd)
        if isinstance(cmd, bytes):
            return cmd
        if not self.check_cla(cmd.cla):
            self._rest = b""
            return sw(SW_CLA_NOT_SUPPORTED)
        handler = self.handlers.get(cmd.ins)
        if handler is None:
            self._rest = b""
            return sw(SW_INS_NOT_SUPPORTED)
        if cmd.ins != INS_GET_RESPONSE:
            self._rest = b""
        try:
            data, status = handler(cmd)
        except StatusError as e:
            return sw(e.status)
        return self._deliver(self.answer_length(cmd), data, status)

    def _deliver(self, cmd, data, status):
        """At most Ne bytes now, the rest announced as 61xx; an answer to a
        command with no Le field waits entirely for GET RESPONSE."""
        if not data:
            return sw(status)
        ne = cmd.ne or 0
        if len(data) <= ne:
            return sw(status, data)
        now, self._rest = data[:ne], data[ne:]
        return sw(0x6100 | min(len(self._rest), 256) & 0xFF, now)

    def get_response(self, cmd):
        if cmd.p1 or cmd.p2:
            raise StatusError(SW_WRONG_P1P2)
        if not self._rest:
            raise StatusError(SW_NOT_ALLOWED)
        if cmd.ne is None:
            raise StatusError(SW_WRONG_LENGTH)
        data, self._rest = self._rest, b""
        return data, SW_OK


class DF:
    def __init__(self, fid, name=b"", parent=None):
        self.fid = fid
        self.name = name
        self.parent = parent
        self.children = {}
        if parent is not None:
            parent.children[fid] = self

    def fcp(self):
        inner = tlv(0x82, b"\x38") + tlv(0x83, self.fid.to_bytes(2, "big"))
        if self.name:
            inner += tlv(0x84, self.name)
        return tlv(0x62, inner + tlv(0x8A, b"\x05"))


class EF:
    def __init__(self, fid, parent, content, size=None, writable=True):
        self.fid = fid
        self.parent = parent
        self.size = size if size is not None else len(content)
        self.data = bytearray(content.ljust(self.size, b"\x00"))
        self.writable = writable
        parent.children[fid] = self

    def fcp(self):
        return tlv(0x62, tlv(0x80, self.size.to_bytes(2, "big")) + tlv(0x82, b"\x01")
                   + tlv(0x83, self.fid.to_bytes(2, "big")) + tlv(0x8A, b"\x05"))


class Iso7816Card(Card):
    """MF 3F00 { EF.DIR 2F00, EF 2F02 (serial), DF 5000 = APP_AID
    { EF 5001 (64 bytes, writable), EF 5002 (1024 bytes, writable) } }."""

    def __init__(self, serial, random_bytes=os.urandom, **kw):
        super().__init__(**kw)
        self.random_bytes = random_bytes
        self.mf = self.build_files(serial)
        self.handlers.update({
            INS_SELECT: self.select,
            INS_READ_BINARY: self.read_binary,
            INS_UPDATE_BINARY: self.update_binary,
            INS_GET_CHALLENGE: self.get_challenge,
        })
        self.reset()

    def build_files(self, serial):
        """The card's MF with everything under it (subclasses build their own)."""
        mf = DF(0x3F00)
        app_template = tlv(0x61, tlv(0x4F, APP_AID) + tlv(0x50, b"CloudFoxy emulated"))
        EF(0x2F00, mf, app_template, writable=False)
        EF(0x2F02, mf, tlv(0x5A, serial.to_bytes(8, "big")), writable=False)
        app = DF(0x5000, APP_AID, mf)
        EF(0x5001, app, b"", size=64)
        EF(0x5002, app, bytes(i & 0xFF for i in range(1024)))
        return mf

    def reset(self):
        self.df = self.mf
        self.ef = None
        return super().reset()

    # SELECT --------------------------------------------------------------
    def select(self, cmd):
        p1, data = cmd.p1, cmd.data
        if cmd.p2 & 0xF3:
            raise StatusError(SW_WRONG_P1P2)  # only first occurrence, FCI/FCP/FMD/none
        if p1 == 0x00:
            if len(data) not in (0, 2):
                raise StatusError(SW_WRONG_LENGTH)
            node = self.mf if not data or data == b"\x3f\x00" else self._by_fid(int.from_bytes(data, "big"))
        elif p1 in (0x01, 0x02):
            if len(data) != 2:
                raise StatusError(SW_WRONG_LENGTH)
            node = self.df.children.get(int.from_bytes(data, "big"))
            if node is not None and isinstance(node, DF) != (p1 == 0x01):
                node = None
        elif p1 == 0x03:
            if data:
                raise StatusError(SW_WRONG_LENGTH)
            node = self.df.parent
        elif p1 == 0x04:
            if not 1 <= len(data) <= 16:
                raise StatusError(SW_WRONG_LENGTH)
            node = self._by_name(self.mf, bytes(data))
        elif p1 in (0x08, 0x09):
            if not data or len(data) % 2:
                raise StatusError(SW_WRONG_LENGTH)
            node = self._by_path(self.mf if p1 == 0x08 else self.df, data)
        else:
            raise StatusError(SW_WRONG_P1P2)
        if node is None:
            raise StatusError(SW_NOT_FOUND)
        if isinstance(node, DF):
            self.df, self.ef = node, None
        else:
            self.df, self.ef = node.parent, node
        if cmd.p2 & 0x0C == 0x0C:
            return b"", SW_OK
        return node.fcp(), SW_OK

    def _by_fid(self, fid):
        df = self.df
        if df.fid == fid:
            return df
        if fid in df.children:
            return df.children[fid]
        parent = df.parent
        if parent is not None:
            if parent.fid == fid:
                return parent
            return parent.children.get(fid)
        return None

    def _by_name(self, df, name):
        if df.name and df.name.startswith(name):
            return df
        for child in df.children.values():
            if isinstance(child, DF):
                found = self._by_name(child, name)
                if found is not None:
                    return found
        return None

    def _by_path(self, start, path):
        node = start
        fids = [int.from_bytes(path[i:i + 2], "big") for i in range(0, len(path), 2)]
        if fids and fids[0] == 0x3F00 and start is self.mf:
            fids = fids[1:]
        for fid in fids:
            if not isinstance(node, DF):
                return None
            node = node.children.get(fid)
            if node is None:
                return None
        return node

    # Transparent EFs -----------------------------------------------------
    def _target(self, cmd):
        """The EF and offset of READ/UPDATE BINARY (current EF or short EF id)."""
        if cmd.p1 & 0x80:
            if cmd.p1 & 0x60:
                raise StatusError(SW_WRONG_P1P2)
            sfi = cmd.p1 & 0x1F
            ef = next((c for c in self.df.children.values()
                       if isinstance(c, EF) and c.fid & 0x1F == sfi), None)
            if ef is None:
                raise StatusError(SW_NOT_FOUND)
            self.ef = ef
            return ef, cmd.p2
        if self.ef is None:
            raise StatusError(SW_NO_CURRENT_EF)
        return self.ef, cmd.p1 << 8 | cmd.p2

    def read_binary(self, cmd):
        ef, offset = self._target(cmd)
        if cmd.ne is None or cmd.data:
            raise StatusError(SW_WRONG_LENGTH)
        if offset >= ef.size:
            raise StatusError(SW_WRONG_OFFSET)
        data = bytes(ef.data[offset:offset + cmd.ne])
        # Le = 00 (or 0000) asks for "as much as there is": no warning.
        short_max = cmd.ne == (65536 if cmd.extended else 256)
        if len(data) < cmd.ne and not short_max:
            return data, SW_EOF_WARNING
        return data, SW_OK

    def update_binary(self, cmd):
        ef, offset = self._target(cmd)
        if not cmd.data:
            raise StatusError(SW_WRONG_LENGTH)
        if not ef.writable:
            raise StatusError(SW_SECURITY)
        if offset >= ef.size:
            raise StatusError(SW_WRONG_OFFSET)
        if offset + len(cmd.data) > ef.size:
            raise StatusError(SW_WRONG_LENGTH)
        ef.data[offset:offset + len(cmd.data)] = cmd.data
        return b"", SW_OK

    def get_challenge(self, cmd):
        if cmd.p1 or cmd.p2:
            raise StatusError(SW_WRONG_P1P2)
        if cmd.ne is None or cmd.data:
            raise StatusError(SW_WRONG_LENGTH)
        return self.random_bytes(min(cmd.ne, 256)), SW_OK


