"""An emulated I.CA signing card (the Czech trust service provider's
STARCOS-based card), with the file structure and commands that FoxyProxy
2.10's ``ica`` profile and our own I.CA profile (profiles/ica.py) use.
See docs/signing.md for where these facts come from.

File system (SELECT by FID: P1 00 from the MF, 01 a DF under the current
DF, 02 an EF under it; or by path, P1 08/09)::

    MF 3F00
      DF 0604            the signature application: local PIN 06, the keys
      DF 3F50
        DF 3F10
          EF 5630        linear records: one certificate descriptor each
          EF 5660        linear records: one private key descriptor each
        DF 3F20
          EF 0201 ...    the certificates, plain DER, one per EF

A certificate descriptor (READ RECORD ``00 B2 nn 04 00``) is a simple-TLV
``01 L { 01 50 label (80 bytes, UTF-8, space padded), 02 04 number,
05 01 kind (01 user, 02 CA), 10 04 DF-FID EF-FID, 12 04 length }``: the
certificate is read with SELECT MF, 3F50, DF, EF then READ BINARY with the
offset in P1 (256-byte pages, ``00 B0 pp 00 00``).  Past the last record:
``6A83``.

PINs: VERIFY P2 86 (local PIN 06 of DF 0604, needs DF 0604 selected) and
P2 81 (global PIN 01); both are the ``pin`` given, 3 tries each: a wrong
PIN answers ``63Cx``, a blocked one ``6983``; VERIFY with no data returns
the status.  PIN 86 is "PIN always": one signature per VERIFY.

Signing (in DF 0604), each step answered ``9000`` or an error status:

* MSE:SET HT ``00 22 41 AA 04 89 02 14 hh`` (hh 10 SHA-1, 30 SHA-256);
* MSE:SET DST ``00 22 41 B6 0A 84 03 80 kk 00 89 03 13 23 hh``: RSA
  PKCS#1 v1.5 with key ``kk`` (unknown key: ``6A88``);
* PSO:HASH ``00 2A 90 A0 Lc 90 len hash`` (the hash computed outside);
* PSO:COMPUTE DIGITAL SIGNATURE ``00 2A 9E 9A 00``: the 256-byte RSA
  signature (``6982`` without a fresh PIN 86, ``6985`` without the
  environment and hash).
"""

import os

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

from ..apdu import (
    SW_DATA_NOT_FOUND, SW_INCOMPATIBLE, SW_NOT_ALLOWED, SW_OK, SW_SECURITY,
    SW_WRONG_DATA, SW_WRONG_LENGTH, SW_WRONG_P1P2, make_atr, parse_tlvs, tlv,
)
from .iso7816 import DF, EF, Iso7816Card, StatusError
from .pki import RSA2048, CardPin, card_number, get_pki

ICA_ATR_HISTORICAL = b"FoxyEmuICA"
DF_SIGNATURE = 0x0604
DF_OBJECTS, DF_DIRECTORY, DF_CERTIFICATES = 0x3F50, 0x3F10, 0x3F20
EF_CERT_LIST, EF_KEY_LIST = 0x5630, 0x5660
PIN_GLOBAL, PIN_LOCAL = 0x81, 0x86
KEY_ID = 0x02
PIN_TRIES = 3
SW_RECORD_NOT_FOUND = 0x6A83

INS_VERIFY = 0x20
INS_MSE = 0x22
INS_PSO = 0x2A
INS_READ_RECORD = 0xB2

#: STARCOS hash algorithm bytes -> (hash, digest length).
HASH_IDS = {0x10: (hashes.SHA1, 20), 0x30: (hashes.SHA256, 32)}


def simple_tlv(tag, value):
    """ISO 7816-4 simple-TLV: one tag byte, length 00-FE or FF + 2 bytes."""
    n = len(value)
    length = bytes([n]) if n < 0xFF else b"\xff" + n.to_bytes(2, "big")
    return bytes([tag]) + length + bytes(value)


