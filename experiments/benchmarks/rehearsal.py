"""Full-width rehearsal of GLUS-S: the real model widths with random weights, the depth cut to fit a small machine.

Why: whether a 7B GLUS-S training step fits a 24 GB card, and what fills it, can be answered before any GPU or
weights are at hand. The model is built from configs alone (``experiment=glus_s``, ``backbone.path=null``: random
init at the real widths and vocabularies of LLaMA-2-7B / Qwen2.5-7B, CLIP ViT-L/14 / the Qwen2.5-VL ViT /
InternViT-300M, and SAM2 Hiera-L at 1024 px, ``segmenter.checkpoint=null``), with the language model and the vision
tower cut to ``--layers`` blocks (SAM2 is whole). Each (mode, depth) runs in its own process: one training step
of the recipe's shapes (2 videos x (4 context + 4 query) frames x 3 expressions, 720p targets, bf16 autocast as
Lightning's bf16-mixed, gradients and AdamW moments already allocated as in the middle of the recipe's gradient
accumulation) and one 16-frame validation video, each component timed and measured.

Extrapolation to the full depth: weights, gradients and Adam moments are tensor bytes, counted per part and scaled
exactly (decoder layers by depth, vision blocks by depth, embeddings and LM head by vocabulary); activation peaks
(memory above the static state during each phase) are fitted linearly between the two depths (and two
vocabularies when the real one does not fit here, ``--vocab V1 V2``). Component times are extrapolated the same
way (LM by LM depth, vision tower by vision depth); CPU times only rank the components, they are not GPU times.

Memory is tensor memory, as a GPU's allocator counts it: on CUDA ``torch.cuda.max_memory_allocated`` (reset per
span), on the CPU the bytes of live tensor storages, tracked op by op (``glus_lightning.tensor_memory.LiveTensorBytes``; the process's RSS is
too coarse: glibc keeps freed memory and caches come and go).

    python experiments/benchmarks/rehearsal.py --backbone llava_7b                          # depths 1, 2; bf16 + QLoRA
    python experiments/benchmarks/rehearsal.py --backbone qwen2_5_vl_7b --vocab 32000 64000 # vocabulary fitted too
    python experiments/benchmarks/rehearsal.py --backbone qwen2_5_vl_7b --variant lean      # with the memory switches

``--variant lean`` adds ``VARIANTS["lean"]`` (only [SEG]'s embedding / LM-head rows train, memories detached as in
the reference); its extrapolation takes slopes from its own runs where there are, else from the reference variant's
(the switches change fixed costs, not per-layer or per-row ones). ``--one ...`` measures one run, ``--runs FILES``
reports from saved runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

GIB, MIB = 2**30, 2**20
OTHER = "other (glue, [SEG] MLP)"
LM, LM_HEAD, VISION = "LM (embeddings + decoder)", "LM head + CE", "vision tower + projector"
SAM_ENC, MEM_ATT, MEM_ENC, DECODER, LOSSES, METRIC = (
    "SAM2 image encoder", "memory attention", "memory encoder", "mask decoder", "losses (720p)", "J&F metric (720p)")
COMPONENTS = (VISION, LM, LM_HEAD, SAM_ENC, MEM_ATT, DECODER, MEM_ENC, LOSSES, METRIC, OTHER)


@dataclass(frozen=True)
class Preset:
    """The real (full-depth) widths of a backbone preset, in the layout of its family's ``tiny_model``."""

    text: dict[str, Any]
    vision: dict[str, Any]
    vocab: int
    vision_depth_key: str = "num_hidden_layers"

    @property
    def lm_depth(self) -> int:
        return self.text["num_hidden_layers"]

    @property
    def vision_depth(self) -> int:
        return self.vision[self.vision_depth_key]


QWEN25_7B = {"hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28, "num_attention_heads": 28,
             "num_key_value_heads": 4, "rms_norm_eps": 1e-6}
PRESETS = {
    # LISA-7B-v1: LLaMA-2-7B (vicuna) + CLIP ViT-L/14 at 224 px (LISA reads layer -2)
    "llava_7b": Preset(
        text={"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32,
              "num_key_value_heads": 32, "rms_norm_eps": 1e-5},
        vision={"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16,
                "patch_size": 14, "projection_dim": 768},
        vocab=32000,
    ),
    # Qwen2.5-VL-7B-Instruct (config.json): ViT 32 blocks x 1280, windows of 112 px, full attention in 4 blocks
    "qwen2_5_vl_7b": Preset(
        text=QWEN25_7B,
        vision={"depth": 32, "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16, "patch_size": 14,
                "window_size": 112, "fullatt_block_indexes": [7, 15, 23, 31]},
        vocab=152064,
        vision_depth_key="depth",
    ),
    # InternVL3-8B-hf: Qwen2.5-7B + InternViT-300M-448px (qkv bias, no qk-norm), pixel shuffle 0.5 -> 256 tokens
    "internvl3_8b": Preset(
        text=QWEN25_7B,
        vision={"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16,
                "patch_size": 14, "attention_bias": True},
        vocab=151674,
    ),
}
# --variant: the recipe as configured, or with the switches that cut training memory (docs/scaling.md)
VARIANTS = {
    "reference": [],
    "lean": ["backbone.train_token_rows=added", "segmenter.memory.backprop=none"],
}
TOKENIZER_VOCAB = 1024  # the built-in BPE learns ~620 tokens from its corpus: the embeddings are resized to the real vocab
EXPRESSIONS = ("the big red circle moving left", "the red circle that turns around", "the small blue square at the top")


