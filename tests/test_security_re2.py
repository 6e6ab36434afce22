"""Review 16.2: an org admin's redaction patterns must not freeze a worker for every org.

Each test runs its own ``tvgate serve`` over its own database (SQLite and PostgreSQL),
because the attack, on a gateway without the fix, stops that process from answering.
Patterns run through RE2 (linear time whatever they are); what RE2 cannot run is refused
with its reason, on the API, the admin pages and the command line, and such a pattern
stored before is skipped by the trace writer and shown as invalid.
"""

from __future__ import annotations

import contextlib
import html
import json
import re
import threading
import uuid
from collections.abc import Iterator
from typing import Any

import anthropic
import httpx2
import pytest

from tests.conftest import (
    GatewayProcess,
)
from tvgate.models import Org, database
from tvgate.traces.redact import MAX_MATCHES

MARKER = "[REDACTED:custom]"

#: What the review's PATCH sent: under a backtracking engine, the probe that checked it
#: ran for minutes holding the GIL.
EXPONENTIAL = r"\w*\w*\w*\w*!"
#: Ambiguous alternation: accepted by the old checks, exponential on a run of `a`s.
AMBIGUOUS = "(a|a)*b"
#: Quadratic when every match is searched for again from where the last one ended: each
#: search reads to the end of the text in case `q.*z` matches after all. (No `q` in the
#: request's JSON keys, which a pattern matches too.)
LOOKS_AHEAD = "q.*z|q"


def admin_headers(gw: GatewayProcess) -> dict[str, str]:
    return {"Authorization": f"Bearer {gw.tokens['admin@acme.test']}"}


def patch_patterns(gw: GatewayProcess, patterns: list[str]) -> httpx2.Response:
    return httpx2.patch(
        gw.url + "/api/v1/policy",
        json={"redaction_patterns": patterns},
        headers=admin_headers(gw),
        timeout=60,
    )


def healthy(gw: GatewayProcess) -> bool:
    return httpx2.get(gw.url + "/healthz", timeout=10).status_code == 200


def send_prompt(gw: GatewayProcess, prompt: str) -> str:
    """One call through the proxy as a member; returns its session id."""
    session = uuid.uuid4().hex
    anthropic.Anthropic(
        base_url=gw.url,
        api_key=gw.tokens["dev@acme.test"],
        max_retries=0,
        timeout=60,
        default_headers={"x-tvgate-session": session},
    ).messages.create(
        model="claude-test", max_tokens=8, messages=[{"role": "user", "content": prompt}]
    )
    return session


def stored_prompt(gw: GatewayProcess, session: str) -> str:
    """The prompt of the session's one trace as stored (waits for the writer)."""
    (trace,) = gw.wait_traces(1, timeout=60, session_id=session)
    document = httpx2.get(
        f"{gw.url}/api/v1/traces/{trace.id}", headers=admin_headers(gw), timeout=60
    )
    assert document.status_code == 200, document.text
    content = document.json()["request"]["messages"][0]["content"]
    assert isinstance(content, str)
    return content


def test_the_reviews_patch_answers_while_healthz_keeps_answering(
    own_gateway: GatewayProcess,
) -> None:
    answer: dict[str, Any] = {}

    def patch() -> None:
        answer["response"] = patch_patterns(own_gateway, [EXPONENTIAL])

    patching = threading.Thread(target=patch, daemon=True)
    patching.start()
    # The event loop keeps answering all the while the pattern is checked.
    while patching.is_alive():
        assert healthy(own_gateway)
        patching.join(0.05)
    response = answer["response"]
    # RE2 runs it in linear time: accepted as it is.
    assert response.status_code == 200, response.text
    assert response.json()["redaction_patterns"] == [EXPONENTIAL]
    assert response.json()["invalid_redaction_patterns"] == []
    # And it redacts, in a long body too.
    session = send_prompt(own_gateway, "w" * 200_000 + " shout!")
    assert stored_prompt(own_gateway, session) == "w" * 200_000 + " [REDACTED:custom]"
    assert healthy(own_gateway)


@pytest.mark.parametrize(("pattern", "letter"), [(AMBIGUOUS, "a"), (LOOKS_AHEAD, "q")])
def test_patterns_backtracking_would_hang_on_are_traced_and_redacted(
    own_gateway: GatewayProcess, pattern: str, letter: str
) -> None:
    response = patch_patterns(own_gateway, [pattern])
    assert response.status_code == 200, response.text
    # 40 `a`s hang a backtracking engine on (a|a)*b for ages; a megabyte of `q`s made
    # q.*z|q quadratic. Each trace arriving, redacted, is the proof that the writer ran.
    for run in (40, 1_000_000):
        session = send_prompt(own_gateway, letter * run + " then xb")
        stored = stored_prompt(own_gateway, session)
        if pattern == AMBIGUOUS:
            # No match in the run (no b after it); the one near the end is masked.
            assert stored == "a" * run + " then x[REDACTED:custom]"
        elif run <= MAX_MATCHES:
            assert stored == MARKER * run + " then xb"  # every q matches
        else:
            # Past the matches looked for one by one, the rest of the body is masked.
            assert stored == MARKER * (MAX_MATCHES + 1)
        assert healthy(own_gateway)


