"""Reading SAM weights from any URL and exporting to the official ``.pth`` format."""

from __future__ import annotations

import io
from typing import Any

import torch
import torch.nn as nn

from trainer import storage

#: Prefixes added by wrappers (DDP, torch.compile) that the official format lacks.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def strip_wrapper_prefix(name: str) -> str:
    """``module._orig_mod.image_encoder.x`` -> ``image_encoder.x`` (DDP / compile prefixes)."""
    changed = True
    while changed:
        changed = False
        for prefix in _WRAPPER_PREFIXES:
            if name.startswith(prefix):
                name, changed = name[len(prefix):], True
    return name


def clean_state_dict(state_dict: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Strip DDP/compile prefixes so keys match the official ``Sam`` exactly."""
    return {strip_wrapper_prefix(key): value for key, value in state_dict.items()}


def _load_bytes(url: str) -> Any:
    with storage.open_url(url, "rb") as f:
        data = f.read()
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


def read_state_dict(url: str) -> dict[str, torch.Tensor]:
    """Load SAM weights from ``url``: an official ``.pth`` (a flat state_dict), a file or
    dict holding them under ``model``, or a checkpoint step directory with ``model.pt``."""
    fs, path = storage.url_to_fs(url)
    if fs.isdir(path):
        from trainer.checkpoint import stored_file_url  # a step dir: its manifest names the file

        url = stored_file_url(url, "model.pt")
    obj = _load_bytes(url)
    if isinstance(obj, dict) and "model" in obj and isinstance(obj["model"], dict):
        obj = obj["model"]
    if not isinstance(obj, dict):
        raise ValueError(f"{url}: expected a state_dict, got {type(obj).__name__}")
    return clean_state_dict(obj)


def export_official(model_or_state: nn.Module | dict[str, torch.Tensor], out_url: str) -> str:
    """Write weights as the official SAM ``.pth`` (a flat fp32 state_dict) that
    ``segment_anything.sam_model_registry[variant](checkpoint=...)`` loads."""
    state = model_or_state.state_dict() if isinstance(model_or_state, nn.Module) else model_or_state
    state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in clean_state_dict(state).items()}
    buf = io.BytesIO()
    torch.save(state, buf)
    fs, path = storage.url_to_fs(out_url)
    parent = path.rsplit("/", 1)[0] if "/" in path else ""
    if parent:
        fs.makedirs(parent, exist_ok=True)
    with fs.open(path, "wb") as f:
        f.write(buf.getvalue())
    return out_url
