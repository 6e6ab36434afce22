"""The registry of translators: which one serves a (client API, route API) pair, and one
call's translation state behind one interface.

The translator modules have phases of their own shape (``chat_to_anthropic``,
``anthropic_to_chat``, ``responses_to_anthropic``, ``responses_to_chat``);
:class:`Translation` puts them behind what the proxy needs of any pair: the upstream body, the answer back (a JSON body, stream chunks, an error
answer, an in-band error), the answer as a trace records it, and the notes of what was
dropped. The proxy asks :func:`pair_for` only when the route speaks another API than the
client (:func:`route_speaks`: another provider's, or Chat Completions alone to a Responses
client), so a passthrough call runs none of this.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any, Protocol

import orjson

from tvgate.models import PROVIDER_ANTHROPIC, PROVIDER_OPENAI
from tvgate.providers import (
    ANTHROPIC_MESSAGES,
    OPENAI_CHAT,
    OPENAI_RESPONSES,
    ProviderAPI,
    api_for,
    speaks,
)
from tvgate.translate import (
    anthropic_to_chat,
    chat_to_anthropic,
    responses_to_anthropic,
    responses_to_chat,
)
from tvgate.translate.history import Histories, Output, Prefix
from tvgate.translate.responses_api import ResponsesRequest

JSON = dict[str, Any]

#: The serving process's recent translated conversations, continued by the next call of
#: each (the Chat and Anthropic Messages pairs: ``tvgate.translate.history``).
HISTORIES = Histories()

#: The Anthropic API version a translated request is sent with (the client, speaking
#: OpenAI's API, sent none); the one the ``anthropic`` SDKs send.
ANTHROPIC_VERSION = "2023-06-01"


class Untranslatable(Exception):
    """A client field the route's API cannot express: a 400 naming it, in the client's
    envelope."""


class NotAnAnswer(Exception):
    """The route's 200 answer is no answer of its API: the provider failed, and ``body``
    tells the client so in its envelope (with a 502)."""

    def __init__(self, body: bytes) -> None:
        super().__init__("not an answer of the route's API")
        self.body = body


class Translation(Protocol):
    """One call's translation, from the client's request to the answer it gets."""

    #: The request body for the route's API.
    body: bytes

    @property
    def notes(self) -> list[str]:
        """What could not be carried, from the request and the answer, one note each."""
        ...

    def response(self, body: bytes) -> bytes:
        """The route's JSON answer as the client's (``NotAnAnswer`` when it is none)."""
        ...

    def feed(self, chunk: bytes) -> bytes:
        """The client's stream bytes that upstream ``chunk`` completes (often b"")."""
        ...

    def finish(self) -> bytes:
        """The end of the upstream stream: the client's closing events (or an error)."""
        ...

    def error_event(self, message: str) -> bytes:
        """An in-band error ending the client's stream (once)."""
        ...

    def error_answer(self, status: int, body: bytes) -> tuple[int, bytes]:
        """The route's error answer in the client's envelope, its message kept."""
        ...

    def document(self, answer: JSON) -> JSON:
        """The route's answer (as its assembler rebuilt it) in the client's format."""
        ...


class _StreamTranslator(Protocol):
    def feed(self, chunk: bytes) -> bytes: ...

    def finish(self) -> bytes: ...

    def error(self, message: str, kind: str = "api_error") -> bytes: ...


class _Phases:
    """The stream and error phases, which both pairs' modules name alike."""

    def __init__(
        self,
        body: JSON | bytes,
        stream: _StreamTranslator,
        translate_error: Callable[[int, bytes], tuple[int, bytes]],
    ) -> None:
        self.body = body if isinstance(body, bytes) else orjson.dumps(body)
        self._stream = stream
        self._translate_error = translate_error

    def feed(self, chunk: bytes) -> bytes:
        return self._stream.feed(chunk)

    def finish(self) -> bytes:
        return self._stream.finish()

    def error_event(self, message: str) -> bytes:
        return self._stream.error(message)

    def error_answer(self, status: int, body: bytes) -> tuple[int, bytes]:
        return self._translate_error(status, body)


