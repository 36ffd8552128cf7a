"""Released weights without a network: the download is pointed at checkpoints this test writes
(named with their hash prefix, as the released files are), into a private torch hub cache."""
import hashlib
import os

import pytest
import torch
from PIL import Image

from condconv_kernels.classify import imagenet_labels, main
from condconv_kernels.models import create_model
from condconv_kernels.models import pretrained as pt

NAME = "tf_efficientnet_cc_b0_4e"


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A checkpoint of NAME named <name>-<sha256 prefix>.pth, a corrupt twin with the same
    name in another folder, and the model that wrote it."""
    d = tmp_path_factory.mktemp("served")
    torch.manual_seed(3)
    model = create_model(NAME)
    tmp = d / "tmp.pth"
    torch.save(model.state_dict(), tmp)
    digest = hashlib.sha256(tmp.read_bytes()).hexdigest()
    good = d / "good" / f"{NAME}-{digest[:8]}.pth"
    good.parent.mkdir()
    tmp.rename(good)
    bad = d / "bad" / good.name
    bad.parent.mkdir()
    data = bytearray(good.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte
    bad.write_bytes(bytes(data))
    return good, bad, model


@pytest.fixture
def hub(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)
    return tmp_path / "torch" / "hub" / "checkpoints"


def _serve(monkeypatch, path):
    monkeypatch.setitem(pt.PRETRAINED_URLS, NAME, path.resolve().as_uri())


def test_pretrained_downloads_checks_caches_and_loads(served, hub, monkeypatch):
    good, _, source = served
    _serve(monkeypatch, good)
    model = create_model(NAME, pretrained=True)
    assert (hub / good.name).is_file()
    for (k, v), (k2, v2) in zip(model.state_dict().items(), source.state_dict().items()):
        assert k == k2 and torch.equal(v, v2), k
    # From the cache the second time: the served file is no longer needed.
    monkeypatch.setitem(pt.PRETRAINED_URLS, NAME, "http://127.0.0.1:9/" + good.name)
    again = create_model(NAME, pretrained=True)
    assert torch.equal(again.conv_stem.weight, source.conv_stem.weight)


def test_corrupt_download_is_rejected_and_not_cached(served, hub, monkeypatch):
    _, bad, _ = served
    _serve(monkeypatch, bad)
    with pytest.raises(RuntimeError, match="corrupt"):
        create_model(NAME, pretrained=True)
    assert not hub.exists() or os.listdir(hub) == []


def test_offline_says_where_to_put_the_file_and_a_file_put_there_loads(served, hub,
                                                                       monkeypatch):
    good, bad, source = served
    monkeypatch.setitem(pt.PRETRAINED_URLS, NAME, "http://127.0.0.1:9/" + good.name)
    with pytest.raises(RuntimeError, match="put it at") as info:
        create_model(NAME, pretrained=True)
    target = str(hub / good.name)
    assert target in str(info.value)
    hub.mkdir(parents=True, exist_ok=True)
    (hub / good.name).write_bytes(bad.read_bytes())  # a wrong file put there by hand
    with pytest.raises(RuntimeError, match="delete it"):
        create_model(NAME, pretrained=True)
    (hub / good.name).write_bytes(good.read_bytes())
    model = create_model(NAME, pretrained=True)
    assert torch.equal(model.classifier.weight, source.classifier.weight)


@pytest.mark.parametrize("kwargs,needle", [
    (dict(name="tf_efficientnet_b0"), "has no released weights"),
    (dict(name=NAME, condconv=False), "condconv=False"),
    (dict(name=NAME, num_classes=10), "num_classes=10"),
    (dict(name=NAME, pretrained_path="x.pth"), "not both"),
])
def test_pretrained_bad_requests_name_the_argument(kwargs, needle, hub):
    with pytest.raises(ValueError, match="pretrained") as info:
        create_model(pretrained=True, **kwargs)
    assert needle in str(info.value)


def test_imagenet_labels_shipped():
    labels = imagenet_labels()
    assert len(labels) == 1000 and labels[0] == "tench" and labels[388] == "giant panda"
    assert labels[999] == "toilet tissue"


def test_classify_cli_pretrained_prints_imagenet_labels(served, hub, monkeypatch, tmp_path,
                                                       capsys):
    good, _, source = served
    _serve(monkeypatch, good)
    g = torch.Generator().manual_seed(5)
    pixels = (torch.rand(240, 260, 3, generator=g) * 255).to(torch.uint8)
    Image.frombytes("RGB", (260, 240), bytes(pixels.flatten().tolist())).save(tmp_path / "i.png")
    assert main(["--model", NAME, "--pretrained", "--image", str(tmp_path / "i.png")]) == 0
    out, err = capsys.readouterr()
    assert "RANDOM" not in err
    labels = imagenet_labels()
    from condconv_kernels.classify import classify
    top = classify(source, str(tmp_path / "i.png"), labels)
    for rank, (index, label, prob) in enumerate(top, 1):
        assert f"{rank}. {label} (class {index}): {prob:.4f}" in out