# ----------------------------------------------------------------------------------------------- building
def overrides(preset: str, layers: int | None, mode: str, *, variant: str = "reference", videos: int = 2, context: int = 4,
              query: int = 4, expressions: int = 3) -> list[str]:
    """Config overrides of GLUS-S with ``preset`` at its real widths, random init, cut to ``layers`` (None: full depth)."""
    p = PRESETS[preset]
    text, vision = dict(p.text), dict(p.vision)
    if layers is not None:
        text["num_hidden_layers"] = layers
        vision[p.vision_depth_key] = layers
        if "fullatt_block_indexes" in vision:  # keep one full-attention block (the real tower has one in 8)
            vision["fullatt_block_indexes"] = [layers - 1]
    tiny = {"vocab_size": TOKENIZER_VOCAB, "text_config": text, "vision_config": vision}
    out = [
        "experiment=glus_s", f"backbone={preset}", "segmenter=sam2_large", "segmenter.checkpoint=null",
        "backbone.path=null", f"backbone.tiny={json.dumps(tiny)}", f"data.batch_size={videos}",
        f"data.num_context={context}", f"data.num_query={query}", f"data.max_expressions={expressions}",
    ]
    if mode == "qlora":
        out.append("backbone.quantization.load_in_4bit=true")
    return out + VARIANTS[variant]


def use_vocabulary(family: str, vocab: int, init_device: str = "cpu") -> None:
    """Make the family's random-init model carry a ``vocab``-row embedding and LM head (the built-in tokenizer is small).

    The tiny checkpoint is built on ``init_device`` (a GPU builds a 7B model in seconds, the CPU in minutes) and saved
    in float32 on the CPU (loading it in bf16 then copies every tensor: no weights stay mapped from the file) or bf16
    on a GPU (half the bytes to write).
    """
    import torch

    from glus_lightning.backbones import BACKBONES

    cls = BACKBONES[family]
    build = getattr(cls.tiny_model, "__rehearsal_original__", cls.tiny_model.__func__)

    def tiny_model(klass, tokenizer, tiny, image_size):
        with torch.device(init_device):
            model = build(klass, tokenizer, tiny, image_size)
            model.resize_token_embeddings(max(vocab, len(tokenizer) + 1), mean_resizing=False)  # +1: [SEG] comes later
        return model.to(torch.bfloat16) if init_device != "cpu" else model

    method = classmethod(tiny_model)
    tiny_model.__rehearsal_original__ = build
    cls.tiny_model = method


def build_module(cfg: Any, device: Any) -> Any:
    """``GLUSModule(cfg)`` on ``device`` (4-bit weights are loaded straight onto it), with a refined frame scorer."""
    import inspect

    from glus_lightning.module import GLUSModule

    kwargs = {"load_device": device} if "load_device" in inspect.signature(GLUSModule.__init__).parameters else {}
    model = GLUSModule(cfg, **kwargs).to(device)
    model.frame_scorer.refined.fill_(True)  # glus_s validates with keyframes: a fitted scorer's path (random weights)
    return model


