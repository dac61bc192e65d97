"""Import published weights (LISA-7B-v1, the GLUS releases) into the layouts this project loads.

Both are ``save_pretrained`` directories of the reference code's LLaVA-LLaMA model class (``LISAForCausalLM`` /
``GLUSForCausalLM``): LLaMA weights under ``model.*`` and ``lm_head``, the vision-language projector
``model.mm_projector``, the ``[SEG]`` MLP ``model.text_hidden_fcs.0`` and a segmentation model
``model.visual_model`` (SAM1 in LISA, unused by GLUS; SAM2 in the GLUS releases). The reference merge scripts
drop the CLIP tower (``model.vision_tower.vision_tower.vision_model.*``) when saving, so it is read from the
checkpoint when there and otherwise from a local CLIP directory (``--vision-tower``).

Outputs:
- a Hugging Face ``LlavaForConditionalGeneration`` directory (``backbone.path``), tokenizer with ``<image>`` added;
- ``seg_projection.safetensors``: the ``[SEG]`` MLP under ``GLUSModule`` names (``init_weights``);
- GLUS only: ``sam2.pt``, the SAM2 state dict in the official ``{"model": ...}`` format (``segmenter.checkpoint``).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from transformers import AutoTokenizer, CLIPImageProcessor, CLIPVisionModel, LlavaConfig, LlavaForConditionalGeneration

from glus_lightning.checkpoints.checkpoint_io import atomic_torch_save

SEG_TOKEN, IMAGE_TOKEN = "[SEG]", "<image>"
CLIP_HEAD_DIM = 64  # every CLIP ViT has 64-wide heads: the head count of a tower read from weights alone
TEXT_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
             "rms_norm_eps", "max_position_embeddings", "rope_theta", "rope_scaling", "hidden_act")
CLIP_VISION_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "patch_size",
                    "image_size", "hidden_act", "layer_norm_eps", "projection_dim", "num_channels")
PROJECTION_FILE, SAM2_FILE = "seg_projection.safetensors", "sam2.pt"
# SAM2 Hiera trunk (embed_dim, blocks) -> our segmenter size
SAM2_SIZES = {(96, 12): "tiny", (96, 16): "small", (112, 24): "base_plus", (144, 48): "large"}


class CheckpointImportError(ValueError):
    """The checkpoint is not of the kind the importer was asked for; the message names the file and what it found."""


@dataclass
class ImportReport:
    """What an import wrote and which source tensors it left behind (and why)."""

    source: Path
    written: dict[str, Path] = field(default_factory=dict)
    mapped: int = 0
    unmapped: dict[str, list[str]] = field(default_factory=dict)  # reason -> source keys
    overrides: list[str] = field(default_factory=list)  # config overrides that load the result

    def summary(self) -> str:
        lines = [f"imported {self.mapped} tensors from {self.source}"]
        lines += [f"  {what}: {path}" for what, path in self.written.items()]
        for reason, keys in self.unmapped.items():
            lines.append(f"  not imported ({reason}): {len(keys)} tensors, e.g. {', '.join(keys[:3])}")
        if self.overrides:
            lines.append("load with: " + " ".join(self.overrides))
        return "\n".join(lines)


# ------------------------------------------------------------------------------------------------- reading
def read_state_dict(path: Path) -> dict[str, Tensor]:
    """All tensors of a checkpoint directory (safetensors or ``pytorch_model*.bin``, sharded or not)."""
    files = sorted(path.glob("*.safetensors")) or sorted(path.glob("pytorch_model*.bin"))
    if not files:
        raise CheckpointImportError(f"{path}: no *.safetensors or pytorch_model*.bin weight files")
    state: dict[str, Tensor] = {}
    for file in files:
        part = load_file(file) if file.suffix == ".safetensors" else torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        state.update(part)
    return state


def _read_config(path: Path) -> dict[str, Any]:
    file = path / "config.json"
    if not file.is_file():
        raise CheckpointImportError(f"{path}: {'no config.json' if path.is_dir() else 'does not exist'}")
    return json.loads(file.read_text())


def _check_reference_layout(path: Path, config: dict[str, Any], state: dict[str, Tensor], kind: str) -> None:
    """Fail clearly unless ``path`` is an original-layout LLaVA-LLaMA checkpoint with a ``[SEG]`` MLP."""
    if "vision_config" in config:
        raise CheckpointImportError(
            f"{path} is already a Hugging Face llava checkpoint (config.json has vision_config): point backbone.path at it"
        )
    problems = [what for what, ok in (
        ("config.json mm_vision_tower", "mm_vision_tower" in config),
        ("model.layers.* (LLaMA)", any(k.startswith("model.layers.") for k in state)),
        ("model.mm_projector.*", any(k.startswith("model.mm_projector.") for k in state)),
        ("model.text_hidden_fcs.0.* ([SEG] MLP)", any(k.startswith("model.text_hidden_fcs.0.") for k in state)),
    ) if not ok]
    if problems:
        raise CheckpointImportError(
            f"{path} is not a {kind} checkpoint (config.json model_type={config.get('model_type')!r}, "
            f"architectures={config.get('architectures')}): it lacks {', '.join(problems)}"
        )


# ------------------------------------------------------------------------------------------------- mapping
def _projector(state: dict[str, Tensor], config: dict[str, Any]) -> tuple[dict[str, Tensor], str]:
    """LLaVA's ``mm_projector`` as Hugging Face's two-layer projector and its activation.

    ``linear`` (LLaVA v1, LISA-7B-v1) becomes ``linear_1`` = the layer, identity activation, ``linear_2`` = identity
    matrix: the same function; ``mlp2x_gelu`` (LLaVA-1.5) maps layer for layer.
    """
    p = "model.mm_projector."
    if f"{p}weight" in state:
        w = state[f"{p}weight"]
        eye = torch.eye(w.shape[0], dtype=w.dtype)
        return {"linear_1.weight": w, "linear_1.bias": state[f"{p}bias"], "linear_2.weight": eye,
                "linear_2.bias": torch.zeros(w.shape[0], dtype=w.dtype)}, "linear"
    keys = sorted(k for k in state if k.startswith(p))
    if keys != [f"{p}{i}.{n}" for i in (0, 2) for n in ("bias", "weight")]:
        kind = config.get("mm_projector_type", "?")
        raise CheckpointImportError(f"mm_projector_type={kind!r} ({keys}) is not linear or mlp2x_gelu: no Hugging Face llava equivalent")
    return {f"linear_{j}.{n}": state[f"{p}{i}.{n}"] for j, i in ((1, 0), (2, 2)) for n in ("weight", "bias")}, "gelu"


def _prefix(keys: Iterable[str], *candidates: str) -> str:
    """The first candidate prefix that the Hugging Face model's parameter names use (they vary by version)."""
    keys = list(keys)
    for candidate in candidates:
        if any(k.startswith(candidate) for k in keys):
            return candidate
    raise RuntimeError(f"this transformers version's LlavaForConditionalGeneration uses none of the names {candidates}")


