import pytest

from dogclf.config import REPO_ROOT, ConfigError, load_config_file, load_job, parse_override, save_config


@pytest.mark.parametrize("mode", ["gmlp", "basic-mlp"])
def test_job_specs_load_and_round_trip(mode, tmp_path):
    cfg = load_job(mode)
    assert cfg.name == mode
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config_file(tmp_path / "config.yaml") == cfg


def test_overrides_convert_types():
    cfg = load_job("gmlp", ["optim.lr=1e-4", "data.image_size=96", "model.hidden_sizes=[8, 4]", "optim.ema_decay=0.99"])
    assert cfg.optim.lr == 1e-4 and cfg.data.image_size == 96
    assert cfg.model.hidden_sizes == [8, 4] and cfg.optim.ema_decay == 0.99
    assert load_job("gmlp", ["optim.grad_clip=null"]).optim.grad_clip is None


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("optim.lrr=1", "unknown key"),
        ("optim.lr=fast", "optim.lr: expected float"),
        ("data.batch_size=3.5", "data.batch_size: expected int"),
        ("data.batch_size=0", "data.batch_size must be a positive integer"),
        ("optim.lr=-1", "optim.lr must be a positive number"),
        ("trainer.max_epochs=0", "trainer.max_epochs must be"),
        ("model.preset.x=1", "model.preset is not a section"),
        ("data.val_fraction=0.9", "below 1"),
    ],
)
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_job("gmlp", [override])


def test_set_without_equals_is_an_error():
    with pytest.raises(ConfigError, match="has no '='"):
        parse_override("optim.lr")


def test_unknown_mode_lists_the_specs():
    with pytest.raises(ConfigError, match="gmlp"):
        load_job("nope")


def test_job_spec_must_set_every_field(tmp_path):
    text = (REPO_ROOT / "jobs" / "gmlp.yaml").read_text().replace("  seed: 0\n", "")
    (tmp_path / "partial.yaml").write_text(text)
    with pytest.raises(ConfigError, match="missing key trainer.seed"):
        load_job(str(tmp_path / "partial.yaml"))