def synthetic_batch(videos: int, context: int, query: int, expressions: int, size: int, target_hw: tuple[int, int],
                    seed: int = 0) -> Any:
    """A RefVOSBatch of random frames with box targets at ``target_hw`` (720p): the shapes the data pipeline yields."""
    import torch

    from datamodules.batch import RefVOSBatch

    gen = torch.Generator().manual_seed(seed)
    e = videos * expressions
    height, width = target_hw

    def boxes() -> Any:
        m = torch.zeros(query, height, width, dtype=torch.uint8)
        for t in range(query):
            y, x = int(torch.randint(0, height // 2, (), generator=gen)), int(torch.randint(0, width // 2, (), generator=gen))
            m[t, y : y + height // 3, x : x + width // 4] = 1
        return m

    masks = [boxes() for _ in range(e)]
    names = {f.name for f in dataclasses.fields(RefVOSBatch)}
    if "targets" in names:
        from datamodules.targets import DenseTargets

        target = {"targets": DenseTargets(masks)}
    else:
        target = {"masks": masks}
    objects = [(1,), (1,), (2,)]  # two expressions of one object (the contrastive positive), one of another
    return RefVOSBatch(
        frames=torch.randint(0, 256, (videos, context + query, 3, size, size), dtype=torch.uint8, generator=gen),
        num_context=context,
        frame_indices=torch.arange(context + query).repeat(videos, 1),
        expressions=[EXPRESSIONS[i % len(EXPRESSIONS)] for i in range(e)],
        expression_ids=[str(i) for i in range(e)],
        expression_video=torch.arange(videos).repeat_interleave(expressions),
        expression_objects=[objects[i % len(objects)] for i in range(e)],
        video_ids=[f"video{b}" for b in range(videos)],
        datasets=["rehearsal"] * videos,
        video_objects=[(1, 2)] * videos,
        frame_names=[[f"{t:05d}" for t in range(query)] for _ in range(videos)],
        **target,
    )


# ------------------------------------------------------------------------------------------------ memory
def _fp32_kernel_ops() -> set[Any]:
    import torch

    aten = torch.ops.aten
    names = ("mm", "addmm", "bmm", "baddbmm", "convolution", "convolution_backward",
             "_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention_for_cpu_backward")
    return {getattr(aten, n) for n in names if hasattr(aten, n)}


@functools.cache
def _fp32_ops() -> frozenset[Any]:
    return frozenset(_fp32_kernel_ops())


def fp32_kernels(func: Any, args: tuple, kwargs: dict) -> Any:
    """The kernel ``LiveTensorBytes`` runs each op with: matmuls, convolutions and attention through
    ``bf16_through_fp32_kernel`` (same outputs' dtypes, ~100x faster here), everything else as it is."""
    if func.overloadpacket in _fp32_ops():
        return bf16_through_fp32_kernel(func, args, kwargs)
    return func(*args, **kwargs)


def bf16_through_fp32_kernel(func: Any, args: tuple, kwargs: dict) -> Any:
    """``func`` on bf16 tensors computed by its fp32 kernel, each output rounded to the dtype the bf16 kernel returns.

    Why: this CPU has no bf16 GEMM (measured: 0.6 GFLOP/s in bf16 against 54 in fp32), so a 1024-px SAM2-L step in
    bf16 takes hours. The outputs keep the bf16 op's dtypes and shapes (read from the op's meta kernel), so every
    tensor the rest of the step sees, and the memory counted, is what the bf16 op makes; the fp32 copies live only
    inside this call (the scratch a GPU kernel's workspace would be). Times are fp32 CPU times.
    """
    import torch
    from torch.utils._pytree import tree_flatten, tree_unflatten

    flat, spec = tree_flatten((args, kwargs))
    if not any(isinstance(t, torch.Tensor) and t.dtype == torch.bfloat16 for t in flat):
        return func(*args, **kwargs)
    try:
        meta_args, meta_kwargs = tree_unflatten([t.to("meta") if isinstance(t, torch.Tensor) else t for t in flat], spec)
        expected, _ = tree_flatten(func(*meta_args, **meta_kwargs))
    except (NotImplementedError, RuntimeError):  # no meta kernel: run it in bf16
        return func(*args, **kwargs)
    up_args, up_kwargs = tree_unflatten(
        [t.float() if isinstance(t, torch.Tensor) and t.dtype == torch.bfloat16 else t for t in flat], spec)
    out, out_spec = tree_flatten(func(*up_args, **up_kwargs))
    cast = [o.to(e.dtype) if isinstance(o, torch.Tensor) and isinstance(e, torch.Tensor) else o for o, e in zip(out, expected, strict=True)]
    return tree_unflatten(cast, out_spec)


@dataclass
class Span:
    t0: float
    start: int  # bytes in use when it began
    peak: int  # highest bytes in use while it was open
    seconds: float = 0.0
    end: int = 0

    @property
    def rise(self) -> int:
        return self.peak - self.start

    @property
    def kept(self) -> int:
        return self.end - self.start


class Meter:
    """Time and tensor memory of nested spans: ``torch.cuda`` allocator stats on a GPU, ``LiveTensorBytes`` on the CPU.

    One high-water mark serves every open span: it is folded into all of them and reset when a span begins
    (``torch.cuda.reset_peak_memory_stats`` on a GPU). CPU memory is counted only inside ``with meter.tracking():``.
    """

    def __init__(self, device: Any) -> None:
        import torch

        self.torch = torch
        self.cuda = device.type == "cuda"
        self.open: list[Span] = []
        from glus_lightning.tensor_memory import LiveTensorBytes

        self.cpu = None if self.cuda else LiveTensorBytes(fp32_kernels)

    @contextmanager
    def tracking(self) -> Iterator[None]:
        if self.cpu is None:
            yield
        else:
            with self.cpu.mode:
                yield

    def now(self) -> float:
        if self.cuda:
            self.torch.cuda.synchronize()
        return time.perf_counter()

    def current(self) -> int:
        return self.torch.cuda.memory_allocated() if self.cuda else self.cpu.live

    def _high_water(self) -> int:
        return self.torch.cuda.max_memory_allocated() if self.cuda else self.cpu.peak

    def _reset(self) -> None:
        if self.cuda:
            self.torch.cuda.reset_peak_memory_stats()
        else:
            self.cpu.peak = self.cpu.live

    def _fold(self) -> None:
        peak = self._high_water()
        for span in self.open:
            span.peak = max(span.peak, peak)

    def begin(self) -> Span:
        t0 = self.now()
        self._fold()
        self._reset()
        current = self.current()
        span = Span(t0, current, current)
        self.open.append(span)
        return span

    def end(self, span: Span) -> Span:
        t1 = self.now()
        self._fold()
        self.open.remove(span)
        span.seconds, span.end = t1 - span.t0, self.current()
        return span

    @contextmanager
    def span(self) -> Iterator[Span]:
        s = self.begin()
        try:
            yield s
        finally:
            self.end(s)


def process_peak_rss() -> int:
    """The process's peak resident set (bytes): what the CPU run needed in all, weights and Python included."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@dataclass
class Stat:
    calls: int = 0
    seconds: float = 0.0  # forward (or evaluation) time
    backward: float = 0.0
    kept: int = 0  # memory still held after the calls (saved activations + outputs), summed
    rise: int = 0  # largest rise above the memory at a call's start


@dataclass
class Recorder:
    """Times and measures the calls it wraps, per component, and times the backward pass per component.

    While the graph is recorded, every autograd node is owned by the component that created it: at a call's start
    the nodes reachable from its inputs go to the enclosing component (or ``OTHER``), at its end the still unowned
    nodes reachable from its outputs are its own. During backward each node's execution is charged to its owner
    (gradient-checkpoint recomputation runs inside the node that needs it, so it is charged to that component).
    """

    meter: Meter
    stats: dict[str, Stat] = field(default_factory=lambda: defaultdict(Stat))
    owner: dict[Any, str] = field(default_factory=dict)
    active: list[str] = field(default_factory=list)

    def wrap(self, obj: Any, attr: str, name: str) -> None:
        fn = getattr(obj, attr)

        @functools.wraps(fn)
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            if name in self.active:  # e.g. Qwen's merger inside its vision tower
                return fn(*args, **kwargs)
            graph = self.meter.torch.is_grad_enabled()
            if graph:
                self._claim(_tensors((args, kwargs)), self.active[-1] if self.active else OTHER)
            self.active.append(name)
            span = self.meter.begin()
            try:
                out = fn(*args, **kwargs)
            finally:
                self.meter.end(span)
                self.active.pop()
            if graph:
                self._claim(_tensors(out), name)
            stat = self.stats[name]
            stat.calls, stat.seconds, stat.kept = stat.calls + 1, stat.seconds + span.seconds, stat.kept + span.kept
            stat.rise = max(stat.rise, span.rise)
            return out

        setattr(obj, attr, wrapped)

    def _claim(self, tensors: Iterator[Any], name: str) -> None:
        stack = [t.grad_fn for t in tensors if t.grad_fn is not None]
        while stack:
            node = stack.pop()
            if node in self.owner:
                continue
            self.owner[node] = name
            stack.extend(n for n, _ in node.next_functions if n is not None)

    def backward(self, loss: Any) -> None:
        self._claim(iter([loss]), OTHER)
        last = [0.0]

        def charge(name: str) -> Any:
            def hook(grad_inputs: Any, grad_outputs: Any) -> None:
                now = self.meter.now()
                self.stats[name].backward += now - last[0]
                last[0] = now

            return hook

        handles = []
        for node, name in self.owner.items():
            try:
                handles.append(node.register_hook(charge(name)))
            except (RuntimeError, TypeError):  # nodes that take no hooks: their time goes to the next one
                pass
        last[0] = self.meter.now()
        loss.backward()
        for h in handles:
            h.remove()
        self.owner.clear()

    def table(self) -> dict[str, dict[str, float]]:
        return {k: dataclasses.asdict(v) for k, v in self.stats.items()}

    def reset(self) -> None:
        self.stats = defaultdict(Stat)


def _tensors(obj: Any, depth: int = 0) -> Iterator[Any]:
    import torch

    if isinstance(obj, torch.Tensor):
        yield obj
    elif depth > 5:
        return
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v, depth + 1)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v, depth + 1)
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        for f in dataclasses.fields(obj):
            yield from _tensors(getattr(obj, f.name), depth + 1)
    elif hasattr(obj, "output_dict"):  # the segmenter's MemoryBank
        yield from _tensors(obj.output_dict, depth + 1)


def instrument(model: Any, recorder: Recorder) -> None:
    """Wrap the calls that make up each component (the same calls on every family and in training and validation)."""
    import glus_lightning.losses as loss_code

    backbone = model.backbone
    hf = backbone.hf_model
    recorder.wrap(hf.get_submodule(backbone.vision_module), "forward", VISION)
    recorder.wrap(hf.get_submodule(backbone.projector_module), "forward", VISION)
    recorder.wrap(hf.get_input_embeddings(), "forward", LM)
    recorder.wrap(hf.get_submodule(backbone.language_model_module), "forward", LM)
    recorder.wrap(backbone, "_lm_loss", LM_HEAD)
    seg = model.segmenter
    recorder.wrap(seg, "encode_frames", SAM_ENC)
    recorder.wrap(seg, "_condition", MEM_ATT)
    recorder.wrap(seg.sam, "_encode_new_memory", MEM_ENC)
    recorder.wrap(seg, "_decode", DECODER)
    for name in ("mask_losses", "presence_loss", "iou_prediction_loss"):
        recorder.wrap(loss_code, name, LOSSES)
    if model.contrastive is not None:
        recorder.wrap(model.contrastive, "forward", LOSSES)
    recorder.wrap(model.val_metric, "update", METRIC)


# ------------------------------------------------------------------------------------------------- parts
PARTS = ("LM decoder layers", "embeddings + LM head", "vision blocks", "vision rest + projector", SAM_ENC,
         "SAM2 memory attention/encoder", "SAM2 mask decoder", "other")


def _blocks(module: Any, count: int) -> Any:
    """The ModuleList of ``count`` blocks holding the most parameters under ``module`` (a tower's layers)."""
    import torch

    lists = [m for m in module.modules() if isinstance(m, torch.nn.ModuleList) and len(m) == count]
    return max(lists, key=lambda m: sum(p.numel() for p in m.parameters()))


def part_modules(model: Any, layers: int) -> list[tuple[str, Any]]:
    b, sam = model.backbone, model.segmenter.sam
    hf = b.hf_model
    lm = hf.get_submodule(b.language_model_module)
    vision = hf.get_submodule(b.vision_module)
    return [
        ("LM decoder layers", lm.layers),
        ("embeddings + LM head", [hf.get_input_embeddings(), hf.get_output_embeddings()]),
        ("vision blocks", _blocks(vision, layers)),
        ("vision rest + projector", [hf.get_submodule(b.projector_module), vision]),
        (SAM_ENC, sam.image_encoder),
        ("SAM2 mask decoder", [sam.sam_mask_decoder, sam.sam_prompt_encoder]),
        ("SAM2 memory attention/encoder", sam),  # what of SAM2 is left: memory modules, memory embeddings, pointers
        ("other", model),
    ]


def tensor_bytes(t: Any) -> int:
    """Bytes a tensor holds, with bitsandbytes' 4-bit quantisation state (absmax, nested absmax, code)."""
    n = t.numel() * t.element_size()
    state = getattr(t, "quant_state", None)
    seen: set[int] = set()  # by identity: QuantState.__eq__ compares tensors
    while state is not None and id(state) not in seen:
        seen.add(id(state))
        for name in ("absmax", "code", "offset"):
            v = getattr(state, name, None)
            if hasattr(v, "element_size"):
                n += v.numel() * v.element_size()
        state = getattr(state, "state2", None)
    return n


def part_bytes(model: Any, layers: int, optimizer: Any) -> dict[str, dict[str, Any]]:
    """Per part: weight bytes by dtype (parameters and buffers), gradient bytes, AdamW state bytes, trainable count."""
    owner: dict[int, str] = {}
    for name, modules in part_modules(model, layers):
        for m in modules if isinstance(modules, list) else [modules]:
            for t in [*m.parameters(), *m.buffers()]:
                owner.setdefault(id(t), name)
    out = {name: {"weights": defaultdict(int), "grads": 0, "adam": 0, "trainable": 0} for name in PARTS}
    seen: set[int] = set()
    for t in [*model.parameters(), *model.buffers()]:
        if id(t) in seen:
            continue
        seen.add(id(t))
        row = out[owner[id(t)]]
        dtype = "nf4" if getattr(t, "quant_state", None) is not None else str(t.dtype).replace("torch.", "")
        row["weights"][dtype] += tensor_bytes(t)
        if getattr(t, "requires_grad", False):
            row["trainable"] += t.numel()
            if t.grad is not None:
                row["grads"] += tensor_bytes(t.grad)
            for v in optimizer.state.get(t, {}).values():
                if hasattr(v, "numel") and v.dim() > 0:
                    row["adam"] += tensor_bytes(v)
    for row in out.values():
        row["weights"] = dict(row["weights"])
    return out


# ---------------------------------------------------------------------------------------------- one run
def make_optimizer(model: Any, cfg: Any, mid_accumulation: bool = True) -> Any:
    """AdamW over the trainable parameters as ``GLUSModule.configure_optimizers`` groups them.

    ``foreach=True`` as AdamW picks by default on CUDA (its update makes one temporary as large as the parameters),
    so the CPU sees the same memory. ``mid_accumulation``: gradient buffers and moments exist before the first
    measured step, as in the middle of the recipe's gradient accumulation (a zero-gradient step allocates the
    moments and leaves the weights unchanged).
    """
    import torch

    seg_ids = {id(p) for p in model.segmenter.parameters() if p.requires_grad}
    trainable = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in trainable if id(p) not in seg_ids]}, {"params": [p for p in trainable if id(p) in seg_ids]}]
    o = cfg.optim
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=o.lr, betas=tuple(o.betas),
                                  weight_decay=o.weight_decay, foreach=True)
    if mid_accumulation:
        for p in trainable:
            p.grad = torch.zeros_like(p)
        optimizer.step()
    return optimizer


