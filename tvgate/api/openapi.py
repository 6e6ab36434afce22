"""``GET /api/v1/openapi.json``: the OpenAPI 3.1 document of the JSON API."""

from __future__ import annotations

from typing import Any

import orjson
from tornado.web import RequestHandler

from tvgate import __version__
from tvgate.models import PROVIDERS, ROLES

_ERROR = {"$ref": "#/components/schemas/Error"}
_STR = {"type": "string"}
_NAME = {"type": "string", "minLength": 1, "maxLength": 200}


def _json(schema: dict[str, Any]) -> dict[str, Any]:
    return {"content": {"application/json": {"schema": schema}}}


def _op(
    summary: str, ok: str, body: dict[str, Any] | None = None, params: list[Any] | None = None
) -> dict[str, Any]:
    operation: dict[str, Any] = {
        "summary": summary,
        "responses": {
            ok: {"description": "success", **_json({"type": "object"})},
            "400": {"description": "bad input", **_json(_ERROR)},
            "401": {"description": "no or bad credential", **_json(_ERROR)},
            "403": {"description": "not allowed", **_json(_ERROR)},
            "404": {"description": "not found", **_json(_ERROR)},
            "409": {"description": "conflict", **_json(_ERROR)},
            "413": {"description": "body too large", **_json(_ERROR)},
            "503": {"description": "a backing service is unavailable", **_json(_ERROR)},
        },
    }
    if body is not None:
        operation["requestBody"] = {"required": True, **_json(body)}
    if params:
        operation["parameters"] = params
    return operation


def _path_param(name: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"name": name, "in": "path", "required": True, "schema": schema}


def _query(name: str, schema: dict[str, Any], required: bool = False) -> dict[str, Any]:
    return {"name": name, "in": "query", "required": required, "schema": schema}


#: What a route's create and patch share; create adds who the route is for.
_ROUTE_FIELDS: dict[str, Any] = {
    "name": _NAME,
    "key": _NAME,
    "upstream_model": {"type": "string", "maxLength": 200},
    "description": {"type": "string", "maxLength": 2000},
    "enabled": {"type": "boolean"},
    "fallbacks": {
        "type": "array",
        "items": _NAME,
        "maxItems": 5,
        "uniqueItems": True,
        "description": "route names tried in order when this route's provider fails",
    },
    "translate": {
        "type": "boolean",
        "description": "serve clients of the other provider's API by translation (default on)",
    },
}
_ROUTE_CREATE = {
    "type": "object",
    "required": ["name", "key"],
    "properties": {**_ROUTE_FIELDS, "for_user": _STR, "owner": _STR},
    "additionalProperties": False,
}
_ROUTE_PATCH = {
    "type": "object",
    "properties": _ROUTE_FIELDS,
    "additionalProperties": False,
}
_MAX_CONCURRENT = {
    "type": "integer",
    "minimum": 0,
    "maximum": 100000,
    "description": "calls open on the key at once, across every gateway process; 0: no cap",
}
_CHAT_ONLY = {
    "type": "boolean",
    "description": "an OpenAI-compatible upstream without the Responses API (vLLM, Ollama): "
    "Responses clients on its routes are translated to Chat Completions",
}
_KEY_CREATE = {
    "type": "object",
    "required": ["name", "provider", "secret"],
    "properties": {
        "name": _NAME,
        "provider": {"type": "string", "enum": list(PROVIDERS)},
        "secret": {
            "type": "string",
            "writeOnly": True,
            "minLength": 1,
            "description": "the provider key; a cloud's is a JSON object (azure: "
            '{"api_key"} or {"tenant_id", "client_id", "client_secret"}; vertex: the service '
            "account's JSON key file; bedrock: "
            '{"access_key_id", "secret_access_key", "session_token" (optional)} or {"api_key"})',
        },
        "base_url": _STR,
        "owner": _STR,
        "available_to_all": {"type": "boolean"},
        "max_concurrent": _MAX_CONCURRENT,
        "chat_only": _CHAT_ONLY,
        "settings": {
            "type": "object",
            "description": "a cloud key's settings, none secret (azure: style "
            "deployments|v1, api_version, authority; vertex: project, the Google Cloud "
            "project id, and region: us-east5, europe-west1, global ...; bedrock: region, "
            "us-east-1 ..., role_arn, external_id, sts_endpoint)",
            "properties": {
                "style": {"type": "string", "enum": ["deployments", "v1"]},
                "api_version": _STR,
                "authority": _STR,
                "project": _STR,
                "region": _STR,
                "role_arn": _STR,
                "external_id": _STR,
                "sts_endpoint": _STR,
            },
        },
    },
    "additionalProperties": False,
}
_SUBJECT = {
    "type": "string",
    "description": "a user's email, a route's or a key's name; ignored for the org",
}
_BUDGET_SET = {
    "type": "object",
    "required": ["metric", "period", "amount"],
    "properties": {
        "scope": {"type": "string", "enum": ["org", "user", "route", "key"], "default": "org"},
        "subject": _SUBJECT,
        "metric": {"type": "string", "enum": ["tokens", "usd"]},
        "period": {"type": "string", "enum": ["day", "month"]},
        "amount": {"type": "number", "minimum": 0, "maximum": 1e15},
        "warn_percent": {"type": "number", "minimum": 0, "maximum": 100, "default": 80},
    },
    "additionalProperties": False,
}
_PER_MINUTE = {"type": ["integer", "null"], "minimum": 1, "maximum": 2**31 - 1}
_LIMIT_SET = {
    "type": "object",
    "properties": {
        "scope": {"type": "string", "enum": ["org", "user", "route"], "default": "org"},
        "subject": _SUBJECT,
        "rpm": _PER_MINUTE,
        "tpm": _PER_MINUTE,
    },
    "additionalProperties": False,
}
_TOKEN_CREATE = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 200},
        "expires_days": {"type": "number", "exclusiveMinimum": 0},
        "user": _STR,
    },
    "additionalProperties": False,
}

