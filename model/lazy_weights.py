"""Checkpoint tensors known by name and shape up front, read one at a time when a model is materialised.

A checkpoint loaded for a sharded strategy (``model.init`` under fsdp or zero3) is read block by block
as ``TesseraModel.materialize`` reaches each block, so no rank holds the whole checkpoint in memory.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from common.errors import UserError


@dataclasses.dataclass(frozen=True)
class LazyTensor:
    shape: tuple[int, ...]
    load: Callable[[], torch.Tensor]


def read_lazy(path: Path) -> dict[str, LazyTensor]:
    """Every tensor of a safetensors file by name, none read yet; a missing, truncated or corrupt file
    is a one-line UserError now (safetensors checks the header against the file's size)."""
    from safetensors import safe_open

    if not path.is_file():
        raise UserError(f"{path}: weights file not found")
    try:
        handle = safe_open(str(path), framework="pt")
        shapes = {name: tuple(handle.get_slice(name).get_shape()) for name in handle.keys()}  # noqa: SIM118 (no __iter__)
    except Exception as exc:  # safetensors raises its own error types for every kind of damage
        raise _unreadable(path, exc) from None
    return {name: LazyTensor(shape, _reader(handle, path, name)) for name, shape in shapes.items()}


def _reader(handle: Any, path: Path, name: str) -> Callable[[], torch.Tensor]:
    def load() -> torch.Tensor:
        try:
            return handle.get_tensor(name)
        except Exception as exc:
            raise _unreadable(path, exc) from None

    return load


def _unreadable(path: Path, exc: Exception) -> UserError:
    return UserError(f"{path}: not a readable safetensors file ({str(exc).splitlines()[0]})")
