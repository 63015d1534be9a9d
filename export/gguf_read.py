"""A GGUF file → our params and a run folder: read back an export, or start continued training from
any llama-architecture GGUF with a SentencePiece vocabulary.

    python -m export.gguf_read tiny-f16.gguf --output runs/from-gguf
    python -m nanollama_jax.generate --checkpoint runs/from-gguf …

* The config comes from the `llama.*` metadata (and, for our own files, the `nanollama.config`
  key for the fields llama.cpp has no use for); vocab_size is the length of the token list.
* Every tensor is dequantised with gguf-py (`gguf.quants.dequantize`, float32), the Q/K rows are
  permuted back to our half-split RoPE layout, and token_embd/output are padded with zero rows
  from vocab_size to padded_vocab (the rows the model masks). F32 files give back our params
  bit for bit on all real rows.
* The tokenizer: our own GGUFs carry the original `tokenizer.model` (key
  `nanollama.tokenizer.model`), restored byte for byte. For other GGUFs a SentencePiece BPE
  model is built from tokens, scores and token types (identity normalisation, as llama.cpp
  tokenizes), so it encodes as llama.cpp does.
* Refused with one clear line: another architecture, a non-SentencePiece vocabulary, MoE,
  RoPE scaling, a missing, unknown or wrongly shaped tensor. Nothing is written until the whole
  file has been read and checked.
"""
from __future__ import annotations

import base64
import json
import sys
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np

from export.gguf import (CONFIG_KEY, TOKENIZER_KEY, VOCAB_TENSORS, gguf_name, gguf_shape,
                         nanollama_name, unpermute_qk)
from nanollama_jax.config import LlamaConfig
from nanollama_jax.model import Params


def open_gguf(path: Path):
    from gguf import GGUFReader

    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such GGUF file")
    try:
        return GGUFReader(str(path))
    except Exception as e:  # bad magic, truncated file, unknown version…
        raise ValueError(f"{path}: not a readable GGUF file ({e})") from None


def _field(reader, key, default=None):
    f = reader.fields.get(key)
    if f is None:
        return default
    return f.contents()


def _short(x: float) -> float:
    """A float32 metadata value as the shortest decimal that rounds to it (1e-5, not 9.99999975e-06)."""
    return float(str(np.float32(x)))


