"""Does the model's text reach the masks? Two numbers per checkpoint, on the first validation videos:

- prompt cosine: the mean cosine similarity between the ``[SEG]`` prompts of different expressions of one video at
  the same frame (1.0: every sentence gives the same prompt, so the masks cannot depend on it), and the sizes that
  matter to SAM2: the prompts' norm, the distance between two expressions' prompts, and the norm of SAM2's own
  output tokens, which the prompt joins in the mask decoder (``oracle_prompt.py --token-scale``: a prompt much
  smaller than those tokens is not learnt from);
- decoder sensitivity: the mean absolute change of the mask logits when each prompt is moved by ``--shift`` of its
  norm in a random direction, relative to the mean absolute logit (0: the mask decoder ignores its prompt), and the
  IoU of the moved masks with the unmoved ones.

    python experiments/prompt_sensitivity.py ckpt_path=runs/demo/version_0/checkpoints/last.ckpt [key=value ...]
    python experiments/prompt_sensitivity.py [key=value ...]       # no ckpt_path: the model at initialisation
"""

from __future__ import annotations

import argparse
from itertools import islice
from statistics import fmean

import torch
import torch.nn.functional as F

from datamodules.datamodule import RefVOSDataModule
from glus_lightning.config import compose
from glus_lightning.inference.predictor import load_module
from glus_lightning.precision import compute_precision


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--videos", type=int, default=8)
    parser.add_argument("--shift", type=float, default=1.0, help="prompt change, as a fraction of its norm")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args()
    cfg = compose(args.overrides)
    module = load_module(cfg)
    generator = torch.Generator().manual_seed(0)
    cosines, norms, distances, changes, sizes, ious = [], [], [], [], [], []
    with compute_precision(cfg.trainer.precision, module.device):  # as the Trainer computes
        for batch in islice(RefVOSDataModule(cfg.data).val_dataloader(), args.videos):
            _, prompts = next(module._window_prompts(batch))  # the first window: [E, w, P]
            first = prompts[:, 0].float()
            e = len(first)
            if e > 1:
                similarity = F.normalize(first, dim=-1) @ F.normalize(first, dim=-1).T
                cosines.append(float(similarity[~torch.eye(e, dtype=torch.bool)].mean()))
                distances.append(float(torch.cdist(first, first)[~torch.eye(e, dtype=torch.bool)].mean()))
            norms.append(float(first.norm(dim=-1).mean()))
            features = module.segmenter.encode_frames(batch.query_frames[0][:1])[torch.zeros(e, dtype=torch.long)]
            direction = F.normalize(torch.randn(first.shape, generator=generator), dim=-1)
            moved = first + args.shift * first.norm(dim=-1, keepdim=True) * direction
            before, after = (module.segmenter.segment_without_memory(features, p).mask_logits[:, 0].float() for p in (first, moved))
            changes.append(float((after - before).abs().mean()))
            sizes.append(float(before.abs().mean()))
            union = ((before > 0) | (after > 0)).sum()
            ious.append(float(((before > 0) & (after > 0)).sum() / union) if union else 1.0)
    token_norm = module.segmenter.sam.sam_mask_decoder.mask_tokens.weight.float().norm(dim=-1).mean()
    print(f"prompt cosine between a video's expressions: {fmean(cosines):.5f}")
    print(f"prompt norm {fmean(norms):.3f}, distance between a video's expressions {fmean(distances):.3f} "
          f"(SAM2's mask tokens: norm {float(token_norm):.3f})")
    print(f"decoder sensitivity (prompt moved by {args.shift:.0%} of its norm): mask logits change "
          f"{fmean(changes):.5f} of {fmean(sizes):.5f} ({fmean(changes) / fmean(sizes):.2%}), mask IoU {fmean(ious):.3f}")


if __name__ == "__main__":
    main()