class _ChatOnAnthropic(_Phases):
    """An OpenAI Chat Completions client on an Anthropic Messages route."""

    def __init__(self, raw: bytes, upstream_model: str, owner: Hashable) -> None:
        def translate(
            document: JSON, prefix: Prefix | None
        ) -> tuple[chat_to_anthropic.UpstreamRequest, JSON, Output]:
            try:
                done = chat_to_anthropic.translate_request(document, upstream_model, prefix=prefix)
            except chat_to_anthropic.TranslationError as exc:
                raise Untranslatable(exc.message) from None
            return done, done.body, done.output

        made = HISTORIES.translate((owner, OPENAI_CHAT), raw, translate)
        translated: chat_to_anthropic.UpstreamRequest = made.result
        # The stream translator adds its notes to the request's list.
        self._notes = translated.dropped
        super().__init__(
            made.body,
            chat_to_anthropic.StreamTranslator.for_request(translated),
            chat_to_anthropic.translate_error,
        )

    @property
    def notes(self) -> list[str]:
        return self._notes

    def response(self, body: bytes) -> bytes:
        return orjson.dumps(chat_to_anthropic.translate_response(_message(body), self._notes))

    def document(self, answer: JSON) -> JSON:
        return chat_to_anthropic.translate_response(answer, [])


class _AnthropicOnChat(_Phases):
    """An Anthropic Messages client on an OpenAI Chat Completions route."""

    def __init__(self, raw: bytes, upstream_model: str, owner: Hashable) -> None:
        def translate(
            document: JSON, prefix: Prefix | None
        ) -> tuple[anthropic_to_chat.TranslatedRequest, JSON, Output]:
            try:
                done = anthropic_to_chat.translate_request(
                    document, model=upstream_model, prefix=prefix
                )
            except anthropic_to_chat.TranslationError as exc:
                raise Untranslatable(exc.message) from None
            return done, done.body, done.output

        made = HISTORIES.translate((owner, ANTHROPIC_MESSAGES), raw, translate)
        translated: anthropic_to_chat.TranslatedRequest = made.result
        self._notes = translated.dropped
        self._chunks = anthropic_to_chat.StreamTranslator()
        super().__init__(made.body, self._chunks, anthropic_to_chat.translate_error)

    @property
    def notes(self) -> list[str]:
        return self._notes + [n for n in self._chunks.notes if n not in self._notes]

    def response(self, body: bytes) -> bytes:
        try:
            return orjson.dumps(anthropic_to_chat.translate_response(_object(body), self._notes))
        except ValueError:
            # Not a ChatCompletion: told as the provider's failure, in Anthropic's envelope.
            raise NotAnAnswer(anthropic_to_chat.translate_error(502, body)[1]) from None

    def document(self, answer: JSON) -> JSON:
        try:
            return anthropic_to_chat.translate_response(answer, [])
        except ValueError:
            return answer


class _ResponsesOn(_Phases):
    """An OpenAI Responses client (Codex) on a route of another API: the request as
    translated, whose ``dropped`` list every phase adds its notes to."""

    def __init__(
        self,
        translated: ResponsesRequest,
        stream: _StreamTranslator,
        translate_error: Callable[[int, bytes], tuple[int, bytes]],
    ) -> None:
        self._request = translated
        super().__init__(translated.body, stream, translate_error)

    @property
    def notes(self) -> list[str]:
        return self._request.dropped

    def _quiet(self) -> ResponsesRequest:
        """The request with a list of its own for notes: the trace's copy of the answer
        notes nothing the client's did not."""
        return dataclasses.replace(self._request, dropped=[])


class _ResponsesOnAnthropic(_ResponsesOn):
    """An OpenAI Responses client on an Anthropic Messages route."""

    def __init__(self, raw: bytes, upstream_model: str, owner: Hashable) -> None:
        try:
            translated = responses_to_anthropic.translate_request(orjson.loads(raw), upstream_model)
        except responses_to_anthropic.TranslationError as exc:
            raise Untranslatable(exc.message) from None
        super().__init__(
            translated,
            responses_to_anthropic.StreamTranslator(translated),
            responses_to_anthropic.translate_error,
        )

    def response(self, body: bytes) -> bytes:
        answer = _message(body)
        return orjson.dumps(responses_to_anthropic.translate_response(answer, self._request))

    def document(self, answer: JSON) -> JSON:
        return responses_to_anthropic.translate_response(answer, self._quiet())


