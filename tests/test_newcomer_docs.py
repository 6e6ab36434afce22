"""A newcomer's first hour (issue 22, items 9 and 12): the UI's Connect block says what the
README says, the first start and the migrations say what they did in a line, and the
package declares the UI's data folders."""

from __future__ import annotations

import html
import re
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx2
from setuptools.config.setupcfg import read_configuration

from tests.conftest import ROOT, GatewayProcess, gateway_env, start_gateway, stop_gateway
from tvgate.db import MIGRATIONS


def _readme_claude_code_variables() -> set[str]:
    readme = (ROOT / "README.md").read_text()
    block = readme.split("**Claude Code**", 1)[1].split("```sh\n", 1)[1].split("```", 1)[0]
    return set(re.findall(r"^export (ANTHROPIC_\w+)=", block, re.M))


def _xsrf(page: httpx2.Response) -> str:
    found = re.search(r'name="_xsrf" value="([^"]+)"', page.text)
    assert found is not None, page.text
    return found.group(1)


@contextmanager
def _signed_in(gateway: GatewayProcess, token: str) -> Iterator[httpx2.Client]:
    """A browser signed in to the UI with a pasted token; redirects are not followed."""
    with httpx2.Client(base_url=gateway.url, timeout=30) as client:
        form = {"_xsrf": _xsrf(client.get("/ui/login")), "token": token}
        signed = client.post("/ui/login", data=form)
        assert signed.status_code == 302 and signed.headers["location"] == "/ui/", signed.text
        yield client


def _ui_claude_code_snippets(gateway: GatewayProcess, token: str) -> list[str]:
    with _signed_in(gateway, token) as client:
        page = client.get("/ui/me")
    assert page.status_code == 200, page.text
    found = re.findall(
        r'<pre class="config" id="config-claude-code-\d+">(.*?)</pre>', page.text, re.S
    )
    return [html.unescape(text) for text in found]


def test_ui_connect_block_sets_the_claude_code_variables_of_the_readme(
    gateway: GatewayProcess,
) -> None:
    readme = _readme_claude_code_variables()
    assert {"ANTHROPIC_BASE_URL", "ANTHROPIC_MODEL", "ANTHROPIC_DEFAULT_HAIKU_MODEL"} <= readme
    shell, settings_json = _ui_claude_code_snippets(gateway, gateway.tokens["dev@acme.test"])
    assert set(re.findall(r"^export (ANTHROPIC_\w+)=", shell, re.M)) == readme
    # The settings file takes the token from apiKeyHelper, the rest as in the README.
    in_file = set(re.findall(r'"(ANTHROPIC_\w+)":', settings_json))
    assert in_file == readme - {"ANTHROPIC_AUTH_TOKEN"}
    # Each names a route the user has (acme's dev has no haiku route: the main one).
    models = re.findall(r"ANTHROPIC_(?:DEFAULT_HAIKU_)?MODEL[=\":\s]+([\w.-]+)", shell)
    available = httpx2.get(
        gateway.url + "/v1/models",
        headers={"x-api-key": gateway.tokens["dev@acme.test"]},
        timeout=10,
    ).json()["data"]
    assert len(models) == 2 and set(models) <= {m["id"] for m in available}, models


def test_first_start_logs_the_migrations_applied_in_one_line(tmp_path: Path) -> None:
    env = gateway_env(f"sqlite:///{tmp_path / 'tvgate.db'}", tmp_path, 0)
    log_path = tmp_path / "serve.log"
    proc = start_gateway(env, log_path)
    stop_gateway(proc)
    log = log_path.read_text()
    lines = [line for line in log.splitlines() if "applied migration" in line]
    versions = ", ".join(str(version) for version, _step in MIGRATIONS)
    assert len(lines) == 1, lines
    assert f"applied migrations {versions}" in lines[0], lines


def test_the_ui_data_folders_are_packages_of_the_distribution() -> None:
    """setuptools warned about every file of admin_ui/static and admin_ui/templates, on
    every install, that it lies in no package; declared, they are package data."""
    options = read_configuration(ROOT / "setup.cfg")["options"]
    packages = set(options["packages"])
    for folder in ("static", "templates"):
        assert any((ROOT / "admin_ui" / folder).iterdir())
        assert f"admin_ui.{folder}" in packages, sorted(packages)
        assert options["package_data"].get(f"admin_ui.{folder}"), options["package_data"]
    assert not any("__pycache__" in name for name in packages), sorted(packages)


def test_a_token_minted_in_the_ui_is_shown_once_after_a_redirect(gateway: GatewayProcess) -> None:
    """Post/redirect/get: the page does not sit on the POST URL (a reload would mint
    again), and the token is in no URL or cookie and never shown twice."""
    with _signed_in(gateway, gateway.tokens["dev@acme.test"]) as client:
        form = {"_xsrf": _xsrf(client.get("/ui/me")), "name": "prg-" + uuid.uuid4().hex[:8]}
        posted = client.post("/ui/me/tokens", data=form)
        assert posted.status_code == 302, (posted.status_code, posted.text[:300])
        location = posted.headers["location"]
        assert location == "/ui/me?ok=token-minted"
        assert "tvg_" not in posted.text and "tvg_" not in str(posted.headers)
        shown = client.get(location)
        assert shown.status_code == 200
        found = re.search(r'id="token-value">(tvg_[^<]+)<', shown.text)
        assert found is not None, shown.text
        token = found.group(1)
        assert all(token not in value for value in client.cookies.values())
        assert token not in client.get(location).text  # a reload: gone
        assert token not in gateway.dump_database()  # held sealed, then cleared
    models = httpx2.get(gateway.url + "/v1/models", headers={"x-api-key": token}, timeout=10)
    assert models.status_code == 200, models.text
