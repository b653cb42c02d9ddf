from twisted.application.service import ServiceMaker

foxyproxy = ServiceMaker(
    "foxyproxy", "cloudfoxy_proxy.tap",
    "Smart-card access proxy (CloudFoxy/FoxyProxy line protocol)", "foxyproxy")
