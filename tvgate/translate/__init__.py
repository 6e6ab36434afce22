"""Translators between provider APIs, one module per (client API, upstream API) pair.

Each module is pure (no I/O): request, response, stream and error phases, used by the
proxy when a client's API differs from its route's.
"""
