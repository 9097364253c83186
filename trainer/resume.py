"""What a resumed run does with settings that differ from its checkpoint's config.

A pod restart resumes with whatever config the job carries now, which may differ from the
one the checkpoint was written with (``--set optim.lr=...`` to rescue a run, a longer
``optim.max_iters``, a new eval cadence). The rule: a changed setting is either **in
effect** from the resumed step on, or **refused** (exit 2); the config that is logged and
saved in new checkpoints is always the one in effect. Each changed setting gets one
WARNING (rank 0) saying what happens to it.

- **Applied**: everything the loop reads from the config while it runs (``train.*``,
  ``loss.*``, ``prompts.*``, ``eval.*``, ``log.*``, ``checkpoint.*``), the model's
  training-time settings (drop path, dropout, activation checkpointing: the model is
  built from the current config), and all of ``optim.*``: the optimizer's
  hyperparameters (per-group lr with layer decay, weight decay, betas, eps) and the lr
  schedule are re-derived from the current config after the optimizer state (moments,
  step counts) is loaded, by :func:`apply_optim_config`. ``data.*`` applies too; when the
  shard list or worker layout changed the data position cannot be restored and the data
  order restarts (the engine warns).
- **Kept from the checkpoint**: initialisation settings (``model.init_checkpoint``,
  ``model.mae_checkpoint``, ``model.encoder_init``) and ``model.pe_seed``. The resumed
  weights (and the PE buffer, a persistent buffer in the state dict) supersede them, so
  the checkpoint's values are put back into the config: a saved ``config.toml`` never
  claims an initialisation that did not happen.
- **Refused**: ``model.variant`` (the weights do not fit another architecture).
"""

from __future__ import annotations

import dataclasses
import logging
import tomllib
from typing import Any

import torch

from trainer.config import ConfigError, to_dict
from trainer.optim import implementation, lr_factor, param_groups
from trainer.presets import Config

log = logging.getLogger(__name__)

#: Settings the checkpoint's weights supersede: restored from its config.
KEPT_FROM_CHECKPOINT = ("model.init_checkpoint", "model.mae_checkpoint", "model.encoder_init", "model.pe_seed")
#: Settings that cannot change on resume.
REFUSED = ("model.variant",)


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = list(value) if isinstance(value, tuple) else value
    return out


def changed_settings(saved: dict[str, Any], current: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """``{dotted key: (saved value, current value)}`` for keys present in both that differ.

    Keys only one side has (a config written by another version) are not compared.
    """
    old, new = _flatten(saved), _flatten(current)
    return {key: (old[key], new[key]) for key in sorted(old.keys() & new.keys()) if old[key] != new[key]}


def _replace(cfg: Config, values: dict[str, Any]) -> Config:
    """``cfg`` with dotted ``values`` set, one ``replace`` per section (its checks see them together)."""
    sections: dict[str, dict[str, Any]] = {}
    for key, value in values.items():
        section, name = key.split(".", 1)
        sections.setdefault(section, {})[name] = value
    parts = {name: dataclasses.replace(getattr(cfg, name), **fields) for name, fields in sections.items()}
    return dataclasses.replace(cfg, **parts) if parts else cfg


def reconcile_config(cfg: Config, saved_toml: str, step: int, warn: bool = True) -> Config:
    """The config in effect when resuming ``cfg`` from a checkpoint whose config is ``saved_toml``.

    Args:
        cfg: the config this process was started with.
        saved_toml: the checkpoint's ``config.toml`` ("" for none: nothing to compare).
        step: the resumed step, i.e. steps already done (messages name ``step + 1``, the
            first step the change affects, as the progress lines number it).
        warn: log one WARNING per changed setting (rank 0 passes True).

    Raises:
        ConfigError: a setting of :data:`REFUSED` changed, naming it.
    """
    if not saved_toml:
        return cfg
    try:
        saved = tomllib.loads(saved_toml)
    except tomllib.TOMLDecodeError as err:
        log.warning("checkpoint config.toml unreadable (%s): settings not compared", err)
        return cfg
    saved.pop("preset", None)
    model = saved.get("model")
    if isinstance(model, dict) and "encoder_init" not in model:  # written before encoder_init existed
        model["encoder_init"] = ("mae" if model.get("mae_checkpoint") else
                                 "sam" if model.get("init_checkpoint") else "random")
    kept: dict[str, Any] = {}
    for key, (old, new) in changed_settings(saved, to_dict(cfg)).items():
        if key in REFUSED:
            raise ConfigError(f"{key}: the checkpoint at step {step} was trained with {old!r}, this run "
                              f"asks for {new!r}; resuming cannot change it (use a new checkpoint.url "
                              "to start another run)")
        if key in KEPT_FROM_CHECKPOINT:
            kept[key] = tuple(old) if isinstance(old, list) else old
            if warn:
                log.warning("%s changed on resume (%r -> %r): ignored, the weights come from the checkpoint "
                            "at step %d; the config keeps %r", key, old, new, step, old)
        elif warn:
            note = " (the data order restarts if the position no longer fits)" if key.startswith("data.") else ""
            log.warning("%s changed on resume (%r -> %r): in effect from step %d%s", key, old, new, step + 1,
                        note)
    try:
        return _replace(cfg, kept)
    except ValueError as err:  # the checkpoint's values no longer validate in this version
        raise ConfigError(f"cannot restore {sorted(kept)} from the checkpoint at step {step}: {err}") from err


def apply_optim_config(optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LambdaLR,
                       model: torch.nn.Module, cfg: Config, step: int) -> None:
    """Re-derive every group's hyperparameters and the schedule from ``cfg.optim`` at ``step``.

    ``load_state_dict`` restores the saved hyperparameters with the moments; this puts
    the current config's in place (identical values when nothing changed, so a resumed
    run stays bitwise identical) and keeps the moments. The lr of ``step`` is
    ``initial_lr · lr_factor(step)``, exactly what ``LambdaLR`` computes.

    Raises:
        ConfigError: the parameter grouping changed (e.g. ``optim.no_decay_patterns``).
    """
    fresh = param_groups(model, cfg.optim)
    names = [g.get("group_name") for g in optimizer.param_groups]
    if names != [g["group_name"] for g in fresh]:
        raise ConfigError("optim: the parameter groups differ from the checkpoint's (was "
                          f"optim.no_decay_patterns changed?): {names} vs {[g['group_name'] for g in fresh]}")
    factor = lr_factor(step, cfg.optim)
    kernel = implementation(model, cfg.optim)  # optim.fused as configured now, not as saved
    for group, new in zip(optimizer.param_groups, fresh, strict=True):
        group.update(initial_lr=new["lr"], lr_scale=new["lr_scale"], weight_decay=new["weight_decay"],
                     betas=tuple(cfg.optim.betas), eps=cfg.optim.eps, **kernel)
        group["lr"] = new["lr"] * factor
    scheduler.base_lrs = [g["initial_lr"] for g in optimizer.param_groups]
    scheduler._last_lr = [g["lr"] for g in optimizer.param_groups]  # what get_last_lr() reports
