"""An emulated PIV card (NIST SP 800-73-4), honest enough for OpenSC,
yubico-piv-tool and the proxy's own PIV profile.

* SELECT by the (partial) AID ``A0 00 00 03 08``; the answer is the
  application property template.
* GET DATA (INS CB, P1P2 3FFF, data ``5C`` tag list) for CHUID 5FC102, CCC
  5FC107, the certificates of keys 9A (5FC105) and 9C (5FC10A) in the
  ``53 {70 cert, 71 00, FE}`` container, and the discovery object 7E;
  other objects: 6A82.  Le is honoured: longer answers come in parts with
  ``61xx`` and GET RESPONSE.
* VERIFY P2=80 (the PIV PIN, 6 to 8 characters padded with FF to 8 bytes);
  retry counter 3, ``63Cx`` after a wrong PIN, 6983 when blocked; VERIFY
  with no data returns the status; P1=FF resets the security status.
* GENERAL AUTHENTICATE (INS 87) with the dynamic authentication template
  ``7C {82 00, 81 challenge}``: raw RSA-2048 (algorithm 07) with key 9A
  (PIN once per session), ECDSA P-256 (algorithm 11, DER signature) with
  key 9C (PIN always: a fresh VERIFY before each signature); and
  ``7C {81 00}`` with key 9B (3DES) for an 8-byte card challenge.
* CHUID GUID, CCC card identifier and GET SERIAL differ from card to card
  (``pki.card_number``).
* Command chaining (CLA 10) and extended APDUs.
* Yubico's GET VERSION (INS FD) and GET SERIAL (INS F8), which PIV tools
  use to identify a card.
"""

import os

from ..apdu import (
    parse_tlvs,
    SW_DATA_NOT_FOUND, SW_NOT_FOUND, SW_OK, SW_SECURITY, SW_WRONG_DATA,
    SW_WRONG_LENGTH, SW_WRONG_P1P2, make_atr, tlv,
)
from .iso7816 import StatusError
from .pki import P256, RSA2048, SigningCard, card_number, ecdsa_p256, get_pki, raw_rsa

PIV_AID = bytes.fromhex("A000000308000010000100")
PIV_RID = PIV_AID[:5]
PIV_ATR_HISTORICAL = b"FoxyEmuPIV"

INS_SELECT = 0xA4
INS_GET_DATA = 0xCB
INS_VERIFY = 0x20
INS_GENERAL_AUTHENTICATE = 0x87
INS_GET_VERSION = 0xFD
INS_GET_SERIAL = 0xF8

ALG_RSA2048 = 0x07
ALG_P256 = 0x11
KEY_AUTH = 0x9A  # PIV Authentication
KEY_SIGN = 0x9C  # Digital Signature
KEY_ADMIN = 0x9B  # PIV Card Application Administration Key
ALG_3DES = (0x00, 0x03)
PIN_REF = 0x80

TAG_CHUID = 0x5FC102
TAG_CCC = 0x5FC107
TAG_CERT_9A = 0x5FC105
TAG_CERT_9C = 0x5FC10A
TAG_DISCOVERY = 0x7E

SW_BLOCKED = 0x6983
PIN_TRIES = 3
VERSION = bytes([5, 4, 3])


def pad_pin(pin):
    """A PIV PIN as VERIFY sends it: 8 bytes, padded with FF."""
    raw = pin.encode("utf-8") if isinstance(pin, str) else bytes(pin)
    return raw.ljust(8, b"\xff")




