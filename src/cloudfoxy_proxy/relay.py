"""On whose behalf a proxy acts: the ``CLIENT`` command between proxies
(docs/protocol.md, "Between proxies", "CLIENT").

A front proxy (the ``tcp://`` / ``tls://`` backend) tells its upstream,
the owner, who the requests it sends next are for::

    >*|
    >1:CLIENT:<base64 of UTF-8 JSON>|
    >1:OK

with JSON ``{"peer": "<client host:port>", "identity": "<name>" or null,
"frontend": "<front end name>"}``.  It is sticky for the connection: the
front sends it again only when the client changes.  The owner honours it
only from an identity that may relay (``relay = true`` in the
``--credentials`` file; in open mode the anonymous identity, which
protected mode limits to loopback clients unless ``--allow-anonymous``):
its audit records then keep ``peer`` (the front) and add
``"on_behalf_of": {"peer": ..., "identity": ..., "frontend": ...}``.  From
any other identity it is answered ``C085`` and written to the audit log as
an ``auth_failure``; malformed data is ``C084``.
"""

import base64
import binascii
import json

from . import errors

#: The longest value of each field kept (characters); the whole command's
#: data is bounded by the line length.
MAX_FIELD = 256
FIELDS = ("peer", "identity", "frontend")


def encode(peer, identity, frontend):
    """The CLIENT command's data (ASCII str) for a client: ``peer``
    (``host:port`` text), ``identity`` (a name or None), ``frontend`` (the
    front end's name); each cut to MAX_FIELD characters, so the upstream
    never refuses it for its length."""
    peer, frontend = peer[:MAX_FIELD], frontend[:MAX_FIELD]
    identity = None if identity is None else identity[:MAX_FIELD]
    text = json.dumps({"peer": peer, "identity": identity, "frontend": frontend},
                      separators=(",", ":"), ensure_ascii=False)
    return base64.b64encode(text.encode("utf-8")).decode("ascii")


def decode(data):
    """The client a CLIENT command's data names: a dict with ``peer``,
    ``identity`` (str or None) and ``frontend``; ValueError when the data
    is not base64 of a JSON object of those fields (strings of at most
    MAX_FIELD characters; ``identity`` may be null)."""
    try:
        raw = base64.b64decode(data, validate=True)
        value = json.loads(raw.decode("utf-8"))
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise ValueError("not base64 of UTF-8 JSON") from None
    if not isinstance(value, dict) or set(value) != set(FIELDS):
        raise ValueError(f"a JSON object with exactly {', '.join(FIELDS)}")
    for key in FIELDS:
        v = value[key]
        if v is None and key == "identity":
            continue
        if not isinstance(v, str) or not v or len(v) > MAX_FIELD:
            raise ValueError(f"{key} must be a string of 1..{MAX_FIELD} characters")
    return {key: value[key] for key in FIELDS}


def client_command(dispatcher, command, session, identity):
    """The owner's answer to ``CLIENT`` (``Dispatcher.simple``): ``OK``
    after setting ``session.on_behalf_of``; ``C085`` (audited) when
    ``identity`` may not relay; ``C084`` for malformed data.  A refused
    CLIENT ends what an earlier one said: the requests that follow are the
    relaying proxy's own, never another client's."""
    session.on_behalf_of = None
    if identity is None or not identity.relay:
        name = getattr(identity, "name", None)
        dispatcher.client_log.warn(
            "client {peer}: CLIENT refused with C085: {who} may not relay (relay = true in --credentials)",
            peer=session.peer, who=f"client {name}" if name else "a connection without identity")
        if dispatcher.audit is not None:
            dispatcher.audit.auth_failure(session, "CLIENT from an identity that may not relay", identity)
        return errors.BAD_PIN
    try:
        session.on_behalf_of = decode(command.data)
    except ValueError as e:
        dispatcher.client_log.info("client {peer}: CLIENT refused with C084: {why}",
                                   peer=session.peer, why=str(e))
        return errors.MALFORMED
    return "OK"
