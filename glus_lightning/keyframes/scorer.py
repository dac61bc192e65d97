"""The keyframe scorer: how well the model segments a frame when it starts there with an empty memory."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class FrameScorer(nn.Module):
    """Predicts, per (expression, frame), the IoU of the model's memoryless mask (a keyframe's mask).

    Inputs are what the model already computed for that frame: the projected ``[SEG]`` prompt (the MLLM's
    reading of the expression in this frame, with the video's context), and SAM2's own predicted IoU and
    object-presence probability of the memoryless mask. SAM2's two heads alone are trained on whatever
    frames the segmenter sees; the scorer is fitted to the IoU the whole model measurably reaches
    (``glus refine-scores``), so it learns where the model can be trusted. Trained only by self-refinement:
    its parameters are frozen during the main training and saved with every checkpoint.
    """

    def __init__(self, prompt_dim: int, hidden: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(prompt_dim + 2, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, 1))
        self.register_buffer("refined", torch.tensor(False))  # set once fitted; keyframe inference needs it

    @staticmethod
    def inputs(prompts: Tensor, iou_pred: Tensor, object_logits: Tensor) -> Tensor:
        """``[..., prompt_dim + 2]`` features from prompts ``[..., P]`` and SAM2's IoU / object-score logits ``[...]``."""
        return torch.cat([F.normalize(prompts.float(), dim=-1), iou_pred.float()[..., None],
                          object_logits.float().sigmoid()[..., None]], dim=-1)

    def forward(self, inputs: Tensor) -> Tensor:
        """Predicted IoU in [0, 1], shape ``inputs.shape[:-1]``."""
        return self.net(inputs).squeeze(-1).sigmoid()
