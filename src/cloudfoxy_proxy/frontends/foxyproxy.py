"""FoxyProxy 2.10's HTTP routes on ``--api`` (docs/api.md "FoxyProxy 2.10
compatibility"; ``foxy_proxy_rest.py`` and ``client_thread.py`` of
foxyproxy 2.10.0): ``POST /api/v1.0/command`` (line-protocol commands
run on one reader as one request), ``GET /api/v1.0/hello`` and ``GET
/api/v1.0/select/{name}[/{limit}]``.

``FoxyProxyRoutes`` holds their handlers for one ``api.ApiResource``, whose
route table names them; this module does not import ``api.py``.
"""

from ..parser import make_command
from .jsonapi import MAX_APDUS, ApiError, from_json, is_message_id, to_json


class FoxyProxyRoutes:
    """The FoxyProxy 2.10 handlers of the ApiResource ``api`` (its
    ``dispatcher`` and ``registry``); each is called like the resource's
    own, ``(request, session, *path parameters)`` with the request's
    dispatch Session (its identity: readers it may not see are not listed)."""

    def __init__(self, api):
        self.api = api

    def hello(self, request, session):
        return {"result": True}

    def command(self, request, session):
        try:
            data = from_json(request.content.read() or b"null")
        except ValueError:
            data = None
        data = data.get("data") if isinstance(data, dict) else None
        if not isinstance(data, dict) or "reader" not in data or not (
                "commands" in data or "command" in data):
            raise ApiError(400, "expected {\"data\": {\"reader\": R, \"commands\": [{\"nonce\", \"line\"}]}}")
        items = data["commands"] if "commands" in data else [data["command"]]
        if not isinstance(items, list) or len(items) > MAX_APDUS:
            raise ApiError(400, f"commands must be a list of at most {MAX_APDUS}")
        commands = []
        if not isinstance(data["reader"], str):
            raise ApiError(400, "reader must be a reader name")
        for item in items:
            cid = item.get("nonce", item.get("id")) if isinstance(item, dict) else None
            line = item.get("line") if isinstance(item, dict) else None
            if not is_message_id(cid) or not isinstance(line, str):
                continue  # FoxyProxy skips such items
            cid = cid if isinstance(cid, str) else to_json(cid).decode("ascii")
            commands.append(make_command([cid] + line.split(":", 2)))
        if not commands:
            raise ApiError(400, "no command has both nonce (or id: a string or a number) and line")
        reader = data["reader"]
        pin = data.get("password") if isinstance(data.get("password"), str) else None
        d = self.api.dispatcher.submit(reader, commands, password=pin, session=session)
        return d.addCallback(lambda lines: [{"response": [{"id": c, "line": r} for c, r in lines]}])

    def select(self, request, session, name, limit="1"):
        try:
            limit = max(0, int(limit))
        except ValueError:
            raise ApiError(400, "Request has an incorrect parameter 'limit'") from None
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        identity = session.identity
        sees = (lambda reader: True) if identity is None or identity.readers is None else identity.sees
        if limit == 0:
            return "".join(r.name + "\n" for r in self.api.registry.readers if sees(r)).encode("utf-8")
        lines = []
        signing = self.api.dispatcher.signing
        for state, cert in (signing.entries() if signing is not None else ()):
            if name and state.reader.name.endswith(name.strip()) and sees(state.reader):
                lines.insert(0, f"{state.reader.name} ({cert.subject or '---'})")
        return "".join(line + "\n" for line in lines).encode("utf-8")
