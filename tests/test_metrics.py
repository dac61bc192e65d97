"""DAVIS J and F (glus_lightning.metrics): hand-computed cases, agreement with an independent per-frame
numpy implementation (experiments/benchmarks/davis_reference.py), accumulation and DDP synchronisation."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from glus_lightning.metrics import (
    JAndF,
    boundary_f,
    boundary_map,
    boundary_precision_recall,
    boundary_tolerance,
    dilate_disk,
    mask_iou,
)

_REFERENCE = Path(__file__).resolve().parents[1] / "experiments" / "benchmarks" / "davis_reference.py"
_spec = importlib.util.spec_from_file_location("davis_reference", _REFERENCE)
ref = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ref)


def masks(rows: list[str]) -> torch.Tensor:
    """A bool mask from rows of '0'/'1' characters."""
    return torch.tensor([[c == "1" for c in row] for row in rows])


def stripes(height: int, width: int, spans: list[tuple[int, int, int, int]]) -> torch.Tensor:
    """A bool mask with the rectangles (row0, row1, col0, col1), ends inclusive, set."""
    out = torch.zeros(height, width, dtype=torch.bool)
    for r0, r1, c0, c1 in spans:
        out[r0 : r1 + 1, c0 : c1 + 1] = True
    return out


# ---------------------------------------------------------------- J


def test_mask_iou_hand_cases() -> None:
    empty = torch.zeros(2, 3, dtype=torch.bool)
    a = masks(["110", "000"])
    b = masks(["011", "001"])
    assert mask_iou(empty, empty).item() == 1.0  # both empty
    assert mask_iou(a, empty).item() == 0.0
    assert mask_iou(empty, b).item() == 0.0
    assert mask_iou(a, b).item() == pytest.approx(1 / 4)  # 1 shared pixel of 4
    stack = mask_iou(torch.stack([a, empty, a]), torch.stack([b, empty, a]))
    assert stack.dtype == torch.float64 and stack.tolist() == [0.25, 1.0, 1.0]


def test_uint8_masks_are_nonzero_is_object() -> None:
    pred, target = ref.random_blobs(np.random.default_rng(3), 3, 31, 45)
    as_bool = (torch.from_numpy(pred), torch.from_numpy(target))
    as_png = (torch.from_numpy(pred).to(torch.uint8) * 255, torch.from_numpy(target).to(torch.uint8) * 255)
    assert torch.equal(mask_iou(*as_bool), mask_iou(*as_png))
    assert torch.equal(boundary_f(*as_bool), boundary_f(*as_png))


def test_bad_inputs_raise_clear_errors() -> None:
    good = torch.zeros(2, 4, 5, dtype=torch.bool)
    with pytest.raises(TypeError, match="pred: expected a bool or uint8.*float32"):
        mask_iou(good.float(), good)
    with pytest.raises(ValueError, match=r"shapes differ: \(2, 4, 5\) vs \(2, 4, 6\)"):
        boundary_f(good, torch.zeros(2, 4, 6, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"masks: expected masks \[..., H, W\] with H, W >= 1, got shape \(3, 0, 5\)"):
        boundary_map(torch.zeros(3, 0, 5, dtype=torch.bool))
    metric = JAndF()
    with pytest.raises(ValueError, match=r"\[T, H, W\].*\(4, 5\)"):
        metric.update(good[0], good[0])
    with pytest.raises(ValueError, match="key must be a non-empty string"):
        metric.update(good, good, key="")


# ---------------------------------------------------------------- boundaries


def test_boundary_map_hand_cases() -> None:
    # a pixel is a boundary pixel when it differs from its E, S or SE neighbour inside the image
    square = masks(["0000", "0110", "0110", "0000"])
    assert torch.equal(boundary_map(square), masks(["1110", "1010", "1110", "0000"]))
    # an object touching the left and bottom borders: no boundary along the image border itself
    touching = masks(["1100", "1100", "1111"])
    assert torch.equal(boundary_map(touching), masks(["0100", "0111", "0000"]))
    # 1-pixel lines and a single pixel
    line = masks(["000000", "000000", "011110", "000000"])
    assert torch.equal(boundary_map(line), masks(["000000", "111110", "111110", "000000"]))
    column = masks(["010", "010", "010"])
    assert torch.equal(boundary_map(column), masks(["110", "110", "110"]))
    dot = masks(["000", "010", "000"])
    assert torch.equal(boundary_map(dot), masks(["110", "110", "000"]))
    # a full frame has no boundary at all
    assert not boundary_map(torch.ones(5, 7, dtype=torch.bool)).any()


@pytest.mark.parametrize("height,width", [(1, 1), (1, 9), (9, 1), (2, 2), (7, 8), (8, 7), (17, 33), (64, 5)])
def test_boundary_map_matches_reference(height: int, width: int) -> None:
    rng = np.random.default_rng(height * 100 + width)
    noise = rng.random((6, height, width)) < rng.uniform(0.05, 0.95, size=(6, 1, 1))
    expected = np.stack([ref.seg2bmap(frame) for frame in noise])
    assert np.array_equal(boundary_map(torch.from_numpy(noise)).numpy(), expected)


def test_tolerance_is_ceil_of_diagonal_fraction() -> None:
    assert boundary_tolerance(720, 1280) == 12  # 0.008 * 1468.6 = 11.75
    assert boundary_tolerance(480, 854) == 8  # 0.008 * 979.6 = 7.84
    assert boundary_tolerance(10, 10) == 1
    for height, width in [(1, 1), (750, 1000), (1080, 1920), (2160, 3840), (125, 1), (333, 517)]:
        assert boundary_tolerance(height, width) == ref.tolerance(height, width)


@pytest.mark.parametrize("radius", [0, 1, 2, 5, 9])
def test_dilating_a_pixel_gives_the_disk(radius: int) -> None:
    size = 2 * radius + 5
    ys, xs = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    centre = size // 2
    disk = (ys - centre) ** 2 + (xs - centre) ** 2 <= radius**2
    dot = torch.zeros(size, size, dtype=torch.bool)
    dot[centre, centre] = True
    assert torch.equal(dilate_disk(dot, radius), disk)
    corner = torch.zeros(size, size, dtype=torch.bool)
    corner[0, 0] = True
    assert torch.equal(dilate_disk(corner, radius), ys**2 + xs**2 <= radius**2)  # clipped at the border


@pytest.mark.parametrize("height,width,radius", [(3, 40, 5), (13, 11, 3), (29, 31, 9), (40, 3, 12)])
def test_dilation_matches_reference(height: int, width: int, radius: int) -> None:
    sparse = np.random.default_rng(radius).random((3, height, width)) < 0.02
    expected = np.stack([ref.dilate(frame, radius) for frame in sparse])
    assert np.array_equal(dilate_disk(torch.from_numpy(sparse), radius).numpy(), expected)


# ---------------------------------------------------------------- F


def test_empty_boundary_conventions() -> None:
    empty = torch.zeros(1, 10, 10, dtype=torch.bool)
    full = torch.ones(1, 10, 10, dtype=torch.bool)  # covers the image: no boundary either
    blob = stripes(10, 10, [(2, 5, 3, 6)]).unsqueeze(0)
    cases = [  # pred, target, precision, recall, F
        (empty, empty, 1.0, 1.0, 1.0),
        (full, empty, 1.0, 1.0, 1.0),
        (empty, blob, 1.0, 0.0, 0.0),
        (blob, empty, 0.0, 1.0, 0.0),
        (full, blob, 1.0, 0.0, 0.0),
    ]
    for pred, target, precision, recall, f in cases:
        p, r = boundary_precision_recall(pred, target)
        assert (p.item(), r.item(), boundary_f(pred, target).item()) == (precision, recall, f)


def test_boundary_f_hand_cases() -> None:
    # 10 x 10: tolerance ceil(0.008 * 14.1) = 1 pixel; the target's boundary is column 2
    target = stripes(10, 10, [(0, 9, 0, 2)])
    within = stripes(10, 10, [(0, 9, 0, 3)])  # boundary on column 3: 1 pixel away
    beyond = stripes(10, 10, [(0, 9, 0, 4)])  # boundary on column 4: 2 pixels away -> P = R = 0
    pairs = torch.stack([within, beyond]), torch.stack([target, target])
    assert boundary_f(*pairs).tolist() == [1.0, 0.0]
    assert [x.tolist() for x in boundary_precision_recall(*pairs)] == [[1.0, 0.0], [1.0, 0.0]]
    # 10 x 20 (tolerance 1): a far 2 x 2 square adds 8 unmatched boundary pixels to the 10 matched ones
    target = stripes(10, 20, [(0, 9, 0, 2)])
    pred = stripes(10, 20, [(0, 9, 0, 2), (3, 4, 10, 11)])
    precision, recall = boundary_precision_recall(pred, target)
    assert (precision.item(), recall.item()) == (pytest.approx(10 / 18), 1.0)
    assert boundary_f(pred, target).item() == pytest.approx(2 * (10 / 18) / (10 / 18 + 1))  # 5 / 7
    assert mask_iou(pred, target).item() == pytest.approx(30 / 34)


@pytest.mark.parametrize("height,width", [(45, 71), (200, 333)])  # tolerance 1 and 4 pixels
def test_thin_and_border_shapes_match_reference(height: int, width: int) -> None:
    frames = []
    for gap in range(7):  # 1-pixel lines at growing distances, against the tolerance
        frames.append((stripes(height, width, [(10, 10, 3, 40)]), stripes(height, width, [(10 + gap, 10 + gap, 3, 40)])))
        frames.append((stripes(height, width, [(0, height - 1, gap, gap)]), stripes(height, width, [(0, height - 1, 0, 0)])))
    diagonal = torch.eye(height, width, dtype=torch.bool)
    frames.append((diagonal, diagonal.roll(2, dims=1)))
    frames.append((stripes(height, width, [(height - 3, height - 1, 0, width - 1)]), torch.ones(height, width, dtype=torch.bool)))
    frames.append((stripes(height, width, [(0, 0, 0, 0)]), stripes(height, width, [(height - 1, height - 1, width - 1, width - 1)])))
    pred, target = (torch.stack(side) for side in zip(*frames))
    precision, recall = boundary_precision_recall(pred, target)
    expected = np.array([ref.precision_recall(p, t) for p, t in zip(pred.numpy(), target.numpy())])
    assert np.abs(precision.numpy() - expected[:, 0]).max() < 1e-6 and np.abs(recall.numpy() - expected[:, 1]).max() < 1e-6
    f_ref = np.array([ref.f_measure(p, t) for p, t in zip(pred.numpy(), target.numpy())])
    assert np.abs(boundary_f(pred, target).numpy() - f_ref).max() < 1e-6
    assert set(np.round(f_ref, 6)) > {0.0, 1.0}  # matched, unmatched and partial frames


@pytest.mark.parametrize("height,width", [(37, 53), (61, 47), (9, 130), (150, 260), (301, 411)])
def test_j_and_f_match_reference_on_random_blobs(height: int, width: int) -> None:
    rng = np.random.default_rng(height * 1000 + width)
    pred, target = ref.random_blobs(rng, 5, height, width)
    pred[0] = rng.random((height, width)) < 0.3  # noisy frame: many short boundaries
    pred[1] = False  # empty prediction
    target[2] = False  # empty target
    pred[3] = target[3] = False  # both empty
    j_ref, f_ref = ref.jf_frames(pred, target)
    p_ref, r_ref = np.array([ref.precision_recall(p, t) for p, t in zip(pred, target)]).T
    pred_t, target_t = torch.from_numpy(pred), torch.from_numpy(target)
    precision, recall = boundary_precision_recall(pred_t, target_t)
    assert np.abs(mask_iou(pred_t, target_t).numpy() - j_ref).max() < 1e-6
    assert np.abs(boundary_f(pred_t, target_t).numpy() - f_ref).max() < 1e-6
    assert np.abs(precision.numpy() - p_ref).max() < 1e-6 and np.abs(recall.numpy() - r_ref).max() < 1e-6
    assert ((0 < f_ref) & (f_ref < 1)).any() and ((0 < j_ref) & (j_ref < 1)).any()  # not only trivial frames


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu() -> None:
    pred, target = (torch.from_numpy(x) for x in ref.random_blobs(np.random.default_rng(5), 4, 180, 320))
    assert torch.equal(boundary_f(pred.cuda(), target.cuda()).cpu(), boundary_f(pred, target))
    assert torch.equal(mask_iou(pred.cuda(), target.cuda()).cpu(), mask_iou(pred, target))


# ---------------------------------------------------------------- the Metric


def _expression(index: int) -> tuple[np.ndarray, np.ndarray]:
    """Expression ``index`` of a small fixed set: 2 + index frames of 40 x 56 random blobs."""
    return ref.random_blobs(np.random.default_rng(100 + index), 2 + index, 40, 56)


def _expected(indices: list[int]) -> dict[str, float]:
    """Dataset J, F, J&F from the reference: frame means per expression, then mean over expressions."""
    per_expression = [ref.jf_frames(*_expression(i)) for i in indices]
    j = float(np.mean([jf[0].mean() for jf in per_expression]))
    f = float(np.mean([jf[1].mean() for jf in per_expression]))
    return {"J": j, "F": f, "J&F": (j + f) / 2, "count": len(indices)}


def test_metric_means_frames_then_expressions() -> None:
    metric = JAndF()
    short, long = _expression(1), _expression(3)  # 3 and 5 frames
    metric.update(*map(torch.from_numpy, short), key="video/0")
    metric.update(*map(torch.from_numpy, long))
    result = metric.compute()
    expected = _expected([1, 3])
    for name in ("J", "F", "J&F"):
        assert result[name].item() == pytest.approx(expected[name], abs=1e-6)
    assert result["count"].item() == 2
    frame_f = np.concatenate([ref.jf_frames(*short)[1], ref.jf_frames(*long)[1]]).mean()
    assert abs(frame_f - expected["F"]) > 1e-3  # a mean over all frames would give another number
    assert list(metric.per_expression()) == ["video/0"]  # only keyed expressions get a table row
    metric.reset()
    with pytest.warns(UserWarning, match="before the ``update``"):
        empty = metric.compute()
    assert empty["count"].item() == 0 and math.isnan(empty["J&F"].item())


def test_metric_counts_a_repeated_key_once_and_forward_accumulates() -> None:
    metric = JAndF()
    batch_value = metric(*map(torch.from_numpy, _expression(0)), key="a/0")
    assert batch_value["J&F"].item() == pytest.approx(_expected([0])["J&F"], abs=1e-6)
    metric(*map(torch.from_numpy, _expression(2)), key="b/0")
    metric.update(*map(torch.from_numpy, _expression(2)), key="b/0")  # a padding repeat
    assert metric.compute()["J&F"].item() == pytest.approx(_expected([0, 2])["J&F"], abs=1e-6)
    table = metric.per_expression()
    assert list(table) == ["a/0", "b/0"]
    assert table["b/0"]["F"] == pytest.approx(ref.jf_frames(*_expression(2))[1].mean(), abs=1e-6)


# ---------------------------------------------------------------- DDP

_RANK_EXPRESSIONS = {0: [0, 1], 1: [2, 3, 0]}  # rank 1 repeats expression 0, as DistributedSampler padding does


def _ddp_worker(rank: int, world_size: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)  # two ranks share the CPU; also keeps OpenMP clear of the forked parent's pool
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        metric, rank0_only = JAndF(), JAndF()
        for index in _RANK_EXPRESSIONS[rank]:
            pred, target = map(torch.from_numpy, _expression(index))
            metric.update(pred, target, key=f"video{index}/0")
            if rank == 0:
                rank0_only.update(pred, target)
        result = {name: value.item() for name, value in metric.compute().items()}
        local = metric.expression_j  # back to this rank's own state after compute
        report = {
            "result": result,
            "local_count": len(local),
            "table": sorted(metric.per_expression()),
            "rank0_only": {name: value.item() for name, value in rank0_only.compute().items()},
        }
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(report))
    finally:
        dist.destroy_process_group()


def test_ddp_sync_gives_the_global_mean(tmp_path: Path) -> None:
    # fork: the workers inherit the imported modules instead of importing torch again (seconds each)
    mp.start_processes(_ddp_worker, args=(2, str(tmp_path / "store"), str(tmp_path)), nprocs=2, start_method="fork")
    expected = _expected([0, 1, 2, 3])
    expected_rank0 = _expected([0, 1])
    for rank in range(2):
        report = json.loads((tmp_path / f"rank{rank}.json").read_text())
        for name in ("J", "F", "J&F"):
            assert report["result"][name] == pytest.approx(expected[name], abs=1e-6)
            assert report["rank0_only"][name] == pytest.approx(expected_rank0[name], abs=1e-6)
        assert report["result"]["count"] == 4 and report["rank0_only"]["count"] == 2
        assert report["local_count"] == len(_RANK_EXPRESSIONS[rank])
        assert report["table"] == [f"video{i}/0" for i in range(4)]
