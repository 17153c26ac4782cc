"""The configuration reference (docs/configuration.md), generated from the settings class.

Why generated: the explanation of each setting lives as the ``#`` comments above its field in
``src/config/settings/base.py``, next to the code that reads it, and a hand-kept copy would drift.
Names, types, defaults and bounds come from ``Settings.model_fields`` (what pydantic enforces);
the explanations, the sections (``# --- database ---``) and the order come from the source file,
read with ``tokenize`` and ``ast`` (comments are not part of the class at run time).

Secrets never show a default value, only whether one is set: the reference is published.

Regenerate with ``python -m src.config.reference > docs/configuration.md``;
``tests/test_configuration_docs.py`` fails until the document matches.
"""

from __future__ import annotations

import ast
import enum
import inspect
import io
import re
import sys
import tokenize
import types
import typing
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePath
from typing import Any

from src.config.settings import Settings

REGENERATE = "python -m src.config.reference > docs/configuration.md"
UNSET = "(unset)"
REQUIRED_IN_PRODUCTION = "required in production"
SECRET_SET = "(set, not shown)"

# `# --- database ----...`: a section header; the text between the dashes names the section.
_SECTION = re.compile(r"^#\s*-{3,}\s*(?P<title>.*?)\s*-*\s*$")
# Said in the explanation of a setting without a default that production refuses to start without.
_REQUIRED_IN_PRODUCTION = re.compile(r"\brequired in production\b", re.IGNORECASE)
# A setting's name in prose; not one already in code type or inside a {placeholder}.
_NAME = re.compile(r"(?<![`{\w])([A-Z][A-Z0-9]*(?:_[A-Z0-9]+)+)(?![`}\w])")
# The bounds pydantic's Field(ge=, gt=, le=, lt=) puts in a field's metadata, in reading order.
_BOUNDS = (("gt", ">"), ("ge", "≥"), ("lt", "<"), ("le", "≤"))


@dataclass
class Section:
    title: str
    names: list[str] = field(default_factory=list)


@dataclass
class Source:
    """What only the source file knows: the order of the fields, their sections and comments."""

    sections: list[Section]
    comments: dict[str, str]


def settings_source() -> str:
    """The text of the module that defines ``Settings`` (found from the class, not a path)."""
    path = inspect.getsourcefile(Settings)
    if path is None:  # pragma: no cover - only without the source (a zipped install)
        raise RuntimeError("the source of the Settings class is not available")
    return Path(path).read_text(encoding="utf-8")


def read_source(text: str, class_name: str = Settings.__name__) -> Source:
    """Fields of ``class_name`` in source order, grouped by the section headers above them, each
    with the comment block directly above it (no blank line or code in between)."""
    comment_lines: dict[int, str] = {}
    for token in tokenize.generate_tokens(io.StringIO(text).readline):
        if token.type == tokenize.COMMENT and token.line.strip().startswith("#"):
            comment_lines[token.start[0]] = token.string
    headers = {
        line: match.group("title")
        for line, comment in comment_lines.items()
        if (match := _SECTION.match(comment))
    }
    cls = next(
        node
        for node in ast.parse(text).body
        if isinstance(node, ast.ClassDef) and node.name == class_name
    )
    sections: list[Section] = []
    comments: dict[str, str] = {}
    previous_line = cls.lineno
    for node in cls.body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            previous_line = node.end_lineno or node.lineno
            continue
        name = node.target.id
        # A header between the previous statement and this field opens a new section.
        opened = [headers[n] for n in range(previous_line + 1, node.lineno) if n in headers]
        if opened or not sections:
            sections.append(Section(opened[-1] if opened else "General"))
        sections[-1].names.append(name)
        block: list[str] = []
        line = node.lineno - 1
        while line in comment_lines and line not in headers:
            block.append(comment_lines[line].lstrip("#").strip())
            line -= 1
        if block:
            comments[name] = " ".join(reversed(block))
        previous_line = node.end_lineno or node.lineno
    return Source(sections, comments)


def _is_secret(annotation: Any) -> bool:
    # Duck-typed (pydantic's SecretStr and SecretBytes both have it): this module imports nothing
    # beyond the standard library and the settings.
    return isinstance(annotation, type) and hasattr(annotation, "get_secret_value")


