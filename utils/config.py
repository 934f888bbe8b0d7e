"""Recipes and saved configs: a YAML file of flag values (``dest: value``) that sets the parser's defaults, so
``--config recipes/pretrain_vit_base.yaml --epochs 400`` takes the recipe and flags still win (timm's ``-c``). Every
run writes the flags it was given (before data-dependent defaults) to ``config.yaml``; ``--config`` reads it back."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

from .errors import UserError

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
CONFIG_NAME = "config.yaml"
# The file itself, and what names one run rather than how it trains (a replay gets its own name and folder).
NOT_SAVED = ("config", "experiment_name", "resume_from_checkpoint", "push_to_hub", "hub_model_id", "hub_private",
             "hub_revision")
_parsed: dict = {}  # the flags as parse_with_config last parsed them: what config.yaml holds


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The module docstring as written, and each flag's default where the help text does not already give it."""

    def _get_help_string(self, action) -> str:
        if action.default is None or "default" in (action.help or "") or action.default is argparse.SUPPRESS:
            return action.help or ""
        return super()._get_help_string(action)


class Settings(argparse.Namespace):
    """A run's resolved flags, read-only: made by :func:`freeze` once every default is filled in."""

    def __setattr__(self, name, value):
        raise AttributeError(f"{name}: a run's settings are fixed once resolved (set it before freeze())")

    def __delattr__(self, name):
        raise AttributeError(f"{name}: a run's settings are fixed once resolved")


def freeze(args: argparse.Namespace, **resolved) -> Settings:
    """``args`` with ``resolved`` values added, as :class:`Settings` that no later code can change."""
    settings = Settings.__new__(Settings)
    settings.__dict__.update({**vars(args), **resolved})
    return settings


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
        values = config_defaults(parser, known.config, argv)
        parser.set_defaults(**values)
    args = parser.parse_args(argv)
    _parsed.clear()
    _parsed.update({key: value for key, value in vars(args).items() if key not in NOT_SAVED})
    return args


def config_defaults(parser: argparse.ArgumentParser, name: str, argv) -> dict:
    """The file's values, checked and converted as the flags would be: an unknown key, or a value outside a flag's
    choices, is a one-line error. An --epochs given on the command line replaces the file's max_train_steps."""
    values = read_config(name)
    unknown = sorted(set(values) - flag_names(parser))
    if unknown:
        raise UserError(f"--config {name}: {', '.join(unknown)} {'is' if len(unknown) == 1 else 'are'} not "
                        f"a flag of {parser.prog}: fix or remove {'it' if len(unknown) == 1 else 'them'}")
    given = {word.split("=")[0] for word in (argv if argv is not None else sys.argv[1:])}
    if "--epochs" in given and "--max_train_steps" not in given:
        values.pop("max_train_steps", None)
    for action in parser._actions:
        if action.dest not in values or values[action.dest] is None:
            continue
        value = values[action.dest]
        if isinstance(value, str) and action.type not in (None, str):
            try:
                values[action.dest] = value = action.type(value)
            except (TypeError, ValueError):
                raise UserError(f"--config {name}: {action.dest}: {value!r} is not a valid value for "
                                f"{action.option_strings[0]}") from None
        if action.choices is not None and value not in action.choices:
            raise UserError(f"--config {name}: {action.dest}: {value!r} is not one of "
                            f"{', '.join(map(str, action.choices))}")
    return values


def apply_recipe(args: argparse.Namespace, name: str) -> None:
    """Fill the flags left at None from recipes/<name>.yaml (the defaults that depend on the data)."""
    for key, value in read_config(name).items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)


def save_config(args: argparse.Namespace, folder: Path) -> Path:
    """config.yaml: the flags this run was given, with the parser's defaults (``--config`` reads it back; the
    data-dependent defaults are worked out again from them)."""
    values = {key: plain(value) for key, value in (_parsed or vars(args)).items() if key not in NOT_SAVED}
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
