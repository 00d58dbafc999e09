"""Presets: small TOML files of settings for known data sets (behaviour vocabulary, target,
alpha, sequence length, ...). They sit below the environment and the command line."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
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


def load_settings(preset: str | Path | None = None, **overrides: Any) -> CasmSettings:
    """Settings from (highest first) `overrides` (the command line), the ``CASM_`` environment,
    the preset file, and the defaults."""
    if preset is None:
        return CasmSettings(**overrides)
    toml_file = preset_path(preset)

    class PresetSettings(CasmSettings):
        model_config = SettingsConfigDict(toml_file=toml_file)

        @classmethod
        def settings_customise_sources(
            cls,
            settings_cls: type[BaseSettings],
            init_settings: PydanticBaseSettingsSource,
            env_settings: PydanticBaseSettingsSource,
            dotenv_settings: PydanticBaseSettingsSource,
            file_secret_settings: PydanticBaseSettingsSource,
        ) -> tuple[PydanticBaseSettingsSource, ...]:
            return (init_settings, env_settings, TomlConfigSettingsSource(settings_cls), file_secret_settings)

    return PresetSettings(**overrides)
