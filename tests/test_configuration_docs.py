"""docs/configuration.md is the generated reference of every setting, current and leak-free.

The reference is generated from the settings class (``src.config.reference``), so a setting added
or changed in ``src/config/settings/base.py`` is one command away from documented; this test is
what makes sure that command is run. The document is published, so no secret default may appear
in it, whatever the class or the environment of whoever generated it holds.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from pydantic import Field, SecretStr
from pydantic.fields import FieldInfo

from src.config.reference import (
    REGENERATE,
    REQUIRED_IN_PRODUCTION,
    SECRET_SET,
    UNSET,
    bounds_text,
    default_text,
    read_source,
    render,
    settings_source,
    type_text,
)
from src.config.settings import Settings

DOC = Path(__file__).resolve().parents[1] / "docs" / "configuration.md"
# A table row of the reference: | `NAME` | type | default | bounds | explanation |
ROW = re.compile(r"^\| `(?P<name>[A-Z][A-Z0-9_]*)` \|")
SECRET_DEFAULTS = {UNSET, f"{UNSET}; {REQUIRED_IN_PRODUCTION}", SECRET_SET, "required"}


def _rows(text: str) -> dict[str, list[str]]:
    """Setting name -> its cells (type, default, bounds, explanation), pipes unescaped."""
    rows = {}
    for line in text.splitlines():
        match = ROW.match(line)
        if match:
            cells = [cell.strip() for cell in re.split(r"(?<!\\)\|", line)[1:-1]]
            rows[match.group("name")] = [cell.replace("\\|", "|") for cell in cells[1:]]
    return rows


def _is_secret(name: str) -> bool:
    return "SecretStr" in str(Settings.model_fields[name].annotation)


def test_the_document_is_generated_from_the_current_settings() -> None:
    assert DOC.exists(), f"docs/configuration.md is missing: generate it with `{REGENERATE}`"
    assert DOC.read_text(encoding="utf-8") == render(), (
        f"docs/configuration.md is out of date with src/config/settings/base.py: "
        f"regenerate it with `{REGENERATE}`"
    )


def test_every_setting_has_one_row_with_its_type_default_and_bounds() -> None:
    rows = _rows(DOC.read_text(encoding="utf-8"))
    assert sorted(rows) == sorted(Settings.model_fields), f"regenerate with `{REGENERATE}`"
    assert rows["LOG_LEVEL"][:3] == ['one of "DEBUG" | "INFO" | "WARNING" | "ERROR"', "`INFO`", ""]
    assert rows["HEALTH_CHECK_TIMEOUT"][:3] == ["float", "`0.8`", "> 0, < 1"]
    assert rows["WEB_CONCURRENCY"][:3] == ["int", "`1`", "≥ 1, ≤ 64"]
    assert rows["DATA_DIR"][:2] == ["path", "`./data`"]
    assert rows["SMTP_CA_FILE"][:2] == ["optional path", UNSET]
    assert rows["REDIS_ENABLED"][:2] == ["bool", "`true`"]


def test_explanations_and_sections_come_from_the_comments_of_base_py() -> None:
    source = read_source(settings_source())
    titles = [section.title for section in source.sections]
    assert titles[:2] == ["service", "database"]
    assert "secrets at rest" in titles
    section_of = {name: s.title for s in source.sections for name in s.names}
    assert section_of["DATABASE_URL"] == "database" and section_of["REDIS_HOST"].startswith("Redis")
    # Comments directly above a field are its explanation; a field right below another has none.
    assert source.comments["REDIS_RETRIES"].startswith("A cache should give up quickly")
    assert "REDIS_HOST" not in source.comments
    # A section header is never part of the explanation below it.
    assert not source.comments["STEP_UP_MAX_AGE_SECONDS"].startswith("---")
    text = DOC.read_text(encoding="utf-8")
    assert "## Database\n" in text and "## Secrets at rest\n" in text
    assert REGENERATE in text.split("\n## ", 1)[0], "the header says how to regenerate"


def test_no_secret_default_is_shown() -> None:
    rows = _rows(DOC.read_text(encoding="utf-8"))
    secrets = [name for name in Settings.model_fields if _is_secret(name)]
    assert "ENCRYPTION_KEY" in secrets and "HEALTH_DETAILS_TOKEN" in secrets
    for name in secrets:
        assert rows[name][0].endswith("secret"), rows[name]
        assert rows[name][1] in SECRET_DEFAULTS, (name, rows[name])
    assert rows["ENCRYPTION_KEY"][1] == f"{UNSET}; {REQUIRED_IN_PRODUCTION}"


def test_a_secret_with_a_default_value_shows_only_that_it_is_set() -> None:
    info = FieldInfo.from_annotated_attribute(SecretStr, SecretStr("hunter2-default"))
    assert default_text(info) == SECRET_SET
    optional = FieldInfo.from_annotated_attribute(
        SecretStr | None,  # type: ignore[arg-type]
        Field(default=SecretStr("hunter2-default")),
    )
    assert default_text(optional) == SECRET_SET
    assert type_text(optional.annotation) == "optional secret"
    bounded = FieldInfo.from_annotated_attribute(int, Field(default=3, gt=0, le=9))
    assert (default_text(bounded), bounds_text(bounded)) == ("`3`", "> 0, ≤ 9")


def test_the_environment_of_whoever_generates_does_not_leak(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The reference shows the class's defaults, never values the generating shell has set."""
    leaks = {
        "ENCRYPTION_KEY": "leaked-encryption-key-value",
        "SMTP_PASSWORD": "leaked-smtp-password",
        "HEALTH_DETAILS_TOKEN": "leaked-health-token",
        "REDIS_HOST": "leaked-redis-host",
    }
    for name, value in leaks.items():
        monkeypatch.setenv(name, value)
    text = render()
    for value in leaks.values():
        assert value not in text
