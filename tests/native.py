"""Native code under comparison (llama.cpp through llama-cpp-python, our Go engine) runs in a child process.

A crash inside native code (a segmentation fault in one of llama.cpp's CPU kernels, say) would otherwise kill
the pytest process and every test after it. Here it is one failed assertion that names the model file, the
tensor type stored in it and the signal, and the rest of the suite runs on.

The llama.cpp child is this file run as a script: `python native.py REQUEST.json` reads what to do from the
request and writes its result beside it (logits as .npy, token lists as JSON).
"""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import tempfile
from functools import lru_cache
from pathlib import Path

import numpy as np


# ---------------------------------------------------------------- how a child ended

def gguf_types(path) -> str:
    """The tensor types of a GGUF's matrices, e.g. 'Q4_0' or 'Q4_K/Q5_K/Q6_K' (norms, always F32, left out)."""
    try:
        from gguf import GGUFReader

        types = sorted({t.tensor_type.name for t in GGUFReader(str(path)).tensors if len(t.shape) > 1})
    except Exception as e:  # a file too broken to read still gets its crash reported
        return f"types unreadable: {type(e).__name__}"
    return "/".join(types) or "no matrices"


@lru_cache(maxsize=1)
def llama_cpp_built_with_amx() -> bool:
    """Whether the installed llama.cpp was compiled with its AMX kernels (asked in a child, of course)."""
    r = subprocess.run([sys.executable, "-c", "import llama_cpp; print(llama_cpp.llama_print_system_info())"],
                       capture_output=True, text=True, timeout=120)
    return "AMX_INT8 = 1" in r.stdout


def exit_failure(what: str, model, returncode: int, stderr: str) -> str | None:
    """None for a clean exit; otherwise the one-line account of the failure (plus the child's last words)."""
    if returncode == 0:
        return None
    where = f"{model} ({gguf_types(model)})" if model is not None else "no model file"
    tail = "\n".join(stderr.strip().splitlines()[-15:])
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        head = f"{what} died by {name} on {where}"
        if what == "llama.cpp" and llama_cpp_built_with_amx():
            head += ("; this llama.cpp was built with its AMX kernels, which crash on some Intel CPUs "
                     "(README, Known issues): rebuild it with `bash scripts/setup.sh test`")
        return f"{head}\n{tail}"
    return f"{what} exited with status {returncode} on {where}\n{tail}"


def run_native(cmd, *, what: str, model, input: bytes | None = None, timeout: float = 300,
               check: bool = True, cwd=None) -> subprocess.CompletedProcess:
    """Runs a native child; death by a signal is always an AssertionError naming `model`, its types and the
    signal; a non-zero exit is one too when `check` (tests of error handling pass check=False)."""
    r = subprocess.run([str(c) for c in cmd], capture_output=True, input=input, timeout=timeout, cwd=cwd)
    stderr = r.stderr.decode("utf-8", errors="replace")
    failure = exit_failure(what, model, r.returncode, stderr)
    if failure and (check or r.returncode < 0):
        raise AssertionError(failure)
    return r


# ---------------------------------------------------------------- the Go engine

def go_model_arg(args) -> str | None:
    args = [str(a) for a in args]
    return args[args.index("--model") + 1] if "--model" in args[:-1] else None


def run_go(engine, *args, input: bytes | None = None, check: bool = True, timeout: float = 120):
    """The Go binary with `args`; stdout and stderr decoded. The model named by --model is the one reported."""
    r = run_native([engine, *args], what="the Go engine", model=go_model_arg(args), input=input, timeout=timeout,
                   check=check)
    r.stdout = r.stdout.decode("utf-8", errors="replace")
    r.stderr = r.stderr.decode("utf-8", errors="replace")
    return r


# ---------------------------------------------------------------- llama.cpp

def _llama_cpp(request: dict, model, timeout: float):
    with tempfile.TemporaryDirectory(prefix="llama-child-") as tmp:
        req = Path(tmp) / "request.json"
        req.write_text(json.dumps({**request, "model": str(model), "out": str(Path(tmp) / "out")}))
        run_native([sys.executable, Path(__file__).resolve(), req], what="llama.cpp", model=model, timeout=timeout)
        out = Path(tmp) / "out"
        return np.load(out.with_suffix(".npy")) if request["op"] == "logits" else json.loads(out.read_text())


