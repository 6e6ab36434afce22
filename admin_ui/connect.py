""" "Connect your tool": copy-ready configuration for each AI coding tool, for this server.

Every snippet uses the placeholder ``$TVGATE_TOKEN`` (or ``tvg_YOUR_TOKEN`` where a
file cannot read the environment), never a real token: pages show a token once, when it
is minted, and nowhere else.
"""

from __future__ import annotations

from dataclasses import dataclass

# Names and placeholders, not secrets.
TOKEN_VAR = "TVGATE_TOKEN"  # noqa: S105
TOKEN_PLACEHOLDER = "tvg_YOUR_TOKEN"  # noqa: S105


@dataclass(frozen=True, slots=True)
class Snippet:
    caption: str
    text: str


@dataclass(frozen=True, slots=True)
class ToolConfig:
    id: str
    name: str
    note: str
    snippets: tuple[Snippet, ...]


def tool_configs(
    base_url: str, claude_route: str, claude_small_route: str, openai_route: str
) -> list[ToolConfig]:
    """Configurations for ``base_url`` (no trailing slash) and the user's route names;
    ``claude_small_route`` is for the small model Claude Code asks for in the background
    (``ANTHROPIC_DEFAULT_HAIKU_MODEL``, as in the README's Claude Code block)."""
    v1 = base_url + "/v1"
    https = base_url.startswith("https://")
    return [
        ToolConfig(
            "claude-code",
            "Claude Code",
            "Either set the environment, or keep the token in a file only you can read "
            "and let Claude Code ask for it with apiKeyHelper.",
            (
                Snippet(
                    "Shell (e.g. ~/.bashrc)",
                    f"export {TOKEN_VAR}={TOKEN_PLACEHOLDER}\n"
                    f"export ANTHROPIC_BASE_URL={base_url}\n"
                    f'export ANTHROPIC_AUTH_TOKEN="${TOKEN_VAR}"\n'
                    f"export ANTHROPIC_MODEL={claude_route}\n"
                    f"export ANTHROPIC_DEFAULT_HAIKU_MODEL={claude_small_route}\n",
                ),
                Snippet(
                    "~/.claude/settings.json (token in ~/.config/tvgate/token, mode 600)",
                    "{\n"
                    '  "apiKeyHelper": "cat ~/.config/tvgate/token",\n'
                    '  "env": {\n'
                    f'    "ANTHROPIC_BASE_URL": "{base_url}",\n'
                    f'    "ANTHROPIC_MODEL": "{claude_route}",\n'
                    f'    "ANTHROPIC_DEFAULT_HAIKU_MODEL": "{claude_small_route}"\n'
                    "  }\n"
                    "}\n",
                ),
            ),
        ),
        ToolConfig(
            "codex",
            "Codex CLI",
            f"Codex reads the token from the environment variable {TOKEN_VAR}.",
            (
                Snippet(
                    "~/.codex/config.toml",
                    f'model = "{openai_route}"\n'
                    'model_provider = "tvgate"\n\n'
                    "[model_providers.tvgate]\n"
                    'name = "tvgate"\n'
                    f'base_url = "{v1}"\n'
                    f'env_key = "{TOKEN_VAR}"\n'
                    'wire_api = "responses"\n',
                ),
            ),
        ),
        ToolConfig(
            "cursor",
            "Cursor",
            "Cursor sends requests from its own servers, not from your machine: tvgate must "
            "be reachable from the internet over https for Cursor to use it"
            + ("." if https else f" ({base_url} is not https)."),
            (
                Snippet(
                    "Settings → Models → API Keys",
                    f"OpenAI API Key:            {TOKEN_PLACEHOLDER}\n"
                    f"Override OpenAI Base URL:  {v1}\n"
                    f"Add model:                 {openai_route}\n",
                ),
            ),
        ),
        ToolConfig(
            "gsd2",
            "GSD2",
            f"apiKey names the environment variable that holds the token ({TOKEN_VAR}).",
            (
                Snippet(
                    "~/.gsd/agent/models.json",
                    "{\n"
                    '  "providers": {\n'
                    '    "tvgate": {\n'
                    f'      "baseUrl": "{base_url}",\n'
                    '      "api": "anthropic-messages",\n'
                    f'      "apiKey": "{TOKEN_VAR}",\n'
                    f'      "models": [{{"id": "{claude_route}"}}]\n'
                    "    }\n"
                    "  }\n"
                    "}\n",
                ),
            ),
        ),
        ToolConfig(
            "aider",
            "Aider",
            "",
            (
                Snippet(
                    "Shell",
                    f"export ANTHROPIC_API_KEY=${TOKEN_VAR}\n"
                    f"export ANTHROPIC_API_BASE={base_url}\n"
                    f"aider --model anthropic/{claude_route}\n\n"
                    "# or through the OpenAI-compatible API\n"
                    f"aider --openai-api-base {v1} --openai-api-key ${TOKEN_VAR} "
                    f"--model openai/{openai_route}\n",
                ),
            ),
        ),
        ToolConfig(
            "continue",
            "Continue",
            "",
            (
                Snippet(
                    "~/.continue/config.yaml",
                    "models:\n"
                    f"  - name: tvgate {claude_route}\n"
                    "    provider: anthropic\n"
                    f"    model: {claude_route}\n"
                    f"    apiBase: {v1}/\n"
                    f"    apiKey: {TOKEN_PLACEHOLDER}\n",
                ),
            ),
        ),
        ToolConfig(
            "cline",
            "Cline",
            "",
            (
                Snippet(
                    "Cline settings",
                    "API Provider:     Anthropic\n"
                    f"API Key:          {TOKEN_PLACEHOLDER}\n"
                    f"Custom base URL:  {base_url}\n"
                    f"Model:            {claude_route}\n",
                ),
            ),
        ),
        ToolConfig(
            "opencode",
            "opencode",
            "",
            (
                Snippet(
                    "opencode.json",
                    "{\n"
                    '  "$schema": "https://opencode.ai/config.json",\n'
                    '  "provider": {\n'
                    '    "tvgate": {\n'
                    '      "npm": "@ai-sdk/anthropic",\n'
                    '      "name": "tvgate",\n'
                    f'      "options": {{"baseURL": "{v1}", "apiKey": "{{env:{TOKEN_VAR}}}"}},\n'
                    f'      "models": {{"{claude_route}": {{}}}}\n'
                    "    }\n"
                    "  }\n"
                    "}\n",
                ),
            ),
        ),
        ToolConfig(
            "curl",
            "Test with curl",
            "",
            (
                Snippet(
                    "Shell",
                    f"curl {v1}/messages \\\n"
                    f'  -H "x-api-key: ${TOKEN_VAR}" \\\n'
                    '  -H "anthropic-version: 2023-06-01" \\\n'
                    '  -H "content-type: application/json" \\\n'
                    f'  -d \'{{"model": "{claude_route}", "max_tokens": 64, '
                    '"messages": [{"role": "user", "content": "Say hello"}]}\'\n',
                ),
            ),
        ),
    ]
