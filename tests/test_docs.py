"""The README keeps its promises: the two set-up commands first, and every setting documented."""

from __future__ import annotations

import dataclasses

from tests.conftest import ROOT
from tvgate.config import Settings


def test_readme_opens_with_the_two_commands() -> None:
    opening = (ROOT / "README.md").read_text().splitlines()[:20]
    commands = [line.split("#")[0].strip() for line in opening if line.startswith("make ")]
    assert commands == ["make run", "make test"]


def test_every_setting_is_in_the_readme() -> None:
    readme = (ROOT / "README.md").read_text()
    for field in dataclasses.fields(Settings):
        assert f"`TVGATE_{field.name.upper()}`" in readme, field.name
