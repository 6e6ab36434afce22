"""Tests of tvgate.traces.redact: every kind, JSON kept valid, no false positives, admin patterns."""

from __future__ import annotations

import json
import re
import time
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tvgate.traces.redact import (
    MATCH_REACH,
    MAX_MATCHES,
    MAX_PATTERN_LENGTH,
    Redactor,
    builtin_kinds,
    invalid_patterns,
)

ANTHROPIC = "sk-ant-api03-" + "Qx7_-Lm2" * 11 + "AA"
OPENAI_LEGACY = "sk-" + "T3BlbkFJ" + "aB9cD8eF7gH6iJ5kL4mN3oP2qR1sT0uV9wX8yZ7a6b5c"
OPENAI_PROJECT = "sk-proj-" + "Zq4-Rt8_Lp2M" * 12
GITHUB_CLASSIC = "ghp_" + "16C7e42F292c6912E7710c838347Ae178B4a"
GITHUB_OAUTH = "gho_" + "aB3dE5fG7hI9jK1lM3nO5pQ7rS9tU1vW3xY5"
GITHUB_FINE = "github_pat_11ABCDEFG0" + "abcdefghijkl_" + "Z9" * 29
AWS_ID = "AKIAIOSFODNN7EXAMPLE"
AWS_SESSION_ID = "ASIAY34FZKBOKMUTVV7A"
AWS_SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
PEM = (
    "-----BEGIN RSA PRIVATE KEY-----\n"
    "MIIEpAIBAAKCAQEA3Tz2mr7SZiAMfQyuvBjM9Oi+VQ5DvqhJ1Rz8Xr9Ym1J2a0yB\n"
    "Proc-Type: 4,ENCRYPTED\n"
    "DEK-Info: AES-128-CBC,5E0D1E1F0B7B2B3C\n"
    "q3Q8yqj7+Xc1cW9nAqQ2dGVzdA==\n"
    "-----END RSA PRIVATE KEY-----"
)
OPENSSH = (
    "-----BEGIN OPENSSH PRIVATE KEY-----\r\n"
    "b3BlbnNzaC1rZXktdjEAAAAABG5vbmUAAAAEbm9uZQAAAAAAAAABAAAAMwAAAAtzc2gtZW\r\n"
    "-----END OPENSSH PRIVATE KEY-----"
)

SECRETS = {
    ANTHROPIC: "anthropic-key",
    OPENAI_LEGACY: "openai-key",
    OPENAI_PROJECT: "openai-key",
    GITHUB_CLASSIC: "github-token",
    GITHUB_OAUTH: "github-token",
    GITHUB_FINE: "github-token",
    AWS_ID: "aws-access-key-id",
    AWS_SESSION_ID: "aws-access-key-id",
    PEM: "private-key",
    OPENSSH: "private-key",
}

REDACTOR = Redactor()


def marker(kind: str) -> str:
    return f"[REDACTED:{kind}]"


def redact_json(document: Any, redactor: Redactor = REDACTOR) -> tuple[bytes, Any]:
    """Dump, redact, check the result still parses; return both forms."""
    out = redactor.redact(orjson.dumps(document))
    return out, orjson.loads(out)


def test_builtin_kinds() -> None:
    assert builtin_kinds() == [
        "anthropic-key",
        "openai-key",
        "github-token",
        "aws-access-key-id",
        "aws-secret-access-key",
        "private-key",
    ]


@pytest.mark.parametrize("secret", list(SECRETS), ids=list(SECRETS.values()))
@pytest.mark.parametrize(
    "template",
    [
        "{}",
        "key: {}",
        "{} is the key",
        "line one\n{}\nline three",
        'he said "{}"',
        "tab\t{}\tand \\ backslash",
        "{} and {} twice",
        "caf\u00e9 \u2603 {} \U0001f600",
        "export KEY='{}'",
        "Authorization: Bearer {}",
    ],
)
def test_each_kind_inside_json_strings(secret: str, template: str) -> None:
    text = template.format(secret, secret)
    kind = SECRETS[secret]
    document = {
        "messages": [{"role": "user", "content": [{"type": "text", "text": text}]}],
        "system": text,
    }
    out, parsed = redact_json(document)
    assert secret.encode() not in out
    expected = template.format(marker(kind), marker(kind))
    assert parsed["messages"][0]["content"][0]["text"] == expected
    assert parsed["system"] == expected
    assert REDACTOR.redact_text(text) == expected


