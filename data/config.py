"""``data:`` config section: which shards to stream and how to turn them into batches."""

from __future__ import annotations

import dataclasses
import enum
from typing import Any

from common.config import Config
from common.errors import ConfigError


class OnCorrupt(enum.StrEnum):
    fail = "fail"
    skip = "skip"


@dataclasses.dataclass
class DatasetSpec(Config):
    """One dataset of a training mixture."""

    path: str = ""
    weight: float = 1.0

    def validate(self, where: str) -> None:
        if not self.path:
            raise ConfigError(f"{where}.path: give the shard directory")
        if self.weight <= 0:
            raise ConfigError(f"{where}.weight: weight must be > 0 (a share of the mixture), got {self.weight}")


@dataclasses.dataclass
class DataConfig(Config):
    """Streaming and batching. ``train`` is a shard directory or a list of ``{path, weight}``;
    ``seed`` defaults to ``train.seed``."""

    train: str | list[DatasetSpec] = ""
    valid: str | None = None
    seq_len: int = 512
    num_workers: int = 2
    prefetch_factor: int = 4
    shuffle: bool = True
    shuffle_buffer: int = 8192
    seed: int | None = None
    on_corrupt: OnCorrupt = OnCorrupt.fail
    verify_checksums: bool = True
    allow_pipe: bool = False
    packing: bool = False  # SFT: pack conversations into rows like pretraining (clm always packs)
    mlm_probability: float = 0.15
    mlm_mask_fraction: float = 0.8
    mlm_random_fraction: float = 0.1
    span_noise_density: float = 0.15
    span_mean_length: float = 3.0

    @classmethod
    def preprocess(cls, raw: dict[str, Any], where: str) -> dict[str, Any]:
        if isinstance(raw.get("train"), dict):  # a single {path, weight} mapping
            raw = {**raw, "train": [raw["train"]]}
        return raw

    def validate(self, where: str) -> None:
        def key(name: str) -> str:
            return f"{where}.{name}" if where else name

        if isinstance(self.train, list) and not self.train:
            raise ConfigError(f"{key('train')}: the list of datasets is empty")
        if self.seq_len < 2:
            raise ConfigError(f"{key('seq_len')}: must be at least 2, got {self.seq_len}")
        for name in ("num_workers", "shuffle_buffer"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{key(name)}: must not be negative")
        if self.prefetch_factor < 1:
            raise ConfigError(f"{key('prefetch_factor')}: must be at least 1")
        for name in ("mlm_probability", "span_noise_density"):
            if not 0 < getattr(self, name) < 1:
                raise ConfigError(f"{key(name)}: must be between 0 and 1, got {getattr(self, name)}")
        if self.mlm_mask_fraction < 0 or self.mlm_random_fraction < 0 or \
                self.mlm_mask_fraction + self.mlm_random_fraction > 1:
            raise ConfigError(f"{key('mlm_mask_fraction')} + {key('mlm_random_fraction')} must lie in [0, 1]")
        if self.span_mean_length < 1:
            raise ConfigError(f"{key('span_mean_length')}: must be at least 1, got {self.span_mean_length}")

    def datasets(self) -> list[DatasetSpec]:
        """``train`` as a list of weighted datasets."""
        if isinstance(self.train, str):
            if not self.train:
                raise ConfigError("data.train is not set: give a shard directory (made by `tessera shard`)")
            return [DatasetSpec(self.train, 1.0)]
        return list(self.train)
