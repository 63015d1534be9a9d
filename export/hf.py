"""Hugging Face `LlamaForCausalLM` folders (config.json + model.safetensors) ⇄ our params.

Take a model to the transformers / vLLM world, or bring an HF Llama in for continued pretraining.
HF's Llama uses the same half-split RoPE as we do, so weights move without any permutation.
The export declares the real vocabulary (the padding rows, which our model masks, are dropped, so
transformers and vLLM can never sample an id the tokenizer cannot decode) and takes bos/eos/pad
ids from the tokenizer; the import pads the vocabulary rows again with zeros.

    python -m export.hf --checkpoint runs/tiny --output hf/tiny
    python -m export.hf --from-hf path/to/llama --output runs/imported
"""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np

from data.chat import CHAT_TEMPLATE, CHAT_TOKENS
from nanollama_base.files import atomic_dir
from nanollama_jax.config import LlamaConfig
from nanollama_jax.model import Params
from nanollama_jax.statedict import from_state_dict, to_state_dict

# Tensors whose rows are tokens: exported with the real vocabulary's rows only.
VOCAB_ROWS = ("tok_embeddings.weight", "output.weight")
# nanollama state-dict name -> HF name (per-layer names after "layers.{i}.")
HF_TOP = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
          "output.weight": "lm_head.weight"}
HF_LAYER = {
    "attn_norm.weight": "input_layernorm.weight", "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn.c_q.weight": "self_attn.q_proj.weight", "attn.c_k.weight": "self_attn.k_proj.weight",
    "attn.c_v.weight": "self_attn.v_proj.weight", "attn.c_proj.weight": "self_attn.o_proj.weight",
    "ffn.gate_proj.weight": "mlp.gate_proj.weight", "ffn.up_proj.weight": "mlp.up_proj.weight",
    "ffn.down_proj.weight": "mlp.down_proj.weight",
}


def hf_name(name: str) -> str:
    if name in HF_TOP:
        return HF_TOP[name]
    _, i, rest = name.split(".", 2)
    return f"model.layers.{i}.{HF_LAYER[rest]}"


def nanollama_name(hf: str) -> str | None:
    for ours, theirs in HF_TOP.items():
        if hf == theirs:
            return ours
    parts = hf.split(".", 3)
    if len(parts) == 4 and parts[:2] == ["model", "layers"]:
        for ours, theirs in HF_LAYER.items():
            if parts[3] == theirs:
                return f"layers.{parts[2]}.{ours}"
    return None


def special_ids(tokenizer: str | Path | None, config: LlamaConfig) -> dict:
    """bos/eos/pad ids as the tokenizer defines them (None where it has none), checked against the model."""
    if tokenizer is None:
        return {"bos_token_id": None, "eos_token_id": None, "pad_token_id": None}
    import sentencepiece as spm

    try:
        sp = spm.SentencePieceProcessor(model_file=str(tokenizer))
    except Exception as e:
        raise ValueError(f"{tokenizer}: not a SentencePiece model ({e})") from None
    if sp.get_piece_size() != config.vocab_size:
        raise ValueError(f"{tokenizer}: the tokenizer has {sp.get_piece_size()} pieces but the model's vocab_size is "
                         f"{config.vocab_size}")
    ids = {"bos_token_id": sp.bos_id(), "eos_token_id": sp.eos_id(), "pad_token_id": sp.pad_id()}
    return {k: (i if i >= 0 else None) for k, i in ids.items()}


def hf_config(config: LlamaConfig, tokenizer: str | Path | None = None) -> dict:
    if not config.llama_cpp_compatible:
        raise ValueError("QK-norm and logit softcap have no LlamaForCausalLM equivalent; cannot export to HF")
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": config.n_embd, "intermediate_size": config.ffn_hidden,
        "num_hidden_layers": config.n_layer, "num_attention_heads": config.n_head,
        "num_key_value_heads": config.n_kv_head, "head_dim": config.head_dim,
        "rms_norm_eps": config.norm_eps, "rope_theta": config.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_theta},
        "max_position_embeddings": config.sequence_len,
        "vocab_size": config.vocab_size,  # the padding rows are not exported
        "tie_word_embeddings": False, "attention_bias": False, "mlp_bias": False,
        "hidden_act": "silu", **special_ids(tokenizer, config), "torch_dtype": "float32",
    }


def save_hf(params: Params, config: LlamaConfig, out_dir: str | Path, tokenizer: str | Path | None = None) -> Path:
    from safetensors.numpy import save_file

    out_dir = Path(out_dir)
    cfg = hf_config(config, tokenizer)
    tensors = {hf_name(k): np.ascontiguousarray(v[: config.vocab_size] if k in VOCAB_ROWS else v, dtype=np.float32)
               for k, v in to_state_dict(params).items()}
    with atomic_dir(out_dir) as tmp:
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        if tokenizer:
            shutil.copyfile(tokenizer, tmp / "tokenizer.model")
            (tmp / "tokenizer_config.json").write_text(json.dumps(
                {"tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False,
                 **_special_pieces(tokenizer), "legacy": True}, indent=2) + "\n")
    return out_dir


