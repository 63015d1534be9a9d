"""Each training default with the rule that gave it, for `--dry-run`: training length, tokens per
step, rows per device, warmup and every group's learning rate. The numbers are the plan's (plan.py
holds the rules); this module only says where each came from.
"""
from __future__ import annotations

from .optim import MUON_LR, group_rates
from .plan import DEFAULT_TOKENS_PER_STEP, MIN_STEPS, TOKENS_PER_PARAM, WARMUP_STEPS, Plan

# nanollama's run recipes: tokens per optimizer step by size (REFERENCE.md), which configs/ keep.
REFERENCE_TOKENS_PER_STEP = "nano 131,072; micro, mini 262,144; small, goldie 524,288; medium, large 1,048,576; " \
                            "big 4,194,304"


def explain(plan: Plan, recipe: dict, flags: dict, source: str) -> list[str]:
    """Lines: each default of `plan` and its rule. `recipe` is the size's "train" section, `flags`
    the overrides the user gave (None: not given), `source` names the recipe (configs/<size>.json)."""
    c = plan.config
    params = c.param_count()
    tokens = plan.tokens_per_step
    lines = ["recipe (each default and the rule that gave it; a flag overrides):"]

    if flags.get("steps"):
        rule = "--steps"
    elif recipe.get("steps"):
        rule = f"{source} (a demo size: a fixed short run)"
    else:
        ideal = TOKENS_PER_PARAM * params / tokens
        rule = (f"{TOKENS_PER_PARAM} tokens per parameter (Chinchilla's ratio; the reference's sizes were trained "
                f"near it): {TOKENS_PER_PARAM} x {params:,} / {tokens:,} tokens per step = {ideal:,.1f}, rounded up"
                + (f", at least {MIN_STEPS}" if plan.steps == MIN_STEPS and ideal < MIN_STEPS else ""))
    lines.append(f"  steps {plan.steps:,} = {plan.steps * tokens / 1e9:.3g}B tokens "
                 f"({plan.steps * tokens / params:.1f} per parameter): {rule}")

    if flags.get("tokens_per_step"):
        rule = "--tokens-per-step"
    elif "tokens_per_step" in recipe:
        rule = f"{source}: the reference's run recipe for this size ({REFERENCE_TOKENS_PER_STEP})"
    else:
        rule = f"the reference's default {DEFAULT_TOKENS_PER_STEP:,}"
    lines.append(f"  tokens per step {tokens:,} ({plan.global_batch} sequences of {plan.seq_len}): {rule}")

    if flags.get("batch_size"):
        rule = "--batch-size"
    elif "batch_size" in recipe:
        rule = (f"{source}: the reference's 32 rows per device, halved until the bfloat16 step with the default "
                "remat fits 95% of an 80 GB device (README: memory)")
    else:
        rule = "the reference's 32 rows per device"
    lines.append(f"  rows per device per micro-step {plan.batch_size}, accumulation {plan.accum}: {rule}")

    warmup_rule = (f"{source}" if "warmup_steps" in recipe else f"the reference's {WARMUP_STEPS}")
    lines.append(f"  warmup {plan.warmup} steps: {warmup_rule}, at most a tenth of the run; then constant to half "
                 "the run, then linear decay to 0 (the reference's warmup-stable-decay)")

    rates = group_rates(c, plan.lr_scale, plan.optimizer)
    s = (c.n_embd / 768) ** -0.5
    scale = f" x lr scale {plan.lr_scale}" if plan.lr_scale != 1.0 else ""
    lines.append(f"  learning rates (the reference's rules, s = (d/768)^-0.5 = {s:.4g}{scale}): embeddings "
                 f"{rates['embed']:.4g} (0.2·s), output head and norms {rates['head']:.4g} (0.004·s), AdamW")
    if plan.optimizer == "muon":
        lines.append(f"  hidden matrices {rates['matrix']:.4g} (Muon's {MUON_LR}{scale}), times sqrt(max(1, out/in)) "
                     "per matrix")
    else:
        lines.append(f"  hidden matrices {rates['matrix']:.4g}: the head's rate (plain AdamW; Muon's {MUON_LR} is "
                     "a rate for orthogonalised updates)")
    lines.append(f"  weight decay {plan.weight_decay}: {source if 'weight_decay' in recipe else 'none (the reference)'}")
    return lines
