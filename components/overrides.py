"""A YAML mapping of settings, and ``key.path=value`` overrides of it, checked against a pydantic schema.

The schema is any pydantic model whose fields may be section models (``Section`` or ``Section | None``);
:mod:`components.config` applies these to the run config. A key the schema does not know is refused with the
closest one it does (pydantic's ``extra="forbid"`` error names none); a YAML error names its line and column.
"""

from __future__ import annotations

import difflib
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from components.errors import ConfigError


def _unknown_key(parts: list[str], depth: int, fields: Mapping[str, Any]) -> str:
    """``unknown config key 'a.b'; did you mean 'a.c'?`` for ``parts[depth]`` not among ``fields``."""
    hint = difflib.get_close_matches(parts[depth], list(fields), n=1)
    suggestion = f"; did you mean {'.'.join([*parts[:depth], hint[0]])!r}?" if hint else ""
    return f"unknown config key {'.'.join(parts)!r}{suggestion}"


def _section_model(annotation: Any) -> type[BaseModel] | None:
    """The section model of a field: ``Section`` or ``Section | None`` (an optional section)."""
    for candidate in (annotation, *typing.get_args(annotation)):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def check_keys(raw: Mapping[str, Any], *, where: str, model: type[BaseModel],
               prefix: tuple[str, ...] = ()) -> None:
    """Refuse a key of a config file that the schema does not know, with the closest name."""
    for key, value in raw.items():
        parts = [*prefix, str(key)]
        if key not in model.model_fields:
            raise ConfigError(f"{where}: {_unknown_key(parts, len(prefix), model.model_fields)}")
        section = _section_model(model.model_fields[key].annotation)
        if section is not None and isinstance(value, Mapping):
            check_keys(value, where=where, model=section, prefix=tuple(parts))


def read_yaml(path: Path) -> dict[str, Any]:
    """The mapping of sections in the YAML file at ``path`` ({} when empty)."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc.strerror or exc}") from exc
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark, context = getattr(exc, "problem_mark", None), getattr(exc, "context_mark", None)
        at = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        since = (f" ({exc.context} from line {context.line + 1}, column {context.column + 1})"
                 if context is not None and getattr(exc, "context", None) else "")
        raise ConfigError(f"{path} is not valid YAML{at}: {problem}{since}") from exc
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections, got {type(raw).__name__}")
    return raw


def apply_override(raw: dict[str, Any], item: str, *, model: type[BaseModel]) -> tuple[str, ...]:
    """Set ``key.path=value`` in ``raw``, refusing keys the schema does not know; the key's parts."""
    key, sep, text = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {item!r} is not of the form key.path=value")
    parts = key.strip().split(".")
    section: type[BaseModel] | None = model
    node = raw
    for depth, part in enumerate(parts):
        if section is not None:
            fields = section.model_fields
            if part not in fields:
                raise ConfigError(_unknown_key(parts, depth, fields))
            section = _section_model(fields[part].annotation)
        if depth == len(parts) - 1:
            try:
                node[part] = yaml.safe_load(text) if text.strip() else None
            except yaml.YAMLError as exc:
                raise ConfigError(f"override {item!r}: value is not valid YAML") from exc
        else:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: {'.'.join(parts[:depth + 1])} is not a section")
            node = child
    return tuple(parts)
