"""`--config FILE`: a command's flags from a YAML or TOML file, as vLLM's `--config file.yaml`.

Each key is a flag's long name without the dashes (`max_num_seqs` or `max-num-seqs`); each value is what the
flag would be given: a number or a string, true for a switch (`no_prefix_caching: true`; false leaves it off),
a list for a repeatable flag (`api_key: [k1, k2]`) or one taking several values (`allowed_origins`). The file
becomes command-line words placed before the real ones and parsed by the same parser, so a value goes through
the same check (api/flags.py) and a bad one gets the same one-line error, naming the file. A flag given on the
command line replaces the file's value for it, a list included (`--api-key K` on the command line: only K).
An unknown key is refused with the closest flag's name, never skipped.
"""
from __future__ import annotations

import argparse
import tomllib
from pathlib import Path

from .parser import Parser, did_you_mean

FLAG = "--config"


class ConfigError(Exception):
    """One line: what is wrong with the file, and what to do."""


def split_config(argv: list[str]) -> tuple[str | None, list[str]]:
    """(the --config file or None, argv without it). Given twice it is refused: which one would win?"""
    paths, rest, i = [], [], 0
    while i < len(argv):
        word = argv[i]
        if word == FLAG:
            if i + 1 == len(argv):
                raise ConfigError(f"{FLAG} needs a file name")
            paths.append(argv[i + 1])
            i += 2
            continue
        if word.startswith(FLAG + "="):
            paths.append(word[len(FLAG) + 1:])
        else:
            rest.append(word)
        i += 1
    if len(paths) > 1:
        raise ConfigError(f"{FLAG} given {len(paths)} times: give one file")
    return (paths[0] if paths else None), rest


def read(path: str) -> dict:
    """The file's top-level table; YAML or TOML by its extension."""
    p = Path(path)
    if p.suffix not in (".yaml", ".yml", ".toml"):
        raise ConfigError(f"{FLAG} {path}: name a .yaml, .yml or .toml file")
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{FLAG} {path}: cannot read it ({getattr(e, 'strerror', None) or e})") from None
    try:
        if p.suffix == ".toml":
            data = tomllib.loads(text)
        else:
            import yaml
            data = yaml.safe_load(text)
    except Exception as e:  # yaml.YAMLError, tomllib.TOMLDecodeError: their messages span lines
        raise ConfigError(f"{path}: not valid {'TOML' if p.suffix == '.toml' else 'YAML'}: "
                          f"{' '.join(str(e).split())}") from None
    if data is None:  # an empty YAML file
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: want a mapping of flag names to values at the top, got {type(data).__name__}")
    return data


def given_on_command_line(action: argparse.Action, argv: list[str]) -> bool:
    return any(w == o or w.startswith(o + "=") for w in argv for o in action.option_strings)


def words(path: str, parser: Parser, argv: list[str]) -> list[str]:
    """The file's settings as command-line words for `parser` (a subcommand's), leaving out flags that `argv`
    (the real command line) gives. Each value is checked here by the flag's own type, the error naming the file."""
    actions = {o[2:]: a for a in parser._actions for o in a.option_strings if o.startswith("--")}
    actions.pop("help", None)
    actions.pop(FLAG[2:], None)
    out: list[str] = []
    for key, value in read(path).items():
        name = str(key).replace("_", "-")
        action = actions.get(name)
        if action is None:
            hint = did_you_mean(name, actions).replace("-", "_")
            raise ConfigError(f"{path}: unknown key {key!r}{hint}: the keys are "
                              f"`{parser.prog} --help`'s flags without the dashes")
        if given_on_command_line(action, argv):
            continue
        flag = f"--{name}"
        where = f"{path}: {key}"
        if action.nargs == 0:  # a switch (store_true)
            if not isinstance(value, bool):
                raise ConfigError(f"{where}: want true or false (a switch), got {value!r}")
            out += [flag] * value
            continue
        many = action.nargs in ("+", "*") or isinstance(action, argparse._AppendAction)
        if isinstance(value, list) and not many:
            raise ConfigError(f"{where}: takes one value, not a list")
        values = value if isinstance(value, list) else [value]
        if many and not values:
            raise ConfigError(f"{where}: an empty list: give values, or leave the key out")
        strings = [scalar(where, v) for v in values]
        for s in strings:  # the flag's own type and choices: the same refusal the command line gets
            check(parser, action, s, where)
        if action.nargs in ("+", "*") and len(strings) > 1:
            if any(s.startswith("-") for s in strings):  # argparse would read it as the next flag
                raise ConfigError(f"{where}: a value starting with '-' in a list: give it alone, or drop the '-'")
            out += [flag, *strings]
        else:  # --flag=value: a value starting with '-' is still the value
            out += [f"{flag}={s}" for s in strings]
    return out


def scalar(where: str, value) -> str:
    if isinstance(value, bool) or value is None or isinstance(value, (dict, list)):
        what = "null" if value is None else str(value).lower() if isinstance(value, bool) else type(value).__name__
        raise ConfigError(f"{where}: want a number or a string, got {what} (to keep the default, leave the key out)")
    return str(value)


def check(parser: Parser, action: argparse.Action, text: str, where: str) -> None:
    if text == "--" and action.nargs is None:  # as on the command line (api/parser.py): argparse stores no value
        raise ConfigError(f"{where}: '--' is not a value")
    try:
        value = action.type(text) if action.type else text
    except (argparse.ArgumentTypeError, TypeError, ValueError) as e:
        raise ConfigError(f"{where}: {e}") from None
    if action.choices is not None and value not in action.choices:
        raise ConfigError(f"{where}: {text!r} is not one of {', '.join(map(str, action.choices))}"
                          f"{did_you_mean(text, map(str, action.choices))}")
