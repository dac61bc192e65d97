"""The MLLM backbones, tiny random-init, on CPU: conversations, [SEG] states, loss, training parts, save/load."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap

import bitsandbytes as bnb
import pytest
import torch
from torch import nn
from transformers import AutoTokenizer

from glus_lightning.backbones import BACKBONES, LlavaBackbone, build_backbone
from glus_lightning.backbones.base import MLLMBackbone
from glus_lightning.backbones.conversation import IGNORE_INDEX, Conversations
from glus_lightning.backbones.tiny_tokenizer import build_tiny_tokenizer
from glus_lightning.config import ConfigError, load_group

FAMILIES = ["llava", "qwen2_5_vl", "internvl"]
EXPRESSIONS = ["red circle", "the big blue square moving up on the left", "two small yellow triangles"]


PROMPT = load_group("prompt", "default")


def tiny_cfg(family: str, *overrides: str):
    return load_group("backbone", f"{family}_tiny", list(overrides))


def frames(e: int, n: int, size: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 256, (e, n, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def clip(bb: MLLMBackbone, c: int = 2, q: int = 3, size: int | None = None, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    size = size or bb.image_size
    return frames(len(EXPRESSIONS), c, size, seed), frames(len(EXPRESSIONS), q, size, seed + 1)


def randomize_lora(bb: MLLMBackbone) -> None:
    """LoRA B starts at zero; a non-zero B makes the adapters matter (as after training)."""
    with torch.no_grad():
        for name, param in bb.hf_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)


@pytest.fixture(scope="module", params=FAMILIES)
def tiny(request) -> MLLMBackbone:
    return build_backbone(tiny_cfg(request.param), PROMPT).eval()


# ---- conversations ---------------------------------------------------------------------------


@pytest.mark.parametrize("c", [0, 3])
def test_seg_positions_sit_in_each_answer_after_its_query_image(tiny, c):
    q = 2
    conv = tiny.build_inputs(EXPRESSIONS, c, q, ce_only_seg=False)
    image_id = tiny.hf_model.config.image_token_id
    answer = "".join((tiny.prompt.answer_templates[0] + tiny.tokenizer.eos_token).split())
    assert conv.seg_positions.shape == (len(EXPRESSIONS), q)
    for e in range(len(EXPRESSIONS)):
        ids, pos = conv.input_ids[e], conv.seg_positions[e]
        assert (ids[pos] == tiny.seg_token_id).all()
        assert int((ids == tiny.seg_token_id).sum()) == q
        assert conv.attention_mask[e, pos].all()
        # answer j follows the image of query j: C + j + 1 images precede it
        images_before = torch.cumsum(ids == image_id, 0)[pos]
        assert images_before.tolist() == [(c + j + 1) * tiny.tokens_per_image for j in range(q)]
        for p in pos.tolist():  # the labelled run around [SEG] decodes to exactly the answer sentence
            start, end = p, p
            while conv.labels[e, start - 1] != IGNORE_INDEX:
                start -= 1
            while end + 1 < ids.numel() and conv.labels[e, end + 1] != IGNORE_INDEX:
                end += 1
            assert "".join(tiny.tokenizer.decode(ids[start : end + 1]).split()) == answer


def test_lisa_tokenizer_brackets_every_image(tmp_path):
    LlavaBackbone.write_tiny_checkpoint(tiny_cfg("llava"), PROMPT, tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    tokenizer.add_tokens(["<im_start>", "<im_end>"], special_tokens=True)  # as LISA-7B-v1's tokenizer
    tokenizer.save_pretrained(tmp_path)
    bb = build_backbone(tiny_cfg("llava", f"path={tmp_path}"), PROMPT).eval()
    ids = bb.build_inputs(EXPRESSIONS[:1], 2, 2, ce_only_seg=True).input_ids[0]
    image = ids == bb.hf_model.config.image_token_id
    first = torch.nonzero(image[1:] & ~image[:-1]).flatten() + 1
    last = torch.nonzero(image[:-1] & ~image[1:]).flatten()
    assert len(first) == len(last) == 4
    assert (ids[first - 1] == tokenizer.convert_tokens_to_ids("<im_start>")).all()
    assert (ids[last + 1] == tokenizer.convert_tokens_to_ids("<im_end>")).all()
    out = bb.encode(*clip(bb, c=2, q=2), EXPRESSIONS, ce_only_seg=True)
    assert out.seg_hidden.shape == (len(EXPRESSIONS), 2, bb.hidden_size) and torch.isfinite(out.lm_loss)


def test_ce_only_seg_labels_only_seg_targets(tiny):
    c, q = 2, 3
    only = tiny.build_inputs(EXPRESSIONS, c, q, ce_only_seg=True)
    every = tiny.build_inputs(EXPRESSIONS, c, q, ce_only_seg=False)
    assert torch.equal(only.input_ids, every.input_ids)
    labelled = only.labels[only.labels != IGNORE_INDEX]
    assert labelled.numel() == len(EXPRESSIONS) * q and (labelled == tiny.seg_token_id).all()
    answer_ids = tiny.tokenizer(tiny.prompt.answer_templates[0] + tiny.tokenizer.eos_token, add_special_tokens=False).input_ids
    assert int((every.labels != IGNORE_INDEX).sum()) == len(EXPRESSIONS) * q * len(answer_ids)
    # padding is never attended nor labelled
    padded = every.attention_mask == 0
    assert padded.any() and (every.labels[padded] == IGNORE_INDEX).all()


def test_paraphrases_are_drawn_in_training_from_the_seeded_generator(tiny):
    def ids() -> torch.Tensor:
        return tiny.build_inputs(EXPRESSIONS * 4, 1, 4, ce_only_seg=False).input_ids

    tiny.train()
    try:
        torch.manual_seed(7)
        first = ids()
        torch.manual_seed(7)
        assert torch.equal(first, ids())
        rows = {tuple(row.tolist()) for row in first[::3]}
        assert len(rows) > 1  # the same expression got different wordings
    finally:
        tiny.eval()
    assert len({tuple(row.tolist()) for row in ids()[::3]}) == 1


# ---- forward ---------------------------------------------------------------------------------


def reference_forward(bb: MLLMBackbone, conv: Conversations, flat_frames: torch.Tensor):
    """A plain Hugging Face forward with the HF image processor's pixels (and, for LLaVA, an
    independent rows x cols pooling written into inputs_embeds)."""
    hf = bb.hf_model
    images = list(flat_frames)
    common = {"attention_mask": conv.attention_mask, "labels": conv.labels, "output_hidden_states": True}
    if bb.family == "llava":
        pixels = bb.image_processor(images=images, return_tensors="pt")["pixel_values"]
        tower = hf.model.vision_tower(pixels, output_hidden_states=True).hidden_states[hf.config.vision_feature_layer][:, 1:]
        n, t, d = tower.shape
        g, (r, c) = math.isqrt(t), bb.image_token_pool
        pooled = tower.reshape(n, g // r, r, g // c, c, d).mean((2, 4)).reshape(n, -1, d)
        embeds = hf.get_input_embeddings()(conv.input_ids).clone()
        embeds[conv.input_ids == hf.config.image_token_id] = hf.model.multi_modal_projector(pooled).reshape(-1, embeds.shape[-1])
        return hf(inputs_embeds=embeds, **common)
    if bb.family == "qwen2_5_vl":
        inputs = bb.image_processor(images=images, return_tensors="pt")
        return hf(
            input_ids=conv.input_ids,
            pixel_values=inputs["pixel_values"],
            image_grid_thw=inputs["image_grid_thw"],
            mm_token_type_ids=(conv.input_ids == hf.config.image_token_id).int(),
            **common,
        )
    pixels = bb.image_processor(images=images, return_tensors="pt")["pixel_values"]
    return hf(input_ids=conv.input_ids, pixel_values=pixels, **common)


@pytest.mark.parametrize("ce_only_seg", [True, False])
def test_seg_hidden_and_loss_match_a_plain_forward(tiny, ce_only_seg):
    context, query = clip(tiny, c=2, q=3)
    with torch.no_grad():
        out = tiny.encode(context, query, EXPRESSIONS, ce_only_seg)
        conv = tiny.build_inputs(EXPRESSIONS, 2, 3, ce_only_seg)
        ref = reference_forward(tiny, conv, torch.cat([context, query], 1).flatten(0, 1))
    last = ref.hidden_states[-1]
    expected = torch.stack([last[e, conv.seg_positions[e] - 1] for e in range(len(EXPRESSIONS))])
    assert out.seg_hidden.shape == (len(EXPRESSIONS), 3, tiny.hidden_size)
    torch.testing.assert_close(out.seg_hidden, expected, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out.lm_loss, ref.loss, atol=1e-4, rtol=1e-4)


def test_pixel_values_match_the_family_image_processor_when_resizing(tiny):
    flat = frames(1, 4, 2 * tiny.image_size, seed=3)[0]
    ours = tiny.pixel_values(flat)
    if tiny.family == "qwen2_5_vl":
        side = tiny.image_size**2
        theirs = tiny.image_processor(images=list(flat), size={"shortest_edge": side, "longest_edge": side}, return_tensors="pt")
        vision = tiny.hf_model.config.vision_config
        ours = tiny.image_processor.patchify(ours, vision.patch_size, vision.spatial_merge_size, vision.temporal_patch_size)[0]
        theirs = theirs["pixel_values"].reshape(ours.shape)
    else:
        theirs = tiny.image_processor(images=list(flat), return_tensors="pt")["pixel_values"]
    assert ours.shape == theirs.shape
    diff = (ours - theirs).abs()  # the processor resizes uint8 images (rounded, fixed-point kernels); we resize floats
    assert diff.mean() < 0.01 and diff.max() < 0.1, (diff.mean(), diff.max())


def test_bad_frames_are_rejected_with_a_clear_error(tiny):
    context, query = clip(tiny)
    with pytest.raises(ValueError, match="uint8"):
        tiny.encode(context.float(), query, EXPRESSIONS, True)
    with pytest.raises(ValueError, match="3 frame sets for 2 expressions"):
        tiny.encode(context, query, EXPRESSIONS[:2], True)


# ---- training parts --------------------------------------------------------------------------


def expected_trainable(bb: MLLMBackbone, cfg, name: str, param: nn.Parameter) -> bool:
    hf = bb.hf_model
    if "lora_" in name:
        return True
    if name.startswith(bb.projector_module + "."):
        return cfg.train_projector
    if name.startswith(bb.vision_module + "."):  # less the layers the family never reads
        return cfg.train_vision_tower and all(param is not p for p in bb.unused_vision_parameters(hf))
    if param is hf.get_input_embeddings().weight:
        return cfg.train_embeddings
    if param is hf.get_output_embeddings().weight:
        return cfg.train_lm_head
    return False


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize(
    "flags",
    [
        (),
        ("train_projector=false", "train_embeddings=false", "train_lm_head=false", "train_vision_tower=true"),
    ],
    ids=["default", "flipped"],
)
def test_gradients_reach_exactly_the_configured_parts(family, flags):
    cfg = tiny_cfg(family, *flags)
    bb = build_backbone(cfg, PROMPT).train()
    randomize_lora(bb)
    out = bb.encode(*clip(bb), EXPRESSIONS, ce_only_seg=False)
    (out.lm_loss + out.seg_hidden.square().mean()).backward()

    groups: dict[str, list[bool]] = {}
    for name, param in bb.hf_model.named_parameters():
        trainable = expected_trainable(bb, cfg, name, param)
        assert param.requires_grad == trainable, name
        assert not trainable or param.grad is not None, f"trainable but never reached: {name}"
        if not trainable:
            assert param.grad is None, name
            continue
        assert name.startswith(bb.language_model_module + ".") or "lora_" not in name, f"LoRA outside the LM: {name}"
        group = "lora" if "lora_" in name else name.split(".")[1]
        groups.setdefault(group, []).append(param.grad is not None and bool(param.grad.abs().sum() > 0))
    assert all(groups["lora"]) and len(groups["lora"]) == 4 * cfg.tiny.text_config.num_hidden_layers  # A, B of q and v
    assert all(any(flags_) for flags_ in groups.values()), groups  # every trainable part learns something


@pytest.mark.parametrize("family", FAMILIES)
def test_a_few_steps_lower_the_answer_loss(family):
    bb = build_backbone(tiny_cfg(family), PROMPT).train()
    context, query = clip(bb)
    optimizer = torch.optim.Adam([p for p in bb.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(6):
        torch.manual_seed(0)  # the same paraphrases: a fixed batch
        loss = bb.encode(context, query, EXPRESSIONS, ce_only_seg=False).lm_loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses


def test_gradient_checkpointing_changes_memory_not_gradients():
    bb = build_backbone(tiny_cfg("llava", "gradient_checkpointing=true"), PROMPT).train()
    assert bb.hf_model.is_activation_checkpointing
    randomize_lora(bb)
    context, query = clip(bb)

    def lora_grads() -> list[torch.Tensor]:
        bb.zero_grad()
        torch.manual_seed(0)  # the same paraphrases each time
        bb.encode(context, query, EXPRESSIONS, ce_only_seg=False).lm_loss.backward()
        return [p.grad.clone() for n, p in bb.hf_model.named_parameters() if "lora_" in n]

    checkpointed = lora_grads()
    bb.hf_model.activation_checkpointing_disable()
    for a, b in zip(checkpointed, lora_grads(), strict=True):
        torch.testing.assert_close(a, b)


def test_qlora_4bit_language_model_trains_on_cpu():
    bb = build_backbone(tiny_cfg("llava", "quantization.load_in_4bit=true"), PROMPT).train()
    modules = dict(bb.hf_model.named_modules())
    lm_linears = [
        n
        for n, m in modules.items()
        if n.startswith(f"{bb.language_model_module}.") and "lora_" not in n and isinstance(m, nn.Linear)
    ]
    assert lm_linears and all(isinstance(modules[n], bnb.nn.Linear4bit) for n in lm_linears)
    for name, module in modules.items():
        if name.startswith((bb.vision_module, bb.projector_module, "lm_head")):
            assert not isinstance(module, bnb.nn.Linear4bit), name
    randomize_lora(bb)
    out = bb.encode(*clip(bb), EXPRESSIONS, ce_only_seg=True)
    (out.lm_loss + out.seg_hidden.square().mean()).backward()
    lora_b = [p.grad for n, p in bb.hf_model.named_parameters() if "lora_B" in n]
    assert lora_b and all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in lora_b)
    with pytest.raises(ValueError, match="4-bit"):
        bb.save_pretrained("unused")


QUIET_IMPORTS = textwrap.dedent(
    """
    import sys, tempfile
    import glus_lightning.module
    from glus_lightning.backbones import build_backbone
    from glus_lightning.config import compose, load_group
    assert "bitsandbytes" not in sys.modules, "imported with glus_lightning.module"
    cfg = compose()
    build_backbone(cfg.backbone, cfg.prompt).save_pretrained(tempfile.mkdtemp())  # LoRA applied, then merged
    assert "bitsandbytes" not in sys.modules, "imported building an unquantised backbone"

    import torch
    from peft.tuners.lora.bnb import Linear4bit
    bb = build_backbone(load_group("backbone", "llava_tiny", ["quantization.load_in_4bit=true"]), cfg.prompt).train()
    adapted = [m for n, m in bb.hf_model.named_modules() if isinstance(m, Linear4bit)]
    assert len(adapted) == 2 * bb.hf_model.config.text_config.num_hidden_layers, adapted  # q_proj, v_proj
    frames = torch.randint(0, 256, (1, 1, 3, bb.image_size, bb.image_size), dtype=torch.uint8)
    bb.encode(frames, frames, ["red circle"], ce_only_seg=True).lm_loss.backward()
    grads = [p.grad for n, p in bb.hf_model.named_parameters() if "lora_A" in n]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    """
)


def test_bitsandbytes_is_imported_only_for_4bit_models():
    """peft imports bitsandbytes when installed (seconds; a kernel warning on AVX512-BF16 CPUs): unquantised backbones
    keep it out, and a 4-bit backbone built afterwards in the same process still gets peft's 4-bit LoRA layers.
    In a fresh interpreter, as this one has imported bitsandbytes already."""
    result = subprocess.run([sys.executable, "-c", QUIET_IMPORTS], check=False, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]


# ---- save / load -----------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_save_pretrained_then_build_from_path_gives_identical_outputs(family, tmp_path):
    bb = build_backbone(tiny_cfg(family), PROMPT).eval()
    randomize_lora(bb)
    context, query = clip(bb, seed=5)
    with torch.no_grad():
        before = bb.encode(context, query, EXPRESSIONS, ce_only_seg=False)
        with bb.model.disable_adapter():
            no_lora = bb.encode(context, query, EXPRESSIONS, ce_only_seg=False)
    bb.save_pretrained(tmp_path)

    loaded = build_backbone(tiny_cfg(family, f"path={tmp_path}"), PROMPT).eval()
    assert loaded.seg_token_id == bb.seg_token_id and len(loaded.tokenizer) == len(bb.tokenizer)
    with torch.no_grad():
        after = loaded.encode(context, query, EXPRESSIONS, ce_only_seg=False)
    torch.testing.assert_close(after.seg_hidden, before.seg_hidden, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(after.lm_loss, before.lm_loss, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(no_lora.seg_hidden, before.seg_hidden, atol=1e-3)  # the merged LoRA is what matched


def test_wrong_paths_and_families_fail_clearly(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match="nowhere.*does not exist.*llava"):
        build_backbone(tiny_cfg("llava", f"path={missing}"), PROMPT)

    llava_dir = tmp_path / "llava"
    LlavaBackbone.write_tiny_checkpoint(tiny_cfg("llava"), PROMPT, llava_dir)
    with pytest.raises(ConfigError, match="model_type='llava'.*family='qwen2_5_vl'"):
        build_backbone(tiny_cfg("qwen2_5_vl", f"path={llava_dir}"), PROMPT)
    with pytest.raises(ConfigError, match="image_size=64.*32"):
        build_backbone(tiny_cfg("llava", f"path={llava_dir}", "image_size=64"), PROMPT)

    lisa = tmp_path / "LISA-7B-v1"
    lisa.mkdir()
    (lisa / "config.json").write_text(json.dumps({"model_type": "llava", "mm_vision_tower": "openai/clip-vit-large-patch14"}))
    with pytest.raises(ConfigError, match="original LLaVA/LISA"):
        build_backbone(tiny_cfg("llava", f"path={lisa}"), PROMPT)

    with pytest.raises(ConfigError, match="valid: llava, qwen2_5_vl, internvl"):
        build_backbone(tiny_cfg("llava", "family=blip"), PROMPT)
    with pytest.raises(ConfigError, match=r"prompt\.answer_templates.*exactly once"):
        build_backbone(tiny_cfg("llava"), load_group("prompt", "default", ["answer_templates=[Sure.]"]))
    with pytest.raises(ConfigError, match=r"prompt\.query_templates.*\{expression\}"):
        build_backbone(tiny_cfg("llava"), load_group("prompt", "default", ["query_templates=[Segment it.]"]))
    assert set(BACKBONES) == set(FAMILIES)


PROMPT_WORDS = """the a an on in of at that which is are first then red green blue yellow purple orange white cyan circle square
triangle shape shapes object objects circles squares triangles left right top bottom middle center upper lower moving moves up
down still static stops stopping stationary fast slow big small large two both all segment frame context frames these can you
sure it"""


@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_tokenizer_is_deterministic_with_whole_word_tokens(family):
    tokens = BACKBONES[family].tiny_tokens
    texts = ["Can you segment the in this frame?", "Sure, it is ."]
    first = build_tiny_tokenizer(tokens, texts, 1024)
    assert first.get_vocab() == build_tiny_tokenizer(tokens, texts, 1024).get_vocab()
    for word in PROMPT_WORDS.split():  # inside a sentence, after a space
        assert len(first(f" {word}", add_special_tokens=False).input_ids) == 1, word


# ---- shared frames ---------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_expressions_of_a_video_share_its_vision_features_with_the_same_outputs_and_gradients(family):
    """Two videos, three expressions (two on video 1): the tower sees each video's frames once (B x (C+Q) frames, not
    E x (C+Q)), and the [SEG] states, LM loss and gradients equal those of one frame copy per expression."""
    bb = build_backbone(tiny_cfg(family, "lora.enabled=true"), PROMPT).train()
    randomize_lora(bb)
    context, query = frames(2, 2, bb.image_size, 3), frames(2, 2, bb.image_size, 4)
    rows = torch.tensor([0, 1, 1])
    seen: list[int] = []
    bb.hf_model.get_submodule(bb.vision_module).register_forward_hook(
        lambda _m, args, kwargs, _out: seen.append((args[0] if args else kwargs["pixel_values"]).shape[0]), with_kwargs=True)
    trained = [p for p in bb.parameters() if p.requires_grad]

    def run(shared: bool):
        seen.clear()
        bb.zero_grad()
        torch.manual_seed(0)  # LoRA dropout draws the same masks in both runs
        if shared:
            out = bb.encode(context, query, EXPRESSIONS, ce_only_seg=False, rows=rows)
        else:
            out = bb.encode(context[rows], query[rows], EXPRESSIONS, ce_only_seg=False)
        (out.lm_loss + out.seg_hidden.float().pow(2).mean()).backward()
        return out, sum(seen), [p.grad.clone() for p in trained]

    shared, shared_frames, shared_grads = run(True)
    copies, copies_frames, copies_grads = run(False)
    # the qwen tower patchifies: count the merged images by the (C+Q) frames the first forward got per image
    per_frame = copies_frames // (3 * 4)
    assert shared_frames == 2 * 4 * per_frame and copies_frames == 3 * 4 * per_frame
    torch.testing.assert_close(shared.seg_hidden, copies.seg_hidden, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(shared.lm_loss, copies.lm_loss, atol=1e-5, rtol=1e-4)
    assert any(g.abs().sum() > 0 for g in shared_grads)
    for a, b in zip(shared_grads, copies_grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-3)
    with torch.no_grad():
        assert bb.encode(context, query, EXPRESSIONS, ce_only_seg=False, rows=rows, with_loss=False).lm_loss is None
