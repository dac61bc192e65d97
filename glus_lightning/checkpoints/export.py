"""``glus export``: a trained checkpoint as a self-contained model directory, and loading it back.

    <out>/backbone/            Hugging Face model (LoRA merged into the base weights) + tokenizer with [SEG] + image processor
    <out>/heads.safetensors    the SAM2 segmenter (all of it) and the [SEG] projection
    <out>/config.yaml          the run's resolved config, pointing at backbone/ (LoRA off, no 4-bit, no SAM2 checkpoint)

The config comes from the checkpoint itself (saved there by ``GLUSModule``), so the export rebuilds exactly the
trained model. A QLoRA run is exported through full-precision base weights: its adapters (trained against the 4-bit
weights) are merged into the unquantised base, which 4-bit storage could not hold.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import lightning as L
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import load_file, save_file

from glus_lightning.checkpoints.checkpoint_io import load_checkpoint
from glus_lightning.checkpoints.saved_config import upgraded
from glus_lightning.checkpoints.state import check_checkpoint_fits
from glus_lightning.config import ConfigError
from glus_lightning.module import GLUSModule

HEADS_FILE = "heads.safetensors"
CONFIG_FILE = "config.yaml"
BACKBONE_DIR = "backbone"


def model_from_checkpoint(ckpt_path: str | Path) -> GLUSModule:
    """The trained ``GLUSModule`` of a training checkpoint (built from its saved config, base weights unquantised)."""
    checkpoint = load_checkpoint(ckpt_path)
    saved = checkpoint.get("hyper_parameters", {}).get("config")
    if saved is None:
        raise ValueError(f"checkpoint {str(ckpt_path)!r} holds no config (hyper_parameters.config): not a GLUSModule checkpoint")
    cfg = upgraded(saved)
    cfg.backbone.quantization.load_in_4bit = False
    L.seed_everything(cfg.seed)  # the frozen weights of a random-init (tiny) model are those the run was built with
    model = GLUSModule(cfg)
    check_checkpoint_fits(model, checkpoint, cfg.backbone.family)
    model.load_state_dict(checkpoint["state_dict"], strict=False)
    return model.eval()


def export_model(model: GLUSModule, out: str | Path) -> Path:
    """Write ``model`` as an export directory (see the module doc) and return it."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.backbone.save_pretrained(out / BACKBONE_DIR)
    heads = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items() if not k.startswith("backbone.")}
    save_file(heads, out / HEADS_FILE)
    cfg = OmegaConf.create(OmegaConf.to_container(model.cfg, resolve=True))
    cfg.backbone.path = str((out / BACKBONE_DIR).resolve())
    cfg.backbone.lora.enabled = False
    cfg.backbone.quantization.load_in_4bit = False
    cfg.segmenter.checkpoint = None
    cfg.ckpt_path = None
    if "init_weights" in cfg:  # published start weights: already inside what is exported
        cfg.init_weights = None
    (out / CONFIG_FILE).write_text(OmegaConf.to_yaml(cfg))
    return out


def load_export(path: str | Path) -> GLUSModule:
    """The ``GLUSModule`` of an export directory, ready for ``predict_video`` (eval mode)."""
    path = Path(path)
    for needed in (CONFIG_FILE, HEADS_FILE, BACKBONE_DIR):
        if not (path / needed).exists():
            raise FileNotFoundError(f"{str(path)!r} is not a glus export: {needed} is missing")
    cfg: DictConfig = upgraded(OmegaConf.load(path / CONFIG_FILE))
    cfg.backbone.path = str(path / BACKBONE_DIR)  # the directory may have moved since export
    model = GLUSModule(cfg)
    result = model.load_state_dict(load_file(path / HEADS_FILE), strict=False)
    missing = [k for k in result.missing_keys if not k.startswith("backbone.")]
    if missing or result.unexpected_keys:
        raise ValueError(f"{path / HEADS_FILE}: does not fit the model of {path / CONFIG_FILE}: "
                         f"missing {missing[:5]}, unexpected {result.unexpected_keys[:5]}")
    return model.eval()


def configure_export_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="a training checkpoint (.ckpt)")
    parser.add_argument("--out", required=True, help="export directory (created)")


def run_export(args: argparse.Namespace) -> int:
    try:
        out = export_model(model_from_checkpoint(args.checkpoint), args.out)
    except (ConfigError, ValueError, FileNotFoundError) as err:
        print(f"glus export: {err}")
        return 2
    print(f"Exported to {out} (load with glus_lightning.checkpoints.export.load_export, or backbone.path={out / BACKBONE_DIR})")
    return 0
