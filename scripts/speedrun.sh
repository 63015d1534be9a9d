#!/usr/bin/env bash
# The whole chat path on a laptop CPU, no download: prepare → pretrain tiny → SFT → evaluate → GGUF →
# a chat answer from the Go engine, then a report card. About 7.5 minutes on 2 cores (the README shows one).
#
#   bash scripts/speedrun.sh                 # everything under ./speedrun/
#   OUT=/tmp/sr STEPS=300 SFT_STEPS=300 bash scripts/speedrun.sh
#
# Data: the built-in corpus (the Python documentation) and the built-in chat set (questions about the
# standard library answered by its docstrings' first sentences: python -m data.chatset).
# Needs: bash scripts/setup.sh test (the Python package and Go).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
OUT=${OUT:-speedrun}
STEPS=${STEPS:-200}            # pretraining steps (4,096 tokens each)
SFT_STEPS=${SFT_STEPS:-250}    # SFT steps (8 rows of 128 tokens each)
CHATS=${CHATS:-3000}           # conversations from the built-in chat set
QUESTION=${QUESTION:-'What does `json.dumps` do?'}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
RUNS="$OUT/runs"
command -v go >/dev/null || { echo "speedrun: Go is missing; run bash scripts/setup.sh test" >&2; exit 1; }

declare -a STAGES
start_all=$(date +%s)
stage() {  # stage NAME COMMAND...: run (stdout to $OUT/NAME.out, stderr to $OUT/NAME.log), record the time
  local name=$1; shift
  local t0=$(date +%s)
  echo "== $name: $*" >&2
  if ! "$@" >"$OUT/$name.out" 2>"$OUT/$name.log"; then
    tail -20 "$OUT/$name.log" >&2
    echo "speedrun: stage $name failed (log: $OUT/$name.log)" >&2
    exit 1
  fi
  STAGES+=("$(printf '%-10s %4ds' "$name" $(( $(date +%s) - t0 )))")
}

# 1. data: the built-in corpus (cached under ~/.cache/nanollama-jax) and the chat set
stage prepare "$PY" -c "from data.prepare import ensure_builtin; print(ensure_builtin())"
stage chatset "$PY" -m data.chatset --output "$OUT/chats.jsonl" --limit "$CHATS"
# 2. pretrain the tiny model, 3. teach it to answer
stage pretrain "$PY" -m nanollama_jax.train --size tiny --steps "$STEPS" --model-tag base --runs-dir "$RUNS" \
  --sample-every 0 --log-every 50
stage sft "$PY" -m nanollama_jax.sft --base "$RUNS/base" --data "$OUT/chats.jsonl" --model-tag chat \
  --runs-dir "$RUNS" --steps "$SFT_STEPS" --seq-len 128 --batch-size 8 --log-every 50
# 4. evaluate: bits per byte of held-out documentation text, before and after SFT
"$PY" -c "from pydoc_data.topics import topics; open('$OUT/heldout.txt', 'w').write(topics['with'] + topics['while'])"
stage eval-base "$PY" -m nanollama_jax.eval --checkpoint "$RUNS/base" --bpb-text "$OUT/heldout.txt" \
  --output "$OUT/eval-base.json" --quiet
stage eval-chat "$PY" -m nanollama_jax.eval --checkpoint "$RUNS/chat" --bpb-text "$OUT/heldout.txt" \
  --output "$OUT/eval-chat.json" --quiet
# 5. GGUF (with tokenizer.chat_template) and the Go engine
stage gguf "$PY" -m export.gguf --checkpoint "$RUNS/chat" --output "$OUT/chat-f16.gguf" --dtype f16
stage go-build bash -c "cd go && go build -o '$OUT/nanollama' ."
# The prompt in the chat format (data/chat.py: the ids llama.cpp's own template gives); Go stops at <|eot_id|>.
"$PY" - "$RUNS/chat/tokenizer.model" "$QUESTION" "$OUT/prompt.npy" <<'EOF'
import sys
import numpy as np
import sentencepiece as spm
from data.chat import render_prompt
sp = spm.SentencePieceProcessor(model_file=sys.argv[1])
np.save(sys.argv[3], np.asarray(render_prompt(sp, [{"role": "user", "content": sys.argv[2]}]), np.int32))
EOF
stage go-chat "$OUT/nanollama" --model "$OUT/chat-f16.gguf" --tokens "$OUT/prompt.npy" --temp 0 \
  --rep-penalty 1 --max-tokens 64 --threads 2
stage py-chat bash -c "printf '%s\n' \"\$1\" | '$PY' -m nanollama_jax.chat --checkpoint '$RUNS/chat' --temperature 0 --max-tokens 64" \
  _ "$QUESTION"

# 6. the report card
"$PY" - "$OUT" "$RUNS" "$QUESTION" "$(( $(date +%s) - start_all ))" "${STAGES[@]}" <<'EOF'
import json, sys
out, runs, question, total, stages = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5:]
def metrics(run):
    return [json.loads(x) for x in open(f"{runs}/{run}/metrics.jsonl")]
def last(rows, key):
    vals = [r[key] for r in rows if key in r]
    return vals[-1] if vals else float("nan")
def bpb(path):
    return json.load(open(path))["bpb"]["bpb"]
base, chat = metrics("base"), metrics("chat")
go_answer = open(f"{out}/go-chat.out").read().strip()
py_answer = open(f"{out}/py-chat.out").read().strip()
print("\n================ nanollama-jax speedrun report card ================")
print(f"pretrain   final loss {last(base, 'loss'):.3f}, validation {last(base, 'val_loss'):.3f} "
      f"({last(base, 'val_bpb'):.3f} bits/byte)")
print(f"SFT        final loss {last(chat, 'loss'):.3f}, held-out chats {last(chat, 'val_loss'):.3f} "
      "(loss on answer tokens)")
print(f"eval       held-out docs: base {bpb(f'{out}/eval-base.json'):.3f}, chat {bpb(f'{out}/eval-chat.json'):.3f} bits/byte")
print(f"question   {question}")
print(f"Go engine  {go_answer}")
print(f"python     {py_answer}")
print("stages     " + " | ".join(stages))
print(f"total      {total // 60}m{total % 60:02d}s  (files in {out}/)")
EOF
