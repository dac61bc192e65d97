"""The swappable MLLM backbone, one class for every family: E conversations in, answer CE and ``[SEG]`` states out."""

from __future__ import annotations

import re
import tempfile
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import Tensor, nn
from transformers import AutoTokenizer, PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase
from transformers.cache_utils import DynamicCache, DynamicLayer
from transformers.modeling_outputs import BaseModelOutputWithPooling

from glus_lightning.config import BackboneConfig, ConfigError, PromptConfig
from glus_lightning.precision import torch_dtype

from .adapters import base_model, merged_state_dict
from .conversation import IGNORE_INDEX, SEG_TOKEN, Conversations, Part, context_parts, padded, tokenize
from .image_resize import check_image_resize, tower_input
from .loading import (
    add_token,
    checkpoint_config,
    plain,
    quantization_config,
    quantized_device_map,
    tiny_section,
    trainable,
)
from .prompt import Prompt
from .tiny_tokenizer import TinyTokens, build_tiny_tokenizer
from .token_rows import with_full_rows

if TYPE_CHECKING:
    from peft import PeftModel


@dataclass
class BackboneOutput:
    lm_loss: Tensor | None  # scalar next-token CE over the labelled answer tokens (None: not asked for)
    seg_hidden: Tensor  # [E, Q, D] last-layer hidden state at the position that predicts each [SEG]


@dataclass
class Past:
    """The language model's key/value cache that a forward continues (and appends to)."""

    cache: DynamicCache
    length: int  # tokens already in the cache
    next_position: int  # rope position of the next token (not ``length`` under Qwen's 3-D rope)


@dataclass
class PrefixCache:
    """Keys and values of a video's shared conversation prefix (system prompt, context images, instruction).

    Every window of a video starts its E conversations with the same prefix, so it is encoded once per video
    (batch 1) and each window's query turns attend to it instead of recomputing it.
    """

    ids: list[int]  # the prefix tokens
    layers: list[tuple[Tensor, Tensor]]  # per layer: keys, values [1, heads, P, head_dim]
    next_position: int

    def past(self, batch: int) -> Past:
        """A cache for one forward of ``batch`` conversations that continue the prefix; the stored prefix is untouched.

        Its layers hold the prefix expanded over the batch (a view, not copies) and never grow: each layer's attention
        gets the prefix joined with the new tokens' keys and values, which are dropped after it. A ``DynamicCache``
        would copy the prefix once per conversation and keep every layer's joined keys and values to the end of the
        forward: for 10 expressions at LLaVA-7B's shapes (32 layers, no grouped KV heads, a 650-token prefix and a
        4-frame window) 7 GiB instead of one layer's 0.2 GiB.
        """
        cache = DynamicCache()
        cache.layers = [_PrefixLayer(k.expand(batch, -1, -1, -1), v.expand(batch, -1, -1, -1)) for k, v in self.layers]
        return Past(cache, len(self.ids), self.next_position)


class _PrefixLayer(DynamicLayer):
    """A cache layer holding a shared prefix that a forward reads without appending to it (see ``PrefixCache.past``)."""

    def __init__(self, keys: Tensor, values: Tensor) -> None:
        super().__init__()
        self.lazy_initialization(keys, values)
        self.keys, self.values = keys, values

    def update(self, key_states: Tensor, value_states: Tensor, *args: Any, **kwargs: Any) -> tuple[Tensor, Tensor]:
        return torch.cat([self.keys, key_states], dim=-2), torch.cat([self.values, value_states], dim=-2)


