"""GPU acceptance of GLUS-S at full size with random weights, written to one JSON.

Why: ``rehearsal.py`` extrapolates a truncated model's memory on the CPU; this measures the real model on one GPU in
under 8 minutes (an H200): the full-depth, full-width GLUS-S built from configs alone (``rehearsal.overrides``: real
widths and vocabulary, random init, SAM2 Hiera-L at 1024 px, 2 videos x (4 + 4) frames x 3 expressions, 720p targets)

- bf16-mixed LoRA training: ``--steps`` steps after one warm-up, s/step and peak memory per phase,
- whole-video inference (``predict_video``, the glus_s keyframe path) of ``--frames`` frames: frames/s and peak,
- QLoRA (NF4 language model) training: the same steps,
- ``trainer=fsdp1`` (Lightning FSDPStrategy) on one GPU for ``--fsdp-steps`` steps.

Each phase (forward, backward, optimiser step, inference) is timed between ``torch.cuda.synchronize`` calls and
its peak read from ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats`` at the phase's start. The
JSON (rewritten after every section, so a timeout keeps what finished) holds the torch / transformers / GPU names
and every config override used. ``--smoke`` runs the same code on the CPU with 1 layer, 1 step and 4 frames (memory
there: tensor bytes above the weights, see ``tensor_memory.LiveTensorBytes``) and SAM2 Hiera-T at 256 px (Hiera-L at
1024 px takes many minutes per step on a CPU), and skips FSDP1, which needs CUDA.

    python experiments/benchmarks/gpu_acceptance.py --out runs/gpu_acceptance.json
    python experiments/benchmarks/gpu_acceptance.py --smoke --out /tmp/gpu_acceptance_smoke.json
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import rehearsal  # the same model, batches and meters as the rehearsal

GIB = 2**30


def environment(device: Any) -> dict[str, Any]:
    import bitsandbytes
    import lightning
    import peft
    import torch
    import transformers

    env = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
           "peft": peft.__version__, "bitsandbytes": bitsandbytes.__version__, "lightning": lightning.__version__,
           "cuda": torch.version.cuda, "cpu": platform.processor() or platform.machine(), "device": str(device)}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(gpu=props.name, gpu_memory_gib=props.total_memory / GIB, gpu_capability=f"{props.major}.{props.minor}")
    return env


def free(device: Any) -> None:
    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def build(preset: str, layers: int | None, mode: str, device: Any, extra: list[str] = ()) -> tuple[Any, Any, list[str], float]:
    from glus_lightning.config import compose

    ov = [*rehearsal.overrides(preset, layers, mode), *extra]
    cfg = compose(ov)
    rehearsal.use_vocabulary(cfg.backbone.family, rehearsal.PRESETS[preset].vocab, init_device=device.type)
    import torch

    torch.manual_seed(0)
    t = time.perf_counter()
    model = rehearsal.build_module(cfg, device)
    free(device)
    return model, cfg, ov, time.perf_counter() - t


def train_section(preset: str, layers: int | None, mode: str, steps: int, warmup: int, device: Any,
                  extra: list[str] = ()) -> tuple[dict[str, Any], Any, Any]:
    """``warmup`` + ``steps`` training steps (zero_grad(set_to_none) after each, as Lightning), each phase measured."""

    meter = rehearsal.Meter(device)
    model, cfg, ov, build_s = build(preset, layers, mode, device, extra)
    base = uncounted(meter, model)
    d = cfg.data
    batch = rehearsal.synthetic_batch(d.batch_size, d.num_context, d.num_query, d.max_expressions, cfg.segmenter.image_size,
                                      (720, 1280)).to(device)
    optimizer = rehearsal.make_optimizer(model, cfg, mid_accumulation=False)
    model.train()
    records = []
    with meter.tracking():
        for i in range(warmup + steps):
            step = rehearsal.train_step(model, batch, optimizer, meter)
            optimizer.zero_grad(set_to_none=True)
            step["warmup"] = i < warmup
            step["peak_gib"] = {ph: (base + step["start"] + p["act"]) / GIB for ph, p in step["phases"].items()}
            records.append(step)
            print(f"[acceptance] {mode} step {i}: {step['seconds']:.2f} s, loss {step['loss']:.3f}", file=sys.stderr, flush=True)
    timed = [r["seconds"] for r in records if not r["warmup"]]
    out = {
        "overrides": ov, "build_s": build_s, "weights_gib": (base + records[0]["start"]) / GIB,
        "steps": records, "s_per_step_median": statistics.median(timed), "s_per_step_mean": statistics.fmean(timed),
        "peak_gib": max(max(r["peak_gib"].values()) for r in records),
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
    }
    return out, model, cfg


def uncounted(meter: Any, model: Any) -> int:
    """What the meter does not see: nothing on CUDA (the allocator counts everything); on the CPU the tensors made
    before tracking began (the weights), counted from the model."""
    return 0 if meter.cuda else sum(rehearsal.tensor_bytes(t) for t in [*model.parameters(), *model.buffers()])


def inference_section(model: Any, cfg: Any, frames: int, warmup: bool, device: Any) -> dict[str, Any]:
    """Whole-video ``predict_video`` of one ``frames``-frame video x 3 expressions (glus_s: keyframes, KV-cache)."""
    meter = rehearsal.Meter(device)
    d = cfg.data
    model.eval()
    video = lambda n, seed: rehearsal.synthetic_batch(1, d.num_context, n, d.max_expressions, cfg.segmenter.image_size,
                                                      (720, 1280), seed=seed).to(device)
    import torch

    with meter.tracking(), torch.autocast(device.type, dtype=torch.bfloat16):
        if warmup:
            model.predict_video(video(4, 2))
        batch = video(frames, 3)
        with meter.span() as span:
            logits = model.predict_video(batch)
    return {"frames": frames, "expressions": len(batch.expressions), "seconds": span.seconds,
            "frames_per_s": frames / span.seconds, "peak_gib": (uncounted(meter, model) + span.peak) / GIB,
            "output_shape": list(logits.shape), "inference": dict(cfg.inference)}


def fsdp1_section(preset: str, layers: int | None, steps: int, device: Any) -> dict[str, Any]:
    """``trainer=fsdp1`` through Lightning on this one GPU: s/step and peak memory per step (a callback measures)."""
    import lightning as L
    import torch
    from torch.utils.data import DataLoader

    from glus_lightning.strategies import build_strategy

    extra = ["trainer=fsdp1", "trainer.devices=1", f"trainer.max_steps={steps}", "trainer.accumulate_grad_batches=1"]
    model, cfg, ov, build_s = build(preset, layers, "bf16", torch.device("cpu"), extra)  # FSDP moves and wraps it
    try:
        from glus_lightning.precision import check_run_config

        check_run_config(cfg)
    except ImportError:
        pass
    d = cfg.data
    batch = rehearsal.synthetic_batch(d.batch_size, d.num_context, d.num_query, d.max_expressions, cfg.segmenter.image_size, (720, 1280))

    class StepMeter(L.Callback):
        def __init__(self) -> None:
            self.steps: list[dict[str, float]] = []

        def on_train_batch_start(self, *args: Any) -> None:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.t0 = time.perf_counter()

        def on_train_batch_end(self, *args: Any) -> None:
            torch.cuda.synchronize()
            self.steps.append({"s": time.perf_counter() - self.t0, "peak_gib": torch.cuda.max_memory_allocated() / GIB})

    meter = StepMeter()
    t = cfg.trainer
    with tempfile.TemporaryDirectory() as root:
        trainer = L.Trainer(accelerator="gpu", devices=1, strategy=build_strategy(t), precision=t.precision, max_steps=steps,
                            accumulate_grad_batches=1, gradient_clip_val=t.gradient_clip_val, limit_val_batches=0,
                            num_sanity_val_steps=0, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                            enable_model_summary=False, callbacks=[meter], default_root_dir=root)
        trainer.fit(model, train_dataloaders=DataLoader([batch] * steps, batch_size=None, collate_fn=lambda b: b))
    timed = [s["s"] for s in meter.steps[1:]] or [s["s"] for s in meter.steps]
    return {"overrides": ov, "build_s": build_s, "steps": meter.steps, "s_per_step_median": statistics.median(timed),
            "peak_gib": max(s["peak_gib"] for s in meter.steps), "note": "first step excluded from the median (FSDP warm-up)"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="llava_7b", choices=sorted(rehearsal.PRESETS))
    parser.add_argument("--out", type=Path, default=Path("runs/gpu_acceptance.json"))
    parser.add_argument("--smoke", action="store_true", help="CPU, --layers 1, 1 step, 4 frames, no warm-up; FSDP1 skipped")
    parser.add_argument("--layers", type=int, help="cut the LM and vision tower to this many layers (default: full depth)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps before the timed ones")
    parser.add_argument("--frames", type=int, default=64)
    parser.add_argument("--fsdp-steps", type=int, default=5)
    parser.add_argument("--budget-s", type=float, default=450, help="skip the sections that would start after this")
    parser.add_argument("--sections", nargs="+", default=["bf16", "inference", "qlora", "fsdp1"],
                        choices=["bf16", "inference", "qlora", "fsdp1"])
    args = parser.parse_args()
    import torch

    if args.smoke:
        args.layers, args.steps, args.warmup, args.frames, args.fsdp_steps = args.layers or 1, 1, 0, 4, 1
    device = torch.device("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
    extra = ["segmenter.size=tiny", "segmenter.image_size=256"] if args.smoke else []
    t0 = time.perf_counter()
    result: dict[str, Any] = {"command": " ".join(["python", "experiments/benchmarks/gpu_acceptance.py", *sys.argv[1:]]),
                              "smoke": args.smoke, "smoke_overrides": extra, "backbone": args.backbone, "layers": args.layers or "full",
                              "environment": environment(device), "memory_counter": (
                                  "torch.cuda.max_memory_allocated, reset per phase" if device.type == "cuda" else
                                  "CPU: tensor bytes made in the phase (tensor_memory.LiveTensorBytes), weights and optimiser state "
                                  "made before it not included"), "sections": {}, "skipped": {}, "failed": {}}

    def save() -> None:
        result["elapsed_s"] = time.perf_counter() - t0
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1, default=str))

    def due(name: str) -> bool:
        if name not in args.sections:
            return False
        if time.perf_counter() - t0 > args.budget_s:
            result["skipped"][name] = f"time budget of {args.budget_s:.0f} s spent before it started"
            return False
        return True

    def attempt(name: str, section: Any) -> Any:
        """One section; its error is recorded and the others still run (one device lease rarely allows a rerun)."""
        try:
            return section()
        except Exception as error:  # noqa: BLE001 - recorded with its traceback, then the next section
            result["failed"][name] = "".join(traceback.format_exception(error))[-4000:]
            print(f"[acceptance] {name} failed: {error!r}", file=sys.stderr, flush=True)
            return None
        finally:
            save()

    trained = None
    if due("bf16") or "inference" in args.sections:
        trained = attempt("train_bf16_mixed", lambda: train_section(args.backbone, args.layers, "bf16", args.steps,
                                                                     args.warmup, device, extra))
        if trained is not None:
            result["sections"]["train_bf16_mixed"] = trained[0]
    if due("inference") and trained is not None:
        out = attempt("inference", lambda: inference_section(trained[1], trained[2], args.frames, not args.smoke, device))
        if out is not None:
            result["sections"]["inference"] = out
    trained = None
    free(device)
    if due("qlora"):
        out = attempt("train_qlora", lambda: train_section(args.backbone, args.layers, "qlora", args.steps, args.warmup,
                                                           device, extra))
        if out is not None:
            result["sections"]["train_qlora"] = out[0]
    free(device)
    if "fsdp1" in args.sections:
        if device.type != "cuda":
            result["skipped"]["fsdp1"] = ("trainer=fsdp1 (Lightning FSDPStrategy) needs CUDA (Lightning refuses FSDP1 on the "
                                          "CPU): not run in smoke mode")
        elif due("fsdp1"):
            out = attempt("fsdp1", lambda: fsdp1_section(args.backbone, args.layers, args.fsdp_steps, device))
            if out is not None:
                result["sections"]["fsdp1"] = out
    save()
    summary = {name: {k: v for k, v in s.items() if k in ("s_per_step_median", "peak_gib", "frames_per_s", "weights_gib")}
               for name, s in result["sections"].items()}
    print(json.dumps({"sections": summary, "skipped": result["skipped"], "failed": list(result["failed"]), "elapsed_s": result["elapsed_s"]}, indent=1))


if __name__ == "__main__":
    main()
