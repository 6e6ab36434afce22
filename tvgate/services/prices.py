"""The model price table that turns tokens into dollars: the defaults every org starts
from, and an org's own overrides.
"""

from __future__ import annotations

import time
from typing import Any

import orjson
import peewee

from tvgate.identity import Principal
from tvgate.models import (
    ROLE_ADMIN,
    AuditEvent,
    ModelPrice,
    Org,
    database,
)
from tvgate.services.access import (
    OPERATOR,
    Forbidden,
    NotFound,
    ServiceError,
    _actor_org,
    _check_name,
    _deny,
    audit,
)

#: A price's fields, USD per million tokens.
PRICE_FIELDS = ("input_per_mtok", "output_per_mtok", "cache_read_per_mtok", "cache_write_per_mtok")


#: Those every price must give (the cache prices are 0 unless given).
REQUIRED_PRICE_FIELDS = PRICE_FIELDS[:2]


def _price_dict(price: ModelPrice, org: Org | None) -> dict[str, Any]:
    """A price as shown; ``org`` is None for the default table's."""
    return {
        "model": price.model,
        "org": org.name if org is not None and price.org_id == org.id else None,
        **{name: getattr(price, name) for name in PRICE_FIELDS},
    }


def list_prices(
    org_name: str | None = None, *, default_table: bool = False, actor: Principal | None = None
) -> list[dict[str, Any]]:
    """The prices an org's calls are charged: its own, then the default table's for the
    models it has no price of. ``default_table`` (operator): the default table alone."""
    if default_table and actor is None:
        return [_price_dict(p, None) for p in _default_prices()]
    org = _actor_org(actor, org_name)
    own = {p.model: p for p in ModelPrice.select().where(ModelPrice.org_id == org.id)}
    defaults = [p for p in _default_prices() if p.model not in own]
    return [_price_dict(p, org) for p in sorted([*own.values(), *defaults], key=lambda p: p.model)]


def _default_prices() -> list[ModelPrice]:
    return list(ModelPrice.select().where(ModelPrice.org_id.is_null()).order_by(ModelPrice.model))


def _check_prices(prices: dict[str, Any]) -> dict[str, float]:
    unknown = sorted(set(prices) - set(PRICE_FIELDS))
    if unknown:
        raise ServiceError(
            f"unknown price field(s): {', '.join(unknown)}; prices are set for your own org"
            f" (give {', '.join(PRICE_FIELDS)})"
        )
    # A price without its input or output figure would charge $0 for it, silently.
    missing = [name for name in REQUIRED_PRICE_FIELDS if name not in prices]
    if missing:
        raise ServiceError(f"missing price field(s): {', '.join(missing)} (USD per million tokens)")
    values = {}
    for name in PRICE_FIELDS:
        value = prices.get(name, 0.0)
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < 1e6:
            raise ServiceError(f"{name} must be a number of dollars per million tokens")
        values[name] = float(value)
    return values


def set_price(
    model: str,
    prices: dict[str, Any],
    *,
    org_name: str | None = None,
    actor: Principal | None = None,
) -> dict[str, Any]:
    """Set a model's prices (USD per million tokens) for one org: an admin for their own
    org, audited there. The operator (no actor) sets an org's with ``org_name``, and
    without it the default table, which every org without a price of its own pays."""
    if actor is not None and actor.role != ROLE_ADMIN:
        raise _deny(actor, "set price", model, Forbidden("only an admin may change prices"))
    _check_name(model, "a price")
    values = _check_prices(prices)
    if actor is None and org_name is None:
        return _set_default_price(model, values)
    org = _actor_org(actor, org_name)
    with database.atomic():
        ModelPrice.insert(model=model, org_id=org.id, updated_at=time.time(), **values).on_conflict(
            conflict_target=[ModelPrice.org_id, ModelPrice.model],
            update={**values, "updated_at": time.time()},
        ).execute()
        audit(actor, org.id, "set price", model, values)
    return {"model": model, "org": org.name, **values}


def _set_default_price(model: str, values: dict[str, float]) -> dict[str, Any]:
    """The operator's default price, audited in every org it changes: those without a price
    of their own for this pattern (one row each, in one statement)."""
    with database.atomic():
        ModelPrice.insert(model=model, org_id=None, updated_at=time.time(), **values).on_conflict(
            conflict_target=[ModelPrice.model],
            conflict_where=ModelPrice.org_id.is_null(),
            update={**values, "updated_at": time.time()},
        ).execute()
        overridden = ModelPrice.select(ModelPrice.org_id).where(
            (ModelPrice.model == model) & ModelPrice.org_id.is_null(False)
        )
        affected = Org.select(Org.id).where(Org.id.not_in(overridden))
        change = orjson.dumps(values).decode()
        AuditEvent.insert_from(
            affected.select_extend(
                peewee.Value(OPERATOR),
                peewee.Value("set default price"),
                peewee.Value(model[:400]),
                peewee.Value(change),
                peewee.Value(True),
                peewee.Value(time.time()),
            ),
            [
                AuditEvent.org_id,
                AuditEvent.actor,
                AuditEvent.action,
                AuditEvent.target,
                AuditEvent.change,
                AuditEvent.allowed,
                AuditEvent.at,
            ],
        ).execute()
    return {"model": model, "org": None, **values}


def delete_price(
    model: str, *, org_name: str | None = None, actor: Principal | None = None
) -> None:
    """Remove an org's own price of a model (it pays the default again): an admin for their
    own org, audited there. The default table's rows are kept (the operator resets them)."""
    if actor is not None and actor.role != ROLE_ADMIN:
        raise _deny(actor, "delete price", model, Forbidden("only an admin may change prices"))
    org = _actor_org(actor, org_name)
    with database.atomic():
        deleted = (
            ModelPrice.delete()
            .where((ModelPrice.org_id == org.id) & (ModelPrice.model == model))
            .execute()
        )
        if not deleted:
            raise NotFound(f"org {org.name!r} has no price of its own for {model!r}")
        audit(actor, org.id, "delete price", model)
