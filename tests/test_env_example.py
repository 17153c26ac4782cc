""".env.example documents every setting with its real default, and copying it changes nothing."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from pydantic import TypeAdapter

from src.config.settings import Settings

ENV_EXAMPLE = Path(__file__).resolve().parents[1] / ".env.example"
# `NAME=value`, or `# NAME=` for a setting that has no default (None).
ASSIGNMENT = re.compile(r"^(#\s*)?([A-Z][A-Z0-9_]*)=(.*)$")
SPECIFICATION_VARIABLES = [
    "REDIS_HOST",
    "REDIS_PORT",
    "REDIS_DB",
    "REDIS_PASSWORD",
    "REDIS_SSL",
    "KAFKA_BOOTSTRAP_SERVERS",
    "KAFKA_GROUP_ID",
    "KAFKA_AUTO_OFFSET_RESET",
    "KAFKA_ENABLE_AUTO_COMMIT",
    "KAFKA_SESSION_TIMEOUT_MS",
    "KAFKA_REQUEST_TIMEOUT_MS",
    "KAFKA_RETRY_BACKOFF_MS",
]


def _unquote(value: str) -> str:
    value = value.strip()
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
        return value[1:-1]
    return value


def documented() -> list[tuple[str, str, bool]]:
    """(name, value, commented out) for every assignment line, in file order."""
    entries = []
    for line in ENV_EXAMPLE.read_text().splitlines():
        match = ASSIGNMENT.match(line.strip())
        if match:
            commented, name, value = match.groups()
            entries.append((name, _unquote(value), commented is not None))
    return entries


def _is_secret(name: str) -> bool:
    return "SecretStr" in str(Settings.model_fields[name].annotation)


def _parse(name: str, value: str) -> Any:
    """The value the service would get from this text (empty means unset, i.e. None)."""
    if value == "":
        return None
    annotation: Any = Settings.model_fields[name].annotation
    return TypeAdapter(annotation).validate_strings(value)


def test_every_setting_is_documented_once_and_nothing_else() -> None:
    names = [name for name, _, _ in documented()]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    assert not duplicates, f"documented twice: {duplicates}"
    missing = sorted(set(Settings.model_fields) - set(names))
    unknown = sorted(set(names) - set(Settings.model_fields))
    assert not missing, f"settings missing from .env.example: {missing}"
    assert not unknown, f"not settings (typo or removed?): {unknown}"


def test_specification_variables_come_first() -> None:
    names = [name for name, _, _ in documented()]
    assert names[: len(SPECIFICATION_VARIABLES)] == SPECIFICATION_VARIABLES


@pytest.mark.parametrize("name", sorted(Settings.model_fields))
def test_documented_default_is_the_real_default(name: str) -> None:
    entries = {entry_name: (value, commented) for entry_name, value, commented in documented()}
    if name not in entries:
        pytest.fail(f"{name} is not in .env.example")
    value, commented = entries[name]
    default = Settings.model_fields[name].default
    assert _parse(name, value) == default, f"{name}={value!r} but the default is {default!r}"
    # An empty value is not "unset" to pydantic-settings ('' fails a Literal, '' is an empty
    # password), so settings without a default must be commented out, and only those.
    assert commented == (default is None), name


@pytest.mark.parametrize("name", sorted(n for n in Settings.model_fields if _is_secret(n)))
def test_secrets_are_left_empty(name: str) -> None:
    values = {entry_name: value for entry_name, value, _ in documented()}
    assert values.get(name) == "", f"{name} must not carry a value in .env.example"


def test_copying_it_as_env_changes_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in Settings.model_fields:
        monkeypatch.delenv(name, raising=False)
    from_example = Settings(_env_file=ENV_EXAMPLE)
    defaults = Settings(_env_file=None)
    assert from_example.model_dump() == defaults.model_dump()