def config_from_gguf(reader, source: str) -> LlamaConfig:
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise ValueError(f"{source}: architecture is {arch!r}; only 'llama' GGUFs can be read")
    tok_model = _field(reader, "tokenizer.ggml.model")
    if tok_model != "llama":
        raise ValueError(f"{source}: vocabulary type is {tok_model!r}; only SentencePiece ('llama') vocabularies "
                         "can be turned into a tokenizer.model")
    if (_field(reader, "llama.expert_count") or 0) > 0:
        raise ValueError(f"{source}: a mixture-of-experts model; not supported")
    scaling = _field(reader, "llama.rope.scaling.type")
    if scaling not in (None, "none"):
        raise ValueError(f"{source}: RoPE scaling {scaling!r} is not supported")

    def need(key):
        v = _field(reader, key)
        if v is None:
            raise ValueError(f"{source}: metadata key {key} is missing")
        return v

    d = need("llama.embedding_length")
    n_head = need("llama.attention.head_count")
    head_dim = _field(reader, "llama.attention.key_length", d // n_head)
    if _field(reader, "llama.attention.value_length", head_dim) != head_dim:
        raise ValueError(f"{source}: key_length and value_length differ; not supported")
    if _field(reader, "llama.rope.dimension_count", head_dim) != head_dim:
        raise ValueError(f"{source}: RoPE on part of the head (rope.dimension_count "
                         f"{_field(reader, 'llama.rope.dimension_count')} < head_dim {head_dim}) is not supported")
    tokens = need("tokenizer.ggml.tokens")
    vocab_key = _field(reader, "llama.vocab_size")
    if vocab_key is not None and vocab_key != len(tokens):
        raise ValueError(f"{source}: llama.vocab_size is {vocab_key} but the token list has {len(tokens)} entries")
    fields = dict(
        n_layer=need("llama.block_count"), n_embd=d, n_head=n_head,
        n_kv_head=_field(reader, "llama.attention.head_count_kv", n_head), vocab_size=len(tokens),
        sequence_len=_field(reader, "llama.context_length", 2048), head_dim=head_dim,
        norm_eps=_short(_field(reader, "llama.attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=_short(_field(reader, "llama.rope.freq_base", 10000.0)))
    ffn = need("llama.feed_forward_length")
    ours = _field(reader, CONFIG_KEY)
    if ours:  # our own file: keep the fields llama.cpp has no key for (multiple_of, dtype, …)
        try:
            saved = json.loads(ours)
            base = LlamaConfig.from_dict(saved)
        except (ValueError, TypeError) as e:
            raise ValueError(f"{source}: unreadable {CONFIG_KEY} ({e})") from None
        # the llama.* keys are what llama.cpp runs: they win (float32 metadata loses float64 bits,
        # so keep the saved eps/theta when they agree to float32 precision)
        for key in ("norm_eps", "rope_theta"):
            if np.float32(getattr(base, key)) == np.float32(fields[key]):
                fields[key] = getattr(base, key)
        fields = {**saved, **fields}
    try:
        config = LlamaConfig.from_dict(fields)
        if config.ffn_hidden != ffn:
            config = LlamaConfig.from_dict({**fields, "ffn_dim": ffn})
    except (ValueError, TypeError) as e:
        raise ValueError(f"{source}: inconsistent model metadata ({e})") from None
    if not config.llama_cpp_compatible:
        raise ValueError(f"{source}: {CONFIG_KEY} asks for QK-norm or softcap, which a GGUF cannot carry")
    return config


def _checked_tensors(reader, config: LlamaConfig, source: str):
    """(nanollama name, reader tensor, numpy shape) for each tensor of the file, in file order; its name,
    layer and shape checked against the metadata."""
    for t in reader.tensors:
        name = nanollama_name(t.name)
        if name is None:
            if t.name == "rope_freqs.weight":
                raise ValueError(f"{source}: has rope_freqs (Llama 3.1-style RoPE scaling); not supported")
            raise ValueError(f"{source}: unexpected tensor {t.name}")
        if name.startswith("layers.") and int(name.split(".")[1]) >= config.n_layer:
            raise ValueError(f"{source}: tensor {t.name} is past block_count {config.n_layer}")
        shape = tuple(int(n) for n in reversed(t.shape.tolist()))  # ggml ne order → numpy order
        want = gguf_shape(name, config)
        if shape != want:
            raise ValueError(f"{source}: tensor {t.name} has shape {list(shape)}, expected {list(want)} "
                             "from the metadata")
        yield name, t, shape


def _dequantized(t, name: str, shape: tuple, config: LlamaConfig, source: str) -> np.ndarray:
    """One tensor as float32 [out, in], Q/K un-permuted, vocab rows padded to padded_vocab."""
    from gguf import quants

    try:
        a = quants.dequantize(t.data, t.tensor_type)
    except NotImplementedError:
        raise ValueError(f"{source}: tensor {t.name} has type {t.tensor_type.name}, which gguf-py cannot "
                         "dequantize") from None
    a = np.asarray(a, dtype=np.float32).reshape(shape)
    if name.endswith("attn.c_q.weight"):
        a = unpermute_qk(a, config.n_head)
    elif name.endswith("attn.c_k.weight"):
        a = unpermute_qk(a, config.n_kv_head)
    padded = _padded(name, shape, config)
    if padded != shape:
        a = np.concatenate([a, np.zeros((padded[0] - shape[0], shape[1]), np.float32)])
    return a


def _padded(name: str, shape: tuple, config: LlamaConfig) -> tuple:
    """The shape `_dequantized` gives a tensor of file shape `shape`."""
    if name in VOCAB_TENSORS and config.padded_vocab > shape[0]:
        return (config.padded_vocab, *shape[1:])
    return shape


def _untied_and_complete(state: dict, config: LlamaConfig, source: str) -> None:
    """Tied embeddings get their output.weight (a copy of the embedding's entry: its array or its shape);
    a missing tensor is refused."""
    if "output.weight" not in state and "tok_embeddings.weight" in state:  # tied embeddings: untie
        emb = state["tok_embeddings.weight"]
        state["output.weight"] = emb.copy() if isinstance(emb, np.ndarray) else emb
    for i in range(config.n_layer):  # name the first missing tensor in llama.cpp's terms
        for n in ("tok_embeddings.weight", f"layers.{i}.attn_norm.weight", f"layers.{i}.attn.c_q.weight",
                  f"layers.{i}.attn.c_k.weight", f"layers.{i}.attn.c_v.weight", f"layers.{i}.attn.c_proj.weight",
                  f"layers.{i}.ffn_norm.weight", f"layers.{i}.ffn.gate_proj.weight",
                  f"layers.{i}.ffn.up_proj.weight", f"layers.{i}.ffn.down_proj.weight", "norm.weight"):
            if n not in state:
                raise ValueError(f"{source}: tensor {gguf_name(n)} is missing")


def read_state(reader, config: LlamaConfig, source: str) -> dict[str, np.ndarray]:
    """{nanollama name: float32 [out, in]} with Q/K un-permuted and vocab rows padded to padded_vocab."""
    state: dict[str, np.ndarray] = {}
    for name, t, shape in _checked_tensors(reader, config, source):
        state[name] = _dequantized(t, name, shape, config, source)
    _untied_and_complete(state, config, source)
    return state


def state_shapes(reader, config: LlamaConfig, source: str) -> tuple[dict[str, tuple], Callable[[str], np.ndarray]]:
    """({nanollama name: shape}, load) without dequantizing anything: the names, order and shapes
    `read_state` would give (checked the same way), and load(name) → that one tensor as `read_state` gives
    it, for callers that need the values of only a few."""
    shapes, tensors = {}, {}
    for name, t, shape in _checked_tensors(reader, config, source):
        shapes[name], tensors[name] = _padded(name, shape, config), (t, shape)
    _untied_and_complete(shapes, config, source)

    def load(name: str) -> np.ndarray:
        if name not in tensors:  # output.weight of tied embeddings
            name = "tok_embeddings.weight"
        t, shape = tensors[name]
        return _dequantized(t, name, shape, config, source)

    return shapes, load


def sentencepiece_from_gguf(reader, source: str) -> bytes:
    """A SentencePiece model for the GGUF's vocabulary: the embedded original when we wrote the file
    (and it still matches the token list), else one built from tokens, scores and types."""
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2 as pb

    tokens = _field(reader, "tokenizer.ggml.tokens")
    embedded = _field(reader, TOKENIZER_KEY)
    if embedded:
        try:
            data = base64.b64decode(embedded, validate=True)
            sp = spm.SentencePieceProcessor()
            sp.LoadFromSerializedProto(data)
            if [sp.IdToPiece(i) for i in range(sp.GetPieceSize())] == tokens:
                return data
        except Exception:
            pass  # edited or damaged: rebuild from the token list below
    n = len(tokens)
    scores = _field(reader, "tokenizer.ggml.scores") or [0.0] * n
    types = _field(reader, "tokenizer.ggml.token_type") or [1] * n
    if len(scores) != n or len(types) != n:
        raise ValueError(f"{source}: tokenizer scores/types do not match the {n} tokens")
    unk = _field(reader, "tokenizer.ggml.unknown_token_id")
    if unk is None:
        unk = next((i for i, t in enumerate(types) if t == 2), None)
    if unk is None:
        raise ValueError(f"{source}: the vocabulary has no unknown token, which SentencePiece requires")
    m = pb.ModelProto()
    for i, (piece, score, kind) in enumerate(zip(tokens, scores, types)):
        p = m.pieces.add()
        p.piece, p.score = piece, float(score)
        # GGUF token types use SentencePiece's numbering (normal 1, unknown 2, control 3, user 4, unused 5, byte 6)
        p.type = 2 if i == unk else (kind if kind in (1, 3, 4, 5, 6) else 1)
    ts = m.trainer_spec
    ts.model_type = pb.TrainerSpec.BPE
    ts.vocab_size = n
    ts.byte_fallback = any(t == 6 for t in types)
    ts.unk_id, ts.unk_piece = unk, tokens[unk]
    for key, id_attr, piece_attr in (("bos", "bos_id", "bos_piece"), ("eos", "eos_id", "eos_piece"),
                                     ("padding", "pad_id", "pad_piece")):
        ident = _field(reader, f"tokenizer.ggml.{key}_token_id")
        if ident is not None and 0 <= ident < n:
            setattr(ts, id_attr, ident)
            setattr(ts, piece_attr, tokens[ident])
        else:
            setattr(ts, id_attr, -1)
    ns = m.normalizer_spec
    ns.name = "identity"
    ns.add_dummy_prefix = bool(_field(reader, "tokenizer.ggml.add_space_prefix", True))
    ns.remove_extra_whitespaces = bool(_field(reader, "tokenizer.ggml.remove_extra_whitespaces", False))
    ns.escape_whitespaces = True
    data = m.SerializeToString()
    try:
        spm.SentencePieceProcessor().LoadFromSerializedProto(data)
    except Exception as e:
        raise ValueError(f"{source}: its vocabulary does not make a valid SentencePiece model ({e})") from None
    return data


def read_gguf(path: str | Path) -> tuple[LlamaConfig, Params, bytes]:
    """(config, params, tokenizer.model bytes) from a llama GGUF; everything checked."""
    from nanollama_jax.statedict import from_state_dict

    path = Path(path)
    reader = open_gguf(path)
    source = str(path)
    config = config_from_gguf(reader, source)
    tokenizer = sentencepiece_from_gguf(reader, source)
    state = read_state(reader, config, source)
    params = from_state_dict(state, config, source)
    return config, params, tokenizer


def write_run(path: str | Path, output: str | Path):
    """Read a GGUF and write it as a run folder (params-only checkpoint at step 0)."""
    from nanollama_jax import checkpoint

    output = Path(output)
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise ValueError(f"{output}: already exists and is not empty; choose a new run folder")
    config, params, tokenizer = read_gguf(path)
    with tempfile.TemporaryDirectory() as tmp:
        tok = Path(tmp) / "tokenizer.model"
        tok.write_bytes(tokenizer)
        return checkpoint.write_params_run(output, config, params, tok, step=0,
                                           source={"gguf": str(Path(path).resolve())})


def main(argv=None):
    from nanollama_base.cli import ArgumentParser, run_cli

    p = ArgumentParser(prog="python -m export.gguf_read", description=__doc__)
    p.add_argument("gguf", help="the .gguf file to read (llama architecture, SentencePiece vocabulary)")
    p.add_argument("--output", required=True, help="the run folder to create")
    args = p.parse_args(argv)

    def run():
        run_info = write_run(args.gguf, args.output)
        print(f"wrote run {run_info.dir} ({run_info.config.param_count():,} parameters, "
              f"vocab {run_info.config.vocab_size})")

    run_cli(p.prog, run)


if __name__ == "__main__":
    sys.exit(main())
