"""Qwen2.5-VL: frames patchified by Qwen's own image processor, M-RoPE from image_grid_thw, ChatML."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from transformers import (
    PretrainedConfig,
    PreTrainedTokenizerBase,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLImageProcessor,
)

from glus_lightning.config import ConfigError

from .base import MLLMBackbone, Past, image_inputs, pool_text
from .conversation import Conversations, Part, chatml
from .loading import tiny_section
from .tiny_tokenizer import TinyTokens


def mrope_section(head_dim: int) -> list[int]:
    """Split of the rotary half-dimension into (time, height, width), Qwen's 16:24:24 proportions."""
    half = head_dim // 2
    time = half // 4
    height = (half - time) // 2
    return [time, height, half - time - height]


class Qwen2_5_VLBackbone(MLLMBackbone):
    family = "qwen2_5_vl"
    model_type = "qwen2_5_vl"
    model_class = Qwen2_5_VLForConditionalGeneration
    image_processor_class = Qwen2VLImageProcessor
    vision_module = "model.visual"
    projector_module = "model.visual.merger"
    tiny_tokens = TinyTokens(
        eos="<|im_end|>",
        pad="<|endoftext|>",
        extra=("<|im_start|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"),
    )
    system_prompt = "You are a helpful assistant."
    format_text = "system\nuser\nassistant\n"

    @property
    def tokens_per_image(self) -> int:
        vision = self.hf_model.config.vision_config
        return (self.image_size // (vision.patch_size * vision.spatial_merge_size)) ** 2

    def _check_image_config(self) -> None:
        vision = self.hf_model.config.vision_config
        factor = vision.patch_size * vision.spatial_merge_size
        if self.image_size % factor:
            raise ConfigError(
                f"backbone.image_size={self.image_size} must be a multiple of patch x merge size = {factor} for Qwen2.5-VL"
            )
        if self.image_token_pool != (1, 1):
            raise ConfigError(f"backbone.image_token_pool={pool_text(self.image_token_pool)}: Qwen2.5-VL merges patches itself; use 1x1")

    def conversation(self, num_context: int, queries: list[str], answers: list[str]) -> list[Part]:
        config = self.hf_model.config
        image = [config.vision_start_token_id, *[config.image_token_id] * self.tokens_per_image, config.vision_end_token_id]
        return chatml(self.system_prompt, image, "", self.context_parts(image, "", num_context), queries, answers)

    def image_features(self, pixels: Tensor) -> Tensor:
        vision = self.hf_model.config.vision_config
        patches, _, _ = self.image_processor.patchify(pixels, vision.patch_size, vision.spatial_merge_size, vision.temporal_patch_size)
        grid_thw = self._grid_thw(len(pixels), pixels.device)
        per_image = self.hf_model.model.get_image_features(patches.flatten(0, 1), grid_thw, return_dict=True).pooler_output
        return torch.stack(per_image)

    def last_hidden_state(self, conversations: Conversations, features: Tensor, past: Past | None = None) -> Tensor:
        grid_thw = self._grid_thw(len(features), features.device)
        positions = None
        if past is not None and past.length:  # 3-D rope of the continuation, shifted to start after the cached prefix
            positions = self._rope_positions(conversations, grid_thw) + past.next_position
        return self.hf_model.model(
            input_ids=conversations.input_ids,
            **image_inputs(features, list(features), image_grid_thw=grid_thw),
            mm_token_type_ids=self._image_token_types(conversations),
            position_ids=positions,
            **self.language_inputs(conversations, past),
        ).last_hidden_state

    def next_position(self, conversations: Conversations, num_images: int) -> int:
        grid_thw = self._grid_thw(num_images, conversations.input_ids.device)
        return int(self._rope_positions(conversations, grid_thw).max()) + 1

    def _grid_thw(self, num_images: int, device: torch.device) -> Tensor:
        vision = self.hf_model.config.vision_config
        side = self.image_size // vision.patch_size
        return torch.tensor([1, side, side], device=device).expand(num_images, 3)

    def _image_token_types(self, conversations: Conversations) -> Tensor:
        return (conversations.input_ids == self.hf_model.config.image_token_id).int()

    def _rope_positions(self, conversations: Conversations, grid_thw: Tensor) -> Tensor:
        """[3, E, L] Qwen2.5-VL 3-D rope positions of conversations that start at position 0."""
        positions, _ = self.hf_model.model.get_rope_index(
            conversations.input_ids,
            image_grid_thw=grid_thw,
            attention_mask=conversations.attention_mask,
            mm_token_type_ids=self._image_token_types(conversations),
        )
        return positions

    @classmethod
    def tiny_model(
        cls, tokenizer: PreTrainedTokenizerBase, tiny: dict[str, Any], image_size: int
    ) -> Qwen2_5_VLForConditionalGeneration:
        ids = tokenizer.convert_tokens_to_ids
        text = dict(tiny_section(tiny, "text_config"))
        text.update(
            vocab_size=len(tokenizer),
            bos_token_id=None,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            rope_parameters={
                "rope_type": "default",
                "mrope_section": mrope_section(text["hidden_size"] // text["num_attention_heads"]),
            },
        )
        vision = {**tiny_section(tiny, "vision_config"), "out_hidden_size": text["hidden_size"]}
        config = Qwen2_5_VLConfig(
            text_config=text,
            vision_config=vision,
            image_token_id=ids("<|image_pad|>"),
            video_token_id=ids("<|video_pad|>"),
            vision_start_token_id=ids("<|vision_start|>"),
            vision_end_token_id=ids("<|vision_end|>"),
        )
        return Qwen2_5_VLForConditionalGeneration(config)

    @classmethod
    def tiny_image_processor(cls, config: PretrainedConfig, image_size: int) -> Qwen2VLImageProcessor:
        vision = config.vision_config
        return Qwen2VLImageProcessor(
            patch_size=vision.patch_size, merge_size=vision.spatial_merge_size, temporal_patch_size=vision.temporal_patch_size
        )
