"""nanollama (PyTorch) `checkpoint_step{N}.pt` files ⇄ our runs.

    python -m export.nanollama --from-pt checkpoints/nano/checkpoint_step5000.pt --tokenizer tok/tokenizer.model --output runs/nano-pt
    python -m export.nanollama --checkpoint runs/tiny --output out/checkpoint_step600.pt

The reference saves `torch.save({"model_state_dict", "optimizer_state_dict", "step", "config"})`
with `config` holding all its LlamaConfig fields, plus `checkpoint_step{N}_meta.json`
({step, config, checkpoint_path}) beside it. Its state dict uses the names of our
`nanollama_jax/statedict.py` in torch's [out, in] layout, sometimes prefixed `_orig_mod.`
(torch.compile) or `module.` (DDP); both prefixes are stripped. Its RoPE is half-split like ours,
so the weights move without any permutation; the vocab rows stay padded as they are.

Extensions we do not implement are refused with a clear message rather than silently dropped:
post-embedding norm, ResFormer, tied embeddings, sliding-window patterns. QK-norm and logit
softcap map onto our config. The optimizer state is not converted (torch's Muon/AdamW state has
no meaning to optax): an exported `.pt` carries an empty `optimizer_state_dict`.

The `.pt` is read with `torch.load(weights_only=True)`, which executes no pickled code; a file
holding other Python objects needs `--trust-pickle`. torch is imported only inside functions.
"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import numpy as np

from nanollama_base.files import atomic_path
from nanollama_jax.config import LlamaConfig, round_up
from nanollama_jax.model import Params

# Every LlamaConfig field of the reference, with its defaults (REFERENCE.md).
REFERENCE_DEFAULTS = {
    "sequence_len": 2048, "vocab_size": 32000, "n_layer": 12, "n_head": 6, "n_kv_head": 6, "n_embd": 384,
    "norm_eps": 1e-5, "multiple_of": 256, "window_pattern": None, "rope_theta": 10000.0,
    "tie_embeddings": False, "use_qk_norm": False, "use_post_emb_norm": False, "use_resformer": False,
    "softcap": 0.0,
}
PREFIXES = ("_orig_mod.", "module.")


def _strip(name: str) -> str:
    changed = True
    while changed:
        changed = False
        for p in PREFIXES:
            if name.startswith(p):
                name, changed = name[len(p):], True
    return name


def meta_path(pt_path: str | Path) -> Path:
    pt_path = Path(pt_path)
    return pt_path.with_name(pt_path.stem + "_meta.json")


def config_from_reference(cfg: dict, state: dict[str, np.ndarray], source: str) -> LlamaConfig:
    """Our LlamaConfig from the reference's config dict, checked against the tensors' shapes."""
    if not isinstance(cfg, dict):
        raise ValueError(f"{source}: 'config' is a {type(cfg).__name__}, expected a dict of LlamaConfig fields")
    cfg = {**REFERENCE_DEFAULTS, **cfg}
    refused = [("use_post_emb_norm", "a post-embedding norm"), ("use_resformer", "ResFormer value residuals"),
               ("tie_embeddings", "tied input/output embeddings")]
    for key, what in refused:
        if cfg.get(key):
            raise ValueError(f"{source}: the model uses {what} ({key}=true), which nanollama-jax does not implement")
    window = cfg.get("window_pattern")
    if window and set(str(window).upper()) - {"L"}:
        raise ValueError(f"{source}: window_pattern {window!r} asks for sliding-window attention, which nanollama-jax "
                         "does not implement (only full attention, pattern 'L')")
    try:
        n_layer, d, n_head, n_kv = (int(cfg[k]) for k in ("n_layer", "n_embd", "n_head", "n_kv_head"))
    except (TypeError, ValueError) as e:
        raise ValueError(f"{source}: bad config ({e})") from None
    emb = state.get("tok_embeddings.weight")
    if emb is None:
        raise ValueError(f"{source}: missing tensor tok_embeddings.weight")
    q = state.get("layers.0.attn.c_q.weight")
    head_dim = q.shape[0] // n_head if q is not None else d // n_head
    gate = state.get("layers.0.ffn.gate_proj.weight")
    multiple_of = int(cfg.get("multiple_of") or 256)
    fields = dict(n_layer=n_layer, n_embd=d, n_head=n_head, n_kv_head=n_kv, vocab_size=int(cfg["vocab_size"]),
                  sequence_len=int(cfg["sequence_len"]), head_dim=head_dim, norm_eps=float(cfg["norm_eps"]),
                  rope_theta=float(cfg["rope_theta"]), multiple_of=multiple_of,
                  use_qk_norm=bool(cfg.get("use_qk_norm")), softcap=float(cfg.get("softcap") or 0.0))
    if gate is not None and gate.shape[0] != round_up(int(8 * d / 3), multiple_of):
        fields["ffn_dim"] = int(gate.shape[0])
    try:
        config = LlamaConfig(**fields)
    except ValueError as e:
        raise ValueError(f"{source}: {e}") from None
    rows = emb.shape[0]
    if rows < config.vocab_size or rows > config.padded_vocab:
        raise ValueError(f"{source}: tok_embeddings.weight has {rows} rows; vocab_size {config.vocab_size} "
                         f"needs between {config.vocab_size} and {config.padded_vocab}")
    return config


def load_pt(path: str | Path, trust_pickle: bool = False) -> tuple[LlamaConfig, Params, dict]:
    """(config, params, info) from a reference checkpoint; info has step, the reference config and meta."""
    import pickle

    import torch

    from nanollama_jax.statedict import from_state_dict

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint file")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=not trust_pickle)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        if not trust_pickle and "weights_only" in str(e):
            raise ValueError(f"{path}: holds Python objects beyond tensors and plain values; if you trust the file, "
                             "pass --trust-pickle") from None
        raise ValueError(f"{path}: not a readable torch checkpoint ({first})") from None
    except (RuntimeError, EOFError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{path}: not a readable torch checkpoint ({first})") from None
    if not isinstance(ckpt, dict) or "model_state_dict" not in ckpt:
        raise ValueError(f"{path}: not a nanollama checkpoint (no model_state_dict)")
    state = {}
    for name, t in ckpt["model_state_dict"].items():
        if not torch.is_tensor(t):
            raise ValueError(f"{path}: model_state_dict[{name!r}] is not a tensor")
        state[_strip(name)] = t.detach().to(torch.float32).cpu().numpy()
    meta = {}
    mp = meta_path(path)
    if mp.is_file():
        try:
            meta = json.loads(mp.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{mp}: unreadable JSON ({e})") from None
    cfg = ckpt.get("config") or meta.get("config")
    if cfg is None:
        raise ValueError(f"{path}: no config in the checkpoint or beside it")
    if not isinstance(cfg, dict) and hasattr(cfg, "__dict__"):  # a pickled dataclass (--trust-pickle)
        cfg = dict(vars(cfg))
    config = config_from_reference(cfg, state, str(path))
    step = ckpt.get("step", meta.get("step"))
    if "step" in ckpt and "step" in meta and int(meta["step"]) != int(ckpt["step"]):
        raise ValueError(f"{mp}: step {meta['step']} disagrees with the checkpoint's step {ckpt['step']}")
    if step is None:
        m = re.search(r"step(\d+)", path.name)
        step = int(m.group(1)) if m else 0
    extra = set(state) - _known_names(config)
    if extra:
        raise ValueError(f"{path}: tensors nanollama-jax does not implement: {', '.join(sorted(extra)[:5])}"
                         + (" …" if len(extra) > 5 else ""))
    for name in ("tok_embeddings.weight", "output.weight"):  # pad to a multiple of 64; the model masks the rows
        a = state.get(name)
        if a is not None and a.shape[0] < config.padded_vocab:
            state[name] = np.concatenate([a, np.zeros((config.padded_vocab - a.shape[0], a.shape[1]), np.float32)])
    params = from_state_dict(state, config, str(path))
    return config, params, {"step": int(step), "reference_config": dict(cfg), "meta": meta}


def _known_names(config: LlamaConfig) -> set[str]:
    from nanollama_jax.statedict import state_dict_names

    return set(state_dict_names(config))


def reference_config(config: LlamaConfig, base: dict | None = None) -> dict:
    """The reference's config dict for our config (keeping fields of `base`, an imported original)."""
    if config.head_dim * config.n_head != config.n_embd:
        raise ValueError(f"nanollama derives head_dim as n_embd / n_head = {config.n_embd / config.n_head:g}, "
                         f"but this model has head_dim {config.head_dim}; it cannot be written as a nanollama .pt")
    if config.ffn_hidden != round_up(int(8 * config.n_embd / 3), config.multiple_of):
        raise ValueError(f"nanollama derives the FFN width from n_embd and multiple_of; this model's "
                         f"{config.ffn_hidden} cannot be expressed that way")
    cfg = {**REFERENCE_DEFAULTS, **(base or {})}
    cfg.update(sequence_len=config.sequence_len, vocab_size=config.vocab_size, n_layer=config.n_layer,
               n_head=config.n_head, n_kv_head=config.n_kv_head, n_embd=config.n_embd, norm_eps=config.norm_eps,
               multiple_of=config.multiple_of, rope_theta=config.rope_theta, use_qk_norm=config.use_qk_norm,
               softcap=config.softcap)
    return cfg