def train_step(model: Any, batch: Any, optimizer: Any, meter: Meter, recorder: Recorder | None = None) -> dict[str, Any]:
    """One bf16-mixed training step (autocast forward as Lightning's bf16-mixed, backward, AdamW step), per phase:
    seconds and ``act``, the peak memory above ``start``, what was in use when the step began."""
    import torch

    static = meter.current()
    with meter.span() as fwd, torch.autocast(batch.frames.device.type, dtype=torch.bfloat16):
        loss = model.training_step(batch, 0)
    with meter.span() as bwd:
        if recorder is None:
            loss.backward()
        else:
            recorder.backward(loss)
    value = float(loss.detach())
    del loss
    with meter.span() as opt:
        optimizer.step()
    phases = {name: {"s": span.seconds, "act": span.peak - static} for name, span in
              (("forward", fwd), ("backward", bwd), ("optimizer", opt))}
    return {"loss": value, "phases": phases, "seconds": fwd.seconds + bwd.seconds + opt.seconds, "start": static}


def validate_video(model: Any, batch: Any, meter: Meter) -> dict[str, Any]:
    """``validation_step`` on one video (bf16 autocast, no gradients): seconds and the peak above its start."""
    import torch

    model.eval()
    with meter.span() as val, torch.no_grad(), torch.autocast(batch.frames.device.type, dtype=torch.bfloat16):
        model.validation_step(batch, 0)
    return {"s": val.seconds, "act": val.peak - val.start}


