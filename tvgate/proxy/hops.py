"""Loop marks: every upstream request names the gateways it has passed through.

A route whose base URL leads back to tvgate (its own address under another name,
another worker or VM of the same deployment, another deployment that routes back)
makes each call call the gateway again, until every upstream slot is held. So each
upstream request carries ``x-tvgate-hop``: the marks the incoming request carried,
then this deployment's id. A request that already carries our id, or has passed more
gateways than any real chain of them, is refused with a 508 ``loop_detected`` before
it takes a slot; the loop then ends one hop after it began.

The id is derived from the database (when its schema was first created), so every
worker and VM of one deployment shares it without any setting or schema change; it
is not a secret (every provider sees it) and a client gains nothing by sending it
but its own 508. The mark is never relayed to a client (``call.py`` drops it from
response headers) and a client's marks are never taken for anything but marks.
"""

from __future__ import annotations

import hashlib

import peewee
from tornado.httputil import HTTPHeaders

from tvgate.models import SchemaVersion

HOP_HEADER = "x-tvgate-hop"
#: More gateways than this in one chain is a loop through deployments that each see
#: the request once (or a client's nonsense): refused too.
MAX_HOPS = 8
#: Longest mark kept from a request: ids are 16 characters; a client's are cut.
_MARK_LIMIT = 64


def deployment_id(db: peewee.Database) -> str:
    """This deployment's mark: the same in every process that shares the database."""
    with db.connection_context():
        created = SchemaVersion.select(peewee.fn.MIN(SchemaVersion.applied_at)).scalar()
    return hashlib.sha256(f"tvgate-hop:{created!r}".encode()).hexdigest()[:16]


def incoming_marks(headers: HTTPHeaders) -> list[str]:
    """The marks a request carries, in order (none for a client calling directly)."""
    return [
        mark.strip()[:_MARK_LIMIT]
        for line in headers.get_list(HOP_HEADER)
        for mark in line.split(",")
        if mark.strip()
    ]


def is_loop(marks: list[str], own: str) -> bool:
    return own in marks or len(marks) >= MAX_HOPS


def outgoing_marks(marks: list[str], own: str) -> str:
    """The header value of this gateway's upstream request."""
    return ", ".join([*marks, own])
