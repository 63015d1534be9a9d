package main

import (
	"context"
	"fmt"
	"math"
	"strings"
	"time"
)

// GenStats reports the speed and outcome of one generation.
type GenStats struct {
	PromptTokens int
	CachedTokens int // prompt tokens reused from the KV cache
	GenTokens    int
	Prefill      time.Duration
	Decode       time.Duration
	StopReason   string  // "stop" (end of generation token or stop string) or "length"
	Output       []int32 // the generated token ids (a stop string's tokens included)
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

// TokenLogprob is one generated token with its log-probability under the
// model (temperature 1, before penalties) and the most likely alternatives.
type TokenLogprob struct {
	ID      int32
	Text    string
	Logprob float64
	Top     []TopLogprob
}

// TopLogprob is one alternative token.
type TopLogprob struct {
	ID      int32
	Text    string
	Logprob float64
}

// Piece is text released to the caller, with the logprobs of the tokens
// that completed it (when asked for).
type Piece struct {
	Text     string
	Logprobs []TokenLogprob
}

// GenOptions describes one generation request.
type GenOptions struct {
	MaxTokens int
	Sampler   *Sampler
	Stop      []string // generation ends before the first of these strings
	Logprobs  int      // -1: none; n >= 0: the chosen token's logprob and the n best
	// Ctx cancels the generation (client gone) between prefill batches and
	// between decoded tokens; nil means never.
	Ctx context.Context
}

// Generate continues prompt (token ids, BOS included if wanted) for up to
// maxTokens tokens, calling emit with each piece of text as soon as it is
// complete UTF-8; emit returning false stops early. The session's KV cache
// is reused for the longest common prefix with its previous contents.
func Generate(s *Session, tok *Tokenizer, prompt []int32, maxTokens int, smp *Sampler, emit func(string) bool) (GenStats, error) {
	return GenerateWith(s, tok, prompt, GenOptions{MaxTokens: maxTokens, Sampler: smp, Logprobs: -1},
		func(p Piece) bool { return emit(p.Text) })
}

// GenerateWith is Generate with stop strings, logprobs and cancellation.
// Text that could be the start of a stop string is held back until it is
// known not to be one, so no stop string ever reaches emit, even when it
// spans several tokens.
func GenerateWith(s *Session, tok *Tokenizer, prompt []int32, o GenOptions, emit func(Piece) bool) (GenStats, error) {
	st := GenStats{PromptTokens: len(prompt), StopReason: "length"}
	if len(prompt) == 0 {
		return st, fmt.Errorf("empty prompt")
	}
	if len(prompt) >= s.Ctx {
		return st, fmt.Errorf("prompt of %d tokens does not fit the context of %d", len(prompt), s.Ctx)
	}
	if o.MaxTokens < 0 {
		return st, fmt.Errorf("max tokens %d is negative", o.MaxTokens)
	}
	canceled := func() bool { return o.Ctx != nil && o.Ctx.Err() != nil }
	common := s.SharedPrefix(prompt)
	s.Truncate(common)
	st.CachedTokens = common
	t0 := time.Now()
	var logits []float32
	for start := common; start < len(prompt); start += maxBatch {
		if canceled() {
			st.StopReason = "cancelled"
			return st, nil
		}
		end := start + maxBatch
		if end > len(prompt) {
			end = len(prompt)
		}
		var err error
		if logits, err = s.Forward(prompt[start:end], nil); err != nil {
			return st, err
		}
	}
	st.Prefill = time.Since(t0)
	t1 := time.Now()
	dec := StreamDecoder{t: tok}
	nValid := len(tok.Tokens)
	if nValid > s.m.Cfg.Vocab {
		nValid = s.m.Cfg.Vocab
	}
	var held strings.Builder // decoded text not yet released
	var heldLP []TokenLogprob
	var raw []float32
	release := func(final bool) (stop, ok bool) {
		text := held.String()
		cut, stopAt := len(text), -1
		for _, x := range o.Stop {
			if i := strings.Index(text, x); i >= 0 && (stopAt < 0 || i < stopAt) {
				stopAt = i
			}
		}
		if stopAt >= 0 {
			cut = stopAt
		} else if !final {
			cut = len(text) - stopPrefixLen(text, o.Stop)
		}
		if cut == 0 && stopAt < 0 {
			return false, true
		}
		p := Piece{Text: text[:cut], Logprobs: heldLP}
		held.Reset()
		held.WriteString(text[cut:])
		heldLP = nil
		if p.Text == "" && len(p.Logprobs) == 0 {
			return stopAt >= 0, true
		}
		return stopAt >= 0, emit(p)
	}
	for st.GenTokens < o.MaxTokens {
		if canceled() {
			st.StopReason = "cancelled"
			break
		}
		if o.Logprobs >= 0 {
			raw = append(raw[:0], logits[:nValid]...) // sampling modifies logits in place
		}
		// The penalties look back over the prompt and the output so far:
		// exactly the tokens behind the cache, s.hist, at this point.
		id := o.Sampler.Sample(logits, nValid, s.hist)
		if tok.IsEOG(id) {
			st.StopReason = "stop"
			break
		}
		st.GenTokens++
		st.Output = append(st.Output, id)
		if o.Logprobs >= 0 {
			heldLP = append(heldLP, tokenLogprob(raw, id, tok, o.Logprobs))
		}
		held.WriteString(dec.Add(id))
		stop, ok := release(false)
		if stop || !ok {
			st.StopReason = "stop"
			if !ok && !stop {
				st.StopReason = "cancelled"
			}
			st.Decode = time.Since(t1)
			return st, nil
		}
		if st.GenTokens >= o.MaxTokens || s.Pos+1 > s.Ctx {
			break
		}
		var err error
		if logits, err = s.Forward(st.Output[len(st.Output)-1:], nil); err != nil {
			return st, err
		}
	}
	held.WriteString(dec.Flush())
	if stop, _ := release(true); stop {
		st.StopReason = "stop"
	}
	st.Decode = time.Since(t1)
	return st, nil
}

// stopPrefixLen is the length of the longest tail of text that is a proper
// prefix of some stop string: text that must be held back for now.
func stopPrefixLen(text string, stops []string) int {
	best := 0
	for _, x := range stops {
		for k := len(x) - 1; k > best; k-- {
			if k <= len(text) && strings.HasSuffix(text, x[:k]) {
				best = k
				break
			}
		}
	}
	return best
}

// tokenLogprob describes token id under softmax(raw) with the n most
// likely alternatives (raw: the logits before any penalty or temperature).
func tokenLogprob(raw []float32, id int32, tok *Tokenizer, n int) TokenLogprob {
	lse := logSumExp(raw)
	out := TokenLogprob{ID: id, Text: string(tok.Piece(id)), Logprob: float64(raw[id]) - lse}
	if n <= 0 {
		return out
	}
	for _, t := range topIDs(raw, n) {
		out.Top = append(out.Top, TopLogprob{ID: t, Text: string(tok.Piece(t)), Logprob: float64(raw[t]) - lse})
	}
	return out
}

// topIDs returns the ids of the n largest values of raw, largest first,
// equal values in id order: the first n of a stable sort by descending
// value, without sorting the whole vocabulary for every generated token.
func topIDs(raw []float32, n int) []int32 {
	if n > len(raw) {
		n = len(raw)
	}
	if n <= 0 {
		return nil
	}
	top := make([]int32, 0, n)
	for i, v := range raw {
		if len(top) == n && !(v > raw[top[n-1]]) {
			continue // only a strictly greater value displaces a kept one
		}
		// After every kept entry that is >= v, so ties stay in id order.
		j := len(top)
		for j > 0 && raw[top[j-1]] < v {
			j--
		}
		if len(top) < n {
			top = append(top, 0)
		}
		copy(top[j+1:], top[j:len(top)-1])
		top[j] = int32(i)
	}
	return top
}

func logSumExp(l []float32) float64 {
	max := math.Inf(-1)
	for _, v := range l {
		if float64(v) > max {
			max = float64(v)
		}
	}
	var z float64
	for _, v := range l {
		z += math.Exp(float64(v) - max)
	}
	return max + math.Log(z)
}
