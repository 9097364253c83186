"""The root training config and the named presets (``tiny_cpu``, ``vit_b``, ``vit_l``, ``vit_h``).

The machinery (TOML, ``--set`` overrides, validation) is in ``trainer.config``; each
section's fields are documented in its own module. The paper presets carry the values of
SAM_RECIPE.md §1 through the sections' defaults (data: 1 image and up to 64 masks per GPU,
no augmentation; prompts: 11 rounds; loss 20:1:1) and ``trainer.optim.OPTIM_PRESETS``;
they require an explicit image-encoder initialisation and do not clip gradients (see
:func:`paper`).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

from trainer.config import CheckpointConfig, EvalConfig, LogConfig, MetricsConfig, TrainConfig

if TYPE_CHECKING:  # the real imports are lazy: these modules import torch
    from trainer.data.config import DataConfig
    from trainer.loss import LossConfig
    from trainer.model.build import ModelConfig
    from trainer.optim import OptimConfig
    from trainer.prompts import PromptConfig

#: ``data.shards`` of the presets: no default dataset exists, so validate() demands one.
REQUIRED_SHARDS = "<required: --set data.shards=gs://bucket/sa1b/sa_*.tar>"


def _lazy(module: str, name: str, **kwargs: Any) -> Callable[[], Any]:
    """A default factory that imports its section class only when a config is built."""
    return lambda: getattr(importlib.import_module(module), name)(**kwargs)


@dataclass(kw_only=True)
class Config:
    """The whole training config: one section per module (see each class for fields)."""

    model: ModelConfig = field(default_factory=_lazy("trainer.model.build", "ModelConfig"))
    data: DataConfig = field(default_factory=_lazy("trainer.data.config", "DataConfig",
                                                   shards=REQUIRED_SHARDS))
    prompts: PromptConfig = field(default_factory=_lazy("trainer.prompts", "PromptConfig"))
    loss: LossConfig = field(default_factory=_lazy("trainer.loss", "LossConfig"))
    optim: OptimConfig = field(default_factory=_lazy("trainer.optim", "OptimConfig"))
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    log: LogConfig = field(default_factory=LogConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)

    def validate(self) -> None:
        """Cross-section checks (run by the loader after every section validated itself)."""
        from trainer.model.build import VARIANTS

        from trainer.model.build import REQUIRED_ENCODER_INIT, encoder_init_required_message

        # Every missing required setting in one message, so a user fixes them in one go.
        missing = []
        if self.data.shards == REQUIRED_SHARDS:
            missing.append("data.shards: required (a glob, .txt list or comma list of "
                           "shard URLs), e.g. --set data.shards=gs://bucket/sa1b/sa_*.tar")
        if self.model.encoder_init == REQUIRED_ENCODER_INIT:
            missing.append(encoder_init_required_message())
        if missing:
            raise ValueError("; and ".join(missing))
        size = VARIANTS[self.model.variant].img_size
        if self.data.img_size != size:
            raise ValueError(f"data.img_size: {self.data.img_size} does not match model.variant "
                             f"{self.model.variant!r}, whose input is {size}")
        if self.checkpoint.every > self.optim.max_iters:
            raise ValueError(f"checkpoint.every: {self.checkpoint.every} exceeds optim.max_iters "
                             f"{self.optim.max_iters}; use 0 to save only at the end")


def tiny_cpu() -> Config:
    """The tiny model on CPU: a few hundred fast steps for laptops and CI."""
    from trainer.model.build import ModelConfig
    from trainer.optim import optim_preset
    from trainer.prompts import PromptConfig
    from trainer.data.config import DataConfig

    return Config(
        model=ModelConfig(variant="tiny"),
        data=DataConfig(shards=REQUIRED_SHARDS, img_size=256, batch_size=2,
                        max_masks_per_image=8, num_workers=0),
        prompts=PromptConfig(num_correction_points=2, num_no_point_rounds=1),
        optim=optim_preset("tiny"),
        train=TrainConfig(run_dir="runs/tiny_cpu", device="cpu", amp="off", log_every=1),
        checkpoint=CheckpointConfig(every=100, keep_last=2),
        eval=EvalConfig(every=100, num_images=8, batch_size=2),
    )


def paper(variant: str) -> Config:
    """The paper's recipe for ``variant`` (vit_b, vit_l, vit_h): sizes, optimizer, data.

    ``model.encoder_init`` has no default (the paper initialises the encoder from MAE,
    SAM_RECIPE.md §1 "init", and we cannot ship that checkpoint): loading the preset
    without choosing mae / sam / random is a config error (see ``ModelConfig``).
    ``train.grad_clip`` is 0: the paper states no gradient clipping (SAM_RECIPE.md §1
    "mixed precision, grad clipping, EMA: unstated"; "Discrepancies" 6); SAM 2's clip at
    0.1 is another recipe. Clipping stays available as ``--set train.grad_clip=...``.

    ViT-L and ViT-H recompute activations in backward (``model.activation_checkpointing``)
    so a 1024² image with 64 masks × 11 rounds fits an 80 GiB A100/H100: measured on an
    H200, ViT-H peaks at 85 GiB without it and 35 GiB with it (step 2.5 s -> 3.7 s);
    ViT-B peaks at 72 GiB without it. Turn it off on larger cards for speed.
    """
    from trainer.model.build import REQUIRED_ENCODER_INIT, ModelConfig
    from trainer.optim import optim_preset

    model = ModelConfig(variant=variant, encoder_init=REQUIRED_ENCODER_INIT,
                        activation_checkpointing=variant != "vit_b")
    return Config(model=model, optim=optim_preset(variant),
                  train=TrainConfig(run_dir=f"runs/{variant}", grad_clip=0.0))


PRESETS: dict[str, Callable[[], Config]] = {
    "tiny_cpu": tiny_cpu,
    "vit_b": lambda: paper("vit_b"),
    "vit_l": lambda: paper("vit_l"),
    "vit_h": lambda: paper("vit_h"),
}