class PivCard(SigningCard):
    """Keys 9A (RSA-2048, "LABEL PIV NN Authentication") and 9C (P-256,
    "LABEL PIV NN Signing") with certificates from the emulated PKI."""

    def __init__(self, serial, pin="123456", label="Emulated", keys=None, random_bytes=os.urandom):
        super().__init__()
        if not 6 <= len(pin.encode("utf-8")) <= 8:
            raise ValueError("a PIV PIN has 6 to 8 characters")
        self.serial = serial
        self.atr = make_atr(PIV_ATR_HISTORICAL)
        self.random_bytes = random_bytes
        self._pin = pad_pin(pin)
        self.pin_tries = PIN_TRIES
        pki = get_pki(keys)
        self.keys = {
            KEY_AUTH: (ALG_RSA2048, pki.leaf(f"{label} PIV {serial:02d} Authentication", RSA2048, signing=False)),
            KEY_SIGN: (ALG_P256, pki.leaf(f"{label} PIV {serial:02d} Signing", P256, signing=True)),
        }
        number = card_number("piv", label, serial, 16)
        self.yubico_serial = 0x0100_0000 + int.from_bytes(number[:3], "big")
        guid = number
        fascn = bytes.fromhex("D4E739DA739CED39CE739D836858210842108421C84210C3EB")
        self.objects = {
            TAG_CHUID: tlv(0x30, fascn) + tlv(0x34, guid) + tlv(0x35, b"20401231")
            + tlv(0x3E, b"") + tlv(0xFE, b""),
            TAG_CCC: tlv(0xF0, bytes.fromhex("A000000116FF0101") + number[:13])
            + tlv(0xF1, b"\x21") + tlv(0xF2, b"\x21") + tlv(0xF3, b"") + tlv(0xF4, b"\x00")
            + tlv(0xF5, b"\x10") + tlv(0xF6, b"") + tlv(0xF7, b"") + tlv(0xFA, b"")
            + tlv(0xFB, b"") + tlv(0xFC, b"") + tlv(0xFD, b"") + tlv(0xFE, b""),
            TAG_CERT_9A: tlv(0x70, self.keys[KEY_AUTH][1].der) + tlv(0x71, b"\x00") + tlv(0xFE, b""),
            TAG_CERT_9C: tlv(0x70, self.keys[KEY_SIGN][1].der) + tlv(0x71, b"\x00") + tlv(0xFE, b""),
        }
        self.handlers.update({
            INS_SELECT: self.select,
            INS_GET_DATA: self.get_data,
            INS_VERIFY: self.verify,
            INS_GENERAL_AUTHENTICATE: self.general_authenticate,
            INS_GET_VERSION: self.get_version,
            INS_GET_SERIAL: self.get_serial,
        })
        self.reset()

    def reset(self):
        self.selected = False
        self.pin_verified = False
        self.pin_fresh = False  # a VERIFY not yet used by a PIN-always key
        return super().reset()

    # SELECT ----------------------------------------------------------------------
    def select(self, cmd):
        if cmd.p1 != 0x04 or cmd.p2 not in (0x00, 0x0C):
            raise StatusError(SW_WRONG_P1P2)
        if len(cmd.data) < len(PIV_RID) or not PIV_AID.startswith(cmd.data):
            raise StatusError(SW_NOT_FOUND)
        self.selected = True
        if cmd.p2 == 0x0C:
            return b"", SW_OK
        apt = tlv(0x4F, PIV_AID[5:]) + tlv(0x79, tlv(0x4F, PIV_AID)) + tlv(0x50, b"CloudFoxy emulated PIV") \
            + tlv(0xAC, tlv(0x80, bytes([ALG_RSA2048])) + tlv(0x80, bytes([ALG_P256])) + tlv(0x06, b""))
        return tlv(0x61, apt), SW_OK

    def _need_selected(self):
        if not self.selected:
            raise StatusError(0x6D00)  # no application: as if the instruction were unknown

    # GET DATA --------------------------------------------------------------------
    def get_data(self, cmd):
        self._need_selected()
        if (cmd.p1, cmd.p2) != (0x3F, 0xFF):
            raise StatusError(SW_WRONG_P1P2)
        data = cmd.data
        if len(data) < 3 or data[0] != 0x5C or data[1] != len(data) - 2 or len(data) > 5:
            raise StatusError(SW_WRONG_DATA)
        tag = int.from_bytes(data[2:], "big")
        if tag == TAG_DISCOVERY:
            # PIN usage policy 40 00: the PIV application PIN only.
            return tlv(0x7E, tlv(0x4F, PIV_AID) + tlv(0x5F2F, b"\x40\x00")), SW_OK
        value = self.objects.get(tag)
        if value is None:
            raise StatusError(SW_NOT_FOUND)
        return tlv(0x53, value), SW_OK

    # VERIFY ------------------------------------------------------------------------
    def verify(self, cmd):
        self._need_selected()
        if cmd.p2 != PIN_REF:
            raise StatusError(SW_DATA_NOT_FOUND if cmd.p1 in (0x00, 0xFF) else SW_WRONG_P1P2)
        if cmd.p1 == 0xFF:
            if cmd.data:
                raise StatusError(SW_WRONG_LENGTH)
            self.pin_verified = self.pin_fresh = False
            return b"", SW_OK
        if cmd.p1 != 0x00:
            raise StatusError(SW_WRONG_P1P2)
        if not cmd.data:
            if self.pin_verified:
                return b"", SW_OK
            raise StatusError(SW_BLOCKED if not self.pin_tries else 0x63C0 | self.pin_tries)
        if len(cmd.data) != 8:
            raise StatusError(SW_WRONG_DATA)
        if not self.pin_tries:
            raise StatusError(SW_BLOCKED)
        if cmd.data != self._pin:
            self.pin_tries -= 1
            self.pin_verified = self.pin_fresh = False
            raise StatusError(0x63C0 | self.pin_tries)
        self.pin_tries = PIN_TRIES
        self.pin_verified = self.pin_fresh = True
        return b"", SW_OK

    # GENERAL AUTHENTICATE ---------------------------------------------------------
    def general_authenticate(self, cmd):
        self._need_selected()
        if cmd.p2 == KEY_ADMIN:
            return self.admin_challenge(cmd)
        entry = self.keys.get(cmd.p2)
        if entry is None:
            raise StatusError(SW_DATA_NOT_FOUND)
        alg, pair = entry
        if cmd.p1 != alg:
            raise StatusError(SW_WRONG_P1P2)
        try:
            items = parse_tlvs(cmd.data)
            if len(items) != 1 or items[0][0] != 0x7C:
                raise ValueError("not a dynamic authentication template")
            inner = dict(parse_tlvs(items[0][1]))
        except ValueError:
            raise StatusError(SW_WRONG_DATA) from None
        if inner.get(0x82) != b"" or 0x81 not in inner:
            raise StatusError(SW_WRONG_DATA)  # only "sign this challenge" is supported
        if cmd.p2 == KEY_SIGN:
            if not self.pin_fresh:
                raise StatusError(SW_SECURITY)
            self.pin_fresh = False  # PIN always
        elif not self.pin_verified:
            raise StatusError(SW_SECURITY)
        challenge = inner[0x81]
        if alg == ALG_RSA2048:
            if len(challenge) != 256:
                raise StatusError(SW_WRONG_DATA)
            try:
                signature = raw_rsa(pair.key, challenge)
            except ValueError:
                raise StatusError(SW_WRONG_DATA) from None
        else:
            if len(challenge) != 32:
                raise StatusError(SW_WRONG_DATA)
            signature = ecdsa_p256(pair.key, challenge)
        return tlv(0x7C, tlv(0x82, signature)), SW_OK

    def admin_challenge(self, cmd):
        """The card's challenge for the card management key 9B (3DES,
        algorithm 00 or 03): ``7C {81 00}`` gets ``7C {81 <8 random bytes>}``,
        which is also how OpenSC asks a PIV card for random bytes
        (``C_GenerateRandom``).  Nothing else is done with key 9B."""
        if cmd.p1 not in ALG_3DES:
            raise StatusError(SW_WRONG_P1P2)
        if cmd.data != bytes.fromhex("7C028100"):
            raise StatusError(SW_WRONG_DATA)
        return tlv(0x7C, tlv(0x81, self.random_bytes(8))), SW_OK

    # Yubico extensions -------------------------------------------------------------
    def get_version(self, cmd):
        return VERSION, SW_OK

    def get_serial(self, cmd):
        return self.yubico_serial.to_bytes(4, "big"), SW_OK
