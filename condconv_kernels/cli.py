"""The one way the package's commands (and the scripts in python/ and bench/) build their
argument parsers, so that every ``--help`` reads the same way: the module docstring's first
paragraph as the description, the rest of it (usage examples, notes) after the options, each
option's help a sentence, and each default shown."""
from __future__ import annotations

import argparse
import textwrap
from typing import Optional

__all__ = ["parser", "first_paragraph", "add_timing_arguments"]


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


def add_timing_arguments(p: argparse.ArgumentParser, device: str = "cpu",
                         min_run_time: float = 0.5,
                         backward: str = "Also time forward + backward (a training step without "
                                         "the optimizer).") -> None:
    """The options every timing command shares: --device, --dtype, --backward (its help given:
    whether it adds the backward or replaces the forward by forward + backward), --input-size,
    --min-run-time (``device="auto"`` adds the choice of the GPU when there is one)."""
    devices = (["auto"] if device == "auto" else []) + ["cpu", "cuda"]
    p.add_argument("--device", default=device, choices=devices,
                   help="Where to run" + ("; auto is the GPU when there is one." if device ==
                                          "auto" else "."))
    p.add_argument("--dtype", default="float32", choices=["bfloat16", "float16", "float32"],
                   help="The dtype of the model (its parameters) and its input.")
    p.add_argument("--backward", action="store_true", help=backward)
    p.add_argument("--input-size", type=int, help="The image side (default: the model's own).")
    p.add_argument("--min-run-time", type=float, default=min_run_time,
                   help="Seconds of timed calls per measurement.")
