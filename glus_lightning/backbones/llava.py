"""LLaVA-1.5 (the LISA / GLUS start point): CLIP patch tokens average-pooled in rows x cols windows, vicuna v1 chat.

Images are bracketed by ``<im_start>``/``<im_end>`` when the tokenizer has them, as LISA-7B-v1 was
trained (``mm_use_im_start_end``); plain LLaVA-1.5 tokenizers have no such tokens.
"""

from __future__ import annotations

import math
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import (
    CLIPImageProcessor,
    LlavaConfig,
    LlavaForConditionalGeneration,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from glus_lightning.config import ConfigError

from .base import MLLMBackbone, Past, image_inputs, pool_text
from .conversation import Answer, Conversations, Part
from .loading import tiny_section
from .tiny_tokenizer import TinyTokens

IMAGE_START, IMAGE_END = "<im_start>", "<im_end>"


class LlavaBackbone(MLLMBackbone):
    family = "llava"
    model_type = "llava"
    model_class = LlavaForConditionalGeneration
    image_processor_class = CLIPImageProcessor
    vision_module = "model.vision_tower"
    projector_module = "model.multi_modal_projector"
    tiny_tokens = TinyTokens(bos="<s>", eos="</s>", unk="<unk>", pad="<pad>", extra=("<image>",), add_prefix_space=True)
    system_prompt = (
        "A chat between a curious human and an artificial intelligence assistant. "
        "The assistant gives helpful, detailed, and polite answers to the human's questions."
    )
    format_text = "USER: ASSISTANT:"

    @property
    def grid(self) -> int:
        """Patches per side of the vision tower's input."""
        return self.image_size // self.hf_model.config.vision_config.patch_size

    @property
    def tokens_per_image(self) -> int:
        rows, cols = self.image_token_pool
        return (self.grid // rows) * (self.grid // cols)

    def _check_checkpoint_config(self, config: dict[str, Any], path: Path) -> None:
        if "mm_vision_tower" in config or "vision_config" not in config:
            raise ConfigError(
                f"backbone.path={str(path)!r} is an original LLaVA/LISA-layout checkpoint (mm_vision_tower, no vision_config); "
                "convert it to the Hugging Face llava layout (LlavaForConditionalGeneration) first"
            )

    def _check_image_config(self) -> None:
        tower = self.hf_model.config.vision_config.image_size
        if self.image_size != tower:
            raise ConfigError(f"backbone.image_size={self.image_size} but the CLIP tower of this checkpoint takes {tower} px")
        if any(self.grid % k for k in self.image_token_pool):
            raise ConfigError(
                f"backbone.image_token_pool={pool_text(self.image_token_pool)}: rows and cols must divide the "
                f"{self.grid} x {self.grid} patch grid"
            )

    @cached_property
    def image_placeholder(self) -> list[int]:
        """One frame's tokens; bracketed when the tokenizer can, as LISA (mm_use_im_start_end) was trained."""
        image = [self.hf_model.config.image_token_id] * self.tokens_per_image
        vocab = self.tokenizer.get_vocab()
        return [vocab[IMAGE_START], *image, vocab[IMAGE_END]] if IMAGE_START in vocab and IMAGE_END in vocab else image

    def conversation(self, num_context: int, queries: list[str], answers: list[str]) -> list[Part]:
        """llava_v1: ``system USER: <context><image>\\n{query} ASSISTANT: {answer}</s>USER: <image>\\n{query} ...``."""
        image = self.image_placeholder
        parts: list[Part] = [[self.tokenizer.bos_token_id], f"{self.system_prompt} USER: "]
        parts += self.context_parts(image, "\n", num_context)
        for j, (query, answer) in enumerate(zip(queries, answers)):
            if j:
                parts.append("USER: ")
            parts += [image, f"\n{query} ASSISTANT:", Answer(f"{answer}</s>")]
        return parts

    def unused_vision_parameters(self, hf: PreTrainedModel) -> list[nn.Parameter]:
        """CLIP layers after ``vision_feature_layer`` and the final norm (it only feeds the unused pooled output)."""
        tower = hf.model.vision_tower
        layers = hf.config.vision_feature_layer
        num_states = len(tower.encoder.layers) + 1  # hidden_states[0] is the embedding output
        used = max(i % num_states for i in ([layers] if isinstance(layers, int) else layers))
        return [*tower.post_layernorm.parameters(), *(p for layer in tower.encoder.layers[used:] for p in layer.parameters())]

    def image_features(self, pixels: Tensor) -> Tensor:
        """[N, tokens_per_image, D]: selected CLIP layer, CLS dropped, rows x cols average pool, projector.

        Windows tile the patch grid in raster order, so a 1 x k window is ``AvgPool1d(k)`` over the row-major patch
        sequence, the GLUS reference's pooling (its llava_arch.py: 1x4) when k divides the grid's width."""
        model = self.hf_model.model
        config = self.hf_model.config
        layers = config.vision_feature_layer
        states = model.vision_tower(pixels, output_hidden_states=True).hidden_states
        feats = torch.cat([states[i] for i in ([layers] if isinstance(layers, int) else layers)], dim=-1)
        if config.vision_feature_select_strategy == "default":
            feats = feats[:, 1:]
        n, tokens, dim = feats.shape
        side = math.isqrt(tokens)
        grid = feats.transpose(1, 2).reshape(n, dim, side, side)
        pooled = F.avg_pool2d(grid, kernel_size=self.image_token_pool).flatten(2).transpose(1, 2)
        return model.multi_modal_projector(pooled)

    def last_hidden_state(self, conversations: Conversations, features: Tensor, past: Past | None = None) -> Tensor:
        return self.hf_model.model(
            input_ids=conversations.input_ids,
            **image_inputs(features, list(features)),
            **self.language_inputs(conversations, past),
        ).last_hidden_state

    @classmethod
    def tiny_model(
        cls, tokenizer: PreTrainedTokenizerBase, tiny: dict[str, Any], image_size: int
    ) -> LlavaForConditionalGeneration:
        text = {
            "model_type": "llama",
            **tiny_section(tiny, "text_config"),
            "vocab_size": len(tokenizer),
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        }
        vision = {"model_type": "clip_vision_model", **tiny_section(tiny, "vision_config"), "image_size": image_size}
        config = LlavaConfig(text_config=text, vision_config=vision, image_token_index=tokenizer.convert_tokens_to_ids("<image>"))
        return LlavaForConditionalGeneration(config)

    @classmethod
    def tiny_image_processor(cls, config: PretrainedConfig, image_size: int) -> CLIPImageProcessor:
        return CLIPImageProcessor(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size})
