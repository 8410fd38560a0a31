"""Model presets, gMLP details, timm interop and checkpoint loading. Real modules, no mocks; CPU, a few seconds."""

from argparse import Namespace

import pytest
import timm
import torch

from dogclf.config import ConfigError
from dogclf.models import create_model, list_models, load_pretrained
from dogclf.models.gmlp import timm_to_dogclf

SMALL = 5_000_000  # presets below this many parameters get a real forward + backward


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def meta_model(name: str, **kwargs) -> torch.nn.Module:
    """Build without allocating weights: shapes, parameter counts and key names only."""
    with torch.device("meta"):
        return create_model(name, **kwargs)


def test_registry_lists_the_presets():
    expected = {"basic-mlp", "gmlp-ti", "gmlp-s", "gmlp-b", "gmlp-pico", "gmlp-nano", "gmlp-micro"}
    assert expected <= set(list_models())
    assert list_models() == sorted(list_models())


@pytest.mark.parametrize("name", list_models())
def test_every_preset_builds_and_trains(name):
    size = 224 if name in ("gmlp-ti", "gmlp-s", "gmlp-b") else 64
    model = meta_model(name, num_classes=7, image_size=size)
    assert model(torch.empty(2, 3, size, size, device="meta")).shape == (2, 7)
    if n_params(model) > SMALL:
        return
    torch.manual_seed(0)
    model = create_model(name, num_classes=7, image_size=size)
    logits = model(torch.randn(2, 3, size, size))
    assert logits.shape == (2, 7)
    torch.nn.functional.cross_entropy(logits, torch.tensor([0, 6])).backward()
    assert all(p.grad is not None and p.grad.isfinite().all() for p in model.parameters())


@pytest.mark.parametrize(
    "name, timm_name, num_classes, millions",
    [
        ("gmlp-ti", "gmlp_ti16_224", 1000, 5.87),
        ("gmlp-ti", "gmlp_ti16_224", 4, 5.74),
        ("gmlp-s", "gmlp_s16_224", 1000, 19.42),
        ("gmlp-b", "gmlp_b16_224", 1000, 73.08),
    ],
)
def test_paper_presets_match_timm_parameter_counts(name, timm_name, num_classes, millions):
    ours = n_params(meta_model(name, num_classes=num_classes, image_size=224))
    with torch.device("meta"):
        theirs = n_params(timm.create_model(timm_name, pretrained=False, num_classes=num_classes))
    assert ours == theirs
    assert round(ours / 1e6, 2) == millions


def test_basic_mlp_parameter_count_by_hand():
    model = meta_model("basic-mlp", num_classes=5, image_size=64)
    pixels = 3 * 64 * 64
    assert n_params(model) == (pixels * 512 + 512) + (512 * 256 + 256) + (256 * 5 + 5)
    model = meta_model("basic-mlp", num_classes=5, image_size=32, in_chans=1, hidden_sizes=[100], dropout=0.0)
    assert n_params(model) == (32 * 32 * 100 + 100) + (100 * 5 + 5)
    assert model.drop.p == 0.0


def test_state_dict_keys_are_stable():
    """Checkpoints users hold depend on these names."""
    block = ["norm.weight", "norm.bias", "proj_in.weight", "proj_in.bias", "sgu.norm.weight", "sgu.norm.bias"]
    block += ["sgu.proj.weight", "sgu.proj.bias", "proj_out.weight", "proj_out.bias"]
    expected = ["patch_embed.weight", "patch_embed.bias"]
    expected += [f"blocks.{i}.{k}" for i in range(2) for k in block]
    expected += ["norm.weight", "norm.bias", "head.weight", "head.bias"]
    assert list(meta_model("gmlp-pico", num_classes=3, image_size=64).state_dict()) == expected

    amlp = meta_model("gmlp-pico", num_classes=3, image_size=64, attn_dim=16).state_dict()
    attn = ["attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight", "attn.proj.bias"]
    assert [k for k in amlp if k not in expected] == [f"blocks.{i}.{k}" for i in range(2) for k in attn]

    mlp = meta_model("basic-mlp", num_classes=3, image_size=64).state_dict()
    assert list(mlp) == ["layers.0.weight", "layers.0.bias", "layers.1.weight", "layers.1.bias"] + [
        "head.weight",
        "head.bias",
    ]


def test_gmlp_shapes_follow_image_and_patch_size():
    model = meta_model("gmlp-nano", num_classes=3, image_size=96)
    sd = model.state_dict()
    assert sd["blocks.0.sgu.proj.weight"].shape == (144, 144)  # (96 / 8)^2 tokens
    assert sd["blocks.0.proj_in.weight"].shape == (6 * 128, 128)  # ffn ratio 6
    assert sd["blocks.0.sgu.norm.weight"].shape == (3 * 128,)  # the gate normalises the v half only
    assert sd["patch_embed.weight"].shape == (128, 3, 8, 8)


