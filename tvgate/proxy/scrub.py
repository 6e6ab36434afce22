"""Provider keys masked out of what a provider sends back, before anyone else sees it.

A provider (or whatever answers at a key's base URL) may echo the credential it was
sent: in an error message, a request id, any response header, a stream's in-band
error. ``KeyScrubber`` holds the plaintexts one call sent and replaces every
occurrence with a masked form of the same length (the key's public prefix, stars, its
last four characters, as OpenAI masks keys), so a ``Content-Length`` stays true and a
body can be masked as it streams, without buffering it.

The key is also recognised URL-escaped (as a query or a path would carry it, either case
of hex digits) and base64-encoded (alone, or inside a longer encoded text such as a
``Basic`` credential: the characters that encode only the key's bytes, at each of the
three offsets base64 may meet it, in the standard and the URL-safe alphabet); such a
form is masked as stars and its last four characters. The base64 forms are looked for
through one anchor each, a stretch both alphabets write alike that starts at one of
its seldomest characters: a chunk without the key costs three memchr calls and a look at
the few places that character is, not six searches.

A key split across two chunks: the end of a chunk that could be the start of a key (in
any of its forms) is held back until the next chunk (or the end of the body) tells
whether it is one. The end of a body is masked as the key it may have begun, so a
provider that sends all but the last character of a key and stops gets nothing through
either. Secrets shorter than ``MIN_SCRUBBED`` are left alone: masking them would mangle
ordinary text, and no provider issues keys that short.
"""

from __future__ import annotations

import base64
import functools
import re
from collections.abc import Sequence
from dataclasses import dataclass
from urllib.parse import quote

#: Secrets shorter than this are not masked (see the module docstring).
MIN_SCRUBBED = 8
#: What may be kept at the start of a masked key: the provider's fixed prefix
#: ("sk-", "sk-ant-", "sk-proj-"), lower-case words and dashes, at most two of them.
_PUBLIC_PREFIX = re.compile(r"(?:[a-z]{2,5}-){1,2}")
#: How many unknown characters a masked key must keep hidden before its last four show.
_HIDDEN_AT_LEAST = 16
#: Upper-case hex digits of a percent-escape, to write them in lower case too.
_ESCAPE = re.compile(r"%[0-9A-F]{2}")
#: Characters the two base64 alphabets write differently.
_ALPHABET_SPECIFIC = b"+/"
#: Base64 characters by how seldom they are in what providers send (JSON, prose, code),
#: rarest first: a base64 form is looked for from one of its rarest characters.
_SELDOM = b"QZXJKVWYUGHBFqzjxMNRPOLDEICTASkvwbygfpmhcludrnsoieta9876543210"
#: How long an anchor is: long enough to be the key, short enough to check at once.
_ANCHOR = 16


def masked(secret: str) -> str:
    """``secret`` with all but its public prefix and (for a long key) its last four
    characters replaced by ``*``: as long as the secret, and ASCII."""
    found = _PUBLIC_PREFIX.match(secret)
    prefix = found.group() if found is not None else ""
    rest = len(secret) - len(prefix)
    tail = secret[-4:] if rest >= _HIDDEN_AT_LEAST + 4 else ""
    return prefix + "*" * (rest - len(tail)) + tail


def _masked_encoding(form: str) -> str:
    """An encoded form of a key, as long as it, all stars but its last four characters."""
    tail = form[-4:] if len(form) >= _HIDDEN_AT_LEAST + 4 else ""
    return "*" * (len(form) - len(tail)) + tail


def url_forms(secret: str) -> list[str]:
    """``secret`` URL-escaped in the ways a URL may carry it, where that changes it."""
    forms: list[str] = []
    for safe in ("", "/"):
        escaped = quote(secret, safe=safe)
        for form in (escaped, _ESCAPE.sub(lambda m: m.group().lower(), escaped)):
            if form != secret and form not in forms:
                forms.append(form)
    return forms


