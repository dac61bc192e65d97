"""Config composition: groups, experiment overrides, CLI overrides and the errors users see."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from glus_lightning.cli import main
from glus_lightning.config import ConfigError, compose, group_choices


def test_default_is_demo_with_its_groups() -> None:
    cfg = compose()
    assert cfg.experiment == "demo"
    assert cfg.backbone.family == "llava" and cfg.backbone.path is None
    assert cfg.segmenter.size == "test"
    assert cfg.data.synthetic is not None
    # the experiment's own keys override the base config, the interpolation resolves to the segmenter's size
    assert cfg.optim.lr == OmegaConf.load("conf/experiment/demo.yaml").optim.lr
    assert cfg.data.image_size == cfg.segmenter.image_size


def test_group_and_dotted_overrides_apply_in_order() -> None:
    cfg = compose(["backbone=qwen2_5_vl_tiny", "data.batch_size=5", "optim.betas=[0.8,0.9]"])
    assert cfg.backbone.family == "qwen2_5_vl"
    assert cfg.data.batch_size == 5
    assert list(cfg.optim.betas) == [0.8, 0.9]


@pytest.mark.parametrize("experiment", group_choices("experiment"))
def test_every_experiment_composes_fully(experiment: str) -> None:
    cfg = compose([f"experiment={experiment}"])
    assert not OmegaConf.missing_keys(cfg)
    assert cfg.name == experiment


def test_glus_s_follows_the_reference_recipe() -> None:
    cfg = compose(["experiment=glus_s"])
    assert (cfg.optim.lr, list(cfg.optim.betas), cfg.optim.warmup_steps) == (3e-4, [0.9, 0.95], 100)
    assert (cfg.loss.ce_weight, cfg.loss.bce_weight, cfg.loss.dice_weight) == (1.0, 2.0, 0.5)
    assert (cfg.trainer.max_steps, cfg.trainer.accumulate_grad_batches, cfg.data.batch_size) == (3000, 10, 2)
    assert (cfg.data.num_context, cfg.data.num_query, cfg.data.max_expressions) == (4, 4, 3)
    assert {s.name: s.weight for s in cfg.data.train} == {"mevis": 1.0, "ref-youtube-vos": 1.0}
    assert cfg.segmenter.size == "large" and cfg.segmenter.image_size == 1024
    assert cfg.backbone.lora.r == 8 and cfg.backbone.lora.alpha == 16


def test_unknown_key_names_the_key_and_valid_keys() -> None:
    with pytest.raises(ConfigError, match=r"data\.batchsize.*batch_size"):
        compose(["data.batchsize=2"])


def test_wrong_type_names_the_key() -> None:
    with pytest.raises(ConfigError, match=r"data\.batch_size"):
        compose(["data.batch_size=many"])


def test_unknown_group_choice_lists_valid_choices() -> None:
    with pytest.raises(ConfigError, match=r"backbone='gpt5'.*llava_tiny"):
        compose(["backbone=gpt5"])


def test_malformed_override() -> None:
    with pytest.raises(ConfigError, match="key=value"):
        compose(["data.batch_size"])


def test_cli_print_config_and_error_exit(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["fit", "data.batch_size=3", "--print-config"]) == 0
    printed = OmegaConf.create(capsys.readouterr().out)
    assert printed.data.batch_size == 3 and printed.experiment == "demo"
    assert main(["fit", "trainer.nope=1"]) == 2
    assert "trainer.nope" in capsys.readouterr().err


def test_cli_help_lists_commands(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for command in ("prepare", "fit", "validate"):
        assert command in out
