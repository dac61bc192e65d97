"""Conversations as tokens: ``[SEG]`` answers, labels and padding, the same for every family."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch
from torch import Tensor
from transformers import PreTrainedTokenizerBase

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


def context_parts(image: list[int], image_sep: str, num_context: int, instruction: str, joined: bool) -> list[Part]:
    """The context images and the instruction that open the first user turn.

    ``joined`` (``prompt.join_context_images``): the images back to back, then "\n" + instruction + "\n" as one text,
    as the GLUS reference writes ``"<image>" * 4 + "\n" + instruction + "\n"``; else each image followed by the
    family's separator, then the instruction.
    """
    if not num_context:
        return []
    if joined:
        return [*[image] * num_context, f"\n{instruction}\n"]
    return [*[image, image_sep] * num_context, f"{instruction}\n"]


def chatml(system: str, image: list[int], image_sep: str, context: list[Part], queries: list[str], answers: list[str]) -> list[Part]:
    """A ChatML conversation (Qwen2.5-VL, InternVL): ``context`` (``context_parts``) opens the first user turn."""
    parts: list[Part] = [f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n", *context]
    for j, (query, answer) in enumerate(zip(queries, answers)):
        if j:
            parts.append("\n<|im_start|>user\n")
        parts += [image, image_sep, f"{query}<|im_end|>\n<|im_start|>assistant\n", Answer(f"{answer}<|im_end|>")]
    return parts


def _encode_text(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False).input_ids
