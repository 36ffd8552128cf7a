"""Puts a GPU run's measurements beside the predictions written before it: each prediction of a
predictions file (JSON, written before the run) against the same number read from the run's
tables, with the verdict and what the plan said to do on each side of its decision.

    python bench/check_predictions.py RESULTS [RESULTS ...]
                                      [--predictions bench/results/predictions-next.json]
                                      [--out FILE.md]

RESULTS are the kit's ``results.tgz`` files (or folders holding its tables): every table a
prediction reads is looked for by name in all of them (the first call's and the second's); a
table in several (the probe's, where the second call probed again) is the last one's.

A prediction names its table (``table``: ``pointwise``, ``layers-fwd``, ``layers-fwdbwd``,
``model-fwd-graph``, ``model-fwd``, ``model-train-graph``, ``model-train``, ``probe``), the rows
(``layer`` and ``pass`` for the pointwise table; ``layer``, or ``shape`` (a prefix: ``pw 1x1``,
``dw``) with ``aggregate`` (``geomean``, ``max``, ``min``) for the layer tables; the probe's
name for the probe table), and its value: ``value`` [a, b] is a / b (``op``: ``ratio``, the
default) or a - b (``difference``), a single [a] the cell itself (us in the pointwise table, ms
in the others; the probe's status). ``predicted`` is a number (a point: the verdict is measured
/ predicted), [low, high] (within, below or above) or a status; ``decide_at`` (optional) the
value at which the plan's ``below`` and ``above`` (what to do) part.
"""
from __future__ import annotations

import json
import math
import re
import sys
import tarfile
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from condconv_kernels.cli import parser

HERE = Path(__file__).resolve().parent
DEFAULT = HERE / "results" / "predictions-next.json"
FILES = {"pointwise": "pointwise.json", "layers-fwd": "layers-b256-bf16-cl-fwd.json",
         "layers-fwdbwd": "layers-b256-bf16-cl-fwdbwd.json",
         "model-fwd-graph": "model-b256-amp-cl-fwd-graph.md",
         "model-fwd": "model-b256-amp-cl-fwd.md",
         "model-train-graph": "model-b256-amp-cl-train-graph.md",
         "model-train": "model-b256-amp-cl-train.md", "probe": "probe.md"}
AGGREGATES = ("geomean", "max", "min")


class Tables:
    """The run's tables by file name, read from results.tgz files and folders."""

    def __init__(self, sources: Sequence[str]):
        self.files: Dict[str, str] = {}
        for source in sources:
            path = Path(source)
            if path.is_dir():
                for f in sorted(path.rglob("*")):
                    if f.is_file() and f.name in FILES.values():
                        self.files[f.name] = f.read_text()
            elif tarfile.is_tarfile(path):
                with tarfile.open(path) as tar:
                    for m in tar.getmembers():
                        name = Path(m.name).name
                        if m.isfile() and name in FILES.values():
                            self.files[name] = tar.extractfile(m).read().decode()
            else:
                raise FileNotFoundError(f"RESULTS: {source} is neither a folder nor a tarball")

    def text(self, table: str) -> Optional[str]:
        return self.files.get(FILES[table])


def markdown_rows(text: str, first: str) -> List[Dict[str, str]]:
    """The rows of the first Markdown table in ``text`` whose header starts with column
    ``first``, as {column: cell}."""
    lines = text.splitlines()
    for i, line in enumerate(lines):
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and cells[0] == first:
            rows = []
            for body in lines[i + 2:]:
                if not body.startswith("|"):
                    break
                values = [c.strip() for c in body.strip().strip("|").split("|")]
                rows.append(dict(zip(cells, values)))
            return rows
    return []


def _number(cell) -> Optional[float]:
    try:
        return float(cell)
    except (TypeError, ValueError):
        return None


def _combine(p: dict, cells: Dict[str, Optional[float]]) -> Optional[float]:
    names = p["value"]
    vals = [cells.get(n) for n in names]
    if any(v is None for v in vals):
        return None
    if len(vals) == 1:
        return vals[0]
    if p.get("op", "ratio") == "difference":
        return vals[0] - vals[1]
    return vals[0] / vals[1] if vals[1] else None


def measure(p: dict, tables: Tables):
    """The measured value of prediction ``p`` (None where its table or cells are missing)."""
    text = tables.text(p["table"])
    if text is None:
        return None
    if p["table"] == "probe":
        rows = {r["probe"]: r for r in markdown_rows(text, "probe")}
        return rows.get(p["probe"], {}).get("status")
    if p["table"] == "pointwise":
        for r in json.loads(text)["layers"]:
            if r["layer"] == p["layer"] and r["pass"] == p["pass"]:
                return _combine(p, r["device_us"])
        return None
    if p["table"].startswith("layers-"):
        layers = json.loads(text)["layers"]
        if "layer" in p:
            layers = [r for r in layers if r["name"] == p["layer"]]
        else:
            layers = [r for r in layers if r["shape"].startswith(p["shape"])]
        values = [_combine(p, r["ms"]) for r in layers]
        if not values or any(v is None for v in values):
            return None
        agg = p.get("aggregate", "geomean") if len(values) > 1 or "shape" in p else None
        if agg == "geomean":
            if any(v <= 0 for v in values):
                return None
            return math.exp(sum(math.log(v) for v in values) / len(values))
        return max(values) if agg == "max" else min(values) if agg == "min" else values[0]
    rows = markdown_rows(text, "batch")  # the model tables: variant -> ms
    return _combine(p, {r["variant"]: _number(r.get("ms")) for r in rows})


