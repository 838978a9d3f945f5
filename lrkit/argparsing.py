"""The argument parsers of the `lrkit` subcommands: options spelled in full, errors in one line.

Every subcommand builds its parser here: `argument_parser` (jsonargparse) or `plain_argument_parser`
(argparse). Abbreviated options are refused (`--max_step` is an error, not `--max_steps`), and a
refused command line raises `CommandLineError`, whose text names the option and the fix::

    unrecognized option --max_step; did you mean --max_steps? (lrkit train --help lists every option)

`lrkit.cli.main` prints it as `lrkit train: error: ...` and exits with code 2.
"""

from __future__ import annotations

import argparse
import difflib
import re
import sys
from collections.abc import Sequence
from functools import cache


class CommandLineError(argparse.ArgumentError):
    """A refused command line or option value; `str(err)` is one line, `err.prog` the command."""

    def __init__(self, prog: str, message: str):
        super().__init__(None, message)
        self.prog = prog


class OneLineErrors:
    """Parser mixin: `error()` raises `CommandLineError` (one line) instead of printing the usage and exiting."""

    def error(self, message: str, ex: Exception | None = None):
        # A subparser's or nested parser's error reaches its parent again, as `ex` or as the exception handled
        # while the parent reports it: it is already in its final form.
        for reported in (ex, sys.exc_info()[1]):
            if isinstance(reported, CommandLineError):
                raise reported
        given = getattr(self, "_given", None) or getattr(self, "args", None) or []  # jsonargparse: `.args`
        raise CommandLineError(self.prog, describe_error(self, message, given)) from ex


class PlainArgumentParser(OneLineErrors, argparse.ArgumentParser):
    """`argparse.ArgumentParser` without abbreviations, with one-line errors (its subparsers too)."""

    def __init__(self, *args, allow_abbrev: bool = False, **kwargs):
        super().__init__(*args, allow_abbrev=allow_abbrev, **kwargs)

    def parse_known_args(self, args=None, namespace=None):
        self._given = list(sys.argv[1:] if args is None else args)  # for `error()`
        return super().parse_known_args(args, namespace)


@cache
def _jsonargparse_parser_class():
    from jsonargparse import ArgumentParser

    class JsonArgumentParser(OneLineErrors, ArgumentParser):
        """jsonargparse's `ArgumentParser` without abbreviations, with one-line errors."""

        def __init__(self, *args, allow_abbrev: bool = False, exit_on_error: bool = False, **kwargs):
            super().__init__(*args, allow_abbrev=allow_abbrev, exit_on_error=exit_on_error, **kwargs)

    return JsonArgumentParser


def argument_parser(prog: str, description: str | None = None, *, moved_keys: dict[str, str] | None = None, **kwargs):
    """A jsonargparse `ArgumentParser` for an lrkit subcommand (no abbreviations, one-line errors).

    `moved_keys` maps options that moved or were renamed (`options.alpha`) to their place now; giving an old
    one is an error that names the new one."""
    parser = _jsonargparse_parser_class()(prog=prog, description=description, **kwargs)
    parser.moved_keys = dict(moved_keys or {})
    return parser


def plain_argument_parser(prog: str, description: str | None = None, **kwargs) -> PlainArgumentParser:
    """An argparse `ArgumentParser` for an lrkit subcommand (no abbreviations, one-line errors)."""
    return PlainArgumentParser(prog=prog, description=description, **kwargs)


# ------------------------------------------------------------------------------------ messages

NON_FINITE = {"inf", "infinity", "nan"}  # what float() reads as infinite or NaN (jsonargparse refuses them as text)
_UNRECOGNIZED = "unrecognized arguments: "
_REQUIRED = "the following arguments are required: "
_UNKNOWN_KEY = re.compile(r"Option '(?P<key>[^']+)' is not accepted")  # a config file's or dict's key
_UNKNOWN_GROUP_KEY = re.compile(r"Group '(?P<group>[^']+)' does not accept option '(?P<key>[^']+)'")
# jsonargparse: 'Parser key "data.resolution":\n  Expected a <class 'int'>. Got value: abc', or for a union
# type '... Subtypes: [<class 'int'>, <class 'NoneType'>] ... Given value: abc' (after the class names are shortened)
_BAD_VALUE = re.compile(r'Parser key "(?P<key>[^"]+)":\s*(?:Expected an? (?P<expected>[\w.]+)\. Got value: '
                        r"|Does not validate against any of the Union subtypes\s*Subtypes: \[(?P<union>[^\]]+)\].*"
                        r"Given value: )(?P<value>.*)", re.S)


