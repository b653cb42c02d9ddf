"""What the ``--api`` modules share (``api.py``, ``websocket.py``,
``foxyproxy.py``): the JSON codec (``to_json``, ``from_json``, ``dump``,
``error_body``, ``is_message_id``), the HTTP status and result code of
each error (``STATUS``, ``HTTP_CODES``, ``ApiError``) and the limits of a
transmit and of a held card.  It imports none of them, so they import it without a cycle.
"""

import json

import orjson

from .. import errors

#: HTTP status of each result code (docs/api.md, "Conventions").
STATUS = {
    errors.NOT_FOUND: 404,
    errors.AMBIGUOUS: 400,
    errors.MALFORMED: 400,
    errors.NO_CARD: 503,
    errors.UPSTREAM: 502,
    errors.BAD_PIN: 403,
    errors.FAILED: 422,
    errors.INTERNAL: 500,
}
#: The code in error bodies that are not about a card command.
HTTP_CODES = {400: errors.MALFORMED, 401: errors.BAD_PIN, 403: errors.BAD_PIN, 404: errors.NOT_FOUND,
              405: errors.FAILED, 409: errors.UPSTREAM, 411: errors.MALFORMED, 413: errors.MALFORMED,
              431: errors.MALFORMED, 500: errors.INTERNAL, 503: errors.UPSTREAM}

JSON = b"application/json"
#: The most APDUs of one transmit (and commands of one FoxyProxy request).
MAX_APDUS = 1000
#: A held card's idle timeout (seconds): the default and the largest.
DEFAULT_IDLE = 30.0
MAX_IDLE = 3600.0


def to_json(obj):
    """``obj`` as compact JSON in UTF-8 bytes: orjson (a tenth of the
    standard library's time for the API's small messages); the standard
    library for the little orjson refuses (integers over 64 bits, strings
    with lone surrogates, which it writes as ``\\ud800`` escapes)."""
    try:
        return orjson.dumps(obj)
    except TypeError:
        return json.dumps(obj, separators=(",", ":")).encode("utf-8")


def from_json(data):
    """The value of the JSON text ``data`` (bytes, UTF-8); ValueError when
    it is not JSON (bad UTF-8, a byte order mark, NaN, nesting deeper than
    1,024).  Integers over 64 bits come back as floats."""
    return orjson.loads(data)


def is_message_id(value):
    """Whether a client's ``id`` (or FoxyProxy ``nonce``), echoed in its
    answer, is a string or a number (not a boolean, not a container: those
    could be nested deeper than any JSON writer goes)."""
    return value.__class__ is not bool and isinstance(value, (str, int, float))


def dump(obj):
    """A JSON answer's bytes (one line, so curl output ends with a newline)."""
    try:
        return orjson.dumps(obj, option=orjson.OPT_APPEND_NEWLINE)
    except TypeError:
        return to_json(obj) + b"\n"


def error_body(code, message):
    return dump({"error": {"code": code, "message": message}})


class ApiError(Exception):
    """An answer other than 200: ``status``, a result ``code``, a message."""

    def __init__(self, status, message, code=None, extra=None):
        super().__init__(message)
        self.status = status
        self.code = code or HTTP_CODES.get(status, errors.FAILED)
        self.message = message
        self.extra = extra or {}

    @classmethod
    def of(cls, code, what=""):
        meaning = errors.MEANING.get(code, "error")
        return cls(STATUS.get(code, 500), f"{meaning}{': ' + what if what else ''}", code)
