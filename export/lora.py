"""A gamma → a llama.cpp LoRA adapter GGUF, applied on top of the base model's GGUF.

    python -m export.lora pirate.npz --base base-f32.gguf -o pirate-lora.gguf
    llama-cli -m base-f32.gguf --lora pirate-lora.gguf …       # or llama_cpp.Llama(lora_path=…)

The file follows llama.cpp's convert_lora_to_gguf.py: general.architecture=llama,
general.type=adapter, adapter.type=lora, adapter.lora.alpha; for each base tensor X a pair
`X.lora_a` (numpy [r, in]) and `X.lora_b` ([out, r]); llama.cpp adds scale·B·A·x with
scale = alpha / r. Here alpha is the largest rank in the file and each B is multiplied by
r_X / alpha, so every tensor's delta is applied with weight exactly 1 (llama.cpp's --lora-scale then
plays the role of gamma's α).

* Matrices (q, k, v, o, gate, up, down, output head): a dense gamma is factored exactly at full
  rank (B = the delta, A = identity when out ≥ in, else B = identity, A = the delta); a low-rank
  gamma keeps its factors (rank r); a sparse one is densified (full rank). Q and K rows of B are
  permuted exactly like the base export (`export.gguf.permute_qk`), the output head's B is trimmed
  to the vocabulary rows like the base.
* The token embedding is carried too: llama.cpp applies a token_embd adapter as
  get_rows(A, tokens)·Bᵀ, with A [vocab, r] and B [embd, r] (A and B swap roles there).
* Norm deltas are folded into the matrices the norm feeds (attn_norm → q, k, v; ffn_norm → gate, up;
  output_norm → output): llama.cpp computes W·diag(g)·r(x) with the base norm g, the personality
  W'·diag(g')·r(x), so the matrix's delta becomes W'·diag(g'/g) − W = γ_W·diag(s) + W·diag(s − 1) with
  s = g'/g, W read from the base GGUF (dequantized: the weights llama.cpp itself multiplies by).
  What is exact: a dense gamma's adapter (full rank) is exact; a rank-r gamma whose norm changed at k
  positions gets rank r + k (B = [B_γ, W[:, J]·(s−1)_J], A = [A_γ·diag(s); I_J]), also exact, and a
  matrix where r + k reaches min(out, in) is carried at full rank, exact again. So the adapter equals the
  injected model up to float32 rounding, with no truncation anywhere; the price is size (a norm that
  changed everywhere makes the matrices it feeds full rank). A base norm entry of 0 whose personality
  value is not 0 cannot be folded (no scale turns 0 into it): refused, naming the tensor.
* `--max-rank R` caps every adapter matrix at rank R by truncated SVD of its delta (the best rank-R
  approximation: Frobenius error sqrt(Σ_{i>R} σ_i²), Eckart–Young); the largest relative error is reported.
  Without it nothing is truncated and the adapter is exact.

Checks before anything is written: the base GGUF's config and tensor shapes against the gamma
(and the tokenizer hash, when the GGUF carries our tokenizer and the gamma records one).
The output is written to a temporary name and renamed when complete.
"""
from __future__ import annotations

import base64
import hashlib
import sys
from pathlib import Path

import numpy as np

from export.gguf import TOKENIZER_KEY, VOCAB_TENSORS, gguf_name, permute_qk
from nanollama_base.files import atomic_path
from nanollama_jax.gamma import ARCH_FIELDS, Gamma, load_gamma

EMBED = "tok_embeddings.weight"


# which matrices each norm feeds (their input columns are scaled by it)
NORM_FEEDS = {"attn_norm.weight": ("attn.c_q.weight", "attn.c_k.weight", "attn.c_v.weight"),
              "ffn_norm.weight": ("ffn.gate_proj.weight", "ffn.up_proj.weight")}


def norm_feeds(name: str) -> tuple[str, ...]:
    """The state-dict names of the matrices a norm's output multiplies."""
    if name == "norm.weight":
        return ("output.weight",)
    _, i, rest = name.split(".", 2)
    return tuple(f"layers.{i}.{m}" for m in NORM_FEEDS[rest])


def _factors(entry) -> tuple[np.ndarray, np.ndarray]:
    """(B [out, r], A [r, in]) with B @ A == the delta (nanollama [out, in] orientation)."""
    if entry.kind == "lowrank":
        return entry.b.astype(np.float32), entry.a.astype(np.float32)
    return _full_rank(entry.dense())


