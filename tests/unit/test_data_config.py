"""DataConfig validation."""

from __future__ import annotations

import pytest

from trainer.data import DataConfig


def test_defaults_are_the_paper_recipe() -> None:
    cfg = DataConfig(shards="/data/sa_*.tar")
    assert (cfg.img_size, cfg.batch_size, cfg.max_masks_per_image) == (1024, 1, 64)
    assert cfg.max_mask_area_frac == 0.9 and not cfg.lsj and not cfg.hflip
    assert cfg.lsj_scale == (0.1, 2.0)


def test_keyword_only() -> None:
    with pytest.raises(TypeError):
        DataConfig("/data/sa_*.tar")  # type: ignore[misc]


@pytest.mark.parametrize("field,value", [
    ("shards", ""), ("shards", []), ("img_size", 0), ("batch_size", 0),
    ("max_masks_per_image", 0), ("max_mask_area_frac", 0.0), ("max_mask_area_frac", 1.5),
    ("num_workers", -1), ("prefetch_factor", 0), ("seed", -1), ("jpeg_decoder", "turbo"),
    ("mask_decoder", "gpu"), ("lsj_scale", (2.0, 0.1)), ("lsj_scale", (0.0, 1.0)),
    ("shard_open_retries", -1), ("retry_backoff_s", -0.5)])
def test_bad_values_name_the_field(field: str, value: object) -> None:
    kwargs = {"shards": "/data/sa_*.tar", field: value}
    with pytest.raises(ValueError, match=f"DataConfig.{field}"):
        DataConfig(**kwargs)


def test_lists_from_toml_become_tuples() -> None:
    assert DataConfig(shards=["a.tar"], lsj_scale=[0.5, 1.5]).lsj_scale == (0.5, 1.5)
