"""Front ends: the listeners clients talk to (HTTP/JSON API, ...)."""
