"""Config composition: groups, inheritance, experiment overrides, CLI overrides, the errors users see, and config
values reaching the code that uses them (optimiser, loss, sampler)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from omegaconf import DictConfig, OmegaConf

import datamodules.datamodule as datamodule_module
from datamodules.datamodule import RefVOSDataModule
from glus_lightning.cli import main
from glus_lightning.config import GROUPS, ConfigError, compose, conf_dir, group_choices, load_group
from glus_lightning.module import GLUSModule

DEFAULT_EXPERIMENT = OmegaConf.load(conf_dir() / "config.yaml").experiment


def _flat(cfg: DictConfig | dict) -> dict[str, Any]:
    """Dotted key -> leaf value (lists kept whole) of a resolved config."""
    tree = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg
    out: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict) and node:
            for key, value in node.items():
                walk(value, f"{prefix}{key}.")
        else:
            out[prefix[:-1]] = node

    walk(tree, "")
    return out


def _differing(a: DictConfig, b: DictConfig) -> set[str]:
    fa, fb = _flat(a), _flat(b)
    return {k for k in fa.keys() | fb.keys() if fa.get(k, "<absent>") != fb.get(k, "<absent>")}


# ---------------------------------------------------------------------------------------- composition
def test_default_is_demo_with_its_groups() -> None:
    cfg = compose()
    assert cfg.experiment == DEFAULT_EXPERIMENT == "demo" and cfg.name == "demo"
    assert cfg.backbone.family == "llava" and cfg.backbone.path is None
    assert cfg.segmenter.size == "test"
    assert cfg.data.synthetic is not None
    assert cfg.data.image_size == cfg.segmenter.image_size  # the interpolation resolves to the segmenter's size


def test_group_and_dotted_overrides_apply_in_order() -> None:
    cfg = compose(["backbone=qwen2_5_vl_tiny", "data.batch_size=5", "optim.betas=[0.8,0.9]"])
    assert cfg.backbone.family == "qwen2_5_vl"
    assert cfg.data.batch_size == 5
    assert list(cfg.optim.betas) == [0.8, 0.9]


@pytest.mark.parametrize("experiment", group_choices("experiment"))
def test_every_experiment_composes_fully(experiment: str) -> None:
    cfg = compose([f"experiment={experiment}"])
    assert not OmegaConf.missing_keys(cfg)
    assert cfg.experiment == cfg.name == experiment


@pytest.mark.parametrize(("group", "choice"), [(g, c) for g in GROUPS for c in group_choices(g)])
def test_every_group_choice_composes_with_the_default_experiment(group: str, choice: str) -> None:
    cfg = compose([f"{group}={choice}"])
    assert not OmegaConf.missing_keys(cfg)
    # the section is the chosen file (with its parents), except what the default experiment itself sets there
    alone = load_group(group, choice, [f"image_size={cfg.data.image_size}"] if group == "data" else [])
    experiment_sets = set(_flat(OmegaConf.load(conf_dir() / "experiment" / f"{DEFAULT_EXPERIMENT}.yaml").get(group, {})))
    assert _differing(cfg[group], alone) <= experiment_sets


@pytest.mark.parametrize("backbone", group_choices("backbone"))
@pytest.mark.parametrize("experiment", group_choices("experiment"))
def test_every_experiment_composes_with_every_backbone(experiment: str, backbone: str) -> None:
    cfg = compose([f"experiment={experiment}", f"backbone={backbone}"])
    assert not OmegaConf.missing_keys(cfg)
    assert cfg.backbone.family == load_group("backbone", backbone).family


def test_glus_s_follows_the_reference_recipe() -> None:
    """Pins the GLUS paper's GLUS-S numbers (not this repo's YAML): a change to them must be deliberate."""
    cfg = compose(["experiment=glus_s"])
    assert (cfg.optim.lr, list(cfg.optim.betas), cfg.optim.warmup_steps) == (3e-4, [0.9, 0.95], 100)
    assert (cfg.loss.ce_weight, cfg.loss.bce_weight, cfg.loss.dice_weight) == (1.0, 2.0, 0.5)
    assert (cfg.trainer.max_steps, cfg.trainer.accumulate_grad_batches, cfg.data.batch_size) == (3000, 10, 2)
    assert (cfg.data.num_context, cfg.data.num_query, cfg.data.max_expressions) == (4, 4, 3)
    assert {s.name: s.weight for s in cfg.data.train} == {"mevis": 1.0, "ref-youtube-vos": 1.0}
    assert cfg.segmenter.size == "large" and cfg.segmenter.image_size == 1024
    assert cfg.backbone.lora.r == 8 and cfg.backbone.lora.alpha == 16


# ---------------------------------------------------------------------------------------- inheritance
@pytest.mark.parametrize(("child", "parent", "own"), [
    ("glus_s_qlora", "glus_s", {"backbone.quantization.load_in_4bit"}),
    ("glus_s_reference_contrastive", "glus_s", {*(f"loss.contrastive_{k}" for k in (
        "positives", "negative_sampling", "min_negatives", "min_anchors", "push", "bank_sources")), "data.expression_sampling"}),
    ("glus_a", "glus_s", {"data.train", "trainer.max_steps", "loss.contrastive_weight", "data.expression_sampling"}),
    ("glus_s_qwen2_5_vl", "glus_s", {"backbone.family", "backbone.path", "backbone.image_size", "backbone.image_token_pool"}),
    ("glus_s_internvl", "glus_s", {"backbone.family", "backbone.path", "backbone.image_size", "backbone.image_token_pool"}),
    ("glus_a_released", "glus_s_released", {"init_weights", "backbone.path", "segmenter.checkpoint"}),
    ("glus_s_partial_released", "glus_s_released", {"init_weights", "backbone.path", "segmenter.checkpoint"}),
])
def test_experiment_is_its_parent_but_for_its_own_keys(child: str, parent: str, own: set[str]) -> None:
    child_cfg, parent_cfg = compose([f"experiment={child}"]), compose([f"experiment={parent}"])
    assert _differing(child_cfg, parent_cfg) == {"experiment", "name", *own}


def test_experiments_of_the_recipe_share_the_contrastive_pairs_and_keyframes() -> None:
    for experiment in ("glus_s", "glus_s_qlora", "glus_s_qwen2_5_vl", "glus_s_internvl"):
        cfg = compose([f"experiment={experiment}"])
        assert (cfg.loss.contrastive_weight, cfg.data.expression_sampling, cfg.inference.keyframes) == (0.1, "pairs", True)
    cfg = compose(["experiment=glus_a"])  # the reference trains GLUS-A without the contrastive loss
    assert (cfg.loss.contrastive_weight, cfg.data.expression_sampling, cfg.inference.keyframes) == (0.0, "uniform", True)


REFERENCE_QUESTIONS = [  # the GLUS reference's SHORT_QUESTION_LIST (utils/utils.py), written out, not read from conf/
    "Can you segment the {expression} in this frame?",
    "Please segment the {expression} in this frame.",
    "What is {expression} in this frame? Please respond with segmentation mask.",
    "What is {expression} in this frame? Please output segmentation mask.",
]
REFERENCE_ANSWERS = ["It is [SEG].", "Sure, [SEG].", "Sure, it is [SEG].", "Sure, the segmentation result is [SEG].", "[SEG]."]


def test_experiments_choose_the_prompt_and_the_released_ones_the_reference_s() -> None:
    for experiment in group_choices("experiment"):
        expected = "glus_reference" if experiment.endswith("_released") else "default"
        assert compose([f"experiment={experiment}"]).prompt == load_group("prompt", expected), experiment
    assert compose(["prompt=glus_reference"]).prompt == load_group("prompt", "glus_reference")  # or the command line
    reference = load_group("prompt", "glus_reference")
    assert reference.context_instruction == "Please finished the following tasks on the context frames above."
    assert list(reference.query_templates) == REFERENCE_QUESTIONS  # the first is the reference's evaluation question
    assert sorted(reference.answer_templates) == sorted(REFERENCE_ANSWERS)
    assert reference.answer_templates[0] == "Sure, the segmentation result is [SEG]."  # evaluation takes the first
    assert reference.join_context_images and reference.strip_period and reference.lowercase_expression
    default = load_group("prompt", "default")
    assert len(default.query_templates) > 1 and len(default.answer_templates) > 1
    assert not (default.join_context_images or default.strip_period or default.lowercase_expression)


REFERENCE_MEMORY = {"backprop": "none", "conditioning_frame": False, "object_pointers": False, "temporal_encoding": False,
                    "eval_stride": 3, "gate_by_object_score": False, "encoder_input": "conditioned", "bank": True,
                    "unprompted_frames": 0.0}  # written out from issue 12; the reference prompts every query frame


def test_released_experiments_select_the_reference_protocol_everywhere() -> None:
    released = [e for e in group_choices("experiment") if e.endswith("_released")]
    assert len(released) == 3
    for experiment in released:
        cfg = compose([f"experiment={experiment}"])
        assert (cfg.backbone.image_token_pool, cfg.backbone.image_resize) == ("1x4", "center_crop"), experiment
        assert dict(cfg.segmenter.memory) == REFERENCE_MEMORY, experiment
        assert cfg.inference.decoding == "sliding" and cfg.data.num_query == 4, experiment  # the reference's 4 turns
    own = compose(["experiment=glus_s"])  # our recipe keeps SAM2's memory protocol and windowed decoding
    assert own.segmenter.memory.backprop == "full" and own.segmenter.memory.object_pointers
    assert own.inference.decoding == "windowed"


@pytest.fixture
def conf_copy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A writable copy of conf/ that the composer reads (``$GLUS_CONF_DIR``)."""
    conf = tmp_path / "conf"
    shutil.copytree(conf_dir(), conf)
    monkeypatch.setenv("GLUS_CONF_DIR", str(conf))
    return conf


