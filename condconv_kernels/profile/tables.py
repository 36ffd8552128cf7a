"""The one way the benchmarks and the profiler write their results: markdown table rows, the
geometric mean of a column, the line naming the machine, and a result file (the command that
made it, the table, and optionally every number as JSON beside it)."""
from __future__ import annotations

import json
import math
import os
from typing import Iterable, Mapping, Optional, Sequence

__all__ = ["geomean", "row", "header", "machine_line", "write_result"]


def geomean(values: Iterable[float]) -> float:
    """Geometric mean of the positive values (NaN when there are none)."""
    values = [v for v in values if v and v > 0]
    return math.exp(sum(map(math.log, values)) / len(values)) if values else float("nan")


def row(cells: Iterable[object]) -> str:
    """One markdown table row."""
    return "| " + " | ".join(str(c) for c in cells) + " |"


def header(names: Sequence[str]) -> list:
    """A markdown table's header row and its separator."""
    return [row(names), "|" + "---|" * len(names)]


def machine_line(info: Optional[Mapping[str, object]] = None) -> str:
    """``machine: key value, ...`` for :func:`condconv_kernels.profile.machine_info`."""
    if info is None:
        from .timing import machine_info
        info = machine_info()
    return "machine: " + ", ".join(f"{k} {v}" for k, v in info.items())


def write_result(path: str, text: str, command: Optional[str] = None,
                 record: Optional[object] = None) -> None:
    """Writes ``text`` (after ``Command: `command``` when given, its paths under the working
    directory made relative to it) to ``path``, and ``record`` as JSON to the same path with
    the extension ``.json`` when given."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if command:
        command = command.replace(os.getcwd() + os.sep, "")
    with open(path, "w") as f:
        f.write((f"Command: `{command}`\n\n" if command else "") + text + "\n")
    if record is not None:
        with open(os.path.splitext(path)[0] + ".json", "w") as f:
            json.dump(record, f, indent=1)
