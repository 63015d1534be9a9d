"""Chat conversations → packed rows of tokens with a loss mask, for supervised fine-tuning.

Each conversation is rendered with the one chat format (data/chat.py): the mask is True on the tokens
SFT learns (assistant contents and their closing <|eot_id|>). Whole conversations are packed in file
order into rows of `seq_len + 1` tokens; the rest of a row is padding (token 0, mask False). A
conversation longer than a row is cut at the row's end. Every `val_every`-th conversation (the first
included) is held out for validation.

Batch k is a pure function of (seed, k): rows are visited in a fresh permutation every epoch, so
`--resume` continues exactly.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from data.chat import ChatError, read_chats, render

from .input import epoch_permutation


def pack(conversations, sp, seq_len: int) -> tuple[np.ndarray, np.ndarray, int]:
    """(tokens int32 [rows, seq_len + 1], mask bool [rows, seq_len + 1], conversations cut short)."""
    width = seq_len + 1
    rows, masks, cut = [], [], 0
    tokens, mask = [], []
    for messages in conversations:
        ids, train = render(sp, messages)
        if len(ids) > width:
            ids, train, cut = ids[:width], train[:width], cut + 1
        if len(tokens) + len(ids) > width:
            rows.append(tokens)
            masks.append(mask)
            tokens, mask = [], []
        tokens, mask = tokens + ids, mask + train
    if tokens:
        rows.append(tokens)
        masks.append(mask)
    out_t = np.zeros((len(rows), width), np.int32)
    out_m = np.zeros((len(rows), width), bool)
    for i, (t, m) in enumerate(zip(rows, masks)):
        out_t[i, : len(t)] = t
        out_m[i, : len(m)] = m
    return out_t, out_m, cut


class ChatBatches:
    """Training batches of a chat JSONL file: `batches[k]` is this process's rows of global batch k,
    a dict {"tokens", "mask"} of [rows, seq_len + 1] arrays; `validation` the held-out rows."""

    def __init__(self, path, sp, *, seq_len: int, global_batch: int, seed: int = 0, val_every: int = 10,
                 process_index: int = 0, process_count: int = 1):
        self.path = Path(path)
        chats = list(read_chats(self.path))
        if not chats:
            raise ChatError(f"{self.path}: no conversations")
        val = [c for i, c in enumerate(chats) if val_every and i % val_every == 0]
        train = [c for i, c in enumerate(chats) if not (val_every and i % val_every == 0)]
        if not train:
            raise ChatError(f"{self.path}: {len(chats)} conversation(s), all held out for validation; add more")
        self.tokens, self.mask, self.cut = pack(train, sp, seq_len)
        self.val_tokens, self.val_mask, _ = pack(val, sp, seq_len)
        self.conversations, self.val_conversations = len(train), len(val)
        self.global_batch, self.seed = global_batch, seed
        self.process_index, self.process_count = process_index, process_count
        answers = [m["content"] for c in train for m in c if m["role"] == "assistant"]
        self.trained_tokens = int(self.mask.sum())
        self.bytes_per_token = sum(len(a.encode()) for a in answers) / max(1, self.trained_tokens)
        self.tokenizer_sha256 = None  # set by the caller (the run's tokenizer)
        digest = hashlib.sha256(self.path.read_bytes())
        digest.update(json.dumps([seq_len, global_batch, seed, val_every]).encode())
        self.fingerprint = digest.hexdigest()

    def __len__(self) -> int:
        return len(self.tokens)

    def _rows(self, k: int) -> np.ndarray:
        n = len(self.tokens)
        per = self.global_batch // self.process_count
        g = k * self.global_batch + self.process_index * per + np.arange(per)
        out = np.empty(per, np.int64)
        for epoch in np.unique(g // n):
            perm = epoch_permutation(self.seed, int(epoch), n)
            sel = g // n == epoch
            out[sel] = perm[g[sel] % n]
        return out

    def __getitem__(self, k: int) -> dict:
        rows = self._rows(k)
        return {"tokens": self.tokens[rows], "mask": self.mask[rows]}

    def validation(self, batch_size: int, max_batches: int) -> list[dict]:
        """Held-out rows in batches of `batch_size` (the last padded with rows that have no loss)."""
        out = []
        for start in range(0, min(len(self.val_tokens), batch_size * max_batches), batch_size):
            t = np.zeros((batch_size, self.val_tokens.shape[1]), np.int32)
            m = np.zeros(t.shape, bool)
            chunk = slice(start, start + batch_size)
            n = len(self.val_tokens[chunk])
            t[:n], m[:n] = self.val_tokens[chunk], self.val_mask[chunk]
            out.append({"tokens": t, "mask": m})
        return out
