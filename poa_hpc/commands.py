"""The registry of ``poa`` subcommands: a subcommand is one class next to the code it drives.

    from poa_hpc.commands import register_command

    @register_command("data pack")            # words: `poa data pack`
    class PackCommand:
        '''Pack a folder of images into tar shards.'''   # first line = the --help summary

        @staticmethod
        def add_arguments(parser: argparse.ArgumentParser) -> None: ...

        @staticmethod
        def run(args: argparse.Namespace) -> int: ...     # the exit code

Its module is listed once in :data:`poa_hpc.cli.COMMAND_MODULES`; ``poa`` imports those modules,
and builds one parser from what they registered (a name of several words becomes nested
subcommands: ``poa eval knn``).  A command module imports torch and friends inside ``run`` so
that ``poa --help`` stays fast.  Errors: raise a :mod:`poa_hpc.errors` type, which ends ``poa``
with a one-line message and that type's exit code.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Callable, Dict, Tuple


@dataclass(frozen=True)
class Command:
    words: Tuple[str, ...]
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]
    description: str = ""


_COMMANDS: Dict[Tuple[str, ...], Command] = {}


def register_command(name: str) -> Callable[[type], type]:
    """Class decorator: register the class's ``add_arguments`` and ``run`` as ``poa <name>``."""
    words = tuple(name.split())

    def wrap(cls: type) -> type:
        if words in _COMMANDS:
            raise ValueError(f"poa command '{name}' is registered twice")
        doc = (cls.__doc__ or "").strip()
        _COMMANDS[words] = Command(words=words, help=doc.splitlines()[0] if doc else "",
                                   add_arguments=cls.add_arguments, run=cls.run, description=doc)
        return cls

    return wrap


def registered_commands() -> Dict[Tuple[str, ...], Command]:
    return dict(sorted(_COMMANDS.items()))


def add_registered(subparsers: argparse._SubParsersAction, groups: Dict[Tuple[str, ...], argparse._SubParsersAction]) -> None:
    """Add every registered command under ``subparsers`` (``groups`` maps a word prefix, e.g.
    ``("eval",)``, to the subparsers of an existing group, so new commands can join it)."""
    for words, cmd in registered_commands().items():
        parent = subparsers
        for i in range(1, len(words)):
            prefix = words[:i]
            if prefix not in groups:
                g = parent.add_parser(words[i - 1], help=f"{' '.join(prefix)} subcommands")
                groups[prefix] = g.add_subparsers(dest="_".join(prefix) + "_command", required=True)
            parent = groups[prefix]
        p = parent.add_parser(words[-1], help=cmd.help, description=cmd.description,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
        cmd.add_arguments(p)
        p.set_defaults(func=cmd.run)
