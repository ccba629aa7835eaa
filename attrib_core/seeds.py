"""Seeds derived from integers: one generator per (seed, step, ...) key, so random steps stay pure."""

from __future__ import annotations

from typing import Sequence, Union

import torch

from ._checks import check_count

__all__ = ["mix", "generator"]

_MASK64 = (1 << 64) - 1

Key = Union[int, Sequence[int]]


def mix(*words: int) -> int:
    """A 63-bit seed from integers, by splitmix64 (Steele, Lea & Flood, 2014) folded over them."""
    h = 0x9E3779B97F4A7C15
    for word in words:
        h = (h ^ (word & _MASK64)) * 0xBF58476D1CE4E5B9 & _MASK64
        h = (h ^ (h >> 27)) * 0x94D049BB133111EB & _MASK64
        h ^= h >> 31
    return h >> 1


def generator(key: Key, name: str = "seed") -> torch.Generator:
    """A CPU generator seeded by an integer ``>= 0`` or by a tuple of them (mixed); torch's global RNG untouched."""
    words = (key,) if not isinstance(key, (tuple, list)) else tuple(key)
    for i, word in enumerate(words):
        check_count(word, name if len(words) == 1 else f"{name}[{i}]", minimum=0)
    return torch.Generator().manual_seed(words[0] if len(words) == 1 else mix(*words))