class MLLMBackbone(nn.Module, ABC):
    """Base of the family backbones; build one with ``build_backbone(cfg, prompt)``.

    One conversation per expression: the C context frames and the context instruction, then one user
    turn per query frame (its image and a query naming the expression), each answered by a sentence
    holding ``[SEG]``; answers are teacher-forced. A family subclass only says how its chat format
    looks, how its images become placeholder tokens and how its Hugging Face model is called; the forward,
    the prefix cache and the loss live here once, loading in ``loading``, tokenisation in ``conversation``.
    """

    family: ClassVar[str]
    model_type: ClassVar[str]  # config.json "model_type" of the family's Hugging Face checkpoints
    model_class: ClassVar[type[PreTrainedModel]]
    image_processor_class: ClassVar[type]
    vision_module: ClassVar[str]  # submodule names inside the Hugging Face model
    projector_module: ClassVar[str]
    language_model_module: ClassVar[str] = "model.language_model"
    tiny_tokens: ClassVar[TinyTokens]
    system_prompt: ClassVar[str]
    format_text: ClassVar[str]  # the chat format's own words, for the tiny tokenizer's corpus

    hidden_size: int

    def __init__(
        self, cfg: BackboneConfig | DictConfig, prompt: PromptConfig | DictConfig, load_device: torch.device | None = None
    ) -> None:
        """``prompt``: the conversation's wording (the ``prompt`` config group). ``load_device``: where 4-bit weights
        are loaded and quantised (this rank's device, see ``quantized_device_map``)."""
        super().__init__()
        self.image_size: int = cfg.image_size
        self.image_token_pool: tuple[int, int] = _token_pool(cfg.image_token_pool)
        self.image_resize: str = check_image_resize(cfg.image_resize)
        self.prompt = Prompt.from_config(prompt)
        self.quantized: bool = cfg.quantization.load_in_4bit
        if cfg.path is None:
            with tempfile.TemporaryDirectory(prefix=f"glus_tiny_{self.family}_") as tmp:
                self.write_tiny_checkpoint(cfg, prompt, tmp)
                self._load(Path(tmp), cfg, load_device)
        else:
            self._check_checkpoint(Path(cfg.path))
            self._load(Path(cfg.path), cfg, load_device)
        self._check_image_config()

    # ---- family hooks -------------------------------------------------------------------------

    @property
    @abstractmethod
    def tokens_per_image(self) -> int:
        """How many placeholder tokens one frame's features fill."""

    @abstractmethod
    def conversation(self, num_context: int, queries: list[str], answers: list[str]) -> list[Part]:
        """One conversation in the family's chat format (one answer per query), opened by ``self.context_parts``."""

    @abstractmethod
    def image_features(self, pixels: Tensor) -> Tensor:
        """[N, tokens_per_image, D]: the vision tower and projector on ``pixels`` [N, 3, s, s] (``pixel_values``), the
        embeddings that fill each image's placeholder tokens."""

    @abstractmethod
    def last_hidden_state(self, conversations: Conversations, features: Tensor, past: Past | None = None) -> Tensor:
        """[E, L, D] last-layer hidden states; ``features`` [N, tokens_per_image, D] (``image_features``) of the N images
        in placeholder order.

        With ``past`` the tokens continue its cache (their attention mask covers only themselves; see
        ``language_inputs``) and are appended to it; without, a plain forward that caches nothing.
        """

    def next_position(self, conversations: Conversations, num_images: int) -> int:
        """Rope position after a one-row conversation; families with their own position scheme override it."""
        return conversations.input_ids.shape[1]

    @classmethod
    @abstractmethod
    def tiny_model(cls, tokenizer: PreTrainedTokenizerBase, tiny: dict[str, Any], image_size: int) -> PreTrainedModel:
        """A random-init model of the family with the sizes in ``tiny`` and ``tokenizer``'s tokens."""

    @classmethod
    @abstractmethod
    def tiny_image_processor(cls, config: PretrainedConfig, image_size: int) -> Any:
        """The family's image processor for the tiny model (mean, std and patching facts)."""

    def _check_image_config(self) -> None:
        """Raise ConfigError when image_size / image_token_pool do not fit the vision tower."""
        if self.image_token_pool != (1, 1):
            raise ConfigError(f"backbone.image_token_pool={pool_text(self.image_token_pool)}: {self.family} forms its own image tokens; use 1x1")

    def _check_checkpoint_config(self, config: dict[str, Any], path: Path) -> None:
        """Raise ConfigError for a checkpoint of the right model_type in a layout that cannot load."""

    def unused_vision_parameters(self, hf: PreTrainedModel) -> list[nn.Parameter]:
        """Vision-tower parameters the forward never reaches (the family reads an earlier layer)."""
        return []

    # ---- building -----------------------------------------------------------------------------

    @classmethod
    def write_tiny_checkpoint(cls, cfg: BackboneConfig | DictConfig, prompt: PromptConfig | DictConfig, path: str | Path) -> None:
        """Write a tiny random-init checkpoint (model, tokenizer, image processor) to ``path``; its tokenizer learns
        the words of ``prompt``."""
        tiny = plain(cfg.tiny)
        texts = [cls.system_prompt, cls.format_text, *Prompt.from_config(prompt).texts()]
        tokenizer = build_tiny_tokenizer(cls.tiny_tokens, texts, tiny_section(tiny, "vocab_size"))
        model = cls.tiny_model(tokenizer, tiny, cfg.image_size)
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
        cls.tiny_image_processor(model.config, cfg.image_size).save_pretrained(path)

    def _check_checkpoint(self, path: Path) -> None:
        self._check_checkpoint_config(checkpoint_config(path, self.family, self.model_type), path)

    def _load(self, path: Path, cfg: BackboneConfig | DictConfig, load_device: torch.device | None) -> None:
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.image_processor = self.image_processor_class.from_pretrained(path)
        only_the_lm = [self.vision_module, self.projector_module, "lm_head"]  # the modules 4-bit loading leaves alone
        quantization = quantization_config(cfg.quantization, only_the_lm) if self.quantized else None
        device_map = quantized_device_map(load_device) if self.quantized else None
        hf = self.model_class.from_pretrained(
            path, dtype=torch_dtype(cfg.dtype, "backbone.dtype"), quantization_config=quantization, device_map=device_map
        )
        self.seg_token_id: int = add_token(self.tokenizer, hf, SEG_TOKEN)
        self.hidden_size = hf.config.get_text_config().hidden_size
        self.model: PreTrainedModel | PeftModel = trainable(
            hf,
            cfg,
            language_model=self.language_model_module,
            vision_module=self.vision_module,
            projector_module=self.projector_module,
            unused_vision=self.unused_vision_parameters(hf),
            added_rows=[self.seg_token_id],
        )

    @property
    def hf_model(self) -> PreTrainedModel:
        """The Hugging Face model (LoRA layers injected in place when enabled)."""
        return base_model(self.model)

    # ---- conversations ------------------------------------------------------------------------

    def build_inputs(self, expressions: list[str], num_context: int, num_query: int, ce_only_seg: bool) -> Conversations:
        """Tokenise one conversation per expression (on the CPU) and pad them into a batch."""
        rows = []
        for expression in expressions:
            queries = [self.prompt.query(expression, self.training) for _ in range(num_query)]
            answers = [self.prompt.answer(self.training) for _ in range(num_query)]
            parts = self.conversation(num_context, queries, answers)
            ids, labels, seg = self._tokenize(parts, ce_only_seg)
            if len(seg) != num_query:
                raise ValueError(f"expression {expression!r}: {len(seg)} {SEG_TOKEN} tokens in the answers, expected {num_query}")
            rows.append((ids, labels, seg))
        return padded(rows, self.tokenizer)

    def context_parts(self, image: list[int], image_sep: str, num_context: int) -> list[Part]:
        """The context images and the prompt's instruction, laid out as ``prompt.join_context_images`` says."""
        return context_parts(image, image_sep, num_context, self.prompt.context_instruction, self.prompt.join_context_images)

    def _tokenize(self, parts: list[Part], ce_only_seg: bool) -> tuple[list[int], list[int], list[int]]:
        return tokenize(parts, self.tokenizer, self.seg_token_id, ce_only_seg)

    # ---- forward ------------------------------------------------------------------------------

    def pixel_values(self, frames: Tensor, original_sizes: list[tuple[int, int]] | None = None) -> Tensor:
        """uint8 [N, 3, S, S] -> the vision tower's normalised input [N, 3, image_size, image_size], the whole frame or
        its original centre square (``backbone.image_resize``, see ``image_resize``; ``original_sizes``: each frame's
        (H, W) before the loader squashed it)."""
        x = tower_input(frames, self.image_size, self.image_resize, original_sizes)
        mean = x.new_tensor(self.image_processor.image_mean).view(1, -1, 1, 1)
        std = x.new_tensor(self.image_processor.image_std).view(1, -1, 1, 1)
        vision_dtype = next(self.hf_model.get_submodule(self.vision_module).parameters()).dtype
        return ((x - mean) / std).to(vision_dtype)

    def encode(
        self,
        context: Tensor,
        query: Tensor,
        expressions: list[str],
        ce_only_seg: bool,
        prefix: PrefixCache | None = None,
        sizes: list[tuple[int, int]] | None = None,
        rows: Tensor | None = None,
        with_loss: bool = True,
    ) -> BackboneOutput:
        """One conversation per expression over frame sets: context uint8 [B, C, 3, S, S], query uint8 [B, Q, 3, S, S].

        ``rows`` [E]: the frame set of each conversation (default: set e for conversation e, B = E); a context of one set
        serves every conversation. Each frame goes through the vision tower once however many conversations show it
        (a video's expressions share its frames). ``prefix`` (from ``encode_prefix`` of the same context frames) skips
        recomputing the shared prefix: only the query turns run, attending to its cache; outputs are the same as
        without it. ``sizes``: each query set's original (H, W), needed by ``backbone.image_resize=center_crop``.
        ``with_loss=False`` skips the LM loss (inference has no use for it): ``lm_loss`` is then None.
        """
        if rows is None:
            if query.shape[0] != len(expressions):
                raise ValueError(f"query has {query.shape[0]} frame sets for {len(expressions)} expressions: pass rows, or one set each")
            rows = torch.arange(len(expressions), device=query.device)
        _check_frames(context, query, expressions, rows)
        conversations = self.build_inputs(expressions, context.shape[1], query.shape[1], ce_only_seg).to(query.device)
        if prefix is None:
            if len(context) == len(query):  # one tower call for both
                features = self._frame_features(torch.cat([context, query], dim=1), sizes)[rows]
            else:
                context_features = self._frame_features(context, None if sizes is None else sizes[:1])
                features = torch.cat([context_features.expand(len(rows), -1, -1, -1), self._frame_features(query, sizes)[rows]], 1)
            hidden = self.last_hidden_state(conversations, features.flatten(0, 1))
        else:
            conversations = _after_prefix(conversations, prefix.ids)
            features = self._frame_features(query, sizes)[rows]
            hidden = self.last_hidden_state(conversations, features.flatten(0, 1), prefix.past(len(expressions)))
        index = torch.arange(len(expressions), device=hidden.device)[:, None]
        return BackboneOutput(
            lm_loss=self._lm_loss(hidden, conversations.labels) if with_loss else None,
            seg_hidden=hidden[index, conversations.seg_positions - 1],
        )

    def _frame_features(self, frames: Tensor, sizes: list[tuple[int, int]] | None) -> Tensor:
        """[B, N, tokens_per_image, D] image features of frame sets [B, N, 3, S, S] (``sizes``: each set's original size)."""
        if frames.shape[:2].numel() == 0:  # no frames (``data.num_context=0``): the tower is not called on an empty batch
            dtype = self.hf_model.get_input_embeddings().weight.dtype
            return frames.new_zeros((*frames.shape[:2], self.tokens_per_image, self.hidden_size), dtype=dtype)
        features = self.image_features(self.pixel_values(frames.flatten(0, 1), _per_frame(sizes, frames)))
        return features.unflatten(0, frames.shape[:2])

    def encode_prefix(self, context: Tensor, size: tuple[int, int] | None = None) -> PrefixCache:
        """The cache of the conversation prefix shared by every expression and window over ``context`` uint8 [C, 3, S, S]
        (``size``: the video's original (H, W), needed by ``backbone.image_resize=center_crop``)."""
        if context.dtype != torch.uint8 or context.dim() != 4 or context.shape[1] != 3:
            raise ValueError(f"context frames must be uint8 [C, 3, S, S], got {context.dtype} {tuple(context.shape)}")
        ids, _, _ = self._tokenize(self.conversation(context.shape[0], [], []), ce_only_seg=True)
        input_ids = torch.tensor([ids], device=context.device)
        conversations = Conversations(
            input_ids, torch.ones_like(input_ids), torch.full_like(input_ids, IGNORE_INDEX), input_ids.new_zeros(1, 0)
        )
        past = Past(DynamicCache(), 0, 0)
        features = self._frame_features(context[None], None if size is None else [size])[0]
        self.last_hidden_state(conversations, features, past)
        layers = [(layer.keys, layer.values) for layer in past.cache.layers]
        return PrefixCache(ids, layers, self.next_position(conversations, context.shape[0]))

    def language_inputs(self, conversations: Conversations, past: Past | None) -> dict[str, Any]:
        """Attention mask and cache arguments of the Hugging Face forward (the mask spans the cached tokens too)."""
        if past is None:
            return {"attention_mask": conversations.attention_mask, "use_cache": False}
        mask = conversations.attention_mask
        return {
            "attention_mask": torch.cat([mask.new_ones(mask.shape[0], past.length), mask], dim=1),
            "cache": past.cache,
            "use_cache": True,
        }

    def _lm_loss(self, hidden: Tensor, labels: Tensor) -> Tensor:
        """Next-token CE with logits computed only where a target is labelled (the vocabulary is large)."""
        rows, cols = (labels != IGNORE_INDEX).nonzero(as_tuple=True)
        logits = self.hf_model.get_output_embeddings()(hidden[rows, cols - 1])
        return F.cross_entropy(logits.float(), labels[rows, cols])

    # ---- saving -------------------------------------------------------------------------------

    def save_pretrained(self, path: str | Path) -> None:
        """A Hugging Face checkpoint (LoRA merged) + tokenizer with [SEG] + image processor, so that
        ``build_backbone`` with ``path`` set rebuilds a backbone computing the same outputs."""
        if self.quantized:
            raise ValueError(
                "save_pretrained merges LoRA into the base weights, which 4-bit weights cannot hold; "
                "load the trained state into a backbone built with quantization.load_in_4bit=false and save that"
            )
        hf = self.hf_model
        hf.save_pretrained(path, state_dict=with_full_rows(merged_state_dict(hf), hf))
        self.tokenizer.save_pretrained(path)
        self.image_processor.save_pretrained(path)


