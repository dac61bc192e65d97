"""A small byte-level BPE tokenizer built in code, so tiny backbones need no download.

It is trained deterministically on a built-in list of English words (the vocabulary of the
synthetic RefVOS data and the prompts) plus the texts a backbone will actually write (its chat
format and prompt templates), then wrapped as a ``PreTrainedTokenizerFast`` carrying the family's
special and image tokens, so it saves and reloads like any Hugging Face tokenizer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

WORDS = """
the a an on in of at to from with by and or but not no which that who whose is are was be being it its
first then next last before after while when until again once finally later
red green blue yellow purple orange white black cyan magenta pink brown gray grey dark light bright
circle square triangle rectangle shape shapes object objects circles squares triangles rectangles thing things
left right top bottom middle center centre upper lower side corner edge near far close closest farthest
moving moves move moved up down still static stops stop stopping stopped stationary standing fast slow slowly quickly
big small large tiny larger smaller biggest smallest one two three four both all each other another only
segment frame frames context video these this those can you sure here is there are it please
turns turning around towards away across along back forth bounces bouncing jumps rolls rolling
"""


@dataclass(frozen=True)
class TinyTokens:
    """The special tokens of one family's tokenizer (names as in its real checkpoints)."""

    eos: str
    pad: str
    extra: tuple[str, ...]  # image / chat tokens, never split
    bos: str | None = None
    unk: str | None = None
    add_prefix_space: bool = False  # True mimics SentencePiece's leading "▁" (LLaMA)

    @property
    def specials(self) -> list[str]:
        named = [t for t in (self.unk, self.bos, self.eos, self.pad) if t is not None]
        return list(dict.fromkeys([*named, *self.extra]))


def build_tiny_tokenizer(tokens: TinyTokens, texts: Sequence[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on WORDS + ``texts``; the same inputs always give the same tokenizer."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=tokens.add_prefix_space)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=tokens.specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus = [" " + " ".join(WORDS.split()), *texts]  # every word after a space, as inside a sentence
    bpe.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token=tokens.bos,
        eos_token=tokens.eos,
        unk_token=tokens.unk,
        pad_token=tokens.pad,
        extra_special_tokens=list(tokens.extra),
    )