@pytest.mark.parametrize("secret", list(SECRETS), ids=list(SECRETS.values()))
def test_each_kind_inside_json_inside_json(secret: str) -> None:
    """Tool call arguments are JSON in a JSON string: the secret sits behind two escapes."""
    arguments = json.dumps({"command": f"curl -H 'x-api-key: {secret}'\n", "env": {"K": secret}})
    out, parsed = redact_json({"tool_calls": [{"function": {"arguments": arguments}}]})
    assert secret.encode() not in out
    inner = json.loads(parsed["tool_calls"][0]["function"]["arguments"])
    assert inner["env"]["K"] == marker(SECRETS[secret])
    assert inner["command"] == f"curl -H 'x-api-key: {marker(SECRETS[secret])}'\n"


def test_several_secrets_in_one_string() -> None:
    text = f"{ANTHROPIC},{OPENAI_PROJECT};{GITHUB_CLASSIC} {AWS_ID}\n{PEM}\n{GITHUB_FINE}"
    _, parsed = redact_json({"content": text})
    assert parsed["content"] == (
        "[REDACTED:anthropic-key],[REDACTED:openai-key];[REDACTED:github-token] "
        "[REDACTED:aws-access-key-id]\n[REDACTED:private-key]\n[REDACTED:github-token]"
    )


@pytest.mark.parametrize(
    "labelled",
    [
        "aws_secret_access_key = {}",
        "AWS_SECRET_ACCESS_KEY={}",
        'export AWS_SECRET_ACCESS_KEY="{}"',
        "aws_secret_key: {}",
        "secretAccessKey => '{}'",
        '{{"SecretAccessKey": "{}"}}',
        "[default]\naws_access_key_id = AKIAIOSFODNN7EXAMPLE\naws_secret_access_key = {}\n",
    ],
)
def test_aws_secret_when_labelled(labelled: str) -> None:
    text = labelled.format(AWS_SECRET)
    out, parsed = redact_json({"content": text, "nested": json.dumps({"t": text})})
    assert AWS_SECRET.encode() not in out
    assert marker("aws-secret-access-key") in parsed["content"]
    assert (
        parsed["content"]
        .replace(marker("aws-secret-access-key"), AWS_SECRET)
        .replace(marker("aws-access-key-id"), AWS_ID)
        == text
    )
    assert marker("aws-secret-access-key") in json.loads(parsed["nested"])["t"]


def test_aws_secret_as_a_json_member() -> None:
    _, parsed = redact_json({"Credentials": {"SecretAccessKey": AWS_SECRET, "Other": 1}})
    assert parsed == {
        "Credentials": {"SecretAccessKey": marker("aws-secret-access-key"), "Other": 1}
    }


def test_private_key_cut_short_is_still_masked() -> None:
    text = "here:\n-----BEGIN PRIVATE KEY-----\nMIIEvQIBADANBgkqhkiG9w0BAQEFAASC\nMIIEvQIBA"
    out, parsed = redact_json({"content": text})
    assert b"MIIEvQ" not in out
    assert parsed["content"] == "here:\n[REDACTED:private-key]"


NOT_SECRETS = [
    "task-sk-list and risk-sk-assessment-abcdefghijklmnopqrstu",
    "from sklearn import svm; sk-learn-compatible-estimator-wrapper-thing",
    "sk-folding-cube-animation-wrapper-v2-2023",  # one case: a CSS class, not a key
    "desk-ABCDEFGHIJKLMNOPQRSTUVWxyz1234567890",  # 'sk-' inside a word
    "sk-ant-short",
    "ghp_tooShort123",
    "XAKIAIOSFODNN7EXAMPLEX and AKIAIOSFODNN7EXAMPL",
    "the secret access key is 40 chars: nope",
    "secret = wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",  # unlabelled: not an AWS label
    "a bare base64 wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
    "-----BEGIN PUBLIC KEY-----\nMIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8A\n-----END PUBLIC KEY-----",
    "-----BEGIN CERTIFICATE-----\nMIIDdzCCAl+gAwIBAgIEAgAAuTANBgkq\n-----END CERTIFICATE-----",
    "def get_github_pat(): return os.environ['GITHUB_PAT']",
    "git checkout -b task/sk-1234-fix-login-page-redirect-loop",
]


@pytest.mark.parametrize("text", NOT_SECRETS)
def test_ordinary_text_is_untouched(text: str) -> None:
    raw = orjson.dumps({"content": text, "code": f"x = '{text}'"})
    assert REDACTOR.redact(raw) is raw
    assert REDACTOR.redact_text(text) is text