def test_inheritance_precedence(conf_copy: Path) -> None:
    (conf_copy / "experiment" / "parent.yaml").write_text(
        "defaults: {experiment: demo, trainer: gpu, data: mevis}\noptim: {lr: 0.5, warmup_steps: 7}\n")
    (conf_copy / "experiment" / "child.yaml").write_text(
        "defaults: {experiment: parent, data: glus_a}\noptim: {lr: 0.25}\n")
    demo, base = compose(["experiment=demo"]), OmegaConf.load(conf_copy / "config.yaml")
    cfg = compose(["experiment=child", "segmenter=sam2_tiny", "optim.warmup_steps=9"])
    assert cfg.experiment == cfg.name == "child"
    assert cfg.optim.lr == 0.25                                   # the child's key beats its parent's
    assert cfg.optim.weight_decay == base.optim.weight_decay      # untouched keys come from config.yaml
    assert cfg.optim.warmup_steps == 9                            # the command line beats both
    assert compose(["experiment=child"]).optim.warmup_steps == 7  # the parent's key, when nobody overrides it
    assert cfg.data.train == load_group("data", "glus_a", ["image_size=0"]).train  # the child's group choice beats the parent's
    assert cfg.trainer.strategy == load_group("trainer", "gpu").strategy          # the parent's choice beats demo's cpu
    assert cfg.segmenter.size == "tiny"                           # a group on the command line beats every file
    assert cfg.backbone == demo.backbone                          # the grandparent's choice and keys


