"""bench/check_predictions.py: the predictions written before a GPU run against its tables. The
committed predictions file is well formed; against the third H200 run's committed tables
(a folder, and the same files packed as the kit packs results.tgz) each kind of prediction
reads the number an independent computation from the same tables gives; malformed
predictions are refused by name."""
import importlib.util
import json
import math
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RUN = ROOT / "bench" / "results" / "gpu-h200" / "4c707b7"
spec = importlib.util.spec_from_file_location("check_predictions",
                                              ROOT / "bench" / "check_predictions.py")
cp = importlib.util.module_from_spec(spec)
spec.loader.exec_module(cp)


def _preds(*ps):
    return {"run": "test", "predictions": list(ps)}


PREDICTIONS = _preds(
    {"what": "a", "table": "layers-fwd", "shape": "", "value": ["fused:triton", "static"],
     "predicted": [1.0, 2.0], "decide_at": 1.2, "below": "met", "above": "unmet"},
    {"what": "b", "table": "layers-fwd", "shape": "dw", "aggregate": "max",
     "value": ["fused:cuda"], "predicted": 0.2},
    {"what": "c", "table": "pointwise", "layer": "s6.b1.expand", "pass": "grad_x",
     "value": ["batched", "dense"], "predicted": [0.5, 1.5]},
    {"what": "d", "table": "model-train-graph", "value": ["fused:triton", "static"],
     "predicted": [1.11, 1.2]},
    {"what": "e", "table": "model-fwd-graph", "value": ["fused:triton", "fused:triton+mix"],
     "op": "difference", "predicted": [0.1, 0.3], "decide_at": 0.0, "below": "off",
     "above": "on"},
    {"what": "f", "table": "pointwise", "layer": "s6.b1.expand", "pass": "forward",
     "value": ["wgmma", "dense"], "predicted": 0.3},
)


def _independent():
    """The same numbers from the tables, computed here."""
    layers = json.loads((RUN / "layers-b256-bf16-cl-fwd.json").read_text())["layers"]
    ratios = [r["ms"]["fused:triton"] / r["ms"]["static"] for r in layers]
    geomean = math.prod(ratios) ** (1 / len(ratios))
    dw_max = max(r["ms"]["fused:cuda"] for r in layers if r["shape"].startswith("dw"))
    pw = json.loads((RUN / "pointwise.json").read_text())["layers"]
    row = next(r for r in pw if r["layer"] == "s6.b1.expand" and r["pass"] == "grad_x")
    batched = row["device_us"]["batched"] / row["device_us"]["dense"]
    text = (RUN / "model-b256-amp-cl-train-graph.md").read_text()
    ms = {line.split("|")[2].strip(): float(line.split("|")[3]) for line in text.splitlines()
          if line.startswith("| 256 |")}
    graph = (RUN / "model-b256-amp-cl-fwd-graph.md").read_text()
    fwd = {line.split("|")[2].strip(): float(line.split("|")[3]) for line in graph.splitlines()
           if line.startswith("| 256 |")}
    return [geomean, dw_max, batched, ms["fused:triton"] / ms["static"],
            fwd["fused:triton"] - fwd["fused:triton+mix"], None]


@pytest.mark.parametrize("packed", [False, True])
def test_each_kind_reads_its_number(tmp_path, packed):
    source = RUN
    if packed:  # as the kit packs it: results/<table> in results.tgz
        source = tmp_path / "results.tgz"
        with tarfile.open(source, "w:gz") as tar:
            for f in RUN.iterdir():
                if f.is_file():
                    tar.add(f, arcname=f"results/{f.name}")
    results = cp.check(PREDICTIONS, cp.Tables([str(source)]))
    for r, want in zip(results, _independent()):
        if want is None:
            assert r["measured"] is None and r["verdict"] == "missing", r  # no wgmma column
        else:
            assert r["measured"] == pytest.approx(want, rel=1e-9), r["what"]
    a, b, c, d, e, _ = results
    assert a["verdict"] == "above" and a["decision"].startswith("above 1.2: unmet")
    assert b["verdict"] == f"{b['measured'] / 0.2:.2f}x the prediction"
    assert e["verdict"] == "within" and e["decision"] == "above 0: on"
    text = cp.report(results, "t")
    assert "| f | 0.3 | - | missing |" in text


def test_the_committed_predictions_are_well_formed_and_read_the_third_run():
    predictions = json.loads(cp.DEFAULT.read_text())
    cp.validate(predictions)
    results = cp.check(predictions, cp.Tables([str(RUN)]))
    assert len(results) == len(predictions["predictions"]) >= 40
    # the tables the third run had are read (its kernels predate the new columns)
    read = {r["table"] for r in results if r["verdict"] != "missing"}
    assert {"pointwise", "layers-fwd", "model-fwd-graph", "model-train"} <= read


def test_the_probe_table_is_read(tmp_path):
    spec = importlib.util.spec_from_file_location("hopper_probe",
                                                  ROOT / "bench" / "hopper_probe.py")
    hp = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hp)
    for call, status in (("first", "ok"), ("second", "hung")):  # the later call's wins
        (tmp_path / call).mkdir()
        (tmp_path / call / "probe.md").write_text("title\n\n" + hp.table({
            "cluster": {"status": "ok", "detail": "x", "seconds": 1.0},
            "kgrad": {"status": status, "detail": "x", "seconds": 1.0}}) + "\n")
    preds = _preds(*({"what": n, "table": "probe", "probe": n, "predicted": "ok"}
                     for n in ("cluster", "kgrad", "wgmma")))
    preds["predictions"][1]["then"] = "read the detail"
    cp.validate(preds)
    results = cp.check(preds, cp.Tables([str(tmp_path / "first"), str(tmp_path / "second")]))
    assert [r["verdict"] for r in results] == ["as predicted", "not as predicted (hung)",
                                               "missing"]
    assert results[0]["decision"] == "" and results[1]["decision"] == "read the detail"
    preds["predictions"][2]["then"] = "read the detail"
    assert cp.check(preds, cp.Tables([str(tmp_path / "first")]))[2]["decision"] == ""


@pytest.mark.parametrize("bad,message", [
    ({"table": "model"}, "table must be one of"),
    ({"table": "pointwise", "layer": "x", "pass": "forward", "value": "dense", "predicted": 1},
     "value must be"),
    ({"table": "pointwise", "value": ["dense"], "predicted": 1}, "names its layer and pass"),
    ({"table": "layers-fwd", "value": ["static"], "predicted": 1}, "names a layer or a shape"),
    ({"table": "layers-fwd", "shape": "dw", "value": ["static"], "predicted": [2, 1]},
     "predicted must be"),
    ({"table": "model-fwd", "value": ["a", "b"], "op": "sum", "predicted": 1}, "op must be"),
    ({"table": "probe", "probe": "cluster", "predicted": 1}, "names its probe and a status"),
    ({"table": "layers-fwd", "shape": "pw", "value": ["a", "b"], "op": "difference",
      "predicted": 1}, "a geomean of differences"),
])
def test_malformed_predictions_are_refused(bad, message):
    with pytest.raises(ValueError, match=message):
        cp.validate(_preds({"what": "w", **bad}))
