"""Names for people: ISO 7816-4 instructions and status words, used by the
trace viewer (``foxyproxy-trace``, docs/trace.md).  APDU structure itself
is in ``apdu.py``.

* :data:`INSTRUCTIONS`: INS byte -> name (ISO 7816-4 5.1.2 table 4, with
  the interindustry commands of ISO 7816-8/-9 the card profiles use);
* :func:`status_meaning`: SW1 SW2 -> meaning (ISO 7816-4 5.6, tables 5-6,
  and the card types' own words in :data:`PROFILE_STATUS`);
* :data:`CHALLENGE_INS`: instructions whose answer depends on a random
  challenge (a replayed answer to them does not prove anything).
"""

INSTRUCTIONS = {
    0x04: "DEACTIVATE FILE", 0x0C: "ERASE RECORD", 0x0E: "ERASE BINARY", 0x0F: "ERASE BINARY",
    0x10: "PERFORM SCQL OPERATION", 0x12: "PERFORM TRANSACTION OPERATION",
    0x14: "PERFORM USER OPERATION", 0x20: "VERIFY", 0x21: "VERIFY",
    0x22: "MANAGE SECURITY ENVIRONMENT", 0x24: "CHANGE REFERENCE DATA",
    0x26: "DISABLE VERIFICATION REQUIREMENT", 0x28: "ENABLE VERIFICATION REQUIREMENT",
    0x2A: "PERFORM SECURITY OPERATION", 0x2C: "RESET RETRY COUNTER", 0x44: "ACTIVATE FILE",
    0x46: "GENERATE ASYMMETRIC KEY PAIR", 0x47: "GENERATE ASYMMETRIC KEY PAIR",
    0x70: "MANAGE CHANNEL", 0x82: "EXTERNAL AUTHENTICATE", 0x84: "GET CHALLENGE",
    0x86: "GENERAL AUTHENTICATE", 0x87: "GENERAL AUTHENTICATE", 0x88: "INTERNAL AUTHENTICATE",
    0xA0: "SEARCH BINARY", 0xA1: "SEARCH BINARY", 0xA2: "SEARCH RECORD", 0xA4: "SELECT",
    0xA5: "SELECT DATA", 0xB0: "READ BINARY", 0xB1: "READ BINARY", 0xB2: "READ RECORD",
    0xB3: "READ RECORD", 0xC0: "GET RESPONSE", 0xC2: "ENVELOPE", 0xC3: "ENVELOPE",
    0xCA: "GET DATA", 0xCB: "GET DATA", 0xD0: "WRITE BINARY", 0xD1: "WRITE BINARY",
    0xD2: "WRITE RECORD", 0xD6: "UPDATE BINARY", 0xD7: "UPDATE BINARY", 0xDA: "PUT DATA",
    0xDB: "PUT DATA", 0xDC: "UPDATE RECORD", 0xDD: "UPDATE RECORD", 0xE0: "CREATE FILE",
    0xE2: "APPEND RECORD", 0xE4: "DELETE FILE", 0xE6: "TERMINATE DF", 0xE8: "TERMINATE EF",
    0xFE: "TERMINATE CARD USAGE",
}

#: Instructions answered from a random challenge (GET CHALLENGE) or with a
#: cryptogram over one (the AUTHENTICATE family).
CHALLENGE_INS = frozenset((0x82, 0x84, 0x86, 0x87, 0x88))