def image_inputs(features: Tensor, pooled: Tensor | list[Tensor], **extra: Any) -> dict[str, Any]:
    """The Hugging Face forward's image arguments: precomputed ``features`` as ``mm_encoder_outputs`` (``pooled`` in the
    family's form) and ``extra``; none when there are no images (a conversation without context frames)."""
    if len(features) == 0:
        return {}
    return {"mm_encoder_outputs": {"image": BaseModelOutputWithPooling(pooler_output=pooled)}, **extra}


def _after_prefix(conversations: Conversations, prefix_ids: list[int]) -> Conversations:
    """The part of each conversation after the shared prefix (which must be where the conversations start)."""
    p = len(prefix_ids)
    expected = conversations.input_ids.new_tensor(prefix_ids)
    if conversations.input_ids.shape[1] <= p or not (conversations.input_ids[:, :p] == expected).all():
        raise ValueError("the conversations do not start with the cached prefix: encode_prefix must use the same context frames count")
    return Conversations(
        conversations.input_ids[:, p:], conversations.attention_mask[:, p:], conversations.labels[:, p:],
        conversations.seg_positions - p,
    )


def _token_pool(value: str) -> tuple[int, int]:
    """``"<rows>x<cols>"`` as ``(rows, cols)``."""
    match = re.fullmatch(r"([1-9][0-9]*)x([1-9][0-9]*)", str(value))
    if match is None:
        raise ConfigError(
            f"backbone.image_token_pool={value!r}: write <rows>x<cols>, the patches averaged into one token, each >= 1 "
            "(1x1: no pooling; 2x2: squares; 1x4: the GLUS reference's strips of 4 along a row)"
        )
    return int(match[1]), int(match[2])


