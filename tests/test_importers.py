"""Importers of published weights: tiny checkpoints with the reference key names and layouts go in, every tensor
must land where the reference model used it (values compared), and the imported model must run."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import CLIPVisionConfig, CLIPVisionModel, LlavaForConditionalGeneration

from datamodules.datamodule import RefVOSDataModule
from datamodules.prepare import prepare_synthetic
from glus_lightning.backbones import build_backbone
from glus_lightning.backbones.llava import LlavaBackbone
from glus_lightning.backbones.tiny_tokenizer import TinyTokens, build_tiny_tokenizer
from glus_lightning.checkpoints.importers import (
    CheckpointImportError,
    import_glus,
    import_lisa,
    load_init_weights,
    sam2_segmenter_choice,
)
from glus_lightning.cli import main
from glus_lightning.config import compose, load_group
from glus_lightning.module import GLUSModule
from glus_lightning.segmentation.sam2_build import build_sam2

D, INTER, LAYERS, HEADS = 64, 128, 2, 4  # LLaMA sizes of the tiny reference checkpoints
VH, VI, VLAYERS, PATCH, IMAGE = 128, 64, 2, 8, 32  # CLIP: 128 wide -> 2 heads of 64; 32 px / 8 px patches
TOWER = "model.vision_tower.vision_tower.vision_model."


def _rand(g: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=g) * 0.05


def clip_tensors(g: torch.Generator) -> dict[str, torch.Tensor]:
    """CLIPVisionModel ``vision_model.*`` tensors (names and shapes of transformers' CLIP)."""
    t = {"embeddings.class_embedding": _rand(g, VH), "embeddings.patch_embedding.weight": _rand(g, VH, 3, PATCH, PATCH),
         "embeddings.position_embedding.weight": _rand(g, (IMAGE // PATCH) ** 2 + 1, VH)}
    for n in ("pre_layrnorm", "post_layernorm"):
        t |= {f"{n}.weight": 1 + _rand(g, VH), f"{n}.bias": _rand(g, VH)}
    for i in range(VLAYERS):
        p = f"encoder.layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            t |= {f"{p}self_attn.{proj}.weight": _rand(g, VH, VH), f"{p}self_attn.{proj}.bias": _rand(g, VH)}
        for n in ("layer_norm1", "layer_norm2"):
            t |= {f"{p}{n}.weight": 1 + _rand(g, VH), f"{p}{n}.bias": _rand(g, VH)}
        t |= {f"{p}mlp.fc1.weight": _rand(g, VI, VH), f"{p}mlp.fc1.bias": _rand(g, VI),
              f"{p}mlp.fc2.weight": _rand(g, VH, VI), f"{p}mlp.fc2.bias": _rand(g, VH)}
    return t


def reference_checkpoint(root: Path, *, prompt_dim: int, visual: dict[str, torch.Tensor], tower: bool = True,
                         projector: str = "linear", safetensors: bool = False, seed: int = 0) -> dict[str, torch.Tensor]:
    """A tiny ``LISAForCausalLM`` / ``GLUSForCausalLM`` save_pretrained directory in two shards; returns its tensors."""
    tokenizer = build_tiny_tokenizer(
        TinyTokens(bos="<s>", eos="</s>", unk="<unk>", pad="<unk>", extra=("[SEG]", "<im_start>", "<im_end>"), add_prefix_space=True),
        [LlavaBackbone.system_prompt, LlavaBackbone.format_text, "Can you segment the in this frame? Sure, it is ."], 300,
    )
    g = torch.Generator().manual_seed(seed)
    vocab = len(tokenizer)
    s = {"model.embed_tokens.weight": _rand(g, vocab, D), "lm_head.weight": _rand(g, vocab, D), "model.norm.weight": 1 + _rand(g, D)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        s |= {f"{p}self_attn.{n}.weight": _rand(g, D, D) for n in ("q_proj", "k_proj", "v_proj", "o_proj")}
        s |= {f"{p}mlp.gate_proj.weight": _rand(g, INTER, D), f"{p}mlp.up_proj.weight": _rand(g, INTER, D),
              f"{p}mlp.down_proj.weight": _rand(g, D, INTER), f"{p}input_layernorm.weight": 1 + _rand(g, D),
              f"{p}post_attention_layernorm.weight": 1 + _rand(g, D),
              f"{p}self_attn.rotary_emb.inv_freq": torch.rand(D // HEADS // 2, generator=g)}  # in old LLaMA checkpoints
    if projector == "linear":
        s |= {"model.mm_projector.weight": _rand(g, D, VH), "model.mm_projector.bias": _rand(g, D)}
    else:
        s |= {"model.mm_projector.0.weight": _rand(g, D, VH), "model.mm_projector.0.bias": _rand(g, D),
              "model.mm_projector.2.weight": _rand(g, D, D), "model.mm_projector.2.bias": _rand(g, D)}
    if tower:
        s |= {TOWER + k: v for k, v in clip_tensors(g).items()}
    s |= {"model.text_hidden_fcs.0.0.weight": _rand(g, D, D), "model.text_hidden_fcs.0.0.bias": _rand(g, D),
          "model.text_hidden_fcs.0.2.weight": _rand(g, prompt_dim, D), "model.text_hidden_fcs.0.2.bias": _rand(g, prompt_dim)}
    s |= {f"model.visual_model.{k}": v for k, v in visual.items()}
    config = {"architectures": ["LISAForCausalLM"], "model_type": "llava", "hidden_size": D, "intermediate_size": INTER,
              "num_hidden_layers": LAYERS, "num_attention_heads": HEADS, "rms_norm_eps": 1e-6, "hidden_act": "silu",
              "max_position_embeddings": 2048, "vocab_size": vocab, "mm_vision_tower": "openai/clip-vit-large-patch14",
              "mm_vision_select_layer": -2, "mm_use_im_start_end": True, "mm_hidden_size": VH, "out_dim": prompt_dim,
              **({"mm_projector_type": projector} if projector != "linear" else {})}
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text(json.dumps(config))
    keys = sorted(s)
    for n, part in enumerate((keys[: len(keys) // 2], keys[len(keys) // 2 :]), 1):  # two shards, as released
        if safetensors:
            save_file({k: s[k].contiguous() for k in part}, root / f"model-0000{n}-of-00002.safetensors")
        else:
            torch.save({k: s[k] for k in part}, root / f"pytorch_model-0000{n}-of-00002.bin")
    tokenizer.save_pretrained(root)
    return s


SAM1 = {"image_encoder.blocks.0.attn.qkv.weight": torch.ones(6, 2), "prompt_encoder.no_mask_embed.weight": torch.ones(1, 4),
        "mask_decoder.iou_token.weight": torch.ones(1, 4)}  # a few SAM1 names: LISA's decoder, which GLUS drops


def expected_llava_name(key: str) -> str | None:
    """Where the public Hugging Face llava layout (transformers 5, in memory) keeps a reference tensor."""
    for pattern, target in ((r"model\.(embed_tokens|layers|norm)\.(.+)", r"model.language_model.\1.\2"),
                            (r"lm_head\.weight", "lm_head.weight"), (re.escape(TOWER) + "(.+)", r"model.vision_tower.\1")):
        if re.fullmatch(pattern, key):
            return re.sub(pattern, target, key)
    return None


def test_lisa_import_places_every_tensor_and_the_backbone_runs(tmp_path: Path) -> None:
    src = reference_checkpoint(tmp_path / "LISA-7B-v1", prompt_dim=256, visual=SAM1)
    report = import_lisa(tmp_path / "LISA-7B-v1", tmp_path / "out")
    hf = LlavaForConditionalGeneration.from_pretrained(tmp_path / "out").state_dict()
    vocab = src["model.embed_tokens.weight"].shape[0]
    checked = 0
    for key, value in src.items():
        name = expected_llava_name(key)
        if name is None or "rotary_emb" in key:
            continue
        got = hf[name][:vocab] if name.endswith(("embed_tokens.weight", "lm_head.weight")) else hf[name]
        assert torch.equal(got, value), key
        checked += 1
    assert checked == 3 + LAYERS * 9 + len(clip_tensors(torch.Generator()))
    # <image> was added for Hugging Face's placeholder: one new row, at the mean of the others
    embed = hf["model.language_model.embed_tokens.weight"]
    assert embed.shape[0] == vocab + 1 and torch.allclose(embed[-1], src["model.embed_tokens.weight"].mean(0))
    # the linear LLaVA-v1 projector computes the same function as Hugging Face's two-layer one
    model = LlavaForConditionalGeneration.from_pretrained(tmp_path / "out")
    x = torch.randn(5, VH)
    with torch.no_grad():
        assert torch.allclose(model.model.multi_modal_projector(x), x @ src["model.mm_projector.weight"].T + src["model.mm_projector.bias"], atol=1e-6)
    assert model.config.vision_config.num_attention_heads == VH // 64 and model.config.vision_feature_layer == -2
    # the [SEG] MLP under GLUSModule names; SAM1 and the recomputed rotary buffers are reported, not imported
    projection = load_file(tmp_path / "out" / "seg_projection.safetensors")
    for i in (0, 2):
        for n in ("weight", "bias"):
            assert torch.equal(projection[f"seg_projection.{i}.{n}"], src[f"model.text_hidden_fcs.0.{i}.{n}"])
    assert sorted(report.unmapped["SAM1 decoder model.visual_model, unused by GLUS"]) == sorted(f"model.visual_model.{k}" for k in SAM1)
    assert len(report.unmapped["recomputed buffers"]) == LAYERS
    assert "not imported (SAM1 decoder" in report.summary()
    # conf/backbone's path can point at it: the backbone loads, brackets images as LISA did, and runs
    cfg = load_group("backbone", "glus_reference", [f"path={tmp_path / 'out'}", "dtype=float32", f"image_size={IMAGE}",
                                                   "lora.enabled=false", "gradient_checkpointing=false"])
    backbone = build_backbone(cfg, load_group("prompt", "glus_reference")).eval()
    assert backbone.image_placeholder[0] == backbone.tokenizer.convert_tokens_to_ids("<im_start>")
    frames = torch.randint(0, 256, (2, 3, 3, 24, 24), dtype=torch.uint8)
    out = backbone.encode(frames[:, :1], frames[:, 1:], ["the red circle", "the blue square"], ce_only_seg=True,
                          sizes=[(480, 640), (720, 1280)])  # the preset crops each frame's original centre square
    assert out.seg_hidden.shape == (2, 2, D) and torch.isfinite(out.seg_hidden).all() and torch.isfinite(out.lm_loss)


def test_lisa_without_its_clip_tower_takes_a_local_clip_and_maps_an_mlp_projector(tmp_path: Path) -> None:
    src = reference_checkpoint(tmp_path / "lisa", prompt_dim=256, visual=SAM1, tower=False, projector="mlp2x_gelu", safetensors=True)
    with pytest.raises(CheckpointImportError, match=r"no CLIP tower .*pass --vision-tower DIR"):
        import_lisa(tmp_path / "lisa", tmp_path / "out")
    clip = CLIPVisionModel(CLIPVisionConfig(hidden_size=VH, intermediate_size=VI, num_hidden_layers=VLAYERS,
                                            num_attention_heads=2, patch_size=PATCH, image_size=IMAGE))
    clip.save_pretrained(tmp_path / "clip")
    import_lisa(tmp_path / "lisa", tmp_path / "out", vision_tower=tmp_path / "clip")
    model = LlavaForConditionalGeneration.from_pretrained(tmp_path / "out")
    own = model.model.vision_tower.state_dict()
    assert all(torch.equal(own[k], v) for k, v in clip.state_dict().items() if not k.endswith("position_ids"))
    proj = model.model.multi_modal_projector
    assert model.config.projector_hidden_act == "gelu"
    assert torch.equal(proj.linear_1.weight, src["model.mm_projector.0.weight"]) and torch.equal(proj.linear_2.bias, src["model.mm_projector.2.bias"])


def test_checkpoints_of_another_kind_fail_clearly(tmp_path: Path) -> None:
    with pytest.raises(CheckpointImportError, match="nowhere: does not exist"):
        import_lisa(tmp_path / "nowhere", tmp_path / "out")
    LlavaBackbone.write_tiny_checkpoint(load_group("backbone", "llava_tiny"), load_group("prompt", "default"), tmp_path / "hf")
    with pytest.raises(CheckpointImportError, match="already a Hugging Face llava checkpoint.*point backbone.path at it"):
        import_lisa(tmp_path / "hf", tmp_path / "out")
    (tmp_path / "qwen").mkdir()
    (tmp_path / "qwen" / "config.json").write_text(json.dumps({"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"]}))
    save_file({"model.layers.0.mlp.up_proj.weight": torch.zeros(2, 2)}, tmp_path / "qwen" / "model.safetensors")
    with pytest.raises(CheckpointImportError, match=r"not a LISA checkpoint \(config.json model_type='qwen2'.*lacks config.json mm_vision_tower"):
        import_lisa(tmp_path / "qwen", tmp_path / "out")
    reference_checkpoint(tmp_path / "lisa", prompt_dim=256, visual=SAM1)
    with pytest.raises(CheckpointImportError, match="not a GLUS release .*use `glus import lisa`"):
        import_glus(tmp_path / "lisa", tmp_path / "out")
    assert main(["import", "glus", str(tmp_path / "lisa"), "--out", str(tmp_path / "out")]) == 2


def test_sam2_choice_is_read_off_official_state_dicts() -> None:
    for choice in ("sam2_large", "sam2.1_tiny"):  # Hiera-L (the GLUS releases) and a SAM 2.1 size; 256 px for speed
        assert sam2_segmenter_choice(build_sam2(load_group("segmenter", choice, ["image_size=256"])).state_dict()) == choice
    assert sam2_segmenter_choice(build_sam2(load_group("segmenter", "test")).state_dict()) is None


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("synthetic")
    prepare_synthetic(root, seed=3, num_train=2, num_val=1, frames=4, size=32)
    return root


def test_glus_release_imports_into_glus_module_through_the_cli(tmp_path: Path, data_root: Path, capsys: pytest.CaptureFixture) -> None:
    torch.manual_seed(0)
    sam = build_sam2(load_group("segmenter", "test"))
    g = torch.Generator().manual_seed(1)
    visual = {k: v + torch.randn(v.shape, generator=g) * 0.01 if v.is_floating_point() else v for k, v in sam.state_dict().items()}
    src = reference_checkpoint(tmp_path / "GLUS-S", prompt_dim=sam.sam_prompt_embed_dim, visual=visual)
    assert main(["import", "glus", str(tmp_path / "GLUS-S"), "--out", str(tmp_path / "imported")]) == 0
    printed = capsys.readouterr().out
    overrides = printed.split("load with: ")[1].split()
    assert f"segmenter.checkpoint={tmp_path / 'imported' / 'sam2.pt'}" in overrides
    cfg = compose(["experiment=demo", "backbone=glus_reference", "segmenter=test", *overrides, "backbone.dtype=float32",
                   f"backbone.image_size={IMAGE}", "backbone.gradient_checkpointing=false", "backbone.lora.enabled=false",
                   f"data.root={data_root}", "data.num_workers=0", "data.num_context=2", "data.num_query=2"])
    torch.manual_seed(5)  # another init: only the imported values can match the source
    module = GLUSModule(cfg).eval()
    own = module.state_dict()
    assert all(torch.equal(own[f"segmenter.sam.{k}"], v) for k, v in visual.items())
    assert torch.equal(own["seg_projection.2.weight"], src["model.text_hidden_fcs.0.2.weight"])
    assert torch.equal(own["seg_projection.0.bias"], src["model.text_hidden_fcs.0.0.bias"])
    lm = module.backbone.hf_model.model.language_model
    assert torch.equal(lm.layers[1].self_attn.v_proj.weight, src["model.layers.1.self_attn.v_proj.weight"])
    batch = next(iter(RefVOSDataModule(cfg.data).val_dataloader()))
    logits = module.predict_video(batch)
    assert logits.shape[:2] == (len(batch.expressions), 4) and torch.isfinite(logits).all()


def test_init_weights_must_fit_the_model(tmp_path: Path) -> None:
    net = torch.nn.Sequential(torch.nn.Linear(3, 2))
    save_file({"0.weight": torch.ones(2, 3)}, tmp_path / "ok.safetensors")
    assert load_init_weights(net, tmp_path / "ok.safetensors") == ["0.weight"] and torch.equal(net[0].weight, torch.ones(2, 3))
    save_file({"0.weight": torch.ones(3, 3), "1.bias": torch.ones(1)}, tmp_path / "bad.safetensors")
    with pytest.raises(ValueError, match=r"bad.safetensors' does not fit this model: unknown names \['1.bias'\], shape mismatches \['0.weight: file \(3, 3\) vs model \(2, 3\)'\]"):
        load_init_weights(net, tmp_path / "bad.safetensors")
    with pytest.raises(FileNotFoundError, match="init_weights='nowhere.safetensors' does not exist"):
        load_init_weights(net, "nowhere.safetensors")


def test_released_protocol_decodes_each_frame_as_a_step_by_step_reference_loop(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Sliding decoding (batched over frames and expressions, prefix cache shared) gives the masks of a plain loop
    that, frame by frame and expression by expression, asks about the frame at the end of a conversation over it and
    the 3 frames before it, takes that last [SEG], and steps SAM2's memory one frame at a time."""
    torch.manual_seed(0)
    sam = build_sam2(load_group("segmenter", "test"))
    reference_checkpoint(tmp_path / "GLUS-S", prompt_dim=sam.sam_prompt_embed_dim, visual=sam.state_dict())
    assert main(["import", "glus", str(tmp_path / "GLUS-S"), "--out", str(tmp_path / "imported")]) == 0
    overrides = capsys.readouterr().out.split("load with: ")[1].split()
    prepare_synthetic(tmp_path / "data", seed=3, num_train=1, num_val=1, frames=7, size=32)
    cfg = compose(["experiment=glus_s_released", "segmenter=test", "data=synthetic", *overrides, "backbone.dtype=float32",
                   f"backbone.image_size={IMAGE}", "trainer=cpu", f"data.root={tmp_path / 'data'}", "data.num_workers=0",
                   "data.num_context=2", "inference.window=3",
                   "segmenter.multimask_fallback=true"])  # as the released SAM2's config (the test size turns it off)
    assert cfg.inference.decoding == "sliding" and cfg.data.num_query == 4
    module = GLUSModule(cfg).eval()
    batch = next(iter(RefVOSDataModule(cfg.data).val_dataloader()))
    num_exp, frames = len(batch.expressions), batch.num_query
    assert frames == 7 and num_exp >= 2
    with torch.no_grad():
        sliding = module.predict_video(batch)
        memory, expected = module.segmenter.new_memory(num_exp), []
        for f in range(frames):
            prompts = []
            for expression in batch.expressions:
                turns = batch.query_frames[:, max(0, f - 3) : f + 1]
                out = module.backbone.encode(batch.context_frames, turns, [expression], ce_only_seg=cfg.loss.ce_only_seg,
                                             sizes=batch.video_sizes)
                assert out.seg_hidden.shape[1] == turns.shape[1]  # one [SEG] per turn; the frame's is the last
                prompts.append(module.seg_projection(out.seg_hidden[0, -1]))
            features = module.segmenter.encode_frames(batch.query_frames[0, [f]])
            one = module.segmenter.select(features, torch.zeros(num_exp, 1, dtype=torch.long))
            expected.append(module.segmenter.track(one, torch.stack(prompts)[:, None], memory=memory, frame_ids=[f]).mask_logits)
        expected = torch.cat(expected, dim=1)
        module.cfg.inference.decoding = "windowed"
        windowed = module.predict_video(batch)
    torch.testing.assert_close(sliding, expected, atol=1e-4, rtol=1e-4)
    assert torch.equal(sliding > 0, expected > 0)
    assert not torch.allclose(windowed[:, 1:], sliding[:, 1:], atol=1e-3)  # the two decodings do differ
