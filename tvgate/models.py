"""Peewee models: the tables tvgate keeps, and nothing else.

The database is bound at run time through ``database`` (a proxy), so the same
models serve SQLite and PostgreSQL. Times are seconds since the epoch as
doubles: cheap to write from the trace writer and the same on both engines.
Schema changes go through the numbered migrations in ``tvgate.db``.
"""

from __future__ import annotations

import time

import peewee

database = peewee.DatabaseProxy()

ROLE_ADMIN = "admin"
ROLE_MEMBER = "member"
ROLE_AUDITOR = "auditor"
ROLES = (ROLE_ADMIN, ROLE_MEMBER, ROLE_AUDITOR)

#: How a call ended: the ``outcome`` of its trace and of each attempt in it.
OUTCOME_OK = "ok"
OUTCOME_CLIENT_CANCELLED = "client_cancelled"
OUTCOME_UPSTREAM_ERROR = "upstream_error"
OUTCOME_TIMEOUT = "timeout"
OUTCOME_REJECTED = "rejected"
#: The gateway stopped (the drain timeout passed) before the call ended.
OUTCOME_GATEWAY_SHUTDOWN = "gateway_shutdown"
OUTCOMES = (
    OUTCOME_OK,
    OUTCOME_CLIENT_CANCELLED,
    OUTCOME_UPSTREAM_ERROR,
    OUTCOME_TIMEOUT,
    OUTCOME_REJECTED,
    OUTCOME_GATEWAY_SHUTDOWN,
)

PROVIDER_ANTHROPIC = "anthropic"
PROVIDER_OPENAI = "openai"
#: Azure OpenAI (issue 20): OpenAI's APIs under Azure's endpoints and credentials.
PROVIDER_AZURE = "azure"
#: Claude on Google Vertex AI: a service account's key, the project and region in settings.
PROVIDER_VERTEX = "vertex"
#: Claude on AWS Bedrock: an access key, an STS role or a Bedrock API key; region in settings.
PROVIDER_BEDROCK = "bedrock"
PROVIDERS = (
    PROVIDER_ANTHROPIC,
    PROVIDER_OPENAI,
    PROVIDER_AZURE,
    PROVIDER_VERTEX,
    PROVIDER_BEDROCK,
)

#: Route scopes: visible to the whole org, made by an admin for one user,
#: made by a user for themselves.
SCOPE_ORG = "org"
SCOPE_USER = "user"
SCOPE_OWNED = "owned"

#: A trace's ``client_credential`` when the call went out with the caller's own Claude
#: subscription instead of a provider key tvgate holds.
CLIENT_SUBSCRIPTION = "subscription"


def now() -> float:
    return time.time()


class BaseModel(peewee.Model):
    class Meta:
        database = database
        legacy_table_names = False


class Org(BaseModel):
    id = peewee.AutoField()

    name = peewee.CharField(max_length=200, unique=True)
    display_name = peewee.CharField(max_length=200, default="")
    #: The Visdom Trace org id this org is bound to: set when the org came from there, or by
    #: an operator's ``tvgate orgs link``; never by a matching name.
    external_id = peewee.CharField(max_length=64, null=True, unique=True)
    #: The JWT issuer (``iss``) and org claim value this org is bound to, the same way.
    jwt_issuer = peewee.CharField(max_length=400, null=True)
    jwt_org = peewee.CharField(max_length=200, null=True)
    allow_user_keys = peewee.BooleanField(default=False)
    allow_user_routes = peewee.BooleanField(default=False)
    capture_bodies = peewee.BooleanField(default=True)
    #: Prompts and answers (redacted) go into the calls' OpenTelemetry spans too.
    span_content = peewee.BooleanField(default=False)
    #: Members' own Claude subscriptions (an OAuth bearer) may pass through to Anthropic,
    #: the member named by ``x-tvgate-token`` (tvgate.proxy.subscription).
    subscription_passthrough = peewee.BooleanField(default=False)
    #: Days traces are kept; 0 keeps them for ever.
    retention_days = peewee.IntegerField(default=90)
    #: JSON list of extra regular expressions redacted from captured bodies.
    redaction_patterns = peewee.TextField(default="[]")
    created_at = peewee.DoubleField(default=now)

    class Meta:
        indexes = ((("jwt_issuer", "jwt_org"), True),)


