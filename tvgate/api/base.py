"""APIHandler: the JSON API's authentication, body parsing and single error envelope.

Every API request carries a credential (the same kinds the proxy takes), every
operation is one call into ``tvgate.services`` run in the database pool, and
every error — a refused operation, a bad body, an unknown path, a crash —
answers ``{"error": {"status": …, "type": …, "message": …}}``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Collection, Sequence
from typing import Any, Protocol

import orjson

from tvgate.web import BaseHandler, Refusal

_TYPES = {
    400: "invalid_request",
    401: "unauthenticated",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "too_large",
    415: "unsupported_media_type",
    429: "rate_limited",
    503: "unavailable",
}

MAX_API_BODY = 1024 * 1024


class _Shown(Protocol):
    def as_dict(self) -> dict[str, Any]: ...


class APIError(Refusal):
    """A refusal in the API's JSON envelope; the status line carries the message too."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(status, message, reason=message[:200])


class APIHandler(BaseHandler):
    token_required = True
    refusal_type = APIError

    def set_default_headers(self) -> None:
        super().set_default_headers()
        self.set_header("Content-Type", "application/json")
        self.set_header("Cache-Control", "no-store")

    def prepare(self) -> Awaitable[None] | None:
        if "%00" in self.request.path:
            # PostgreSQL cannot store NUL in text; nothing tvgate names contains one.
            raise APIError(400, "NUL characters are not allowed")
        return super().prepare()

    def body(self) -> dict[str, Any]:
        """The JSON object in the request body (an empty body is an empty object)."""
        raw = self.request.body
        if len(raw) > MAX_API_BODY:
            raise APIError(413, "request body is too large")
        if not raw.strip():
            return {}
        if b"\\u0000" in raw:
            raise APIError(400, "NUL characters are not allowed")
        try:
            document = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise APIError(400, f"body is not valid JSON: {exc}") from None
        if not isinstance(document, dict):
            raise APIError(400, "body must be a JSON object")
        return document

    def send(self, document: Any, status: int = 200) -> None:
        self.set_status(status)
        self.finish(orjson.dumps(document))

    async def send_list(self, name: str, listing: Callable[..., Sequence[_Shown]]) -> None:
        """A collection's GET: ``listing(actor=...)`` as the caller, sent as ``{name: [...]}``
        with each view's JSON."""
        views = await self.run_service(lambda: listing(actor=self.principal))
        self.send({name: [view.as_dict() for view in views]})

    async def delete_row(self, row_id: str, what: str, delete: Callable[..., object]) -> None:
        """A row's DELETE: ``delete(id, actor=...)`` as the caller for the ``what id`` in
        the path, answered ``{"deleted": id}``."""
        ident = int_arg(row_id, f"{what} id")
        await self.run_service(lambda: delete(ident, actor=self.principal))
        self.send({"deleted": ident})

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        exc = kwargs.get("exc_info", (None, None, None))[1]
        if isinstance(exc, Refusal):
            message = exc.message
        elif status_code >= 500:
            message = "internal error in tvgate"
        else:
            message = self._reason
        self.set_header("Content-Type", "application/json")
        self.finish(
            orjson.dumps(
                {
                    "error": {
                        "status": status_code,
                        "type": _TYPES.get(status_code, "server_error"),
                        "message": message,
                    }
                }
            )
        )


def check_fields(
    body: dict[str, Any], allowed: Collection[str], required: Collection[str] = ()
) -> None:
    """Refuse a body with a field the endpoint does not take, or without one it needs:
    a misspelt field is never ignored (nor its default stored in its place). Every
    endpoint with a body calls this first, before any change."""
    unknown = sorted(set(body) - set(allowed))
    if unknown:
        raise APIError(
            400,
            f"unknown fields: {', '.join(unknown)} (this endpoint takes "
            f"{', '.join(sorted(allowed))})",
        )
    missing = [name for name in required if name not in body]
    if missing:
        raise APIError(400, f"missing required fields: {', '.join(missing)}")


def int_arg(value: str, name: str) -> int:
    """An integer argument within what the database can hold."""
    try:
        number = int(value)
    except ValueError:
        raise APIError(400, f"{name} must be an integer") from None
    if not -(2**63) <= number < 2**63:
        raise APIError(400, f"{name} is out of range")
    return number
