"""ISO 7816-4 helpers, one copy for the whole proxy: command APDU
structure (ISO 7816-4 5.1), status words, the BER-TLV codec (ISO 7816-4
5.2 and Annex D; ``tlv``/``parse_tlvs``/``find_tlv``) and the host side's
GET RESPONSE / 61xx / 6Cxx follow-up (ISO 7816-4 5.1.3 and 5.3.4).

Used by the emulated cards (``cards/``), the signing profiles
(``signing/profiles/``, Deferred-based) and the PC/SC backend
(``backends/pcsc_thread.py``, synchronous on the reader's thread): the
follow-up is written once, as the generator ``follow_up``, and driven by
``run_sync`` or ``run_deferred``.
"""

import attr
from twisted.internet.defer import inlineCallbacks

SW_OK = 0x9000
SW_EOF_WARNING = 0x6282  # end of file reached before reading Ne bytes
SW_WRONG_LENGTH = 0x6700
SW_INCOMPATIBLE = 0x6981  # command incompatible with file structure
SW_SECURITY = 0x6982  # security status not satisfied
SW_NOT_ALLOWED = 0x6985  # conditions of use not satisfied
SW_NO_CURRENT_EF = 0x6986  # command not allowed (no current EF)
SW_WRONG_DATA = 0x6A80
SW_NOT_FOUND = 0x6A82
SW_WRONG_P1P2 = 0x6A86
SW_DATA_NOT_FOUND = 0x6A88
SW_WRONG_OFFSET = 0x6B00
SW_INS_NOT_SUPPORTED = 0x6D00
SW_CLA_NOT_SUPPORTED = 0x6E00


class BadLength(Exception):
    """The bytes are not a well-formed command APDU (answered 6700)."""


@attr.s(slots=True, hash=True)
class CommandAPDU:
    """A parsed command APDU (``parse_command``): a value nothing changes
    once made (not ``frozen``, which makes building one, once per APDU an
    emulated card runs, about 3.5 times dearer)."""

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


#: The status words answered alone so far (at most 65,536 of 2 bytes each).
_SW_ALONE = {}


def sw(status, data=b""):
    """A response APDU: data then SW1 SW2."""
    if not data:
        alone = _SW_ALONE.get(status)
        if alone is None:
            alone = _SW_ALONE[status] = status.to_bytes(2, "big")
        return alone
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


def find_tlv(data, tag):
    """The value of the first top-level BER-TLV of ``data`` with ``tag``, or
    None; ValueError if ``data`` is malformed."""
    for t, value in parse_tlvs(data):
        if t == tag:
            return value
    return None


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


# -- GET RESPONSE / 61xx / 6Cxx follow-up (host side) ---------------------------

#: GET RESPONSE rounds followed at most for one command.
MAX_GET_RESPONSE = 256


def with_le(apdu, le):
    """``apdu`` with its short Le replaced by (or, without one, given) ``le``
    (an extended APDU is returned unchanged)."""
    if len(apdu) == 4:
        return apdu + bytes([le])
    if len(apdu) == 5:
        return apdu[:4] + bytes([le])
    lc = apdu[4]
    if lc and len(apdu) == 5 + lc:
        return apdu + bytes([le])
    if lc and len(apdu) == 6 + lc:
        return apdu[:-1] + bytes([le])
    return apdu


def get_response_cla(cla):
    """The CLA of the GET RESPONSE that follows a command of class ``cla``:
    it keeps the command's logical channel (ISO 7816-4 5.4.1: channels 0..3
    in bits 1-2 of the first interindustry class, 4..19 in bits 1-4 of the
    further interindustry class), without chaining or secure messaging."""
    if cla & 0x40 and not cla & 0x80:
        return cla & 0x4F  # further interindustry class: channels 4..19
    return cla & 0x03


def follow_up(command):
    """The exchange of one command with its follow-ups, as a generator: it
    yields each command APDU (bytes) to send and must be sent the response
    APDU (bytes) to each; it returns the complete response.

    * ``6Cxx`` (wrong Le, no data): the command once more with Le = xx;
    * ``61xx`` (more data): GET RESPONSE (``get_response_cla``, Le = xx),
      the data collected, at most ``MAX_GET_RESPONSE`` rounds; past that
      the collected data and the last ``61xx`` are returned as they are.

    The result is all data then the last SW1 SW2; a follow-up answer
    without a status word is returned alone (the caller refuses it).
    """
    response = yield command
    if len(response) == 2 and response[0] == 0x6C:
        response = yield with_le(command, response[1])
    data = b""
    rounds = 0
    while len(response) >= 2 and response[-2] == 0x61 and rounds < MAX_GET_RESPONSE:
        data += response[:-2]
        response = yield bytes([get_response_cla(command[0]), 0xC0, 0x00, 0x00, response[-1]])
        rounds += 1
        if len(response) < 2:
            return bytes(response)
    return data + bytes(response)


def run_sync(steps, send):
    """Drive ``steps`` (a ``follow_up`` generator) with a blocking
    ``send(apdu) -> response``; the complete response."""
    try:
        apdu = next(steps)
        while True:
            apdu = steps.send(send(apdu))
    except StopIteration as done:
        return done.value


@inlineCallbacks
def run_deferred(steps, transmit):
    """Drive ``steps`` (a ``follow_up`` generator) with
    ``transmit(apdu) -> Deferred[response]``; a Deferred firing with the
    complete response."""
    try:
        apdu = next(steps)
        while True:
            response = yield transmit(apdu)
            apdu = steps.send(response)
    except StopIteration as done:
        return done.value


# -- what traces keep out (docs/trace.md, "Privacy") ------------------------------

#: Instructions whose data field is a secret (a PIN, a PUK, a new reference
#: value): VERIFY (20, 21), CHANGE REFERENCE DATA (24), RESET RETRY COUNTER (2C).
SECRET_INS = frozenset((0x20, 0x21, 0x24, 0x2C))


def secure_messaging(cla):
    """True when the class byte ``cla`` says the command is protected by
    secure messaging (ISO 7816-4 5.4.1): bits 4-3 of a first interindustry
    class (``x4``, ``x8``, ``xC``: also how GlobalPlatform marks a secure
    channel in its ``8x`` class), bit 6 of a further interindustry class."""
    if cla & 0x40:
        return bool(cla & 0x20)
    return bool(cla & 0x0C)


#: Every class byte that ``secure_messaging`` says is secure messaging (a
#: set test is cheaper than the call where every APDU is looked at).
SM_CLASSES = frozenset(c for c in range(256) if secure_messaging(c))


def secret_span(apdu):
    """``(offset, length)`` of the data field of the command APDU ``apdu``
    (bytes) that must not be written down — the data of VERIFY, CHANGE
    REFERENCE DATA, RESET RETRY COUNTER and of every command under secure
    messaging — or None when it has no such data.  An APDU whose structure
    is not one of the four cases hides everything after its header."""
    if len(apdu) < 5 or (apdu[1] not in SECRET_INS and apdu[0] not in SM_CLASSES):
        return None
    try:
        command = parse_command(apdu)
    except BadLength:
        return (4, len(apdu) - 4)
    if not command.data:
        return None
    return (7 if command.extended else 5, len(command.data))
