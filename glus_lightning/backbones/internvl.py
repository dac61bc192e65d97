"""InternVL (Hugging Face layout, e.g. InternVL3-*-hf): one 448 px tile per frame, pixel shuffle, ChatML."""

from __future__ import annotations

from typing import Any

from torch import Tensor
from transformers import (
    GotOcr2ImageProcessor,
    InternVLConfig,
    InternVLForConditionalGeneration,
    PretrainedConfig,
    PreTrainedTokenizerBase,
)

from glus_lightning.config import ConfigError

from .base import MLLMBackbone, Past, image_inputs, pool_text
from .conversation import Conversations, Part, chatml
from .loading import tiny_section
from .tiny_tokenizer import TinyTokens

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # InternViT's normalisation
IMAGENET_STD = (0.229, 0.224, 0.225)


class InternVLBackbone(MLLMBackbone):
    family = "internvl"
    model_type = "internvl"
    model_class = InternVLForConditionalGeneration
    image_processor_class = GotOcr2ImageProcessor
    vision_module = "model.vision_tower"
    projector_module = "model.multi_modal_projector"
    tiny_tokens = TinyTokens(eos="<|im_end|>", pad="<|endoftext|>", extra=("<|im_start|>", "<img>", "</img>", "<IMG_CONTEXT>"))
    system_prompt = "你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合开发的多模态大语言模型。"
    format_text = "system\nuser\nassistant\n"

    @property
    def tokens_per_image(self) -> int:
        config = self.hf_model.config
        return int(self.image_size // config.vision_config.patch_size[0] * config.downsample_ratio) ** 2

    def _check_image_config(self) -> None:
        tower = self.hf_model.config.vision_config.image_size[0]
        if self.image_size != tower:
            raise ConfigError(f"backbone.image_size={self.image_size} but this InternVL vision tower takes {tower} px tiles")
        if self.image_token_pool != (1, 1):
            raise ConfigError(
                f"backbone.image_token_pool={pool_text(self.image_token_pool)}: InternVL pixel-shuffles its tokens itself; use 1x1"
            )

    def conversation(self, num_context: int, queries: list[str], answers: list[str]) -> list[Part]:
        ids = self.tokenizer.convert_tokens_to_ids
        image = [ids("<img>"), *[self.hf_model.config.image_token_id] * self.tokens_per_image, ids("</img>")]
        return chatml(self.system_prompt, image, "\n", self.context_parts(image, "\n", num_context), queries, answers)

    def image_features(self, pixels: Tensor) -> Tensor:
        config = self.hf_model.config
        return self.hf_model.model.get_image_features(
            pixel_values=pixels, vision_feature_layer=config.vision_feature_layer,
            vision_feature_select_strategy=config.vision_feature_select_strategy, return_dict=True,
        ).pooler_output

    def last_hidden_state(self, conversations: Conversations, features: Tensor, past: Past | None = None) -> Tensor:
        return self.hf_model.model(
            input_ids=conversations.input_ids,
            **image_inputs(features, features),
            **self.language_inputs(conversations, past),
        ).last_hidden_state

    @classmethod
    def tiny_model(
        cls, tokenizer: PreTrainedTokenizerBase, tiny: dict[str, Any], image_size: int
    ) -> InternVLForConditionalGeneration:
        text = {
            "model_type": "qwen2",
            **tiny_section(tiny, "text_config"),
            "vocab_size": len(tokenizer),
            "bos_token_id": None,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        }
        vision = {**tiny_section(tiny, "vision_config"), "image_size": image_size}
        config = InternVLConfig(
            text_config=text,
            vision_config=vision,
            image_token_id=tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>"),
            tie_word_embeddings=False,  # as InternVL3-8B
        )
        config.image_seq_length = int(image_size // config.vision_config.patch_size[0] * config.downsample_ratio) ** 2
        return InternVLForConditionalGeneration(config)

    @classmethod
    def tiny_image_processor(cls, config: PretrainedConfig, image_size: int) -> GotOcr2ImageProcessor:
        return GotOcr2ImageProcessor(
            size={"height": image_size, "width": image_size},
            crop_to_patches=False,
            image_mean=IMAGENET_MEAN,
            image_std=IMAGENET_STD,
        )
