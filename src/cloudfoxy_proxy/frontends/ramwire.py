"""The RAMOverHTTP (OpenSCDP remote card access) message format, both ways.

Every body is one BER-TLV template (docs/ramoverhttp.md, "Wire format"):
one-byte tags, lengths ``<80``, ``81 xx`` or ``82 xx xx`` only (at most
65,535 bytes per template), and tags ``22``/``23`` carry raw APDU bytes
although BER would call them constructed.  The generic codec of
:mod:`cloudfoxy_proxy.apdu` reads and writes them with
``one_byte_tags=True, max_length_bytes=2`` and ``max_length=MAX_TLV``.

* client -> server, first: ``E8 { C0 <ATR> [C1 ..] [C2 ..] }``;
* server -> client: ``AA { 22 <C-APDU> | C0 (empty: reset) | E0 { 02 <id>, 0C <text> } ... }``;
  ``AA 00`` is the empty script (keep-alive);
* client -> server: ``AB { 23 <R-APDU> | C0 <ATR> ... [E1 { 0C <text> }] 80 <count> }``;
  the count is unreliable (OCF 1.4 always writes 1): count the items.
"""

from ..apdu import parse_tlvs, tlv

#: Content types (the client's request, the server's answer).
REQUEST_TYPE = b"application/org.openscdp-content-mgt-response;version=1.0"
SCRIPT_TYPE = b"application/org.openscdp-content-mgt;version=1.0"
#: The header CardContact's C client adds (OCF sends none: never required).
ADMIN_PROTOCOL = b"openscdp-remote-admin/1.0"

MAX_TLV = 0xFFFF  #: longest value of one template (``82 FF FF``)
MAX_BODY = 1 + 3 + MAX_TLV  #: tag, ``82 xx xx`` and the value

INITIATE, SCRIPT, ANSWER = 0xE8, 0xAA, 0xAB
C_APDU, R_APDU, ATR, NOTIFY, ERROR, COUNT = 0x22, 0x23, 0xC0, 0xE0, 0xE1, 0x80
NOTIFY_ID, TEXT = 0x02, 0x0C

#: Script and answer steps, as (kind, value).
RESET, APDU, MESSAGE = "RESET", "APDU", "NOTIFY"
#: answer items
RESPONSE, FAILURE = "RESPONSE", "FAILURE"  # ATR answers use kind RESET

#: The empty script: nothing to do yet (the keep-alive).
KEEP_ALIVE = bytes([SCRIPT, 0])


def encode(tag, value):
    """One template; ValueError when ``value`` is over MAX_TLV bytes."""
    return tlv(tag, value, MAX_TLV)


def parse(data):
    """The top-level TLVs of ``data`` under RAMOverHTTP's rules; ValueError."""
    return parse_tlvs(data, one_byte_tags=True, max_length_bytes=2)


def template(body):
    """``(tag, items)`` of a body that is exactly one template; ValueError."""
    top = parse(body)
    if len(top) != 1:
        raise ValueError(f"{len(top)} templates in the body instead of one")
    tag, value = top[0]
    if tag not in (INITIATE, SCRIPT, ANSWER):
        raise ValueError(f"template tag {tag:02X} (expected E8, AA or AB)")
    return tag, parse(value)


def initiation_atr(items):
    """The ATR of an ``E8`` template's items; ValueError without one."""
    for tag, value in items:
        if tag == ATR:
            if not 2 <= len(value) <= 36:
                raise ValueError(f"an ATR of {len(value)} bytes in E8 (2..36)")
            return value
    raise ValueError("no C0 ATR in E8")


def encode_initiation(atr):
    return encode(INITIATE, encode(ATR, atr))


def encode_script(steps):
    """``AA`` with one item per step: ``(RESET, None)``, ``(APDU, bytes)``
    or ``(MESSAGE, (id, text))``; ValueError when over 65,535 bytes."""
    parts = []
    for kind, value in steps:
        if kind == APDU:
            parts.append(encode(C_APDU, value))
        elif kind == RESET:
            parts.append(encode(ATR, b""))
        else:
            number, text = value
            parts.append(encode(NOTIFY, encode(NOTIFY_ID, number.to_bytes(1, "big", signed=True))
                                + encode(TEXT, text.encode("utf-8"))))
    return encode(SCRIPT, b"".join(parts))


def decode_script(items):
    """An ``AA`` template's items as steps; ValueError for any other tag
    (the C client aborts the session on one)."""
    steps = []
    for tag, value in items:
        if tag == C_APDU:
            steps.append((APDU, value))
        elif tag == ATR:
            steps.append((RESET, None))
        elif tag == NOTIFY:
            number, text = 0, ""
            for inner, data in parse(value):
                if inner == NOTIFY_ID and data:
                    number = int.from_bytes(data, "big", signed=True)
                elif inner == TEXT:
                    text = data.decode("utf-8", "replace")
            steps.append((MESSAGE, (number, text)))
        else:
            raise ValueError(f"tag {tag:02X} in a script")
    return steps


def encode_answer(items):
    """``AB`` of answer items ``(RESPONSE, r_apdu)``, ``(RESET, atr)``,
    ``(FAILURE, text)``, then ``80`` with the number of items."""
    parts = []
    for kind, value in items:
        if kind == RESPONSE:
            parts.append(encode(R_APDU, value))
        elif kind == RESET:
            parts.append(encode(ATR, value))
        else:
            parts.append(encode(ERROR, encode(TEXT, value.encode("utf-8")[:1000])))
    count = len(items)
    parts.append(encode(COUNT, count.to_bytes(max(1, (count.bit_length() + 7) // 8), "big")))
    return encode(ANSWER, b"".join(parts))


def decode_answer(items):
    """An ``AB`` template's items as answer items (``80`` and unknown tags
    are skipped: the count is unreliable)."""
    out = []
    for tag, value in items:
        if tag == R_APDU:
            out.append((RESPONSE, value))
        elif tag == ATR:
            out.append((RESET, value))
        elif tag == ERROR:
            text = ""
            try:
                for inner, data in parse(value):
                    if inner == TEXT:
                        text = data.decode("utf-8", "replace")
            except ValueError:
                text = "malformed E1"
            out.append((FAILURE, text or "error"))
    return out
