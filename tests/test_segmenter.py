"""The SAM2 memory-bank segmenter: real sam2 modules at the test size (and the official tiny architecture)."""

from __future__ import annotations

import pytest
import torch

from glus_lightning.config import group_choices, load_group
from glus_lightning.segmentation import (
    CheckpointMismatchError,
    MemoryBank,
    MemorySegmenter,
    SegmenterConfigError,
    build_segmenter,
)
from glus_lightning.segmentation.sam2_build import package_config_path

NO_OBJ_SCORE = -1024.0


def make(overrides: list[str] | None = None, choice: str = "test", seed: int = 0) -> MemorySegmenter:
    torch.manual_seed(seed)
    return build_segmenter(load_group("segmenter", choice, overrides or []))


def frames_like(seg: MemorySegmenter, *lead: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (*lead, 3, seg.image_size, seg.image_size), generator=g, dtype=torch.uint8)


def prompts_like(seg: MemorySegmenter, *lead: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*lead, seg.prompt_dim, generator=torch.Generator().manual_seed(seed))


def bank_numel(memory: MemoryBank) -> int:
    entries = [e for kind in memory.output_dict.values() for e in kind.values()]
    return sum(e["maskmem_features"].numel() + e["maskmem_pos_enc"][-1].numel() + e["obj_ptr"].numel() for e in entries)


# ------------------------------------------------------------------------------------------ sizes / configs
def test_test_size_shapes_and_params():
    seg = make().train()
    n_params = sum(p.numel() for p in seg.parameters())
    assert 1.5e6 < n_params < 3e6, n_params
    assert (seg.prompt_dim, seg.image_size) == (64, 128)

    frames = frames_like(seg, 2, 4)  # speed is measured by experiments/benchmarks/train_step.py, not asserted here
    features = seg.encode_frames(frames)
    prompts = prompts_like(seg, 2, 4).requires_grad_()
    out = seg.track(features, prompts)
    (out.mask_logits.sum() + out.iou_pred.sum()).backward()

    assert tuple(features.shape) == (2, 4)
    assert [tuple(x.shape) for x in features.levels] == [(2, 4, 8, 32, 32), (2, 4, 16, 16, 16), (2, 4, 64, 8, 8)]
    assert tuple(out.mask_logits.shape) == (2, 4, 32, 32)
    assert tuple(out.iou_pred.shape) == tuple(out.object_score_logits.shape) == (2, 4)


def test_every_segmenter_choice_is_complete_and_maps_to_a_package_config():
    choices = group_choices("segmenter")
    expected = {"test"} | {f"{v}_{s}" for v in ("sam2", "sam2.1") for s in ("tiny", "small", "base_plus", "large")}
    assert set(choices) == expected
    for choice in choices:
        cfg = load_group("segmenter", choice)
        assert package_config_path(cfg.version, cfg.size).is_file()
        if choice != "test":
            assert (cfg.image_size, cfg.max_memories, cfg.checkpoint) == (1024, 7, None)


def test_bad_config_values_are_named():
    with pytest.raises(SegmenterConfigError, match="segmenter.size='huge'.*base_plus"):
        make(["size=huge"])
    with pytest.raises(SegmenterConfigError, match="segmenter.version='sam3'"):
        make(["version=sam3"])
    with pytest.raises(SegmenterConfigError, match="image_size=100"):
        make(["image_size=100"])


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """Official SAM2.1 tiny architecture (at 256 px to keep CPU time low, in fp32 to compare outside autocast),
    saved in the official format."""
    seg = make(["image_size=256", "dtype=float32"], choice="sam2.1_tiny", seed=0).eval()
    path = tmp_path_factory.mktemp("ckpt") / "sam2.1_hiera_tiny.pt"
    torch.save({"model": seg.sam.state_dict()}, path)
    return seg, path


