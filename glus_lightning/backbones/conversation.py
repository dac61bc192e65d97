"""Conversations as tokens: prompt templates, ``[SEG]`` answers, labels and padding, the same for every family."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch
from omegaconf import DictConfig
from torch import Tensor
from transformers import PreTrainedTokenizerBase

from glus_lightning.config import BackboneConfig, ConfigError

SEG_TOKEN = "[SEG]"
IGNORE_INDEX = -100


@dataclass(frozen=True)
class Answer:
    """Assistant text of a conversation: its tokens are the next-token targets."""

    text: str


Part = str | Answer | list[int]  # prompt text | answer text | literal token ids (BOS, image placeholders)
Row = tuple[list[int], list[int], list[int]]  # one conversation's token ids, labels and [SEG] positions


@dataclass
class Conversations:
    """E tokenised conversations, right-padded, with where their ``[SEG]`` tokens are."""

    input_ids: Tensor  # long [E, L]
    attention_mask: Tensor  # long [E, L]
    labels: Tensor  # long [E, L]: IGNORE_INDEX outside the labelled answer tokens
    seg_positions: Tensor  # long [E, Q]: index p with input_ids[e, p] == [SEG]; its hidden state is read at p - 1

    def to(self, device: torch.device | str) -> Conversations:
        return replace(self, **{f.name: getattr(self, f.name).to(device) for f in fields(self)})


def checked_templates(cfg: BackboneConfig | DictConfig) -> tuple[list[str], list[str]]:
    """The query and answer templates of ``cfg.prompt``, each query naming the expression and each answer one [SEG]."""
    queries, answers = list(cfg.prompt.query_templates), list(cfg.prompt.answer_templates)
    if not queries or not answers:
        raise ConfigError("backbone.prompt.query_templates and answer_templates must each hold at least one template")
    for template in queries:
        if "{expression}" not in template:
            raise ConfigError(f"backbone.prompt.query_templates: {template!r} has no {{expression}}")
    for template in answers:
        if template.count(SEG_TOKEN) != 1:
            raise ConfigError(f"backbone.prompt.answer_templates: {template!r} must hold {SEG_TOKEN} exactly once")
    return queries, answers


def pick(templates: list[str], training: bool) -> str:
    """Training draws a paraphrase from torch's (seeded) generator; evaluation takes the first."""
    if not training or len(templates) == 1:
        return templates[0]
    return templates[int(torch.randint(len(templates), ()))]


def tokenize(parts: list[Part], tokenizer: PreTrainedTokenizerBase, seg_token_id: int, ce_only_seg: bool) -> Row:
    """Token ids, labels and the [SEG] positions, recorded while the answers are appended."""
    ids: list[int] = []
    labels: list[int] = []
    seg: list[int] = []
    for part in parts:
        if isinstance(part, list):
            piece, targets = part, [IGNORE_INDEX] * len(part)
        elif isinstance(part, Answer):
            piece = _encode_text(tokenizer, part.text)
            seg += [len(ids) + j for j, token in enumerate(piece) if token == seg_token_id]
            targets = [t if t == seg_token_id or not ce_only_seg else IGNORE_INDEX for t in piece]
        else:
            piece = _encode_text(tokenizer, part)
            if seg_token_id in piece:
                raise ValueError(f"prompt text {part!r} contains {SEG_TOKEN}; only answers may (check the expression)")
            targets = [IGNORE_INDEX] * len(piece)
        ids += piece
        labels += targets
    return ids, labels, seg


def padded(rows: list[Row], tokenizer: PreTrainedTokenizerBase) -> Conversations:
    """The conversations right-padded into one batch (pad token, else EOS; padding unattended and unlabelled)."""
    length = max(len(ids) for ids, _, _ in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    input_ids = torch.full((len(rows), length), pad, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
    labels = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long)
    for e, (ids, row_labels, _) in enumerate(rows):
        input_ids[e, : len(ids)] = torch.tensor(ids)
        attention_mask[e, : len(ids)] = 1
        labels[e, : len(ids)] = torch.tensor(row_labels)
    seg_positions = torch.tensor([seg for _, _, seg in rows], dtype=torch.long)
    return Conversations(input_ids, attention_mask, labels, seg_positions)


def chatml(
    system: str, image: list[int], image_sep: str, num_context: int, instruction: str, queries: list[str], answers: list[str]
) -> list[Part]:
    """A ChatML conversation (Qwen2.5-VL, InternVL): context images + instruction open the first user turn."""
    parts: list[Part] = [f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n"]
    if num_context:
        parts += [image, image_sep] * num_context + [f"{instruction}\n"]
    for j, (query, answer) in enumerate(zip(queries, answers)):
        if j:
            parts.append("\n<|im_start|>user\n")
        parts += [image, image_sep, f"{query}<|im_end|>\n<|im_start|>assistant\n", Answer(f"{answer}<|im_end|>")]
    return parts


def _encode_text(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False).input_ids