DOCUMENT: dict[str, Any] = {
    "openapi": "3.1.0",
    "info": {
        "title": "tvgate API",
        "version": __version__,
        "description": "Routes, keys, users, org policy, budgets and rate limits, tokens and "
        "audit of a tvgate gateway. "
        "Authenticate with a tvgate proxy token, a Visdom Trace token or a JWT as a Bearer "
        "token; pick an org with X-Tvgate-Org when you are in several.",
    },
    "servers": [{"url": "/"}],
    "security": [{"bearer": []}],
    "components": {
        "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        "schemas": {
            "Error": {
                "type": "object",
                "required": ["error"],
                "properties": {
                    "error": {
                        "type": "object",
                        "required": ["status", "type", "message"],
                        "properties": {
                            "status": {"type": "integer"},
                            "type": {"type": "string"},
                            "message": {"type": "string"},
                        },
                    }
                },
            }
        },
    },
    "paths": {
        "/api/v1/me": {"get": _op("Who am I, in which org, under which policy", "200")},
        "/api/v1/routes": {
            "get": _op("Routes I may see", "200"),
            "post": _op("Create a route (org, for a user, or my own)", "201", _ROUTE_CREATE),
        },
        "/api/v1/routes/{route_id}": {
            "parameters": [_path_param("route_id", {"type": "integer"})],
            "get": _op("One route", "200"),
            "patch": _op("Change a route", "200", _ROUTE_PATCH),
            "delete": _op("Delete a route", "200"),
        },
        "/api/v1/resolve": {
            "get": _op(
                "The route a user would get for a name",
                "200",
                params=[_query("name", _NAME, required=True), _query("user", _STR)],
            )
        },
        "/api/v1/keys": {
            "get": _op("Key metadata (never a secret)", "200"),
            "post": _op("Add a key; the secret is write-only", "201", _KEY_CREATE),
        },
        "/api/v1/keys/{name}": {
            "parameters": [_path_param("name", _NAME)],
            "patch": _op(
                "Change who may use an org key, a key's concurrency cap, its base URL, or chat_only",
                "200",
                {
                    "type": "object",
                    "properties": {
                        "available_to_all": {"type": "boolean"},
                        "max_concurrent": _MAX_CONCURRENT,
                        "chat_only": _CHAT_ONLY,
                        "base_url": {
                            "type": "string",
                            "description": "where the key's calls go from now on; checked as "
                            "when a key is added (public https unless the operator allows "
                            "private upstreams, no query, fragment or credentials, never "
                            "this gateway); a user's own key's only by its owner",
                        },
                    },
                    "minProperties": 1,
                    "additionalProperties": False,
                },
            ),
        },
        "/api/v1/keys/{name}/grants": {
            "parameters": [_path_param("name", _NAME)],
            "post": _op(
                "Grant an org key to users (or revoke with revoke: true)",
                "200",
                {
                    "type": "object",
                    "required": ["users"],
                    "properties": {
                        "users": {"type": "array", "items": _STR, "minItems": 1},
                        "revoke": {"type": "boolean"},
                    },
                    "additionalProperties": False,
                },
            ),
        },
        "/api/v1/users": {
            "get": _op(
                "Users of the org (admins and auditors), with their calls through their own "
                "Claude subscription (subscription_calls, subscription_last_at)",
                "200",
            )
        },
        "/api/v1/users/{email}": {
            "parameters": [_path_param("email", _STR)],
            "patch": _op(
                "Change a user's role or disable them",
                "200",
                {
                    "type": "object",
                    "properties": {
                        "role": {"type": "string", "enum": list(ROLES)},
                        "disabled": {"type": "boolean"},
                    },
                    "additionalProperties": False,
                },
            ),
        },
        "/api/v1/policy": {
            "get": _op("The org's switches", "200"),
            "patch": _op(
                "Change the org's switches",
                "200",
                {
                    "type": "object",
                    "properties": {
                        "allow_user_keys": {"type": "boolean"},
                        "allow_user_routes": {"type": "boolean"},
                        "capture_bodies": {"type": "boolean"},
                        "span_content": {"type": "boolean"},
                        "subscription_passthrough": {"type": "boolean"},
                        "retention_days": {"type": "integer", "minimum": 0, "maximum": 36500},
                        "redaction_patterns": {"type": "array", "items": _STR, "maxItems": 100},
                    },
                    "additionalProperties": False,
                },
            ),
        },
        "/api/v1/visdom": {
            "get": _op(
                "The org's Visdom Trace ingestion: where, what was sent, parked events (admins)",
                "200",
            ),
            "put": _op(
                "Connect (or reconnect, releasing parked events) the org to Visdom Trace",
                "200",
                {
                    "type": "object",
                    "properties": {
                        "url": {"type": "string", "minLength": 1, "maxLength": 2000},
                        "key": {"type": "string", "pattern": "^tvk_[A-Za-z0-9_-]{16,200}$"},
                        "project": {"type": "string", "maxLength": 200},
                        "legacy_org_slug": {"type": "string", "maxLength": 200},
                    },
                    "required": ["url", "key"],
                    "additionalProperties": False,
                },
            ),
            "delete": _op("Stop sending the org's traces to Visdom Trace", "200"),
        },
        "/api/v1/audit": {
            "get": _op(
                "Audit events, newest first",
                "200",
                params=[
                    _query("before", {"type": "integer"}),
                    _query("limit", {"type": "integer"}),
                ],
            )
        },
        "/api/v1/budgets": {
            "get": _op("Budgets with this day's or month's use (admins and auditors)", "200"),
            "post": _op(
                "Set (create or replace) a budget of the org, a user, a route or a key",
                "200",
                _BUDGET_SET,
            ),
        },
        "/api/v1/budgets/{budget_id}": {
            "parameters": [_path_param("budget_id", {"type": "integer"})],
            "delete": _op("Delete a budget", "200"),
        },
        "/api/v1/limits": {
            "get": _op("Rate limits with this minute's use (admins and auditors)", "200"),
            "post": _op(
                "Set the requests and tokens per minute of the org, a user or a route "
                "(null lifts one; both null removes the limit)",
                "200",
                _LIMIT_SET,
            ),
        },
        "/api/v1/limits/{limit_id}": {
            "parameters": [_path_param("limit_id", {"type": "integer"})],
            "delete": _op("Delete a rate limit", "200"),
        },
        "/api/v1/me/budgets": {
            "get": _op("The budgets and rate limits that apply to my requests, with use", "200")
        },
        "/api/v1/tokens": {
            "get": _op(
                "Proxy tokens (mine; an admin may ask for a user's or all)",
                "200",
                params=[_query("user", _STR), _query("all", _STR)],
            ),
            "post": _op("Mint a proxy token, shown once", "201", _TOKEN_CREATE),
        },
        "/api/v1/traces": {
            "get": _op(
                "Traces, newest first (mine; the org's for admins and auditors)",
                "200",
                params=[
                    _query("user", _STR),
                    _query("route", _STR),
                    _query("tool", _STR),
                    _query("session", _STR),
                    _query("outcome", _STR),
                    _query("since", _STR),
                    _query("until", _STR),
                    _query("cursor", _STR),
                    _query("limit", {"type": "integer"}),
                ],
            )
        },
        "/api/v1/traces/{trace_id}": {
            "parameters": [_path_param("trace_id", _STR)],
            "get": _op("One trace, with its request and reassembled answer", "200"),
        },
        "/api/v1/sessions/{session_id}": {
            "parameters": [_path_param("session_id", _STR)],
            "get": _op(
                "A tool session's traces, oldest first, and its agents as a tree (main agent"
                " first, each followed by its subagents): parent, calls, usage and cost of each;"
                " of its first traces_limit (5000) calls, truncated true when it has more",
                "200",
            ),
        },
        "/api/v1/prices": {
            "get": _op(
                "The org's prices (USD per million tokens): its own (org set), else the"
                " gateway's default (org null)",
                "200",
            )
        },
        "/api/v1/prices/{model}": {
            "parameters": [_path_param("model", _NAME)],
            "put": _op(
                "Set a model's prices for the admin's own org (audited there); the default"
                " table is the operator's (tvgate prices set)",
                "200",
                {
                    "type": "object",
                    "additionalProperties": False,
                    "required": ["input_per_mtok", "output_per_mtok"],
                    "properties": {
                        name: {"type": "number", "minimum": 0, "maximum": 999999}
                        for name in (
                            "input_per_mtok",
                            "output_per_mtok",
                            "cache_read_per_mtok",
                            "cache_write_per_mtok",
                        )
                    },
                },
            ),
            "delete": _op(
                "Remove the org's own price of a model (admins): the default applies", "200"
            ),
        },
        "/api/v1/tokens/{token_id}": {
            "parameters": [_path_param("token_id", {"type": "integer"})],
            "delete": _op("Revoke a token", "200"),
        },
    },
}

_RENDERED = orjson.dumps(DOCUMENT)


class OpenAPIHandler(RequestHandler):
    def get(self) -> None:
        self.set_header("Content-Type", "application/json")
        self.finish(_RENDERED)


default_handlers = [(r"/api/v1/openapi.json", OpenAPIHandler)]