class User(BaseModel):
    """One person's membership of one org (a person in two orgs has two rows)."""

    id = peewee.AutoField()
    org_id: int

    org = peewee.ForeignKeyField(Org, backref="users", on_delete="CASCADE")
    email = peewee.CharField(max_length=320)
    name = peewee.CharField(max_length=200, default="")
    role = peewee.CharField(max_length=16, default=ROLE_MEMBER)
    disabled = peewee.BooleanField(default=False)
    #: The outside user id (Visdom Trace's, or the JWT's user id claim) this user is bound to;
    #: once set, no other outside identity is ever let in as this user.
    external_id = peewee.CharField(max_length=64, null=True)
    password_hash = peewee.CharField(max_length=400, null=True)
    created_at = peewee.DoubleField(default=now)

    class Meta:
        indexes = ((("org", "email"), True),)


class ProviderKey(BaseModel):
    """A provider API key: only its ciphertext and last four characters are stored."""

    id = peewee.AutoField()
    org_id: int
    owner_id: int | None

    org = peewee.ForeignKeyField(Org, backref="keys", on_delete="CASCADE")
    name = peewee.CharField(max_length=200)
    provider = peewee.CharField(max_length=16)
    base_url = peewee.CharField(max_length=2000)
    ciphertext = peewee.TextField()
    fingerprint = peewee.CharField(max_length=8)
    #: The user who owns a private key; null for an admin-managed key.
    owner = peewee.ForeignKeyField(User, null=True, backref="own_keys", on_delete="CASCADE")
    disabled = peewee.BooleanField(default=False)
    #: For an admin-managed key: every user of the org may use it, or only those granted.
    available_to_all = peewee.BooleanField(default=True)
    created_by = peewee.ForeignKeyField(User, null=True, on_delete="SET NULL")
    created_at = peewee.DoubleField(default=now)
    updated_at = peewee.DoubleField(default=now)
    last_used_at = peewee.DoubleField(null=True)
    #: Calls that may be open on this key at once, across every gateway process; 0: no cap.
    max_concurrent = peewee.IntegerField(default=0)
    #: An OpenAI-compatible server that serves Chat Completions but not the Responses API
    #: (vLLM, Ollama): a Responses client (Codex) on its routes is translated to Chat.
    chat_only = peewee.BooleanField(default=False)
    #: A cloud key's settings that are not secret (region, project, API version...), a JSON
    #: object; its secret part is in ``ciphertext`` like any key's.
    settings = peewee.TextField(default="{}")

    class Meta:
        indexes = ((("org", "name"), True),)


class Route(BaseModel):
    """A name a tool asks for as its ``model``, mapped to a key and an upstream model."""

    id = peewee.AutoField()
    org_id: int
    key_id: int
    user_id: int | None

    org = peewee.ForeignKeyField(Org, backref="routes", on_delete="CASCADE")
    #: Exact name or glob pattern (``claude-haiku-*``).
    name = peewee.CharField(max_length=200)
    #: Model sent upstream; empty: the requested name is passed through.
    upstream_model = peewee.CharField(max_length=200, default="")
    key = peewee.ForeignKeyField(ProviderKey, backref="routes", on_delete="CASCADE")
    scope = peewee.CharField(max_length=8, default=SCOPE_ORG)
    #: For scope user: the user it was made for; for scope owned: its owner.
    user = peewee.ForeignKeyField(User, null=True, backref="routes", on_delete="CASCADE")
    enabled = peewee.BooleanField(default=True)
    description = peewee.TextField(default="")
    #: JSON list of route names tried in order when this route's provider fails
    #: (429, 529, 5xx or unreachable) before the first byte reached the client.
    fallbacks = peewee.TextField(default="[]")
    #: A client of another API than the route's provider is served by translation (off:
    #: such a client is refused with a 400).
    translate = peewee.BooleanField(default=True)
    created_at = peewee.DoubleField(default=now)
    updated_at = peewee.DoubleField(default=now)

    class Meta:
        indexes = ((("org", "name", "scope", "user"), True),)


class KeyGrant(BaseModel):
    """An admin-managed key made usable by one user (when it is not available to all)."""

    id = peewee.AutoField()
    key_id: int
    user_id: int

    key = peewee.ForeignKeyField(ProviderKey, backref="grants", on_delete="CASCADE")
    user = peewee.ForeignKeyField(User, backref="key_grants", on_delete="CASCADE")
    created_at = peewee.DoubleField(default=now)

    class Meta:
        indexes = ((("key", "user"), True),)


