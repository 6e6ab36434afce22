"""Request bodies: undo Content-Encoding within the size limit, parse once, read ``model``.

Codex compresses its requests with zstd; other tools may gzip. The size limit
applies to the bytes received and again to the decoded bytes, and decoding
stops as soon as the limit is crossed, so a compression bomb costs at most
``limit`` bytes of memory.

The body is validated and read with simdjson, which checks the whole document
(structure, strings, UTF-8) into a tape of its own and builds Python objects only
for what is asked: ``model``, ``stream`` and the output token limit: a fraction of
what building a coding agent's whole body as Python objects with orjson, and freeing
them again, costs on the event loop (bench/README.md has the figures). What
simdjson refuses is parsed again by orjson, so a body is accepted or refused (with
orjson's message, which names line and column) exactly as orjson would: simdjson
refuses a few bodies orjson takes, such as integers past 64 bits.

A route that names another upstream model rewrites ``model`` in the bytes: its
top-level member is found by a literal search and the rewrite is checked by
parsing the result, so every other byte goes up unchanged. A body whose top
level has ``model`` twice is refused: the gateway routes on one and the
provider might read the other.
"""

from __future__ import annotations

import json
import re
import threading
import zlib
from dataclasses import dataclass

import orjson
import simdjson
import zstandard


