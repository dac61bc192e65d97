"""The prompt config as the backbones use it: wording checked once, the expression prepared, paraphrases picked.

The wording is its own config group (``conf/prompt/``), shared by every backbone family: ``prompt=default`` is this
project's, ``prompt=glus_reference`` the GLUS reference's (what its released weights were trained with).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from omegaconf import DictConfig

from glus_lightning.config import ConfigError, PromptConfig

from .conversation import SEG_TOKEN

EXPRESSION = "{expression}"


@dataclass(frozen=True)
class Prompt:
    context_instruction: str
    query_templates: tuple[str, ...]
    answer_templates: tuple[str, ...]
    join_context_images: bool  # context images back to back, then "\n" + instruction (the reference's layout)
    strip_period: bool
    lowercase_expression: bool

    @classmethod
    def from_config(cls, cfg: PromptConfig | DictConfig) -> Prompt:
        """``cfg`` checked: every query names the expression, every answer holds one [SEG], the rest holds none."""
        queries, answers = tuple(cfg.query_templates), tuple(cfg.answer_templates)
        if not queries or not answers:
            raise ConfigError("prompt.query_templates and prompt.answer_templates must each hold at least one template")
        for template in queries:
            if EXPRESSION not in template or SEG_TOKEN in template:
                raise ConfigError(f"prompt.query_templates: {template!r} must hold {EXPRESSION} and no {SEG_TOKEN}")
        for template in answers:
            if template.count(SEG_TOKEN) != 1:
                raise ConfigError(f"prompt.answer_templates: {template!r} must hold {SEG_TOKEN} exactly once")
        if SEG_TOKEN in cfg.context_instruction:
            raise ConfigError(f"prompt.context_instruction={cfg.context_instruction!r} must not hold {SEG_TOKEN}")
        return cls(
            cfg.context_instruction, queries, answers, cfg.join_context_images, cfg.strip_period, cfg.lowercase_expression
        )

    def expression(self, text: str) -> str:
        """The expression as the query names it: as the reference prepares it, where the options say so."""
        if self.strip_period:
            text = text.removesuffix(".").strip()  # one period only, as the reference
        return text.lower() if self.lowercase_expression else text

    def query(self, expression: str, training: bool) -> str:
        return pick(self.query_templates, training).replace(EXPRESSION, self.expression(expression))

    def answer(self, training: bool) -> str:
        return pick(self.answer_templates, training)

    def texts(self) -> list[str]:
        """Every fixed word of the prompt (the tiny tokenizer learns its merges from them)."""
        return [
            self.context_instruction,
            *(t.replace(EXPRESSION, "") for t in self.query_templates),
            *(t.replace(SEG_TOKEN, "") for t in self.answer_templates),
        ]


def pick(templates: tuple[str, ...], training: bool) -> str:
    """Training draws a paraphrase from torch's (seeded) generator; evaluation takes the first."""
    if not training or len(templates) == 1:
        return templates[0]
    return templates[int(torch.randint(len(templates), ()))]