class RecordEF:
    """A linear EF of records (READ RECORD), numbered from 1."""

    def __init__(self, fid, parent, records):
        self.fid = fid
        self.parent = parent
        self.records = [bytes(r) for r in records]
        self.writable = False
        parent.children[fid] = self

    def fcp(self):
        longest = max((len(r) for r in self.records), default=0)
        return tlv(0x62, tlv(0x82, bytes([0x02, 0x41, 0x00, longest, len(self.records)]))
                   + tlv(0x83, self.fid.to_bytes(2, "big")) + tlv(0x8A, b"\x05"))


class IcaCard(Iso7816Card):
    """One signing key (RSA-2048, key id 02) with its certificate
    ``LABEL I.CA NN Signing`` and the issuing and root CA certificates."""

    def __init__(self, serial, pin="123456", label="Emulated", keys=None, random_bytes=os.urandom):
        raw = pin.encode("utf-8")
        if not 4 <= len(raw) <= 16:
            raise ValueError("an I.CA PIN has 4 to 16 characters")
        pki = get_pki(keys)
        self.label = label
        self.pair = pki.leaf(f"{label} I.CA {serial:02d} Signing", RSA2048, signing=True)
        self._certificates = [("user", self.pair.der), ("ca", pki.issuer.der), ("ca", pki.root.der)]
        self.pins = {PIN_GLOBAL: CardPin(raw, PIN_TRIES), PIN_LOCAL: CardPin(raw, PIN_TRIES)}
        super().__init__(serial, random_bytes=random_bytes)
        self.serial = serial
        self.atr = make_atr(ICA_ATR_HISTORICAL)
        self.handlers.update({
            INS_READ_RECORD: self.read_record,
            INS_VERIFY: self.verify,
            INS_MSE: self.mse,
            INS_PSO: self.pso,
        })

    def build_files(self, serial):
        mf = DF(0x3F00)
        EF(0x2F02, mf, tlv(0x5A, card_number("ica", self.label, serial, 8)), writable=False)
        self.signature_df = DF(DF_SIGNATURE, parent=mf)
        objects = DF(DF_OBJECTS, parent=mf)
        directory = DF(DF_DIRECTORY, parent=objects)
        store = DF(DF_CERTIFICATES, parent=objects)
        descriptors = []
        for number, (kind, der) in enumerate(self._certificates, 1):
            fid = 0x0200 + number
            EF(fid, store, der, writable=False)
            cn = "Certificate #%d" % number
            body = (simple_tlv(0x01, cn.encode().ljust(80, b" "))
                    + simple_tlv(0x02, number.to_bytes(4, "big"))
                    + simple_tlv(0x05, b"\x01" if kind == "user" else b"\x02")
                    + simple_tlv(0x10, DF_CERTIFICATES.to_bytes(2, "big") + fid.to_bytes(2, "big"))
                    + simple_tlv(0x12, len(der).to_bytes(4, "big")))
            descriptors.append(simple_tlv(0x01, body))
        RecordEF(EF_CERT_LIST, directory, descriptors)
        RecordEF(EF_KEY_LIST, directory, [simple_tlv(0x01, simple_tlv(0x02, bytes([KEY_ID]))
                                                     + simple_tlv(0x03, (2048).to_bytes(2, "big")))])
        return mf

    def reset(self):
        for pin in getattr(self, "pins", {}).values():
            pin.verified = False
        self.hash_id = None  # MSE:SET HT
        self.dst = None  # (key id, hash id) of MSE:SET DST
        self.digest = None  # PSO:HASH
        return super().reset()

    # Transparent EFs: a record file refuses READ BINARY -----------------------------
    def read_binary(self, cmd):
        if isinstance(self.ef, RecordEF) and not cmd.p1 & 0x80:
            raise StatusError(SW_INCOMPATIBLE)
        return super().read_binary(cmd)

    def update_binary(self, cmd):
        if isinstance(self.ef, RecordEF) and not cmd.p1 & 0x80:
            raise StatusError(SW_INCOMPATIBLE)
        return super().update_binary(cmd)

    # READ RECORD ----------------------------------------------------------------------
    def read_record(self, cmd):
        if cmd.p2 != 0x04 or cmd.p1 == 0:
            raise StatusError(SW_WRONG_P1P2)  # only "record P1 of the current EF"
        if cmd.ne is None or cmd.data:
            raise StatusError(SW_WRONG_LENGTH)
        ef = self.ef
        if not isinstance(ef, RecordEF):
            raise StatusError(SW_INCOMPATIBLE if ef is not None else 0x6986)
        if cmd.p1 > len(ef.records):
            raise StatusError(SW_RECORD_NOT_FOUND)
        return ef.records[cmd.p1 - 1][:cmd.ne], SW_OK

    # VERIFY -----------------------------------------------------------------------------
    def verify(self, cmd):
        pin = self.pins.get(cmd.p2)
        if pin is None or (cmd.p2 == PIN_LOCAL and self.df is not self.signature_df):
            raise StatusError(SW_DATA_NOT_FOUND)
        return pin.verify(cmd)

    # MSE --------------------------------------------------------------------------------
    def mse(self, cmd):
        if cmd.p1 != 0x41 or cmd.p2 not in (0xAA, 0xB6):
            raise StatusError(SW_WRONG_P1P2)
        try:
            items = dict(parse_tlvs(cmd.data))
        except ValueError:
            raise StatusError(SW_WRONG_DATA) from None
        algorithm = items.get(0x89, b"")
        if cmd.p2 == 0xAA:
            if len(algorithm) != 2 or algorithm[0] != 0x14 or algorithm[1] not in HASH_IDS:
                raise StatusError(SW_WRONG_DATA)
            self.hash_id, self.digest = algorithm[1], None
            return b"", SW_OK
        key = items.get(0x84, b"")
        if len(key) != 3 or key[0] != 0x80 or len(algorithm) != 3 or algorithm[:2] != b"\x13\x23" \
                or algorithm[2] not in HASH_IDS:
            raise StatusError(SW_WRONG_DATA)
        if self.df is not self.signature_df or key[1] != KEY_ID:
            self.dst = None
            raise StatusError(SW_DATA_NOT_FOUND)
        self.dst = (key[1], algorithm[2])
        return b"", SW_OK

    # PSO --------------------------------------------------------------------------------
    def pso(self, cmd):
        if (cmd.p1, cmd.p2) == (0x90, 0xA0):
            return self._hash(cmd)
        if (cmd.p1, cmd.p2) == (0x9E, 0x9A):
            return self._sign(cmd)
        raise StatusError(SW_WRONG_P1P2)

    def _hash(self, cmd):
        try:
            items = parse_tlvs(cmd.data)
        except ValueError:
            raise StatusError(SW_WRONG_DATA) from None
        if len(items) != 1 or items[0][0] != 0x90:
            raise StatusError(SW_WRONG_DATA)
        if self.hash_id is None:
            raise StatusError(SW_NOT_ALLOWED)
        if len(items[0][1]) != HASH_IDS[self.hash_id][1]:
            raise StatusError(SW_WRONG_LENGTH)
        self.digest = items[0][1]
        return b"", SW_OK

    def _sign(self, cmd):
        if cmd.data:
            raise StatusError(SW_WRONG_LENGTH)
        pin = self.pins[PIN_LOCAL]
        if not pin.verified or self.df is not self.signature_df:
            raise StatusError(SW_SECURITY)
        if self.dst is None or self.digest is None or self.dst[1] != self.hash_id:
            raise StatusError(SW_NOT_ALLOWED)
        algorithm = HASH_IDS[self.hash_id][0]()
        signature = self.pair.key.sign(self.digest, padding.PKCS1v15(), Prehashed(algorithm))
        pin.verified = False  # PIN always: one signature per VERIFY
        self.digest = None
        return signature, SW_OK
