"""Result codes of the line protocol (docs/protocol.md "Responses"): the one place they live."""

NO_CARD = "C080"  #: no card in the reader
FAILED = "C081"  #: command failed / unknown command
AMBIGUOUS = "C082"  #: the reader pattern matches more than one reader
NOT_FOUND = "C083"  #: reader not found
MALFORMED = "C084"  #: malformed data (bad hex, wrong length)
BAD_PIN = "C085"  #: wrong PIN / password
UPSTREAM = "C086"  #: upstream (backend) error or timeout
INTERNAL = "C090"  #: internal error

MEANING = {
    NO_CARD: "no card in the reader",
    FAILED: "command failed or unknown command",
    AMBIGUOUS: "the reader pattern matches more than one reader",
    NOT_FOUND: "reader not found",
    MALFORMED: "malformed data",
    BAD_PIN: "wrong PIN or password",
    UPSTREAM: "upstream error or timeout",
    INTERNAL: "internal error",
}


def is_error(result):
    """True when a command's result is one of the codes above, not an answer."""
    return result in MEANING


class CardError(Exception):
    """A command ended with one of the C08x result codes.

    Backends raise (or errback with) this to give a client a specific
    result; ``reason`` is for logs only and never reaches the client.
    """

    def __init__(self, code, reason=""):
        super().__init__(code, reason)
        self.code = code
        self.reason = reason or MEANING.get(code, "")

    def __str__(self):
        return f"{self.code} ({self.reason})"
