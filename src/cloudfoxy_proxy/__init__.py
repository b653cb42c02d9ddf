"""cloudfoxy-proxy: a smart-card access proxy speaking the CloudFoxy line protocol."""

__version__ = "0.1.0"
