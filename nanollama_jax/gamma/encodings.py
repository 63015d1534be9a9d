"""How one tensor of a gamma is held: dense, low rank (K = b @ a) or sparse (flat positions and
values), and the Gamma itself: those tensors plus what compatibility checks need."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..config import LlamaConfig


class Dense:
    kind = "dense"

    def __init__(self, a):
        self.a = np.asarray(a, dtype=np.float32)
        self.shape = tuple(self.a.shape)

    def dense(self) -> np.ndarray:
        return self.a

    def arrays(self, key):
        return {key: self.a}


class LowRank:
    """K = b @ a, b [out, r], a [r, in]."""
    kind = "lowrank"

    def __init__(self, b, a, dtype=None):
        dtype = np.dtype(dtype or (np.float16 if np.asarray(b).dtype == np.float16 else np.float32))
        self.b = np.asarray(b, dtype=dtype)
        self.a = np.asarray(a, dtype=dtype)
        self.shape = (self.b.shape[0], self.a.shape[1])
        self.rank = self.b.shape[1]

    def dense(self) -> np.ndarray:
        return self.b.astype(np.float32) @ self.a.astype(np.float32)

    def arrays(self, key):
        return {f"{key}.lora_b": self.b, f"{key}.lora_a": self.a}


def index_dtype(size: int) -> type:
    """The smallest unsigned type that addresses every position of a tensor of `size` entries."""
    return np.uint16 if size <= 2**16 else np.uint32 if size <= 2**32 else np.uint64


class Sparse:
    """Flat positions and their values; everything else zero."""
    kind = "sparse"

    def __init__(self, shape, index, value, dtype=None):
        self.shape = tuple(int(s) for s in shape)
        size = int(np.prod(self.shape))
        self.index = np.asarray(index, dtype=index_dtype(size))
        dtype = np.dtype(dtype or (np.float16 if np.asarray(value).dtype == np.float16 else np.float32))
        self.value = np.asarray(value, dtype=dtype)

    def dense(self) -> np.ndarray:
        out = np.zeros(int(np.prod(self.shape)), np.float32)
        out[self.index] = self.value.astype(np.float32)
        return out.reshape(self.shape)

    def arrays(self, key):
        return {f"{key}.sparse_index": self.index, f"{key}.sparse_value": self.value}


def _nbytes(entry) -> int:
    return sum(a.nbytes for a in entry.arrays("k").values())


@dataclass
class Gamma:
    tensors: dict  # nanollama name -> Dense | LowRank | Sparse, in state-dict order
    config: LlamaConfig | None = None
    tokenizer_sha256: str | None = None
    base_fingerprint: str | None = None
    rank: int | None = None
    density: float | None = None
    info: dict = field(default_factory=dict)  # provenance, fidelity report, …
    source: str = "gamma"
    layout: str = "ours"  # where it was read from: ours | reference

    @property
    def kind(self) -> str:
        kinds = {e.kind for e in self.tensors.values() if len(e.shape) > 1} or {"dense"}
        return kinds.pop() if len(kinds) == 1 else "mixed"

    def shapes(self) -> dict:
        return {k: e.shape for k, e in self.tensors.items()}

    def dense(self, name) -> np.ndarray:
        return self.tensors[name].dense()

    def dense_state(self) -> dict:
        return {k: e.dense() for k, e in self.tensors.items()}

    def nbytes(self) -> int:
        return sum(_nbytes(e) for e in self.tensors.values())

    def dense_nbytes(self) -> int:
        return sum(4 * int(np.prod(e.shape)) for e in self.tensors.values())
