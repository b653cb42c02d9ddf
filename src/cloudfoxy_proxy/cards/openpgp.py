"""An emulated OpenPGP card (functional specification v3.4), honest enough
for GnuPG's scdaemon, OpenSC and the proxy's own OpenPGP profile.

* SELECT by the (partial) AID ``D2 76 00 01 24 01``; full AID
  ``D2 76 00 01 24 01 03 04 FF FF <serial 4> 00 00`` (manufacturer FFFF:
  test card).
* GET DATA 004F, 005E, 0065, 006E, 007A, 00C4, 5F50, 5F52, 7F21 (the
  cardholder certificate, for the signature key) and the simple DOs inside
  the templates; private DOs 0101-0104 are empty; others 6A88.
* Public key read: GENERATE ASYMMETRIC KEY PAIR (INS 47) P1=81 with the
  CRT ``B6`` (signature) or ``A4`` (authentication); ``7F49 {81 n, 82 e}``
  or ``7F49 {86 point}``.  There is no decryption key of its own (B8: 6A88).
* VERIFY 81 / 82 (PW1, default ``123456``) and 83 (PW3, ``12345678``),
  3 tries each; a wrong password answers 6982, a blocked one 6983; VERIFY
  with no data returns ``63Cx`` or 9000; P1=FF resets the status.
* PSO: COMPUTE DIGITAL SIGNATURE (00 2A 9E 9A) after VERIFY 81, which is
  valid for one signature (PW status byte 1 = 00): RSA keys take a
  DigestInfo (PKCS#1 v1.5 padding by the card), ECDSA P-256 keys a hash
  and answer the raw ``r || s``; the signature counter (DO 93 in 7A)
  counts.  INTERNAL AUTHENTICATE (00 88 00 00) signs with the
  authentication key after VERIFY 82.
* MSE (INS 22) ``41 B8 {83 01 03}`` and PSO:DECIPHER (00 2A 80 86, after
  VERIFY 82) with the authentication key when it is RSA (the card removes
  the PKCS#1 v1.5 padding): OpenSC offers decryption with that key.
* SELECT DATA (INS A5) of the cardholder certificate's occurrence: 0 is
  the signature key's certificate, 1 and 2 are empty.
* Command chaining (CLA 10), announced in the historical bytes.

Card ``n`` of a backend has RSA-2048 keys when ``n`` is even and ECDSA
P-256 keys when it is odd, so a two-card backend shows both.
"""

import hashlib
import os

from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

from ..apdu import (
    SW_DATA_NOT_FOUND, SW_NOT_FOUND, SW_OK, SW_SECURITY, SW_WRONG_DATA,
    SW_WRONG_LENGTH, SW_WRONG_P1P2, make_atr, tlv,
)
from .iso7816 import StatusError
from .pki import (
    P256, RSA2048, SigningCard, card_number, der_to_raw, ecdsa_p256, get_pki,
    pkcs1_type1, raw_rsa,
)

RID_APP = bytes.fromhex("D27600012401")
VERSION = b"\x03\x04"
MANUFACTURER = b"\xff\xff"  # test card

#: Category 00, card service data 31 C5, card capabilities 73 C0 01 80
#: (selection by full and partial DF name; command chaining), status 05 90 00.
HISTORICAL = bytes.fromhex("0031C573C0018005" + "9000")

INS_SELECT = 0xA4
INS_GET_DATA = 0xCA
INS_VERIFY = 0x20
INS_PSO = 0x2A
INS_INTERNAL_AUTHENTICATE = 0x88
INS_KEYPAIR = 0x47
INS_GET_CHALLENGE = 0x84
INS_SELECT_DATA = 0xA5
INS_MSE = 0x22
SELECT_CARDHOLDER_CERT = bytes.fromhex("60045C027F21")
CERT_OCCURRENCES = 3

CRT_SIG, CRT_DEC, CRT_AUT = 0xB6, 0xB8, 0xA4
SW_BLOCKED = 0x6983
TRIES = 3
OID_P256 = bytes.fromhex("2A8648CE3D030107")
ALGO_RSA, ALGO_ECDSA = 0x01, 0x13


def algorithm_attributes(kind):
    if kind == RSA2048:
        return bytes([ALGO_RSA]) + (2048).to_bytes(2, "big") + (32).to_bytes(2, "big") + b"\x00"
    return bytes([ALGO_ECDSA]) + OID_P256


def _mpi(raw):
    raw = raw.lstrip(b"\x00") or b"\x00"
    bits = len(raw) * 8 - (8 - raw[0].bit_length())
    return bits.to_bytes(2, "big") + raw