def save_pt(params: Params, config: LlamaConfig, output: str | Path, step: int, base_config: dict | None = None) -> Path:
    """Write `checkpoint_step{N}.pt` (+ `_meta.json`) as the reference does, atomically."""
    import torch

    from nanollama_jax.statedict import state_dict_names, to_state_dict

    output = Path(output)
    cfg = reference_config(config, base_config)
    flat = to_state_dict(params)
    # the reference module's registration order: embeddings, layer by layer, final norm, head
    state = {k: torch.from_numpy(np.ascontiguousarray(flat.pop(k), dtype=np.float32)) for k in state_dict_names(config)}
    ckpt = {"model_state_dict": state, "optimizer_state_dict": {}, "step": int(step), "config": cfg}
    meta = {"step": int(step), "config": cfg, "checkpoint_path": str(output)}
    with atomic_path(output) as tmp, atomic_path(meta_path(output)) as tmp_meta:
        torch.save(ckpt, tmp)
        tmp_meta.write_text(json.dumps(meta, indent=2) + "\n")
    return output


def main(argv=None):
    from nanollama_jax import checkpoint
    from nanollama_base.cli import ArgumentParser, run_cli

    p = ArgumentParser(prog="python -m export.nanollama", description=__doc__)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--from-pt", metavar="FILE", help="a nanollama checkpoint_step{N}.pt to import as a run")
    src.add_argument("--checkpoint", metavar="RUN", help="a run folder (latest step) or step folder to export as .pt")
    p.add_argument("--output", required=True, help="the run folder to create, or the .pt file to write")
    p.add_argument("--tokenizer", metavar="FILE",
                   help="with --from-pt: the SentencePiece tokenizer.model (default: tokenizer.model beside the .pt)")
    p.add_argument("--trust-pickle", action="store_true",
                   help="with --from-pt: allow arbitrary pickled objects (only for files you trust)")
    args = p.parse_args(argv)

    def run():
        if args.from_pt:
            config, params, info = load_pt(args.from_pt, args.trust_pickle)
            tok = Path(args.tokenizer or Path(args.from_pt).parent / "tokenizer.model")
            if not tok.is_file():
                raise ValueError(f"{tok}: no SentencePiece tokenizer; pass --tokenizer FILE")
            _check_tokenizer(tok, config)
            out = Path(args.output)
            if out.exists() and (not out.is_dir() or any(out.iterdir())):
                raise ValueError(f"{out}: already exists and is not empty; choose a new run folder")
            checkpoint.write_params_run(out, config, params, tok, step=info["step"],
                                        source={"nanollama_pt": str(Path(args.from_pt).resolve()),
                                                "nanollama_config": info["reference_config"]})
            print(f"wrote run {out} (step {info['step']}, {config.param_count():,} parameters)")
        else:
            run_info, params = checkpoint.load_params(args.checkpoint)
            base = (run_info.info.get("source") or {}).get("nanollama_config")
            save_pt(params, run_info.config, args.output, run_info.step, base)
            print(f"wrote {args.output} and {meta_path(args.output).name} (step {run_info.step})")

    run_cli(p.prog, run)


def _check_tokenizer(path: Path, config: LlamaConfig) -> None:
    import sentencepiece as spm

    try:
        n = spm.SentencePieceProcessor(model_file=str(path)).get_piece_size()
    except Exception as e:
        raise ValueError(f"{path}: not a SentencePiece model ({e})") from None
    if n != config.vocab_size:
        raise ValueError(f"{path}: the tokenizer has {n} pieces but the checkpoint's vocab_size is {config.vocab_size}")


if __name__ == "__main__":
    sys.exit(main())
