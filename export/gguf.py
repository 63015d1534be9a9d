"""A run's checkpoint → a GGUF v3 file that llama.cpp runs exactly like our model.

    python -m export.gguf --checkpoint runs/tiny --output tiny-f16.gguf --dtype f16
    python -m export.gguf --checkpoint runs/tiny/checkpoints/600 --output tiny-q8.gguf --dtype q8_0

Written through gguf-py (llama.cpp's own writer and quantisers), `llama` architecture:

* metadata: general.architecture/name/file_type (+ quantization_version for quantised files)
  and every `llama.*` hyper-parameter llama.cpp reads, with the types it demands (uint32 counts,
  float32 eps and rope.freq_base — always written);
* tensors in llama.cpp's names (token_embd, blk.N.attn_q …, output_norm, output), as numpy
  [out, in] arrays (the transpose of our Flax [in, out] kernels). Norms are always F32; a matrix
  whose row length is not a multiple of the quant block size falls back to F16 (logged);
* Q and K rows permuted per head, exactly like convert_hf_to_gguf's `LlamaModel.permute`
  (K with the KV head count): our RoPE is half-split (i pairs with i + hd/2, like HF), llama.cpp's
  `llama` rotates adjacent pairs (2i, 2i+1). After the permutation both compute the same thing;
* the SentencePiece tokenizer embedded (`tokenizer.ggml.model = "llama"`: tokens, scores, token
  types, bos/eos/unk/pad ids, add_bos_token=True, add_eos_token=False, add_space_prefix as the
  model says), plus the original `tokenizer.model` bytes (base64, key `nanollama.tokenizer.model`)
  so `export.gguf_read` restores it bit for bit. A tokenizer with the chat tokens (data/chat.py,
  CONTROL type) also gets `tokenizer.chat_template` (the Llama 3 Jinja) and `tokenizer.ggml.eot_token_id`;

Vocabulary: our embedding and output head have `padded_vocab` rows (a multiple of 64), but the
model masks every row past `vocab_size` (logit -1e9), so those rows are not tokens. The export
TRIMS token_embd and output to `vocab_size` rows and the token list is exactly the SentencePiece
vocabulary; `gguf_read` pads them back with zeros.

The file is streamed tensor by tensor: header, metadata and tensor index first (sizes are known
from the shapes), then each tensor is converted, written and freed, so no second copy of the
weights is ever built. It is written to a temporary name and renamed only when complete.
Models llama.cpp cannot run correctly (QK-norm, logit softcap) are refused.
"""
from __future__ import annotations

import base64
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from data.chat import CHAT_TEMPLATE, CHAT_TOKENS, END_OF_TURN
from nanollama_base.files import atomic_path
from nanollama_jax.config import LlamaConfig
from nanollama_jax.model import Params
from nanollama_jax.statedict import LAYER_TENSORS, TOP_TENSORS

log = logging.getLogger("export.gguf")

# nanollama state-dict name (inside "layers.{i}." for layers) -> llama.cpp tensor name
GGUF_TOP = {"tok_embeddings.weight": "token_embd.weight", "norm.weight": "output_norm.weight",
            "output.weight": "output.weight"}
GGUF_LAYER = {
    "attn_norm.weight": "attn_norm.weight", "attn.c_q.weight": "attn_q.weight", "attn.c_k.weight": "attn_k.weight",
    "attn.c_v.weight": "attn_v.weight", "attn.c_proj.weight": "attn_output.weight",
    "ffn_norm.weight": "ffn_norm.weight", "ffn.gate_proj.weight": "ffn_gate.weight",
    "ffn.up_proj.weight": "ffn_up.weight", "ffn.down_proj.weight": "ffn_down.weight",
}
VOCAB_TENSORS = ("tok_embeddings.weight", "output.weight")  # rows trimmed to vocab_size
TOKENIZER_KEY = "nanollama.tokenizer.model"  # base64 of the original SentencePiece model
CONFIG_KEY = "nanollama.config"  # JSON of our LlamaConfig (fields llama.* does not carry)