def public_key_material(public_key):
    """The card's ``7F49`` public key template content."""
    if isinstance(public_key, rsa.RSAPublicKey):
        numbers = public_key.public_numbers()
        n = numbers.n.to_bytes((numbers.n.bit_length() + 7) // 8, "big")
        e = numbers.e.to_bytes((numbers.e.bit_length() + 7) // 8, "big")
        return tlv(0x81, n) + tlv(0x82, e)
    point = public_key.public_bytes(*_uncompressed())
    return tlv(0x86, point)


def _uncompressed():
    from cryptography.hazmat.primitives import serialization

    return serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint


def fingerprint(public_key, created):
    """The OpenPGP v4 fingerprint of the key as created at ``created`` (Unix time)."""
    if isinstance(public_key, rsa.RSAPublicKey):
        numbers = public_key.public_numbers()
        material = bytes([ALGO_RSA]) + _mpi(numbers.n.to_bytes(256, "big")) + _mpi(numbers.e.to_bytes(4, "big"))
    elif isinstance(public_key, ec.EllipticCurvePublicKey):
        material = bytes([ALGO_ECDSA, len(OID_P256)]) + OID_P256 + _mpi(public_key.public_bytes(*_uncompressed()))
    else:
        raise ValueError("unsupported key")
    body = b"\x04" + int(created).to_bytes(4, "big") + material
    return hashlib.sha1(b"\x99" + len(body).to_bytes(2, "big") + body).digest()


class Password:
    __slots__ = ("value", "tries")

    def __init__(self, value):
        self.value = value.encode("utf-8") if isinstance(value, str) else value
        self.tries = TRIES


class OpenPgpCard(SigningCard):
    """Signature key (CRT B6) and authentication key (A4), RSA-2048 on
    even serials and P-256 on odd ones; the cardholder certificate (7F21)
    is the signature key's, subject CN "LABEL OpenPGP NN Signing"."""

    def __init__(self, serial, pin="123456", label="Emulated", keys=None, admin_pin="12345678",
                 random_bytes=os.urandom):
        super().__init__()
        if not 6 <= len(pin.encode("utf-8")) <= 127:
            raise ValueError("an OpenPGP PW1 has 6 to 127 characters")
        self.serial = serial
        self.random_bytes = random_bytes
        self.atr = make_atr(HISTORICAL)
        self.aid = RID_APP + VERSION + MANUFACTURER + card_number("openpgp", label, serial, 4) + b"\x00\x00"
        self.kind = RSA2048 if serial % 2 == 0 else P256
        pki = get_pki(keys)
        self.sig = pki.leaf(f"{label} OpenPGP {serial:02d} Signing", self.kind, signing=True)
        self.aut = pki.leaf(f"{label} OpenPGP {serial:02d} Authentication", self.kind, signing=False)
        self.created = {
            CRT_SIG: int(self.sig.cert.not_valid_before_utc.timestamp()),
            CRT_AUT: int(self.aut.cert.not_valid_before_utc.timestamp()),
        }
        self.pw1 = Password(pin)
        self.pw3 = Password(admin_pin)
        self.signature_counter = 0
        self.handlers.update({
            INS_SELECT: self.select,
            INS_GET_DATA: self.get_data,
            INS_VERIFY: self.verify,
            INS_PSO: self.pso,
            INS_INTERNAL_AUTHENTICATE: self.internal_authenticate,
            INS_KEYPAIR: self.keypair,
            INS_GET_CHALLENGE: self.get_challenge,
            INS_SELECT_DATA: self.select_data,
            INS_MSE: self.mse,
        })
        self.reset()

    def reset(self):
        self.selected = False
        self.occurrence = 0  # of DO 7F21, chosen by SELECT DATA
        self.pw1_81 = self.pw1_82 = self.pw3_ok = False
        self.decipher_key = CRT_DEC  # MSE: which key PSO:DECIPHER uses
        return super().reset()

    def _key(self, crt):
        return {CRT_SIG: self.sig, CRT_AUT: self.aut}.get(crt)

    # SELECT ------------------------------------------------------------------------
    def select(self, cmd):
        if cmd.p1 != 0x04:
            raise StatusError(SW_WRONG_P1P2)
        if len(cmd.data) < len(RID_APP) or not self.aid.startswith(cmd.data):
            raise StatusError(SW_NOT_FOUND)
        self.selected = True
        self.occurrence = 0
        return b"", SW_OK

    def select_data(self, cmd):
        """SELECT DATA (v3 §7.2.5): which of the three cardholder
        certificates (7F21: signature, decryption, authentication key) GET
        DATA 7F21 returns; only the first holds one."""
        self._need_selected()
        if cmd.p2 != 0x04 or cmd.p1 >= CERT_OCCURRENCES:
            raise StatusError(SW_WRONG_P1P2)
        if cmd.data != SELECT_CARDHOLDER_CERT:
            raise StatusError(SW_WRONG_DATA)
        self.occurrence = cmd.p1
        return b"", SW_OK

    def _need_selected(self):
        if not self.selected:
            raise StatusError(0x6D00)

    # Data objects --------------------------------------------------------------------
    def pw_status(self):
        return bytes([0x00, 127, 127, 127, self.pw1.tries, 0, self.pw3.tries])

    def _fingerprints(self):
        out = b""
        for crt in (CRT_SIG, CRT_DEC, CRT_AUT):
            pair = self._key(crt)
            out += fingerprint(pair.key.public_key(), self.created[crt]) if pair else bytes(20)
        return out

    def _dates(self):
        return b"".join(self.created.get(crt, 0).to_bytes(4, "big") for crt in (CRT_SIG, CRT_DEC, CRT_AUT))

    def discretionary(self):
        # C0: no secure messaging, GET CHALLENGE (bit 0x40), PW status
        # changeable (0x10); max challenge 255, max certificate 2048, max
        # special DO 255, PIN block 2 format no, MSE yes.
        ext_caps = bytes([0x50, 0x00, 0x00, 0xFF, 0x08, 0x00, 0x00, 0xFF, 0x00, 0x01])
        return (tlv(0xC0, ext_caps) + tlv(0xC1, algorithm_attributes(self.kind))
                + tlv(0xC2, algorithm_attributes(RSA2048)) + tlv(0xC3, algorithm_attributes(self.kind))
                + tlv(0xC4, self.pw_status()) + tlv(0xC5, self._fingerprints()) + tlv(0xC6, bytes(60))
                + tlv(0xCD, self._dates()) + tlv(0xDE, bytes([0x01, 0x02, 0x02, 0x00, 0x03, 0x02])))

    def cardholder(self):
        return tlv(0x5B, f"Emulated<<Card {self.serial:02d}".encode()) + tlv(0x5F2D, b"en") + tlv(0x5F35, b"9")

    def data_object(self, tag):
        simple = {
            0x004F: lambda: self.aid,
            0x005E: lambda: b"",
            0x5F50: lambda: b"",
            0x5F52: lambda: HISTORICAL,
            0x00C4: self.pw_status,
            0x0101: lambda: b"", 0x0102: lambda: b"", 0x0103: lambda: b"", 0x0104: lambda: b"",
            0x0065: lambda: tlv(0x65, self.cardholder()),
            0x006E: lambda: tlv(0x6E, tlv(0x4F, self.aid) + tlv(0x5F52, HISTORICAL)
                                + tlv(0x73, self.discretionary())),
            0x007A: lambda: tlv(0x7A, tlv(0x93, self.signature_counter.to_bytes(3, "big"))),
            0x7F21: lambda: tlv(0x7F21, self.sig.der) if self.occurrence == 0 else b"",
            0x005B: lambda: self.cardholder()[2:2 + self.cardholder()[1]],
            0x5F2D: lambda: b"en",
            0x5F35: lambda: b"9",
            0x0093: lambda: self.signature_counter.to_bytes(3, "big"),
            0x00C0: lambda: self.discretionary()[2:12],
            0x00C1: lambda: algorithm_attributes(self.kind),
            0x00C2: lambda: algorithm_attributes(RSA2048),
            0x00C3: lambda: algorithm_attributes(self.kind),
            0x00C5: self._fingerprints,
            0x00C6: lambda: bytes(60),
            0x00CD: self._dates,
        }.get(tag)
        if simple is None:
            raise StatusError(SW_DATA_NOT_FOUND)
        return simple()

    def get_data(self, cmd):
        self._need_selected()
        if cmd.data:
            raise StatusError(SW_WRONG_LENGTH)
        return self.data_object(cmd.p1 << 8 | cmd.p2), SW_OK

    # VERIFY --------------------------------------------------------------------------
    def verify(self, cmd):
        self._need_selected()
        if cmd.p2 not in (0x81, 0x82, 0x83):
            raise StatusError(SW_WRONG_P1P2)
        pw = self.pw3 if cmd.p2 == 0x83 else self.pw1
        if cmd.p1 == 0xFF:
            if cmd.data:
                raise StatusError(SW_WRONG_LENGTH)
            self._set(cmd.p2, False)
            return b"", SW_OK
        if cmd.p1 != 0x00:
            raise StatusError(SW_WRONG_P1P2)
        if not cmd.data:
            if self._get(cmd.p2):
                return b"", SW_OK
            raise StatusError(0x63C0 | pw.tries if pw.tries else SW_BLOCKED)
        if not pw.tries:
            raise StatusError(SW_BLOCKED)
        if cmd.data != pw.value:
            pw.tries -= 1
            self._set(cmd.p2, False)
            raise StatusError(SW_SECURITY if pw.tries else SW_BLOCKED)
        pw.tries = TRIES
        self._set(cmd.p2, True)
        return b"", SW_OK

    def _get(self, ref):
        return {0x81: self.pw1_81, 0x82: self.pw1_82, 0x83: self.pw3_ok}[ref]

    def _set(self, ref, value):
        if ref == 0x81:
            self.pw1_81 = value
        elif ref == 0x82:
            self.pw1_82 = value
        else:
            self.pw3_ok = value

    # Signing -------------------------------------------------------------------------
    def _sign(self, pair, data):
        if self.kind == RSA2048:
            if not data or len(data) > 256 * 40 // 100:
                raise StatusError(SW_WRONG_LENGTH)
            return raw_rsa(pair.key, pkcs1_type1(data, 256))
        if not data:
            raise StatusError(SW_WRONG_LENGTH)
        return der_to_raw(ecdsa_p256(pair.key, data))

    def mse(self, cmd):
        """MANAGE SECURITY ENVIRONMENT (v3 §7.2.18): ``41 B8 {83 01 kk}``
        makes key kk (02 decryption, 03 authentication) the one for
        PSO:DECIPHER; ``41 A4`` is accepted for kk 02/03 and changes
        nothing else here."""
        self._need_selected()
        if cmd.p1 != 0x41 or cmd.p2 not in (CRT_AUT, CRT_DEC):
            raise StatusError(SW_WRONG_P1P2)
        if len(cmd.data) != 3 or cmd.data[:2] != b"\x83\x01" or cmd.data[2] not in (0x02, 0x03):
            raise StatusError(SW_WRONG_DATA)
        if cmd.p2 == CRT_DEC:
            self.decipher_key = CRT_DEC if cmd.data[2] == 0x02 else CRT_AUT
        return b"", SW_OK

    def decipher(self, cmd):
        """PSO:DECIPHER with an RSA key: ``00`` then the ciphertext; the
        card removes the PKCS#1 v1.5 padding.  Needs PW1 (82)."""
        pair = self._key(self.decipher_key)
        if pair is None:
            raise StatusError(SW_DATA_NOT_FOUND)
        if not self.pw1_82:
            raise StatusError(SW_SECURITY)
        if self.kind != RSA2048 or not cmd.data or cmd.data[0] != 0x00:
            raise StatusError(SW_WRONG_DATA)
        try:
            return pair.key.decrypt(bytes(cmd.data[1:]), padding.PKCS1v15()), SW_OK
        except ValueError:
            raise StatusError(SW_WRONG_DATA) from None

    def pso(self, cmd):
        self._need_selected()
        if (cmd.p1, cmd.p2) == (0x80, 0x86):
            return self.decipher(cmd)
        if (cmd.p1, cmd.p2) != (0x9E, 0x9A):
            raise StatusError(SW_WRONG_P1P2)
        if not self.pw1_81:
            raise StatusError(SW_SECURITY)
        signature = self._sign(self.sig, cmd.data)
        self.pw1_81 = False  # PW1 (81) is valid for one signature
        self.signature_counter = min(self.signature_counter + 1, 0xFFFFFF)
        return signature, SW_OK

    def internal_authenticate(self, cmd):
        self._need_selected()
        if (cmd.p1, cmd.p2) != (0x00, 0x00):
            raise StatusError(SW_WRONG_P1P2)
        if not self.pw1_82:
            raise StatusError(SW_SECURITY)
        return self._sign(self.aut, cmd.data), SW_OK

    # Keys ----------------------------------------------------------------------------
    def keypair(self, cmd):
        self._need_selected()
        if cmd.p1 == 0x80:
            raise StatusError(SW_SECURITY if not self.pw3_ok else 0x6A81)  # no on-card generation
        if cmd.p1 != 0x81 or cmd.p2:
            raise StatusError(SW_WRONG_P1P2)
        if len(cmd.data) < 2 or cmd.data[0] not in (CRT_SIG, CRT_DEC, CRT_AUT):
            raise StatusError(SW_WRONG_DATA)
        pair = self._key(cmd.data[0])
        if pair is None:
            raise StatusError(SW_DATA_NOT_FOUND)
        return tlv(0x7F49, public_key_material(pair.key.public_key())), SW_OK

    def get_challenge(self, cmd):
        if cmd.p1 or cmd.p2 or cmd.ne is None:
            raise StatusError(SW_WRONG_P1P2 if cmd.p1 or cmd.p2 else SW_WRONG_LENGTH)
        return self.random_bytes(min(cmd.ne, 255)), SW_OK