def split_reference_state(state: dict[str, Tensor], hf_keys: Iterable[str]) -> tuple[dict[str, Tensor], dict[str, Tensor], dict[str, Tensor], dict[str, list[str]]]:
    """Source tensors -> (Hugging Face llava state without the projector, ``[SEG]`` MLP, ``visual_model``, unmapped)."""
    hf_keys = list(hf_keys)
    lm = _prefix(hf_keys, "model.language_model.", "language_model.model.")
    vision = _prefix(hf_keys, "model.vision_tower.vision_model.", "model.vision_tower.")
    rules = [  # (source pattern, target template, destination)
        (r"model\.(embed_tokens|layers|norm)\.(.+)", lm + r"\1.\2", "llava"),
        (r"lm_head\.weight", "lm_head.weight", "llava"),
        (r"model\.vision_tower\.vision_tower\.vision_model\.(.+)", vision + r"\1", "llava"),
        (r"model\.text_hidden_fcs\.0\.([02])\.(weight|bias)", r"seg_projection.\1.\2", "projection"),
        (r"model\.visual_model\.(.+)", r"\1", "visual"),
    ]
    out: dict[str, dict[str, Tensor]] = {"llava": {}, "projection": {}, "visual": {}}
    unmapped: dict[str, list[str]] = {}
    for key, value in state.items():
        if key.startswith("model.mm_projector."):
            continue  # converted as a whole by _projector
        if key.endswith(("rotary_emb.inv_freq", "position_ids")):
            unmapped.setdefault("recomputed buffers", []).append(key)
            continue
        for pattern, target, dest in rules:
            if re.fullmatch(pattern, key):
                out[dest][re.sub(pattern, target, key)] = value
                break
        else:
            unmapped.setdefault("no counterpart", []).append(key)
    return out["llava"], out["projection"], out["visual"], unmapped