def measure(preset: str, mode: str, layers: int, vocab: int, device_name: str, val_frames: int,
            qlora_step: bool = False, variant: str = "reference") -> dict[str, Any]:
    """One training step (and one validation video when ``val_frames``) at ``layers`` blocks and ``vocab`` rows.

    QLoRA on the CPU without ``qlora_step``: the model is built and its tensors counted, no step is run
    (bitsandbytes' CPU 4-bit path took 470 s for one step of one layer here); its activations are the bf16 runs'
    (the same shapes: the 4-bit weights are dequantised to bf16 one at a time), see ``extrapolate``.
    """
    import torch

    from glus_lightning.config import compose

    device = torch.device(device_name)
    meter = Meter(device)
    ov = overrides(preset, layers, mode, variant=variant)
    cfg = compose(ov)
    use_vocabulary(cfg.backbone.family, vocab, init_device=device_name)
    torch.manual_seed(0)
    t = time.perf_counter()
    model = build_module(cfg, device)
    build_s = time.perf_counter() - t
    if device.type == "cuda":
        torch.cuda.empty_cache()
    d = cfg.data
    batch = synthetic_batch(d.batch_size, d.num_context, d.num_query, d.max_expressions, cfg.segmenter.image_size, (720, 1280)).to(device)
    tokens = model.backbone.build_inputs(batch.expressions[:1], d.num_context, d.num_query, ce_only_seg=True).input_ids.shape[1]
    optimizer = make_optimizer(model, cfg)
    result = {
        "preset": preset, "mode": mode, "variant": variant, "layers": layers, "vocab": model.backbone.hf_model.get_input_embeddings().num_embeddings,
        "device": device_name, "overrides": ov, "build_s": build_s, "tokens_per_conversation": tokens, "loss": None,
        "parts": part_bytes(model, layers, optimizer), "train": None, "val": None, "val_frames": val_frames,
    }
    if mode == "qlora" and device.type == "cpu" and not qlora_step:  # weights only
        result.update(val_frames=0, process_peak_rss=process_peak_rss())
        return result
    recorder = Recorder(meter)
    instrument(model, recorder)
    model.train()
    with meter.tracking():
        step = train_step(model, batch, optimizer, meter, recorder)
    result.update(loss=step["loss"], train={"components": recorder.table(), "phases": step["phases"]},
                  parts=part_bytes(model, layers, optimizer))
    if val_frames:
        optimizer.zero_grad(set_to_none=True)  # as Lightning after the step: validation runs without gradients
        del batch
        val_batch = synthetic_batch(1, d.num_context, val_frames, d.max_expressions, cfg.segmenter.image_size, (720, 1280), seed=1)
        recorder.reset()
        with meter.tracking():
            phase = validate_video(model, val_batch.to(device), meter)
        result["val"] = {"components": recorder.table(), "phases": {"validation": phase}}
    result["process_peak_rss"] = process_peak_rss() if device.type == "cpu" else torch.cuda.max_memory_reserved()
    return result


