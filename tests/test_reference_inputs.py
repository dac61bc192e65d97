"""What the released GLUS weights see, on the input side: the reference's token pooling, CLIP crop, prompt wording
and conversation layout (backbone=glus_reference + prompt=glus_reference), each checked against an independent
computation written from the reference's facts, not with the code under test."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_backbones import PROMPT, tiny_cfg
from transformers import AutoTokenizer, CLIPImageProcessor

from datamodules.datamodule import RefVOSDataModule
from datamodules.sampling import squash
from glus_lightning.backbones import LlavaBackbone, build_backbone
from glus_lightning.backbones.base import MLLMBackbone
from glus_lightning.backbones.image_resize import centre_square, tower_input
from glus_lightning.backbones.prompt import Prompt
from glus_lightning.config import ConfigError, compose, load_group
from glus_lightning.module import GLUSModule

REFERENCE = ["image_token_pool=1x4", "image_resize=center_crop"]  # conf/backbone/glus_reference.yaml's inputs
SIDE = 128  # tiny CLIP at 128 px with 8 px patches: a 16 x 16 grid, as CLIP ViT-L/14 at 224 px
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)  # OpenAI CLIP


def test_glus_reference_backbone_selects_the_reference_inputs() -> None:
    cfg = load_group("backbone", "glus_reference")
    assert cfg.image_token_pool == "1x4" and cfg.image_resize == "center_crop"
    for choice in ("llava_7b", "llava_tiny"):  # this project's presets keep 2 x 2 squares of the whole frame
        cfg = load_group("backbone", choice)
        assert cfg.image_token_pool == "2x2" and cfg.image_resize == "squash"


@pytest.fixture(scope="module")
def reference_tiny(tmp_path_factory: pytest.TempPathFactory) -> MLLMBackbone:
    """A tiny LLaVA with the reference's pooling and crop, the reference prompt, and LISA's <im_start>/<im_end>."""
    path = tmp_path_factory.mktemp("reference_tiny")
    prompt = load_group("prompt", "glus_reference")
    LlavaBackbone.write_tiny_checkpoint(tiny_cfg("llava", f"image_size={SIDE}", *REFERENCE), prompt, path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.add_tokens(["<im_start>", "<im_end>"], special_tokens=True)  # as LISA-7B-v1's tokenizer holds them
    tokenizer.save_pretrained(path)
    return build_backbone(tiny_cfg("llava", f"path={path}", f"image_size={SIDE}", *REFERENCE), prompt).eval()


def tower_patches(bb: MLLMBackbone, pixels: torch.Tensor) -> torch.Tensor:
    """[N, 256, D] CLIP patch states the reference reads: layer -2 (mm_vision_select_layer), CLS dropped."""
    return bb.hf_model.model.vision_tower(pixels, output_hidden_states=True).hidden_states[-2][:, 1:]


# ------------------------------------------------------------------------------------------ pooling
def test_pooling_is_avgpool1d_over_the_raster_patch_sequence(reference_tiny: MLLMBackbone) -> None:
    bb = reference_tiny
    pixels = torch.rand(2, 3, SIDE, SIDE, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = bb.image_features(pixels)
        patches = tower_patches(bb, pixels)
        strips = torch.nn.AvgPool1d(kernel_size=4, stride=4)(patches.transpose(1, 2)).transpose(1, 2)  # the reference
        squares = patches.reshape(2, 8, 2, 8, 2, -1).mean((2, 4)).reshape(2, 64, -1)  # 2 x 2 blocks instead
        projector = bb.hf_model.model.multi_modal_projector
        expected, two_by_two = projector(strips), projector(squares)
    assert patches.shape[1] == 256 and bb.tokens_per_image == 64 == ours.shape[1]
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(ours, two_by_two, atol=1e-3)


@pytest.mark.parametrize(("family", "pool", "match"), [
    ("qwen2_5_vl", "2x2", r"image_token_pool=2x2: Qwen2.5-VL merges patches itself; use 1x1"),
    ("internvl", "1x4", r"image_token_pool=1x4: InternVL pixel-shuffles its tokens itself; use 1x1"),
    ("llava", "3x4", r"image_token_pool=3x4: rows and cols must divide the 4 x 4 patch grid"),
    ("llava", "2", r"image_token_pool='2': write <rows>x<cols>.*1x4: the GLUS reference's"),  # the old k x k integer
    ("llava", "1x0", r"image_token_pool='1x0': write <rows>x<cols>"),
])
def test_bad_token_pools_name_the_key_and_what_is_valid(family: str, pool: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        build_backbone(tiny_cfg(family, f"image_token_pool={pool}"), PROMPT)


# ------------------------------------------------------------------------------------------ CLIP crop
@pytest.mark.parametrize(("side", "height", "width", "box"), [
    (1024, 480, 640, (0, 128, 1024, 768)),   # columns [S (W - H) / 2W, S (W + H) / 2W) = [128, 896)
    (1024, 640, 480, (128, 0, 768, 1024)),   # rows, for a portrait frame
    (1024, 1080, 1920, (0, 224, 1024, 576)),  # [224, 800)
    (1024, 720, 720, (0, 0, 1024, 1024)),    # a square frame: all of it
])
def test_centre_square_of_the_original_inside_the_squashed_frame(side: int, height: int, width: int, box: tuple) -> None:
    assert centre_square(side, height, width) == box


def smooth_image(height: int, width: int, seed: int) -> np.ndarray:
    """uint8 (H, W, 3): a smooth random picture (resampling error stays small, geometry errors do not)."""
    low = torch.rand(1, 3, height // 40, width // 40, generator=torch.Generator().manual_seed(seed))
    x = F.interpolate(low, size=(height, width), mode="bicubic", align_corners=False).clamp(0, 1)
    return (x[0].permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()


@pytest.mark.parametrize(("height", "width"), [(480, 640), (640, 480), (720, 1280)])
def test_center_crop_of_the_squashed_frame_matches_clip_image_processor(height: int, width: int) -> None:
    """The reference: CLIPImageProcessor on the original (short side to 224, bicubic; centre 224 x 224). Ours: the
    loader's squash to 1024, then the band of the original's centre square to 224. The only difference is the
    second resampling (measured: mean 0.003, max 0.023 of full scale)."""
    image = smooth_image(height, width, seed=height + width)
    processor = CLIPImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}, resample=3,
                                   do_normalize=False)
    theirs = processor(images=[image], return_tensors="pt")["pixel_values"][0]
    squashed = squash(image, 1024)[None]
    ours = tower_input(squashed, 224, "center_crop", [(height, width)])[0]
    diff = (ours - theirs).abs()
    assert diff.mean() < 0.005 and diff.max() < 0.05, (diff.mean(), diff.max())
    whole = (tower_input(squashed, 224, "squash", None)[0] - theirs).abs()
    assert whole.mean() > 0.1  # the whole frame squashed is another picture: the comparison can tell


def test_center_crop_needs_the_original_sizes_and_bad_values_are_named(reference_tiny: MLLMBackbone) -> None:
    frames = torch.zeros(1, 2, 3, SIDE, SIDE, dtype=torch.uint8)
    with pytest.raises(ValueError, match="center_crop needs each frame's original"):
        reference_tiny.encode(frames[:, :1], frames[:, 1:], ["cat"], ce_only_seg=True)
    with pytest.raises(ConfigError, match=r"backbone.image_resize='pad'.*valid: squash, center_crop"):
        build_backbone(tiny_cfg("llava", "image_resize=pad"), PROMPT)


def test_batches_carry_each_video_s_size_to_the_backbone(data_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = compose([f"data.root={data_root}", "data.num_workers=0", "data.num_context=2", "data.num_query=3",
                   "data.batch_size=2", "backbone.image_resize=center_crop"])
    model = GLUSModule(cfg)
    seen: list[list[tuple[int, int]]] = []
    real = model.backbone.pixel_values
    monkeypatch.setattr(model.backbone, "pixel_values", lambda frames, sizes=None: seen.append(sizes) or real(frames, sizes))
    dm = RefVOSDataModule(cfg.data)
    batch = next(iter(dm.train_dataloader()))
    first = [batch.expression_video.tolist().index(b) for b in range(len(batch.video_ids))]
    assert batch.video_sizes == [batch.targets.size(e) for e in first]  # each video's original (H, W)
    batch.video_sizes = [(480, 640), (720, 1280)][: len(batch.video_ids)]  # as if the videos were not square
    with torch.no_grad():
        model.training_step(batch, 0)
    frames = batch.num_context + batch.num_query
    # each video's frames go through the tower once, whatever its number of expressions
    assert seen[-1] == [size for size in batch.video_sizes for _ in range(frames)]
    val = next(iter(dm.val_dataloader()))
    seen.clear()
    model.eval().predict_video(val)  # the cached prefix (context frames), then each window's query frames
    assert seen and all(sizes == [val.video_sizes[0]] * len(sizes) for sizes in seen)
    val.video_sizes = None
    with pytest.raises(ValueError, match="video_sizes"):
        model.predict_video(val)


# ------------------------------------------------------------------------------------------ prompt
@pytest.mark.parametrize(("raw", "reference", "default"), [
    ("The Red Circle.", "the red circle", "The Red Circle."),
    (" a dog running . ", "a dog running .", " a dog running . "),  # the period is not last: kept, then stripped
    ("cat..", "cat.", "cat.."),                                      # one period only
])
def test_expression_preparation(raw: str, reference: str, default: str) -> None:
    assert Prompt.from_config(load_group("prompt", "glus_reference")).expression(raw) == reference
    assert Prompt.from_config(load_group("prompt", "default")).expression(raw) == default


# ------------------------------------------------------------------------------------------ equivalence
SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. "
          "The assistant gives helpful, detailed, and polite answers to the human's questions.")
CONTEXT_INFO = "<image>" * 4 + "\n" + "Please finished the following tasks on the context frames above." + "\n"
QUESTION = "<image>\n" + "Can you segment the {class_name} in this frame?"  # SHORT_QUESTION_LIST[0], evaluation's
ANSWER = "Sure, the segmentation result is [SEG]."  # the reference's evaluation answer


def reference_prompt(expression: str) -> str:
    """The reference's llava_v1 prompt for 4 context + 4 query frames, written from its strings and layout."""
    sent = expression.removesuffix(".")  # the reference: sent[:-1] if sent.endswith(".")
    class_name = sent.strip().lower()
    users = [CONTEXT_INFO + QUESTION.format(class_name=class_name)] + [QUESTION.format(class_name=class_name)] * 3
    prompt = SYSTEM + " "  # SeparatorStyle.TWO: system + sep, then role + ": " + message + sep / sep2 per turn
    for user in users:
        prompt += "USER: " + user + " " + "ASSISTANT: " + ANSWER + "</s>"
    return prompt.replace("<image>", "<im_start><image><im_end>")  # mm_use_im_start_end


