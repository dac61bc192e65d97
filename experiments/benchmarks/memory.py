"""Peak memory of one training step: LoRA vs QLoRA (4-bit NF4 base), and DDP vs FSDP2 per process.

    python experiments/benchmarks/memory.py                                   # tiny LLaVA + test SAM2 on the CPU
    python experiments/benchmarks/memory.py --backbone llava_7b_shape --segmenter sam2_large --device cuda --no-parallel

Adapter rows run ``train_step.py`` (one process per row: forward + backward + AdamW step on a random batch) and add
the backbone's weight bytes (``weights MiB``: what 4-bit storage shrinks). Parallel rows run ``glus fit`` for a few
steps with 2 CPU processes (``trainer=ddp`` / ``trainer=fsdp``, gloo) and report the largest per-process peak RSS.
``llava_7b_shape`` is the LLaMA-7B / CLIP ViT-L sized random-init config of ``train_step.py``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent


def adapters(device: str) -> dict[str, list[str]]:
    """LoRA over 16-bit base weights vs over 4-bit NF4 ones (bf16 on CUDA; fp32 on the CPU, where train_step runs fp32)."""
    dtype, precision = ("bfloat16", "bf16-true") if device == "cuda" else ("float32", "32-true")
    common = [f"backbone.dtype={dtype}", f"trainer.precision={precision}", f"backbone.quantization.compute_dtype={dtype}"]
    return {f"{dtype} LoRA": common, "QLoRA (NF4)": [*common, "backbone.quantization.load_in_4bit=true"]}


def weight_mib(backbone: str, overrides: list[str]) -> float:
    """Bytes of the backbone's parameters and buffers as stored (4-bit weights count at their packed size)."""
    code = (
        "import sys, json, torch\n"
        "sys.path.insert(0, sys.argv[1])\n"
        "from train_step import LLAVA_7B_SHAPE\n"
        "from glus_lightning.config import compose\n"
        "from glus_lightning.backbones import build_backbone\n"
        "chosen = LLAVA_7B_SHAPE if sys.argv[2] == 'llava_7b_shape' else ['backbone=' + sys.argv[2]]\n"
        "cfg = compose(chosen + sys.argv[3:])\n"
        "b = build_backbone(cfg.backbone, cfg.prompt)\n"
        "n = sum(t.numel() * t.element_size() for t in [*b.parameters(), *b.buffers()])\n"
        "print(json.dumps(n / 2**20))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code, str(HERE), backbone, *overrides], capture_output=True, text=True, check=True)
    return float(proc.stdout.strip().splitlines()[-1])


def adapter_rows(backbone: str, segmenter: str, device: str) -> list[dict]:
    rows = []
    for name, overrides in adapters(device).items():
        cmd = [sys.executable, str(HERE / "train_step.py"), "--one", backbone, segmenter, "--device", device,
               "--steps", "1", "--overrides", *overrides]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            print(f"{name} failed:\n{proc.stderr[-2000:]}", file=sys.stderr)
            continue
        row = json.loads(proc.stdout.strip().splitlines()[-1])
        rows.append({"setup": name, "peak_mib": row["peak_mib"], "weights_mib": weight_mib(backbone, overrides),
                     "s_per_step": row["s_per_step"]})
    return rows


def parallel_rows(data_root: Path) -> list[dict]:
    rows = []
    for strategy in ("ddp", "fsdp"):
        with tempfile.TemporaryDirectory() as run_dir:
            cmd = [sys.executable, "-m", "glus_lightning.cli", "fit", f"trainer={strategy}", "trainer.accelerator=cpu",
                   "trainer.devices=2", "trainer.precision=32-true", "trainer.max_steps=3", "trainer.val_every_n_steps=3",
                   "trainer.accumulate_grad_batches=1", f"data.root={data_root}", "data.num_workers=0", "data.batch_size=1",
                   "data.samples_per_epoch=6", f"run_dir={run_dir}", "backbone.train_vision_tower=false",
                   "segmenter.train_image_encoder=false", "segmenter.train_memory=false"]
            # a fresh parent per run: its RUSAGE_CHILDREN peak is the largest rank process of this run only
            probe = ("import resource, subprocess, sys; subprocess.run(sys.argv[1:], capture_output=True, check=True); "
                     "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
            proc = subprocess.run([sys.executable, "-c", probe, *cmd], capture_output=True, text=True, check=True)
        rows.append({"setup": f"{strategy} x2 (CPU)", "peak_mib": int(proc.stdout.split()[-1]) / 1024})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="llava_tiny")
    parser.add_argument("--segmenter", default="test")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--no-parallel", action="store_true", help="skip the 2-process DDP / FSDP rows")
    args = parser.parse_args()
    rows = adapter_rows(args.backbone, args.segmenter, args.device)
    print(f"\n{args.backbone} x {args.segmenter} on {args.device}")
    print(f"{'setup':16s} {'weights MiB':>12s} {'peak MiB':>9s} {'s/step':>7s}")
    for r in rows:
        print(f"{r['setup']:16s} {r['weights_mib']:12.1f} {r['peak_mib']:9.0f} {r['s_per_step']:7.3f}")
    if not args.no_parallel:
        with tempfile.TemporaryDirectory() as data_root:
            from datamodules.prepare import prepare_synthetic

            prepare_synthetic(Path(data_root), seed=5, num_train=8, num_val=4, frames=6, size=48)
            print(f"\n{'setup':16s} {'peak MiB per process':>21s}  (llava_tiny x test, 3 steps + validation)")
            for r in parallel_rows(Path(data_root)):
                print(f"{r['setup']:16s} {r['peak_mib']:21.0f}")


if __name__ == "__main__":
    main()
