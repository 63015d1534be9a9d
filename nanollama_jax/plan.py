"""What one optimizer step is made of: the model config as trained, batch geometry, accumulation,
steps and schedule, derived once from a size's recipe and whatever the user overrode."""
from __future__ import annotations

import dataclasses

import jax

from .config import LlamaConfig, default_remat
from .model import attention_implementation


@dataclasses.dataclass(frozen=True)
class Plan:
    """Everything derived from the flags: what one optimizer step is made of."""

    config: LlamaConfig
    steps: int
    warmup: int
    seq_len: int
    batch_size: int  # rows per data-parallel shard per micro-step
    data_parallel: int
    accum: int
    seed: int
    optimizer: str
    lr_scale: float
    weight_decay: float

    @property
    def micro_batch(self) -> int:
        return self.batch_size * self.data_parallel

    @property
    def global_batch(self) -> int:
        return self.micro_batch * self.accum

    @property
    def tokens_per_step(self) -> int:
        return self.global_batch * self.seq_len

    def settings(self) -> dict:
        """The plan without the model config (which a run records on its own), for config.json."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "config"}

    def describe(self, placement: str) -> str:
        """The plan in a few lines; `placement` says where it runs (the mesh)."""
        c = self.config
        return "\n".join([
            f"model: {c.n_layer} layers, d {c.n_embd}, {c.n_head} heads ({c.n_kv_head} kv), ffn {c.ffn_hidden}, "
            f"vocab {c.vocab_size} (padded {c.padded_vocab}), context {c.sequence_len}, dtype {c.dtype}, remat {c.remat}"
            f"{f' (the {c.dtype} default)' if c.remat == default_remat(c.dtype) else ''}, "
            f"attention {attention_implementation(c)}",
            f"{c.param_count():,} parameters",
            f"FLOPs/token: {c.flops_per_token(self.seq_len):.4g} (causal; nanollama's non-causal figure "
            f"{c.flops_per_token(self.seq_len, causal=False):.4g})",
            placement,
            f"batch: {self.batch_size} rows x {self.data_parallel} data-parallel x {self.accum} accumulation "
            f"= {self.global_batch} sequences of {self.seq_len} = {self.tokens_per_step:,} tokens per step",
            f"steps: {self.steps} (warmup {self.warmup}, decay from {self.steps // 2}), optimizer {self.optimizer}, "
            f"lr scale {self.lr_scale}",
        ])


# What a resumed run must keep, because it changes what the run computes: the optimizer and its
# schedule, the data order. The rest may change on resume: remat, the mesh, and the micro-batch so
# long as the global batch stays (accumulation makes up the difference). The model config (dtype
# included) and the data's identity are checked apart (checkpoint.resume_step).
RUN_DEFINING = {
    "optimizer": "optimizer (--optimizer)",
    "steps": "schedule length (--steps)",
    "warmup": "warmup steps",
    "lr_scale": "learning-rate scale (--lr-scale)",
    "weight_decay": "weight decay (the recipe's weight_decay)",
    "seed": "data order and init (--seed)",
    "seq_len": "sequence length (--seq-len)",
    "tokens_per_step": "tokens per step (--tokens-per-step)",
}


def resume_changes(saved: dict, plan: Plan) -> list[str]:
    """What `plan` changes of a run whose config.json "train" section is `saved`, one phrase per
    setting (empty: the run may resume with this plan)."""
    if {"batch_size", "data_parallel", "accum", "seq_len"} <= saved.keys():
        rows = saved["batch_size"] * saved["data_parallel"] * saved["accum"]
        saved = {**saved, "tokens_per_step": rows * saved["seq_len"]}
    now = {**plan.settings(), "tokens_per_step": plan.tokens_per_step}
    return [f"{what} {saved[key]} → {now[key]}" for key, what in RUN_DEFINING.items()
            if key in saved and saved[key] != now[key]]


# Recipe rules (recipe.py explains them in --dry-run): train on TOKENS_PER_PARAM tokens per
# parameter (Chinchilla's compute-optimal ratio, which the reference's table of sizes and token
# counts follows: nano 0.9B+ tokens for 46M parameters), at least MIN_STEPS steps; warm up for
# WARMUP_STEPS (the reference's), at most a tenth of the run; DEFAULT_TOKENS_PER_STEP (the
# reference's default, 256 rows of 2048) when a recipe states none.
TOKENS_PER_PARAM = 20
MIN_STEPS = 1000
WARMUP_STEPS = 100
DEFAULT_TOKENS_PER_STEP = 524288


def compute_optimal_steps(config: LlamaConfig, tokens_per_step: int) -> int:
    """Steps to train TOKENS_PER_PARAM tokens per parameter (rounded up), at least MIN_STEPS."""
    return max(MIN_STEPS, -(-TOKENS_PER_PARAM * config.param_count() // tokens_per_step))


def default_dtype() -> str:
    return "float32" if jax.default_backend() == "cpu" else "bfloat16"


def build_plan(config: LlamaConfig, recipe: dict, data_parallel: int, *, seq_len: int | None = None,
               batch_size: int | None = None, tokens_per_step: int | None = None, steps: int | None = None,
               dtype: str | None = None, remat: str | None = None, seed: int = 0, optimizer: str = "muon",
               lr_scale: float = 1.0) -> Plan:
    """The plan from a size's recipe (configs/<size>.json) with the given overrides (None: the
    recipe's value). Accumulation makes up the tokens per step that one micro-batch does not hold."""
    seq_len = seq_len or config.sequence_len
    dtype = dtype or default_dtype()
    config = dataclasses.replace(config, sequence_len=seq_len, dtype=dtype, remat=remat or default_remat(dtype))
    batch_size = batch_size or recipe.get("batch_size", 32)
    micro = batch_size * data_parallel * seq_len
    tokens = tokens_per_step or recipe.get("tokens_per_step", DEFAULT_TOKENS_PER_STEP)
    accum = max(1, tokens // micro)
    if tokens > micro and tokens % micro:
        raise ValueError(f"--tokens-per-step {tokens} is not a multiple of batch {batch_size} x data-parallel "
                         f"{data_parallel} x seq {seq_len} = {micro} tokens; try --tokens-per-step {accum * micro}")
    steps = steps or recipe.get("steps") or compute_optimal_steps(config, accum * micro)
    warmup = min(recipe.get("warmup_steps", WARMUP_STEPS), max(1, steps // 10))
    return Plan(config, steps, warmup, seq_len, batch_size, data_parallel, accum, seed, optimizer, lr_scale,
                recipe.get("weight_decay", 0.0))