class AuditEvent(BaseModel):
    """Who did what, when, and the change: never a secret. Refusals are recorded too."""

    id = peewee.AutoField()
    org_id = peewee.IntegerField(index=True)
    at = peewee.DoubleField(default=now, index=True)
    #: The user who acted; null for an operator at the command line.
    actor_id = peewee.IntegerField(null=True)
    actor = peewee.CharField(max_length=320)
    action = peewee.CharField(max_length=64)
    target = peewee.CharField(max_length=400, default="")
    #: JSON: the fields that changed (before/after), or why the action was refused.
    change = peewee.TextField(default="{}")
    allowed = peewee.BooleanField(default=True)


class ProxyToken(BaseModel):
    """A ``tvg_`` token minted by tvgate; only its SHA-256 is stored."""

    id = peewee.AutoField()
    user_id: int

    user = peewee.ForeignKeyField(User, backref="tokens", on_delete="CASCADE")
    name = peewee.CharField(max_length=200, default="")
    token_hash = peewee.CharField(max_length=64, unique=True)
    #: First characters, so a person can tell tokens apart in a list.
    prefix = peewee.CharField(max_length=16)
    created_at = peewee.DoubleField(default=now)
    expires_at = peewee.DoubleField(null=True)
    last_used_at = peewee.DoubleField(null=True)
    revoked_at = peewee.DoubleField(null=True)
    #: The Visdom Trace session it was minted under, sealed by the keyring (bound to this
    #: row); null for a token minted otherwise. See ``tvgate.identity.origin``.
    visdom_session = peewee.TextField(null=True)
    #: When Visdom Trace last confirmed that session (its answer's time).
    visdom_checked_at = peewee.DoubleField(null=True)


class WebSession(BaseModel):
    """A signed-in browser: the cookie carries a random id, the table keeps its SHA-256."""

    id = peewee.AutoField()
    user_id: int

    session_hash = peewee.CharField(max_length=64, unique=True)
    user = peewee.ForeignKeyField(User, backref="sessions", on_delete="CASCADE")
    created_at = peewee.DoubleField(default=now)
    last_seen_at = peewee.DoubleField(default=now)
    address = peewee.CharField(max_length=64, default="")
    #: How the person signed in (a VIA_ kind of ``tvgate.identity``).
    via = peewee.CharField(max_length=16, default="")
    #: The pasted ``tvg_`` token it was opened with: it ends when that token does.
    token_id = peewee.IntegerField(null=True)
    #: When the credential it was opened with stops proving anything (a JWT's ``exp``).
    expires_at = peewee.DoubleField(null=True)
    #: The Visdom Trace session it was opened with, sealed by the keyring (bound to this row).
    visdom_session = peewee.TextField(null=True)
    visdom_checked_at = peewee.DoubleField(null=True)
    #: A proxy token just minted on a page, sealed by the keyring (bound to this row), until
    #: the page the form redirects to shows it once (tvgate.identity.sessions.take_once).
    flash = peewee.TextField(null=True)


class LoginFailure(BaseModel):
    """A failed web UI sign-in, kept for the throttle's window (``identity.sessions``).

    ``subject`` is the SHA-256 of the client address and the email typed, never the email
    itself: people type passwords into the email field.
    """

    id = peewee.AutoField()
    subject = peewee.CharField(max_length=64, index=True)
    failed_at = peewee.DoubleField(default=now, index=True)