_EXACT = {
    0x9000: "normal processing: no error",
    0x6200: "warning: no information given (state unchanged)",
    0x6281: "warning: part of returned data may be corrupted",
    0x6282: "warning: end of file or record reached before reading Ne bytes",
    0x6283: "warning: selected file deactivated",
    0x6284: "warning: file control information not formatted",
    0x6285: "warning: selected file in termination state",
    0x6286: "warning: no input data available from a sensor",
    0x6300: "warning: no information given (state changed)",
    0x6381: "warning: file filled up by the last write",
    0x6400: "execution error: state unchanged",
    0x6401: "execution error: immediate response required by the card",
    0x6500: "execution error: no information given (state changed)",
    0x6581: "execution error: memory failure",
    0x6700: "checking error: wrong length",
    0x6800: "checking error: functions in CLA not supported",
    0x6881: "checking error: logical channel not supported",
    0x6882: "checking error: secure messaging not supported",
    0x6883: "checking error: last command of the chain expected",
    0x6884: "checking error: command chaining not supported",
    0x6900: "checking error: command not allowed",
    0x6981: "checking error: command incompatible with file structure",
    0x6982: "checking error: security status not satisfied",
    0x6983: "checking error: authentication method blocked",
    0x6984: "checking error: reference data not usable",
    0x6985: "checking error: conditions of use not satisfied",
    0x6986: "checking error: command not allowed (no current EF)",
    0x6987: "checking error: expected secure messaging data objects missing",
    0x6988: "checking error: incorrect secure messaging data objects",
    0x6A00: "checking error: wrong parameters P1-P2",
    0x6A80: "checking error: incorrect parameters in the command data field",
    0x6A81: "checking error: function not supported",
    0x6A82: "checking error: file or application not found",
    0x6A83: "checking error: record not found",
    0x6A84: "checking error: not enough memory space in the file",
    0x6A85: "checking error: Nc inconsistent with TLV structure",
    0x6A86: "checking error: incorrect parameters P1-P2",
    0x6A87: "checking error: Nc inconsistent with parameters P1-P2",
    0x6A88: "checking error: referenced data or reference data not found",
    0x6A89: "checking error: file already exists",
    0x6A8A: "checking error: DF name already exists",
    0x6B00: "checking error: wrong parameters P1-P2 (offset outside the EF)",
    0x6D00: "checking error: instruction code not supported or invalid",
    0x6E00: "checking error: class not supported",
    0x6F00: "checking error: no precise diagnosis",
}

#: Status words the emulated card types (and the cards they stand for)
#: give beyond ISO 7816-4's table: ``{type: {SW: meaning}}``.
PROFILE_STATUS = {
    "openpgp": {0x6285: "card in termination state (OpenPGP card)"},
    "piv": {0x6A80: "incorrect parameter in the data field (PIV: e.g. a wrong PIN length)"},
}


def status_meaning(sw1, sw2, profile=None):
    """The meaning of the status word ``sw1 sw2`` (ints) in words (ISO
    7816-4 5.6; ``profile`` a card type of :data:`PROFILE_STATUS` first)."""
    word = sw1 << 8 | sw2
    own = PROFILE_STATUS.get(profile, {}).get(word)
    if own is not None:
        return own
    if word in _EXACT:
        return _EXACT[word]
    if sw1 == 0x61:
        return f"normal processing: {sw2 or 256} more bytes available (GET RESPONSE)"
    if sw1 == 0x6C:
        return f"checking error: wrong Le field, {sw2 or 256} bytes available"
    if sw1 == 0x63 and sw2 & 0xF0 == 0xC0:
        return f"warning: verification failed, {sw2 & 0x0F} tries left"
    if sw1 == 0x62 and 0x02 <= sw2 <= 0x80:
        return f"warning: {sw2} query bytes of triggering by the card"
    if sw1 in (0x62, 0x63, 0x64, 0x65, 0x66):
        return {0x62: "warning (state unchanged)", 0x63: "warning (state changed)",
                0x64: "execution error (state unchanged)", 0x65: "execution error (state changed)",
                0x66: "execution error: security-related issue"}[sw1]
    if sw1 in (0x67, 0x68, 0x69, 0x6A):
        return "checking error"
    if sw1 & 0xF0 == 0x90:
        return "normal processing (proprietary status)"
    return "unknown status"


def instruction_name(ins):
    """The name of the instruction byte ``ins`` (int), or ``INS xx``."""
    return INSTRUCTIONS.get(ins, f"INS {ins:02X}")
