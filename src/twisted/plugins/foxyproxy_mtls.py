"""The ``mtls:`` server endpoint (cloudfoxy_proxy.tls); imports nothing heavy."""

from twisted.internet.interfaces import IStreamServerEndpointStringParser
from twisted.plugin import IPlugin
from zope.interface import implementer


@implementer(IPlugin, IStreamServerEndpointStringParser)
class _MutualTLSParser:
    prefix = "mtls"

    def parseStreamServer(self, reactor, *args, **kwargs):
        from cloudfoxy_proxy.tls import mtls_endpoint

        return mtls_endpoint(reactor, *args, **kwargs)


mtls = _MutualTLSParser()