def test_shared_fragments_are_parents_not_choices(conf_copy: Path) -> None:
    shutil.copy(conf_copy / "prompt" / "default.yaml", conf_copy / "prompt" / "_words.yaml")
    (conf_copy / "prompt" / "mine.yaml").write_text("defaults: {prompt: _words}\ncontext_instruction: Mine.\n")
    assert "_words" not in group_choices("prompt") and "mine" in group_choices("prompt")
    cfg = compose(["prompt=mine"])
    assert cfg.prompt.context_instruction == "Mine."
    assert cfg.prompt.query_templates == load_group("prompt", "default").query_templates  # from the fragment
    with pytest.raises(ConfigError, match=r"prompt='_words' is not a choice"):
        compose(["prompt=_words"])
    assert not any(c.startswith("_") for g in (*GROUPS, "experiment") for c in group_choices(g))


def test_inheritance_cycle_names_the_files(conf_copy: Path) -> None:
    (conf_copy / "experiment" / "a.yaml").write_text("defaults: {experiment: b}\n")
    (conf_copy / "experiment" / "b.yaml").write_text("defaults: {experiment: a}\nseed: 1\n")
    with pytest.raises(ConfigError, match=r"inheritance cycle: \S*experiment/a\.yaml -> \S*experiment/b\.yaml -> \S*experiment/a\.yaml"):
        compose(["experiment=a"])
    (conf_copy / "trainer" / "loop.yaml").write_text("defaults: {trainer: loop}\n")
    with pytest.raises(ConfigError, match=r"inheritance cycle: \S*trainer/loop\.yaml -> \S*trainer/loop\.yaml"):
        load_group("trainer", "loop")