class BodyError(Exception):
    """The body cannot be used; ``status`` is the 4xx to answer with."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(slots=True)
class ParsedBody:
    raw: bytes
    model: str
    #: ``"stream": true`` at the top level.
    stream: bool
    #: The most output tokens it asks for (``max_tokens`` or the API's equivalent); 0: none
    #: set. What its budgets reserve for the answer.
    max_output: int = 0


_READ_SIZE = 256 * 1024


def _gunzip(data: bytes, limit: int) -> bytes:
    # wbits 47 = 32 + 15: accept zlib or gzip headers, as servers commonly do for "gzip".
    decoder = zlib.decompressobj(wbits=47)
    out = bytearray()
    try:
        out += decoder.decompress(data, limit + 1)
        while decoder.unconsumed_tail and len(out) <= limit:
            out += decoder.decompress(decoder.unconsumed_tail, limit + 1 - len(out))
    except zlib.error as exc:
        raise BodyError(400, f"compressed body does not decode: {exc}") from None
    if len(out) > limit:
        raise BodyError(413, f"decoded body is over the {limit}-byte limit")
    if not decoder.eof:
        raise BodyError(400, "compressed body is truncated")
    return bytes(out)


def _unzstd(data: bytes, limit: int) -> bytes:
    reader = zstandard.ZstdDecompressor().stream_reader(data, read_across_frames=True)
    out = bytearray()
    try:
        while True:
            piece = reader.read(_READ_SIZE)
            if not piece:
                break
            out += piece
            if len(out) > limit:
                raise BodyError(413, f"decoded body is over the {limit}-byte limit")
    except zstandard.ZstdError as exc:
        raise BodyError(400, f"zstd body does not decode: {exc}") from None
    return bytes(out)


def decode_content(data: bytes, content_encoding: str | None, limit: int) -> bytes:
    """Undo ``Content-Encoding`` (identity, gzip, zstd, in the order applied)."""
    if not content_encoding:
        return data
    codings = [c.strip().lower() for c in content_encoding.split(",") if c.strip()]
    for coding in reversed(codings):
        if coding == "identity":
            continue
        if coding in ("gzip", "x-gzip", "deflate"):
            # HTTP's "deflate" is zlib-wrapped, which the gzip decoder detects.
            data = _gunzip(data, limit)
        elif coding == "zstd":
            data = _unzstd(data, limit)
        else:
            raise BodyError(415, f"unsupported Content-Encoding {coding!r}; use gzip or zstd")
    return data


_parsers = threading.local()
#: The members that cap a call's output tokens: Anthropic and Chat Completions' legacy
#: ``max_tokens``, Chat Completions' ``max_completion_tokens``, Responses' ``max_output_tokens``.
_OUTPUT_LIMITS = ("max_tokens", "max_completion_tokens", "max_output_tokens")
# `"model"` as a member name, up to its value.
_MODEL_MEMBER = re.compile(rb'"model"[ \t\r\n]*:[ \t\r\n]*')
# The opening of an object, up to its first member.
_OPEN = re.compile(rb"[ \t\r\n]*\{[ \t\r\n]*")
# C0 and C1 control characters and DEL: no route or model name has them, and a NUL
# cannot even be stored in a PostgreSQL text column.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def _parser() -> simdjson.Parser:
    # A parser holds one document at a time and is not thread-safe: one per thread.
    parser: simdjson.Parser | None = getattr(_parsers, "parser", None)
    if parser is None:
        parser = _parsers.parser = simdjson.Parser()
    return parser


def _max_output(document: simdjson.Object | dict[str, object]) -> int:
    """The largest output token limit the top level sets (0: none)."""
    limits = [document.get(name) for name in _OUTPUT_LIMITS]
    return max(
        (v for v in limits if isinstance(v, int) and not isinstance(v, bool) and v > 0), default=0
    )


def _top_level(raw: bytes) -> tuple[object, int, bool, int]:
    """The top level's ``model`` (a str or a stand-in), how many ``model`` members it
    has, whether ``stream`` is true, and its output token limit; raises BodyError for a
    body that is not a JSON object."""
    try:
        document = _parser().parse(raw)
    except (ValueError, RuntimeError):
        return _top_level_orjson(raw)
    try:
        if not isinstance(document, simdjson.Object):
            raise BodyError(400, "request body must be a JSON object")
        model = document.get("model")
        # Only scalars leave: an Object or Array would pin the parser's document.
        model = model if isinstance(model, str) else None
        count = sum(1 for key in document if key == "model")
        return model, count, document.get("stream") is True, _max_output(document)
    finally:
        del document


def json_object(raw: bytes) -> dict[str, object]:
    """The body as a JSON object, parsed by orjson; BodyError (400) for anything else."""
    try:
        document = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise BodyError(400, f"request body is not valid JSON: {exc}") from None
    if not isinstance(document, dict):
        raise BodyError(400, "request body must be a JSON object")
    return document


def _top_level_orjson(raw: bytes) -> tuple[object, int, bool, int]:
    """:func:`_top_level` for the rare body simdjson refuses (it may still be valid)."""
    document = json_object(raw)
    # A dict keeps only the last of duplicate members; the json module shows them all.
    # The outermost object is the last one it completes.
    count = 0

    def count_models(pairs: list[tuple[str, object]]) -> dict[str, object]:
        nonlocal count
        count = sum(1 for key, _ in pairs if key == "model")
        return {}

    json.loads(raw, object_pairs_hook=count_models)
    return document.get("model"), count, document.get("stream") is True, _max_output(document)


def parse_request_body(raw: bytes, named: str = "") -> ParsedBody:
    """Parse a decoded JSON body and read its ``model``; ``named``: the route the client's
    path names (Azure OpenAI's ``/openai/deployments/{name}/…``), which becomes the body's
    ``model`` whatever it had."""
    if not raw:
        raise BodyError(400, "request body is empty; expected a JSON object")
    if named:
        raw = _named_model(raw, named)
    model, count, stream, max_output = _top_level(raw)
    if not isinstance(model, str) or not model:
        raise BodyError(400, "request body has no 'model' (a route name)")
    if count > 1:
        raise BodyError(400, "request body has 'model' more than once")
    if len(model) > 200:
        raise BodyError(400, "'model' is longer than 200 characters")
    if _CONTROL.search(model):
        raise BodyError(400, "'model' contains control characters")
    return ParsedBody(raw=raw, model=model, stream=stream, max_output=max_output)


def _named_model(raw: bytes, model: str) -> bytes:
    """``raw`` with ``model`` as its top level's ``model`` (one, whatever it had)."""
    document = json_object(raw)
    document["model"] = model
    return orjson.dumps(document)


def with_model(body: ParsedBody, upstream_model: str) -> bytes:
    """The body to send upstream: unchanged bytes unless ``model`` must be rewritten."""
    if upstream_model == body.model:
        return body.raw
    raw = body.raw
    value = orjson.dumps(body.model)
    replacement = orjson.dumps(upstream_model)
    first = _OPEN.match(raw)
    position = raw.find(b'"model"')
    while position >= 0:
        member = _MODEL_MEMBER.match(raw, position)
        if member is not None and raw.startswith(value, member.end()):
            view = memoryview(raw)  # one copy of the body, not three
            rewritten = b"".join(
                (view[: member.end()], replacement, view[member.end() + len(value) :])
            )
            # The first member of the object is the top level's `model` (coding agents
            # send it first). Elsewhere it may be a nested one, which would leave the
            # top level's unchanged: parsing the result tells.
            is_first = first is not None and first.end() == position
            if is_first or _top_level(rewritten)[0] == upstream_model:
                return rewritten
        position = raw.find(b'"model"', position + 1)
    # `model` written in another form (escapes): rewrite through objects.
    document = orjson.loads(raw)
    document["model"] = upstream_model
    return orjson.dumps(document)
