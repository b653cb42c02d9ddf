"""Telnet commands out of a line-protocol byte stream, with no I/O.

Telnet clients (PuTTY/plink in telnet mode, inetutils ``telnet``) send
RFC 854 commands before and between the user's lines: option negotiation
``IAC WILL|WONT|DO|DONT OPTION``, subnegotiation ``IAC SB ... IAC SE``
(RFC 855) and two-byte commands such as ``IAC NOP`` or ``IAC IP``.  The
line protocol has no use for any of them, so :class:`TelnetStripper`
removes them wherever they occur, also when one is split across reads.
``IAC IAC`` is a data byte 0xFF (RFC 854, "The TELNET command structure");
it is kept as such, although it is never valid in this UTF-8 text protocol.
The proxy never answers a negotiation: with no answer, an option a client
asked for stays off and the client goes on as a plain network virtual
terminal (RFC 854), which is what a line protocol wants.
"""

IAC = 0xFF
#: RFC 854 command codes that matter for framing.
SE, SB, WILL, WONT, DO, DONT = 240, 250, 251, 252, 253, 254

_DATA, _COMMAND, _OPTION, _SUB, _SUB_IAC = range(5)
_IAC_BYTE = b"\xff"


class TelnetStripper:
    """Feeds on a connection's bytes and returns them without telnet commands.

    ``feed(data)`` returns the data bytes of ``data`` (``bytes``); the state
    of a command cut by the end of ``data`` is kept for the next call.
    ``idle`` is True when no command is half-read, so a caller may skip
    ``feed`` for data without 0xFF.
    """

    __slots__ = ("_state",)

    def __init__(self):
        self._state = _DATA

    @property
    def idle(self):
        return self._state == _DATA

    def feed(self, data):
        state = self._state
        if state == _DATA and _IAC_BYTE not in data:
            return data
        out = []
        i, n = 0, len(data)
        while i < n:
            if state == _DATA:
                j = data.find(_IAC_BYTE, i)
                if j < 0:
                    out.append(data[i:])
                    break
                if j > i:
                    out.append(data[i:j])
                i = j + 1
                state = _COMMAND
                continue
            if state == _SUB:
                j = data.find(_IAC_BYTE, i)  # subnegotiation bytes are dropped
                if j < 0:
                    break
                i = j + 1
                state = _SUB_IAC
                continue
            byte = data[i]
            i += 1
            if state == _COMMAND:
                if byte == IAC:
                    out.append(_IAC_BYTE)  # IAC IAC: a data byte 0xFF
                    state = _DATA
                elif WILL <= byte <= DONT:
                    state = _OPTION
                elif byte == SB:
                    state = _SUB
                else:
                    state = _DATA  # a two-byte command (NOP, IP, AYT, GA...)
            elif state == _OPTION:
                state = _DATA  # the option code
            elif byte == SE:  # _SUB_IAC
                state = _DATA
            elif byte == IAC:
                state = _SUB  # IAC IAC inside a subnegotiation: its data
            else:
                # No IAC SE: the subnegotiation ended malformed; this IAC
                # starts a command of its own (RFC 855 leaves it open).
                state = _COMMAND
                i -= 1
        self._state = state
        return b"".join(out)
