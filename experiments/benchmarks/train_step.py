"""Seconds per training step and peak memory, by backbone family and segmenter size.

Each configuration runs in its own process (peak memory is per process): forward + backward + AdamW step of
``GLUSModule`` on a batch of random frames shaped like the training data (B videos, C context + Q query frames,
E expressions). CPU peak is the process's max RSS; on CUDA it is ``torch.cuda.max_memory_allocated``.

    python experiments/benchmarks/train_step.py                         # tiny families x {test, sam2.1_tiny}
    python experiments/benchmarks/train_step.py --backbones llava_tiny --segmenters test sam2.1_large --device cuda
    python experiments/benchmarks/train_step.py --backbones llava_7b_shape --segmenters sam2_large --device cuda \
        --overrides trainer.precision=bf16-true backbone.quantization.load_in_4bit=true   # 7B-sized QLoRA (random init)

``llava_7b_shape`` is the tiny LLaVA config resized to LLaMA-7B / CLIP ViT-L dimensions (random init: memory and
speed are those of the real model but for the embedding rows of the built-in tokenizer; no weights are needed).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

LLAVA_7B_SHAPE = [
    "backbone=llava_tiny", "backbone.image_size=224", "backbone.image_token_pool=2x2",
    ("backbone.tiny.text_config={hidden_size: 4096, intermediate_size: 11008, num_hidden_layers: 32, "
     "num_attention_heads: 32, num_key_value_heads: 32}"),
    ("backbone.tiny.vision_config={hidden_size: 1024, intermediate_size: 4096, num_hidden_layers: 24, "
     "num_attention_heads: 16, patch_size: 14}"),
    "backbone.lora.r=8", "backbone.lora.alpha=16", "backbone.gradient_checkpointing=true",
]


def run_one(backbone: str, segmenter: str, device: str, steps: int, overrides: list[str]) -> dict:
    import torch

    from datamodules.batch import RefVOSBatch
    from datamodules.targets import DenseTargets
    from glus_lightning.config import compose
    from glus_lightning.module import GLUSModule

    chosen = LLAVA_7B_SHAPE if backbone == "llava_7b_shape" else [f"backbone={backbone}"]
    cfg = compose([*chosen, f"segmenter={segmenter}", *overrides])
    torch.manual_seed(0)
    model = GLUSModule(cfg).to(device)
    dtype = {"bf16-true": torch.bfloat16, "16-true": torch.float16}.get(cfg.trainer.precision)
    if dtype is not None:
        model = model.to(dtype)
    b, c, q, e = cfg.data.batch_size, cfg.data.num_context, cfg.data.num_query, cfg.data.max_expressions * cfg.data.batch_size
    s = cfg.segmenter.image_size
    gen = torch.Generator().manual_seed(0)
    batch = RefVOSBatch(
        frames=torch.randint(0, 256, (b, c + q, 3, s, s), dtype=torch.uint8, generator=gen),
        num_context=c,
        frame_indices=torch.arange(c + q).repeat(b, 1),
        expressions=["the red circle moving up"] * e,
        expression_ids=[str(i) for i in range(e)],
        expression_video=torch.arange(e) % b,
        expression_objects=[(1,)] * e,
        targets=DenseTargets([(torch.rand(q, 480, 640, generator=gen) > 0.7).to(torch.uint8) for _ in range(e)]),
        video_ids=[f"v{i}" for i in range(b)],
        datasets=["bench"] * b,
        video_objects=[(1,)] * b,
        frame_names=[[str(i) for i in range(q)]] * b,
    ).to(device)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    model.train()
    times = []
    for i in range(steps + 1):  # the first step warms up and is not timed
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        model.training_step(batch, i).backward()
        optimizer.step()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return {"backbone": backbone, "segmenter": segmenter, "s_per_step": sum(times[1:]) / steps, "peak_mib": peak,
            "params_m": total / 1e6, "trainable_m": trainable / 1e6}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbones", nargs="+", default=["llava_tiny", "qwen2_5_vl_tiny", "internvl_tiny"])
    parser.add_argument("--segmenters", nargs="+", default=["test", "sam2.1_tiny"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--overrides", nargs="*", default=[], help="config overrides for every run")
    parser.add_argument("--one", nargs=2, metavar=("BACKBONE", "SEGMENTER"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(*args.one, args.device, args.steps, args.overrides)))
        return
    rows = []
    for backbone in args.backbones:
        for segmenter in args.segmenters:
            cmd = [sys.executable, __file__, "--one", backbone, segmenter, "--device", args.device,
                   "--steps", str(args.steps), "--overrides", *args.overrides]
            proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if proc.returncode != 0:
                print(f"{backbone} x {segmenter} failed:\n{proc.stderr[-2000:]}", file=sys.stderr)
                continue
            rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    base = rows[0]["s_per_step"] if rows else 1.0
    print(f"\ndevice={args.device} overrides={' '.join(args.overrides) or '-'}")
    print(f"{'backbone':18s} {'segmenter':14s} {'params M':>9s} {'train M':>8s} {'s/step':>8s} {'vs first':>9s} {'peak MiB':>9s}")
    for r in rows:
        print(f"{r['backbone']:18s} {r['segmenter']:14s} {r['params_m']:9.2f} {r['trainable_m']:8.2f} "
              f"{r['s_per_step']:8.3f} {r['s_per_step'] / base:9.2f} {r['peak_mib']:9.0f}")


if __name__ == "__main__":
    main()
