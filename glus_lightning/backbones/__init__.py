"""Swappable MLLM backbones (LLaVA-1.5, Qwen2.5-VL, InternVL) behind one interface."""

from .base import BackboneOutput, MLLMBackbone
from .conversation import SEG_TOKEN, Conversations
from .internvl import InternVLBackbone
from .llava import LlavaBackbone
from .qwen2_5_vl import Qwen2_5_VLBackbone
from .registry import BACKBONES, build_backbone

__all__ = [
    "BACKBONES",
    "SEG_TOKEN",
    "BackboneOutput",
    "Conversations",
    "InternVLBackbone",
    "LlavaBackbone",
    "MLLMBackbone",
    "Qwen2_5_VLBackbone",
    "build_backbone",
]
