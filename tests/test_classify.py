"""condconv-classify end to end: a generated image, a checkpoint saved here, a labels map."""
import json

import pytest
import torch
from PIL import Image

from condconv_kernels.classify import classify, load_labels, main, preprocess
from condconv_kernels.models import create_model

MODEL = "tf_efficientnet_b0"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("classify")
    g = torch.Generator().manual_seed(0)
    pixels = (torch.rand(300, 400, 3, generator=g) * 255).to(torch.uint8)
    Image.frombytes("RGB", (400, 300), bytes(pixels.flatten().tolist())).save(d / "img.png")
    torch.manual_seed(1)
    model = create_model(MODEL)
    torch.save(model.state_dict(), d / "ckpt.pth")
    (d / "labels.json").write_text(json.dumps({str(i): f"label{i}" for i in range(1000)}))
    (d / "not_an_image.jpg").write_text("hello")
    return d, model


def test_preprocess_resize_crop_normalise():
    cfg = create_model(MODEL).pretrained_cfg
    img = Image.new("RGB", (500, 250), (255, 128, 0))
    x = preprocess(img, cfg)
    assert x.shape == (3, 224, 224)
    expected = (torch.tensor([1.0, 128 / 255, 0.0]) - torch.tensor(cfg["mean"])) / \
        torch.tensor(cfg["std"])
    assert torch.allclose(x.mean((1, 2)), expected, atol=1e-4)


def test_cli_top5_matches_direct_computation(files, capsys):
    d, model = files
    code = main(["--model", MODEL, "--checkpoint", str(d / "ckpt.pth"), "--image",
                 str(d / "img.png"), "--labels", str(d / "labels.json")])
    out = capsys.readouterr().out
    assert code == 0
    lines = [l for l in out.splitlines() if l.strip()[:2] in {"1.", "2.", "3.", "4.", "5."}]
    assert len(lines) == 5
    model.eval()
    with torch.no_grad():
        from condconv_kernels.classify import open_image
        x = preprocess(open_image(str(d / "img.png")), model.pretrained_cfg)[None]
        probs = torch.softmax(model(x), -1)[0]
    top = probs.topk(5)
    for line, p, i in zip(lines, top.values, top.indices):
        assert f"label{int(i)} (class {int(i)})" in line and f"{float(p):.4f}" in line


def test_cli_warns_without_checkpoint(files, capsys):
    d, _ = files
    assert main(["--model", MODEL, "--image", str(d / "img.png")]) == 0
    assert "RANDOM weights" in capsys.readouterr().err


@pytest.mark.parametrize("args,needle", [
    (["--image", "{d}/not_an_image.jpg"], "is not an image"),
    (["--image", "{d}/nothing.png"], "no file"),
    (["--image", "{d}/img.png", "--checkpoint", "{d}/nothing.pth"], "does not exist"),
    (["--image", "{d}/img.png", "--labels", "{d}/img.png"], "'labels'"),
])
def test_cli_errors(files, capsys, args, needle):
    d, _ = files
    code = main(["--model", MODEL] + [a.format(d=d) for a in args])
    assert code == 2 and needle in capsys.readouterr().err


def test_cli_unknown_model(files, capsys):
    d, _ = files
    assert main(["--model", "resnet50", "--image", str(d / "img.png")]) == 2
    assert "unknown model name" in capsys.readouterr().err


def test_api_classify_and_labels(files):
    d, model = files
    results = classify(model, str(d / "img.png"), load_labels(str(d / "labels.json")), topk=3)
    assert len(results) == 3 and results[0][2] >= results[1][2] >= results[2][2]
    assert results[0][1] == f"label{results[0][0]}"
