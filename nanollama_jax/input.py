"""Input pipeline: token shards -> deterministic global batches, with grain.

* :class:`TokenWindows` is a grain ``RandomAccessDataSource`` over a shard folder, memory
  mapped. Window ``i`` is tokens ``[i*seq_len, i*seq_len + seq_len + 1)`` of the split's
  shards read as one stream: consecutive windows overlap by exactly one token, so every
  token is a prediction target exactly once per epoch (inputs = ``w[:-1]``, targets =
  ``w[1:]``). Windows may span shard boundaries; only the stream's last partial window is
  unused.
* Each corpus becomes ``grain.MapDataset.source(windows).shuffle(seed_c)``: element ``j``
  is a pure function of ``(seed, j)``, and epochs beyond the first are reshuffled by grain
  (``index // len`` picks the epoch's permutation). Corpora of fewer than 65,536 windows
  use a cached per-epoch permutation with the same semantics instead (grain's
  index_shuffle takes milliseconds per element on tiny ranges). Several corpora are mixed with
  ``grain.MapDataset.mix`` at the requested weights (a fixed interleaving, so the shares
  are exact up to rounding of the weights).
* Global batch ``k`` has ``global_batch`` rows: ``P = int(global_batch * personality_ratio)``
  rows (spread evenly over the batch) are personality windows ``k*P … k*P+P-1`` of their own
  shuffled stream, the others are base windows ``k*(B-P) …``. Process ``p`` of ``N`` reads
  rows ``[p*B/N, (p+1)*B/N)`` and nothing else. So batch ``k`` needs no earlier batch, and
  the same seed gives the same batches in any process and on any process count.

nanollama's own folders (``train_*.bin`` + ``val_*.bin`` side by side) read as they are:
the training split is ``train_*`` only.
"""

from __future__ import annotations

import bisect
import functools
import hashlib
import json
import math
import pathlib

import grain
import numpy as np

from nanollama_base.shards import DataError, load_meta

__all__ = ["Batches", "DataError", "TokenWindows", "load_meta", "validation_batches"]


class TokenWindows:
    """grain RandomAccessDataSource of ``seq_len + 1``-token windows (int32) over shards.

    ``tile=True`` (for small personality corpora) first repeats the whole token stream
    until it holds at least one window.
    """

    def __init__(self, shards, dtype, seq_len: int, *, name: str = "", tile: bool = False):
        if seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {seq_len}")
        self._paths = [str(s["path"]) for s in shards if s["tokens"] > 0]
        self._sizes = [int(s["tokens"]) for s in shards if s["tokens"] > 0]
        self._dtype = np.dtype(dtype)
        self.seq_len = seq_len
        self.name = name
        self._starts = [0]
        for n in self._sizes:
            self._starts.append(self._starts[-1] + n)
        self.total_tokens = self._starts[-1]
        self._maps = None
        self._tiled = None
        if tile and 0 < self.total_tokens < seq_len + 1:
            stream = np.concatenate([np.asarray(m) for m in self._memmaps()]).astype(np.int32)
            reps = math.ceil((seq_len + 1) / len(stream))
            self._tiled = np.tile(stream, reps)
            self._maps = None
        n = len(self._tiled) if self._tiled is not None else self.total_tokens
        self._len = max(0, (n - 1) // seq_len)

    def _memmaps(self):
        if self._maps is None:
            maps = []
            for p, n in zip(self._paths, self._sizes):
                try:
                    maps.append(np.memmap(p, dtype=self._dtype, mode="r", shape=(n,)))
                except (OSError, ValueError) as e:
                    raise DataError(f"{p}: cannot map shard ({e})") from None
            self._maps = maps
        return self._maps

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, index: int) -> np.ndarray:
        index = int(index)
        if not 0 <= index < self._len:
            raise IndexError(f"window {index} out of range [0, {self._len})")
        start = index * self.seq_len
        stop = start + self.seq_len + 1
        if self._tiled is not None:
            return self._tiled[start:stop].copy()
        maps = self._memmaps()
        s = bisect.bisect_right(self._starts, start) - 1
        out = np.empty(self.seq_len + 1, dtype=np.int32)
        pos = 0
        while pos < len(out):
            lo = start + pos - self._starts[s]
            take = min(len(out) - pos, self._sizes[s] - lo)
            out[pos:pos + take] = maps[s][lo:lo + take]
            pos += take
            s += 1
        return out

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_maps"] = None
        return state

    def __repr__(self) -> str:
        return (f"TokenWindows(name={self.name!r}, shards={len(self._paths)}, tokens={self.total_tokens}, "
                f"seq_len={self.seq_len}, windows={self._len}, tiled={self._tiled is not None})")


GRAIN_SHUFFLE_MIN = 65536


@functools.lru_cache(maxsize=8)
def epoch_permutation(seed: int, epoch: int, n: int) -> np.ndarray:
    """The order of `n` items in `epoch`: a pure function of (seed, epoch), cached for the few epochs a
    run's recent batches span."""
    perm = np.random.default_rng([seed, epoch]).permutation(n)
    perm.flags.writeable = False  # shared by every caller of the cache
    return perm