DTYPE_NAMES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1")


def _qtypes():
    from gguf import GGMLQuantizationType as Q, LlamaFileType as F

    return {
        "f32": (Q.F32, F.ALL_F32), "f16": (Q.F16, F.MOSTLY_F16), "bf16": (Q.BF16, F.MOSTLY_BF16),
        "q8_0": (Q.Q8_0, F.MOSTLY_Q8_0), "q4_0": (Q.Q4_0, F.MOSTLY_Q4_0), "q4_1": (Q.Q4_1, F.MOSTLY_Q4_1),
        "q5_0": (Q.Q5_0, F.MOSTLY_Q5_0), "q5_1": (Q.Q5_1, F.MOSTLY_Q5_1),
    }


def gguf_name(name: str) -> str:
    """llama.cpp's tensor name for a nanollama state-dict name."""
    if name in GGUF_TOP:
        return GGUF_TOP[name]
    _, i, rest = name.split(".", 2)
    return f"blk.{i}.{GGUF_LAYER[rest]}"


def nanollama_name(name: str) -> str | None:
    for ours, theirs in GGUF_TOP.items():
        if name == theirs:
            return ours
    parts = name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit():
        for ours, theirs in GGUF_LAYER.items():
            if parts[2] == theirs:
                return f"layers.{parts[1]}.{ours}"
    return None


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Half-split RoPE rows → llama.cpp's adjacent-pair rows (convert_hf_to_gguf `LlamaModel.permute`).
    w: [n_head·hd, in]."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """The inverse of `permute_qk`."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def check_exportable(config: LlamaConfig) -> None:
    if config.use_qk_norm:
        raise ValueError("the model uses QK-norm, which llama.cpp's llama architecture does not apply; "
                         "a GGUF of it would run wrong, so none is written")
    if config.softcap:
        raise ValueError(f"the model uses a logit softcap ({config.softcap}), which llama.cpp's llama architecture "
                         "does not apply; a GGUF of it would run wrong, so none is written")


def _layer_slice(a, i):
    return np.asarray(a[i])  # one layer at a time: a jax array is copied to the host per layer only


def iter_state(params: Params, config: LlamaConfig) -> Iterator[tuple[str, "callable"]]:
    """(nanollama name, thunk → float32 [out, in] array) in GGUF order, one tensor at a time,
    through statedict's mapping tables."""
    from nanollama_jax.statedict import get_path

    def top(path, transpose):
        return lambda: (np.asarray(get_path(params, path)).T if transpose else np.asarray(get_path(params, path)))

    def layer(path, i, transpose):
        def f():
            a = _layer_slice(get_path(params["layers"], path), i)
            return a.T if transpose else a
        return f

    (emb_path, emb_name, emb_t), *rest = TOP_TENSORS
    yield emb_name, top(emb_path, emb_t)
    for i in range(config.n_layer):
        for path, name, transpose in LAYER_TENSORS:
            yield f"layers.{i}.{name}", layer(path, i, transpose)
    for path, name, transpose in rest:
        yield name, top(path, transpose)


def to_gguf_layout(name: str, a: np.ndarray, config: LlamaConfig, permute: bool = True) -> np.ndarray:
    """A nanollama-named [out, in] tensor as llama.cpp stores it (float32, C-contiguous)."""
    if name in VOCAB_TENSORS:
        a = a[: config.vocab_size]
    if permute and name.endswith("attn.c_q.weight"):
        a = permute_qk(a, config.n_head)
    elif permute and name.endswith("attn.c_k.weight"):
        a = permute_qk(a, config.n_kv_head)
    return np.ascontiguousarray(a, dtype=np.float32)