def test_spatial_gating_unit_starts_as_identity_on_u():
    torch.manual_seed(0)
    model = create_model("gmlp-pico", num_classes=3, image_size=64)
    assert not [n for n in model.state_dict() if "pos" in n]  # no positional encoding anywhere
    for block in model.blocks:
        assert 0.5e-6 < block.sgu.proj.weight.std().item() < 2e-6
        assert torch.equal(block.sgu.proj.bias, torch.ones(64))
    u, v = torch.randn(64, 2, 2, 3 * 32).unbind(2)  # (N, B, d_ffn / 2) each
    torch.testing.assert_close(model.blocks[0].sgu(u, v), u, atol=1e-4, rtol=0)  # v gates u; at init the gate is 1


def test_drop_path_rises_linearly_and_eval_is_deterministic():
    model = create_model("gmlp-nano", num_classes=3, image_size=64, drop_path_rate=0.3)
    rates = [block.drop_path.p for block in model.blocks]
    assert rates[0] == 0 and rates[-1] == pytest.approx(0.3)
    assert rates == pytest.approx(torch.linspace(0, 0.3, len(rates)).tolist())
    assert [b.drop_path.p for b in create_model("gmlp-nano", num_classes=3, image_size=64).blocks][-1] == 0.05

    torch.nn.init.normal_(model.head.weight)  # the zero-initialised head would hide every difference
    x = torch.randn(4, 3, 64, 64)
    with torch.no_grad():
        assert not torch.equal(model.train()(x), model(x))  # blocks are dropped in training
        assert torch.equal(model.eval()(x), model(x))


def test_amlp_attention_adds_to_the_gate():
    torch.manual_seed(0)
    model = create_model("gmlp-pico", num_classes=3, image_size=64, attn_dim=16).eval()
    torch.nn.init.normal_(model.head.weight)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        before = model(x)
        for block in model.blocks:
            torch.nn.init.normal_(block.attn.proj.weight, std=0.1)
        assert not torch.allclose(model(x), before)  # the attention path reaches the output


def random_timm_gmlp(num_classes: int) -> torch.nn.Module:
    """timm's gMLP-Ti with every weight random: a near-identity gate would hide a wrong mapping."""
    torch.manual_seed(0)
    model = timm.create_model("gmlp_ti16_224", pretrained=False, num_classes=num_classes)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def test_timm_gmlp_converts_and_gives_the_same_logits():
    theirs = random_timm_gmlp(4)
    ours = create_model("gmlp-ti", num_classes=4, image_size=224).eval()
    ours.load_state_dict(timm_to_dogclf(theirs.state_dict()), strict=True)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), atol=1e-5, rtol=0)


def test_timm_to_dogclf_rejects_other_timm_models():
    with pytest.raises(ConfigError, match="blocks.0.mlp_tokens.fc1.weight"):
        timm_to_dogclf({"blocks.0.mlp_tokens.fc1.weight": torch.zeros(1)})


def test_load_timm_state_dict_skips_a_head_of_another_class_count(tmp_path):
    theirs = random_timm_gmlp(1000)
    path = tmp_path / "gmlp_ti16_224.pth"
    torch.save(theirs.state_dict(), path)
    ours = create_model("gmlp-ti", num_classes=4, image_size=224)
    head = ours.head.weight.detach().clone()

    report = load_pretrained(ours, path)
    assert report.source == "timm"
    assert report.skipped == ("head.weight", "head.bias")
    assert "head skipped: checkpoint has 1000 classes, model 4" in str(report)
    assert torch.equal(ours.head.weight, head)
    converted = timm_to_dogclf(theirs.state_dict())
    for key, value in ours.state_dict().items():
        if not key.startswith("head."):
            assert torch.equal(value, converted[key]), key


def test_load_lightning_checkpoint_and_plain_state_dict(tmp_path):
    torch.manual_seed(0)
    trained = create_model("gmlp-pico", num_classes=3, image_size=64).eval()
    torch.nn.init.normal_(trained.head.weight)
    lightning = {
        "epoch": 4,
        "global_step": 40,
        "state_dict": {**{f"model.{k}": v for k, v in trained.state_dict().items()}, "criterion.weight": torch.ones(3)},
        "hyper_parameters": {"lr": 1e-3},
    }
    torch.save(lightning, tmp_path / "last.ckpt")
    torch.save(trained.state_dict(), tmp_path / "weights.pt")
    x = torch.randn(2, 3, 64, 64)
    for file, source in (("last.ckpt", "lightning"), ("weights.pt", "dogclf")):
        model = create_model("gmlp-pico", num_classes=3, image_size=64).eval()
        report = load_pretrained(model, tmp_path / file)
        assert (report.source, report.skipped, report.loaded) == (source, (), len(trained.state_dict()))
        with torch.no_grad():
            assert torch.equal(model(x), trained(x))