def pool_text(pool: tuple[int, int]) -> str:
    return f"{pool[0]}x{pool[1]}"


def _per_frame(sizes: list[tuple[int, int]] | None, frames: Tensor) -> list[tuple[int, int]] | None:
    """Each frame set's original size repeated for its frames (``frames`` [B, N, ...], flattened set-major)."""
    if sizes is None:
        return None
    if len(sizes) != frames.shape[0]:
        raise ValueError(f"{len(sizes)} original sizes for {frames.shape[0]} frame sets")
    return [tuple(size) for size in sizes for _ in range(frames.shape[1])]


def _check_frames(context: Tensor, query: Tensor, expressions: list[str], rows: Tensor) -> None:
    for name, frames in (("context", context), ("query", query)):
        if frames.dtype != torch.uint8 or frames.dim() != 5 or frames.shape[2] != 3:
            raise ValueError(f"{name} frames must be uint8 [B, N, 3, S, S], got {frames.dtype} {tuple(frames.shape)}")
    if not expressions or rows.shape != (len(expressions),):
        raise ValueError(f"{len(expressions)} expressions but {tuple(rows.shape)} frame-set rows: one row per expression, E >= 1")
    if context.shape[0] not in (1, query.shape[0]):
        raise ValueError(f"context has {context.shape[0]} frame sets, query {query.shape[0]}: the same number, or one context for all")
    if query.shape[1] < 1:
        raise ValueError("query frames: at least one per conversation (each is answered with [SEG])")
    if context.shape[-2:] != query.shape[-2:]:
        raise ValueError(f"context frames are {tuple(context.shape[-2:])} but query frames {tuple(query.shape[-2:])}")
