"""The relay of a provider's answer to the client: headers, body, back-pressure, held answers.

``ClientRelay`` is the upstream exchange's listener (``tvgate.proxy.upstream``). It owns
the client's side of one proxied call: the provider's status and headers as the client
may see them, each chunk masked (``KeyScrubber``), written and flushed as it comes, the
provider paused while the client has not read what it was sent, and what the trace keeps
of the answer (a stream parsed as it goes, a JSON body or its tail). While a fallback
route is left, a provider failure the client has not seen is held back (``HeldAnswer``)
instead of relayed; when no route does better it is replayed as it came.

When the route speaks another API than the client (``tvgate.translate.pairs``), the
attempt's ``Translation`` turns what the provider sends into what the client gets: each
stream chunk as it comes, a JSON answer (or an error answer) once it is whole. What
the trace keeps is still read from the provider's own bytes, in its own API, so usage
is the provider's figures.

No keep-alive of tvgate's own, ever: while the provider is silent, the client gets
nothing (no ``ping`` event, no SSE comment, no whitespace). Only what the provider sends
is written (``_send``), so a client's idle watchdog (Claude Code's) sees the provider's
silence as it is, gives up and retries; bytes of ours would reset that watchdog and keep
a dead stream looking alive. The one thing tvgate adds to a stream is the error event
that ends it (``send_error``), once the provider has been silent past
``TVGATE_IDLE_TIMEOUT`` (``tvgate.proxy.upstream``).

The relay holds no reference to the call that uses it (``tvgate.proxy.call``): what it
needs of it (the overhead, the budget warnings) is handed in with each attempt, so a
call's objects are freed by reference counting when the request ends.
"""

from __future__ import annotations

import re
import time
from collections.abc import Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import orjson
from tornado.iostream import StreamClosedError

from tvgate.providers.common import (
    JSON_TAIL_BYTES,
    Assembled,
    StreamAssembler,
    assemble_body,
    assemble_tail,
)
from tvgate.proxy.hops import HOP_HEADER
from tvgate.proxy.scrub import KeyScrubber
from tvgate.proxy.upstream import UpstreamExchange, UpstreamResult
from tvgate.translate.pairs import NotAnAnswer

if TYPE_CHECKING:
    from tvgate.metrics import Metrics
    from tvgate.providers import ProviderAPI
    from tvgate.proxy.client import ClientSide
    from tvgate.translate.pairs import Translation

#: Response headers that are the business of each hop, not of the client; and what a
#: provider must not say on the gateway's origin, which also serves the web UI: cookies,
#: a content security policy, CORS grants (every ``access-control-*`` header:
#: ``_CORS_PREFIX``), what a browser keeps for the whole origin (HSTS, which tvgate sets
#: itself when its public URL is https; alternative services; site data to clear; pins;
#: where to report errors); and the loop mark of an upstream tvgate.
_DROPPED_RESPONSE_HEADERS = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "transfer-encoding",
        "content-length",
        "trailer",
        "upgrade",
        "set-cookie",
        "set-cookie2",
        "content-security-policy",
        "content-security-policy-report-only",
        "strict-transport-security",
        "alt-svc",
        "clear-site-data",
        "public-key-pins",
        "public-key-pins-report-only",
        "expect-ct",
        "nel",
        "report-to",
        "reporting-endpoints",
        HOP_HEADER,
    }
)
_CORS_PREFIX = "access-control-"
#: A header name (RFC 9110 token), as Tornado checks it.
_FIELD_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
#: Stream chunks relayed but not yet parsed, at most: a stream is parsed after its
#: answer is finished, so the client does not wait for it, or in runs of this size.
_UNPARSED_LIMIT = 16 * 1024
#: How much of a failed answer is kept while a fallback is tried.
_HELD_LIMIT = 64 * 1024
#: The largest JSON answer translated: it is held whole until it can be (streams are
#: translated as they come).
TRANSLATED_LIMIT = 64 * 1024 * 1024


