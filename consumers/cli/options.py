"""Command-line options generated from the settings tree, so the CLI spells every setting the same
way as the environment: ``CASM_KAFKA__BOOTSTRAP_SERVERS`` is ``--kafka.bootstrap-servers``."""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator
from typing import Any, Literal, get_args, get_origin

from pydantic import BaseModel
from pydantic.fields import FieldInfo

_DEST_PREFIX = "setting:"


def _is_section(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def _leaves(model: type[BaseModel], prefix: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], FieldInfo]]:
    for name, info in model.model_fields.items():
        if _is_section(info.annotation):
            yield from _leaves(info.annotation, (*prefix, name))
        else:
            yield (*prefix, name), info


def _is_structured(annotation: Any) -> bool:
    """Lists, dicts and tuples are given as JSON (or, for lists, comma-separated)."""
    origin = get_origin(annotation)
    if origin in (list, dict, tuple):
        return True
    return any(_is_structured(a) for a in get_args(annotation))


def _parse_value(text: str, structured: bool) -> Any:
    if not structured:
        return text
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return [part.strip() for part in text.split(",") if part.strip()]


def option_name(path: tuple[str, ...]) -> str:
    """``("kafka", "bootstrap_servers")`` -> ``--kafka.bootstrap-servers``."""
    return "--" + ".".join(p.replace("_", "-") for p in path)


def add_settings_options(parser: argparse.ArgumentParser, settings_cls: type[BaseModel]) -> None:
    """Add one option per leaf setting, grouped by section, defaulting to 'not given'."""
    groups: dict[str, argparse._ArgumentGroup] = {}
    for path, info in _leaves(settings_cls):
        section = path[0] if len(path) > 1 else "general"
        if section not in groups:
            groups[section] = parser.add_argument_group(f"settings: {section}")
        structured = _is_structured(info.annotation)
        default = info.get_default(call_default_factory=True)
        if isinstance(default, BaseModel):
            default = default.model_dump()
        help_text = (info.description or "").replace("%", "%%")
        help_text += f" [default: {default!r}]".replace("%", "%%")
        if structured:
            help_text += " (JSON, or comma-separated for lists)"
        groups[section].add_argument(
            option_name(path),
            dest=_DEST_PREFIX + ".".join(path),
            default=argparse.SUPPRESS,
            metavar=path[-1].upper(),
            help=help_text,
        )


def _field(settings_cls: type[BaseModel], path: tuple[str, ...]) -> FieldInfo:
    for leaf_path, info in _leaves(settings_cls):
        if leaf_path == path:
            return info
    raise KeyError(f"no setting {'.'.join(path)!r}")


def add_alias(
    container: argparse.ArgumentParser | argparse._ArgumentGroup,
    flag: str,
    dotted: str,
    settings_cls: type[BaseModel],
    help_text: str | None = None,
) -> None:
    """A short flag (``--k``) that writes the setting `dotted` (``serve.top_k``) exactly as its own
    option (``--serve.top-k``) does: same destination, same parsing, same precedence. Its help
    names the setting (described with the settings); choices come from a Literal type. Raises
    KeyError for an unknown setting."""
    path = tuple(dotted.split("."))
    info = _field(settings_cls, path)
    choices = None
    if get_origin(info.annotation) is Literal and all(isinstance(a, str) for a in get_args(info.annotation)):
        choices = list(get_args(info.annotation))
    text = f"shortcut for {option_name(path)}" + (f": {help_text}" if help_text else "")
    text = text.replace("%", "%%")
    container.add_argument(
        flag,
        dest=_DEST_PREFIX + dotted,
        default=argparse.SUPPRESS,
        choices=choices,
        metavar=None if choices else path[-1].upper(),
        help=text,
    )


def nested(dotted: dict[str, Any]) -> dict[str, Any]:
    """``{"serve.top_k": 5}`` -> ``{"serve": {"top_k": 5}}`` (the shape settings sources take)."""
    tree: dict[str, Any] = {}
    for key, value in dotted.items():
        *sections, leaf = key.split(".")
        node = tree
        for section in sections:
            node = node.setdefault(section, {})
        node[leaf] = value
    return tree


def settings_overrides(args: argparse.Namespace, settings_cls: type[BaseModel]) -> dict[str, Any]:
    """The settings given on the command line as a nested dict for ``settings_cls(**overrides)``."""
    structured = {".".join(path): _is_structured(info.annotation) for path, info in _leaves(settings_cls)}
    given: dict[str, Any] = {}
    for dest, value in vars(args).items():
        if not dest.startswith(_DEST_PREFIX):
            continue
        dotted = dest.removeprefix(_DEST_PREFIX)
        given[dotted] = _parse_value(value, structured[dotted])
    return nested(given)
