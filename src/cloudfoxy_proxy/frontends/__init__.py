"""Front ends: where clients come in.  Each turns one wire protocol into
requests for the dispatcher (``dispatch.Dispatcher``) and its answers back
into that protocol; none of them talks to a backend directly.

* ``line.py`` — the line protocol on ``--port``/``--listen``
  (docs/protocol.md): ``LineFramer``, ``LineProtocol``, ``LineFactory``;
* ``telnet.py`` — strips RFC 854 telnet commands in front of ``line.py``;
* ``rest.py`` — ``--rest``: the CloudFoxy-compatible REST API (docs/rest.md);
* ``vpcd.py`` — ``--vpcd``: one card shown as a local PC/SC reader through
  vsmartcard's vpcd (docs/vpcd.md);
* ``status.py`` — ``--metrics``: Prometheus metrics, health, the status page
  (docs/deployment.md);
* ``ram.py``, ``ramclient.py``, ``ramwire.py`` — RAMOverHTTP: ``--ram``
  (server), ``--ram-connect`` and ``--ram-daemon`` (client), and the wire
  format (docs/ramoverhttp.md).

* ``api.py`` — ``--api``: the HTTP/JSON + WebSocket API (docs/api.md).

New front ends go here too;
tap.py builds each one's service.  Connection counts, idle timeouts and the
buffer budget shared by all front ends are ``limits.py`` (in the core,
because tap.py wires one ``ConnectionLimits`` across every listener).
"""
