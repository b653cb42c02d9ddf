"""Front ends: the ways clients reach the proxy's cards."""