def llama_cpp_logits(model, ids, *, kv: str = "f32", n_ctx: int = 512, lora=None, lora_scale: float = 1.0,
                     timeout: float = 300) -> np.ndarray:
    """llama.cpp's logits [len(ids), vocab] for every position of one batch; `kv` is the KV-cache type
    ('f32': the same arithmetic as a float reference; 'f16': llama.cpp's default)."""
    assert kv in ("f32", "f16"), kv
    return _llama_cpp({"op": "logits", "ids": [int(i) for i in ids], "kv": kv, "n_ctx": n_ctx,
                       "lora": str(lora) if lora else None, "lora_scale": lora_scale}, model, timeout)


def llama_cpp_greedy(model, ids, max_tokens: int, *, n_ctx: int = 512, timeout: float = 300):
    """(new token ids, their detokenised text): greedy decoding one token at a time, stopping at EOS."""
    out = _llama_cpp({"op": "greedy", "ids": [int(i) for i in ids], "max_tokens": max_tokens, "n_ctx": n_ctx},
                     model, timeout)
    return out["tokens"], out["text"]


def llama_cpp_tokenize(model, texts, *, timeout: float = 120) -> list[list[int]]:
    """llama.cpp's token ids for each text, with BOS, special tokens not parsed."""
    return _llama_cpp({"op": "tokenize", "texts": list(texts)}, model, timeout)


def llama_cpp_chat_ids(model, conversations, *, timeout: float = 120) -> list[dict]:
    """For each conversation ({"messages": [...], "add_generation_prompt": bool}), llama.cpp's own chat
    formatting of it as token ids, two ways: "builtin" (llama_chat_apply_template with the GGUF's template,
    then tokenised with BOS and special tokens parsed, as llama.cpp's tools do) and "jinja" (llama-cpp-python's
    Jinja2ChatFormatter running the template text, tokenised as its chat handler does)."""
    return _llama_cpp({"op": "chat", "conversations": list(conversations)}, model, timeout)


def _chat_ids(llm, conv) -> dict:
    import ctypes

    import llama_cpp
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    msgs, gen = conv["messages"], conv["add_generation_prompt"]
    arr = (llama_cpp.llama_chat_message * len(msgs))()
    keep = []  # the encoded strings must outlive the call
    for i, m in enumerate(msgs):
        keep += [m["role"].encode(), m["content"].encode()]
        arr[i].role, arr[i].content = keep[-2], keep[-1]
    tmpl = llama_cpp.llama_model_chat_template(llm._model.model, None)
    buf = ctypes.create_string_buffer(1 << 16)
    n = llama_cpp.llama_chat_apply_template(tmpl, arr, len(msgs), gen, buf, len(buf))
    assert 0 < n < len(buf), f"llama_chat_apply_template returned {n}"
    builtin = llm.tokenize(buf.raw[:n], add_bos=True, special=True)
    fmt = Jinja2ChatFormatter(llm.metadata["tokenizer.chat_template"], eos_token="</s>", bos_token="<s>",
                              add_generation_prompt=gen)
    jinja = llm.tokenize(fmt(messages=msgs).prompt.encode(), add_bos=False, special=True)
    return {"builtin": builtin, "jinja": jinja, "text": buf.raw[:n].decode()}


def _child(request_path: str) -> None:
    import llama_cpp

    req = json.loads(Path(request_path).read_text())
    out = Path(req["out"])
    if req["op"] in ("tokenize", "chat"):
        llm = llama_cpp.Llama(model_path=req["model"], vocab_only=True, verbose=False)
        if req["op"] == "chat":
            out.write_text(json.dumps([_chat_ids(llm, c) for c in req["conversations"]]))
            return
        out.write_text(json.dumps([llm.tokenize(t.encode(), add_bos=True, special=False) for t in req["texts"]]))
        return
    kv = {"f32": llama_cpp.GGML_TYPE_F32, "f16": llama_cpp.GGML_TYPE_F16}[req.get("kv", "f16")]
    n_ctx = req["n_ctx"]
    llm = llama_cpp.Llama(model_path=req["model"], lora_path=req.get("lora"), lora_scale=req.get("lora_scale", 1.0),
                          logits_all=True, n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, type_k=kv, type_v=kv,
                          n_threads=2, seed=0, verbose=False)
    ids = req["ids"]
    llm.eval(ids)
    if req["op"] == "logits":
        np.save(out.with_suffix(".npy"), np.array(llm.scores[: len(ids)], dtype=np.float32))
        return
    new = []
    for _ in range(req["max_tokens"]):
        nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        if nxt == llm.token_eos():
            break
        new.append(nxt)
        llm.eval([nxt])
    out.write_text(json.dumps({"tokens": new, "text": llm.detokenize(new).decode("utf-8", errors="replace")}))


if __name__ == "__main__":
    _child(sys.argv[1])
