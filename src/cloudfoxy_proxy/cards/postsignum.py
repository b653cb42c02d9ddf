"""An emulated PostSignum signing card (Česká pošta's qualified
certificates on an Oberthur IAS card), with the files and commands that
FoxyProxy 2.10's ``postsignum`` profile and our own PostSignum profile
(profiles/postsignum.py) use.  See docs/signing.md for where these facts
come from.

* SELECT by AID ``A0 00 00 00 77 01 03 00 06 10 00 00 00 00 00 02`` (the
  card's application, which is its MF), by FID or by path (P1 08).
* EF 1000/1003: the card number, 16 ASCII digits.
* EF 1400/9001/2002: the user's certificate, plain DER from offset 0,
  read with READ BINARY (offset in P1-P2).  The CA certificates are not on
  the card.
* VERIFY ``00 20 00 10 PIN`` (the PIN as ASCII, no padding), 3 tries:
  ``63Cx`` after a wrong PIN, ``6983`` when blocked; no data: the status.
* MSE:RESTORE ``00 22 F3 03`` and MSE:SET ``00 22 F1 B8 03 83 01 0E`` (key
  0E, RSA-2048, for PSO:DECIPHER).
* PSO:DECIPHER ``00 2A 80 86`` with ``00`` (padding indicator) and a
  256-byte block: the raw RSA private-key operation on it, which is how
  this card signs (the caller sends ``00 01 FF..FF 00 DigestInfo``).  The
  258-byte command goes in two parts with command chaining (CLA 10, then
  CLA 00 for the last part); ``6982`` without the PIN, ``6985`` without
  MSE:SET.
"""

import os

from ..apdu import (
    SW_DATA_NOT_FOUND, SW_NOT_ALLOWED, SW_OK, SW_SECURITY, SW_WRONG_DATA,
    SW_WRONG_LENGTH, SW_WRONG_P1P2, make_atr, parse_tlvs,
)
from .iso7816 import DF, EF, Iso7816Card, StatusError
from .pki import RSA2048, CardPin, SigningCard, card_number, get_pki, raw_rsa

POSTSIGNUM_AID = bytes.fromhex("A0000000770103000610000000000002")
POSTSIGNUM_ATR_HISTORICAL = b"FoxyEmuPostSig"
CERT_PATH = (0x1400, 0x9001, 0x2002)
ID_PATH = (0x1000, 0x1003)
PIN_REF = 0x10
KEY_ID = 0x0E
PIN_TRIES = 3

INS_VERIFY = 0x20
INS_MSE = 0x22
INS_PSO = 0x2A


class PostSignumCard(SigningCard, Iso7816Card):
    """Key 0E (RSA-2048) with the certificate ``LABEL PostSignum NN Signing``."""

    def __init__(self, serial, pin="123456", label="Emulated", keys=None, random_bytes=os.urandom):
        raw = pin.encode("utf-8")
        if not 4 <= len(raw) <= 16:
            raise ValueError("a PostSignum PIN has 4 to 16 characters")
        self.pair = get_pki(keys).leaf(f"{label} PostSignum {serial:02d} Signing", RSA2048, signing=True)
        self.pin = CardPin(raw, PIN_TRIES)
        self.label = label
        super().__init__(serial, random_bytes=random_bytes)
        self.serial = serial
        self.atr = make_atr(POSTSIGNUM_ATR_HISTORICAL)
        self.handlers.update({INS_VERIFY: self.verify, INS_MSE: self.mse, INS_PSO: self.pso})

    def build_files(self, serial):
        mf = DF(0x3F00, POSTSIGNUM_AID)
        ids = DF(ID_PATH[0], parent=mf)
        number = int.from_bytes(card_number("postsignum", self.label, serial, 8), "big") % 10 ** 16
        EF(ID_PATH[1], ids, b"%016d" % number, writable=False)
        user = DF(CERT_PATH[1], parent=DF(CERT_PATH[0], parent=mf))
        EF(CERT_PATH[2], user, self.pair.der, writable=False)
        return mf

    def reset(self):
        self.pin.verified = False
        self.key = None  # MSE:SET
        return super().reset()

    def verify(self, cmd):
        if cmd.p2 != PIN_REF:
            raise StatusError(SW_DATA_NOT_FOUND)
        return self.pin.verify(cmd)

    def mse(self, cmd):
        if cmd.p1 == 0xF3:  # RESTORE
            if cmd.data:
                raise StatusError(SW_WRONG_LENGTH)
            self.key = None
            return b"", SW_OK
        if cmd.p1 & 0x0F != 0x01 or cmd.p2 != 0xB8:
            raise StatusError(SW_WRONG_P1P2)
        try:
            items = dict(parse_tlvs(cmd.data))
        except ValueError:
            raise StatusError(SW_WRONG_DATA) from None
        if items.get(0x83) != bytes([KEY_ID]):
            self.key = None
            raise StatusError(SW_DATA_NOT_FOUND)
        self.key = KEY_ID
        return b"", SW_OK

    def pso(self, cmd):
        if (cmd.p1, cmd.p2) != (0x80, 0x86):
            raise StatusError(SW_WRONG_P1P2)
        if len(cmd.data) != 257:
            raise StatusError(SW_WRONG_LENGTH)
        if cmd.data[0] != 0x00:
            raise StatusError(SW_WRONG_DATA)
        if not self.pin.verified:
            raise StatusError(SW_SECURITY)
        if self.key != KEY_ID:
            raise StatusError(SW_NOT_ALLOWED)
        try:
            return raw_rsa(self.pair.key, cmd.data[1:]), SW_OK
        except ValueError:
            raise StatusError(SW_WRONG_DATA) from None
