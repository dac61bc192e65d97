"""Fixtures shared by the test modules."""

from __future__ import annotations

from pathlib import Path

import pytest

from datamodules.prepare import prepare_synthetic


@pytest.fixture(scope="session")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny built-in dataset (8 train, 4 val videos of 6 frames at 48 px), generated once and only read by tests."""
    root = tmp_path_factory.mktemp("synthetic")
    prepare_synthetic(root, seed=5, num_train=8, num_val=4, frames=6, size=48)
    return root
