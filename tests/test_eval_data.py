"""Evaluation data: videos split over ranks x workers whatever the shards, and targets built per expression from RLE."""

from __future__ import annotations

import json
import pickle
import re
import tarfile
from dataclasses import replace
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from pycocotools import mask as coco_mask
from test_datamodule import H, W, data_cfg, make_video, source
from test_module import tiny_config
from torch.utils.data import DataLoader, get_worker_info
from webdataset import TarWriter

from datamodules.datamodule import EvalStream, RefVOSDataModule, collate, resolve_shards, shard_samples
from datamodules.eval_split import ShardReadError, index_shards, split_balanced
from datamodules.records import Expression, RecordError, decode_rle, decode_union, encode_rle, frame_member
from datamodules.sampling import build_sample, plan_eval
from datamodules.shards import write_shards
from datamodules.targets import ObjectTargets
from glus_lightning.masks import upsample_logits
from glus_lightning.metrics import JAndF
from glus_lightning.module import GLUSModule


def write_split(root: Path, videos: int, per_shard: int, frames: int = 6) -> list[str]:
    records = [make_video("ev", f"ev{i:02d}", frames) for i in range(videos)]
    write_shards(records, root / "ev", "ev", "val", videos_per_shard=per_shard)
    return [r.video for r in records]


def eval_stream(root: Path, rank: int, world_size: int, **overrides) -> EvalStream:
    cfg = data_cfg(root, [source("ev", "ev/val-*.tar")], **overrides)
    return EvalStream(resolve_shards(str(root), "ev/val-*.tar"), cfg, rank, world_size)


def with_worker(samples):
    """Collate in the worker and tag the batch with the worker that made it."""
    info = get_worker_info()
    return (info.id if info is not None else 0), collate(samples)


def videos_by_slot(root: Path, world_size: int, num_workers: int) -> dict[tuple[int, int], list[str]]:
    """``{(rank, worker): videos}`` from real DataLoaders, one per simulated rank."""
    slots: dict[tuple[int, int], list[str]] = {(r, w): [] for r in range(world_size) for w in range(num_workers)}
    for rank in range(world_size):
        stream = eval_stream(root, rank, world_size, num_workers=num_workers)
        loader = DataLoader(stream, batch_size=1, num_workers=num_workers, collate_fn=with_worker)
        for worker, batch in loader:
            slots[rank, worker] += batch.video_ids
    return slots


# --- the split ----------------------------------------------------------------------------------


def test_one_shard_of_five_videos_splits_over_two_ranks_by_two_workers(tmp_path):
    videos = write_split(tmp_path, videos=5, per_shard=50)  # glus prepare's layout: one shard holds the whole split
    assert len(resolve_shards(str(tmp_path), "ev/val-*.tar")) == 1
    slots = videos_by_slot(tmp_path, world_size=2, num_workers=2)
    seen = [v for slot in slots.values() for v in slot]
    assert sorted(seen) == videos  # every video, none twice
    assert all(slots.values()), slots  # every (rank, worker) has work
    assert [len(eval_stream(tmp_path, r, 2).videos) for r in range(2)] == [3, 2]


def test_a_rank_without_videos_yields_nothing_and_has_no_length(tmp_path):
    write_split(tmp_path, videos=2, per_shard=50)
    slots = videos_by_slot(tmp_path, world_size=3, num_workers=1)
    assert slots[2, 0] == [] and sorted(slots[0, 0] + slots[1, 0]) == ["ev00", "ev01"]
    # no __len__: Lightning skips the loop of a 0-length loader, and that rank would miss the metric's gather
    assert not hasattr(eval_stream(tmp_path, 2, 3), "__len__")


def test_the_split_does_not_depend_on_the_shard_layout(tmp_path):
    layouts = {}
    for per_shard in (1, 2, 5):
        root = tmp_path / str(per_shard)
        write_split(root, videos=5, per_shard=per_shard)
        layouts[per_shard] = videos_by_slot(root, world_size=2, num_workers=2)
    assert layouts[1] == layouts[2] == layouts[5]


def test_split_balances_cost_and_is_deterministic():
    costs = [80 * 20, 80 * 2, 40 * 10, 60 * 5, 80 * 20, 10, 30 * 3]
    parts = split_balanced(costs, 3)
    assert sorted(i for p in parts for i in p) == list(range(len(costs)))
    assert all(p == sorted(p) for p in parts)
    loads = [sum(costs[i] for i in p) for p in parts]
    assert max(loads) - min(loads) <= max(costs) and parts == split_balanced(costs, 3)
    assert split_balanced([5, 5, 5], 5) == [[0], [1], [2], [], []]  # more slots than videos: some idle, none repeated