def test_official_tiny_builds_and_its_checkpoint_loads_back_strictly(tiny_checkpoint):
    seg, path = tiny_checkpoint
    # SAM 2.1 Hiera-T has 38.9 M parameters (official model card)
    assert abs(sum(p.numel() for p in seg.parameters()) - 38.9e6) < 0.1e6
    loaded = make(["image_size=256", "dtype=float32", f"checkpoint={path}"], choice="sam2.1_tiny", seed=1).eval()
    frames, prompts = frames_like(seg, 1, 2), prompts_like(seg, 1, 2)
    with torch.no_grad():
        a = seg.track(seg.encode_frames(frames), prompts)
        b = loaded.track(loaded.encode_frames(frames), prompts)
    for x, y in zip((a.mask_logits, a.iou_pred, a.object_score_logits), (b.mask_logits, b.iou_pred, b.object_score_logits)):
        assert torch.equal(x, y)


def test_checkpoint_of_another_size_or_version_fails_clearly(tiny_checkpoint, tmp_path):
    _, tiny_path = tiny_checkpoint
    with pytest.raises(CheckpointMismatchError, match=rf"{tiny_path} does not fit .*another size or version.*missing keys.*shape mismatches \[.maskmem_tpos_enc: checkpoint \(7, 1, 1, 64\) vs model \(7, 1, 1, 16\)"):
        make([f"checkpoint={tiny_path}"])

    sam2_v1 = tmp_path / "sam2_test.pt"
    torch.save({"model": make(["version=sam2"]).sam.state_dict()}, sam2_v1)
    with pytest.raises(CheckpointMismatchError, match=r"missing keys \[.*(no_obj_embed_spatial|obj_ptr_tpos_proj)"):
        make([f"checkpoint={sam2_v1}"])

    with pytest.raises(FileNotFoundError, match=r"segmenter.checkpoint='nowhere/sam2.pt' does not exist.*checkpoint=null"):
        make(["checkpoint=nowhere/sam2.pt"])
    bare = tmp_path / "bare.pt"
    torch.save(make().sam.state_dict(), bare)
    with pytest.raises(CheckpointMismatchError, match=r"bare.pt: expected an official SAM2 checkpoint \{'model'"):
        make([f"checkpoint={bare}"])


# ------------------------------------------------------------------------------------------------- memory
def present_or_absent(seg: MemorySegmenter, present: bool) -> MemorySegmenter:
    """Force the object-score head's verdict (random init scores hover around 0)."""
    with torch.no_grad():
        seg.sam.sam_mask_decoder.pred_obj_score_head.layers[-1].bias.fill_(10.0 if present else -10.0)
    return seg


def test_memory_bank_changes_later_predictions():
    seg = present_or_absent(make(), present=True).train()  # frozen memory modules run in eval mode: deterministic
    features = seg.encode_frames(frames_like(seg, 2))
    p0a, p0b, p1 = prompts_like(seg, 3, 1, seed=1).unbind(0)
    with torch.no_grad():
        outs = []
        for first_prompt in (p0a, p0a, p0b):
            memory = seg.new_memory(1)
            seg.step(features[0:1], first_prompt, memory, 0)
            outs.append(seg.step(features[1:2], p1, memory, 1))
        empty = seg.step(features[1:2], p1, seg.new_memory(1), 1)
    same, other = outs[0].mask_logits, outs[2].mask_logits
    assert torch.equal(outs[0].mask_logits, outs[1].mask_logits)  # same history, same prediction
    assert (same - other).abs().max() > 1e-5  # different earlier memory (a small effect at random init)
    assert (same - empty.mask_logits).abs().max() > 1e-3  # memory vs the empty-bank (no_mem_embed) path


