package main

import (
	"fmt"
	"time"
)

// GenStats reports the speed of one generation.
type GenStats struct {
	PromptTokens int
	CachedTokens int // prompt tokens reused from the KV cache
	GenTokens    int
	Prefill      time.Duration
	Decode       time.Duration
	StopReason   string // "stop" (end of generation token) or "length"
}

func (st GenStats) String() string {
	rate := func(n int, d time.Duration) float64 {
		if d <= 0 {
			return 0
		}
		return float64(n) / d.Seconds()
	}
	return fmt.Sprintf("%d tokens in %.2fs: %.1f tok/s (prefill %d tokens at %.1f tok/s)",
		st.GenTokens, st.Decode.Seconds(), rate(st.GenTokens, st.Decode),
		st.PromptTokens-st.CachedTokens, rate(st.PromptTokens-st.CachedTokens, st.Prefill))
}

// Generate continues prompt (token ids, BOS included if wanted) for up to
// maxTokens tokens, calling emit with each piece of text as soon as it is
// complete UTF-8; emit returning false stops early. The session's KV cache
// is reused for the longest common prefix with its previous contents.
func Generate(s *Session, tok *Tokenizer, prompt []int32, maxTokens int, smp *Sampler, emit func(string) bool) (GenStats, error) {
	st := GenStats{PromptTokens: len(prompt), StopReason: "length"}
	if len(prompt) == 0 {
		return st, fmt.Errorf("empty prompt")
	}
	if len(prompt) >= s.Ctx {
		return st, fmt.Errorf("prompt of %d tokens does not fit the context of %d", len(prompt), s.Ctx)
	}
	common := 0
	for common < len(s.hist) && common < len(prompt)-1 && s.hist[common] == prompt[common] {
		common++
	}
	s.Truncate(common)
	s.hist = append(s.hist[:common], prompt...)
	st.CachedTokens = common
	t0 := time.Now()
	logits, err := s.Forward(prompt[common:], nil)
	if err != nil {
		return st, err
	}
	st.Prefill = time.Since(t0)
	t1 := time.Now()
	dec := StreamDecoder{t: tok}
	nValid := len(tok.Tokens)
	if nValid > s.m.Cfg.Vocab {
		nValid = s.m.Cfg.Vocab
	}
	for st.GenTokens < maxTokens {
		id := smp.Sample(logits, nValid, s.hist)
		if tok.IsEOG(id) {
			st.StopReason = "stop"
			break
		}
		st.GenTokens++
		s.hist = append(s.hist, id)
		if txt := dec.Add(id); txt != "" && !emit(txt) {
			st.StopReason = "stop"
			break
		}
		if st.GenTokens >= maxTokens || s.Pos+1 > s.Ctx {
			break
		}
		if logits, err = s.Forward(s.hist[len(s.hist)-1:], nil); err != nil {
			return st, err
		}
	}
	if txt := dec.Flush(); txt != "" {
		emit(txt)
	}
	st.Decode = time.Since(t1)
	return st, nil
}
