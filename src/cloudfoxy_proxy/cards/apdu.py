"""ISO 7816-4 command APDU structure and status words, shared by every
emulated card."""

import attr

SW_OK = 0x9000
SW_EOF_WARNING = 0x6282  # end of file reached before reading Ne bytes
SW_WRONG_LENGTH = 0x6700
SW_INCOMPATIBLE = 0x6981  # command incompatible with file structure
SW_SECURITY = 0x6982  # security status not satisfied
SW_NOT_ALLOWED = 0x6985  # conditions of use not satisfied
SW_NO_CURRENT_EF = 0x6986  # command not allowed (no current EF)
SW_WRONG_DATA = 0x6A80
SW_FUNC_NOT_SUPPORTED = 0x6A81
SW_NOT_FOUND = 0x6A82
SW_NO_SPACE = 0x6A84
SW_WRONG_P1P2 = 0x6A86
SW_DATA_NOT_FOUND = 0x6A88
SW_WRONG_OFFSET = 0x6B00
SW_INS_NOT_SUPPORTED = 0x6D00
SW_CLA_NOT_SUPPORTED = 0x6E00


class BadLength(Exception):
    """The bytes are not a well-formed command APDU (answered 6700)."""


@attr.s(slots=True, frozen=True)
class CommandAPDU:
    cla = attr.ib()
    ins = attr.ib()
    p1 = attr.ib()
    p2 = attr.ib()
    data = attr.ib(default=b"")
    ne = attr.ib(default=None)  # None: no Le field; else 1..256 or 1..65536
    extended = attr.ib(default=False)


def parse_command(apdu):
    """The four ISO 7816-4 cases, short and extended; raises BadLength."""
    n = len(apdu)
    if n < 4:
        raise BadLength()
    cla, ins, p1, p2 = apdu[0], apdu[1], apdu[2], apdu[3]
    if n == 4:
        return CommandAPDU(cla, ins, p1, p2)
    b = apdu[4]
    if n == 5:
        return CommandAPDU(cla, ins, p1, p2, ne=b or 256)
    if b:
        if n == 5 + b:
            return CommandAPDU(cla, ins, p1, p2, apdu[5:])
        if n == 6 + b:
            return CommandAPDU(cla, ins, p1, p2, apdu[5:-1], apdu[-1] or 256)
        raise BadLength()
    if n < 7:
        raise BadLength()
    lx = apdu[5] << 8 | apdu[6]
    if n == 7:
        return CommandAPDU(cla, ins, p1, p2, ne=lx or 65536, extended=True)
    if lx == 0:
        raise BadLength()
    if n == 7 + lx:
        return CommandAPDU(cla, ins, p1, p2, apdu[7:], extended=True)
    if n == 9 + lx:
        le = apdu[-2] << 8 | apdu[-1]
        return CommandAPDU(cla, ins, p1, p2, apdu[7:-2], le or 65536, extended=True)
    raise BadLength()


def sw(status, data=b""):
    """A response APDU: data then SW1 SW2."""
    return bytes(data) + status.to_bytes(2, "big")


def tlv(tag, value, max_length=0xFFFFFF):
    """BER-TLV with one- or two-byte tags and definite lengths (``<80``,
    ``81 xx``, ``82 xx xx``, ``83 xx xx xx``); ValueError for a value longer
    than ``max_length`` bytes (RAMOverHTTP: 65,535, docs/ramoverhttp.md)."""
    tag_bytes = tag.to_bytes(2 if tag > 0xFF else 1, "big")
    n = len(value)
    if n > max_length:
        raise ValueError(f"a value of {n} bytes (at most {max_length} in one TLV)")
    if n < 0x80:
        length = bytes([n])
    elif n < 0x100:
        length = bytes([0x81, n])
    elif n < 0x10000:
        length = bytes([0x82]) + n.to_bytes(2, "big")
    else:
        length = bytes([0x83]) + n.to_bytes(3, "big")
    return tag_bytes + length + bytes(value)


def parse_tlvs(data, one_byte_tags=False, max_length_bytes=3):
    """Top-level BER-TLVs of ``data`` as [(tag, value)]; ValueError if malformed.

    Values are not parsed further whatever their tag's constructed bit says
    (a caller parses the templates it knows).  ``one_byte_tags``: every tag
    is one byte, even ``xF``/``x1F`` forms (RAMOverHTTP);
    ``max_length_bytes``: the longest ``8n`` length form accepted (2: at
    most ``82 xx xx``)."""
    out = []
    i, n = 0, len(data)
    while i < n:
        tag = data[i]
        i += 1
        if tag & 0x1F == 0x1F and not one_byte_tags:
            while True:
                if i >= n:
                    raise ValueError("truncated tag")
                tag = tag << 8 | data[i]
                i += 1
                if not data[i - 1] & 0x80:
                    break
        if i >= n:
            raise ValueError("missing length")
        length = data[i]
        i += 1
        if length & 0x80:
            k = length & 0x7F
            if not 1 <= k <= max_length_bytes or i + k > n:
                raise ValueError("bad length")
            length = int.from_bytes(data[i:i + k], "big")
            i += k
        if i + length > n:
            raise ValueError("value runs past the end")
        out.append((tag, bytes(data[i:i + length])))
        i += length
    return out


def make_atr(historical):
    """A T=1 ATR (TS 3B, T0, TD1 80, TD2 01, historical bytes, TCK)."""
    if len(historical) > 15:
        raise ValueError("at most 15 historical bytes")
    body = bytes([0x80 | len(historical), 0x80, 0x01]) + bytes(historical)
    tck = 0
    for b in body:
        tck ^= b
    return bytes([0x3B]) + body + bytes([tck])
