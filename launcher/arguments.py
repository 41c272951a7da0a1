"""How the `shardtune` command line's words become a command function's arguments.

Each command is a plain function; its signature is its interface. A parameter without a default is a
positional word (or `--name VALUE`), `*overrides` takes the remaining `key=value` words wherever they
stand, and a parameter with a default is `--name VALUE` or `--name=VALUE`. A bool is `--name` (true),
`--name=false` or `--noname`. Values are converted by the parameter's annotation (int, float, str,
optionally None).

Built on argparse rather than fire: fire imports asyncio, a sixth of `shardtune plan`'s 0.5 s, and reads
the word after a bare `--json` as its value, which swallowed a following override.
"""
from __future__ import annotations

import argparse
import inspect
import sys
import typing
from collections.abc import Callable

TRUE, FALSE = ("true", "1", "yes"), ("false", "0", "no")
WORDS = "words"  # where argparse collects the positional words, in order


def _bool(text: str) -> bool:
    if text.lower() in TRUE:
        return True
    if text.lower() in FALSE:
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _converter(annotation) -> Callable[[str], object]:
    """str -> the annotated type; `X | None` converts as X (None is the default, never typed)."""
    kinds = [a for a in typing.get_args(annotation) if a is not type(None)] or [annotation]
    kind = kinds[0] if len(kinds) == 1 else str
    if kind is bool:
        return _bool
    if kind in (int, float):
        return kind
    return str


def _parser(name: str, command: Callable) -> tuple[argparse.ArgumentParser, set[str]]:
    """The parser of one command and the names of its bool options. Positional words are collected in
    order and matched to parameters by `call`, since a positional parameter may also be given as --name."""
    target = inspect.unwrap(command)
    hints = typing.get_type_hints(target)
    params = list(inspect.signature(target).parameters.values())
    words = [p.name.upper() for p in params if p.default is p.empty and p.kind is not p.VAR_POSITIONAL]
    words += ["[KEY=VALUE ...]"] if any(p.kind is p.VAR_POSITIONAL for p in params) else []
    parser = argparse.ArgumentParser(prog=f"shardtune {name}", usage=f"shardtune {name} {' '.join(words)} [options]",
                                     description=inspect.getdoc(target) or "",
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(WORDS, nargs="*", default=[], help=argparse.SUPPRESS)
    switches = set()
    for param in params:
        if param.kind is param.VAR_POSITIONAL:
            continue
        convert = _converter(hints.get(param.name, str))
        if convert is _bool:
            switches.add(param.name)
        given = "required unless given as a word" if param.default is param.empty else f"default {param.default!r}"
        parser.add_argument(f"--{param.name}", type=convert, default=param.default,
                            metavar="BOOL" if convert is _bool else param.name.upper(), help=given)
    return parser, switches


def _spell_switches(words: list[str], switches: set[str]) -> list[str]:
    """`--json` -> `--json=true` and `--nojson` -> `--json=false`, so a switch never takes the next word."""
    out = []
    for word in words:
        bare = word[2:] if word.startswith("--") else None
        if bare in switches:
            word = f"--{bare}=true"
        elif bare and bare.startswith("no") and bare[2:] in switches:
            word = f"--{bare[2:]}=false"
        out.append(word)
    return out


def commands_help(commands: dict[str, Callable]) -> str:
    lines = ["usage: shardtune COMMAND [ARGS...]   (shardtune COMMAND --help for one command)", "", "commands:"]
    for name, command in commands.items():
        summary = (inspect.getdoc(inspect.unwrap(command)) or "").split("\n")[0]
        lines.append(f"  {name:<10} {summary}")
    return "\n".join(lines)


def call(commands: dict[str, Callable], argv: list[str]) -> object:
    """Run the command argv names with the rest of argv as its arguments; usage errors exit 2, --help 0."""
    if not argv or argv[0] in ("-h", "--help"):
        print(commands_help(commands))
        raise SystemExit(0 if argv else 2)
    name, words = argv[0], argv[1:]
    if name not in commands:
        print(f"shardtune: no command {name!r}\n\n{commands_help(commands)}", file=sys.stderr)
        raise SystemExit(2)
    parser, switches = _parser(name, commands[name])
    args = vars(parser.parse_intermixed_args(_spell_switches(words, switches)))
    free = list(args.pop(WORDS))
    positional, named = [], {}
    for param in inspect.signature(inspect.unwrap(commands[name])).parameters.values():
        if param.kind is param.VAR_POSITIONAL:
            positional, free = positional + free, []
        elif param.default is not param.empty:
            named[param.name] = args[param.name]
        elif args[param.name] is not param.empty:
            positional.append(args[param.name])
        elif free:
            positional.append(free.pop(0))
        else:
            parser.error(f"the following arguments are required: {param.name}")
    if free:
        parser.error(f"unrecognized arguments: {' '.join(free)}")
    return commands[name](*positional, **named)
