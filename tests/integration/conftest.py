"""Fixtures for end-to-end tests (helpers live in ``helpers.py``)."""

from __future__ import annotations

import pytest

from trainer.data import write_synthetic_shards


@pytest.fixture(scope="session")
def shards(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Four training shards of 8 synthetic images each; returns the glob."""
    out = tmp_path_factory.mktemp("shards")
    write_synthetic_shards(str(out), num_images=32, num_shards=4, seed=0, min_side=160, max_side=288,
                           min_masks=3, max_masks=8, radius_frac=(0.1, 0.4))
    return f"{out}/sa_*.tar"