def _unwrap_optional(annotation: Any) -> tuple[Any, bool]:
    """``(X, True)`` for ``X | None``; ``(annotation, False)`` otherwise."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        members = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
        if len(members) < len(typing.get_args(annotation)):
            inner = members[0] if len(members) == 1 else typing.Union[tuple(members)]  # noqa: UP007
            return inner, True
    return annotation, False


def _one_of(values: Sequence[object]) -> str:
    return "one of " + " | ".join(f'"{value}"' for value in values)


def type_text(annotation: Any) -> str:
    """A reader's name for a type: ``int``, ``secret``, ``path``, ``one of "a" | "b"``,
    ``optional str`` (``X | None``: unset unless given)."""
    inner, optional = _unwrap_optional(annotation)
    if typing.get_origin(inner) is typing.Literal:
        text = _one_of(typing.get_args(inner))
    elif isinstance(inner, type) and issubclass(inner, enum.Enum):
        text = _one_of([member.value for member in inner])
    elif _is_secret(inner):
        text = "secret"
    elif isinstance(inner, type) and issubclass(inner, PurePath):
        text = "path"
    elif isinstance(inner, type):
        text = inner.__name__
    else:
        text = str(inner).replace("typing.", "")
    return f"optional {text}" if optional else text


def _value_text(value: object) -> str:
    """A default as one would write it in the environment (``true``, ``./data``, ``production``)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, enum.Enum):
        return str(value.value)
    if isinstance(value, PurePath):
        text = value.as_posix()
        return text if value.is_absolute() or text.startswith(".") else f"./{text}"
    return str(value)


def default_text(info: Any, explanation: str = "") -> str:
    """The default of a field (a pydantic ``FieldInfo``) for the reference; a secret's value is
    never shown, only whether there is one."""
    annotation, _ = _unwrap_optional(info.annotation)
    if info.default_factory is not None:
        return "(computed)"
    if info.is_required():
        return "required"
    default = info.default
    if default is None:
        if _REQUIRED_IN_PRODUCTION.search(explanation):
            return f"{UNSET}; {REQUIRED_IN_PRODUCTION}"
        return UNSET
    if _is_secret(annotation) or _is_secret(type(default)):
        return SECRET_SET
    text = _value_text(default)
    return f"`{text}`" if text else '`""`'


def bounds_text(info: Any) -> str:
    """``≥ 0, ≤ 3600`` from the constraints pydantic keeps in the field's metadata."""
    parts = []
    for attribute, symbol in _BOUNDS:
        for constraint in info.metadata:
            value = getattr(constraint, attribute, None)
            if value is not None:
                parts.append(f"{symbol} {value}")
    return ", ".join(parts)


def _cell(text: str) -> str:
    """Safe inside a Markdown table cell: a ``|`` would end the cell."""
    return text.replace("|", "\\|")


def _explanation(text: str, names: set[str]) -> str:
    """The comment as prose (a lone ``*`` would start emphasis), with the names of settings set in
    code type."""
    text = text.replace("*", "\\*")
    return _NAME.sub(lambda m: f"`{m.group(1)}`" if m.group(1) in names else m.group(1), text)


def _table(section: Section, source: Source, fields: dict[str, Any]) -> Iterator[str]:
    yield f"## {section.title[:1].upper()}{section.title[1:]}"
    yield ""
    yield "| setting | type | default | bounds | explanation |"
    yield "| --- | --- | --- | --- | --- |"
    names = set(fields)
    for name in section.names:
        info = fields[name]
        comment = source.comments.get(name, "")
        cells = (
            f"`{name}`",
            type_text(info.annotation),
            default_text(info, comment),
            bounds_text(info),
            _explanation(comment, names),
        )
        yield "| " + " | ".join(_cell(cell) for cell in cells) + " |"
    yield ""


HEADER = f"""\
# Configuration reference

<!-- Generated from src/config/settings/base.py; do not edit by hand. -->

Every setting the service reads, from an environment variable of the same name or a `.env` file
(README.md, "Configuration"). This page is generated from the settings class
(`src/config/settings/base.py`): its types, defaults and bounds are what start-up enforces, and
the explanations are the comments above each field there. After changing a setting, regenerate it:

```bash
{REGENERATE}
```

Types: `optional` means unset unless given; `secret` values are never shown (a default is at most
"{UNSET}"). Bounds are inclusive (≥, ≤) or strict (>, <); a value outside them stops start-up.
"""


def render() -> str:
    """The whole reference, as docs/configuration.md holds it."""
    fields: dict[str, Any] = dict(Settings.model_fields)
    source = read_source(settings_source())
    sections = [Section(s.title, [n for n in s.names if n in fields]) for s in source.sections]
    # Fields the source does not show (inherited from elsewhere) are still listed.
    listed = {name for section in sections for name in section.names}
    rest = [name for name in fields if name not in listed]
    if rest:
        sections.append(Section("other settings", rest))
    lines = [HEADER]
    for section in sections:
        if section.names:
            lines.extend(_table(section, source, fields))
    return "\n".join(lines).rstrip("\n") + "\n"


if __name__ == "__main__":
    # Bytes: the same file whatever the locale of the shell that redirects it.
    sys.stdout.buffer.write(render().encode("utf-8"))
