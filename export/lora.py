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
* Norm deltas (attn_norm, ffn_norm, output_norm) cannot be carried: llama.cpp applies LoRA to
  matrix multiplications only. Any nonzero norm delta is named in a warning line;
  `--require-complete` makes it an error. (Inject the gamma and export the whole model to carry it.)

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

from export.gguf import TOKENIZER_KEY, VOCAB_TENSORS, gguf_name, gguf_shape, permute_qk
from nanollama_base.files import atomic_path
from nanollama_jax.gamma import ARCH_FIELDS, Gamma, load_gamma

EMBED = "tok_embeddings.weight"


def _factors(entry, name: str):
    """(B [out, r], A [r, in]) with B @ A == the delta (nanollama [out, in] orientation)."""
    if entry.kind == "lowrank":
        return entry.b, entry.a
    d = entry.dense()
    out, inp = d.shape
    if out >= inp:
        return d, np.eye(inp, dtype=np.float32)
    return np.eye(out, dtype=np.float32), d


def plan_adapter(g: Gamma, config, base_tensors: dict) -> tuple[list, list]:
    """([(gguf tensor name, array)], [names not carried]); checks shapes against the base GGUF."""
    pairs, not_carried = [], []
    missing = [n for n in g.tensors if gguf_name(n) not in base_tensors]
    if missing:
        raise ValueError(f"the base GGUF lacks tensor(s) for {', '.join(missing[:5])}")
    for name, entry in g.tensors.items():
        gname = gguf_name(name)
        want = gguf_shape(name, config)
        if base_tensors[gname] != want:
            raise ValueError(f"base GGUF tensor {gname} has shape {list(base_tensors[gname])}, expected {list(want)}")
        if len(entry.shape) < 2:
            if np.any(entry.dense()):
                not_carried.append(gname)
            continue
        b, a = _factors(entry, name)
        if name in VOCAB_TENSORS:  # rows are tokens: trimmed to the vocabulary like the base export
            b = b[: config.vocab_size]
        if name.endswith("attn.c_q.weight"):
            b = permute_qk(b, config.n_head)
        elif name.endswith("attn.c_k.weight"):
            b = permute_qk(b, config.n_kv_head)
        if not np.any(b) or not np.any(a):
            continue  # a zero delta: nothing to carry
        pairs.append((name, gname, np.ascontiguousarray(b, np.float32), np.ascontiguousarray(a, np.float32)))
    return pairs, not_carried


def write_lora(g: Gamma, base_gguf, output, dtype: str = "f32", require_complete: bool = False,
               name: str | None = None) -> dict:
    import gguf

    from export.gguf_read import config_from_gguf, open_gguf

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
    base_tensors = {t.name: tuple(int(n) for n in reversed(t.shape.tolist())) for t in reader.tensors}
    pairs, not_carried = plan_adapter(g, config, base_tensors)
    if not_carried and require_complete:
        raise ValueError(f"llama.cpp LoRA cannot carry the nonzero norm deltas of {', '.join(not_carried)}; "
                         "inject the gamma and export the whole model instead")
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
    return {"path": str(output), "tensors": len(pairs), "alpha": alpha, "not_carried": not_carried,
            "ranks": {gname: b.shape[1] for _, gname, b, _ in pairs}, "bytes": output.stat().st_size}


def main(argv=None):
    from nanollama_base.cli import ArgumentParser, run_cli

    p = ArgumentParser(prog="python -m export.lora", description=__doc__)
    p.add_argument("gamma", help="gamma .npz (ours, dense or compressed, or the reference's layout)")
    p.add_argument("--base", required=True, help="the base model's GGUF (python -m export.gguf)")
    p.add_argument("-o", "--output", required=True, help="adapter .gguf to write")
    p.add_argument("--dtype", choices=("f32", "f16"), default="f32", help="storage of A and B (default f32)")
    p.add_argument("--require-complete", action="store_true",
                   help="fail instead of warning when part of the gamma (norm deltas) cannot be carried")
    p.add_argument("--name", help="general.name (default: the gamma file's stem)")
    args = p.parse_args(argv)

    def run():
        g = load_gamma(args.gamma)
        info = write_lora(g, args.base, args.output, args.dtype, args.require_complete, args.name)
        if info["not_carried"]:
            print(f"warning: not carried (llama.cpp LoRA applies to matrices only): {', '.join(info['not_carried'])}",
                  file=sys.stderr)
        ranks = sorted(set(info["ranks"].values()))
        print(f"wrote {info['path']} ({info['tensors']} LoRA pairs, rank {'/'.join(map(str, ranks))}, "
              f"alpha {info['alpha']}, {info['bytes']:,} bytes)")

    run_cli(p.prog, run)


if __name__ == "__main__":
    sys.exit(main())