class Trace(BaseModel):
    """One call through the proxy. Written by the trace writer only."""

    id = peewee.CharField(max_length=32, primary_key=True)
    org_id = peewee.IntegerField(index=True)
    user_id = peewee.IntegerField(null=True, index=True)
    route_name = peewee.CharField(max_length=200, default="")
    key_name = peewee.CharField(max_length=200, default="")
    provider = peewee.CharField(max_length=16, default="")
    endpoint = peewee.CharField(max_length=64)
    requested_model = peewee.CharField(max_length=200, default="")
    upstream_model = peewee.CharField(max_length=200, default="")
    response_model = peewee.CharField(max_length=200, default="")
    stream = peewee.BooleanField(default=False)
    status_code = peewee.IntegerField(default=0)
    outcome = peewee.CharField(max_length=24)
    error_type = peewee.CharField(max_length=100, default="")
    error_message = peewee.TextField(default="")
    received_at = peewee.DoubleField(index=True)
    first_byte_at = peewee.DoubleField(null=True)
    finished_at = peewee.DoubleField(null=True)
    overhead_ms = peewee.DoubleField(default=0.0)
    input_tokens = peewee.IntegerField(default=0)
    output_tokens = peewee.IntegerField(default=0)
    cache_read_tokens = peewee.IntegerField(default=0)
    cache_write_tokens = peewee.IntegerField(default=0)
    reasoning_tokens = peewee.IntegerField(default=0)
    bytes_in = peewee.IntegerField(default=0)
    bytes_out = peewee.IntegerField(default=0)
    tool = peewee.CharField(max_length=32, default="")
    tool_version = peewee.CharField(max_length=64, default="")
    session_id = peewee.CharField(max_length=200, default="", index=True)
    #: The client's agent within the session (Claude Code's ``X-Claude-Code-Agent-Id``, a
    #: subagent's) and the agent that started it; both empty for the session's main agent.
    agent_id = peewee.CharField(max_length=200, default="")
    parent_agent_id = peewee.CharField(max_length=200, default="")
    upstream_request_id = peewee.CharField(max_length=200, default="")
    message_id = peewee.CharField(max_length=200, default="")
    repo = peewee.CharField(max_length=200, default="")
    branch = peewee.CharField(max_length=200, default="")
    cost_usd = peewee.DoubleField(default=0.0)
    #: Root blob of the captured (redacted) request, byte-exact; empty when not captured.
    request_blob = peewee.CharField(max_length=64, default="")
    #: Blob of the reassembled (redacted) answer as JSON; empty when not captured.
    response_blob = peewee.CharField(max_length=64, default="")
    #: True when the stream was cut before its last event (what arrived is kept).
    truncated = peewee.BooleanField(default=False)
    #: JSON list of every upstream attempt when fallbacks were tried; empty for one attempt.
    attempts = peewee.TextField(default="")
    #: When the writer stored it: the push sink's cursor follows this, so traces written
    #: late (a spool replayed after an outage) are still sent.
    written_at = peewee.DoubleField(default=0.0, index=True)
    #: JSON list of what was wrong with the call's figures and how the writer mended
    #: them ("usage.input_tokens out of range", "truncated: response_model"); empty if nothing.
    anomalies = peewee.TextField(default="")
    #: The W3C ``traceparent`` the client sent (version 00, checked strictly); empty if none
    #: or malformed. The call's OpenTelemetry span is its child (tvgate.traces.otlp).
    traceparent = peewee.CharField(max_length=55, default="")
    #: Why the answer ended, as the provider said it (``stop_reason``, ``finish_reason``).
    finish_reason = peewee.CharField(max_length=64, default="")
    #: The host of the provider key's base URL the call went to.
    server_address = peewee.CharField(max_length=255, default="")
    #: How the client called: "" over HTTP, "websocket" for a Responses WebSocket
    #: (tvgate.proxy.websocket), where each ``response.create`` is one trace.
    transport = peewee.CharField(max_length=16, default="")
    #: Whose credential reached the provider: "" a key of tvgate's, CLIENT_SUBSCRIPTION the
    #: caller's own Claude subscription (never stored itself).
    client_credential = peewee.CharField(max_length=16, default="")


class Blob(BaseModel):
    """A piece of captured content, stored once per org, zstd-compressed, keyed by its digest."""

    id = peewee.AutoField()
    org_id = peewee.IntegerField()
    digest = peewee.CharField(max_length=64)
    data = peewee.BlobField()
    size = peewee.IntegerField()
    #: When a trace last referred to it (updated at most daily): retention deletes by it.
    referenced_at = peewee.DoubleField(default=now, index=True)

    class Meta:
        indexes = ((("org_id", "digest"), True),)


class ModelPrice(BaseModel):
    """USD per million tokens for models matching ``model`` (exact name or glob).

    A row with no org is the gateway-wide default, which only the operator changes; an
    org's own row prices that org's calls of the model instead. One row per pattern and
    org (unique indexes of migration 10: NULLs are distinct in a plain unique index).
    """

    id = peewee.AutoField()
    model = peewee.CharField(max_length=200)
    #: The org these prices are for; None: the default table, for every org.
    org_id = peewee.IntegerField(null=True)
    input_per_mtok = peewee.DoubleField()
    output_per_mtok = peewee.DoubleField()
    cache_read_per_mtok = peewee.DoubleField(default=0.0)
    cache_write_per_mtok = peewee.DoubleField(default=0.0)
    updated_at = peewee.DoubleField(default=now)


class SinkState(BaseModel):
    """The push sink's durable cursor, and which process holds the lease to push."""

    name = peewee.CharField(max_length=64, primary_key=True)
    cursor_at = peewee.DoubleField(default=0.0)
    cursor_id = peewee.CharField(max_length=32, default="")
    holder = peewee.CharField(max_length=200, default="")
    lease_until = peewee.DoubleField(default=0.0)


