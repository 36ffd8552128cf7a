"""EfficientNet / EfficientNet-CondConv: timm parity (parameter counts, state-dict keys and
shapes, logits of the timm fixture), checkpoint loading, block strings, compound scaling."""
import json
import os

import pytest
import torch

import condconv_kernels as cc
from condconv_kernels.models import (BlockArgs, EfficientNet, create_model, decode_block_string,
                                     encode_block_string, list_models, load_checkpoint)
from condconv_kernels.models import scaling

# The timm reference fixture lives beside the checkout (../shared); CONDCONV_FIXTURES overrides.
FIXTURE = os.environ.get("CONDCONV_FIXTURES", os.path.join(
    os.path.dirname(__file__), "..", "..", "shared", "fixtures", "timm"))
NAME = "tf_efficientnet_cc_b0_4e"

# timm's parameter counts.
TIMM_PARAMS = {
    "tf_efficientnet_b0": 5_288_548, "tf_efficientnet_cc_b0_4e": 13_314_116,
    "tf_efficientnet_cc_b0_8e": 24_013_284, "tf_efficientnet_cc_b1_8e": 39_715_968,
    "tf_efficientnet_b1": 7_794_184, "tf_efficientnet_b2": 9_109_994,
    "tf_efficientnet_b3": 12_233_232, "tf_efficientnet_b4": 19_341_616,
    "tf_efficientnet_b5": 30_389_784, "tf_efficientnet_b6": 43_040_704,
    "tf_efficientnet_b7": 66_347_960,
}


def _params(model):
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name,count", TIMM_PARAMS.items())
def test_parameter_count_equals_timm(name, count):
    assert _params(create_model(name)) == count
    assert _params(create_model(name.replace("tf_", ""))) == count


def test_every_model_has_its_preprocessing():
    for name in list_models():
        cfg = create_model(name, num_classes=10).pretrained_cfg
        assert cfg["input_size"][0] == 3 and 0.8 < cfg["crop_pct"] <= 1.0
        # timm's EfficientNets resize bicubically, torchvision's ResNet / MobileNetV2 bilinearly.
        want = "bilinear" if name.startswith(("resnet", "mobilenet")) else "bicubic"
        assert cfg["interpolation"] == want and len(cfg["mean"]) == 3
    assert create_model("tf_efficientnet_cc_b1_8e").pretrained_cfg["input_size"] == (3, 240, 240)
    assert create_model("tf_efficientnet_b7").pretrained_cfg["input_size"] == (3, 600, 600)


def test_state_dict_matches_timm_manifest():
    with open(os.path.join(FIXTURE, f"{NAME}.manifest.json")) as f:
        manifest = json.load(f)
    state = create_model(NAME).state_dict()
    assert list(state) == list(manifest["state_dict_shapes"])  # same keys, same order
    for key, shape in manifest["state_dict_shapes"].items():
        assert list(state[key].shape) == shape, key
    assert _params(create_model(NAME)) == manifest["num_params"]


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_timm_fixture_logits_and_features(backend):
    if backend not in cc.available_backends("cpu"):
        pytest.fail(f"backend {backend} is not available: the extension must be built")
    from safetensors.torch import load_file
    model = create_model(NAME, backend=backend,
                         pretrained_path=os.path.join(FIXTURE, f"{NAME}.weights.safetensors"))
    model.eval()
    io = load_file(os.path.join(FIXTURE, f"{NAME}.io.safetensors"))
    with torch.no_grad():
        features = model.forward_features(io["input"])
        logits = model.forward_head(features)
    errors = _rel(logits, io["logits"]), _rel(features, io["features"])
    print(f"{backend}: logits rel err {errors[0]:.2e}, features rel err {errors[1]:.2e}")
    assert errors[0] < 1e-4 and errors[1] < 1e-4


def test_checkpoint_roundtrip_pth_and_safetensors(tmp_path):
    from safetensors.torch import save_file
    torch.manual_seed(0)
    a = create_model("efficientnet_cc_b0_4e", num_classes=7).eval()
    b_pth = create_model("efficientnet_cc_b0_4e", num_classes=7).eval()
    b_st = create_model("efficientnet_cc_b0_4e", num_classes=7).eval()
    torch.save({"state_dict": a.state_dict()}, tmp_path / "m.pth")
    save_file({k: v.contiguous() for k, v in a.state_dict().items()}, str(tmp_path / "m.safetensors"))
    load_checkpoint(b_pth, str(tmp_path / "m.pth"))
    load_checkpoint(b_st, str(tmp_path / "m.safetensors"))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(a(x), b_pth(x)) and torch.equal(a(x), b_st(x))