def _special_pieces(tokenizer) -> dict:
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(tokenizer))
    ids = {"bos_token": sp.bos_id(), "eos_token": sp.eos_id(), "unk_token": sp.unk_id(), "pad_token": sp.pad_id()}
    out = {k: sp.id_to_piece(i) for k, i in ids.items() if i >= 0}
    if all(sp.piece_to_id(t) != sp.unk_id() for t in CHAT_TOKENS):  # special, so transformers never splits them
        out.update(additional_special_tokens=list(CHAT_TOKENS), chat_template=CHAT_TEMPLATE)
    return out


def config_from_hf(cfg: dict, source: str) -> LlamaConfig:
    if cfg.get("model_type") != "llama":
        raise ValueError(f"{source}: model_type is {cfg.get('model_type')!r}, only 'llama' is supported")
    for key in ("attention_bias", "mlp_bias"):
        if cfg.get(key):
            raise ValueError(f"{source}: {key}=true is not supported (our Llama has no biases)")
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise ValueError(f"{source}: RoPE scaling {rope.get('rope_type') or rope.get('type')!r} is not supported")
    d, heads = cfg["hidden_size"], cfg["num_attention_heads"]
    vocab = cfg.get("nanollama_vocab_size", cfg["vocab_size"])  # older exports declared the padded size
    config = LlamaConfig(
        n_layer=cfg["num_hidden_layers"], n_embd=d, n_head=heads,
        n_kv_head=cfg.get("num_key_value_heads", heads), vocab_size=vocab,
        sequence_len=cfg.get("max_position_embeddings", 2048),
        head_dim=cfg.get("head_dim") or d // heads, norm_eps=cfg.get("rms_norm_eps", 1e-5),
        rope_theta=rope.get("rope_theta", cfg.get("rope_theta", 10000.0)))
    if config.ffn_hidden != cfg["intermediate_size"]:
        config = LlamaConfig(**{**config.to_dict(), "ffn_dim": cfg["intermediate_size"]})
    return config


def load_hf(model_dir: str | Path) -> tuple[LlamaConfig, Params]:
    from safetensors import safe_open

    model_dir = Path(model_dir)
    cfg_path = model_dir / "config.json"
    if not cfg_path.is_file():
        raise ValueError(f"{model_dir}: no config.json, not a Hugging Face model folder")
    config = config_from_hf(json.loads(cfg_path.read_text()), str(cfg_path))
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ValueError(f"{model_dir}: no .safetensors weights found")
    state = {}
    for f in files:
        with safe_open(str(f), framework="flax") as sf:
            for key in sf.keys():
                name = nanollama_name(key)
                if name is None:
                    if key.endswith("rotary_emb.inv_freq"):
                        continue
                    raise ValueError(f"{f}: unexpected tensor {key}")
                state[name] = np.asarray(sf.get_tensor(key), dtype=np.float32)
    if "output.weight" not in state and "tok_embeddings.weight" in state:  # tied embeddings
        state["output.weight"] = state["tok_embeddings.weight"]
    rows = config.padded_vocab
    for name in VOCAB_ROWS:
        if name in state and state[name].shape[0] < rows:  # pad to a multiple of 64; the model masks the rows
            a = state[name]
            state[name] = np.concatenate([a, np.zeros((rows - a.shape[0], a.shape[1]), a.dtype)])
    return config, from_state_dict(state, config, str(model_dir))


def main(argv=None):
    from nanollama_jax import checkpoint
    from nanollama_base.cli import ArgumentParser, run_cli

    p = ArgumentParser(prog="python -m export.hf", description=__doc__)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="a run folder (latest step) or one of its step folders, to export")
    src.add_argument("--from-hf", help="a Hugging Face LlamaForCausalLM folder, to import as a run")
    p.add_argument("--output", required=True, help="the HF folder to write, or the run folder to create")
    p.add_argument("--tokenizer", help="with --from-hf: a SentencePiece tokenizer.model (default: the folder's own)")
    args = p.parse_args(argv)

    def run():
        if args.checkpoint:
            run_info, params = checkpoint.load_params(args.checkpoint)
            save_hf(params, run_info.config, args.output, run_info.tokenizer_path)
            print(f"wrote {args.output} (step {run_info.step}, {run_info.config.param_count():,} parameters)")
        else:
            config, params = load_hf(args.from_hf)
            tok = Path(args.tokenizer or Path(args.from_hf) / "tokenizer.model")
            if not tok.is_file():
                raise ValueError(f"{tok}: no SentencePiece tokenizer; pass --tokenizer FILE")
            checkpoint.write_params_run(args.output, config, params, tok)
            print(f"wrote run {args.output} ({config.param_count():,} parameters)")

    run_cli(p.prog, run)


if __name__ == "__main__":
    sys.exit(main())