def describe_error(parser: argparse.ArgumentParser, message: str, given: Sequence[str] = ()) -> str:
    """`message` of argparse or jsonargparse as one line, with the closest real option for an unknown one.

    `given` is the command line parsed: a missing required option there is reported as the misspelled one."""
    known = {s for a in _all_actions(parser) for s in a.option_strings}
    options = sorted(s for s in known if not s.endswith("+"))  # the suggestions; `--key+` appends to a list
    if message.startswith(_UNRECOGNIZED):
        return _unrecognized(parser, message[len(_UNRECOGNIZED):].split(), options)
    if message.startswith(_REQUIRED):
        unknown = [w for w in given if re.match(r"--?[A-Za-z]", w) and w.split("=", 1)[0] not in known]
        if unknown:
            return _unrecognized(parser, unknown, options)
        flags = {a.dest: a.option_strings[-1] for a in parser._actions if a.option_strings}  # jsonargparse names dests
        flags.update({a.dest: f"a subcommand ({', '.join(a.choices)})" for a in parser._actions
                      if isinstance(a, argparse._SubParsersAction)})
        names = [flags.get(name, name) for name in message[len(_REQUIRED):].split(", ")]
        return f"missing {', '.join(names)} ({parser.prog} --help lists every option)"
    match = _UNKNOWN_KEY.fullmatch(message) or _UNKNOWN_GROUP_KEY.fullmatch(message)
    if match:
        key = ".".join(part for part in (match.groupdict().get("group"), match["key"]) if part)
        moved = _moved(parser, key)
        if moved:
            return f"key {key} is now {moved} (in a YAML config: nested under its group)"
        keys = [a.dest for a in _all_actions(parser) if a.dest not in (argparse.SUPPRESS, "help", "config")]
        return f"unrecognized key {key}" + _did_you_mean(key, keys)
    message = re.sub(r"<class '(?:builtins\.)?([\w.]+)'>", r"\1", message).replace("NoneType", "None")
    message = re.sub(r"typing\.Literal\[([^\]]*)\]", lambda m: m[1].replace("'", ""), message)  # its values
    bad_value = _BAD_VALUE.fullmatch(message)
    if bad_value:
        kinds = [bad_value["expected"]] if bad_value["expected"] else bad_value["union"].split(", ")
        expected = _one_of(kinds)
        if "float" in kinds and bad_value["value"].strip().lower().lstrip("+-") in NON_FINITE:
            return f"--{bad_value['key']} must be a finite number, got {bad_value['value']!r}"
        return f"--{bad_value['key']}: expected {expected}, got {bad_value['value']!r}"
    message = re.sub(r'Parser key "([^"]+)":', r"--\1:", message)
    return " ".join(message.split())


def _one_of(kinds: list[str]) -> str:
    """What a value may be, in the words of a YAML file or command line: `bool` as true or false."""
    words = [w for kind in kinds for w in (["true", "false"] if kind == "bool" else [kind])]
    return words[0] if len(words) == 1 else f"{', '.join(words[:-1])} or {words[-1]}"


def suggest(given: str, choices: list[str]) -> str | None:
    """The closest of `choices` to `given` (difflib), or the only choice `given` abbreviates, or None."""
    close = difflib.get_close_matches(given, choices, n=1, cutoff=0.6)
    if close:
        return close[0]
    longer = [c for c in choices if c.startswith(given)]
    return longer[0] if len(longer) == 1 else None


def _did_you_mean(given: str, choices: list[str]) -> str:
    match = suggest(given, choices)
    return f"; did you mean {match}?" if match else ""


def _moved(parser: argparse.ArgumentParser, key: str) -> str | None:
    """Where an option that moved or was renamed lives now (`moved_keys` given to `argument_parser`)."""
    return getattr(parser, "moved_keys", {}).get(key)


def _unrecognized(parser: argparse.ArgumentParser, words: list[str], options: list[str]) -> str:
    hint = f"({parser.prog} --help lists every option)"
    given = [w.split("=", 1)[0] for w in words if re.match(r"--?[A-Za-z]", w)]
    if not given:
        return f"unrecognized argument {' '.join(words)!r} {hint}"
    moved = [(g, m) for g in given if (m := _moved(parser, g.lstrip("-")))]
    if moved:
        return f"option {moved[0][0]} is now --{moved[0][1]} {hint}"
    if len(given) == 1:
        return f"unrecognized option {given[0]}{_did_you_mean(given[0], options)} {hint}"
    named = [f"{g} (did you mean {s}?)" if (s := suggest(g, options)) else g for g in given]
    return f"unrecognized options {', '.join(named)} {hint}"


def _all_actions(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    """The parser's actions and those of its subcommands."""
    actions = []
    for action in parser._actions:
        actions.append(action)
        if isinstance(action, argparse._SubParsersAction):
            for sub in dict.fromkeys(action.choices.values()):
                actions += _all_actions(sub)
    return actions


__all__ = ["CommandLineError", "argument_parser", "describe_error", "plain_argument_parser", "suggest"]
