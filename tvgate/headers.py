"""Reading one field of a request's headers without paying for its absence.

``HTTPHeaders.get`` is ``Mapping.get``: a name the request lacks raises a ``KeyError``
inside it and catches it, about 6,100 instructions against 1,800 for a dict lookup.
Most of what a proxied call looks up (attribution headers, ``traceparent``,
``Content-Encoding``, the second and third places a token may be in) is absent from
most requests, a dozen lookups a call.
"""

from __future__ import annotations

from tornado.httputil import HTTPHeaders


def header(headers: HTTPHeaders, name: str) -> str:
    """The value of ``name`` as ``headers.get(name)`` gives it (its lines joined by commas
    when it came more than once), "" when the request has none."""
    values = headers.get_list(name)
    if not values:
        return ""
    return values[0] if len(values) == 1 else ",".join(values)