# ----------------------------------------------------------------------------------------- extrapolation
def static_bytes(run: dict[str, Any], preset: Preset, vocab: int) -> dict[str, dict[str, Any]]:
    """Per part weights / gradients / Adam bytes of ``run``, scaled exactly to the full depth and ``vocab`` rows
    (every decoder layer, every vision block and every vocabulary row holds the same tensors)."""
    k = run["layers"]
    scale = {"LM decoder layers": preset.lm_depth / k, "vision blocks": preset.vision_depth / k,
             "embeddings + LM head": vocab / run["vocab"]}
    out = {}
    for name, row in run["parts"].items():
        f = scale.get(name, 1.0)
        out[name] = {"weights": f * sum(row["weights"].values()), "grads": f * row["grads"], "adam": f * row["adam"],
                     "dtypes": sorted(row["weights"])}
    return out


@dataclass
class Fit:
    """``value = base + (depth - k1) * per_layer + (vocab - v1) * per_row`` for one measured quantity."""

    base: dict[str, Any]  # the run at (k1, v1) of the mode itself
    depth_pair: tuple[dict[str, Any], dict[str, Any]] | None  # two runs at v1 that differ in depth (any mode)
    vocab_pair: tuple[dict[str, Any], dict[str, Any]] | None  # two runs at k1 that differ in vocab (any mode)

    def __call__(self, get: Any, depth: int, vocab: int) -> float:
        value = get(self.base)
        if self.depth_pair:
            a, b = self.depth_pair
            value += (depth - self.base["layers"]) * (get(b) - get(a)) / (b["layers"] - a["layers"])
        if self.vocab_pair:
            a, b = self.vocab_pair
            value += (vocab - self.base["vocab"]) * (get(b) - get(a)) / (b["vocab"] - a["vocab"])
        return max(0.0, value)

    def describe(self) -> str:
        name = lambda r: f"{r['mode']} K={r['layers']} V={r['vocab']}"
        out = [f"base {name(self.base)}"]
        if self.depth_pair:
            out.append(f"per layer from {name(self.depth_pair[0])} -> {name(self.depth_pair[1])}")
        if self.vocab_pair:
            out.append(f"per vocab row from {name(self.vocab_pair[0])} -> {name(self.vocab_pair[1])}")
        return "; ".join(out)


def variant_of(run: dict[str, Any]) -> str:
    return run.get("variant", "reference")


def make_fit(base: dict[str, Any], pool: list[dict[str, Any]], need: str) -> Fit:
    """Slopes from runs of ``base``'s own mode when there are, else from the other runs (the bf16 ones); runs of
    ``base``'s variant first, else the reference variant's (a switch that does not change per-layer costs)."""
    has = lambda r: r[need] is not None
    pool = sorted(pool, key=lambda r: variant_of(r) != variant_of(base))
    own = [r for r in pool if r["mode"] == base["mode"] and has(r)]
    rest = [r for r in pool if r["mode"] != base["mode"] and has(r)]

    def pair(key: str, same: str) -> tuple[dict[str, Any], dict[str, Any]] | None:
        for runs in (own, rest):
            cands = [r for r in runs if r[same] == base[same]]
            for a in cands:
                for b in cands:
                    if a["mode"] == b["mode"] and variant_of(a) == variant_of(b) and a[key] < b[key]:
                        return a, b
        return None

    return Fit(base, pair("layers", "vocab"), pair("vocab", "layers"))


def extrapolate(mode: str, runs: list[dict[str, Any]], preset: Preset, variant: str = "reference") -> dict[str, Any]:
    """Full-depth, real-vocabulary memory and component times of ``mode`` (and ``variant``) from all the runs of a preset."""
    mine = sorted((r for r in runs if r["mode"] == mode and variant_of(r) == variant), key=lambda r: (r["vocab"], r["layers"]))
    base = mine[0]
    act_base = base if base["train"] is not None else next(  # a weights-only QLoRA run: the bf16 run's activations
        r for r in sorted(runs, key=lambda r: variant_of(r) != variant)
        if r["train"] is not None and (r["layers"], r["vocab"]) == (base["layers"], base["vocab"]))
    train_fit = make_fit(act_base, runs, "train")
    val_base = next((r for r in mine if r["val"] is not None), None) or next(
        (r for r in sorted(runs, key=lambda r: variant_of(r) != variant) if r["val"] is not None), None)
    val_fit = make_fit(val_base, runs, "val") if val_base else None
    L, V = preset.lm_depth, preset.vocab
    static = static_bytes(base, preset, V)
    w, g, s = (sum(p[k] for p in static.values()) for k in ("weights", "grads", "adam"))
    act = {ph: train_fit(lambda r, ph=ph: r["train"]["phases"][ph]["act"], L, V) for ph in ("forward", "backward", "optimizer")}
    if act_base is not base:  # plus the largest LM weight dequantised to bf16, one at a time in forward and backward
        t = preset.text
        act = {ph: a + (2 * t["hidden_size"] * t["intermediate_size"] if ph != "optimizer" else 0) for ph, a in act.items()}
    act_val = val_fit(lambda r: r["val"]["phases"]["validation"]["act"], L, V) if val_fit else float("nan")
    depths = {LM: L, VISION: preset.vision_depth}

    def components(stage: str, fit_: Fit) -> dict[str, dict[str, float]]:
        out = {}
        for name in COMPONENTS:
            if name not in fit_.base[stage]["components"]:
                continue
            row = {}
            for key in ("seconds", "backward", "kept", "rise"):
                get = lambda r, name=name, key=key: r[stage]["components"].get(name, {}).get(key, 0.0)
                depth = depths.get(name, fit_.base["layers"])
                vocab = V if name in (LM, LM_HEAD) else fit_.base["vocab"]
                row[key] = Fit(fit_.base, fit_.depth_pair if name in depths else None,
                               fit_.vocab_pair if name in (LM, LM_HEAD) else None)(get, depth, vocab)
            out[name] = row
        return out

    return {
        "static": static, "weights": w, "grads": g, "adam": s, "act": act, "act_val": act_val,
        "train_peak": w + g + s + max(act.values()), "val_peak_in_fit": w + s + act_val,
        "components": {"train": components("train", train_fit), "val": components("val", val_fit) if val_fit else {}},
        "train_fit": train_fit.describe(), "val_fit": val_fit.describe() if val_fit else None,
    }