def test_without_the_bank_every_frame_is_segmented_on_its_own():
    """segmenter.memory.bank=false (the ablation): a track's frames are what memoryless segmentation gives each frame,
    while the same weights with the bank differ after the first frame."""
    on, off = (present_or_absent(make([f"memory.bank={flag}"]), present=True).eval() for flag in ("true", "false"))
    off.load_state_dict(on.state_dict())
    frames, prompts = frames_like(on, 4), prompts_like(on, 2, 4, seed=1)
    with torch.no_grad():
        features = on.encode_frames(frames)
        index = torch.arange(4).expand(2, -1)
        tracked = off.track(off.select(features, index), prompts).mask_logits
        alone = torch.stack([on.segment_without_memory(features[index[:, t]], prompts[:, t]).mask_logits[:, 0] for t in range(4)], 1)
        with_bank = on.track(on.select(features, index), prompts).mask_logits
    torch.testing.assert_close(tracked, alone)
    assert torch.equal(with_bank[:, 0], tracked[:, 0]) and (with_bank[:, 1:] - tracked[:, 1:]).abs().max() > 1e-3


def test_a_withheld_prompt_is_sam2s_own_token_for_a_frame_without_clicks():
    """SAM2's prompt encoder embeds a point labelled -1 (not a point) as its not-a-point token whatever its
    coordinates: what a frame trained without its [SEG] prompt gets; the other frames keep theirs."""
    seg = make()
    prompts = prompts_like(seg, 2, 3)
    withheld = torch.tensor([[False, True, False], [False, True, True]])
    given = seg.withhold_prompts(prompts, withheld)
    coords = torch.rand(3, 1, 2) * seg.image_size
    no_click = seg.sam.sam_prompt_encoder._embed_points(coords, -torch.ones(3, 1), pad=False)[:, 0]
    assert torch.equal(no_click[0], no_click[2])
    assert torch.equal(given[withheld], no_click[:1].expand(3, -1))
    assert torch.equal(given[~withheld], prompts[~withheld])
    with pytest.raises(SegmenterConfigError, match="unprompted_frames=1.0 must be in"):
        make(["memory.unprompted_frames=1.0"])