def test_ranks_are_balanced_by_frames_times_expressions(tmp_path):
    records = [make_video("ev", f"ev{i:02d}", frames) for i, frames in enumerate([12, 3, 3, 3, 3])]
    write_shards(records, tmp_path / "ev", "ev", "val", videos_per_shard=50)
    index = index_shards(resolve_shards(str(tmp_path), "ev/val-*.tar"))
    assert [(v.key, v.num_frames, v.num_expressions) for v in index] == [(f"ev/ev{i:02d}", f, 4) for i, f in
                                                                         enumerate([12, 3, 3, 3, 3])]
    shares = [[v.key for v in eval_stream(tmp_path, r, 2).videos] for r in range(2)]
    assert shares == [["ev/ev00"], ["ev/ev01", "ev/ev02", "ev/ev03", "ev/ev04"]]  # 48 frame-expressions each


def test_a_worker_reads_only_its_own_videos(tmp_path):
    records = [make_video("ev", f"ev{i:02d}") for i in range(4)]
    broken = records[3].to_sample()
    for t in range(len(records[3].frames)):
        broken[frame_member(t)] = b"not an image"
    (tmp_path / "ev").mkdir()
    with TarWriter(str(tmp_path / "ev" / "val-000000.tar")) as sink:
        for record in records[:3]:
            sink.write(record.to_sample())
        sink.write(broken)
    owner = next(r for r in range(2) if "ev/ev03" in [v.key for v in eval_stream(tmp_path, r, 2).videos])
    other = [b.video_ids[0] for b in DataLoader(eval_stream(tmp_path, 1 - owner, 2), batch_size=1, collate_fn=collate)]
    assert other and "ev03" not in other  # never decoded the broken video's frames
    with pytest.raises(RecordError, match="ev/ev03"):
        list(DataLoader(eval_stream(tmp_path, owner, 2), batch_size=1, collate_fn=collate))


