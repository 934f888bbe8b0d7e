"""Recipes and saved configs: a YAML file of flag values (``dest: value``) that sets the parser's defaults, so
``--config recipes/pretrain_vit_base.yaml --epochs 400`` takes the recipe and flags still win (timm's ``-c``). Every
run writes the flags it resolved to ``config.yaml``, which ``--config`` reads back to reproduce it."""
from __future__ import annotations

import argparse
from pathlib import Path

import yaml

from .errors import UserError

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
CONFIG_NAME = "config.yaml"
NOT_SAVED = ("config", "num_workers")  # the file itself; the machine's worker count (resolved per machine)
_flags: list[str] = []  # the flags of the last parser parse_with_config read: what config.yaml holds


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The module docstring as written, and each flag's default where the help text does not already give it."""

    def _get_help_string(self, action) -> str:
        if action.default is None or "default" in (action.help or "") or action.default is argparse.SUPPRESS:
            return action.help or ""
        return super()._get_help_string(action)


def recipe_path(name: str) -> Path:
    """A file path, or the name of a file in recipes/ (with or without .yaml)."""
    path = Path(name).expanduser()
    if path.is_file():
        return path
    for candidate in (RECIPES / name, RECIPES / f"{name}.yaml"):
        if candidate.is_file():
            return candidate
    known = ", ".join(sorted(p.stem for p in RECIPES.glob("*.yaml")))
    raise UserError(f"--config {name}: no such file or recipe; pass a YAML file or one of: {known}")


def read_config(name: str) -> dict:
    path = recipe_path(name)
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise UserError(f"--config {path} is not valid YAML ({str(error).splitlines()[0]}): fix the file") from None
    if not isinstance(values, dict):
        raise UserError(f"--config {path} must be a mapping of flag names to values (e.g. 'epochs: 100')")
    return values


def flag_names(parser: argparse.ArgumentParser) -> set[str]:
    return {action.dest for action in parser._actions if action.dest != "help"}


def parse_with_config(parser: argparse.ArgumentParser, argv=None) -> argparse.Namespace:
    """Add ``--config``, apply the file's values as defaults, then parse ``argv`` (flags given there win)."""
    parser.add_argument("--config", type=str, default=None,
                        help="A recipe (recipes/<name>.yaml, or just its name) or a run's config.yaml: its values "
                             "become the defaults and flags given here win.")
    known, _ = parser.parse_known_args(argv)
    if known.config:
        values = read_config(known.config)
        unknown = sorted(set(values) - flag_names(parser))
        if unknown:
            raise UserError(f"--config {known.config}: {', '.join(unknown)} {'is' if len(unknown) == 1 else 'are'} not "
                            f"a flag of {parser.prog}: fix or remove {'it' if len(unknown) == 1 else 'them'}")
        parser.set_defaults(**values)
    args = parser.parse_args(argv)
    _flags[:] = sorted(flag_names(parser) - set(NOT_SAVED))
    return args


def apply_recipe(args: argparse.Namespace, name: str) -> None:
    """Fill the flags left at None from recipes/<name>.yaml (the defaults that depend on the data)."""
    for key, value in read_config(name).items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)


def save_config(args: argparse.Namespace, folder: Path) -> Path:
    """The run's resolved flags as config.yaml (``--config`` reads it back)."""
    flags = _flags or [key for key in vars(args) if key not in NOT_SAVED]
    values = {key: plain(getattr(args, key)) for key in flags if hasattr(args, key)}
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / CONFIG_NAME
    path.write_text(yaml.safe_dump(values, sort_keys=True))
    return path


def plain(value):
    """YAML-safe: tuples become lists, paths strings."""
    if isinstance(value, tuple):
        return [plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value