class HeldAnswer:
    """A provider failure kept back while fallbacks are tried: status, headers and (the start
    of) its body, or the transfer error it ended with (``classified``); and the API it is
    in, with the translation that makes it the client's."""

    __slots__ = ("api", "chunks", "classified", "headers", "size", "status", "translation")

    def __init__(
        self,
        status: int,
        headers: list[tuple[str, str]],
        chunks: list[bytes],
        classified: tuple[str, str] | None,
        api: ProviderAPI | None = None,
        translation: Translation | None = None,
    ) -> None:
        self.status = status
        self.headers = headers
        self.chunks = chunks
        self.classified = classified
        self.api = api
        self.translation = translation
        self.size = 0

    def keep(self, chunk: bytes) -> None:
        # Error bodies are small; past this much, the rest is not needed to tell the client.
        if self.size < _HELD_LIMIT:
            self.chunks.append(chunk)
            self.size += len(chunk)

    def message(self) -> str:
        if self.classified is not None:
            return self.classified[0]
        body = b"".join(self.chunks)
        try:
            document = orjson.loads(body)
        except orjson.JSONDecodeError:
            return body[:200].decode("utf-8", "replace")
        error = document.get("error") if isinstance(document, dict) else None
        if isinstance(error, dict) and isinstance(error.get("message"), str):
            return error["message"]
        return body[:200].decode("utf-8", "replace")