def test_org_literal_keys() -> None:
    own = "AIzaSyA-1234567890abcdefghijklmnop"  # any shape: matched exactly
    quoted = 'weird"key\\with\u00e9-and-more'
    redactor = Redactor(literals=[own, quoted, "short", ""])
    document = {
        "a": f"use {own}.",
        "b": own,
        "c": f"x{quoted}y",
        "d": "short stays",
        "e": ANTHROPIC,
    }
    for raw in (orjson.dumps(document), json.dumps(document).encode()):  # UTF-8 and \\u
        out = redactor.redact(raw)
        parsed = orjson.loads(out)
        assert parsed == {
            "a": "use [REDACTED:provider-key].",
            "b": "[REDACTED:provider-key]",
            "c": "x[REDACTED:provider-key]y",
            "d": "short stays",
            "e": "[REDACTED:anthropic-key]",
        }
    assert redactor.redact_text(f"({own})") == "([REDACTED:provider-key])"


def test_org_literal_wins_over_the_builtin_kind() -> None:
    redactor = Redactor(literals=[ANTHROPIC])
    assert redactor.redact_text(f"k={ANTHROPIC}") == "k=[REDACTED:provider-key]"


def test_literal_starting_on_an_escape_letter_keeps_json_valid() -> None:
    redactor = Redactor(literals=["nABCDEFGH12345"])
    out = redactor.redact(b'{"a":"x\\nABCDEFGH12345 y"}')
    assert orjson.loads(out) == {"a": "x[REDACTED:provider-key] y"}


def test_admin_pattern() -> None:
    redactor = Redactor(patterns=[r"acme-[0-9]{8}", r"[\w.%+-]+@acme\.example"])
    _, parsed = redact_json(
        {
            "content": "ticket acme-12345678 from jane.doe+x@acme.example, not acme-1234",
            "n": 12345678,
        },
        redactor,
    )
    assert parsed == {
        "content": "ticket [REDACTED:custom] from [REDACTED:custom], not acme-1234",
        "n": 12345678,
    }


@pytest.mark.parametrize(
    ("pattern", "reason"),
    [
        ("acme-[0-9", r"not RE2 syntax: missing \]"),
        ("(unclosed", r"not RE2 syntax: missing \)"),
        ("a{2,1}", "invalid repetition size"),
        ("x*", "matches the empty string"),
        ("(?:)", "matches the empty string"),
        ("", "is empty"),
        ("a" * (MAX_PATTERN_LENGTH + 1), "characters long"),
        (r"(secret)-\1", r"invalid escape sequence: \\1"),
        (r"(?<=key=)\w+", r"invalid perl operator: \(\?<="),
        (r"(?!x)y", r"invalid perl operator: \(\?!"),
        (r"id=(?>[a-z]+-)+x", r"invalid perl operator: \(\?>"),
        (r"end\w++", r"bad repetition operator: \+\+"),
        (r"\pL{10}", "RE2 instructions; the limit is 1000"),
        ("x\ud800", "lone surrogate"),
    ],
)
def test_bad_admin_patterns_are_refused(pattern: str, reason: str) -> None:
    with pytest.raises(ValueError, match=reason) as error:
        Redactor(patterns=["fine-[0-9]+", pattern])
    shown = pattern.encode("utf-8", "backslashreplace").decode()  # lone surrogates escaped
    assert "pattern 2" in str(error.value) and f"`{shown}`" in str(error.value)
    assert invalid_patterns(["fine-[0-9]+", pattern]) == [
        (pattern, str(error.value).split("` ", 1)[1])
    ]


@pytest.mark.parametrize(
    ("pattern", "text", "expected"),
    [
        # Exponential or quadratic on a backtracking engine; linear on RE2.
        ("(a|a)*b", "a" * 50_000 + " xb", "a" * 50_000 + " x[REDACTED:custom]"),
        (r"(a+)+$", "a" * 50_000 + "!", "a" * 50_000 + "!"),
        (r"\w*\w*\w*\w*!", "w" * 50_000 + " hey!", "w" * 50_000 + " [REDACTED:custom]"),
        (r"(?:x|y+)*z", "y" * 50_000, "y" * 50_000),
        (r"[^ ]*private", "p" * 50_000 + " my private", "p" * 50_000 + " my [REDACTED:custom]"),
    ],
)
def test_patterns_a_backtracking_engine_hangs_on_run_on_re2(
    pattern: str, text: str, expected: str
) -> None:
    _, parsed = redact_json({"text": text}, Redactor(patterns=[pattern]))
    assert parsed == {"text": expected}


