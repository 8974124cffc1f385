"""Generated README sections stay in sync with their sources."""

from __future__ import annotations

import re

from app.settings import settings_table
from tests.conftest import ROOT


def _section(name: str) -> str:
    text = (ROOT / "README.md").read_text()
    match = re.search(rf"<!-- {name}:start -->\n(.*?)<!-- {name}:end -->", text, re.S)
    assert match, f"README.md lacks the {name} markers"
    return match.group(1).strip()


def test_settings_table_is_generated_from_the_model() -> None:
    assert _section("settings-table") == settings_table(), "run: python -m app.settings --update-readme"