# ----------------------------------------------------------------------------------------------- tables
def _total(run: dict[str, Any], key: str) -> float:
    return sum(sum(p["weights"].values()) if key == "weights" else p[key] for p in run["parts"].values())


def report(preset_name: str, mode: str, runs: list[dict[str, Any]], ext: dict[str, Any], variant: str = "reference") -> str:
    preset = PRESETS[preset_name]
    mine = sorted((r for r in runs if r["mode"] == mode and variant_of(r) == variant), key=lambda r: (r["vocab"], r["layers"]))
    head = [f"K={r['layers']} V={r['vocab']}" for r in mine]
    title = ("QLoRA (NF4)" if mode == "qlora" else "LoRA-bf16") + ("" if variant == "reference" else f", {variant}")
    lines = [(f"\n=== {preset_name} x sam2_large, {title}: measured at {', '.join(head)}; extrapolated to "
             f"{preset.lm_depth} LM / {preset.vision_depth} vision layers, vocabulary {preset.vocab} ==="),
             (f"tokens per conversation (4 context + 4 query frames): {mine[0]['tokens_per_conversation']}; "
             f"training fit: {ext['train_fit']}; validation fit: {ext['val_fit']}")]
    for stage, what in (("train", "training step, 2 videos x 3 expressions"), ("val", f"validation, one {mine[0]['val_frames']}-frame video x 3 expressions")):
        cols = [r for r in mine if r[stage] is not None]
        if not cols or not ext["components"][stage]:
            continue
        width = 29 if stage == "train" else 15
        sub = "fwd s  bwd s  kept MiB rise MiB" if stage == "train" else "     s rise MiB"
        lines.append(f"\n{what}: CPU seconds (rank the components; not GPU time), MiB kept after the calls "
                     "(saved for backward + outputs), MiB peak rise within a call")
        lines.append(f"{'component':27s}" + " | ".join(f"{h:>{width}s}" for h in [*(f"K={r['layers']} V={r['vocab']}" for r in cols), "full (extrap.)"]))
        lines.append(f"{'':27s}" + " | ".join(f"{sub:>{width}s}" for _ in range(len(cols) + 1)))
        for name in COMPONENTS:
            if name not in ext["components"][stage]:
                continue
            cells = []
            for c in [*(r[stage]["components"].get(name, {}) for r in cols), ext["components"][stage][name]]:
                if stage == "train":
                    cells.append(f"{c.get('seconds', 0):5.1f} {c.get('backward', 0):6.1f} {c.get('kept', 0) / MIB:9.0f} {c.get('rise', 0) / MIB:8.0f}")
                else:
                    cells.append(f"{c.get('seconds', 0):6.1f} {c.get('rise', 0) / MIB:8.0f}")
            lines.append(f"{name:27s}" + " | ".join(f"{c:>{width}s}" for c in cells))
        for ph in cols[0][stage]["phases"]:
            lines.append(f"{'phase: ' + ph + ' s':27s}" + " | ".join(f"{r[stage]['phases'][ph]['s']:>{width}.1f}" for r in cols))

    lines.append("\nmemory, GiB: weights / gradients / AdamW moments are tensor bytes (exact, scaled exactly to full size); "
                 "activation peaks are measured above them (tensors only) and fitted")
    lines.append(f"{'':46s}" + "".join(f"{h:>16s}" for h in [*head, "full (extrap.)"]))

    def row(label: str, values: list[float | None]) -> None:
        lines.append(f"{label:46s}" + "".join(f"{'-':>16s}" if v is None else f"{v / GIB:16.2f}" for v in values))

    for key, label in (("weights", "weights (params + buffers)"), ("grads", "gradients (fp32, trainable)"), ("adam", "AdamW moments (fp32)")):
        row(label, [_total(r, key) for r in mine] + [ext[key]])
    for ph in ("forward", "backward", "optimizer"):
        row(f"activations at the {ph} peak", [r["train"]["phases"][ph]["act"] if r["train"] else None for r in mine] + [ext["act"][ph]])
    row("TRAINING PEAK = static + largest of the three", [_total(r, "weights") + _total(r, "grads") + _total(r, "adam") + max(
        p["act"] for p in r["train"]["phases"].values()) if r["train"] else None for r in mine] + [ext["train_peak"]])
    vals = lambda r: r["val"]["phases"]["validation"]["act"] if r["val"] else None
    row("validation activation peak", [vals(r) for r in mine] + [ext["act_val"]])
    row("validation peak in fit (weights + Adam + act.)", [None if r["val"] is None else _total(r, "weights") + _total(r, "adam") + vals(r)
                                                           for r in mine] + [ext["val_peak_in_fit"]])
    row("process peak RSS (CPU run, everything)", [r["process_peak_rss"] for r in mine] + [None])
    if any(r["train"] is None for r in mine):
        lines.append("(weights-only runs: no step measured; activations from the bf16 runs + the largest LM weight dequantised to bf16)")
    lines.append("\nfull-size static memory by part, GiB (exact arithmetic from the measured tensors)")
    lines.append(f"{'part':32s} {'dtypes':24s} {'weights':>8s} {'grads':>8s} {'Adam':>8s}")
    for name, p in ext["static"].items():
        if p["weights"] or p["grads"]:
            lines.append(f"{name:32s} {','.join(p['dtypes']):24s} {p['weights'] / GIB:8.2f} {p['grads'] / GIB:8.2f} {p['adam'] / GIB:8.2f}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------- main
def plan(args: argparse.Namespace) -> list[tuple[str, int, int, int]]:
    """(mode, layers, vocab, validation frames) of each run: the first mode at both depths (and the second vocabulary,
    training only) with validation; the other modes at the first depth, training only, fitted with its slopes."""
    k1, k2 = args.layers
    vocabs = args.vocab or [PRESETS[args.backbone].vocab]
    first, *others = args.modes
    runs = [(first, k1, vocabs[0], args.val_frames), (first, k2, vocabs[0], args.val_frames)]
    runs += [(first, k1, v, 0) for v in vocabs[1:2]]
    runs += [(mode, k1, vocabs[0], args.val_frames if args.validate_all else 0) for mode in others]
    return runs


def run_child(args: argparse.Namespace, mode: str, layers: int, vocab: int, val_frames: int) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--one", args.backbone, mode, str(layers), str(vocab), "--device", args.device,
           "--variant", args.variant,
           "--val-frames", str(val_frames), "--save-dir", str(args.save_dir), *(["--qlora-step"] if args.qlora_step else [])]
    return run_measurement(cmd, f"[rehearsal] {args.backbone} {args.variant} {mode} layers={layers} vocab={vocab} val_frames={val_frames}")


