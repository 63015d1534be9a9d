"""The model config: one frozen dataclass, the named sizes in `configs/`, everything else derived."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from importlib import resources

HEAD_DIM = 64
VOCAB_MULTIPLE = 64


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


@dataclass(frozen=True)
class LlamaConfig:
    """Shape and numerics of a Llama 3 model, in nanollama's field names."""

    n_layer: int
    n_embd: int
    n_head: int
    n_kv_head: int
    vocab_size: int = 32000
    sequence_len: int = 2048
    head_dim: int = HEAD_DIM
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    multiple_of: int = 256
    # FFN width; 0 derives nanollama's round_up(int(8d/3), multiple_of). Imported models may differ.
    ffn_dim: int = 0
    # Extensions that llama.cpp cannot run; off by default.
    use_qk_norm: bool = False
    softcap: float = 0.0
    # Packed documents: a token attends only within its own document, documents starting at
    # `bos_id` inside a window (positions stay global: RoPE only sees relative distances).
    doc_mask: bool = False
    bos_id: int = 1
    # Execution: compute dtype (params stay float32; model.py states the precision policy), the
    # rematerialisation policy and the attention kernel. remat and attention change how the same
    # numbers are computed, not the run: compare=False, so a resume may change them.
    dtype: str = "float32"
    remat: str = field(default="none", compare=False)  # none | dots | qkv | full
    attention: str = field(default="auto", compare=False)  # auto | xla | cudnn

    def __post_init__(self):
        if self.n_head % self.n_kv_head:
            raise ValueError(f"n_head ({self.n_head}) must be a multiple of n_kv_head ({self.n_kv_head})")
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for RoPE, got {self.head_dim}")
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"remat must be one of {', '.join(REMAT_POLICIES)}, got {self.remat!r}")
        if self.attention not in ATTENTION_KINDS:
            raise ValueError(f"attention must be one of {', '.join(ATTENTION_KINDS)}, got {self.attention!r}")
        if self.dtype == "float16":
            raise ValueError("dtype float16 is not supported (it needs loss scaling, which nanollama-jax does not "
                             "do): use bfloat16, same speed and float32's range")
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"dtype must be float32 or bfloat16, got {self.dtype!r}")

    @property
    def ffn_hidden(self) -> int:
        return self.ffn_dim or round_up(int(8 * self.n_embd / 3), self.multiple_of)

    @property
    def padded_vocab(self) -> int:
        return round_up(self.vocab_size, VOCAB_MULTIPLE)

    @property
    def llama_cpp_compatible(self) -> bool:
        return not (self.use_qk_norm or self.softcap)

    def param_count(self) -> int:
        """Exact parameter count, from the shapes (the test checks it against `jax.eval_shape`)."""
        d, hd = self.n_embd, self.head_dim
        attn = d * self.n_head * hd * 2 + d * self.n_kv_head * hd * 2
        layer = attn + 3 * d * self.ffn_hidden + 2 * d
        return 2 * self.padded_vocab * d + self.n_layer * layer + d

    def flops_per_token(self, seq_len: int | None = None, causal: bool = True) -> float:
        """Training FLOPs per token: 6·(params − input embedding) for the matmuls (forward + backward)
        plus attention scores and values, 12·L·H·hd·T, halved when causal masking is counted honestly.
        nanollama logs the non-causal figure (causal=False)."""
        t = seq_len or self.sequence_len
        attn = 12 * self.n_layer * self.n_head * self.head_dim * t
        return 6 * (self.param_count() - self.padded_vocab * self.n_embd) + (attn / 2 if causal else attn)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "LlamaConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown model config fields: {', '.join(sorted(unknown))}")
        return cls(**d)


REMAT_POLICIES = ("none", "dots", "qkv", "full")
# The --dtype choices of every command; float16 is offered so that asking for it is told why not.
DTYPE_CHOICES = ("float32", "bfloat16", "float16")
ATTENTION_KINDS = ("auto", "xla", "cudnn")


def default_remat(dtype: str) -> str:
    """The remat policy when none is asked for. bfloat16 is the accelerator dtype (the default on
    GPU/TPU), so it brings the accelerator default: `qkv` keeps only q, k, v and the attention output
    of each layer, which fits every named size's recipe in an 80 GB device (README: memory);
    float32, the CPU default, keeps every activation: memory is plentiful there and recomputing costs time."""
    return "qkv" if dtype == "bfloat16" else "none"


def size_names() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files("configs").iterdir() if p.name.endswith(".json"))


def load_size(name: str) -> tuple[LlamaConfig, dict]:
    """The model config and the training defaults of a named size (`configs/<name>.json`)."""
    path = resources.files("configs") / f"{name}.json"
    if not path.is_file():
        raise ValueError(f"unknown size {name!r}; known sizes: {', '.join(size_names())}")
    recipe = json.loads(path.read_text())
    return LlamaConfig(**recipe["model"]), recipe.get("train", {})
