"""``GLUSModule``: MLLM backbone -> ``[SEG]`` projection -> SAM2 memory segmenter, trained end to end."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor

from datamodules.batch import RefVOSBatch
from glus_lightning.backbones import build_backbone
from glus_lightning.backbones.base import PrefixCache
from glus_lightning.checkpoints import state as ckpt_state
from glus_lightning.checkpoints.importers import load_init_weights
from glus_lightning.heads.contrastive_keys import row_keys
from glus_lightning.heads.contrastive_rules import ContrastiveRules
from glus_lightning.heads.object_contrastive import ObjectContrastiveHead
from glus_lightning.heads.seg_projection import SegProjection
from glus_lightning.keyframes.evidence import FrameEvidence, collect_evidence
from glus_lightning.keyframes.propagation import pick_keyframes, stream_from_keyframes
from glus_lightning.keyframes.scorer import FrameScorer
from glus_lightning.losses import GLUSLoss, GLUSOutput
from glus_lightning.masks import masks_from_logits
from glus_lightning.metrics import JAndF
from glus_lightning.precision import keep_trainable_fp32, layer_norms_follow_weights_on_cpu
from glus_lightning.segmentation import SegmenterConfigError, build_segmenter
from glus_lightning.strategies import fsdp1_clips_norm, gather_from_ranks, shard_fsdp2

DECODINGS = ("windowed", "sliding")  # inference.decoding


class GLUSModule(L.LightningModule):
    """Segments, in every query frame, the object that each expression refers to.

    Built from the full resolved config (saved in every checkpoint as a hyperparameter). Trainable parameters are
    fp32 and frozen weights keep ``backbone.dtype`` / ``segmenter.dtype`` (``precision.py``). ``load_device``: where
    4-bit weights load (the strategy's root device, this rank's GPU; ``runner`` passes it).
    """

    def __init__(self, config: DictConfig | dict, load_device: torch.device | None = None) -> None:
        super().__init__()
        cfg = OmegaConf.create(config)
        self.save_hyperparameters({"config": OmegaConf.to_container(cfg, resolve=True)})
        self.cfg = cfg
        self.backbone = build_backbone(cfg.backbone, cfg.prompt, load_device)
        self.segmenter = build_segmenter(cfg.segmenter)
        self.seg_projection = SegProjection(self.backbone.hidden_size, self.segmenter.prompt_dim)
        w = cfg.loss
        self.contrastive: ObjectContrastiveHead | None = None  # no parameters; its bank is a buffer (checkpointed)
        if w.contrastive_weight > 0:
            rules = ContrastiveRules.from_config(w, [source.name for source in cfg.data.train])
            self.contrastive = ObjectContrastiveHead(self.segmenter.prompt_dim, w.contrastive_bank_size,
                                                     w.contrastive_temperature, rules)
        self.criterion = GLUSLoss(w, cfg.mask_threshold, self.contrastive)
        # fitted by keyframe self-refinement only (keyframes/refinement.py), never by the main loss
        self.frame_scorer = FrameScorer(self.segmenter.prompt_dim, cfg.refine.hidden).requires_grad_(False)
        if cfg.get("init_weights") is not None:  # published weights from `glus import` (configs saved before the key: none)
            load_init_weights(self, cfg.init_weights)
        keep_trainable_fp32(self)
        layer_norms_follow_weights_on_cpu(self)
        self.strict_loading = False  # checkpoints hold the trainable state only; on_load_checkpoint checks it
        self.val_metric = JAndF()
        self.test_metric = JAndF()
        self.expression_scores: dict[str, dict[str, float]] = {}  # last val/test epoch, keys "dataset/video/exp_id"
        self.last_validation: tuple[int, dict[str, float]] | None = None  # (step, val/ scores) of the last validation
        # Hugging Face's from_pretrained returns eval-mode models and Lightning's fit does not switch modes: without
        # this the LM would train in eval mode, without gradient checkpointing (HF checks .training) or LoRA dropout
        self.train()

    # ----------------------------------------------------------------------------------- forward
    def _project(self, seg_hidden: Tensor) -> Tensor:
        """``[SEG]`` hidden states (the LM's dtype) -> SAM2 prompts, in the projection's dtype."""
        return self.seg_projection(seg_hidden.to(self.seg_projection[0].weight.dtype))

    def forward(self, batch: RefVOSBatch) -> GLUSOutput:
        """Training forward: one window of Q query frames per video, memory bank over the window."""
        out = self.backbone.encode(  # each video's frames through the vision tower once for all of its expressions
            batch.context_frames, batch.query_frames, batch.expressions, ce_only_seg=self.cfg.loss.ce_only_seg,
            sizes=batch.video_sizes, rows=batch.expression_video,
        )
        lm_loss, prompts = out.lm_loss, self._project(out.seg_hidden)
        q = batch.num_query
        features = self.segmenter.encode_frames(batch.query_frames.flatten(0, 1))
        rows = batch.expression_video[:, None] * q + torch.arange(q, device=prompts.device)
        track = self.segmenter.track(self.segmenter.select(features, rows), self._training_prompts(prompts))
        # no views among the outputs: FSDP2 warns about (and cannot track in-place writes to) views a module returns;
        # the projection's output is one (Linear on [E, Q, D] reshapes its product), so it is copied: E x Q x 256 values
        return GLUSOutput(lm_loss, track.mask_logits, prompts.clone(), track.iou_pred, track.object_score_logits)

    def _training_prompts(self, prompts: Tensor) -> Tensor:
        """What the segmenter is prompted with in training: with ``segmenter.memory.unprompted_frames`` > 0, each query
        frame after a window's first has that chance of getting no prompt, so its mask must come from the memory bank."""
        chance = self.cfg.segmenter.memory.unprompted_frames
        if not self.training or chance == 0:
            return prompts
        if not self.cfg.segmenter.memory.bank:  # checked here: a checkpoint so trained may run without its bank
            raise SegmenterConfigError(f"segmenter.memory.unprompted_frames={chance} trains frames from the memory bank "
                                       "alone: set it to 0 with segmenter.memory.bank=false")
        withheld = torch.rand(prompts.shape[:2], device=prompts.device) < chance
        withheld[:, 0] = False  # a track starts from its prompt
        return self.segmenter.withhold_prompts(prompts, withheld)

    @torch.no_grad()
    def predict_video(self, batch: RefVOSBatch, progress: Callable[[int], object] | None = None) -> Tensor:
        """Mask logits ``[E, T, h, w]`` for every frame of one video (batch of 1 video, all frames as query): the
        chunks of ``stream_video`` put together (validation and test score whole videos)."""
        logits = None
        for rows, frames, chunk in self.stream_video(batch, progress):
            if logits is None:
                logits = chunk.new_empty((len(batch.expressions), batch.num_query, *chunk.shape[2:]))
            valid = frames >= 0
            logits[rows[:, None].expand_as(frames)[valid], frames[valid]] = chunk[valid]
        return logits

    @torch.no_grad()
    def stream_video(self, batch: RefVOSBatch, progress: Callable[[int], object] | None = None
                     ) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        """The mask logits of one video chunk by chunk, each final when it is yielded: ``(rows [R], frames [R, c],
        logits [R, c, h, w])``, expressions ``rows`` at their frames ``frames`` (-1: none, a padding step).

        Windows of ``inference.window`` frames share the evaluation context frames; each frame's image features
        are computed once for all expressions, and with ``inference.kv_cache`` the prompt prefix (system, context frames,
        instruction) is encoded once per video instead of once per window. Sequential by default: every expression at
        the window's frames, the memory bank carried across windows from the first frame on. With
        ``inference.keyframes`` a first pass over the windows keeps each frame's prompts and the scorer's inputs (not
        its features), the scorer picks each expression's keyframe, and the tracks run from there forward and backward
        (``keyframes.propagation``), ``inference.window`` steps at a time, recomputing the image features of the frames
        each chunk needs. Either way nothing per frame but prompt-sized rows outlives its chunk, so memory does not grow
        with the video's length, and the batch's frames may stay on the CPU (each chunk's go to the model's device).
        ``progress(n)`` is called as each window's n frames are through the MLLM (keyframe mode: before propagation).
        """
        if batch.frames.shape[0] != 1:
            raise ValueError(f"predict_video takes one video per batch, got {batch.frames.shape[0]}")
        video = batch.query_frames[0]
        everyone = torch.arange(len(batch.expressions), device=self.device)
        if self.cfg.inference.keyframes:
            # collect_evidence, not self.frame_evidence: FSDP2 forward methods must not nest (see configure_model)
            evidence = collect_evidence(self.segmenter, video, _reported(self._window_prompts(batch), progress))
            keyframes = pick_keyframes(self.frame_scorer, evidence)
            encode = lambda index: self.segmenter.encode_frames(video[index.to(video.device)].to(self.device))
            for rows, frames, track in stream_from_keyframes(self.segmenter, encode, evidence.prompts, keyframes,
                                                             chunk=self.cfg.inference.window):
                yield rows, frames, track.mask_logits
            return
        memory = self.segmenter.new_memory(len(batch.expressions))
        for frame_ids, prompts in _reported(self._window_prompts(batch), progress):
            features = self.segmenter.encode_frames(video[frame_ids].to(self.device))
            rows = torch.arange(len(frame_ids), device=prompts.device).expand(len(batch.expressions), -1)
            track = self.segmenter.track(self.segmenter.select(features, rows), prompts, memory=memory, frame_ids=frame_ids)
            yield everyone, torch.tensor(frame_ids, device=self.device).expand(len(everyone), -1), track.mask_logits

    def _window_prompts(self, batch: RefVOSBatch) -> Iterator[tuple[list[int], Tensor]]:
        """Frame ids of each inference window of one video and their prompts ``[E, w, P]``."""
        window = self.cfg.inference.window
        if window < 1:
            raise ValueError(f"inference.window must be >= 1, got {window}")
        size = None if batch.video_sizes is None else batch.video_sizes[0]
        context = batch.context_frames.to(self.device)
        prefix = self.backbone.encode_prefix(context[0], size) if self.cfg.inference.kv_cache else None
        decoding = self.cfg.inference.decoding
        if decoding not in DECODINGS:
            raise ValueError(f"inference.decoding={decoding!r} is not valid; valid: {', '.join(DECODINGS)}")
        for start in range(0, batch.num_query, window):
            frame_ids = list(range(start, min(start + window, batch.num_query)))
            if decoding == "sliding":
                yield frame_ids, self._sliding_prompts(batch, context, frame_ids, prefix, size)
            else:
                query = batch.query_frames[:, frame_ids].to(self.device)
                out = self.backbone.encode(context, query, batch.expressions, ce_only_seg=self.cfg.loss.ce_only_seg, prefix=prefix,
                                           sizes=batch.video_sizes, rows=batch.expression_video.to(self.device), with_loss=False)
                yield frame_ids, self._project(out.seg_hidden)

    def _sliding_prompts(self, batch: RefVOSBatch, context: Tensor, frame_ids: list[int], prefix: PrefixCache | None,
                         size: tuple[int, int] | None) -> Tensor:
        """Prompts ``[E, w, P]`` as the GLUS reference decodes: frame f's ``[SEG]`` ends a conversation whose turns are
        frames ``f-k+1 .. f`` (k = ``data.num_query``, fewer at the start), earlier turns answered with the evaluation
        answer (which holds ``[SEG]``, what the reference's model writes there). One LM call per turn count, over
        every (expression, frame) pair of the window, continuing the shared prefix cache."""
        k, num_exp = self.cfg.data.num_query, len(batch.expressions)
        prompts = {}
        for turns in sorted({min(f + 1, k) for f in frame_ids}):
            frames = [f for f in frame_ids if min(f + 1, k) == turns]
            windows = torch.tensor([list(range(f - turns + 1, f + 1)) for f in frames], device=batch.frames.device)
            rows = torch.arange(len(frames), device=self.device).repeat(num_exp)  # expression-major: e * F + i -> frames[i]
            out = self.backbone.encode(
                context[:1], batch.query_frames[0][windows].to(self.device), [e for e in batch.expressions for _ in frames],
                ce_only_seg=self.cfg.loss.ce_only_seg, prefix=prefix, sizes=None if size is None else [size] * len(frames),
                rows=rows, with_loss=False,
            )
            last = self._project(out.seg_hidden[:, -1]).view(num_exp, len(frames), -1)
            prompts.update({f: last[:, i] for i, f in enumerate(frames)})
        return torch.stack([prompts[f] for f in frame_ids], dim=1)

    @torch.no_grad()
    def frame_evidence(self, batch: RefVOSBatch) -> FrameEvidence:
        """Prompts, features and memoryless masks of every (expression, frame) of one video (keyframe self-refinement)."""
        return collect_evidence(self.segmenter, batch.query_frames[0], self._window_prompts(batch), keep_frames=True)

    # ---------------------------------------------------------------------------------- training
    def training_step(self, batch: RefVOSBatch, batch_idx: int) -> Tensor:
        out = self(batch)
        if self.contrastive is not None and self.contrastive.rules.push == "before":
            self._push_contrastive_bank(out.prompts, batch)  # the step's rows are candidates of its own loss
        loss, terms = self.criterion(out, batch)
        if self.contrastive is not None and self.contrastive.rules.push == "after":
            self._push_contrastive_bank(out.prompts, batch)
        n = len(batch.expressions)
        self.log_dict({f"train/{name}": term for name, term in terms.items()}, batch_size=n)
        self.log("train/loss", loss, prog_bar=True, batch_size=n)
        return loss

    def _push_contrastive_bank(self, prompts: Tensor, batch: RefVOSBatch) -> None:
        """Push every rank's embeddings of this step, in rank order, so that the banks of all ranks stay identical.

        Rows are padded to a fixed capacity (ranks sample different numbers of expressions). Every rank calls this at the same point of its step
        (``loss.contrastive_push``), so the collective pairs up whether it runs before or after the loss.
        """
        d = self.cfg.data
        capacity = d.batch_size * d.max_expressions * d.num_query
        rows, keys = self.contrastive.padded_rows(prompts, row_keys(batch), capacity)
        rows, keys = gather_from_ranks(rows), gather_from_ranks(keys)
        self.contrastive.push(rows.reshape(-1, rows.shape[-1]), keys.reshape(-1, keys.shape[-1]))

    def validation_step(self, batch: RefVOSBatch, batch_idx: int) -> dict[str, Tensor]:
        return self._evaluate_video(batch, self.val_metric)

    def test_step(self, batch: RefVOSBatch, batch_idx: int) -> dict[str, Tensor]:
        return self._evaluate_video(batch, self.test_metric)

    def predict_step(self, batch: RefVOSBatch, batch_idx: int) -> dict[str, Any]:
        """Boolean masks ``[T, H, W]`` per expression at the video's original size (the size of its target)."""
        logits = self.predict_video(batch)
        sizes = [batch.targets.size(e) for e in range(len(batch.targets))]
        masks = [masks_from_logits(lg, size, self.cfg.mask_threshold) for lg, size in zip(logits, sizes, strict=True)]
        return {"video": batch.video_ids[0], "dataset": batch.datasets[0], "expression_ids": batch.expression_ids,
                "frame_names": batch.frame_names[0], "masks": masks}

    def _evaluate_video(self, batch: RefVOSBatch, metric: JAndF) -> dict[str, Tensor]:
        """Whole-video masks at the original resolution, scored per expression (validation and test share it).

        One expression at a time: its dense target is decoded from the batch's per-object RLE, scored, and freed
        with its full-resolution prediction, so a video's memory does not grow with its expressions. Returns the
        low-resolution mask logits ``[E, T, h, w]`` (for callbacks such as the overlay logger).
        """
        logits = self.predict_video(batch)
        if len(batch.targets) != len(logits):
            raise ValueError(f"{len(logits)} expressions predicted, the batch has {len(batch.targets)} targets")
        for e, (lg, exp_id) in enumerate(zip(logits, batch.expression_ids, strict=True)):
            target = batch.targets.expression_target(e).bool()
            pred = masks_from_logits(lg, tuple(target.shape[-2:]), self.cfg.mask_threshold)
            metric.update(pred, target, key=f"{batch.datasets[0]}/{batch.video_ids[0]}/{exp_id}")
            del target, pred
        return {"mask_logits": logits}

    def on_validation_epoch_end(self) -> None:
        scores = self._log_scores(self.val_metric, "val")
        if not self.trainer.sanity_checking:
            self.last_validation = (self.global_step, scores)  # runner.fit reports it rather than validating again

    def on_test_epoch_end(self) -> None:
        self._log_scores(self.test_metric, "test")

    def _log_scores(self, metric: JAndF, stage: str) -> dict[str, float]:
        """Log ``<stage>/J``, ``/F``, ``/J&F`` and keep the per-expression scores (for CSV tables); returns the logged."""
        scores = {f"{stage}/{k}": v for k, v in metric.compute().items() if k in ("J", "F", "J&F")}
        # already the scores over every rank (JAndF gathers its per-expression states), so equal on all ranks: their
        # mean (sync_dist) is the same value, and Lightning does not warn that they are unsynced
        self.log_dict(scores, prog_bar=True, sync_dist=True)
        self.expression_scores = metric.per_expression()
        metric.reset()
        return {k: float(v) for k, v in scores.items()}

    # ------------------------------------------------------------------------ scale, checkpoints
    def configure_model(self) -> None:
        """FSDP2 (``trainer.strategy=fsdp``): shard the units, then the root, over the (nodes, GPUs) mesh.

        ``predict_video`` and ``frame_evidence`` gather the root's weights as ``forward`` does; such forward methods
        must not call each other: the inner call leaves the root idle and the outer one would then reshard the root's
        weights even while ``strategies.gather_units`` holds them (a hang when ranks' video counts differ).
        """
        if self.device_mesh is not None:
            shard_fsdp2(self, self.device_mesh, str(self.trainer.precision), forward_methods=("predict_video", "frame_evidence"))

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Keep only what training changes (frozen weights come from the config)."""
        checkpoint["state_dict"] = ckpt_state.trainable_state(self, checkpoint["state_dict"], also=("frame_scorer.",))

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Fail clearly on a checkpoint of another model or other training switches."""
        ckpt_state.check_checkpoint_fits(self, checkpoint, self.cfg.backbone.family, optional=("contrastive.",))

    # -------------------------------------------------------------------------------- optimisers
    def configure_gradient_clipping(self, optimizer: torch.optim.Optimizer, gradient_clip_val: float | None = None,
                                    gradient_clip_algorithm: str | None = None) -> None:
        """``trainer.gradient_clip_val`` under every strategy: FSDP1 clips through its root module (fsdp1_clips_norm)."""
        if not fsdp1_clips_norm(self.trainer.strategy.model, gradient_clip_val, gradient_clip_algorithm):
            self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def configure_optimizers(self) -> dict:
        """AdamW (segmenter optionally at its own lr), linear warm-up then linear decay to 0 at max_steps."""
        o = self.cfg.optim
        seg_params = [p for p in self.segmenter.parameters() if p.requires_grad]
        seg_ids = {id(p) for p in seg_params}
        rest = [p for p in self.parameters() if p.requires_grad and id(p) not in seg_ids]
        groups = [{"params": rest, "lr": o.lr}]
        if seg_params:
            groups.append({"params": seg_params, "lr": o.segmenter_lr if o.segmenter_lr is not None else o.lr})
        optimizer = torch.optim.AdamW(groups, lr=o.lr, betas=tuple(o.betas), weight_decay=o.weight_decay)
        # trainer.max_steps=-1 (train by epochs): Lightning's estimate of the run's optimiser steps; none: no decay
        total = self.trainer.max_steps if self.trainer.max_steps > 0 else self.trainer.estimated_stepping_batches
        warmup = int(min(o.warmup_steps, total))

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            if total == float("inf"):
                return 1.0
            return max(0.0, (total - step) / max(total - warmup, 1))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def _reported(windows: Iterator[tuple[list[int], Tensor]], progress: Callable[[int], object] | None) -> Iterator[tuple[list[int], Tensor]]:
    """The windows, calling ``progress(number of frames)`` after each has been used."""
    for frame_ids, prompts in windows:
        yield frame_ids, prompts
        if progress is not None:
            progress(len(frame_ids))