def _full_rank(d: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    out, inp = d.shape
    if out >= inp:
        return d, np.eye(inp, dtype=np.float32)
    return np.eye(out, dtype=np.float32), d


def _folded(entry, w: np.ndarray, scale: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(B, A) of W'·diag(s) − W = γ·diag(s) + W·diag(s − 1), exactly (see the module docstring)."""
    j = np.flatnonzero(scale != 1)
    fold_b = w[:, j] * (scale[j] - 1)[None, :]
    fold_a = np.zeros((len(j), w.shape[1]), np.float32)
    fold_a[np.arange(len(j)), j] = 1
    if entry is None:
        b, a = np.zeros((w.shape[0], 0), np.float32), np.zeros((0, w.shape[1]), np.float32)
    elif entry.kind == "lowrank":
        b, a = entry.b.astype(np.float32), entry.a.astype(np.float32)
    else:
        b = a = None
    if b is None or b.shape[1] + len(j) >= min(w.shape):
        gamma = entry.dense() if entry is not None else 0
        return _full_rank(np.asarray((w + gamma) * scale[None, :] - w, np.float32))
    return np.concatenate([b, fold_b], 1), np.concatenate([a * scale[None, :], fold_a], 0)


def _truncate(b: np.ndarray, a: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray, float]:
    """The best rank-`rank` factors of B @ A (SVD through QR of both factors) and the relative Frobenius
    error of dropping the rest."""
    qb, rb = np.linalg.qr(b.astype(np.float64))
    qa, ra = np.linalg.qr(a.T.astype(np.float64))
    u, sv, vt = np.linalg.svd(rb @ ra.T)
    total = float(np.sum(sv ** 2))
    err = float(np.sqrt(np.sum(sv[rank:] ** 2) / total)) if total else 0.0
    return ((qb @ u[:, :rank]) * sv[:rank]).astype(np.float32), (qa @ vt[:rank].T).T.astype(np.float32), err


def _norm_scales(g: Gamma, load) -> tuple[dict, list]:
    """({matrix name: s = g'/g} for every matrix fed by a norm whose gamma is nonzero, [those norms' GGUF
    names]); `load(name)` gives a base tensor's values."""
    scales, folded = {}, []
    for name, entry in g.tensors.items():
        if len(entry.shape) != 1 or not np.any(entry.dense()):
            continue
        base = load(name).astype(np.float32)
        new = base + entry.dense()
        bad = np.flatnonzero((base == 0) & (new != 0))
        if len(bad):
            raise ValueError(f"cannot fold the change of {gguf_name(name)} into a LoRA adapter: its base value is 0 "
                             f"at {len(bad)} position(s) (first {int(bad[0])}) where the personality's is not; "
                             "inject the gamma and export the whole model instead")
        s = np.divide(new, base, out=np.ones_like(base), where=base != 0)
        for m in norm_feeds(name):
            scales[m] = s
        folded.append(gguf_name(name))
    return scales, folded


def plan_adapter(g: Gamma, config, base_shapes: dict, load, max_rank: int | None = None) -> tuple[list, list, dict]:
    """([(state-dict name, gguf name, B, A)], [norms folded], {gguf name: relative error of truncation});
    norm changes folded into the matrices they feed; ranks above `max_rank` truncated. `base_shapes`
    ({name: shape}, in state-dict order) and `load(name)` (its values) describe the base: only the norms
    that changed and the matrices they feed are loaded."""
    missing = [n for n in g.tensors if n not in base_shapes]
    if missing:
        raise ValueError(f"the base GGUF lacks tensor(s) for {', '.join(gguf_name(n) for n in missing[:5])}")
    for name, entry in g.tensors.items():
        if base_shapes[name] != entry.shape:
            raise ValueError(f"base GGUF tensor {gguf_name(name)} has shape {list(base_shapes[name])} "
                             f"(vocabulary rows padded), the gamma's is {list(entry.shape)}")
    scales, folded = _norm_scales(g, load)
    pairs, errors = [], {}
    for name, shape in base_shapes.items():
        entry = g.tensors.get(name)
        if len(shape) < 2 or (entry is None and name not in scales):
            continue
        if name in scales:
            b, a = _folded(entry, load(name), scales[name])
        else:
            b, a = _factors(entry)
        if max_rank is not None and b.shape[1] > max_rank:
            b, a, errors[gguf_name(name)] = _truncate(b, a, max_rank)
        if name in VOCAB_TENSORS:  # rows are tokens: trimmed to the vocabulary like the base export
            b = b[: config.vocab_size]
        if name.endswith("attn.c_q.weight"):
            b = permute_qk(b, config.n_head)
        elif name.endswith("attn.c_k.weight"):
            b = permute_qk(b, config.n_kv_head)
        if not np.any(b) or not np.any(a):
            continue  # a zero delta: nothing to carry
        pairs.append((name, gguf_name(name), np.ascontiguousarray(b, np.float32), np.ascontiguousarray(a, np.float32)))
    return pairs, folded, errors


def write_lora(g: Gamma, base_gguf, output, dtype: str = "f32", name: str | None = None,
               max_rank: int | None = None) -> dict:
    import gguf

    from export.gguf_read import config_from_gguf, open_gguf, state_shapes

    base_gguf = Path(base_gguf)
    reader = open_gguf(base_gguf)
    config = config_from_gguf(reader, str(base_gguf))
    diffs = []
    if g.config is not None:
        a, b = {f: getattr(g.config, f) for f in ARCH_FIELDS}, {f: getattr(config, f) for f in ARCH_FIELDS}
        diffs += [f"{k} {a[k]} vs {b[k]}" for k in ARCH_FIELDS if a[k] != b[k]]
    tok = reader.fields.get(TOKENIZER_KEY)
    if tok is not None and g.tokenizer_sha256:
        sha = hashlib.sha256(base64.b64decode(tok.contents())).hexdigest()
        if sha != g.tokenizer_sha256:
            diffs.append(f"tokenizer sha256 {g.tokenizer_sha256[:12]}… vs {sha[:12]}…")
    if diffs:
        raise ValueError(f"cannot export: gamma {g.source} vs base {base_gguf}: " + ", ".join(diffs))
    if max_rank is not None and max_rank < 1:
        raise ValueError(f"--max-rank must be >= 1, got {max_rank}")
    pairs, folded, errors = plan_adapter(g, config, *state_shapes(reader, config, str(base_gguf)), max_rank)
    if not pairs:
        raise ValueError(f"{g.source}: the gamma has no nonzero matrix delta to carry")
    alpha = max(b.shape[1] for _, _, b, _ in pairs)
    qtype = {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16}[dtype]
    np_dtype = np.float32 if dtype == "f32" else np.float16
    output = Path(output)
    with atomic_path(output) as tmp:
        w = gguf.GGUFWriter(tmp, "llama")
        try:
            w.add_type(gguf.GGUFType.ADAPTER)
            w.add_string(gguf.Keys.Adapter.TYPE, "lora")
            w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(alpha))
            w.add_name(name or Path(g.source).stem)
            for sd_name, gname, b, a in pairs:
                r = b.shape[1]
                b = b * np.float32(r / alpha) if r != alpha else b
                base = gname[: -len(".weight")] if gname.endswith(".weight") else gname
                if sd_name == EMBED:
                    lora_a, lora_b = b, a.T  # A [vocab, r], B [embd, r]
                else:
                    lora_a, lora_b = a, b  # A [r, in], B [out, r]
                w.add_tensor(f"{base}.weight.lora_a", np.ascontiguousarray(lora_a, np_dtype), raw_dtype=qtype)
                w.add_tensor(f"{base}.weight.lora_b", np.ascontiguousarray(lora_b, np_dtype), raw_dtype=qtype)
            w.write_header_to_file()
            w.write_kv_data_to_file()
            w.write_tensors_to_file()
            w.flush()
        finally:
            w.close()
    return {"path": str(output), "tensors": len(pairs), "alpha": alpha, "folded": folded, "truncated": errors,
            "ranks": {gname: b.shape[1] for _, gname, b, _ in pairs}, "bytes": output.stat().st_size}


def main(argv=None):
    from nanollama_base.cli import ArgumentParser, run_cli

    p = ArgumentParser(prog="python -m export.lora", description=__doc__)
    p.add_argument("gamma", help="gamma .npz (ours, dense or compressed, or the reference's layout)")
    p.add_argument("--base", required=True, help="the base model's GGUF (python -m export.gguf)")
    p.add_argument("-o", "--output", required=True, help="adapter .gguf to write")
    p.add_argument("--dtype", choices=("f32", "f16"), default="f32", help="storage of A and B (default f32)")
    p.add_argument("--name", help="general.name (default: the gamma file's stem)")
    p.add_argument("--max-rank", type=int,
                   help="cap every adapter matrix at this rank (truncated SVD; the error is reported); "
                        "default: no cap, exact")
    args = p.parse_args(argv)

    def run():
        g = load_gamma(args.gamma)
        info = write_lora(g, args.base, args.output, args.dtype, args.name, args.max_rank)
        if info["folded"]:
            print(f"norm changes folded into the matrices they feed: {', '.join(info['folded'])}")
        if info["truncated"]:
            worst = max(info["truncated"], key=info["truncated"].get)
            print(f"truncated {len(info['truncated'])} matrices to rank {args.max_rank}: largest relative "
                  f"Frobenius error {info['truncated'][worst]:.3g} ({worst})")
        ranks = sorted(set(info["ranks"].values()))
        print(f"wrote {info['path']} ({info['tensors']} LoRA pairs, rank {'/'.join(map(str, ranks))}, "
              f"alpha {info['alpha']}, {info['bytes']:,} bytes)")

    run_cli(p.prog, run)


if __name__ == "__main__":
    sys.exit(main())