def reference_ids(prompt: str, tokenizer, image_token_id: int, tokens_per_image: int) -> list[int]:
    """tokenizer_image_token: chunks between "<image>" tokenised apart, one BOS in front, each image a block of
    placeholder positions (the reference splices its 64 pooled features where its single -200 id stands)."""
    ids = [tokenizer.bos_token_id]
    for i, chunk in enumerate(prompt.split("<image>")):
        if i:
            ids += [image_token_id] * tokens_per_image
        ids += tokenizer(chunk, add_special_tokens=False).input_ids
    return ids


def test_conversation_is_the_reference_s_token_for_token(reference_tiny: MLLMBackbone) -> None:
    bb = reference_tiny
    expression = "The Red Circle moving up."
    tokens_per_image = (SIDE // 8) ** 2 // 4  # 256 patches, AvgPool1d(4, 4): 64
    expected = reference_ids(reference_prompt(expression), bb.tokenizer, bb.hf_model.config.image_token_id, tokens_per_image)
    conv = bb.build_inputs([expression], 4, 4, ce_only_seg=True)
    assert conv.input_ids[0].tolist() == expected
    seg = bb.tokenizer.convert_tokens_to_ids("[SEG]")
    assert conv.seg_positions[0].tolist() == [p for p, t in enumerate(expected) if t == seg]
    assert (conv.labels[0] != -100).sum() == 4  # the reference's loss: only the [SEG] targets

    # the [SEG] states: the last layer at the position before each [SEG], with the reference's features spliced in
    frames = torch.randint(0, 256, (1, 8, 3, SIDE, SIDE), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        out = bb.encode(frames[:, :4], frames[:, 4:], [expression], ce_only_seg=True, sizes=[(360, 360)])
        mean, std = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), torch.tensor(CLIP_STD).view(1, 3, 1, 1)
        pixels = (frames[0].float() / 255 - mean) / std  # a square original: its centre square is all of it
        patches = tower_patches(bb, pixels)
        features = bb.hf_model.model.multi_modal_projector(F.avg_pool1d(patches.transpose(1, 2), 4, 4).transpose(1, 2))
        ids = torch.tensor([expected])
        embeds = bb.hf_model.get_input_embeddings()(ids).clone()
        embeds[ids == bb.hf_model.config.image_token_id] = features.reshape(-1, embeds.shape[-1])
        last = bb.hf_model(inputs_embeds=embeds, output_hidden_states=True).hidden_states[-1][0]
    before_seg = [p - 1 for p, t in enumerate(expected) if t == seg]
    torch.testing.assert_close(out.seg_hidden[0], last[before_seg], atol=1e-5, rtol=1e-5)


def test_default_prompt_keeps_this_project_s_layout() -> None:
    """prompt=default: each context image followed by a newline, then the instruction (what the demo trained with)."""
    bb = build_backbone(tiny_cfg("llava"), PROMPT).eval()
    words = load_group("prompt", "default")

    def tok(text: str) -> list[int]:
        return bb.tokenizer(text, add_special_tokens=False).input_ids

    image = [bb.hf_model.config.image_token_id] * bb.tokens_per_image  # no <im_start>/<im_end> in the tiny tokenizer
    query = words.query_templates[0].replace("{expression}", "The Cat.")  # used as given
    expected = [bb.tokenizer.bos_token_id, *tok(SYSTEM + " USER: "), *(image + tok("\n")) * 2,
                *tok(words.context_instruction + "\n"), *image, *tok(f"\n{query} ASSISTANT:"),
                *tok(words.answer_templates[0] + "</s>")]
    assert bb.build_inputs(["The Cat."], 2, 1, ce_only_seg=True).input_ids[0].tolist() == expected
