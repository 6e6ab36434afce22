"""What a call cost: a price table per model (exact names or globs), seeded, and per org.

Prices are USD per million tokens. The default table (rows with no org) is the
operator's; an org's admins set their own org's prices, which win over the default
for that org's calls. A cloud's id of a model (Vertex AI's ``claude-…@date``, Bedrock's
``us.anthropic.claude-…-v1:0``) is priced as the model's own name (``price_name``) is,
unless a more specific price names the id. Anthropic reports input tokens without the
cached ones;
OpenAI's prompt tokens include them; ``cost`` takes each provider's way of counting
into account.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass

from tvgate.models import ModelPrice
from tvgate.providers import provider_api

# Public list prices (USD per million tokens) at the time of writing:
# (model pattern, input, output, cache read, cache write).
SEED_PRICES: tuple[tuple[str, float, float, float, float], ...] = (
    ("claude-opus-4-5*", 5.0, 25.0, 0.50, 6.25),
    ("claude-opus-4*", 15.0, 75.0, 1.50, 18.75),
    ("claude-sonnet-4*", 3.0, 15.0, 0.30, 3.75),
    ("claude-3-7-sonnet*", 3.0, 15.0, 0.30, 3.75),
    ("claude-haiku-4-5*", 1.0, 5.0, 0.10, 1.25),
    ("claude-3-5-haiku*", 0.80, 4.0, 0.08, 1.0),
    ("gpt-5-mini*", 0.25, 2.0, 0.025, 0.0),
    ("gpt-5-nano*", 0.05, 0.40, 0.005, 0.0),
    ("gpt-5*", 1.25, 10.0, 0.125, 0.0),
    ("gpt-4.1-mini*", 0.40, 1.60, 0.10, 0.0),
    ("gpt-4.1-nano*", 0.10, 0.40, 0.025, 0.0),
    ("gpt-4.1*", 2.0, 8.0, 0.50, 0.0),
    ("gpt-4o-mini*", 0.15, 0.60, 0.075, 0.0),
    ("gpt-4o*", 2.50, 10.0, 1.25, 0.0),
    ("o3*", 2.0, 8.0, 0.50, 0.0),
    ("o4-mini*", 1.10, 4.40, 0.275, 0.0),
    ("text-embedding-3-small", 0.02, 0.0, 0.0, 0.0),
    ("text-embedding-3-large", 0.13, 0.0, 0.0, 0.0),
)


def seed_prices() -> None:
    """Insert the seed prices that are not in the default table (the operator's edits are
    kept)."""
    known = {
        row.model for row in ModelPrice.select(ModelPrice.model).where(ModelPrice.org_id.is_null())
    }
    for model, input_, output, cache_read, cache_write in SEED_PRICES:
        if model not in known:
            ModelPrice.create(
                model=model,
                input_per_mtok=input_,
                output_per_mtok=output,
                cache_read_per_mtok=cache_read,
                cache_write_per_mtok=cache_write,
            )


#: A Bedrock model id, as a foundation model, a cross-region inference profile or their
#: ARNs: ``[arn:aws:bedrock:REGION:ACCOUNT:inference-profile/][us.]anthropic.NAME-v1[:0]``.
_BEDROCK_ID = re.compile(
    r"(?:arn:aws[a-z-]*:bedrock:[a-z0-9-]*:\d*:(?:foundation-model|inference-profile|"
    r"application-inference-profile)/)?(?:[a-z]{2,6}(?:-[a-z]+)?\.)?anthropic\."
    r"(?P<name>[a-z0-9.-]+?)(?:-v\d+(?::\d+)?)?"
)


def price_name(model: str) -> str:
    """A cloud's id of a model as the price table names it (the model's own name): Vertex
    AI's ``claude-sonnet-4-5@20250929`` and Bedrock's
    ``us.anthropic.claude-sonnet-4-5-20250929-v1:0`` are ``claude-sonnet-4-5-20250929``."""
    found = _BEDROCK_ID.fullmatch(model)
    return found.group("name") if found else model.replace("@", "-", 1)


@dataclass(frozen=True, slots=True)
class Price:
    model: str
    input: float
    output: float
    cache_read: float
    cache_write: float


class _Patterns:
    """Prices of one table; the most specific pattern (exact, then longest literal prefix) wins."""

    def __init__(self, prices: list[Price]) -> None:
        def specificity(price: Price) -> tuple[int, int]:
            glob = re.search(r"[*?\[]", price.model)
            return (0 if glob is None else 1, -(glob.start() if glob else len(price.model)))

        self._compiled = [
            (re.compile(fnmatch.translate(p.model)), p) for p in sorted(prices, key=specificity)
        ]
        self._found: dict[str, Price | None] = {}

    def find(self, model: str) -> Price | None:
        # A table lives seconds (cache_ttl) and sees few distinct models: match each once.
        if model in self._found:
            return self._found[model]
        # The most specific pattern that matches the model's id or its own name.
        name = price_name(model)
        found = next(
            (
                price
                for pattern, price in self._compiled
                if pattern.match(model) or pattern.match(name)
            ),
            None,
        )
        if len(self._found) < 1000:
            self._found[model] = found
        return found


class PriceTable:
    """Prices in memory: an org's own price of a model, else the default table's."""

    def __init__(self, defaults: list[Price], orgs: dict[int, list[Price]] | None = None) -> None:
        self._default = _Patterns(defaults)
        self._orgs = {org_id: _Patterns(prices) for org_id, prices in (orgs or {}).items()}

    @classmethod
    def load(cls) -> PriceTable:
        defaults: list[Price] = []
        orgs: dict[int, list[Price]] = {}
        for r in ModelPrice.select():
            price = Price(
                r.model,
                r.input_per_mtok,
                r.output_per_mtok,
                r.cache_read_per_mtok,
                r.cache_write_per_mtok,
            )
            (defaults if r.org_id is None else orgs.setdefault(r.org_id, [])).append(price)
        return cls(defaults, orgs)

    def find(self, org_id: int, model: str) -> Price | None:
        own = self._orgs.get(org_id)
        found = own.find(model) if own is not None else None
        return found if found is not None else self._default.find(model)

    def cost(
        self,
        org_id: int,
        provider: str,
        model: str,
        input_tokens: int,
        output_tokens: int,
        cache_read_tokens: int,
        cache_write_tokens: int,
    ) -> float:
        price = self.find(org_id, model)
        if price is None:
            return 0.0
        # Whether input_tokens includes the cached tokens is the provider's way of counting.
        uncached = provider_api(provider).uncached_input(input_tokens, cache_read_tokens)
        total = (
            uncached * price.input
            + output_tokens * price.output
            + cache_read_tokens * price.cache_read
            + cache_write_tokens * price.cache_write
        )
        return round(total / 1_000_000, 8)
