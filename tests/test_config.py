import pytest

from poa_hpc.config import POAConfig, from_dict, load_config, to_dict
from poa_hpc.errors import ConfigError


def test_yaml_and_dotted_overrides():
    cfg = load_config("configs/demo_cpu.yaml", ["optim.base_lr=1e-3", "head.prototypes=[10,20]", "train.seed=7"])
    assert isinstance(cfg, POAConfig)
    assert cfg.optim.base_lr == 1e-3 and cfg.head.prototypes == [10, 20] and cfg.train.seed == 7
    assert cfg.model.vit.embed_dim == 96  # from the file
    assert cfg.loss.lam == 0.8  # default


def test_paper_config_values():
    cfg = load_config("configs/vit_l_poa.yaml")
    assert (cfg.model.vit.embed_dim, cfg.model.vit.depth, cfg.model.vit.num_heads) == (1024, 24, 16)
    assert cfg.head.prototypes == [8192, 16384, 32768, 65536]
    assert cfg.optim.clip_grad == 1.5 and cfg.optim.layer_decay == 0.9 and cfg.optim.schedule_fraction == 0.78
    assert cfg.optim.batch_size * 32 == 1600


@pytest.mark.parametrize(
    "override,needle",
    [
        ("optim.bogus=1", "optim.bogus"),
        ("optim.base_lr=abc", "optim.base_lr"),
        ("model.attention=flash9", "model.attention"),
        ("model.vit.embed_dim=100", "model.vit.embed_dim"),
        ("model.vit.min_depth=99", "model.vit.min_depth"),
        ("model.arch=alexnet", "model.arch"),
        ("data.local_size=17", "data.local_size"),
        ("train.collapse_tolerance=1.5", "train.collapse_tolerance"),
        ("train.collapse_patience=-1", "train.collapse_patience"),
        ("optim.warmup_steps=-3", "optim.warmup_steps"),
        ("optim.freeze_last_layer_steps=-1", "optim.freeze_last_layer_steps"),
        ("loss.warmup_teacher_temp_steps=-1", "loss.warmup_teacher_temp_steps"),
        ("loss.ibot_start_step=-1", "loss.ibot_start_step"),
        ("loss.ibot_start_step=2.5", "loss.ibot_start_step"),
        ("optim.warmup_epochs=-1", "optim.warmup_epochs"),
        ("nonsense", "key=value"),
    ],
)
def test_bad_keys_name_the_key(override, needle):
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
        load_config("configs/demo_cpu.yaml", [override])


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    typo = tmp_path / "typo.yaml"
    typo.write_text("optim:\n  base_lrr: 0.1\n")
    with pytest.raises(ConfigError, match="optim.base_lrr"):
        load_config(typo)


def test_step_keys_default_null():
    cfg = load_config("configs/vit_l_poa.yaml")
    assert (cfg.optim.warmup_steps, cfg.optim.freeze_last_layer_steps, cfg.loss.warmup_teacher_temp_steps,
            cfg.loss.ibot_start_step) == (None, None, None, None)
    cfg = load_config("configs/vit_l_poa.yaml", ["optim.warmup_steps=30", "loss.ibot_start_step=null"])
    assert cfg.optim.warmup_steps == 30 and cfg.loss.ibot_start_step is None


def test_roundtrip_through_dict():
    cfg = load_config("configs/demo_cpu.yaml", ["optim.epochs=3"])
    assert from_dict(to_dict(cfg)) == cfg