class ClientRelay:
    """The client's side of one call; also the upstream exchange's listener."""

    def __init__(
        self,
        handler: ClientSide,
        endpoint: ProviderAPI,
        scrubber: KeyScrubber,
        metrics: Metrics,
        *,
        client_buffer_bytes: int,
        capture_max_bytes: int,
    ) -> None:
        self.handler = handler
        self.endpoint = endpoint
        #: The API the provider answers in: the client's, or the route's when translated.
        self.upstream_api: ProviderAPI = endpoint
        #: The attempt's translation of the provider's answer into the client's API.
        self.translation: Translation | None = None
        #: A translated JSON answer, kept until it is whole; and whether it grew past
        #: ``TRANSLATED_LIMIT`` (then the transfer is stopped).
        self.untranslated: list[bytes] = []
        self.untranslated_size = 0
        self.too_large = False
        #: The provider keys the call sent, masked in whatever comes back from upstream.
        self.scrubber = scrubber
        self.metrics = metrics
        self.client_buffer_bytes = client_buffer_bytes
        self.capture_max_bytes = capture_max_bytes
        self.exchange: UpstreamExchange | None = None
        #: True while the route being tried has fallbacks left after it.
        self.may_fall_back = False
        #: What the answer's ``x-tvgate-overhead-ms`` and budget-warning headers say.
        self.overhead_ms = 0.0
        self.warnings: Sequence[str] = ()
        self.holding: HeldAnswer | None = None
        #: The 3xx status the provider answered the current attempt with (0: none).
        self.redirected = 0
        self.status = 0
        self.committed = False
        self.first_byte = 0.0
        self.client_gone = False
        self.is_stream_response = False
        self.stream_counted = False
        self.upstream_request_id = ""
        self.bytes_out = 0
        self.unflushed = 0
        self.draining = False
        self.assembler: StreamAssembler | None = None
        self.captured: list[bytes] = []
        self.captured_size = 0
        #: The end of a non-streamed answer longer than ``capture_max_bytes``, where its
        #: usage is (empty otherwise).
        self.captured_tail = bytearray()
        self.unparsed: list[bytes] = []
        self.unparsed_size = 0

    def attempt(
        self,
        exchange: UpstreamExchange,
        *,
        may_fall_back: bool,
        overhead_ms: float,
        warnings: Sequence[str],
        api: ProviderAPI,
        translation: Translation | None,
    ) -> None:
        """A request to a provider of ``api`` is about to go out through ``exchange``."""
        self.exchange = exchange
        self.may_fall_back = may_fall_back
        self.overhead_ms = overhead_ms
        self.warnings = warnings
        self.redirected = 0
        self._translate_with(api, translation)

    def _translate_with(self, api: ProviderAPI, translation: Translation | None) -> None:
        self.upstream_api = api
        self.translation = translation
        self.untranslated = []
        self.untranslated_size = 0
        self.too_large = False

    def take_held(self) -> HeldAnswer | None:
        """The failure held back during the attempt that just ended, if any."""
        held, self.holding = self.holding, None
        return held

    # --- the upstream listener (called synchronously from curl's callbacks) ---

    def on_upstream_headers(
        self, status: int, headers: list[tuple[str, str]], *, whole_body: bool = True
    ) -> None:
        """The provider's status and headers, passed on to the client.

        ``whole_body``: every byte of the body will follow (not a held answer cut at
        its limit), so a ``Content-Length`` can be kept. A redirect is neither followed nor
        relayed (its ``Location`` would send the client, credential and all, wherever the
        provider says): the transfer is stopped and the call fails with a 502. Keys the
        provider echoes are masked in every header.
        """
        if 300 <= status < 400:
            self.redirected = status
            if self.exchange is not None:
                self.exchange.abort()
            return
        if self.may_fall_back and (status in (429, 529) or status >= 500):
            self.holding = HeldAnswer(
                status, headers, [], None, self.upstream_api, self.translation
            )
            return
        handler = self.handler
        self.status = status
        handler.set_status(status)
        length = ""
        framed = False
        seen: set[str] = set()
        mask = self.scrubber.text
        for raw_name, raw_value in headers:
            lower = raw_name.lower()
            if lower in _DROPPED_RESPONSE_HEADERS or lower.startswith(_CORS_PREFIX):
                if lower == "content-length":
                    length = raw_value
                elif lower == "transfer-encoding":
                    framed = True  # the length, if any, is not the body's (RFC 9112 6.3)
                continue
            name, value = mask(raw_name), mask(raw_value)
            if lower in ("content-type", "server", "date"):
                handler.set_header(name, value)
                if lower == "content-type" and value.startswith("text/event-stream"):
                    self.is_stream_response = True
            elif lower in seen or not _FIELD_NAME.fullmatch(name):
                handler.add_header(name, value)  # a repeated line; or refused, as it should be
            else:
                # The first line of this name: add_header would validate the name and value
                # again on top of set_header's check of the value.
                seen.add(lower)
                handler.set_header(name, value)
            if lower in ("request-id", "x-request-id"):
                self.upstream_request_id = value
        if (
            length.isdigit()
            and not framed
            and whole_body
            and self.translation is None
            and not self.is_stream_response
            and status != 204
        ):
            # The body is relayed byte for byte (a masked key is as long as the key): with
            # its length known, Tornado sends it with the headers in one write, not chunked
            # with a closing chunk after it.
            # (A stream is left chunked: a failure may add an error event to it.)
            handler.set_header("Content-Length", length)
        handler.set_header("x-tvgate-overhead-ms", f"{self.overhead_ms:.3f}")
        if self.warnings:
            # Names may be any Unicode; a header is Latin-1 on the wire: escape the rest.
            warning = "; ".join(self.warnings).encode("ascii", "backslashreplace")
            handler.set_header("x-tvgate-budget-warning", warning.decode())
        if self.is_stream_response and not self.stream_counted:
            self.stream_counted = True  # closed again when the trace is queued
            self.metrics.stream_opened()
        if self.is_stream_response and self.upstream_api.charged:
            # What the trace keeps of the answer is bounded per call, whatever the stream's
            # length: past the bound the capture is cut (and the trace marked truncated).
            self.assembler = self.upstream_api.stream_assembler(self.capture_max_bytes)

    def on_upstream_chunk(self, chunk: bytes) -> bool:
        if self.client_gone:
            return True  # the exchange is aborting; nothing to deliver to
        if self.holding is not None:
            self.holding.keep(chunk)
            return True
        if self.unflushed >= self.client_buffer_bytes:
            if self._wait_for_client():
                return False
            self.unflushed = 0
        # Masked only once taken: a chunk refused above comes again after the pause.
        self._relay(self.scrubber.chunk(chunk))
        return True

    def _relay(self, chunk: bytes) -> None:
        """Send (and keep for the trace) a part of the provider's body, keys masked."""
        if not chunk:
            return  # all of it held back by the scrubber until the next chunk
        if self.translation is None:
            self._send(chunk)
        elif self.is_stream_response:
            self._send(self.translation.feed(chunk))
        else:
            self._hold_for_translation(chunk)
        size = len(chunk)
        if self.assembler is not None:
            self.unparsed.append(chunk)
            self.unparsed_size += size
            if self.unparsed_size >= _UNPARSED_LIMIT:
                self._parse_unparsed(self.assembler)
        elif not self.captured_tail and self.captured_size + size <= self.capture_max_bytes:
            self.captured.append(chunk)
            self.captured_size += size
        else:
            self._keep_tail(chunk)

    def _send(self, chunk: bytes) -> None:
        """Write and flush ``chunk`` to the client: what the provider sent (or its
        translation), never bytes of tvgate's own to keep a silent stream alive."""
        if not chunk:
            return  # a translated stream event not complete yet
        handler = self.handler
        if not self.committed:
            self.committed = True
            self.first_byte = time.perf_counter()
        handler.write(chunk)
        handler.flush()
        size = len(chunk)
        self.bytes_out += size
        self.unflushed += size

    def _hold_for_translation(self, chunk: bytes) -> None:
        self.untranslated.append(chunk)
        self.untranslated_size += len(chunk)
        if self.untranslated_size > TRANSLATED_LIMIT and self.exchange is not None:
            self.too_large = True
            self.untranslated = []
            self.exchange.abort()

    def _finish_translation(self) -> None:
        """The provider's answer ended: the rest of the client's (its whole JSON answer)."""
        translation = self.translation
        assert translation is not None
        if self.is_stream_response:
            self._send(translation.finish())
            return
        body = b"".join(self.untranslated)
        self.untranslated = []
        if self.status >= 400:
            answer = translation.error_answer(self.status, body)[1]
        else:
            try:
                answer = translation.response(body)
            except NotAnAnswer as exc:
                # A 200 that is no answer: the provider failed (nothing was sent yet).
                self.status = 502
                self.handler.set_status(502)
                answer = exc.body
        # Whole before any of it is sent: with its length, Tornado writes it with the
        # headers at once, not chunked with a closing chunk in a second write.
        self.handler.set_header("Content-Length", str(len(answer)))
        self._send(answer)

    def _keep_tail(self, chunk: bytes) -> None:
        """Past ``capture_max_bytes`` of a JSON answer, keep only its end, where its usage is:
        the head cannot be parsed without the rest, so it is let go."""
        keep = min(JSON_TAIL_BYTES, self.capture_max_bytes)
        tail = self.captured_tail
        if self.captured:
            tail += b"".join(self.captured)[-keep:]
            self.captured.clear()
            self.captured_size = 0
        tail += chunk[-keep:]
        if len(tail) > keep:
            del tail[: len(tail) - keep]

    def _parse_unparsed(self, assembler: StreamAssembler) -> StreamAssembler:
        for chunk in self.unparsed:
            assembler.feed(chunk)
        self.unparsed.clear()
        self.unparsed_size = 0
        return assembler

    def _wait_for_client(self) -> bool:
        """Pause the provider until the client has read what it was sent; False when it
        has already."""
        if self.draining:
            return True
        try:
            drained = self.handler.pending_write()
        except StreamClosedError:
            self.on_client_gone()
            return True
        if drained is None:
            return False
        self.draining = True

        def resume(_future: Any) -> None:
            self.draining = False
            self.unflushed = 0
            if self.exchange is not None:
                self.exchange.resume()

        drained.add_done_callback(resume)
        return True

    def on_client_gone(self) -> None:
        """The client closed its connection: stop the provider's work at once."""
        self.client_gone = True
        if self.exchange is not None:
            self.exchange.abort()

    # --- endings ---

    def complete(self, result: UpstreamResult) -> bool:
        """The transfer ended: True (and the answer finished) when the client got all of it."""
        if not self.client_gone:
            self._relay(self.scrubber.end())  # what was held back as the possible start of a key
            if self.translation is not None and not result.failed:
                self._finish_translation()
        # A client that hangs up right after the last event (SDKs do, on [DONE]) got the
        # whole answer, even if that made tvgate abort the transfer's last empty chunk.
        answered = not result.failed or (
            self.assembler is not None and self._parse_unparsed(self.assembler).finish().complete
        )
        if answered and not self.client_gone:
            self.handler.finish()
        return answered

    def replay(self, held: HeldAnswer, warnings: Sequence[str]) -> bool:
        """Every route failed: relay the held provider failure as it came."""
        self.may_fall_back = False
        self.warnings = warnings
        if held.api is not None:
            self._translate_with(held.api, held.translation)
        self.on_upstream_headers(held.status, held.headers, whole_body=False)
        for chunk in held.chunks:
            self.on_upstream_chunk(chunk)
        return self.complete(UpstreamResult(0, ""))

    def send_own_answer(
        self, body: bytes, headers: Sequence[tuple[str, str]], overhead_ms: float
    ) -> None:
        """A JSON answer tvgate makes itself, without a provider (a token estimate)."""
        handler = self.handler
        if handler._finished or self.client_gone:
            return
        self.status = 200
        handler.set_status(200)
        handler.set_header("Content-Type", "application/json")
        for name, value in headers:
            handler.set_header(name, value)
        handler.set_header("x-tvgate-overhead-ms", f"{overhead_ms:.3f}")
        self._send(body)
        handler.finish()

    def send_error(self, status: int, message: str) -> None:
        """Tell the client of an error the way it can still hear it: the API's error
        envelope before the answer started, else an error event in a stream."""
        handler = self.handler
        if handler._finished or self.client_gone:
            return
        if not self.committed:
            self.status = status
            handler.send_api_error(status, message, self.endpoint)
        elif self.is_stream_response:
            if self.translation is not None:
                handler.write(self.translation.error_event(message))
            else:
                handler.write(self.endpoint.stream_error_event(message))
            handler.finish()
        else:
            # A JSON answer cut halfway cannot be mended; make the cut visible to the client.
            handler.cut()

    # --- what the trace keeps ---

    def retained(self) -> int:
        """Bytes of answer this call's capture holds for its trace."""
        if self.assembler is not None:
            return self.assembler.retained
        return self.captured_size + len(self.captured_tail)

    def assembled(self) -> Assembled | None:
        """The answer as the trace records it: model, ids, usage, error, the document."""
        assembled = self._assembled()
        if self.translation is None or assembled is None or assembled.response is None:
            return assembled
        # Read from the provider's bytes (its figures), shown as the client got it.
        return replace(assembled, response=self.translation.document(assembled.response))

    def _assembled(self) -> Assembled | None:
        api = self.upstream_api
        if self.assembler is not None:
            return self._parse_unparsed(self.assembler).finish()
        if not api.charged:
            return None
        if self.captured_tail:
            # Too large to parse whole: the usage (and so the charge) is read from the
            # end, and the trace is marked truncated.
            return assemble_tail(api, bytes(self.captured_tail))
        if self.captured:
            return assemble_body(api, b"".join(self.captured))
        return None