@pytest.mark.parametrize("max_memories", [7, 3])
def test_memory_bank_is_bounded_over_a_long_video(max_memories):
    seg = make([f"max_memories={max_memories}"]).eval()
    spatial_used, pointers_used = [], []
    hw = (seg.image_size // 16) ** 2
    ptr_tokens = seg.prompt_dim // seg.sam.mem_dim  # SAM2 splits a pointer into C / mem_dim tokens

    def count(module, args, kwargs):
        ptr = kwargs["num_obj_ptr_tokens"]
        spatial_used.append((kwargs["memory"].shape[0] - ptr) // hw)
        pointers_used.append(ptr // ptr_tokens)

    handle = seg.sam.memory_attention.register_forward_pre_hook(count, with_kwargs=True)
    features = seg.encode_frames(frames_like(seg, 1))
    prompt = prompts_like(seg, 1)
    memory, sizes = seg.new_memory(1), {}
    with torch.no_grad():
        for f in range(40):
            seg.step(features, prompt, memory, f)
            assert len(memory) <= 1 + memory.window
            sizes[f] = bank_numel(memory)
    handle.remove()
    assert spatial_used[0] == 1 and max(spatial_used) == max_memories == spatial_used[-1]
    assert max(pointers_used) == seg.sam.max_obj_ptrs_in_encoder
    assert sizes[39] == sizes[20]  # storage stopped growing
    assert memory.frames[0] == 0 and memory.frames[1:] == list(range(40 - memory.window, 40))


def test_backward_propagation_mirrors_forward_and_differs_from_it():
    seg = present_or_absent(make(), present=True).eval()
    features = seg.encode_frames(frames_like(seg, 1, 4))
    prompts = prompts_like(seg, 1, 4)
    with torch.no_grad():
        fwd = seg.track(features, prompts, frame_ids=[0, 1, 2, 3])
        # the same sequence given descending frame ids: temporal distances mirror, so predictions match
        mirrored = seg.track(features, prompts, frame_ids=[3, 2, 1, 0])
        # frames in their own places, propagated backward from the last frame
        order = [3, 2, 1, 0]
        bwd = seg.track(features[:, order], prompts[:, order], frame_ids=order)
    torch.testing.assert_close(mirrored.mask_logits, fwd.mask_logits)
    torch.testing.assert_close(mirrored.object_score_logits, fwd.object_score_logits)
    bwd_in_time_order = bwd.iou_pred[:, order]
    assert (bwd_in_time_order[:, 0] - fwd.iou_pred[:, 0]).abs().max() > 1e-4  # frame 0: last backward, first forward
    assert (bwd_in_time_order[:, 3] - fwd.iou_pred[:, 3]).abs().max() > 1e-4


def test_memory_bank_rejects_a_frame_twice_and_checks_inputs():
    seg = make().eval()
    features = seg.encode_frames(frames_like(seg, 2))
    memory = seg.new_memory(2)
    with torch.no_grad():
        seg.step(features, prompts_like(seg, 2), memory, 5)
        with pytest.raises(ValueError, match="frame 5 is already in the memory bank"):
            seg.step(features, prompts_like(seg, 2), memory, 5)
        with pytest.raises(ValueError, match=r"prompts \(2, 64\)"):
            seg.step(features, prompts_like(seg, 3), memory, 6)
        with pytest.raises(ValueError, match="uint8 frames"):
            seg.encode_frames(frames_like(seg, 2).float())
        with pytest.raises(ValueError, match=r"\[\*, 3, 128, 128\]"):
            seg.encode_frames(torch.zeros(2, 3, 64, 64, dtype=torch.uint8))


# --------------------------------------------------------------------------------------- outputs / grads
def test_eval_blanks_absent_objects_and_multimask_fallback_acts_only_at_eval():
    with_fallback, without = make(["multimask_fallback=true"]), make(["multimask_fallback=false"])
    features = with_fallback.encode_frames(frames_like(with_fallback, 8))
    prompts = prompts_like(with_fallback, 8, seed=3)
    with torch.no_grad():
        raw = without.train().step(features, prompts, without.new_memory(8), 0)
        gated = without.eval().step(features, prompts, without.new_memory(8), 0)
        fallback_train = with_fallback.train().step(features, prompts, with_fallback.new_memory(8), 0)
        fallback_eval = with_fallback.eval().step(features, prompts, with_fallback.new_memory(8), 0)
    present = raw.object_score_logits > 0
    expected = torch.where(present[:, None, None, None], raw.mask_logits, torch.full_like(raw.mask_logits, NO_OBJ_SCORE))
    torch.testing.assert_close(gated.mask_logits, expected)
    torch.testing.assert_close(fallback_train.mask_logits, raw.mask_logits)
    # random-init single masks are unstable, so at eval the fallback swaps in a multimask output
    changed = (fallback_eval.iou_pred - gated.iou_pred).abs() > 1e-6
    assert changed.any()


def test_training_never_reaches_the_multimask_tokens_so_the_test_size_keeps_its_single_mask_at_eval():
    """GLUS trains the single-mask output only: no loss reaches the heads that turn SAM2's three multimask tokens into
    masks. From scratch (the test size) those heads stay random, so the eval fallback would swap in untrained masks;
    the test size turns it off."""
    seg = make().train()
    features = seg.encode_frames(frames_like(seg, 2, 3))
    prompts = prompts_like(seg, 2, 3).requires_grad_(True)
    seg.track(features, prompts).mask_logits.square().mean().backward()
    heads = seg.sam.sam_mask_decoder.output_hypernetworks_mlps
    grads = [sum(float(p.grad.abs().sum()) if p.grad is not None else 0.0 for p in head.parameters()) for head in heads]
    assert grads[0] > 0 and grads[1:] == [0.0] * (len(heads) - 1)
    with torch.no_grad():
        trained_output = seg.step(features[:, 0], prompts[:, 0].detach(), seg.new_memory(2), 0)
        at_eval = seg.eval().step(features[:, 0], prompts[:, 0].detach(), seg.new_memory(2), 0)
    present = trained_output.object_score_logits > 0
    expected = torch.where(present[:, None, None, None], trained_output.mask_logits, torch.full_like(trained_output.mask_logits, NO_OBJ_SCORE))
    torch.testing.assert_close(at_eval.mask_logits, expected)


def test_frozen_parts_train_without_randomness_and_no_module_is_held_in_eval_mode():
    seg = make().train()  # the test size freezes the image encoder and the memory (dropout 0.1 in memory attention)
    assert all(m.training for m in seg.modules())
    features = seg.encode_frames(frames_like(seg, 1, 4))
    prompts = prompts_like(seg, 1, 4)
    with torch.no_grad():
        runs = [(torch.manual_seed(seed), seg.track(features, prompts).mask_logits)[1] for seed in (0, 1)]
    torch.testing.assert_close(runs[0], runs[1], rtol=0, atol=0)


def test_gradients_reach_prompt_and_mask_decoder_not_frozen_modules():
    seg = present_or_absent(make(), present=True).train()
    sam = seg.sam
    features = seg.encode_frames(frames_like(seg, 1, 3))
    prompts = prompts_like(seg, 1, 3).requires_grad_()
    out = seg.track(features, prompts)
    out.mask_logits[:, 2].sum().backward()  # loss on the last frame only
    # the last frame's prompt, and earlier prompts through the memory bank
    assert all(prompts.grad[:, t].abs().sum() > 0 for t in range(3))
    for name in ("transformer.layers.0.mlp.layers.0.weight", "output_hypernetworks_mlps.0.layers.0.weight", "conv_s0.weight"):
        assert sam.sam_mask_decoder.get_parameter(name).grad.abs().sum() > 0, name
    for module in (sam.image_encoder, sam.memory_attention, sam.memory_encoder, sam.sam_prompt_encoder):
        assert all(not p.requires_grad and p.grad is None for p in module.parameters())


def test_absent_object_is_blanked_at_eval_yet_keeps_its_own_mask_gradient():
    seg = present_or_absent(make(), present=False)
    features = seg.encode_frames(frames_like(seg, 1, 3))
    prompts = prompts_like(seg, 1, 3).requires_grad_()
    with torch.no_grad():
        assert (seg.eval().track(features, prompts).mask_logits == NO_OBJ_SCORE).all()
    out = seg.train().track(features, prompts)
    out.mask_logits[:, 2].sum().backward()
    assert prompts.grad[:, 2].abs().sum() > 0  # raw logits: the mask loss still trains the prompt
    # SAM2's hard choice: an absent object is memorised as "no object", independent of its prompt
    assert prompts.grad[:, :2].abs().sum() == 0


def test_train_memory_and_image_encoder_flags_open_gradients():
    seg = make(["train_memory=true", "train_image_encoder=true", "train_mask_decoder=false"]).train()
    sam = seg.sam
    assert sam.memory_attention.training and sam.image_encoder.training
    prompts = prompts_like(seg, 1, 3).requires_grad_()
    seg.track(seg.encode_frames(frames_like(seg, 1, 3)), prompts).mask_logits.sum().backward()
    for module in (sam.memory_attention, sam.memory_encoder, sam.image_encoder):
        grads = [p.grad for p in module.parameters()]
        assert all(g is not None for g in grads) and sum(g.abs().sum() for g in grads) > 0
    assert all(not p.requires_grad for p in sam.sam_mask_decoder.parameters())
    assert prompts.grad.abs().sum() > 0


# ------------------------------------------------------------------------------------------------ features
def test_each_frame_is_encoded_once_and_select_gathers_the_right_frames():
    seg = make().eval()
    calls = []
    handle = seg.sam.image_encoder.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[0]))
    frames = frames_like(seg, 2, 3)  # 2 videos x 3 frames
    with torch.no_grad():
        features = seg.encode_frames(frames)
        rows = torch.tensor([0, 1, 0])  # expressions 0 and 2 on video 0, expression 1 on video 1
        per_expression = seg.select(features, rows)
        out = seg.track(per_expression, prompts_like(seg, 3, 3))
        assert calls == [6]  # one batched pass over the 6 frames, none while tracking
        single = seg.encode_frames(frames[1, 2:3])
    handle.remove()
    assert tuple(per_expression.shape) == (3, 3) and tuple(out.mask_logits.shape) == (3, 3, 32, 32)
    for level, alone in zip(per_expression.levels, single.levels):
        torch.testing.assert_close(level[1, 2], alone[0], atol=1e-5, rtol=1e-4)
        assert torch.equal(level[0], level[2])
        assert not torch.allclose(level[0, 0], level[1, 0])
    flat = seg.select(seg.encode_frames(frames.flatten(0, 1)), torch.tensor([[3, 4, 5], [0, 1, 2]]))
    for level, nested in zip(flat.levels, features.levels):
        torch.testing.assert_close(level, nested.flip(0), atol=1e-5, rtol=1e-4)


# ------------------------------------------------------------------------------------------ memory.backprop
def saved_bytes(fn) -> tuple[object, int]:
    """``fn()``'s result and the bytes autograd saved for its backward (what a training step holds on to)."""
    total = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        return fn(), total


def memory_run(backprop: str, train_memory: bool = True):
    seg = make([f"memory.backprop={backprop}", f"train_memory={str(train_memory).lower()}"]).train()
    features = seg.encode_frames(frames_like(seg, 2, 5, seed=3))
    prompts = prompts_like(seg, 2, 5, seed=4).requires_grad_()
    out, saved = saved_bytes(lambda: seg.track(features, prompts))
    out.mask_logits[:, -1].square().mean().backward()  # the last frame's loss only
    grads = {n: p.grad.clone() for n, p in seg.named_parameters() if p.grad is not None}
    return out, prompts.grad, grads, saved


def test_checkpointed_memory_gives_the_full_gradients_and_saves_less():
    full, full_prompt_grad, full_grads, full_saved = memory_run("full")
    ckpt, ckpt_prompt_grad, ckpt_grads, ckpt_saved = memory_run("checkpointed")
    torch.testing.assert_close(ckpt.mask_logits, full.mask_logits)
    torch.testing.assert_close(ckpt_prompt_grad, full_prompt_grad)
    assert full_grads.keys() == ckpt_grads.keys() and any("memory_attention" in n for n in full_grads)
    for name, grad in full_grads.items():
        torch.testing.assert_close(ckpt_grads[name], grad, msg=name)
    assert full_prompt_grad[:, 0].abs().sum() > 0  # the last frame's loss reaches the first frame through the bank
    assert ckpt_saved < 0.6 * full_saved, (ckpt_saved, full_saved)


def test_no_memory_backprop_is_the_reference_detached_bank():
    full, full_prompt_grad, _, full_saved = memory_run("full", train_memory=False)
    none, none_prompt_grad, grads, none_saved = memory_run("none", train_memory=False)
    torch.testing.assert_close(none.mask_logits, full.mask_logits)  # the same forward
    assert full_prompt_grad[:, 0].abs().sum() > 0
    assert (none_prompt_grad[:, :-1] == 0).all() and none_prompt_grad[:, -1].abs().sum() > 0  # only the frame itself
    assert not any("memory" in n for n in grads)
    assert none_saved < 0.6 * full_saved, (none_saved, full_saved)
    with pytest.raises(SegmenterConfigError, match="backprop=none.*train_memory=false"):
        make(["memory.backprop=none", "train_memory=true"])
    with pytest.raises(ValueError, match="backprop='partial'.*full, checkpointed, none"):
        make(["memory.backprop=partial"])


# ------------------------------------------------------------------------------------------ memory protocol
REFERENCE_MEMORY = ["memory.conditioning_frame=false", "memory.object_pointers=false", "memory.temporal_encoding=false",
                    "memory.eval_stride=3", "memory.gate_by_object_score=false", "memory.encoder_input=conditioned"]


def filled_bank(seg: MemorySegmenter, frames: list[int]):
    features = seg.encode_frames(frames_like(seg, 1, len(frames), seed=7))[0]
    memory = seg.new_memory(1)
    prompts = prompts_like(seg, len(frames), seed=8)
    for i, f in enumerate(frames):
        seg.step(features[i : i + 1], prompts[i : i + 1], memory, f)
    return memory


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("reverse", [False, True])
def test_sam2_protocol_conditions_as_sam2_itself(training, reverse):
    seg = make(["memory.eval_stride=2"]).train(training)
    frames = list(range(30, 17, -1)) if reverse else list(range(13))
    with torch.no_grad():
        memory = filled_bank(seg, frames)
        new = 17 if reverse else 13
        features = seg.encode_frames(frames_like(seg, 1, seed=9))
        ours = seg._condition(features, memory, new)
        top = features.levels[-1]
        sam = seg.sam
        theirs = sam._prepare_memory_conditioned_features(
            frame_idx=new, is_init_cond_frame=False, current_vision_feats=[top.flatten(2).permute(2, 0, 1)],
            current_vision_pos_embeds=[features.pos.flatten(2).permute(2, 0, 1)], feat_sizes=[tuple(top.shape[-2:])],
            output_dict=memory.output_dict, num_frames=new + sam.max_obj_ptrs_in_encoder, track_in_reverse=reverse)
    assert sam.use_obj_ptrs_in_encoder and len(memory.output_dict["cond_frame_outputs"]) == 1
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


def test_reference_protocol_attends_the_seven_nearest_strided_frames_without_pointers_or_temporal_codes():
    seg = make(REFERENCE_MEMORY).eval()
    with torch.no_grad():
        memory = filled_bank(seg, list(range(25)))
        assert not memory.output_dict["cond_frame_outputs"]  # frame 0 is a memory like the others
        new = 25
        features = seg.encode_frames(frames_like(seg, 1, seed=9))
        ours = seg._condition(features, memory, new)
        # the reference's rule, written out: frame f-1, then ((f-2)//3)*3 - 3k for k = 0..5 (7 slots), when stored
        wanted = [new - 1] + [((new - 2) // 3) * 3 - 3 * k for k in range(6)]
        entries = [memory.output_dict["non_cond_frame_outputs"][f] for f in reversed(wanted)]
        sam = seg.sam
        top = features.levels[-1]
        by_hand = sam.memory_attention(
            curr=[top.flatten(2).permute(2, 0, 1)], curr_pos=[features.pos.flatten(2).permute(2, 0, 1)],
            memory=torch.cat([e["maskmem_features"].flatten(2).permute(2, 0, 1) for e in entries]),
            memory_pos=torch.cat([e["maskmem_pos_enc"][-1].flatten(2).permute(2, 0, 1) for e in entries]),
            num_obj_ptr_tokens=0,
        ).permute(1, 2, 0).view_as(ours)
    assert wanted == [24, 21, 18, 15, 12, 9, 6]
    torch.testing.assert_close(ours, by_hand, rtol=1e-5, atol=1e-5)
    assert set(memory.frames) >= set(wanted)  # the bank kept what the rule reaches


def test_reference_protocol_encodes_conditioned_features_and_never_gates():
    seg = make(REFERENCE_MEMORY).eval()
    features = seg.encode_frames(frames_like(seg, 1, 2, seed=3))[0]
    with torch.no_grad():
        torch.nn.init.constant_(seg.sam.sam_mask_decoder.pred_obj_score_head.layers[-1].bias, -50.0)  # "absent" everywhere
        memory = seg.new_memory(1)
        prompts = prompts_like(seg, 2, seed=4)
        seg.step(features[0:1], prompts[0:1], memory, 0)
        pix_feat = seg._condition(features[1:2], memory, 1)
        out = seg.step(features[1:2], prompts[1:2], memory, 1)
        stored = memory.output_dict["non_cond_frame_outputs"][1]["maskmem_features"]
        from_conditioned = seg._encode_memory(pix_feat, out.mask_logits, out.object_score_logits)[0]
        from_raw = seg._encode_memory(features[1:2].levels[-1], out.mask_logits, out.object_score_logits)[0]
    assert (out.object_score_logits < 0).all() and (out.mask_logits > -1000).all()  # not blanked although "absent"
    torch.testing.assert_close(stored, from_conditioned)
    assert not torch.allclose(stored, from_raw)