@pytest.mark.parametrize(
    ("pattern", "reason"),
    [
        (r"(secret)-\1", r"invalid escape sequence: \1"),
        (r"(?<![\w.-])\w+@acme\.example", "invalid perl operator: (?<"),
        (r"token=\w++", "bad repetition operator: ++"),
    ],
)
def test_a_pattern_re2_cannot_run_is_refused_with_its_reason(
    own_gateway: GatewayProcess, pattern: str, reason: str
) -> None:
    response = patch_patterns(own_gateway, ["acme-[0-9]{8}", pattern])
    assert response.status_code == 400, response.text
    message = response.json()["error"]["message"]
    assert pattern in message and reason in message and "pattern 2" in message
    # Nothing was saved, and the refusal is in the audit log.
    policy = httpx2.get(own_gateway.url + "/api/v1/policy", headers=admin_headers(own_gateway))
    assert policy.json()["redaction_patterns"] == []
    audit = httpx2.get(own_gateway.url + "/api/v1/audit", headers=admin_headers(own_gateway))
    refused = [e for e in audit.json()["events"] if not e["allowed"]]
    assert refused and refused[0]["action"] == "set policy"


@contextlib.contextmanager
def signed_in(gw: GatewayProcess) -> Iterator[tuple[httpx2.Client, str]]:
    """A browser signed in to the admin pages as acme's admin, and its XSRF token."""
    with httpx2.Client(base_url=gw.url, timeout=30) as client:
        login = client.get("/ui/login")
        xsrf = re.search(r'name="_xsrf" value="([^"]+)"', login.text)
        assert xsrf is not None
        response = client.post(
            "/ui/login", data={"_xsrf": xsrf.group(1), "token": gw.tokens["admin@acme.test"]}
        )
        assert response.status_code == 302
        yield client, xsrf.group(1)


def test_the_policy_page_shows_re2s_refusal(own_gateway: GatewayProcess) -> None:
    pattern = r"(secret)-\1"
    with signed_in(own_gateway) as (client, xsrf):
        page = client.post(
            "/ui/policy",
            data={
                "_xsrf": xsrf,
                "retention_days": "30",
                "capture_bodies": "on",
                "redaction_patterns": f"acme-[0-9]{{8}}\n{pattern}\n",
            },
        )
    assert page.status_code == 400
    assert pattern in page.text and r"invalid escape sequence: \1" in page.text


def test_the_cli_refuses_what_re2_cannot_run(own_gateway: GatewayProcess) -> None:
    refused = own_gateway.cli(
        "policy", "set", "--org", "acme", "--redaction-pattern", r"(secret)-\1"
    )
    assert refused.returncode != 0
    assert r"invalid escape sequence: \1" in refused.stderr
    accepted = own_gateway.cli("policy", "set", "--org", "acme", "--redaction-pattern", AMBIGUOUS)
    assert accepted.returncode == 0, accepted.stderr
    assert json.loads(accepted.stdout)["redaction_patterns"] == [AMBIGUOUS]


def test_stored_patterns_re2_rejects_are_skipped_and_shown_invalid(
    own_gateway: GatewayProcess,
) -> None:
    lookbehind = r"(?<![\w.-])[\w.-]+@acme\.example"
    # As an older tvgate, which ran patterns on Python's re, may have stored them.
    own_gateway.bind()
    Org.update(redaction_patterns=json.dumps([lookbehind, "acme-[0-9]{8}"])).where(
        Org.name == "acme"
    ).execute()
    database.close()
    for _ in range(2):
        session = send_prompt(own_gateway, "ticket acme-12345678 from jane@acme.example")
        # The valid pattern still redacts; the invalid one is skipped, not fatal.
        assert stored_prompt(own_gateway, session) == (
            "ticket [REDACTED:custom] from jane@acme.example"
        )
    logged = [json.loads(line) for line in own_gateway.log_text().splitlines()]
    warnings = [entry for entry in logged if lookbehind in entry["msg"]]
    assert len(warnings) == 1, warnings
    assert warnings[0]["level"] == "warning" and "invalid perl operator" in warnings[0]["msg"]
    policy = httpx2.get(own_gateway.url + "/api/v1/policy", headers=admin_headers(own_gateway))
    (invalid,) = policy.json()["invalid_redaction_patterns"]
    assert invalid["pattern"] == lookbehind
    assert "invalid perl operator: (?<!" in invalid["reason"]
    # The policy page shows it as not applied, with RE2's reason.
    with signed_in(own_gateway) as (client, _):
        page = client.get("/ui/policy")
    shown = page.text[page.text.index('id="invalid-patterns"') :]
    assert html.escape(lookbehind) in shown and html.escape("(?<!") in shown
