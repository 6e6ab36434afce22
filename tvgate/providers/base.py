"""The one protocol every provider API module implements, and the API names.

A provider API module (``tvgate.providers.anthropic``, ``.openai_chat``,
``.openai_responses``, ``.openai_legacy``) holds all tvgate knows of one API
operation: the client's path and the provider's, how the key is sent, the error
envelope and the in-stream error event, the ``/v1/models`` format, how usage is
counted and how an answer is read back (its assembler). The proxy asks the
request's module (``tvgate.providers.api_for``) and never branches on a provider's
name: Envoy AI Gateway's shape, one translator per (client API, backend) pair, each
with its request, response, stream and error phases.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from tvgate.providers.common import Assembled, StreamAssembler, Usage

ANTHROPIC_MESSAGES = "anthropic.messages"
ANTHROPIC_COUNT_TOKENS = "anthropic.count_tokens"
OPENAI_CHAT = "openai.chat"
OPENAI_RESPONSES = "openai.responses"
OPENAI_EMBEDDINGS = "openai.embeddings"
OPENAI_COMPLETIONS = "openai.completions"

JSON = dict[str, Any]


class ProviderAPI(Protocol):
    """One proxied API operation of one provider."""

    #: The API's name (``anthropic.messages``), as traces record it.
    @property
    def api(self) -> str: ...

    #: The provider that serves it (a key's and a route's ``provider``).
    @property
    def provider(self) -> str: ...

    #: The client's path after ``/v1/``.
    @property
    def client_path(self) -> str: ...

    #: Appended to the key's base URL (which carries ``/v1`` for OpenAI, as its SDK takes it).
    @property
    def upstream_path(self) -> str: ...

    #: The base URL a key of this provider gets when it names none.
    @property
    def default_base_url(self) -> str: ...

    #: The answer is a model's: its usage is charged and its content traced (a token
    #: count is neither).
    @property
    def charged(self) -> bool: ...

    def auth_headers(self, secret: str) -> list[tuple[str, str]]:
        """The headers that carry a provider key, the way the provider expects it."""
        ...

    def error_body(self, status: int, message: str, *, kind: str = "", code: str = "") -> bytes:
        """The API's JSON error envelope for an error tvgate raises; ``kind`` and ``code``
        replace the type and (OpenAI's) code the status would give."""
        ...

    def stream_error_event(self, message: str, kind: str = "api_error") -> bytes:
        """An in-band error event ending a stream that already started."""
        ...

    def models_body(self, routes: Sequence[tuple[str, str]], *, has_more: bool = False) -> bytes:
        """``GET /v1/models`` in this API's format: ``routes`` are (name, provider) pairs, a
        page of the list when the format has pages (``has_more``: more follow)."""
        ...

    def uncached_input(self, input_tokens: int, cache_read_tokens: int) -> int:
        """The input tokens billed at the full price, from the provider's own figures."""
        ...

    def stream_assembler(self, max_retained: int) -> StreamAssembler | None:
        """A fresh assembler for a streamed answer (None: the API does not stream)."""
        ...

    def assemble(self, obj: JSON) -> Assembled:
        """A parsed non-streamed answer (not an error envelope) as a trace records it; may
        raise on a malformed one (``common.MALFORMED``)."""
        ...

    def read_usage(self, usage: object) -> Usage:
        """The API's ``usage`` object as figures (zeros where it says nothing)."""
        ...
