"""Export round trips: GGUF read back into a run (bit-exact, quantised dequantised, a foreign vocabulary)
and nanollama `.pt` checkpoints both ways against a torch model of the reference's math."""
import subprocess
import sys

import jax
import numpy as np
import pytest

from export import gguf as G
from nanollama_jax import checkpoint

from export_fixtures import (  # noqa: F401 (pytest fixtures, requested by name)
    PROMPT, TEXTS, VOCAB, assert_params_equal_on_real_rows, our_logits, config, corpus, f32_gguf, params,
    prompt_ids, run_dir, sp, tokenizer_file,
)


# ---------------------------------------------------------------- GGUF read back


def test_roundtrip_checkpoint_gguf_f32_checkpoint(tmp_path, f32_gguf, run_dir, params, config, tokenizer_file,
                                                  sp, prompt_ids):
    out = tmp_path / "back"
    r = subprocess.run([sys.executable, "-m", "export.gguf_read", str(f32_gguf), "--output", str(out)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    run, back = checkpoint.load_params(out)
    assert run.config == config
    assert_params_equal_on_real_rows(back, params, config)
    assert run.tokenizer_path.read_bytes() == tokenizer_file.read_bytes()  # the original, byte for byte
    np.testing.assert_array_equal(our_logits(back, config, prompt_ids), our_logits(params, config, prompt_ids))


def test_roundtrip_is_exact_when_padding_rows_are_zero(tmp_path, params, config, tokenizer_file):
    from export.gguf_read import read_gguf

    p = jax.tree_util.tree_map(np.array, params)
    p["tok_embeddings"]["embedding"][config.vocab_size:] = 0
    p["output"]["kernel"][:, config.vocab_size:] = 0
    G.write_gguf(p, config, tokenizer_file, tmp_path / "m.gguf", "f32", progress=False)
    config2, back, tok = read_gguf(tmp_path / "m.gguf")
    assert config2 == config and tok == tokenizer_file.read_bytes()
    for a, b in zip(jax.tree_util.tree_leaves(back), jax.tree_util.tree_leaves(p)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("dtype", ["f16", "q8_0", "q4_1"])
def test_read_back_quantised_gguf_dequantises(tmp_path, params, config, tokenizer_file, dtype):
    from export.gguf_read import read_gguf

    G.write_gguf(params, config, tokenizer_file, tmp_path / "m.gguf", dtype, progress=False)
    _, back, _ = read_gguf(tmp_path / "m.gguf")
    assert_params_equal_on_real_rows(back, G.quantized_params(params, config, dtype), config)


def test_foreign_vocab_rebuilds_an_equivalent_sentencepiece_model(tmp_path, params, config, tokenizer_file, sp):
    """A GGUF without our embedded tokenizer.model (as from any other converter): the SentencePiece
    model rebuilt from tokens/scores/types encodes exactly like the original."""
    import sentencepiece as spm

    from export.gguf_read import read_gguf

    G.write_gguf(params, config, tokenizer_file, tmp_path / "m.gguf", "f32", progress=False, _embed_tokenizer=False)
    _, _, tok = read_gguf(tmp_path / "m.gguf")
    assert tok != tokenizer_file.read_bytes()
    rebuilt = spm.SentencePieceProcessor(model_proto=tok)
    assert rebuilt.get_piece_size() == VOCAB
    assert (rebuilt.bos_id(), rebuilt.eos_id(), rebuilt.unk_id(), rebuilt.pad_id()) == (1, 2, 0, -1)
    for text in TEXTS + [PROMPT]:
        assert rebuilt.encode(text) == sp.encode(text), text
        assert rebuilt.decode(sp.encode(text)) == sp.decode(sp.encode(text))


# ---------------------------------------------------------------- nanollama .pt checkpoints

def reference_model(cfg):
    """The reference's model layout and math (REFERENCE.md), in torch: half-split RoPE, GQA with
    consecutive query-head groups, F.rms_norm with a learnable weight, SwiGLU, untied head."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    d, h, kv = cfg["n_embd"], cfg["n_head"], cfg["n_kv_head"]
    hd = d // h
    ffn = -(-int(8 * d / 3) // cfg["multiple_of"]) * cfg["multiple_of"]
    vpad = -(-cfg["vocab_size"] // 64) * 64

    class RMSNorm(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(d))

        def forward(self, x):
            return F.rms_norm(x, (d,), self.weight, cfg["norm_eps"])

    def rope(x, theta):  # x [B, H, T, hd]
        t = x.shape[2]
        inv = theta ** (-torch.arange(0, hd, 2, dtype=torch.float32) / hd)
        ang = torch.arange(t, dtype=torch.float32)[:, None] * inv
        cos, sin = ang.cos(), ang.sin()
        x1, x2 = x[..., : hd // 2], x[..., hd // 2:]
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)

    class Attn(nn.Module):
        def __init__(self):
            super().__init__()
            self.c_q = nn.Linear(d, h * hd, bias=False)
            self.c_k = nn.Linear(d, kv * hd, bias=False)
            self.c_v = nn.Linear(d, kv * hd, bias=False)
            self.c_proj = nn.Linear(h * hd, d, bias=False)

        def forward(self, x):
            b, t, _ = x.shape
            q = rope(self.c_q(x).view(b, t, h, hd).transpose(1, 2), cfg["rope_theta"])
            k = rope(self.c_k(x).view(b, t, kv, hd).transpose(1, 2), cfg["rope_theta"])
            v = self.c_v(x).view(b, t, kv, hd).transpose(1, 2)
            k, v = k.repeat_interleave(h // kv, dim=1), v.repeat_interleave(h // kv, dim=1)
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            return self.c_proj(y.transpose(1, 2).reshape(b, t, h * hd))

    class FFN(nn.Module):
        def __init__(self):
            super().__init__()
            self.gate_proj = nn.Linear(d, ffn, bias=False)
            self.up_proj = nn.Linear(d, ffn, bias=False)
            self.down_proj = nn.Linear(ffn, d, bias=False)

        def forward(self, x):
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn_norm, self.attn, self.ffn_norm, self.ffn = RMSNorm(), Attn(), RMSNorm(), FFN()

        def forward(self, x):
            x = x + self.attn(self.attn_norm(x))
            return x + self.ffn(self.ffn_norm(x))

    class Llama(nn.Module):
        def __init__(self):
            super().__init__()
            self.tok_embeddings = nn.Embedding(vpad, d)
            self.layers = nn.ModuleList([Block() for _ in range(cfg["n_layer"])])
            self.norm = RMSNorm()
            self.output = nn.Linear(d, vpad, bias=False)

        def forward(self, idx):
            x = self.tok_embeddings(idx)
            for layer in self.layers:
                x = layer(x)
            return self.output(self.norm(x)).float()

    torch.manual_seed(0)
    m = Llama()
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
    return m.eval()


REF_CONFIG = {"sequence_len": 128, "vocab_size": VOCAB, "n_layer": 2, "n_head": 4, "n_kv_head": 2, "n_embd": 256,
              "norm_eps": 1e-5, "multiple_of": 256, "window_pattern": "L", "rope_theta": 10000.0,
              "tie_embeddings": False, "use_qk_norm": False, "use_post_emb_norm": False, "use_resformer": False,
              "softcap": 0.0}


def save_reference_pt(model, path, cfg=REF_CONFIG, step=42):
    import json

    import torch

    state = {"_orig_mod." + k: v.detach().clone() for k, v in model.state_dict().items()}  # torch.compile'd
    opt = {"state": {0: {"momentum_buffer": torch.zeros(3)}}, "param_groups": [{"lr": 0.02}]}
    torch.save({"model_state_dict": state, "optimizer_state_dict": opt, "step": step, "config": dict(cfg)}, path)
    path.with_name(path.stem + "_meta.json").write_text(
        json.dumps({"step": step, "config": cfg, "checkpoint_path": str(path)}))
    return path


def test_reference_pt_loads_with_same_logits_and_round_trips(tmp_path, tokenizer_file, prompt_ids):
    import torch

    ref = reference_model(REF_CONFIG)
    pt = save_reference_pt(ref, tmp_path / "checkpoint_step42.pt")
    run_dir = tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "export.nanollama", "--from-pt", str(pt), "--tokenizer",
                        str(tokenizer_file), "--output", str(run_dir)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    run, params = checkpoint.load_params(run_dir)
    assert run.step == 42 and run.config.n_embd == 256 and run.config.n_kv_head == 2
    with torch.no_grad():
        theirs = ref(torch.tensor([prompt_ids])).numpy()[0, :, :VOCAB]
    ours = our_logits(params, run.config, prompt_ids)
    diff = np.abs(theirs - ours).max()
    print(f"reference torch model vs ours: max|diff| = {diff:.2e}")
    assert diff <= 1e-4

    back = tmp_path / "out" / "checkpoint_step42.pt"
    r = subprocess.run([sys.executable, "-m", "export.nanollama", "--checkpoint", str(run_dir), "--output", str(back)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    a = torch.load(pt, weights_only=True)
    b = torch.load(back, weights_only=True)
    sa = {k.removeprefix("_orig_mod."): v for k, v in a["model_state_dict"].items()}
    assert list(sa) == list(b["model_state_dict"])  # same names, same order
    for k, v in sa.items():
        assert b["model_state_dict"][k].dtype == v.dtype
        assert torch.equal(b["model_state_dict"][k], v), k
    assert b["step"] == 42 and b["config"] == REF_CONFIG
    import json
    meta = json.loads(back.with_name("checkpoint_step42_meta.json").read_text())
    assert meta["step"] == 42 and meta["config"] == REF_CONFIG and meta["checkpoint_path"] == str(back)
    # and the module itself loads it
    reference_model(REF_CONFIG).load_state_dict(b["model_state_dict"])


@pytest.mark.parametrize("change,word", [({"use_resformer": True}, "ResFormer"),
                                         ({"use_post_emb_norm": True}, "post-embedding norm"),
                                         ({"tie_embeddings": True}, "tied"),
                                         ({"window_pattern": "SSSL"}, "sliding-window")])
def test_reference_extensions_are_refused(tmp_path, change, word):
    from export.nanollama import load_pt

    pt = save_reference_pt(reference_model(REF_CONFIG), tmp_path / "checkpoint_step1.pt", {**REF_CONFIG, **change})
    with pytest.raises(ValueError, match=word):
        load_pt(pt)


def test_reference_extension_refused_by_the_cli(tmp_path, tokenizer_file):
    pt = save_reference_pt(reference_model(REF_CONFIG), tmp_path / "checkpoint_step1.pt",
                           {**REF_CONFIG, "use_resformer": True})
    out = tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "export.nanollama", "--from-pt", str(pt), "--tokenizer",
                        str(tokenizer_file), "--output", str(out)], capture_output=True, text=True)
    assert r.returncode == 1
    assert len(r.stderr.strip().splitlines()) == 1 and "ResFormer" in r.stderr, r.stderr
    assert not out.exists()