def test_gmlp_weights_start_an_amlp_as_that_gmlp(tmp_path):
    torch.manual_seed(0)
    gmlp = create_model("gmlp-pico", num_classes=3, image_size=64).eval()
    torch.nn.init.normal_(gmlp.head.weight)
    torch.save(gmlp.state_dict(), tmp_path / "gmlp.pt")
    amlp = create_model("gmlp-pico", num_classes=3, image_size=64, attn_dim=16).eval()
    report = load_pretrained(amlp, tmp_path / "gmlp.pt")
    assert len(report.skipped) == 8 and all(".attn." in k for k in report.skipped)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(amlp(x), gmlp(x))


def test_load_errors_name_the_key_and_the_fix(tmp_path):
    torch.save(create_model("gmlp-pico", num_classes=3, image_size=64).state_dict(), tmp_path / "pico64.pt")
    with pytest.raises(ConfigError) as err:
        load_pretrained(create_model("gmlp-pico", num_classes=3, image_size=96), tmp_path / "pico64.pt")
    message = str(err.value)
    assert "blocks.0.sgu.proj.weight" in message and "(64, 64)" in message and "(144, 144)" in message
    assert "data.image_size=64" in message

    with pytest.raises(ConfigError, match=r"patch_embed.weight has shape \(32, 3, 8, 8\).*\(48, 3, 8, 8\)"):  # width
        load_pretrained(create_model("gmlp-pico", num_classes=3, image_size=64, dim=48), tmp_path / "pico64.pt")
    with pytest.raises(ConfigError, match="lacks blocks.2.norm.weight"):  # another depth
        load_pretrained(create_model("gmlp-pico", num_classes=3, image_size=64, depth=3), tmp_path / "pico64.pt")
    with pytest.raises(ConfigError, match="no-such.pt does not exist"):
        load_pretrained(create_model("gmlp-pico", num_classes=3, image_size=64), tmp_path / "no-such.pt")

    torch.save({"config": Namespace(lr=1)}, tmp_path / "pickled.ckpt")  # would need arbitrary unpickling
    with pytest.raises(ConfigError, match="weights_only=True"):
        load_pretrained(create_model("gmlp-pico", num_classes=3, image_size=64), tmp_path / "pickled.ckpt")


def test_create_model_errors():
    with pytest.raises(ConfigError, match="unknown model.preset 'gmlp-xl': choose one of basic-mlp, gmlp-b"):
        create_model("gmlp-xl", num_classes=3, image_size=64)
    with pytest.raises(ConfigError) as err:
        create_model("gmlp-nano", num_classes=3, image_size=100)
    assert str(err.value) == "data.image_size=100 is not a multiple of gmlp-nano's patch size 8: use e.g. 96 or 104"
    with pytest.raises(ConfigError, match="use e.g. 8 or 16"):
        create_model("gmlp-nano", num_classes=3, image_size=4)
    with pytest.raises(ConfigError, match=r"model.hidden_sizes=\[64\] does not apply to preset gmlp-nano"):
        create_model("gmlp-nano", num_classes=3, image_size=64, hidden_sizes=[64])
    with pytest.raises(ConfigError, match="model.drop_path_rate=0.1 does not apply to preset basic-mlp"):
        create_model("basic-mlp", num_classes=3, image_size=64, drop_path_rate=0.1)
    with pytest.raises(ConfigError, match="model.drop_path_rate=1.0 must be in"):
        create_model("gmlp-nano", num_classes=3, image_size=64, drop_path_rate=1.0)
    # the job config passes every model option, as None where the preset's value should stand
    unset = dict(drop_path_rate=None, attn_dim=None, hidden_sizes=None, dropout=None)
    assert isinstance(create_model("basic-mlp", num_classes=3, image_size=64, **unset), torch.nn.Module)
    assert create_model("gmlp-pico", num_classes=3, image_size=64, **unset).blocks[0].attn is None


def test_gmlp_rejects_images_of_another_size():
    model = create_model("gmlp-pico", num_classes=3, image_size=64)
    with pytest.raises(ValueError, match="64x64"):
        model(torch.randn(1, 3, 96, 96))
