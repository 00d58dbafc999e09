"""The ``casm`` command line. Each sub-command is a module in `consumers.cli.commands` with
``NAME``, ``HELP``, ``add_arguments(parser)`` and ``run(args, settings) -> int``, and optionally
``default_preset(args)`` (the preset when --preset is not given) and ``profile(args)`` (a
`consumers.cli.profiles.Profile` applied below every explicit setting); every setting of the
settings tree is also an option of every sub-command (``--section.name``). Commands read their
settings, never a flag that stands for one (short flags such as ``--k`` write the setting)."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
import warnings
from collections.abc import Sequence

from pydantic import ValidationError

from consumers.cli.options import add_settings_options, settings_overrides
from consumers.cli.profiles import Profile
from consumers.cli.startup import EXIT_STARTUP, explain, invalid_settings
from consumers.presets import available_presets, load_settings
from consumers.settings import CasmSettings

COMMAND_MODULES: tuple[str, ...] = (
    "demo",
    "serve",
    "recommend",
    "evaluate",
    "evaluate_stream",
    "broker",
    "replay",
    "schemas",
    "status",
)

log = logging.getLogger("casm")


def _commands() -> list:
    found = []
    for name in COMMAND_MODULES:
        try:
            found.append(importlib.import_module(f"consumers.cli.commands.{name}"))
        except ModuleNotFoundError as exc:
            if exc.name != f"consumers.cli.commands.{name}":
                raise
    return found


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="casm",
        description="casm-stream: streaming multi-behaviour recommendation with CASM.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in _commands():
        cmd = sub.add_parser(module.NAME, help=module.HELP, description=module.HELP)
        cmd.add_argument(
            "--preset",
            default=None,
            help=f"settings preset: one of {available_presets()} or a .toml path",
        )
        module.add_arguments(cmd)
        add_settings_options(cmd, CasmSettings)
        cmd.set_defaults(_module=module)
    return parser


def configure_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # kafka-python 3.x warns about its own deprecations on every client; not actionable for users.
    warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"kafka(\.|$)")
    # kafka-python logs its own internals (slow selector tasks, reconnects) as warnings; errors stay.
    logging.getLogger("kafka").setLevel(max(logging.ERROR, getattr(logging, level)))


def command_settings(args: argparse.Namespace) -> tuple[CasmSettings, Profile | None]:
    """The settings a parsed command line runs with, and the command's profile if it has one:
    options over ``CASM_`` variables over the preset (--preset, else the command's default) over
    the profile over the defaults. Raises ValidationError for bad settings, FileNotFoundError for
    an unknown preset."""
    preset = args.preset
    if preset is None and hasattr(args._module, "default_preset"):
        preset = args._module.default_preset(args)
    profile = args._module.profile(args) if hasattr(args._module, "profile") else None
    settings = load_settings(preset, profile.overrides() if profile else None, **settings_overrides(args, CasmSettings))
    return settings, profile


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        settings, profile = command_settings(args)
    except ValidationError as exc:
        parser.exit(2, f"casm: {invalid_settings(exc)}\n")
    except FileNotFoundError as exc:
        parser.exit(2, f"casm: invalid settings: {exc}\n")
    configure_logging(settings.log_level)
    if profile is not None:
        applied, replaced = profile.outcome(settings)
        log.info("profile %s (below explicit settings): applied %s; replaced by explicit settings %s",
                 profile.name, applied, replaced or "none")
    try:
        return int(args._module.run(args, settings) or 0)
    except KeyboardInterrupt:
        log.warning("interrupted")
        return 130
    except Exception as exc:
        line = explain(exc, settings)
        if line is None:
            raise
        log.debug("start-up failure", exc_info=True)
        print(f"casm {args.command}: {line}", file=sys.stderr)
        return EXIT_STARTUP