def test_matches_across_search_windows_are_all_found() -> None:
    """Searches read windows of 2 * MATCH_REACH bytes: a match on a window's edge, or
    one that goes on past it, is found whole."""
    text = "." * (3 * MATCH_REACH)
    for offset in (MATCH_REACH - 3, 2 * MATCH_REACH - 1, 2 * MATCH_REACH + 7):
        text = text[:offset] + "acme-12345678" + text[offset + 13 :]
    long_match = "L" + "x" * (MATCH_REACH + 100) + "R"
    text += long_match
    redactor = Redactor(patterns=[r"acme-\d{8}", r"L[x]+R"])
    assert redactor.redact_text(text) == (
        text.replace("acme-12345678", "[REDACTED:custom]").replace(long_match, "[REDACTED:custom]")
    )


def test_past_max_matches_the_rest_of_the_body_is_masked() -> None:
    """Matches are looked for one by one up to MAX_MATCHES (all patterns together); after
    them everything inside strings is masked, rather than searched on or let through."""
    redactor = Redactor(patterns=["q", "z"])
    raw = orjson.dumps({"a": "q" * (MAX_MATCHES - 1) + "zz tail", "b": "c", "n": 1})
    masked = b"[REDACTED:custom]"
    assert redactor.redact(raw) == b'{"a":"%s","%s":"%s","%s":1}' % (
        masked * (MAX_MATCHES + 1),
        masked,
        masked,
        masked,
    )


@pytest.mark.parametrize(
    "pattern",
    [
        r'"\s*:',  # a quote and a colon: structure
        r"\\.",  # half of every escape
        r"[\x80-\xff]",  # half of a UTF-8 character
        r"\d+",  # numbers outside strings too
        r'e",',  # a string's end and the comma after it
        r"(?s).{3}",  # everything, three bytes at a time
        r"true|null|false",  # JSON literals
        r"u00",  # inside \u escapes
    ],
)
def test_admin_patterns_never_break_json(pattern: str) -> None:
    redactor = Redactor(patterns=[pattern])
    document = {
        "text": 'caf\u00e9 "quoted" back\\slash\nnew\tline \u0001 \U0001f600 null 42 nope',
        "number": 12345,
        "list": [True, None, False, 1.5e3, "e"],
        "nested": json.dumps({"a": "b\nc"}),
    }
    for raw in (
        orjson.dumps(document),
        json.dumps(document).encode(),  # ASCII only: \\u escapes
        json.dumps(document, indent=2).encode(),
    ):
        out = redactor.redact(raw)
        parsed = orjson.loads(out)  # still JSON
        assert isinstance(parsed, dict)
        if raw == orjson.dumps(document):
            assert out != raw  # every pattern here matches something in a string
        # Structural JSON (numbers, literals) is never replaced; keys may be.
        if "number" in parsed:
            assert parsed["number"] == 12345
        if "list" in parsed:
            assert parsed["list"][:4] == [True, None, False, 1500.0]


def test_admin_pattern_numbers_outside_strings_stay() -> None:
    redactor = Redactor(patterns=[r"\d{5}"])
    out = redactor.redact(b'{"id":12345,"text":"order 12345"}')
    assert orjson.loads(out) == {"id": 12345, "text": "order [REDACTED:custom]"}


def test_admin_pattern_across_a_string_end_keeps_only_string_parts() -> None:
    redactor = Redactor(patterns=[r'secret-value", "next'])
    out = redactor.redact(b'{"a": "my secret-value", "next": 1}')
    assert orjson.loads(out) == {"a": "my [REDACTED:custom]", "[REDACTED:custom]": 1}


@pytest.mark.parametrize("noise", [0, 10, 100_000])
def test_aws_secret_among_many_secret_words(noise: int) -> None:
    """Few `secret` words are checked one by one, many by one search of a lower-cased copy."""
    text = "a Secret, " * noise + f"AWS_SECRET_ACCESS_KEY={AWS_SECRET} " + "SECRET " * noise
    assert REDACTOR.redact_text(text) == text.replace(AWS_SECRET, marker("aws-secret-access-key"))