class _EpochPermutation(grain.MapDataset):
    """Per-epoch shuffle for small datasets, with the semantics of grain's ``shuffle``
    (element ``i`` of epoch ``e`` is ``parent[perm_e[i] + e*len]``, a pure function of
    ``(seed, index)``). grain's index_shuffle costs milliseconds per element when the
    dataset has few elements (e.g. a short personality corpus); a cached per-epoch
    permutation costs microseconds."""

    def __init__(self, parent: grain.MapDataset, seed: int):
        super().__init__(parent)
        self._seed = int(seed)

    def __len__(self) -> int:
        return len(self._parent)

    def __str__(self) -> str:
        return "EpochPermutation"

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        epoch, i = divmod(int(index), len(self._parent))
        return self._parent[int(epoch_permutation(self._seed, epoch, len(self._parent))[i]) + epoch * len(self._parent)]


def _shuffled(windows: "TokenWindows", seed: int) -> grain.MapDataset:
    ds = grain.MapDataset.source(windows)
    return ds.shuffle(seed=seed) if len(windows) >= GRAIN_SHUFFLE_MIN else _EpochPermutation(ds, seed)


def _derive_seed(seed: int, *tags) -> int:
    h = hashlib.sha256(json.dumps([int(seed), *tags]).encode()).digest()
    return int.from_bytes(h[:4], "little")


def _identity(meta: dict, split: str) -> dict:
    """What identifies a corpus's content (not its path, so a moved folder still matches)."""
    return {"kind": meta["kind"], "vocab_size": meta["vocab_size"], "dtype": meta["dtype"].name,
            "tokenizer_sha256": meta["tokenizer_sha256"], "split": split,
            "shards": [[pathlib.Path(s["path"]).name, s["tokens"]] for s in meta[split]["shards"]]}


def _check_same_tokenizer(base: dict, other: dict, what: str) -> None:
    if other["vocab_size"] != base["vocab_size"]:
        raise DataError(f"{other['dir']}: {what} has vocab size {other['vocab_size']}, "
                        f"but {base['dir']} has {base['vocab_size']}")
    a, b = base["tokenizer_sha256"], other["tokenizer_sha256"]
    if a and b and a != b:
        raise DataError(f"{other['dir']}: {what} was tokenized with another tokenizer "
                        f"(sha256 {b[:12]}… vs {a[:12]}… in {base['dir']})")


def _windows(meta: dict, split: str, seq_len: int, *, tile: bool = False, what: str = "") -> TokenWindows:
    info = meta[split]
    w = TokenWindows(info["shards"], meta["dtype"], seq_len, name=f"{meta['dir']}:{split}", tile=tile)
    if info["tokens"] == 0:
        raise DataError(f"{meta['dir']}: {what or split} split is empty (no tokens)")
    if len(w) == 0:
        raise DataError(f"{meta['dir']}: {what or split} split has {info['tokens']} tokens, "
                        f"fewer than one window of seq_len+1 = {seq_len + 1}")
    return w