class WriterWatermark(BaseModel):
    """A trace writer's promise (tvgate.traces.watermark): every call of its worker that
    finished before ``upto`` is in the database. Refreshed with each batch and while idle;
    one not refreshed for a while belongs to a writer that is gone."""

    #: The writer process: host, worker number and pid.
    writer = peewee.CharField(max_length=200, primary_key=True)
    upto = peewee.DoubleField()
    updated_at = peewee.DoubleField()


class VisdomSink(BaseModel):
    """An org's Visdom Trace ingestion (tvgate.visdom): where, with which org ingest key
    (a ciphertext of the keyring, never readable back), and the pusher's lease and
    durable cursor over the org's traces."""

    org_id = peewee.IntegerField(primary_key=True)
    url = peewee.CharField(max_length=2000)
    project = peewee.CharField(max_length=200, default="")
    #: The multi-org server's org slug: events go to /api/v1/orgs/{slug}/repos/... then.
    legacy_slug = peewee.CharField(max_length=200, default="")
    ciphertext = peewee.TextField()
    fingerprint = peewee.CharField(max_length=8)
    connected_at = peewee.DoubleField(default=now)
    cursor_at = peewee.DoubleField(default=0.0)
    cursor_id = peewee.CharField(max_length=32, default="")
    holder = peewee.CharField(max_length=200, default="")
    lease_until = peewee.DoubleField(default=0.0)
    sent = peewee.BigIntegerField(default=0)
    #: Of ``sent``: how many went with their user's own Visdom Trace credential, and how
    #: many with the org ingest key.
    sent_user = peewee.BigIntegerField(default=0)
    sent_org = peewee.BigIntegerField(default=0)
    last_sent_at = peewee.DoubleField(null=True)
    #: The last failure to deliver (a retry or a park), for the status; "" after a success.
    last_error = peewee.TextField(default="")


class VisdomSession(BaseModel):
    """A tool session as the Visdom pusher knows it: its transcript offset, open tool
    uses and totals (tvgate.visdom.events.SessionState, as JSON)."""

    id = peewee.AutoField()
    org_id = peewee.IntegerField()
    session_id = peewee.CharField(max_length=200)
    repo = peewee.CharField(max_length=200, default="")
    #: The tvgate user of its latest call: whose credential its session_end goes with.
    user_id = peewee.IntegerField(null=True)
    state = peewee.TextField(default="")
    last_at = peewee.DoubleField(default=0.0)
    #: Started and not yet sealed by a session_end.
    open = peewee.BooleanField(default=False)

    class Meta:
        indexes = ((("org_id", "session_id"), True), (("org_id", "open", "last_at"), False))


class VisdomEvent(BaseModel):
    """An event made and not yet delivered: the outbox, in order (id) per session."""

    id = peewee.AutoField()
    org_id = peewee.IntegerField()
    session_id = peewee.CharField(max_length=200)
    repo = peewee.CharField(max_length=200, default="")
    #: The tvgate user of the call it was made from: whose credential it goes with.
    user_id = peewee.IntegerField(null=True)
    event_type = peewee.CharField(max_length=32)
    body = peewee.BlobField()
    created_at = peewee.DoubleField(default=now)
    attempts = peewee.IntegerField(default=0)
    #: Refused with a 4xx other than 429: held, with the later events of its session,
    #: until an admin reconnects.
    parked = peewee.BooleanField(default=False)
    error = peewee.TextField(default="")

    class Meta:
        indexes = ((("org_id", "parked", "id"), False),)


class VisdomCredential(BaseModel):
    """A user's own Visdom Trace credential in an org (tvgate.visdom.credentials): the
    ``tvs_`` session or Keycloak access token their calls came with, sealed by the
    keyring (bound to the org and user), with when it stops being good. ``ciphertext``
    empty: Visdom Trace refused it, and ``fingerprint`` keeps it from being kept again."""

    id = peewee.AutoField()
    org_id = peewee.IntegerField()
    user_id = peewee.IntegerField()
    #: ``tvs`` (30-day sliding expiry) or ``jwt`` (its ``exp``).
    kind = peewee.CharField(max_length=8)
    ciphertext = peewee.TextField(default="")
    #: SHA-256 of the token, to tell whether a call came with the one kept (never the token).
    fingerprint = peewee.CharField(max_length=64)
    expires_at = peewee.DoubleField()
    stored_at = peewee.DoubleField(default=now)

    class Meta:
        indexes = ((("org_id", "user_id"), True),)


