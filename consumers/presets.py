"""Presets: small TOML files of settings for known data sets (behaviour vocabulary, target,
alpha, sequence length, ...). They sit below the environment and the command line, above a
command's profile and the defaults (`load_settings`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic_settings import (
    BaseSettings,
    InitSettingsSource,
    PydanticBaseSettingsSource,
    TomlConfigSettingsSource,
)

from consumers.settings import CasmSettings

PRESET_DIR = Path(__file__).parent / "presets"

FORMAT_PRESETS: dict[str, str] = {"movielens": "movielens", "taobao": "taobao", "retailrocket": "retailrocket"}
"""The preset a log format implies when none is named (`--format movielens` -> preset movielens)."""


def available_presets() -> list[str]:
    """Names of the presets shipped with casm-stream."""
    return sorted(p.stem for p in PRESET_DIR.glob("*.toml"))


def preset_path(name_or_path: str | Path) -> Path:
    """A shipped preset by name (``movielens``) or any TOML file by path."""
    path = Path(name_or_path)
    if path.suffix == ".toml" and path.exists():
        return path
    shipped = PRESET_DIR / f"{name_or_path}.toml"
    if shipped.exists():
        return shipped
    raise FileNotFoundError(
        f"no preset {str(name_or_path)!r}: give a .toml path or one of {available_presets()}"
    )


def load_settings(
    preset: str | Path | None = None, profile: dict[str, Any] | None = None, **overrides: Any
) -> CasmSettings:
    """Settings from, highest priority first: `overrides` (the command line), the ``CASM_``
    environment, the `preset` TOML file, the `profile` (a command's nested dict of settings, e.g.
    `evaluate-stream --max`'s), and the defaults. Sources merge per field: a nested field given
    in one source leaves the section's other fields to the sources below it."""
    toml_file = None if preset is None else preset_path(preset)
    if toml_file is None and not profile:
        return CasmSettings(**overrides)

    class LayeredSettings(CasmSettings):
        @classmethod
        def settings_customise_sources(
            cls,
            settings_cls: type[BaseSettings],
            init_settings: PydanticBaseSettingsSource,
            env_settings: PydanticBaseSettingsSource,
            dotenv_settings: PydanticBaseSettingsSource,
            file_secret_settings: PydanticBaseSettingsSource,
        ) -> tuple[PydanticBaseSettingsSource, ...]:
            sources = [init_settings, env_settings]
            if toml_file is not None:
                sources.append(TomlConfigSettingsSource(settings_cls, toml_file=toml_file))
            if profile:
                sources.append(InitSettingsSource(settings_cls, init_kwargs=profile))
            return (*sources, file_secret_settings)

    return LayeredSettings(**overrides)