def verdict(p: dict, measured) -> str:
    predicted = p["predicted"]
    if measured is None:
        return "missing"
    if isinstance(predicted, str):
        return "as predicted" if measured == predicted else f"not as predicted ({measured})"
    if isinstance(predicted, list):
        low, high = predicted
        return "within" if low <= measured <= high else "below" if measured < low else "above"
    return f"{measured / predicted:.2f}x the prediction" if predicted else "-"


def decision(p: dict, measured) -> str:
    if measured is None:  # (nothing measured: nothing decided)
        return ""
    if "decide_at" not in p or not isinstance(measured, (int, float)):
        if measured is not None and measured == p["predicted"]:
            return ""  # (a status as predicted: nothing to do)
        return p.get("then", "")
    side = "below" if measured <= p["decide_at"] else "above"
    return f"{side} {p['decide_at']:.3g}: {p.get(side, '')}"


def _fmt(v) -> str:
    if isinstance(v, list):
        return f"{_fmt(v[0])}-{_fmt(v[1])}"
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
    return "-" if v is None else str(v)


def check(predictions: dict, tables: Tables) -> List[dict]:
    """Every prediction with its measured value, verdict and decision."""
    out = []
    for p in predictions["predictions"]:
        m = measure(p, tables)
        out.append({**p, "measured": m, "verdict": verdict(p, m), "decision": decision(p, m)})
    return out


def validate(predictions: dict) -> None:
    """Raises ValueError naming the first malformed prediction."""
    for i, p in enumerate(predictions.get("predictions", [])):
        where = f"prediction {i} ({p.get('what', '?')})"
        if p.get("table") not in FILES:
            raise ValueError(f"{where}: table must be one of {', '.join(FILES)}")
        if p["table"] == "probe":
            if "probe" not in p or not isinstance(p.get("predicted"), str):
                raise ValueError(f"{where}: a probe prediction names its probe and a status")
            continue
        value = p.get("value")
        if not isinstance(value, list) or len(value) not in (1, 2):
            raise ValueError(f"{where}: value must be [a] or [a, b]")
        if p.get("op", "ratio") not in ("ratio", "difference"):
            raise ValueError(f"{where}: op must be ratio or difference")
        if p["table"] == "pointwise" and not {"layer", "pass"} <= set(p):
            raise ValueError(f"{where}: a pointwise prediction names its layer and pass")
        if p["table"].startswith("layers-") and ("layer" in p) == ("shape" in p):
            raise ValueError(f"{where}: a layer-table prediction names a layer or a shape")
        if p.get("aggregate", "geomean") not in AGGREGATES:
            raise ValueError(f"{where}: aggregate must be one of {', '.join(AGGREGATES)}")
        if ("shape" in p and p.get("op") == "difference"
                and p.get("aggregate", "geomean") == "geomean"):
            raise ValueError(f"{where}: a geomean of differences: give aggregate max or min")
        pred = p.get("predicted")
        if not (isinstance(pred, (int, float)) or (isinstance(pred, list) and len(pred) == 2
                                                    and pred[0] <= pred[1])):
            raise ValueError(f"{where}: predicted must be a number or [low, high]")


def report(results: List[dict], title: str) -> str:
    lines = [title, "", "| item | what | predicted | measured | verdict | then |",
             "|---|---|---|---|---|---|"]
    for r in results:
        lines.append("| " + " | ".join(re.sub(r"\s*\|\s*", " / ", str(c)) for c in (
            r.get("item", ""), r["what"], _fmt(r["predicted"]), _fmt(r["measured"]),
            r["verdict"], r["decision"])) + " |")
    counts = {}
    for r in results:
        key = r["verdict"].split(" (")[0] if not r["verdict"].endswith("prediction") else \
            "point"
        counts[key] = counts.get(key, 0) + 1
    lines += ["", "Verdicts: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))]
    return "\n".join(lines)


def main(argv: Sequence[str] = None) -> None:
    p = parser(__doc__)
    p.add_argument("results", nargs="+",
                   help="The run's results.tgz files or folders of its tables.")
    p.add_argument("--predictions", default=str(DEFAULT),
                   help="The predictions file (JSON) written before the run.")
    p.add_argument("--out", help="Write the table (Markdown) and the records (JSON beside it).")
    args = p.parse_args(argv)
    predictions = json.loads(Path(args.predictions).read_text())
    try:
        validate(predictions)
        tables = Tables(args.results)
    except (ValueError, FileNotFoundError) as exc:
        p.error(str(exc))
    results = check(predictions, tables)
    text = report(results, f"Predictions ({predictions.get('run', args.predictions)}) against "
                           f"the run's tables")
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
        Path(args.out).with_suffix(".json").write_text(json.dumps(results, indent=1))
    missing = sum(r["verdict"] == "missing" for r in results)
    if missing:
        print(f"{missing} predictions found no measurement", file=sys.stderr)


if __name__ == "__main__":
    main()