def base64_forms(secret: str) -> list[tuple[bytes, list[bytes]]]:
    """For each offset (0, 1, 2 bytes into a 3-byte group) base64 may meet ``secret`` at:
    an anchor and the forms (the characters that encode the secret's bytes alone, in
    each alphabet). The anchor is a stretch of the form that neither alphabet writes
    differently, starting at as seldom a character as there is (``_anchor``)."""
    raw = secret.encode()
    out: list[tuple[bytes, list[bytes]]] = []
    for offset in range(3):
        encoded = base64.b64encode(b"\0" * offset + raw)
        # Character i holds bits 6i..6i+5: keep those within the secret's bytes.
        form = encoded[-(-8 * offset // 6) : (8 * (offset + len(raw))) // 6]
        urlsafe = form.replace(b"+", b"-").replace(b"/", b"_")
        out.append((_anchor(form), [form] if urlsafe == form else [form, urlsafe]))
    return out


def _anchor(form: bytes) -> bytes:
    """``_ANCHOR`` characters of ``form`` with no "+" or "/", starting at as seldom a
    character as such a stretch can start at (the whole form if it is that short).

    Worked out for every call (each call makes its own scrubber): a few searches of the
    form per character tried, seldomest first, not a look at every position."""
    if len(form) <= _ANCHOR:
        return form if not (b"+" in form or b"/" in form) else b""
    last = len(form) - _ANCHOR
    for char in _SELDOM:
        at = form.find(char, 0, last + 1)
        while at != -1:
            end = at + _ANCHOR
            if form.find(b"+", at, end) == -1 and form.find(b"/", at, end) == -1:
                return form[at:end]
            at = form.find(char, at + 1, last + 1)
    # "+" or "/" in every stretch that long: the longest stretch without them (none for
    # a form of nothing else).
    return max(form.replace(b"/", b"+").split(b"+"), key=len)


@dataclass(frozen=True, slots=True)
class _Forms:
    """Every form of one key, with its mask, as ``KeyScrubber`` looks for them."""

    #: (form, mask) as text, plaintext first: for headers, messages, trace fields.
    text: tuple[tuple[str, str], ...]
    #: As bytes: the plaintext and URL forms, looked for as they are ...
    direct: tuple[tuple[bytes, bytes], ...]
    #: ... and the base64 forms, by (the anchor's first byte, the anchor, its forms).
    anchored: tuple[tuple[int, bytes, tuple[tuple[bytes, bytes], ...]], ...]
    #: Every byte value some form contains.
    last_bytes: frozenset[int]
    #: The plaintext as bytes; every byte form, the plaintext first; the shortest's length.
    plain: bytes
    ordered: tuple[tuple[bytes, bytes], ...]
    shortest: int


@functools.lru_cache(maxsize=128)
def _forms(secret: str) -> _Forms:
    """The forms of ``secret``, worked out once per key, not once per call (about 10 us:
    URL-escaping and base64 are done in Python). Kept for the last 128 keys used, as
    plaintexts are in the gateway's key cache."""
    direct = [(secret, masked(secret))]
    direct += [(form, _masked_encoding(form)) for form in url_forms(secret)]
    text = list(direct)
    as_bytes = [(form.encode(), mask.encode()) for form, mask in direct]
    anchored = []
    for anchor, forms in base64_forms(secret):
        pairs = tuple((form, _masked_encoding(form.decode()).encode()) for form in forms)
        if anchor:
            anchored.append((anchor[0], anchor, pairs))
        else:  # a form of nothing but "+" and "/": looked for as it is
            as_bytes.extend(pairs)
        text.extend((form.decode(), mask.decode()) for form, mask in pairs)
    every = as_bytes + [pair for _, _, pairs in anchored for pair in pairs]
    return _Forms(
        tuple(text),
        tuple(as_bytes),
        tuple(anchored),
        frozenset(byte for form, _ in every for byte in form),
        secret.encode(),
        tuple(every),  # the plaintext is the first of as_bytes
        min(len(form) for form, _ in every),
    )


class KeyScrubber:
    """The keys one call sent upstream, and what is held back of a body being masked."""

    __slots__ = (
        "_anchored",
        "_bytes",
        "_direct",
        "_held",
        "_last_bytes",
        "_plain",
        "_shortest",
        "_text",
    )

    def __init__(self) -> None:
        #: What ``_Forms`` holds, of every key added.
        self._text: tuple[tuple[str, str], ...] = ()
        self._direct: tuple[tuple[bytes, bytes], ...] = ()
        self._anchored: tuple[tuple[int, bytes, tuple[tuple[bytes, bytes], ...]], ...] = ()
        self._last_bytes: frozenset[int] = frozenset()
        #: Every form of every key, plaintexts first; and the plaintexts alone.
        self._bytes: Sequence[tuple[bytes, bytes]] = ()
        self._plain: tuple[bytes, ...] = ()
        #: The length of the shortest form: a shorter text or chunk holds none whole.
        self._shortest = 0
        self._held = b""

    def add(self, secret: str) -> None:
        """Mask ``secret`` from now on (a call may try several keys: fallbacks)."""
        if len(secret) < MIN_SCRUBBED:
            return
        forms = _forms(secret)
        if not self._plain:
            # The first key (a call mostly sends one): its cached forms serve as they are,
            # shared, not copied into sets and lists of the call's own.
            self._text, self._direct, self._anchored = forms.text, forms.direct, forms.anchored
            self._last_bytes, self._plain = forms.last_bytes, (forms.plain,)
            self._bytes, self._shortest = forms.ordered, forms.shortest
            return
        if forms.plain in self._plain:
            return
        self._text += forms.text
        self._direct += forms.direct
        self._anchored += forms.anchored
        self._last_bytes |= forms.last_bytes
        self._plain += (forms.plain,)
        self._bytes = sorted(
            [*self._direct, *(pair for _, _, pairs in self._anchored for pair in pairs)],
            key=lambda pair: pair[0] not in self._plain,
        )
        self._shortest = min(len(form) for form, _ in self._bytes)

    def text(self, value: str) -> str:
        """``value`` (a header, an error message, a trace field) with every key masked."""
        if len(value) < self._shortest:
            return value  # too short to hold any form of a key (also: no key added)
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
        if len(data) >= self._shortest:
            for secret, mask in self._direct:
                if secret in data:
                    data = data.replace(secret, mask)
            for first, anchor, pairs in self._anchored:
                # The anchor's first character is found by memchr (a seldom one: few
                # places to look at), where a search for the whole anchor would
                # prepare a table for it and read every byte.
                at = data.find(first)
                while at != -1:
                    if data.startswith(anchor, at):
                        for form, mask in pairs:
                            if form in data:
                                data = data.replace(form, mask)
                        break
                    at = data.find(first, at + 1)
        if data and data[-1] in self._last_bytes:
            keep = self._partial_key_at_end(data)
            if keep:
                data, self._held = data[:-keep], data[-keep:]
        return data

    def end(self) -> bytes:
        """What was held back when the body ended, masked as the key it began (as an
        encoded form only from a whole base64 group on: fewer characters than that tell
        less than a masked key shows, and ordinary text often ends like one)."""
        held, self._held = self._held, b""
        if not held:
            return held
        for secret, mask in self._bytes:
            if secret.startswith(held) and (len(held) >= 4 or secret in self._plain):
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
