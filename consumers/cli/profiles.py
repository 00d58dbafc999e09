"""Named setting profiles: a few settings a command changes for one way of running it (the
full-speed replay of `casm evaluate-stream --max`), written in one place, shown in the command's
``--help``, logged at start and applied **below every explicit setting**: a preset, a ``CASM_``
variable or a command-line option of the same setting wins over the profile (see
`consumers.presets.load_settings` for the order)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel

from consumers.cli.options import nested, option_name


@dataclass(frozen=True)
class Profile:
    """A named set of settings. `settings`: dotted setting path -> (value, why)."""

    name: str
    settings: dict[str, tuple[Any, str]]

    def values(self) -> dict[str, Any]:
        """Dotted setting path -> value."""
        return {path: value for path, (value, _) in self.settings.items()}

    def overrides(self) -> dict[str, Any]:
        """The values as the nested dict settings sources take (``{"serve": {"training": ...}}``)."""
        return nested(self.values())

    def help_text(self) -> str:
        """One line per setting for ``--help`` (``%`` escaped for argparse)."""
        lines = [f"{option_name(tuple(path.split('.')))} {value!r} ({why})" for path, (value, why) in self.settings.items()]
        return "; ".join(lines).replace("%", "%%")

    def outcome(self, settings: BaseModel) -> tuple[dict[str, Any], dict[str, Any]]:
        """Which of the profile's settings took effect in `settings` and which an explicit setting
        replaced: (applied {path: value}, replaced {path: the explicit value})."""
        applied: dict[str, Any] = {}
        replaced: dict[str, Any] = {}
        for path, value in self.values().items():
            node: Any = settings
            for part in path.split("."):
                node = getattr(node, part)
            (applied if node == value else replaced)[path] = value if node == value else node
        return applied, replaced
