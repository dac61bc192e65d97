"""What cuts a training step's memory on the backbone side, checked to change nothing else.

``backbone.train_token_rows=added`` (only [SEG]'s rows of the embeddings and LM head train), checked against the
whole-matrix model built with the same seed: the same outputs, and gradients of the trained rows equal to those rows
of the whole matrices' gradients. A frozen vision tower keeps no graph (its activations are not saved for backward).
"""

from __future__ import annotations

import pytest
import torch
from test_backbones import EXPRESSIONS, FAMILIES, PROMPT, clip, randomize_lora, tiny_cfg

from glus_lightning.backbones import build_backbone
from glus_lightning.backbones.token_rows import RowTrainedEmbedding, RowTrainedHead
from glus_lightning.config import ConfigError


def pair(family: str):
    torch.manual_seed(0)
    whole = build_backbone(tiny_cfg(family), PROMPT).train()
    torch.manual_seed(0)
    rows = build_backbone(tiny_cfg(family, "train_token_rows=added"), PROMPT).train()
    return whole, rows


def grads(bb, context, query):
    torch.manual_seed(1)  # the same paraphrases in both models
    out = bb.encode(context, query, EXPRESSIONS, ce_only_seg=False)
    (out.lm_loss + out.seg_hidden.square().mean()).backward()
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_added_rows_compute_and_learn_as_those_rows_of_the_whole_matrices(family):
    whole, rows = pair(family)
    for bb in (whole, rows):
        with torch.no_grad():
            randomize_lora(bb)
    rows.load_state_dict(whole.state_dict(), strict=False)  # identical LoRA (randomised after build)
    seg = whole.seg_token_id
    emb, head = rows.hf_model.get_input_embeddings(), rows.hf_model.get_output_embeddings()
    assert isinstance(emb, RowTrainedEmbedding) and isinstance(head, RowTrainedHead)
    assert not emb.weight.requires_grad and not head.weight.requires_grad
    assert emb.trained.shape == (1, whole.hidden_size) and emb.trained.dtype == torch.float32
    trainable = {n for n, p in rows.hf_model.named_parameters() if p.requires_grad and "lora_" not in n}
    whole_trainable = {n for n, p in whole.hf_model.named_parameters() if p.requires_grad and "lora_" not in n}
    assert trainable == {n.replace(".weight", ".trained") if n.endswith(("embed_tokens.weight", "lm_head.weight")) else n
                         for n in whole_trainable}

    context, query = clip(whole)
    a, b = grads(whole, context, query), grads(rows, context, query)
    torch.testing.assert_close(b.lm_loss, a.lm_loss)
    torch.testing.assert_close(b.seg_hidden, a.seg_hidden)
    w_emb, w_head = whole.hf_model.get_input_embeddings(), whole.hf_model.get_output_embeddings()
    assert w_emb.weight.grad[seg].abs().sum() > 0 and w_head.weight.grad[seg].abs().sum() > 0
    torch.testing.assert_close(emb.trained.grad[0], w_emb.weight.grad[seg])
    torch.testing.assert_close(head.trained.grad[0], w_head.weight.grad[seg])
    assert emb.weight.grad is None and head.weight.grad is None


def test_trained_rows_are_what_export_writes_and_a_whole_matrix_loads_into_them(tmp_path):
    _, rows = pair("llava")
    emb, head = rows.hf_model.get_input_embeddings(), rows.hf_model.get_output_embeddings()
    with torch.no_grad():
        emb.trained.add_(1.0)
        head.trained.mul_(-2.0)
    context, query = clip(rows, seed=5)
    rows.eval()
    with torch.no_grad():
        before = rows.encode(context, query, EXPRESSIONS, ce_only_seg=False)
    rows.save_pretrained(tmp_path)
    loaded = build_backbone(tiny_cfg("llava", f"path={tmp_path}"), PROMPT).eval()  # plain HF classes, every row whole
    seg = rows.seg_token_id
    torch.testing.assert_close(loaded.hf_model.get_input_embeddings().weight[seg], emb.trained[0].detach())
    with torch.no_grad():
        after = loaded.encode(context, query, EXPRESSIONS, ce_only_seg=False)
    torch.testing.assert_close(after.seg_hidden, before.seg_hidden, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(after.lm_loss, before.lm_loss, atol=1e-5, rtol=1e-5)

    # a whole-matrix state (a checkpoint trained with train_token_rows=all) sets the trained rows on load
    _, again = pair("llava")
    missing, _ = again.hf_model.load_state_dict(loaded.hf_model.state_dict(), strict=False)
    assert not any(k.endswith(".trained") for k in missing)
    torch.testing.assert_close(again.hf_model.get_output_embeddings().trained[0], head.trained[0].detach())


def test_bad_settings_are_named():
    with pytest.raises(ConfigError, match="train_token_rows='some'.*all, added"):
        build_backbone(tiny_cfg("llava", "train_token_rows=some"), PROMPT)
    with pytest.raises(ConfigError, match="train_embeddings and train_lm_head both"):
        build_backbone(tiny_cfg("llava", "train_token_rows=added", "train_lm_head=false"), PROMPT)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_frozen_vision_tower_keeps_no_graph_yet_everything_trained_learns(family):
    bb = build_backbone(tiny_cfg(family, "gradient_checkpointing=true", "train_vision_tower=false"), PROMPT).train()
    randomize_lora(bb)
    vision = bb.hf_model.get_submodule(bb.vision_module)
    projector = bb.hf_model.get_submodule(bb.projector_module)
    blocks = [m for name, m in vision.named_modules() if name.count(".") >= 1 and name.rsplit(".", 1)[-1].isdigit()
              and not any(m is p or m in p.modules() for p in [projector])]
    seen = {}
    hooks = [blocks[0].register_forward_hook(lambda m, i, o: seen.setdefault("block", o[0] if isinstance(o, tuple) else o)),
             projector.register_forward_hook(lambda m, i, o: seen.setdefault("projector", o))]
    out = bb.encode(*clip(bb), EXPRESSIONS, ce_only_seg=False)
    for h in hooks:
        h.remove()
    assert not seen["block"].requires_grad  # before: peft's input hooks made the frozen tower's blocks keep graphs
    assert seen["projector"].requires_grad
    (out.lm_loss + out.seg_hidden.square().mean()).backward()
    trained = {n: p for n, p in bb.hf_model.named_parameters() if p.requires_grad}
    assert any("lora_" in n for n in trained) and all(p.grad is not None and p.grad.abs().sum() > 0 for p in trained.values())
