"""Norms of a gamma per tensor and per layer, relative to the base and against a reference delta:
as numbers, a text table and a PNG."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .compat import layer_of
from .encodings import Gamma


def _cos(a, b) -> float:
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    return float(np.dot(a.ravel(), b.ravel()) / (na * nb)) if na and nb else float("nan")


def stats(g: Gamma, base_state: dict | None = None, ref_delta: dict | None = None) -> dict:
    rows, layers = [], {}
    for k, e in g.tensors.items():
        d = e.dense().astype(np.float64)
        row = {"tensor": k, "shape": list(e.shape), "norm": float(np.linalg.norm(d)), "encoding": e.kind}
        i, _ = layer_of(k)
        key = "top" if i is None else i
        agg = layers.setdefault(key, {"layer": key, "sq": 0.0, "ref_sq": 0.0, "dot": 0.0})
        agg["sq"] += row["norm"] ** 2
        if base_state is not None:
            row["base_norm"] = float(np.linalg.norm(base_state[k]))
            row["relative"] = row["norm"] / row["base_norm"] if row["base_norm"] else float("nan")
        if ref_delta is not None:
            r = ref_delta[k].astype(np.float64)
            row["ref_norm"] = float(np.linalg.norm(r))
            row["cosine"] = _cos(d, r)
            agg["ref_sq"] += float(r.ravel() @ r.ravel())
            agg["dot"] += float(d.ravel() @ r.ravel())
        rows.append(row)
    per_layer = []
    for agg in layers.values():
        out = {"layer": agg["layer"], "norm": agg["sq"] ** 0.5}
        if ref_delta is not None:
            out["ref_norm"] = agg["ref_sq"] ** 0.5
            den = out["norm"] * out["ref_norm"]
            out["cosine"] = agg["dot"] / den if den else float("nan")
        per_layer.append(out)
    total = sum(r["norm"] ** 2 for r in rows) ** 0.5
    result = {"tensors": rows, "layers": per_layer, "total_norm": total}
    if ref_delta is not None:
        dot = sum(a["dot"] for a in layers.values())
        rn = sum(a["ref_sq"] for a in layers.values()) ** 0.5
        result["ref_total_norm"] = rn
        result["cosine"] = dot / (total * rn) if total and rn else float("nan")
    return result


def format_stats(s: dict) -> str:
    has_base = "base_norm" in s["tensors"][0]
    has_ref = "cosine" in s["tensors"][0]
    head = f"{'tensor':<34} {'shape':>13} {'‖γ‖':>10}"
    head += f" {'‖θ_base‖':>10} {'‖γ‖/‖θ‖':>9}" if has_base else ""
    head += f" {'‖ref‖':>10} {'cos(γ,ref)':>10}" if has_ref else ""
    lines = [head, "-" * len(head)]
    for r in s["tensors"]:
        line = f"{r['tensor']:<34} {'x'.join(map(str, r['shape'])):>13} {r['norm']:>10.4g}"
        if has_base:
            line += f" {r['base_norm']:>10.4g} {r['relative']:>9.3g}"
        if has_ref:
            line += f" {r['ref_norm']:>10.4g} {r['cosine']:>10.4f}"
        lines.append(line)
    lines += ["", f"{'layer':<8} {'‖γ‖':>10}" + (f" {'‖ref‖':>10} {'cos(γ,ref)':>10}" if has_ref else "")]
    for r in s["layers"]:
        line = f"{str(r['layer']):<8} {r['norm']:>10.4g}"
        if has_ref:
            line += f" {r['ref_norm']:>10.4g} {r['cosine']:>10.4f}"
        lines.append(line)
    lines.append(f"total ‖γ‖ = {s['total_norm']:.6g}")
    if has_ref:
        lines.append(f"total ‖ref‖ = {s['ref_total_norm']:.6g}; cosine(γ, reference delta) over all tensors = "
                     f"{s['cosine']:.4f}")
    return "\n".join(lines)


def plot_stats(s: dict, output, title: str = "gamma") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from nanollama_base.files import atomic_path

    has_ref = "cosine" in s["layers"][0]
    fig, axes = plt.subplots(1, 3 if has_ref else 2, figsize=(15 if has_ref else 10, 4))
    layers = [r for r in s["layers"]]
    labels = [str(r["layer"]) for r in layers]
    x = np.arange(len(layers))
    ax = axes[0]
    ax.bar(x - 0.2 if has_ref else x, [r["norm"] for r in layers], 0.4 if has_ref else 0.8, label="‖γ‖")
    if has_ref:
        ax.bar(x + 0.2, [r["ref_norm"] for r in layers], 0.4, label="‖reference delta‖")
    ax.set_xticks(x, labels)
    if has_ref:
        ax.set_yscale("log")  # a reference delta (another seed) can be orders of magnitude larger
    ax.set_xlabel("layer ('top': embedding, final norm, head)")
    ax.set_title("norm per layer")
    ax.legend()
    ax = axes[1]
    rows = s["tensors"]
    ax.barh(np.arange(len(rows)), [r["norm"] for r in rows])
    ax.set_yticks(np.arange(len(rows)), [r["tensor"] for r in rows], fontsize=6)
    ax.invert_yaxis()
    ax.set_title("‖γ‖ per tensor")
    if has_ref:
        ax = axes[2]
        ax.barh(np.arange(len(rows)), [r["cosine"] for r in rows])
        ax.set_yticks(np.arange(len(rows)), [r["tensor"] for r in rows], fontsize=6)
        ax.invert_yaxis()
        ax.axvline(0, color="k", lw=0.5)
        ax.set_title(f"cos(γ, reference delta); all tensors {s['cosine']:.3f}")
    fig.suptitle(title)
    fig.tight_layout()
    output = Path(output)
    with atomic_path(output) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return output