def cut_shards(root: Path) -> dict[str, Path]:
    """Copies of a good two-video shard cut: inside a header, inside member data on a block boundary, between videos."""
    write_split(root / "src", videos=2, per_shard=2)
    good_path = root / "src" / "ev" / "val-000000.tar"
    good = good_path.read_bytes()
    with tarfile.open(good_path) as tar:
        members = tar.getmembers()
    second = next(m for m in members if m.name.startswith("ev/ev01"))
    last = members[-1]
    cuts = {
        "header": second.offset + 7,
        "data": last.offset_data,  # the last member's data is gone: whole blocks, but cut short
        "boundary": last.offset_data + -(-last.size // 512) * 512,  # every member whole, no end-of-archive block
    }
    (root / "ev").mkdir()
    paths = {}
    for name, size in cuts.items():
        paths[name] = root / "ev" / f"val-{name}.tar"
        paths[name].write_bytes(good[:size])
    return paths


@pytest.mark.parametrize("cut", ["header", "data", "boundary"])
def test_an_unreadable_shard_raises_naming_it_on_every_rank(tmp_path, cut):
    path = cut_shards(tmp_path)[cut]
    for rank in range(2):
        with pytest.raises(ShardReadError, match=re.escape(str(path))):
            EvalStream([str(path)], data_cfg(tmp_path, [source("ev")]), rank, 2)


# --- targets --------------------------------------------------------------------------------------


def test_rle_targets_decode_to_the_dense_targets_byte_for_byte():
    record = make_video("ds", "v", frames=7)  # objects 1 and 2 overlap; expression "1" is their union
    plan = plan_eval(record, 2)
    dense = build_sample(record, plan, 16).targets
    lazy = build_sample(record, plan, 16, lazy_targets=True).targets
    assert isinstance(lazy, ObjectTargets) and len(lazy) == len(dense) == 4
    for e in range(4):
        assert lazy.size(e) == dense.size(e) == (H, W)
        target = lazy.expression_target(e)
        assert target.dtype == torch.uint8 and torch.equal(target, dense.expression_target(e))
    with pytest.raises(TypeError, match="expression_target"):
        collate([build_sample(record, plan, 16, lazy_targets=True)]).masks  # noqa: B018  (all at once: refused)


def test_merged_rle_union_equals_the_union_of_decoded_masks():
    rng = np.random.default_rng(0)
    for _ in range(50):
        masks = [(rng.random((37, 53)) < rng.uniform(0.05, 0.6)).astype(np.uint8) for _ in range(int(rng.integers(1, 5)))]
        expected = np.zeros((37, 53), dtype=np.uint8)
        for mask in masks:
            np.maximum(expected, decode_rle(encode_rle(mask), "m"), out=expected)
        rles = [rle for rle in map(encode_rle, masks) if rle is not None]
        if rles:
            assert np.array_equal(decode_union(rles, "m"), expected)


def test_a_mask_of_the_wrong_size_is_named_when_the_sample_is_built():
    record = make_video("ds", "v", frames=3)
    record.masks[2][1] = {**record.masks[2][1], "size": [H + 1, W]}
    with pytest.raises(RecordError, match=r"ds/v: mask of object 2 frame 1"):
        build_sample(record, plan_eval(record, 2), 16, lazy_targets=True)


def many_expressions(count: int):
    record = make_video("ds", "v", frames=10)
    objects = [(1,), (2,), (3,), (1, 2), (2, 3)]
    expressions = [Expression(str(i), f"expression number {i}", objects[i % len(objects)]) for i in range(count)]
    return replace(record, expressions=expressions)


def test_an_eval_batch_does_not_grow_with_the_number_of_expressions():
    batches = {}
    for count in (1, 5, 20):  # 5 and 20 expressions refer to all three objects
        record = many_expressions(count)
        batches[count] = collate([build_sample(record, plan_eval(record, 2), 16, lazy_targets=True)])
    one, five, twenty = batches[1], batches[5], batches[20]
    assert torch.equal(one.frames, twenty.frames) and len(twenty.targets) == 20
    dense_target = 10 * H * W  # bytes of one expression's [T, H, W] uint8 target: what each expression used to add
    per_expression = (len(pickle.dumps(twenty)) - len(pickle.dumps(five))) / 15
    assert per_expression < 200 < dense_target, per_expression  # its text, id and object ids: no mask bytes
    assert len(pickle.dumps(twenty.targets)) < dense_target  # the RLE of 3 objects x 10 frames, once per object


# --- J&F ----------------------------------------------------------------------------------------------


def dense_targets_from_shards(root: Path) -> dict[str, np.ndarray]:
    """Every expression's target decoded straight from the stored RLE with pycocotools: ``"<video>/<exp_id>"`` -> (T, H, W)."""
    targets = {}
    for url in resolve_shards(str(root), "val/val-*.tar"):
        for raw in shard_samples(url, handler=lambda err: False):
            meta, masks = json.loads(raw["meta.json"]), json.loads(raw["masks.json"])
            h, w, frames = meta["height"], meta["width"], len(meta["frames"])
            for exp in meta["expressions"]:
                target = np.zeros((frames, h, w), dtype=bool)
                for obj in exp["obj_ids"]:
                    for t, rle in enumerate(masks[str(obj)]):
                        if rle is not None:
                            target[t] |= coco_mask.decode({"size": rle["size"], "counts": rle["counts"].encode()}).astype(bool)
                targets[f"{meta['video']}/{exp['exp_id']}"] = target
    return targets


def test_jf_of_the_evaluation_path_equals_jf_on_densely_decoded_targets(data_root: Path):
    cfg = tiny_config(data_root, "inference.window=3")
    L.seed_everything(0)
    model = GLUSModule(cfg).eval()
    head = model.segmenter.sam.sam_mask_decoder.pred_obj_score_head  # "present", so that masks are not all blank
    with torch.no_grad():
        [m for m in head.modules() if isinstance(m, torch.nn.Linear)][-1].bias.fill_(10.0)
    expected, dense = JAndF(), dense_targets_from_shards(data_root)
    predicted = 0
    for i, batch in enumerate(RefVOSDataModule(cfg.data).val_dataloader()):
        assert isinstance(batch.targets, ObjectTargets)
        logits = model.predict_video(batch)
        model.predict_video = lambda _batch, logits=logits: logits  # score exactly these logits both ways
        out = model.validation_step(batch, i)
        del model.predict_video
        assert out["mask_logits"] is logits
        for lg, exp_id in zip(logits, batch.expression_ids, strict=True):
            target = torch.from_numpy(dense[f"{batch.video_ids[0]}/{exp_id}"])
            pred = upsample_logits(lg.float(), tuple(target.shape[-2:])) > cfg.mask_threshold
            predicted += int(pred.any())
            expected.update(pred, target, key=f"{batch.datasets[0]}/{batch.video_ids[0]}/{exp_id}")
    assert predicted and len(dense) == int(expected.compute()["count"])
    got, want = model.val_metric.compute(), expected.compute()
    assert {k: v.item() for k, v in got.items()} == {k: v.item() for k, v in want.items()}
    assert model.val_metric.per_expression() == expected.per_expression()