def run_measurement(cmd: list[str], label: str) -> dict[str, Any]:
    """Run one measuring process (its own, so that runs do not share memory) and parse the JSON line it prints last."""
    print(label, file=sys.stderr, flush=True)
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-4000:]}")
    print(f"{label.split(']')[0]}]   done in {time.perf_counter() - t:.0f} s", file=sys.stderr, flush=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="llava_7b", choices=sorted(PRESETS))
    parser.add_argument("--layers", type=int, nargs=2, default=[1, 2], help="the two depths (LM and vision tower) measured")
    parser.add_argument("--modes", nargs="+", default=["bf16", "qlora"], choices=["bf16", "qlora"],
                        help="the first is measured at both depths; the others at the first, with its per-layer slopes")
    parser.add_argument("--vocab", type=int, nargs="+", help="embedding rows measured (default: the real vocabulary); "
                        "a second value adds a training run to fit the per-row activation cost")
    parser.add_argument("--val-frames", type=int, default=16, help="frames of the validation video (0: none)")
    parser.add_argument("--validate-all", action="store_true", help="validate in the other modes' runs too")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--variant", default="reference", choices=sorted(VARIANTS),
                        help="the recipe as configured, or lean: " + " ".join(VARIANTS["lean"]))
    parser.add_argument("--json", type=Path, help="write every run and the extrapolations here")
    parser.add_argument("--runs", type=Path, nargs="+", help="report from the runs of earlier --json files instead of measuring")
    parser.add_argument("--save-dir", type=Path, default=Path("runs/rehearsal"),
                        help="each run's JSON is written here as it finishes (a long rehearsal loses nothing)")
    parser.add_argument("--qlora-step", action="store_true",
                        help="run QLoRA's training step on the CPU too (default: count its weights only; slow in bitsandbytes)")
    parser.add_argument("--one", nargs=4, metavar=("PRESET", "MODE", "LAYERS", "VOCAB"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        preset, mode, layers, vocab = args.one
        result = measure(preset, mode, int(layers), int(vocab), args.device, args.val_frames, args.qlora_step, args.variant)
        args.save_dir.mkdir(parents=True, exist_ok=True)
        tag = "" if args.variant == "reference" else f"-{args.variant}"
        (args.save_dir / f"{preset}-{mode}-K{layers}-V{result['vocab']}{tag}.json").write_text(json.dumps(result, default=str))
        print(json.dumps(result, default=str))
        return
    if args.runs:  # --json files ({"runs": [...]}) or the per-run files of --save-dir
        loaded = [json.loads(path.read_text()) for path in args.runs]
        runs = [r for d in loaded for r in d.get("runs", [d]) if r["preset"] == args.backbone]
    else:
        runs = [run_child(args, *spec) for spec in plan(args)]
    modes = [m for m in args.modes if any(r["mode"] == m and variant_of(r) == args.variant for r in runs)]
    preset = PRESETS[args.backbone]
    results: dict[str, Any] = {"command": " ".join(["python", "experiments/benchmarks/rehearsal.py", *sys.argv[1:]]),
                               "runs": runs, "extrapolated": {}}
    for mode in modes:
        ext = extrapolate(mode, runs, preset, args.variant)
        results["extrapolated"][mode] = ext
        print(report(args.backbone, mode, runs, ext, args.variant), flush=True)
    print(f"\n{args.backbone}: extrapolated full-size training peak (tensor memory as torch.cuda.max_memory_allocated counts it)")
    for mode, e in results["extrapolated"].items():
        print(f"  {'QLoRA' if mode == 'qlora' else 'LoRA-bf16':9s} {e['train_peak'] / GIB:6.1f} GiB = weights {e['weights'] / GIB:.1f} "
              f"+ grads {e['grads'] / GIB:.1f} + Adam {e['adam'] / GIB:.1f} + activations {max(e['act'].values()) / GIB:.1f}; "
              f"validation inside fit {e['val_peak_in_fit'] / GIB:.1f} GiB -> {'under' if e['train_peak'] < 24 * GIB else 'OVER'} 24 GiB")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1, default=str))


if __name__ == "__main__":
    main()
