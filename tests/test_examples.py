"""The example scripts in python/: a real training run (scikit-learn's digits) with the fused op's
handwritten backward, reaching high test accuracy, and its atomically written checkpoint."""
import importlib.util
import os

import pytest
import torch

from condconv_kernels.models import load_checkpoint

from conftest import CPU_BACKENDS

ROOT = os.path.join(os.path.dirname(__file__), "..")


def _script(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "python", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# The fused CPU kernels (the reference backend's training is the same autograd graph, checked
# against them gradient by gradient in test_op.py); the reference one without the extension.
@pytest.mark.parametrize("backend", CPU_BACKENDS[:1])
def test_train_digits_fast(tmp_path, backend):
    pytest.importorskip("sklearn")
    digits = _script("train_digits")
    path = str(tmp_path / "digits.safetensors")
    history = digits.train(epochs=6, backend=backend, save=path, progress=False)
    assert len(history["condconv"]) == len(history["static"]) == 6
    assert history["condconv"][-1] >= 0.95, history
    assert history["static"][-1] >= 0.95, history
    # The saved checkpoint reproduces the final accuracy.
    net = digits.DigitsNet(4, backend)
    load_checkpoint(net, path)
    x_train, y_train, x_test, y_test = digits.load_digits(0)
    assert digits.accuracy(net, x_test, y_test) == pytest.approx(history["condconv"][-1])
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".tmp")]


def test_train_digits_bad_arguments():
    digits = _script("train_digits")
    with pytest.raises(ValueError, match="'epochs'"):
        digits.train(epochs=0, progress=False)
    with pytest.raises(ValueError, match="'experts'"):
        digits.train(epochs=1, experts=0, progress=False)


@pytest.mark.parametrize("kind,epochs,floor", [("dynamic", 3, 0.85), ("odconv", 1, 0.0)])
def test_convert_resnet_fast(kind, epochs, floor):
    """Both converted networks learn the digits with DynamicConv (85% in three epochs), and the
    timing table has every cell. ODConv, whose attentions start each kernel at about an eighth
    of its scale, learns more slowly (~70% / ~45% in four epochs: a longer run than a test
    affords); one epoch checks that its conversion trains and times."""
    pytest.importorskip("sklearn")
    example = _script("convert_resnet")
    results = example.run(kind, experts=2, epochs=epochs, progress=False)
    assert set(results) == {"resnet", "mobilenetv2"}
    for name, r in results.items():
        assert len(r["accuracy"]) == epochs
        assert r["accuracy"][-1] >= floor, (name, r["accuracy"])
        for mode in ("inference", "training step"):
            assert r["ms"][mode]["fused"] > 0 and r["ms"][mode]["unfused"] > 0
