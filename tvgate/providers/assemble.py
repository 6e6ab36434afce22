"""Reading a provider's answer by the name of its API, for callers that hold a name.

Each API's assembler lives in its module (``tvgate.providers.anthropic``, ...) and
what they share in ``tvgate.providers.common``; the proxy asks the module it holds.
These functions look the module up by name first (``tvgate.providers.api_for``), as
the tests and tools that replay a recorded stream do.
"""

from __future__ import annotations

from tvgate.providers import api_for
from tvgate.providers.base import OPENAI_CHAT
from tvgate.providers.common import (
    JSON_TAIL_BYTES,
    MAX_RETAINED,
    Assembled,
    StreamAssembler,
    Usage,
    assemble_body,
    assemble_tail,
    checked_usage,
)

__all__ = [
    "JSON_TAIL_BYTES",
    "OPENAI_CHAT",
    "Assembled",
    "StreamAssembler",
    "Usage",
    "assemble_json",
    "assemble_json_tail",
    "checked_usage",
    "stream_assembler",
]


def stream_assembler(api: str, *, max_retained: int = MAX_RETAINED) -> StreamAssembler:
    """A fresh assembler for a streamed response of ``api``."""
    assembler = api_for(api).stream_assembler(max_retained)
    if assembler is None:
        raise ValueError(f"no stream assembler for {api!r}")
    return assembler


def assemble_json(api: str, body: bytes) -> Assembled:
    """Read a non-streamed response body; never raises on what the body holds."""
    return assemble_body(api_for(api), body)


def assemble_json_tail(api: str, tail: bytes) -> Assembled:
    """What the end of a JSON answer too large to keep whole says (``common.assemble_tail``)."""
    return assemble_tail(api_for(api), tail)
