"""``GET /v1/models``: which routes a caller is shown, and the pages of Anthropic's format.

The list is the routes the caller may use by name (a pattern such as ``claude-haiku-*``
names no model, so it is not listed): those of its API's provider, and those of the other
provider that translation serves. Anthropic's format is paged as Anthropic's API pages it:
``limit`` (1 to 1000, 20 by default), ``after_id`` or ``before_id`` (the page right after
or right before that id), ``has_more`` (more in the direction asked), ``first_id`` and
``last_id``. Routes are listed in name order, and a cursor is compared by name, so a page
follows on from the last even when the route it names was deleted in between. Claude
Code's gateway model discovery asks for ``limit=1000``. OpenAI's format has no pages:
every route in one list, as OpenAI's API answers.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from tvgate.providers import ProviderAPI, speaks
from tvgate.routing import RouteEntry
from tvgate.translate.pairs import pair_for

DEFAULT_LIMIT = 20
MAX_LIMIT = 1000
#: The longest cursor read: a route name is at most this long.
_MAX_CURSOR = 200


class PageError(ValueError):
    """A page parameter out of its range: a 400 naming it."""


def listed_routes(available: Sequence[RouteEntry], api: ProviderAPI) -> list[tuple[str, str]]:
    """(name, provider) of each route of ``available`` a client of ``api`` can call by name,
    in name order."""
    return [
        (r.name, r.key.provider)
        for r in available
        if not r.is_pattern
        and (
            speaks(r.key.provider) == api.provider
            or (r.translate and pair_for(api, speaks(r.key.provider)) is not None)
        )
    ]


@dataclass(frozen=True)
class PageRequest:
    """What page of the list an Anthropic-format request asks for."""

    limit: int = DEFAULT_LIMIT
    after_id: str = ""
    before_id: str = ""

    @classmethod
    def parse(cls, argument: Callable[[str], str | None]) -> PageRequest:
        """From the query (``argument(name)``: its value or None); raises ``PageError``."""
        raw = argument("limit")
        limit = DEFAULT_LIMIT
        if raw is not None:
            text = raw.strip()
            if not (text.isascii() and text.isdigit() and len(text) <= 4):
                raise PageError(f"limit: must be an integer from 1 to {MAX_LIMIT}")
            limit = int(text)
            if not 1 <= limit <= MAX_LIMIT:
                raise PageError(f"limit: must be an integer from 1 to {MAX_LIMIT}")
        after, before = argument("after_id"), argument("before_id")
        if after is not None and before is not None:
            raise PageError("after_id and before_id cannot both be given")
        for name, value in (("after_id", after), ("before_id", before)):
            if value is not None and not 0 < len(value) <= _MAX_CURSOR:
                raise PageError(f"{name}: must be a model id of 1 to {_MAX_CURSOR} characters")
        return cls(limit, after or "", before or "")

    def page(self, routes: Sequence[tuple[str, str]]) -> tuple[list[tuple[str, str]], bool]:
        """The page of ``routes`` (in name order) asked for, and whether there is more in
        its direction."""
        if self.before_id:
            earlier = [r for r in routes if r[0] < self.before_id]
            return earlier[-self.limit :], len(earlier) > self.limit
        later = [r for r in routes if r[0] > self.after_id] if self.after_id else list(routes)
        return later[: self.limit], len(later) > self.limit