@pytest.mark.parametrize(
    "raw",
    [
        b"sk-" * 300_000,
        b"sk-ant-" * 200_000,
        b"ghp_" * 300_000,
        b"AKIA" * 300_000,
        b"-----BEGIN PRIVATE KEY-----" * 40_000,
        b"secret_access_key=" * 60_000,
        b"\\" * 500_000,
    ],
    ids=["sk", "sk-ant", "ghp", "akia", "pem", "aws-label", "backslashes"],
)
def test_hostile_bodies_redact_in_linear_time(raw: bytes) -> None:
    redactor = Redactor(literals=["sk-ant-api03-literal-key"], patterns=[r"acme-\d{8}"])
    began = time.process_time()
    redactor.redact(raw)
    assert time.process_time() - began < 5  # well under a second when linear


def test_redact_text_plain_and_with_surrogates() -> None:
    text = f"lone \ud800 surrogate then {GITHUB_CLASSIC}"
    assert Redactor().redact_text(text) == "lone \ud800 surrogate then [REDACTED:github-token]"
    redactor = Redactor(patterns=[r"\.{3}"])
    assert (
        redactor.redact_text('plain "text"... and more') == 'plain "text"[REDACTED:custom] and more'
    )


def test_non_string_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="must be a string"):
        Redactor(patterns=[re.compile("x")])  # type: ignore[list-item]
    with pytest.raises(TypeError):
        Redactor(literals=[b"sk-ant-bytes-key-0000"])  # type: ignore[list-item]


# --- property tests -----------------------------------------------------------------

TRICKY = st.text(
    alphabet=st.sampled_from(list('ab -_\n\t"\\/{}:,\u00e9\U0001f600\x01')), max_size=12
)
KEYS = st.sampled_from([*SECRETS, AWS_SECRET])
SEPARATORS = ["", " ", "\n", '"', "\\", ":", ",", "{", "\t", "'", "="]
SEPARATORS = ["", " ", "\n", '"', "\\", ":", ",", "{", "\t", "'", "="]


@st.composite
def documents_with_secrets(draw: st.DrawFn) -> tuple[Any, list[str]]:
    secrets = draw(st.lists(KEYS, min_size=1, max_size=4))
    strings = []
    for secret in secrets:
        label = "aws_secret_access_key=" if secret == AWS_SECRET else ""
        # A separator that is no token character, or nothing at a string's ends.
        before, after = (draw(st.sampled_from(SEPARATORS)) for _ in range(2))
        prefix = draw(TRICKY) + before if before else ""
        suffix = after + draw(TRICKY) if after else ""
        strings.append(prefix + label + secret + suffix)
    filler = draw(st.lists(TRICKY, max_size=4))
    values: list[Any] = strings + filler
    draw(st.randoms()).shuffle(values)
    shape = draw(st.sampled_from(["list", "object", "json-in-json"]))
    document: Any
    if shape == "list":
        document = {"messages": values}
    elif shape == "object":
        document = {f"k{i}": value for i, value in enumerate(values)}
    else:
        document = {"arguments": json.dumps({"values": values})}
    return document, secrets


@settings(max_examples=300, deadline=None)
@given(case=documents_with_secrets(), ascii_only=st.booleans(), indent=st.sampled_from([None, 2]))
def test_secrets_anywhere_leave_valid_json_without_them(
    case: tuple[Any, list[str]], ascii_only: bool, indent: int | None
) -> None:
    document, secrets = case
    raw = json.dumps(document, ensure_ascii=ascii_only, indent=indent).encode()
    out = REDACTOR.redact(raw)
    parsed = orjson.loads(out)
    flat = json.dumps(parsed)
    for secret in secrets:
        # The secret is gone in every escaping the body could carry it in.
        assert secret.encode() not in out
        assert json.dumps(secret)[1:-1] not in flat
    assert "[REDACTED:" in flat


ADMIN = Redactor(patterns=[r'"\s*:', r"\\.", r"[\x80-\xff]{1,2}", r"\d+", r"b.a", r"(?s).\\"])


@settings(max_examples=300, deadline=None)
@given(
    value=st.recursive(
        st.none()
        | st.booleans()
        | st.integers()
        | st.floats(allow_nan=False, allow_infinity=False)
        | TRICKY,
        lambda children: (
            st.lists(children, max_size=4) | st.dictionaries(TRICKY, children, max_size=4)
        ),
        max_leaves=20,
    ),
    ascii_only=st.booleans(),
)
def test_hostile_admin_patterns_keep_any_json_valid(value: Any, ascii_only: bool) -> None:
    raw = json.dumps(value, ensure_ascii=ascii_only).encode()
    orjson.loads(ADMIN.redact(raw))