def tensor_qtype(shape: tuple[int, ...], dtype: str):
    """The GGML type a tensor of this shape gets for --dtype, and a note when it falls back."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as Q

    want = _qtypes()[dtype][0]
    if len(shape) < 2:
        return Q.F32, None
    block = GGML_QUANT_SIZES[want][0]
    if shape[-1] % block:
        return Q.F16, f"row length {shape[-1]} is not a multiple of the {want.name} block size {block}; written as F16"
    return want, None


def tensor_nbytes(shape, qtype) -> int:
    from gguf import GGML_QUANT_SIZES

    block, size = GGML_QUANT_SIZES[qtype]
    n = int(np.prod(shape))
    return n // block * size


def encode_tensor(a: np.ndarray, qtype) -> np.ndarray:
    from gguf import GGMLQuantizationType as Q, quants

    if qtype == Q.F32:
        return a
    return quants.quantize(a, qtype)


def roundtrip_tensor(a: np.ndarray, qtype) -> np.ndarray:
    """What llama.cpp will see of `a` stored as `qtype`: quantised then dequantised, float32."""
    from gguf import quants

    return quants.dequantize(encode_tensor(np.ascontiguousarray(a, dtype=np.float32), qtype), qtype).astype(np.float32)


def quantized_params(params: Params, config: LlamaConfig, dtype: str) -> Params:
    """Our params with every tensor stored as the export would store it for --dtype and read back
    (in our layout; the padding rows are left as they are). The reference for quantised parity."""
    from nanollama_jax.statedict import get_path, set_path

    def roundtrip(name, a):
        qtype, _ = tensor_qtype(a.shape, dtype)
        rows = config.vocab_size if name in VOCAB_TENSORS else a.shape[0]
        q = a.copy()
        q[:rows] = roundtrip_tensor(a[:rows], qtype)
        return q

    out: Params = {}
    for path, name, transpose in TOP_TENSORS:
        a = np.asarray(get_path(params, path), dtype=np.float32)
        q = roundtrip(name, a.T if transpose else a)
        set_path(out, path, q.T if transpose else q)
    for path, name, transpose in LAYER_TENSORS:
        stacked = np.asarray(get_path(params["layers"], path), dtype=np.float32)
        layers = []
        for i in range(config.n_layer):
            q = roundtrip(name, stacked[i].T if transpose else stacked[i])
            layers.append(q.T if transpose else q)
        set_path(out, ("layers",) + path, np.stack(layers))
    return out


@dataclass
class Vocab:
    tokens: list[str]
    scores: list[float]
    types: list[int]
    bos: int
    eos: int
    unk: int
    pad: int
    add_space_prefix: bool
    remove_extra_whitespaces: bool
    model_bytes: bytes


def sentencepiece_vocab(path: str | Path) -> Vocab:
    """The GGUF `llama` (SentencePiece) vocabulary of a tokenizer.model, as convert_hf_to_gguf builds it."""
    import sentencepiece as spm
    from gguf import TokenType
    from sentencepiece import sentencepiece_model_pb2 as pb

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: tokenizer.model not found")
    data = path.read_bytes()
    sp = spm.SentencePieceProcessor()
    try:
        sp.LoadFromSerializedProto(data)
        proto = pb.ModelProto()
        proto.ParseFromString(data)
    except Exception as e:  # sentencepiece raises RuntimeError / protobuf DecodeError
        raise ValueError(f"{path}: not a SentencePiece model ({e})") from None
    if proto.trainer_spec.model_type not in (pb.TrainerSpec.BPE, pb.TrainerSpec.UNIGRAM):
        raise ValueError(f"{path}: SentencePiece model type {proto.trainer_spec.model_type} has no llama.cpp equivalent")
    tokens, scores, types = [], [], []
    for i in range(sp.GetPieceSize()):
        tokens.append(sp.IdToPiece(i))
        scores.append(float(sp.GetScore(i)))
        t = TokenType.NORMAL
        if sp.IsUnknown(i):
            t = TokenType.UNKNOWN
        elif sp.IsControl(i):
            t = TokenType.CONTROL
        elif sp.IsUnused(i):
            t = TokenType.UNUSED
        elif sp.IsByte(i):
            t = TokenType.BYTE
        elif proto.pieces[i].type == pb.ModelProto.SentencePiece.USER_DEFINED:
            t = TokenType.USER_DEFINED
        types.append(int(t))
    ns = proto.normalizer_spec
    return Vocab(tokens, scores, types, sp.bos_id(), sp.eos_id(), sp.unk_id(), sp.pad_id(),
                 ns.add_dummy_prefix, ns.remove_extra_whitespaces, data)


def _write_metadata(w, config: LlamaConfig, vocab: Vocab, name: str, dtype: str, embed_tokenizer: bool) -> None:
    import json

    from gguf import GGML_QUANT_VERSION

    qtype, ftype = _qtypes()[dtype]
    w.add_name(name)
    w.add_file_type(int(ftype))
    if dtype not in ("f32", "f16"):
        w.add_quantization_version(GGML_QUANT_VERSION)
    w.add_vocab_size(config.vocab_size)
    w.add_context_length(config.sequence_len)
    w.add_embedding_length(config.n_embd)
    w.add_block_count(config.n_layer)
    w.add_feed_forward_length(config.ffn_hidden)
    w.add_head_count(config.n_head)
    w.add_head_count_kv(config.n_kv_head)
    w.add_key_length(config.head_dim)
    w.add_value_length(config.head_dim)
    w.add_rope_dimension_count(config.head_dim)
    w.add_layer_norm_rms_eps(config.norm_eps)
    w.add_rope_freq_base(config.rope_theta)
    w.add_tokenizer_model("llama")
    w.add_token_list(vocab.tokens)
    w.add_token_scores(vocab.scores)
    w.add_token_types(vocab.types)
    for ident, add in ((vocab.bos, w.add_bos_token_id), (vocab.eos, w.add_eos_token_id),
                       (vocab.unk, w.add_unk_token_id), (vocab.pad, w.add_pad_token_id)):
        if ident >= 0:
            add(ident)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    w.add_add_space_prefix(vocab.add_space_prefix)
    w.add_remove_extra_whitespaces(vocab.remove_extra_whitespaces)
    if all(t in vocab.tokens for t in CHAT_TOKENS):  # a tokenizer from before the chat tokens has no template
        w.add_chat_template(CHAT_TEMPLATE)
        w.add_eot_token_id(vocab.tokens.index(END_OF_TURN))
    if embed_tokenizer:
        w.add_string(TOKENIZER_KEY, base64.b64encode(vocab.model_bytes).decode("ascii"))
    w.add_string(CONFIG_KEY, json.dumps(config.to_dict(), sort_keys=True))


def write_gguf(params: Params, config: LlamaConfig, tokenizer: str | Path, output: str | Path, dtype: str = "f32",
               name: str = "nanollama", progress: bool = True, *, _permute: bool = True,
               _embed_tokenizer: bool = True) -> dict:
    """Write `params` as a GGUF file at `output` (atomically). Returns a summary
    {path, dtype, tensors, bytes, fallbacks}. `_permute=False` (tests only) skips the Q/K permutation,
    giving a file that runs wrong in llama.cpp: the negative control of the parity test."""
    import gguf

    from nanollama_base.cli import Progress

    if dtype not in DTYPE_NAMES:
        raise ValueError(f"unknown --dtype {dtype!r}; choose one of {', '.join(DTYPE_NAMES)}")
    check_exportable(config)
    vocab = sentencepiece_vocab(tokenizer)
    if len(vocab.tokens) != config.vocab_size:
        raise ValueError(f"{tokenizer}: the tokenizer has {len(vocab.tokens)} pieces but the model's vocab_size is "
                         f"{config.vocab_size}")
    output = Path(output)

    # Plan: every tensor's name, shape and type, from the shapes alone.
    plan = []
    fallbacks = []
    for sd_name, thunk in iter_state(params, config):
        shape = gguf_shape(sd_name, config)
        qtype, note = tensor_qtype(shape, dtype)
        if note:
            fallbacks.append(f"{gguf_name(sd_name)}: {note}")
            log.warning("%s: %s", gguf_name(sd_name), note)
        plan.append((sd_name, thunk, shape, qtype))

    total = 0
    with atomic_path(output) as tmp:
        w = gguf.GGUFWriter(tmp, "llama")
        try:
            _write_metadata(w, config, vocab, name, dtype, _embed_tokenizer)
            for sd_name, _, shape, qtype in plan:
                nbytes = tensor_nbytes(shape, qtype)
                w.add_tensor_info(gguf_name(sd_name), shape, np.dtype(np.float32), nbytes, raw_dtype=qtype)
                total += nbytes
            w.write_header_to_file()
            w.write_kv_data_to_file()
            w.write_ti_data_to_file()
            with Progress(total, desc=f"GGUF {dtype}", unit="B", enabled=progress) as bar:
                for sd_name, thunk, shape, qtype in plan:
                    a = to_gguf_layout(sd_name, thunk(), config, permute=_permute)
                    assert a.shape == shape, (sd_name, a.shape, shape)
                    data = encode_tensor(a, qtype)
                    del a
                    w.write_tensor_data(data)
                    bar.update(data.nbytes)
                    del data
            w.flush()
        finally:
            w.close()
    return {"path": str(output), "dtype": dtype, "tensors": len(plan), "bytes": output.stat().st_size,
            "fallbacks": fallbacks}


def gguf_shape(sd_name: str, config: LlamaConfig) -> tuple[int, ...]:
    """The [out, in] shape llama.cpp stores for a state-dict name (vocab tensors trimmed)."""
    d, hd, f = config.n_embd, config.head_dim, config.ffn_hidden
    if sd_name in VOCAB_TENSORS:
        return (config.vocab_size, d)
    if sd_name == "norm.weight":
        return (d,)
    rest = sd_name.split(".", 2)[2]
    return {
        "attn_norm.weight": (d,), "ffn_norm.weight": (d,),
        "attn.c_q.weight": (config.n_head * hd, d), "attn.c_k.weight": (config.n_kv_head * hd, d),
        "attn.c_v.weight": (config.n_kv_head * hd, d), "attn.c_proj.weight": (d, config.n_head * hd),
        "ffn.gate_proj.weight": (f, d), "ffn.up_proj.weight": (f, d), "ffn.down_proj.weight": (d, f),
    }[rest]


def main(argv=None):
    from nanollama_jax import checkpoint
    from nanollama_base.cli import ArgumentParser, run_cli

    p = ArgumentParser(prog="python -m export.gguf", description=__doc__)
    p.add_argument("--checkpoint", required=True, help="a run folder (latest step) or one of its step folders")
    p.add_argument("--output", required=True, help="the .gguf file to write")
    p.add_argument("--dtype", default="f32", choices=DTYPE_NAMES, type=str.lower,
                   help="storage type of the matrices (norms stay F32); default f32")
    p.add_argument("--name", help="general.name (default: the run folder's name)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")

    def run():
        run_info, params = checkpoint.load_params(args.checkpoint)
        check_exportable(run_info.config)
        info = write_gguf(params, run_info.config, run_info.tokenizer_path, args.output, args.dtype,
                          name=args.name or run_info.dir.resolve().name, progress=not args.quiet)
        for note in info["fallbacks"]:
            print(f"note: {note}", file=sys.stderr)
        print(f"wrote {info['path']} ({args.dtype}, {info['tensors']} tensors, {info['bytes']:,} bytes, "
              f"step {run_info.step})")

    run_cli(p.prog, run)


if __name__ == "__main__":
    sys.exit(main())
