"""An org's policy: user keys allowed, what traces capture and keep, the redaction
patterns, whether members' Claude subscriptions pass through.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

from tvgate.identity import Principal
from tvgate.models import (
    Org,
    database,
)
from tvgate.rows import fields_of, from_row
from tvgate.services.access import (
    ServiceError,
    _actor_org,
    _changes,
    _require_admin,
    audit,
)
from tvgate.services.events import announce
from tvgate.traces.redact import MAX_PATTERNS, Redactor, invalid_patterns


@dataclass(frozen=True, slots=True)
class Policy:
    org: str
    allow_user_keys: bool
    allow_user_routes: bool
    capture_bodies: bool
    #: The (redacted) prompt and answer go into the calls' OpenTelemetry spans.
    span_content: bool
    #: Members' own Claude subscriptions may pass through to Anthropic (tvgate.proxy.subscription).
    subscription_passthrough: bool
    retention_days: int
    redaction_patterns: tuple[str, ...]
    #: Stored patterns the trace writer skips, each with why: saved by a tvgate that
    #: ran patterns on Python's ``re``, RE2 cannot run them (or they exceed its limits).
    invalid_redaction_patterns: tuple[tuple[str, str], ...]

    @classmethod
    def of(cls, org: Org) -> Policy:
        patterns = tuple(orjson.loads(org.redaction_patterns))
        return from_row(
            cls,
            org,
            org=org.name,
            redaction_patterns=patterns,
            invalid_redaction_patterns=tuple(invalid_patterns(patterns)),
        )

    def as_dict(self) -> dict[str, Any]:
        return fields_of(
            self,
            redaction_patterns=list(self.redaction_patterns),
            invalid_redaction_patterns=[
                {"pattern": pattern, "reason": reason}
                for pattern, reason in self.invalid_redaction_patterns
            ],
        )


def get_policy(org_name: str | None = None, *, actor: Principal | None = None) -> Policy:
    return Policy.of(_actor_org(actor, org_name))


def set_policy(
    org_name: str | None = None,
    *,
    allow_user_keys: bool | None = None,
    allow_user_routes: bool | None = None,
    capture_bodies: bool | None = None,
    span_content: bool | None = None,
    subscription_passthrough: bool | None = None,
    retention_days: int | None = None,
    redaction_patterns: list[str] | None = None,
    actor: Principal | None = None,
) -> Policy:
    """Org switches. Turning one off disables what users made under it (resolution skips it)
    without deleting it; turning it on again restores it."""
    org = _actor_org(actor, org_name)
    _require_admin(actor, org, "set policy", org.name)
    before = Policy.of(org).as_dict()
    if allow_user_keys is not None:
        org.allow_user_keys = allow_user_keys
    if allow_user_routes is not None:
        org.allow_user_routes = allow_user_routes
    if capture_bodies is not None:
        org.capture_bodies = capture_bodies
    if span_content is not None:
        org.span_content = span_content
    if subscription_passthrough is not None:
        org.subscription_passthrough = subscription_passthrough
    if retention_days is not None:
        if isinstance(retention_days, bool) or not 0 <= retention_days <= 36500:
            raise ServiceError("retention_days must be 0 (keep for ever) to 36500")
        org.retention_days = retention_days
    if redaction_patterns is not None:
        _check_redaction_patterns(actor, org, redaction_patterns)
        org.redaction_patterns = orjson.dumps(redaction_patterns).decode()
    with database.atomic():
        org.save()
        after = Policy.of(org).as_dict()
        audit(actor, org.id, "set policy", org.name, _changes(before, after))
    announce(org.id)
    return Policy.of(org)


def _check_redaction_patterns(actor: Principal | None, org: Org, patterns: list[str]) -> None:
    """Refuse (and audit) patterns the trace writer could not run in linear time: the
    Redactor compiles them with RE2, which names what it cannot run."""
    if len(patterns) > MAX_PATTERNS or not all(isinstance(p, str) for p in patterns):
        raise ServiceError(
            f"redaction_patterns must be a list of at most {MAX_PATTERNS} regular expressions"
        )
    try:
        Redactor(patterns=patterns)
    except ValueError as exc:
        audit(actor, org.id, "set policy", org.name, {"refused": str(exc)}, allowed=False)
        raise ServiceError(str(exc)) from None
