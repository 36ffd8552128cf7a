"""The one way the package's commands (and the scripts in python/ and bench/) build their
argument parsers, so that every ``--help`` reads the same way: the module docstring's first
paragraph as the description, the rest of it (usage examples, notes) after the options, each
option's help a sentence, and each default shown."""
from __future__ import annotations

import argparse
import textwrap
from typing import Optional

__all__ = ["parser", "first_paragraph"]


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults appended to the help of options that have one; description and epilog kept as
    written (they are wrapped here once, so that the examples keep their line breaks)."""

    def _get_help_string(self, action):
        # Only real defaults: not None/False (flags, optional paths) and not suppressed.
        if action.default is None or action.default is False \
                or action.default is argparse.SUPPRESS:
            return action.help
        return super()._get_help_string(action)


def first_paragraph(doc: str) -> str:
    """The first paragraph of a docstring as one line."""
    return " ".join(textwrap.dedent(doc).strip().split("\n\n")[0].split())


def parser(doc: str, prog: Optional[str] = None) -> argparse.ArgumentParser:
    """An ``ArgumentParser`` described by ``doc`` (a module docstring): its first paragraph
    before the options, the rest after them."""
    text = textwrap.dedent(doc).strip()
    head, _, rest = text.partition("\n\n")
    description = textwrap.fill(" ".join(head.split()), width=90)
    return argparse.ArgumentParser(prog=prog, description=description,
                                   epilog=rest.strip("\n").rstrip() or None,
                                   formatter_class=_Formatter)
