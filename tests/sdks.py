"""The providers' SDKs with no server behind them: canned answers in, sent bodies out.

The translator tests hand a translated answer to the client's own SDK (its parser and
stream accumulator are the client's view of it), and take a request as the SDK itself
writes it. Both want an SDK client over an ``httpx2.MockTransport``; built here once, so
that each test file keeps only what it asks of the SDK.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import anthropic
import httpx2
import openai
import orjson

from tests.harness import canned_http_client
from tests.shapes import JSON

#: Where the clients believe they talk; nothing listens there.
OPENAI_BASE_URL = "http://gw.test/v1"
ANTHROPIC_BASE_URL = "http://gateway.test"


def _offline(base_url: str, http_client: httpx2.Client) -> dict[str, Any]:
    """An SDK client's settings: no retries (a test sees the one answer it canned)."""
    return {"base_url": base_url, "api_key": "x", "max_retries": 0, "http_client": http_client}


def canned_openai(
    status: int, body: bytes, content_type: str = "application/json"
) -> openai.OpenAI:
    """An ``openai`` client whose every call is answered with ``body``."""
    return openai.OpenAI(
        **_offline(OPENAI_BASE_URL, canned_http_client(status, body, content_type))
    )


def canned_anthropic(
    status: int, body: bytes, content_type: str = "application/json"
) -> anthropic.Anthropic:
    """An ``anthropic`` client whose every call is answered with ``body``."""
    return anthropic.Anthropic(
        **_offline(ANTHROPIC_BASE_URL, canned_http_client(status, body, content_type))
    )


def openai_sent(call: Callable[[openai.OpenAI], object]) -> JSON:
    """The JSON body the ``openai`` SDK puts on the wire for ``call(client)``.

    The request is answered with a 400, which the SDK raises and this expects: a call
    that raised nothing, or something else, did not reach the wire as asked.
    """
    seen: list[bytes] = []

    def handler(request: httpx2.Request) -> httpx2.Response:
        seen.append(request.content)
        return httpx2.Response(400, json={"error": {"message": "captured"}})

    client = openai.OpenAI(
        **_offline(OPENAI_BASE_URL, httpx2.Client(transport=httpx2.MockTransport(handler)))
    )
    try:
        call(client)
    except openai.BadRequestError:
        body: JSON = orjson.loads(seen[0])
        return body
    raise AssertionError("the SDK call was not answered with the captured 400")