class Batches:
    """Deterministic global batches; ``batches[k]`` is this process's rows of global batch k.

    ``mixture`` ({corpus_dir: weight}) replaces ``data_dir`` as the set of training corpora
    (``data_dir`` still gives the tokenizer every corpus must share). ``personality_dir``
    with ``personality_ratio`` puts exactly ``int(global_batch * ratio)`` personality rows
    in every global batch.
    """

    def __init__(self, data_dir, *, split: str = "train", seq_len: int, global_batch: int, seed: int = 0,
                 process_index: int = 0, process_count: int = 1, personality_dir=None,
                 personality_ratio: float = 0.0, mixture=None):
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        if global_batch < 1 or process_count < 1 or global_batch % process_count:
            raise ValueError(f"global_batch {global_batch} must be a positive multiple of process_count {process_count}")
        if not 0 <= process_index < process_count:
            raise ValueError(f"process_index {process_index} not in [0, {process_count})")
        if not 0.0 <= personality_ratio < 1.0:
            raise ValueError(f"personality_ratio must be in [0, 1), got {personality_ratio}")
        if not 0 <= int(seed) < 2**32:
            raise ValueError(f"seed must be in [0, 2**32), got {seed}")
        self.seq_len, self.global_batch, self.seed = int(seq_len), int(global_batch), int(seed)
        self.process_index, self.process_count = int(process_index), int(process_count)
        self.split = split
        self.local_batch = global_batch // process_count

        base = load_meta(data_dir)
        self.meta = base
        self.vocab_size: int = base["vocab_size"]
        self.bos_id: int = base["bos_id"]
        self.eos_id: int = base["eos_id"]
        self.tokenizer_path = base["tokenizer_path"]
        self.tokenizer_sha256 = base["tokenizer_sha256"]

        corpora = {data_dir: 1.0} if not mixture else dict(mixture)
        if any(float(w) <= 0 for w in corpora.values()):
            raise ValueError(f"mixture weights must be positive, got {list(corpora.values())}")
        total_w = sum(float(w) for w in corpora.values())
        self.corpora = []
        datasets, weights, ident = [], [], []
        for i, (path, w) in enumerate(corpora.items()):
            m = base if pathlib.Path(path).expanduser().resolve() == base["dir"].resolve() else load_meta(path)
            _check_same_tokenizer(base, m, "corpus")
            win = _windows(m, split, self.seq_len)
            datasets.append(_shuffled(win, _derive_seed(seed, "corpus", i)))
            weights.append(float(w) / total_w)
            self.corpora.append({"dir": m["dir"], "weight": float(w) / total_w, "windows": len(win)})
            ident.append({"corpus": _identity(m, split), "weight": float(w) / total_w})
        self._base = datasets[0] if len(datasets) == 1 else grain.MapDataset.mix(datasets, weights)

        self.personality_rows = int(global_batch * personality_ratio) if personality_dir else 0
        if personality_ratio > 0 and personality_dir is None:
            raise ValueError("personality_ratio > 0 needs personality_dir")
        self._pers = None
        pers_ident = None
        if personality_dir is not None and personality_ratio > 0:
            pm = load_meta(personality_dir)
            _check_same_tokenizer(base, pm, "personality data")
            pwin = _windows(pm, "train", self.seq_len, tile=True, what="personality")
            self._pers = _shuffled(pwin, _derive_seed(seed, "personality"))
            pers_ident = {"corpus": _identity(pm, "train"), "ratio": personality_ratio,
                          "rows": self.personality_rows}
        # Row r of a global batch is personality iff floor((r+1)P/B) > floor(rP/B): P rows, spread evenly.
        B, P = self.global_batch, self.personality_rows
        self._row_plan = []  # (is_personality, ordinal within its stream for this batch)
        bi = pi = 0
        for r in range(B):
            if P and (r + 1) * P // B > r * P // B:
                self._row_plan.append((True, pi))
                pi += 1
            else:
                self._row_plan.append((False, bi))
                bi += 1
        lo = self.process_index * self.local_batch
        self._my_rows = self._row_plan[lo:lo + self.local_batch]

        blob = json.dumps({"corpora": ident, "personality": pers_ident, "seed": self.seed,
                           "seq_len": self.seq_len, "global_batch": self.global_batch, "split": split,
                           "version": 1}, sort_keys=True)
        self.fingerprint: str = hashlib.sha256(blob.encode()).hexdigest()

    def epoch(self, k: int) -> float:
        """Passes over the base data after global batch k (for a mixture: of the corpus its
        weight repeats most)."""
        rows = (self.global_batch - self.personality_rows) * (int(k) + 1)
        return max(rows * c["weight"] / c["windows"] for c in self.corpora) if rows else 0.0

    def row_sources(self) -> list[str]:
        """For each row of a global batch: "personality" or "base"."""
        return ["personality" if p else "base" for p, _ in self._row_plan]

    def __getitem__(self, k: int) -> np.ndarray:
        k = int(k)
        if k < 0:
            raise IndexError("batch index must be >= 0")
        B, P = self.global_batch, self.personality_rows
        out = np.empty((self.local_batch, self.seq_len + 1), dtype=np.int32)
        for row, (is_pers, j) in enumerate(self._my_rows):
            if is_pers:
                out[row] = self._pers[k * P + j]
            else:
                out[row] = self._base[k * (B - P) + j]
        return out

    def __iter__(self):
        k = 0
        while True:
            yield self[k]
            k += 1

    def __repr__(self) -> str:
        return (f"Batches(corpora={[str(c['dir']) for c in self.corpora]}, seq_len={self.seq_len}, "
                f"global_batch={self.global_batch}, seed={self.seed}, process={self.process_index}/"
                f"{self.process_count}, personality_rows={self.personality_rows})")


def validation_batches(data_dir, *, seq_len: int, batch_size: int, max_batches: int) -> list[np.ndarray]:
    """Fixed held-out batches from the val split (``val/`` or nanollama's ``val_*.bin``), in
    stream order: windows 0, 1, 2, … grouped ``batch_size`` at a time, at most
    ``max_batches`` full batches. A val split with fewer than ``batch_size`` windows gives one
    batch with its windows repeated cyclically (and one shorter than a window is tiled first). Deterministic; never touches training shards."""
    if batch_size < 1 or max_batches < 1:
        raise ValueError("batch_size and max_batches must be >= 1")
    meta = load_meta(data_dir)
    if not meta["val"]["shards"]:
        raise DataError(f"{meta['dir']}: no validation shards (val/ or val_*.bin)")
    win = _windows(meta, "val", seq_len, tile=True)  # a val split shorter than a window is repeated
    n = len(win)
    if n < batch_size:
        return [np.stack([win[i % n] for i in range(batch_size)])]
    count = min(max_batches, n // batch_size)
    return [np.stack([win[b * batch_size + i] for i in range(batch_size)]) for b in range(count)]