class _ResponsesOnChat(_ResponsesOn):
    """An OpenAI Responses client on a Chat Completions-only upstream (vLLM, Ollama)."""

    def __init__(self, raw: bytes, upstream_model: str, owner: Hashable) -> None:
        try:
            # max_tokens: the name every Chat-compatible server knows (OpenAI's own
            # max_completion_tokens is not always among them, and OpenAI has Responses).
            translated = responses_to_chat.translate_request(
                orjson.loads(raw), upstream_model, max_tokens_field="max_tokens"
            )
        except responses_to_chat.TranslationError as exc:
            raise Untranslatable(exc.message) from None
        super().__init__(
            translated,
            responses_to_chat.StreamTranslator(translated),
            responses_to_chat.translate_error,
        )

    def response(self, body: bytes) -> bytes:
        try:
            return orjson.dumps(responses_to_chat.translate_response(_object(body), self._request))
        except ValueError:
            # Not a ChatCompletion: told as the provider's failure, in OpenAI's envelope.
            raise NotAnAnswer(responses_to_chat.translate_error(502, body)[1]) from None

    def document(self, answer: JSON) -> JSON:
        try:
            return responses_to_chat.translate_response(answer, self._quiet())
        except ValueError:
            return answer


def _message(body: bytes) -> JSON:
    """An Anthropic route's JSON answer, which must be a Message: anything else is told as
    the provider's failure (``NotAnAnswer``), in OpenAI's envelope, the one both pairs on
    such a route answer in (Chat Completions and Responses clients)."""
    answer = _object(body)
    if answer.get("type") != "message":
        raise NotAnAnswer(chat_to_anthropic.translate_error(502, body)[1])
    return answer


def _object(body: bytes) -> JSON:
    """A JSON answer as an object (an empty one when it is not: the translators then
    answer with what little they can, as for any malformed answer)."""
    try:
        obj = orjson.loads(body)
    except orjson.JSONDecodeError:
        return {}
    return obj if isinstance(obj, dict) else {}


@dataclass(frozen=True, slots=True)
class Pair:
    """A translator for one (client API, route API) pair."""

    client: str
    upstream: ProviderAPI
    #: The translation of a client's body (its bytes) for the route's model, for a
    #: caller (whose conversations it may continue: ``tvgate.translate.history``).
    start: Callable[[bytes, str, Hashable], Translation]
    #: Headers the route's API requires that a client of the other API does not send.
    required_headers: tuple[tuple[str, str], ...] = ()


#: What a route speaks when its key is on a Chat Completions-only upstream (vLLM, Ollama),
#: as the pairs name it and a refusal tells it.
CHAT_ONLY = "an upstream that serves only Chat Completions"

_PAIRS: dict[tuple[str, str], Pair] = {
    (OPENAI_CHAT, PROVIDER_ANTHROPIC): Pair(
        OPENAI_CHAT,
        api_for(ANTHROPIC_MESSAGES),
        _ChatOnAnthropic,
        (("anthropic-version", ANTHROPIC_VERSION),),
    ),
    (ANTHROPIC_MESSAGES, PROVIDER_OPENAI): Pair(
        ANTHROPIC_MESSAGES, api_for(OPENAI_CHAT), _AnthropicOnChat
    ),
    (OPENAI_RESPONSES, PROVIDER_ANTHROPIC): Pair(
        OPENAI_RESPONSES,
        api_for(ANTHROPIC_MESSAGES),
        _ResponsesOnAnthropic,
        (("anthropic-version", ANTHROPIC_VERSION),),
    ),
    (OPENAI_RESPONSES, CHAT_ONLY): Pair(OPENAI_RESPONSES, api_for(OPENAI_CHAT), _ResponsesOnChat),
}


def route_speaks(client: ProviderAPI, provider: str, *, chat_only: bool = False) -> str | None:
    """What a route whose key is of ``provider`` (``chat_only``: on a Chat-only upstream)
    speaks to a ``client`` of another API, a pair's second name; None when it speaks the
    client's own (passthrough, no translation code). A cloud's key speaks the API of the
    provider whose models it serves (``tvgate.providers.speaks``: Azure OpenAI, OpenAI's;
    Vertex AI's and Bedrock's, Anthropic's)."""
    provider = speaks(provider)
    if provider != client.provider:
        return provider
    if chat_only and client.api == OPENAI_RESPONSES:
        return CHAT_ONLY
    return None


def pair_for(client: ProviderAPI, route: str) -> Pair | None:
    """The translator of a ``client`` API call on a route that speaks ``route`` (its
    :func:`route_speaks`); None when there is none (the call is then refused)."""
    return _PAIRS.get((client.api, route))
