"""argparse as every `jitney` command uses it: one-line errors, a "did you mean" for typos, no abbreviations.

Abbreviations are off (allow_abbrev=False): argparse would take `--max-num-seq` for `--max-num-seqs`, and the
same prefix would silently change meaning the day a second flag starts with it; a typo is refused instead,
with the flag it was probably meant to be.
"""
from __future__ import annotations

import argparse
import difflib
import re


def did_you_mean(word: str, options) -> str:
    """' (did you mean X?)' for the closest of `options`, '' when none is close."""
    close = difflib.get_close_matches(word, list(options), n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else ""


class Parser(argparse.ArgumentParser):
    """argparse, with its errors in one line (the usage it prints first buries the line that matters)."""

    def __init__(self, *args, error_prefix: str = "jitney", **kw):
        kw.setdefault("allow_abbrev", False)
        super().__init__(*args, **kw)
        self.error_prefix = error_prefix

    def error(self, message: str):
        self.exit(2, f"{self.error_prefix}: error: {self.explain(message)} (see {self.prog} --help)\n")

    def explain(self, message: str) -> str:
        """argparse's message with a suggestion for each unknown flag or value."""
        if message.startswith("unrecognized arguments: "):
            unknown = message.removeprefix("unrecognized arguments: ").split()
            flags = [w for w in unknown if w.startswith("-")] or unknown
            first = flags[0].partition("=")[0]
            return (f"unrecognized argument {first}{did_you_mean(first, self._option_string_actions)}"
                    if first.startswith("-") else f"unrecognized arguments: {' '.join(unknown)}")
        choice = re.match(r"(argument .*?: invalid choice: '(.*)') \(choose from (.*)\)$", message)
        if choice:
            head, value, listed = choice.groups()
            options = [o.strip().strip("'") for o in listed.split(",")]
            return f"{head}{did_you_mean(value, options) or ' (choose from ' + ', '.join(options) + ')'}"
        return message

    def _get_values(self, action, arg_strings):
        # argparse drops a "--" value (`--api-key=--`, `--host=--`) and stores [] without calling the flag's type,
        # so no check of api/flags.py runs: an empty key list would read as keys on, an empty host as every interface.
        if action.option_strings and action.nargs is None and arg_strings == ["--"]:
            self.error(f"argument {action.option_strings[-1]}: '--' is not a value")
        return super()._get_values(action, arg_strings)