def _vision_tower(vision_tower: Path | None, found: bool) -> tuple[dict[str, Tensor], dict[str, Any] | None]:
    """CLIP vision weights (``vision_model.*`` names stripped) and its vision config from a local CLIP directory."""
    if vision_tower is None:
        if not found:
            raise CheckpointImportError(
                "the checkpoint has no CLIP tower (model.vision_tower.vision_tower.vision_model.*; the reference merge "
                "script drops it): pass --vision-tower DIR, a local copy of openai/clip-vit-large-patch14"
            )
        return {}, None
    if not (vision_tower / "config.json").is_file():
        raise CheckpointImportError(f"--vision-tower {vision_tower}: no config.json (expected a local CLIP model directory)")
    try:
        tower = CLIPVisionModel.from_pretrained(vision_tower)  # a CLIPModel directory loads its vision half
    except (OSError, ValueError) as err:
        raise CheckpointImportError(f"--vision-tower {vision_tower}: not a loadable CLIP model ({err})") from err
    weights = {k.removeprefix("vision_model."): v for k, v in tower.state_dict().items() if not k.endswith("position_ids")}
    config = tower.config.to_dict()
    return weights, {k: v for k, v in config.items() if k in CLIP_VISION_KEYS}


def _vision_config_from_weights(tower: dict[str, Tensor], prefix: str) -> dict[str, Any]:
    """CLIP sizes read off the weights (OpenAI CLIP: quick_gelu, 64-wide heads)."""
    patch = tower[f"{prefix}embeddings.patch_embedding.weight"]
    positions = tower[f"{prefix}embeddings.position_embedding.weight"].shape[0]
    layers = {int(m.group(1)) for k in tower if (m := re.match(re.escape(prefix) + r"encoder\.layers\.(\d+)\.", k))}
    hidden = patch.shape[0]
    return {
        "hidden_size": hidden, "patch_size": patch.shape[-1], "image_size": patch.shape[-1] * math.isqrt(positions - 1),
        "num_hidden_layers": len(layers), "intermediate_size": tower[f"{prefix}encoder.layers.0.mlp.fc1.weight"].shape[0],
        "num_attention_heads": max(hidden // CLIP_HEAD_DIM, 1), "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5,
    }


def _grow_rows(weight: Tensor, rows: int) -> Tensor:
    """Embedding / LM-head rows for added tokens, initialised at the mean row (the usual choice for new tokens)."""
    if rows <= weight.shape[0]:
        return weight
    return torch.cat([weight, weight.float().mean(0, keepdim=True).to(weight.dtype).expand(rows - weight.shape[0], -1)])


def write_llava(src: Path, out: Path, config: dict[str, Any], state: dict[str, Tensor], vision_tower: Path | None,
                report: ImportReport) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Write the Hugging Face llava directory; returns the ``[SEG]`` MLP and ``visual_model`` tensors left over."""
    tokenizer = AutoTokenizer.from_pretrained(src)
    if SEG_TOKEN not in tokenizer.get_vocab():
        raise CheckpointImportError(f"{src}: the tokenizer has no {SEG_TOKEN} token, so this is no LISA/GLUS checkpoint")
    if IMAGE_TOKEN not in tokenizer.get_vocab():  # the reference splices images at id -200; Hugging Face needs a token
        tokenizer.add_tokens([IMAGE_TOKEN], special_tokens=True)
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)

    # the target names come from the model class itself (built on the meta device: no memory)
    layers = {int(m.group(1)) for k in state if (m := re.match(r"model\.layers\.(\d+)\.", k))}
    if len(layers) != config["num_hidden_layers"]:
        raise CheckpointImportError(f"{src}: config.json num_hidden_layers={config['num_hidden_layers']} but the weights hold {len(layers)} layers")
    has_tower = any(k.startswith("model.vision_tower.vision_tower.vision_model.") for k in state)
    tower_weights, tower_config = _vision_tower(vision_tower, has_tower)
    embed = state["model.embed_tokens.weight"]
    rows = max(len(tokenizer), embed.shape[0])
    text = {"model_type": "llama", **{k: config[k] for k in TEXT_KEYS if k in config}, "vocab_size": rows,
            "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.unk_token_id}
    projector, act = _projector(state, config)
    select = config.get("mm_vision_select_feature", "patch")
    if select != "patch":
        raise CheckpointImportError(f"{src}: mm_vision_select_feature={select!r}; only 'patch' (CLS dropped) has a Hugging Face equivalent")

    def llava_config(vision: dict[str, Any]) -> LlavaConfig:
        return LlavaConfig(text_config=text, vision_config={"model_type": "clip_vision_model", **vision},
                           image_token_index=image_token_id, projector_hidden_act=act,
                           vision_feature_layer=config.get("mm_vision_select_layer", -2), vision_feature_select_strategy="default")

    probe = llava_config(tower_config or {"hidden_size": 64, "num_attention_heads": 1})
    with torch.device("meta"):
        hf_keys = LlavaForConditionalGeneration(probe).state_dict().keys()
    llava, projection, visual, unmapped = split_reference_state(state, hf_keys)
    vision_prefix = _prefix(hf_keys, "model.vision_tower.vision_model.", "model.vision_tower.")
    llava.update({vision_prefix + k: v for k, v in tower_weights.items()})  # --vision-tower wins over a stored tower
    lm = _prefix(hf_keys, "model.language_model.", "language_model.model.")
    llava[f"{lm}embed_tokens.weight"] = _grow_rows(embed, rows)
    llava["lm_head.weight"] = _grow_rows(state["lm_head.weight"], rows)
    projector_prefix = _prefix(hf_keys, "model.multi_modal_projector.", "multi_modal_projector.")
    llava.update({projector_prefix + k: v for k, v in projector.items()})
    hf_config = llava_config(tower_config or _vision_config_from_weights(llava, vision_prefix))
    hf_config.dtype = str(embed.dtype).removeprefix("torch.")

    with torch.device("meta"):
        model = LlavaForConditionalGeneration(hf_config)
    expected = set(model.state_dict())
    missing, extra = sorted(expected - set(llava)), sorted(set(llava) - expected)
    if missing or extra:
        raise CheckpointImportError(f"{src}: mapped weights do not fill LlavaForConditionalGeneration: "
                                    f"missing {missing[:5]} ({len(missing)}), unexpected {extra[:5]} ({len(extra)})")
    mismatched = [f"{k}: {tuple(v.shape)} vs {tuple(llava[k].shape)}" for k, v in model.state_dict().items() if v.shape != llava[k].shape]
    if mismatched:
        raise CheckpointImportError(f"{src}: shapes differ from the llava config built from config.json: {mismatched[:5]}")
    model.load_state_dict(llava, strict=True, assign=True)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    size = hf_config.vision_config.image_size
    processor = (CLIPImageProcessor.from_pretrained(vision_tower) if vision_tower and (vision_tower / "preprocessor_config.json").is_file()
                 else CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size}))
    processor.save_pretrained(out)
    report.written["backbone (backbone.path)"] = out
    report.mapped += len(state) - sum(map(len, unmapped.values())) - len(visual) - len(projection)
    report.unmapped.update(unmapped)
    return projection, visual


def _write_projection(projection: dict[str, Tensor], out: Path, report: ImportReport) -> None:
    if sorted(projection) != [f"seg_projection.{i}.{n}" for i in (0, 2) for n in ("bias", "weight")]:
        raise CheckpointImportError(f"the [SEG] MLP model.text_hidden_fcs.0 is not Linear, ReLU, Linear: {sorted(projection)}")
    file = out / PROJECTION_FILE
    save_file({k: v.contiguous() for k, v in projection.items()}, file)
    report.written["[SEG] projection (init_weights)"] = file
    report.mapped += len(projection)


def sam2_segmenter_choice(sam: dict[str, Tensor]) -> str | None:
    """The ``segmenter=`` config choice of an official-size SAM2 state dict (None for other sizes)."""
    width = sam["image_encoder.trunk.patch_embed.proj.weight"].shape[0]
    blocks = len({k.split(".")[3] for k in sam if k.startswith("image_encoder.trunk.blocks.")})
    size = SAM2_SIZES.get((width, blocks))
    version = "sam2.1" if "no_obj_embed_spatial" in sam else "sam2"
    return f"{version}_{size}" if size else None


# ------------------------------------------------------------------------------------------------- importers
def import_lisa(path: str | Path, out: str | Path, vision_tower: str | Path | None = None) -> ImportReport:
    """LISA-7B-v1 -> ``out`` (a ``backbone.path`` directory) + ``out/seg_projection.safetensors``; SAM1 is left out."""
    path, out = Path(path), Path(out)
    config, state = _read_config(path), read_state_dict(path)
    _check_reference_layout(path, config, state, "LISA")
    if any(k.startswith("model.visual_model.memory_attention.") for k in state):
        raise CheckpointImportError(f"{path} holds a SAM2 visual_model (memory attention): a GLUS release; use `glus import glus`")
    report = ImportReport(path)
    projection, visual = write_llava(path, out, config, state, Path(vision_tower) if vision_tower else None, report)
    _write_projection(projection, out, report)
    if visual:
        report.unmapped["SAM1 decoder model.visual_model, unused by GLUS"] = [f"model.visual_model.{k}" for k in visual]
    report.overrides = [f"backbone.path={out}", f"init_weights={out / PROJECTION_FILE}"]
    return report


def import_glus(path: str | Path, out: str | Path, vision_tower: str | Path | None = None) -> ImportReport:
    """A GLUS release -> ``out/backbone`` + ``out/seg_projection.safetensors`` + ``out/sam2.pt`` (official format)."""
    path, out = Path(path), Path(out)
    config, state = _read_config(path), read_state_dict(path)
    _check_reference_layout(path, config, state, "GLUS")
    if not any(k.startswith("model.visual_model.memory_attention.") for k in state):
        raise CheckpointImportError(
            f"{path} has no SAM2 model.visual_model (memory_attention.*): not a GLUS release (LISA's SAM1 decoder? use `glus import lisa`)"
        )
    report = ImportReport(path)
    projection, visual = write_llava(path, out / "backbone", config, state, Path(vision_tower) if vision_tower else None, report)
    _write_projection(projection, out, report)
    atomic_torch_save({"model": {k: v.contiguous() for k, v in visual.items()}}, out / SAM2_FILE)
    report.written["SAM2 (segmenter.checkpoint)"] = out / SAM2_FILE
    report.mapped += len(visual)
    choice = sam2_segmenter_choice(visual)
    report.overrides = [*([f"segmenter={choice}"] if choice else []), f"backbone.path={out / 'backbone'}",
                        f"segmenter.checkpoint={out / SAM2_FILE}", f"init_weights={out / PROJECTION_FILE}"]
    return report


# ------------------------------------------------------------------------------------------------- loading
@torch.no_grad()
def load_init_weights(module: nn.Module, path: str | Path) -> list[str]:
    """Copy the tensors of a safetensors file into ``module`` by name (e.g. ``seg_projection.*``); returns the names.

    Every name must exist in ``module`` with the same shape: a file meant for another model is an error, not a
    silent partial load.
    """
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"init_weights={str(path)!r} does not exist (made by `glus import lisa|glus`)")
    weights, own = load_file(file), module.state_dict()
    unknown = sorted(set(weights) - set(own))
    mismatched = [f"{k}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}" for k, v in weights.items() if k in own and v.shape != own[k].shape]
    if unknown or mismatched:
        raise ValueError(f"init_weights={str(path)!r} does not fit this model: unknown names {unknown[:5]}, shape mismatches {mismatched[:5]}")
    for key, value in weights.items():
        own[key].copy_(value)
    return sorted(weights)


# ------------------------------------------------------------------------------------------------- command line
IMPORTERS = {"lisa": import_lisa, "glus": import_glus}


def configure_import_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("kind", choices=sorted(IMPORTERS), help="lisa: LISA-7B-v1; glus: GLUS-S, GLUS-S-partial or GLUS-A")
    parser.add_argument("path", type=Path, help="the downloaded checkpoint directory (config.json, weights, tokenizer)")
    parser.add_argument("--out", type=Path, required=True, help="where to write the imported weights")
    parser.add_argument("--vision-tower", type=Path, default=None,
                        help="local openai/clip-vit-large-patch14 directory, needed when the checkpoint has no CLIP tower")


def run_import(args: argparse.Namespace) -> int:
    try:
        report = IMPORTERS[args.kind](args.path, args.out, args.vision_tower)
    except (CheckpointImportError, FileNotFoundError) as err:
        print(f"glus import {args.kind}: {err}", file=sys.stderr)
        return 2
    print(report.summary())
    return 0