def test_unknown_parent_or_group_in_defaults_names_the_file(conf_copy: Path) -> None:
    (conf_copy / "backbone" / "orphan.yaml").write_text("defaults: {backbone: llava_8b}\nfamily: llava\n")
    with pytest.raises(ConfigError, match=r"backbone/orphan\.yaml: defaults backbone: 'llava_8b' names no file.*llava_7b"):
        compose(["backbone=orphan"])
    (conf_copy / "trainer" / "odd.yaml").write_text("defaults: {backbone: llava_7b}\n")
    with pytest.raises(ConfigError, match=r"trainer/odd\.yaml: defaults names unknown groups \['backbone'\]"):
        load_group("trainer", "odd")


# ---------------------------------------------------------------------------------------- errors
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
    assert printed.prompt == compose().prompt  # the prompt group prints as its own section
    assert main(["fit", "trainer.nope=1"]) == 2
    assert "trainer.nope" in capsys.readouterr().err


def test_cli_help_lists_commands(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for command in ("prepare", "fit", "validate"):
        assert command in out


# ------------------------------------------------------------------- values reach the code that uses them
def _tiny(data_root: Path, *overrides: str) -> DictConfig:
    return compose([f"data.root={data_root}", "data.num_workers=0", "data.num_context=2", "data.num_query=3",
                    "data.samples_per_epoch=8", "data.batch_size=2", *overrides])


@pytest.mark.parametrize("segmenter_lr", [0.002, None])
def test_optim_values_reach_the_adamw_param_groups(data_root: Path, segmenter_lr: float | None) -> None:
    cfg = _tiny(data_root, "optim.lr=0.01", "optim.betas=[0.8,0.85]", "optim.weight_decay=0.05",
                f"optim.segmenter_lr={'null' if segmenter_lr is None else segmenter_lr}")
    model = GLUSModule(cfg)
    model.trainer = L.Trainer(max_steps=10, logger=False, enable_checkpointing=False, enable_progress_bar=False)
    optimizer = model.configure_optimizers()["optimizer"]
    assert isinstance(optimizer, torch.optim.AdamW)
    rest, seg = optimizer.param_groups
    seg_ids = {id(p) for p in model.segmenter.parameters() if p.requires_grad}
    assert {id(p) for p in seg["params"]} == seg_ids and seg_ids  # the demo trains SAM2's parts too
    assert not seg_ids & {id(p) for p in rest["params"]}
    # initial_lr: the group's lr before the scheduler's warm-up factor
    assert rest["initial_lr"] == 0.01 and seg["initial_lr"] == (0.01 if segmenter_lr is None else segmenter_lr)
    for group in (rest, seg):
        assert group["betas"] == (0.8, 0.85) and group["weight_decay"] == 0.05


def _step_loss_and_logged(cfg: DictConfig, batch: Any, monkeypatch: pytest.MonkeyPatch) -> tuple[float, dict[str, float]]:
    """``training_step``'s loss and what it logged, for a model built from ``cfg`` with fixed seeds."""
    torch.manual_seed(0)
    model = GLUSModule(cfg)
    logged: dict[str, float] = {}
    monkeypatch.setattr(model, "log", lambda name, value, **_: logged.__setitem__(name, float(value)))
    monkeypatch.setattr(model, "log_dict", lambda values, **_: logged.update({k: float(v) for k, v in values.items()}))
    torch.manual_seed(1)  # the prompt paraphrases drawn in training
    with torch.no_grad():
        loss = model.training_step(batch, 0)
    return float(loss), logged


def test_loss_weights_reach_the_loss(data_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    weights = {"ce": 0.3, "bce": 1.7, "dice": 0.9, "object": 0.2, "iou": 0.6, "contrastive": 0.4}
    logged_as = {"ce": "train/ce", "bce": "train/bce", "dice": "train/dice", "object": "train/object",
                 "iou": "train/iou_pred", "contrastive": "train/contrastive"}
    overrides = ["data.expression_sampling=pairs", *(f"loss.{k}_weight={w}" for k, w in weights.items())]
    cfg = _tiny(data_root, *overrides)
    def has_pair(batch: Any) -> bool:  # two expressions of one object set in one video: a contrastive term
        keys = [(v, tuple(sorted(o))) for v, o in zip(batch.expression_video.tolist(), batch.expression_objects)]
        return len(set(keys)) < len(keys)

    batch = next(b for b in RefVOSDataModule(cfg.data).train_dataloader() if has_pair(b))
    loss, logged = _step_loss_and_logged(cfg, batch, monkeypatch)
    terms = {k: logged[name] for k, name in logged_as.items()}
    assert all(v > 0 for v in terms.values()), str(terms)  # every term counts, so a weight left out would show
    assert loss == pytest.approx(sum(weights[k] * terms[k] for k in weights), rel=1e-5)
    # one more unit of bce_weight adds exactly one logged BCE, the rest of the step unchanged
    loss2, logged2 = _step_loss_and_logged(_tiny(data_root, *overrides, "loss.bce_weight=2.7"), batch, monkeypatch)
    assert logged2 == pytest.approx(logged | {"train/loss": loss2})
    assert loss2 - loss == pytest.approx(terms["bce"], rel=1e-4)


@pytest.mark.parametrize(("sampling", "max_expressions"), [("uniform", 3), ("pairs", 2)])
def test_expression_sampling_and_max_expressions_reach_the_sampler(
    data_root: Path, monkeypatch: pytest.MonkeyPatch, sampling: str, max_expressions: int
) -> None:
    calls = []
    real_plan_train = datamodule_module.plan_train

    def spy(record: Any, *args: Any) -> Any:
        plan = real_plan_train(record, *args)
        calls.append((record, args, plan))
        return plan

    monkeypatch.setattr(datamodule_module, "plan_train", spy)
    cfg = _tiny(data_root, f"data.expression_sampling={sampling}", f"data.max_expressions={max_expressions}")
    counts = [int(n) for batch in RefVOSDataModule(cfg.data).train_dataloader()
              for n in torch.bincount(batch.expression_video)]
    assert calls and all((args[2], args[4]) == (max_expressions, sampling) for _, args, _ in calls)
    assert max(counts) == max_expressions and all(n <= max_expressions for n in counts)
    if sampling == "pairs":  # the second expression is the anchor's positive whenever the video has one
        with_partner = 0
        for record, _, plan in calls:
            anchor = set(plan.expressions[0].obj_ids)
            if sum(set(e.obj_ids) == anchor for e in record.expressions) > 1:
                with_partner += 1
                assert set(plan.expressions[1].obj_ids) == anchor
        assert with_partner