def test_checkpoint_errors_leave_model_untouched(tmp_path):
    model = create_model("tf_efficientnet_cc_b0_8e")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_checkpoint(model, str(tmp_path / "missing.pth"))
    (tmp_path / "bad.pth").write_bytes(b"this is not a checkpoint")
    with pytest.raises(ValueError, match="could not read checkpoint"):
        load_checkpoint(model, str(tmp_path / "bad.pth"))
    (tmp_path / "bad.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match="could not read checkpoint"):
        load_checkpoint(model, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ValueError, match=r"shape mismatches .*routing_fn"):
        load_checkpoint(model, os.path.join(FIXTURE, f"{NAME}.weights.safetensors"))
    other = create_model("tf_efficientnet_b0").state_dict()
    torch.save(other, tmp_path / "b0.pth")
    with pytest.raises(ValueError, match="unexpected keys|missing keys"):
        load_checkpoint(model, str(tmp_path / "b0.pth"))
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), f"{k} changed by a failed load"


def test_unknown_model_name():
    with pytest.raises(ValueError, match="unknown model name 'efficientnet_b9'"):
        create_model("efficientnet_b9")


@pytest.mark.parametrize("text", ["ds_r1_k3_s1_e1_c16_se0.25", "ir_r4_k5_s2_e6_c192_se0.25_cc4",
                                  "ir_r1_k3_s1_e6_c320_noskip"])
def test_block_string_roundtrip(text):
    args = decode_block_string(text)
    assert decode_block_string(encode_block_string(args)) == args
    assert decode_block_string("ir_r4_k5_s2_e6_c192_se0.25_cc4", 2).num_experts == 8


@pytest.mark.parametrize("bad", ["xx_r1", "ir_r1_q3", "ir_r0_k3_c8"])
def test_block_string_errors(bad):
    with pytest.raises(ValueError):
        decode_block_string(bad)


def test_custom_blocks_and_experts_anywhere():
    """Experts in the first stages too; builder from BlockArgs; forward and backward run."""
    stages = [BlockArgs("ds", 1, 3, 1, 1, 16, 0.25, num_experts=2),
              BlockArgs("ir", 2, 5, 2, 4, 24, None, num_experts=3),
              BlockArgs("ir", 1, 3, 2, 6, 32, 0.25)]
    model = EfficientNet(stages, num_classes=5, head_channels=64)
    x = torch.randn(2, 3, 32, 32)
    out = model(x)
    assert out.shape == (2, 5)
    out.sum().backward()
    assert model.blocks[1][0].conv_dw.weight.grad is not None
    assert model.blocks[1][0].conv_dw.weight.shape == (3, 16 * 4 * 25)


def test_tf_same_padding_is_asymmetric_for_stride2():
    """tf_ models pad (0, 1) on 224 -> 112 with a 3x3/2 stem; torch-style models pad (1, 1)."""
    tf, pt = create_model("tf_efficientnet_b0"), create_model("efficientnet_b0")
    pt.load_state_dict(tf.state_dict())
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        a = tf.conv_stem(x)
        b = pt.conv_stem(x)
        ref = torch.nn.functional.conv2d(torch.nn.functional.pad(x, (0, 1, 0, 1)),
                                         tf.conv_stem.weight, stride=2)
    assert a.shape == b.shape == (1, 32, 112, 112)
    assert torch.allclose(a, ref, atol=1e-5) and not torch.allclose(a, b, atol=1e-3)


def test_compound_search_finds_the_budget():
    results = scaling.search_coefficients(phi=1.0, max_cost=2.0, search_per_coeff=10)
    assert len(results) == 1000
    errors = [r.error for r in results]
    assert errors == sorted(errors)
    best = results[0]
    assert min(best.alpha, best.beta, best.gamma) >= 1.0
    assert abs(best.cost - 2.0) < 0.05
    assert best.error == pytest.approx((scaling.compound_cost(best.alpha, best.beta, best.gamma)
                                        - 2.0) ** 2)
    strict = scaling.search_coefficients(phi=1.0, max_cost=2.0, search_per_coeff=10, tol=1e-3)
    assert 0 < len(strict) < len(results) and all(r.error <= 1e-3 for r in strict)
    a, b, g = scaling.PAPER_COEFFICIENTS
    assert abs(scaling.compound_cost(a, b, g) - 2.0) < 0.1  # the paper's choice fits too
    with pytest.raises(ValueError):
        scaling.search_coefficients(max_cost=0.5)


def test_model_from_coefficients_matches_named_models():
    for name, (w, d) in {"efficientnet_b2": (1.1, 1.2), "efficientnet_cc_b1_8e": (1.0, 1.1)}.items():
        experts = 8 if "cc" in name else 0
        built = scaling.efficientnet_from_coefficients(w, d, 260, num_experts=experts)
        assert _params(built) == _params(create_model(name))
        assert built.pretrained_cfg["input_size"] == (3, 260, 260)