#: Governance scopes: what a budget or a rate limit applies to.
GOVERN_ORG = "org"
GOVERN_USER = "user"
GOVERN_ROUTE = "route"
GOVERN_KEY = "key"
BUDGET_SCOPES = (GOVERN_ORG, GOVERN_USER, GOVERN_ROUTE, GOVERN_KEY)
LIMIT_SCOPES = (GOVERN_ORG, GOVERN_USER, GOVERN_ROUTE)
METRIC_TOKENS = "tokens"
METRIC_USD = "usd"
PERIOD_DAY = "day"
PERIOD_MONTH = "month"


class Budget(BaseModel):
    """A cap on tokens or cost per UTC day or month, for an org, a user, a route or a key."""

    id = peewee.AutoField()
    org_id: int

    org = peewee.ForeignKeyField(Org, backref="budgets", on_delete="CASCADE")
    scope = peewee.CharField(max_length=8)
    #: "" for the org; the user's id for a user; the route's or key's name.
    subject = peewee.CharField(max_length=200, default="")
    metric = peewee.CharField(max_length=8)
    period = peewee.CharField(max_length=8)
    amount = peewee.DoubleField()
    #: Percent of the budget from which answers carry a warning header.
    warn_percent = peewee.DoubleField(default=80.0)
    updated_at = peewee.DoubleField(default=now)

    class Meta:
        indexes = ((("org", "scope", "subject", "metric", "period"), True),)


class RateLimit(BaseModel):
    """Requests and tokens per minute for an org, a user or a route (null: no limit)."""

    id = peewee.AutoField()
    org_id: int

    org = peewee.ForeignKeyField(Org, backref="rate_limits", on_delete="CASCADE")
    scope = peewee.CharField(max_length=8)
    subject = peewee.CharField(max_length=200, default="")
    rpm = peewee.IntegerField(null=True)
    tpm = peewee.IntegerField(null=True)
    updated_at = peewee.DoubleField(default=now)

    class Meta:
        indexes = ((("org", "scope", "subject"), True),)


class UsageCounter(BaseModel):
    """A shared counter for one window (see ``tvgate.governance.windows``), summed by every
    gateway process in batches."""

    key = peewee.CharField(max_length=300, primary_key=True)
    value = peewee.DoubleField(default=0.0)
    #: End of the window: the counter is useless after it, and purged.
    expires_at = peewee.DoubleField(index=True)
    #: Budgets only: a call needing ``closed_need`` was refused here when the budget's
    #: amount was ``closed_limit``. Until the window ends no call needing as much is
    #: admitted (calls of one size never see an admission after a refusal), unless the
    #: budget is raised above that amount.
    closed_limit = peewee.DoubleField(null=True)
    closed_need = peewee.DoubleField(null=True)


class ConcurrencySlot(BaseModel):
    """Calls one gateway process holds open on a capped resource (a key, the gateway)."""

    resource = peewee.CharField(max_length=100)
    holder = peewee.CharField(max_length=100)
    slots = peewee.IntegerField(default=0)
    #: Refreshed by the holder; a holder silent for the slot TTL (it died) holds nothing.
    heartbeat_at = peewee.DoubleField()

    class Meta:
        primary_key = peewee.CompositeKey("resource", "holder")


class BudgetHold(BaseModel):
    """Budget headroom one gateway process holds at a counter (``UsageCounter.key``): for
    calls it admitted and has not settled, and for its next ones. The counter's ``value``
    is settled usage alone; what is left of a budget is its amount minus both."""

    key = peewee.CharField(max_length=300)
    holder = peewee.CharField(max_length=100)
    amount = peewee.DoubleField(default=0.0)
    #: Refreshed by the holder; a holder silent for the slot TTL (it died) holds nothing.
    heartbeat_at = peewee.DoubleField()

    class Meta:
        primary_key = peewee.CompositeKey("key", "holder")


class OrgChange(BaseModel):
    """How often each org's routes, keys, policy, rules and users have changed. Every
    gateway process polls it and drops what it cached of an org whose counts moved
    (``tvgate.services.events``); one row per org, read whole."""

    org_id = peewee.IntegerField(primary_key=True)
    serial = peewee.BigIntegerField(default=0)
    #: Of those, the changes to users' roles and state, and to tokens.
    identities = peewee.BigIntegerField(default=0)


class SchemaVersion(BaseModel):
    version = peewee.IntegerField(primary_key=True)
    applied_at = peewee.DoubleField(default=now)
