"""Provider keys masked out of what a provider sends back, before anyone else sees it.

A provider (or whatever answers at a key's base URL) may echo the credential it was
sent: in an error message, a request id, any response header, a stream's in-band
error. ``KeyScrubber`` holds the plaintexts one call sent and replaces every
occurrence with a masked form of the same length (the key's public prefix, stars, its
last four characters, as OpenAI masks keys), so a ``Content-Length`` stays true and a
body can be masked as it streams, without buffering it.

A key split across two chunks: the end of a chunk that could be the start of a key is
held back until the next chunk (or the end of the body) tells whether it is one. The
end of a body is masked as the key it may have begun, so a provider that sends all but
the last character of a key and stops gets nothing through either. Only the key's
exact plaintext is recognised, not encodings of it (URL-escaped, base64). Secrets shorter
than ``MIN_SCRUBBED`` are left alone: masking them would mangle ordinary text, and no
provider issues keys that short.
"""

from __future__ import annotations

import re

#: Secrets shorter than this are not masked (see the module docstring).
MIN_SCRUBBED = 8
#: What may be kept at the start of a masked key: the provider's fixed prefix
#: ("sk-", "sk-ant-", "sk-proj-"), lower-case words and dashes, at most two of them.
_PUBLIC_PREFIX = re.compile(r"(?:[a-z]{2,5}-){1,2}")
#: How many unknown characters a masked key must keep hidden before its last four show.
_HIDDEN_AT_LEAST = 16


def masked(secret: str) -> str:
    """``secret`` with all but its public prefix and (for a long key) its last four
    characters replaced by ``*``: as long as the secret, and ASCII."""
    found = _PUBLIC_PREFIX.match(secret)
    prefix = found.group() if found is not None else ""
    rest = len(secret) - len(prefix)
    tail = secret[-4:] if rest >= _HIDDEN_AT_LEAST + 4 else ""
    return prefix + "*" * (rest - len(tail)) + tail


class KeyScrubber:
    """The keys one call sent upstream, and what is held back of a body being masked."""

    __slots__ = ("_bytes", "_held", "_last_bytes", "_text")

    def __init__(self) -> None:
        self._text: list[tuple[str, str]] = []
        self._bytes: list[tuple[bytes, bytes]] = []
        #: Every byte value some key contains: a chunk ending in another cannot end in a
        #: partial key (SSE events end in a newline), the usual case, checked at once.
        self._last_bytes: set[int] = set()
        self._held = b""

    def add(self, secret: str) -> None:
        """Mask ``secret`` from now on (a call may try several keys: fallbacks)."""
        if len(secret) < MIN_SCRUBBED or any(secret == known for known, _ in self._text):
            return
        mask = masked(secret)
        self._text.append((secret, mask))
        self._bytes.append((secret.encode(), mask.encode()))
        self._last_bytes.update(secret.encode())

    def text(self, value: str) -> str:
        """``value`` (a header, an error message, a trace field) with every key masked."""
        for secret, mask in self._text:
            if secret in value:
                value = value.replace(secret, mask)
        return value

    def chunk(self, data: bytes) -> bytes:
        """What of a body chunk may be passed on now, keys masked; a possible start of a
        key at its end is held back for the next chunk (or ``end``)."""
        if not self._bytes:
            return data
        if self._held:
            data, self._held = self._held + data, b""
        for secret, mask in self._bytes:
            if secret in data:
                data = data.replace(secret, mask)
        if data and data[-1] in self._last_bytes:
            keep = self._partial_key_at_end(data)
            if keep:
                data, self._held = data[:-keep], data[-keep:]
        return data

    def end(self) -> bytes:
        """What was held back when the body ended, masked as the key it began."""
        held, self._held = self._held, b""
        for secret, mask in self._bytes:
            if held and secret.startswith(held):
                return mask[: len(held)]
        return held

    def _partial_key_at_end(self, data: bytes) -> int:
        """Length of the longest end of ``data`` that is the start (not all) of a key."""
        longest = 0
        for secret, _ in self._bytes:
            first = secret[:1]
            at = data.find(first, max(0, len(data) - len(secret) + 1))
            while at != -1:
                if secret.startswith(data[at:]):
                    longest = max(longest, len(data) - at)
                    break
                at = data.find(first, at + 1)
        return longest
