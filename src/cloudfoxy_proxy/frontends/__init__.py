"""Front ends: where clients come in.  Each turns one wire protocol into
requests for the dispatcher (``dispatch.Dispatcher``) and its answers back
into that protocol; none of them talks to a backend directly.

Every front end implements ``interfaces.IFrontend`` (typed settings from
the options, ``make_service(settings, core)``) and is listed in
:data:`TABLE`; ``base.py`` holds the ``Core`` each is given and the
``Listener`` each listens with, ``http.py`` the HTTP base every HTTP front
end is built on (docs/development.md "Adding a front end").

* ``line.py`` — the line protocol on ``--port``/``--listen``
  (docs/protocol.md); ``telnet.py`` strips RFC 854 telnet commands in
  front of it;
* ``rest.py`` — ``--rest``: the CloudFoxy-compatible REST API (docs/rest.md);
* ``api.py`` (+ ``websocket.py``, ``foxyproxy.py``, ``jsonapi.py``) —
  ``--api``: the HTTP/JSON and WebSocket API (docs/api.md);
* ``ram.py``, ``ramclient.py``, ``ramwire.py`` — RAMOverHTTP: ``--ram``
  (server), ``--ram-connect`` and ``--ram-daemon`` (client), and the wire
  format (docs/ramoverhttp.md);
* ``vpcd.py`` — ``--vpcd``: one card shown as a local PC/SC reader through
  vsmartcard's vpcd (docs/vpcd.md);
* ``status.py`` — ``--metrics``: Prometheus metrics, health, the status page
  (docs/deployment.md).
"""

#: ``(option, module, attribute)`` of every front end, in the order
#: ``tap.makeService`` builds them: a module is imported only when its
#: option is given; ``attribute`` names its IFrontend.  Metrics comes last:
#: it counts every front end and backend built before it.
TABLE = (
    ("endpoints", "line", "LINE_FRONTEND"),
    ("rest", "rest", "REST"),
    ("api", "api", "API"),
    ("ram", "ram", "RAM"),
    ("ram-daemon", "ramclient", "RAM_DAEMON"),
    ("ram-connect", "ramclient", "RAM_CONNECT"),
    ("vpcd", "vpcd", "VPCD"),
    ("metrics", "status", "METRICS"),
)


def configured(options):
    """The IFrontend of every front end ``options`` configures, in TABLE order."""
    from importlib import import_module

    found = []
    for option, module, name in TABLE:
        if options.get(option):
            found.append(getattr(import_module(f"{__name__}.{module}"), name))
    return found
