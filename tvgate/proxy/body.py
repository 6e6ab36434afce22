"""Request bodies: undo Content-Encoding within the size limit, parse once, read ``model``.

Codex compresses its requests with zstd; other tools may gzip. The size limit
applies to the bytes received and again to the decoded bytes, and decoding
stops as soon as the limit is crossed, so a compression bomb costs at most
``limit`` bytes of memory.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Any

import orjson
import zstandard


class BodyError(Exception):
    """The body cannot be used; ``status`` is the 4xx to answer with."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(slots=True)
class ParsedBody:
    raw: bytes
    document: dict[str, Any]
    model: str


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


def parse_request_body(raw: bytes) -> ParsedBody:
    """Parse a decoded JSON body and read its ``model``."""
    if not raw:
        raise BodyError(400, "request body is empty; expected a JSON object")
    try:
        document = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise BodyError(400, f"request body is not valid JSON: {exc}") from None
    if not isinstance(document, dict):
        raise BodyError(400, "request body must be a JSON object")
    model = document.get("model")
    if not isinstance(model, str) or not model:
        raise BodyError(400, "request body has no 'model' (a route name)")
    if len(model) > 200:
        raise BodyError(400, "'model' is longer than 200 characters")
    return ParsedBody(raw=raw, document=document, model=model)


def with_model(body: ParsedBody, upstream_model: str) -> bytes:
    """The body to send upstream: unchanged bytes unless ``model`` must be rewritten."""
    if upstream_model == body.model:
        return body.raw
    document = dict(body.document)
    document["model"] = upstream_model
    return orjson.dumps(document)
