package main

import (
	"context"
	"math"
	"math/rand"
	"reflect"
	"sort"
	"strings"
	"testing"
)

// A request in a reuse scenario: its prompt is built from the previous
// request's prompt and output (nil for the first).
type reuseStep struct {
	prompt    func(prevPrompt, prevOut []int32) []int32
	maxTokens int
}

func fixed(ids ...int32) func(_, _ []int32) []int32 {
	return func(_, _ []int32) []int32 { return ids }
}

func continued(extra ...int32) func(p, o []int32) []int32 {
	return func(p, o []int32) []int32 {
		return append(append(append([]int32{}, p...), o...), extra...)
	}
}

// A session reused across requests gives exactly what a fresh session
// gives: the same output tokens, the same cache contents, and the same
// logits for whatever token comes next.
func TestSessionReuseMatchesFresh(t *testing.T) {
	m := tinyModel(t, TypeF32)
	cases := []struct {
		name  string
		steps []reuseStep
	}{
		{"continue after a length stop", []reuseStep{
			{fixed(1, 270, 5, 99), 4}, {continued(), 4}, {continued(260), 3}}},
		{"repeated phrases", []reuseStep{
			{fixed(1, 270, 271, 272), 2},
			{fixed(1, 270, 271, 272, 270, 271, 272, 270, 271, 272), 2},
			{fixed(1, 270, 271, 272, 270, 271, 273), 2}}},
		{"shorter prompt", []reuseStep{
			{fixed(1, 270, 5, 99, 260, 261, 42, 7), 3}, {fixed(1, 270, 5, 99), 3}, {fixed(1, 270, 5, 99), 3}, {fixed(1), 2}}},
		{"repl turns", []reuseStep{
			{fixed(1, 270, 271), 5}, {continued(272, 273), 5}, {continued(274), 5}, {continued(275, 276, 277), 5}}},
		{"longer than a batch", []reuseStep{
			{fixed(append([]int32{1}, seqIDs(40)...)...), 2}, {continued(7), 2}, {fixed(append([]int32{1}, seqIDs(20)...)...), 2}}},
	}
	greedy := SamplerConfig{Temp: 0, RepPenalty: 1.3, RepWindow: 16}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			reused := m.NewSession(64, false)
			var prompt, out []int32
			for i, step := range tc.steps {
				prompt = step.prompt(prompt, out)
				got, err := Generate(reused, m.Tok, prompt, step.maxTokens, NewSampler(greedy), func(string) bool { return true })
				if err != nil {
					t.Fatal(err)
				}
				fresh := m.NewSession(64, false)
				want, err := Generate(fresh, m.Tok, prompt, step.maxTokens, NewSampler(greedy), func(string) bool { return true })
				if err != nil {
					t.Fatal(err)
				}
				if !reflect.DeepEqual(got.Output, want.Output) {
					t.Fatalf("request %d: reused session generated %v, fresh %v", i, got.Output, want.Output)
				}
				if !reflect.DeepEqual(reused.History(), fresh.History()) || reused.Pos != len(reused.History()) {
					t.Fatalf("request %d: reused cache holds %v (pos %d), fresh %v", i, reused.History(), reused.Pos, fresh.History())
				}
				// The next token's logits from the reused cache equal those
				// of a fresh session that evaluates the whole history at once.
				probe := []int32{265}
				a, err := reused.Forward(probe, nil)
				if err != nil {
					t.Fatal(err)
				}
				b, err := m.NewSession(64, false).Forward(append(append([]int32{}, reused.History()[:reused.Pos-1]...), probe...), nil)
				if err != nil {
					t.Fatal(err)
				}
				if d := maxAbsDiff(a, b); d > 1e-4 {
					t.Fatalf("request %d: next-token logits differ by %g", i, d)
				}
				reused.Truncate(reused.Pos - 1)
				out = got.Output
			}
		})
	}
}

func seqIDs(n int) []int32 {
	out := make([]int32, n)
	for i := range out {
		out[i] = int32(3 + (i*37)%290)
	}
	return out
}

func maxAbsDiff(a, b []float32) float64 {
	var d float64
	for i := range a {
		d = math.Max(d, math.Abs(float64(a[i]-b[i])))
	}
	return d
}

// Stop strings end generation before they appear, even when they span
// tokens, and text that might begin one is held back until it does not.
func TestStopStringsAcrossTokens(t *testing.T) {
	m := tinyModel(t, TypeF32)
	greedy := SamplerConfig{Temp: 0, RepPenalty: 1}
	prompt := []int32{1, 270, 5, 99}
	var full strings.Builder
	if _, err := Generate(m.NewSession(64, false), m.Tok, prompt, 12, NewSampler(greedy), func(s string) bool {
		full.WriteString(s)
		return true
	}); err != nil {
		t.Fatal(err)
	}
	text := full.String()
	if len(text) < 6 {
		t.Fatalf("generation too short to test stops: %q", text)
	}
	// A stop string from the middle of the text, straddling token pieces.
	stop := text[len(text)/2-2 : len(text)/2+1]
	want := text[:strings.Index(text, stop)]
	var pieces []string
	st, err := GenerateWith(m.NewSession(64, false), m.Tok, prompt, GenOptions{MaxTokens: 12, Sampler: NewSampler(greedy),
		Stop: []string{"never appears", stop}, Logprobs: -1}, func(p Piece) bool {
		pieces = append(pieces, p.Text)
		return true
	})
	if err != nil {
		t.Fatal(err)
	}
	if got := strings.Join(pieces, ""); got != want || st.StopReason != "stop" {
		t.Fatalf("stop %q: got %q (%s), want %q", stop, got, st.StopReason, want)
	}
	// A stop string that never matches releases everything.
	var all strings.Builder
	GenerateWith(m.NewSession(64, false), m.Tok, prompt, GenOptions{MaxTokens: 12, Sampler: NewSampler(greedy),
		Stop: []string{text[len(text)-2:] + "\x00"}, Logprobs: -1}, func(p Piece) bool { all.WriteString(p.Text); return true })
	if all.String() != text {
		t.Fatalf("non-matching stop changed the text: %q vs %q", all.String(), text)
	}
}

// Logprobs are those of softmax(logits) and the top list is sorted.
func TestLogprobs(t *testing.T) {
	m := tinyModel(t, TypeF32)
	prompt := []int32{1, 270, 5}
	var lps []TokenLogprob
	_, err := GenerateWith(m.NewSession(64, false), m.Tok, prompt, GenOptions{MaxTokens: 3,
		Sampler: NewSampler(SamplerConfig{Temp: 0, RepPenalty: 1}), Logprobs: 3}, func(p Piece) bool {
		lps = append(lps, p.Logprobs...)
		return true
	})
	if err != nil {
		t.Fatal(err)
	}
	if len(lps) != 3 {
		t.Fatalf("%d logprob entries for 3 tokens", len(lps))
	}
	logits, _ := m.NewSession(64, false).Forward(prompt, nil)
	nv := len(m.Tok.Tokens)
	lse := logSumExp(logits[:nv])
	if d := math.Abs(lps[0].Logprob - (float64(logits[lps[0].ID]) - lse)); d > 1e-9 {
		t.Errorf("first logprob off by %g", d)
	}
	for _, lp := range lps {
		if len(lp.Top) != 3 || lp.Top[0].ID != lp.ID || lp.Top[0].Logprob < lp.Top[1].Logprob || lp.Logprob > 0 {
			t.Errorf("greedy token %d with top %+v", lp.ID, lp.Top)
		}
	}
}

// topIDs keeps exactly the first n of a stable sort of the whole vocabulary
// by descending value (the algorithm it replaced), ties included.
func TestTopIDsMatchesStableSort(t *testing.T) {
	ref := func(raw []float32, n int) []int32 {
		idx := make([]int32, len(raw))
		for i := range idx {
			idx[i] = int32(i)
		}
		sort.SliceStable(idx, func(a, b int) bool { return raw[idx[a]] > raw[idx[b]] })
		if n > len(idx) {
			n = len(idx)
		}
		if n <= 0 {
			return nil
		}
		return idx[:n]
	}
	check := func(raw []float32, n int) {
		t.Helper()
		if got, want := topIDs(raw, n), ref(raw, n); !reflect.DeepEqual(got, want) {
			t.Fatalf("topIDs(%v, %d) = %v, want %v", raw, n, got, want)
		}
	}
	inf := float32(math.Inf(1))
	for _, c := range []struct {
		raw []float32
		n   int
	}{
		{nil, 3}, {[]float32{1}, 0}, {[]float32{1}, 1}, {[]float32{1, 2}, 5},
		{[]float32{2, 2, 2, 2}, 2}, {[]float32{1, 2, 2, 3, 3, 3}, 4},
		{[]float32{3, 2, 1, 0}, 2}, {[]float32{0, 1, 2, 3}, 2},
		{[]float32{-inf, 0, inf, -inf, inf}, 3},
	} {
		check(c.raw, c.n)
	}
	r := rand.New(rand.NewSource(1))
	for it := 0; it < 2000; it++ {
		raw := make([]float32, 1+r.Intn(300))
		levels := 1 + r.Intn(8) // few distinct values: many ties
		for i := range raw {
			raw[i] = float32(r.Intn(levels)) - float32(levels)/2
		}
		check(raw, r.Intn(len(raw)+3))
	}
}

// A cancelled context stops before prefill does any work.
func TestGenerateCancelled(t *testing.T) {
	m := tinyModel(t, TypeF32)
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	s := m.NewSession(64, false)
	st, err := GenerateWith(s, m.Tok, []int32{1, 2, 3}, GenOptions{MaxTokens: 3, Sampler: NewSampler(SamplerConfig{}), Logprobs: -1, Ctx: ctx},
		func(Piece) bool { return true })
	if err != nil || st.StopReason != "cancelled" || s.Pos != 0 {
		t.Fatalf("cancelled: %v %s pos %d", err, st.StopReason, s.Pos)
	}
}

// OpenAI's penalties: presence subtracts once per seen token, frequency
// once per occurrence, within the penalty window.
func TestPresenceFrequencyPenalties(t *testing.T) {
	logits := func() []float32 { return []float32{3, 2.5, 2, 0} }
	hist := []int32{0, 0, 0, 1}
	if id := NewSampler(SamplerConfig{Temp: 0, Presence: 1.2}).Sample(logits(), 4, hist); id != 2 {
		t.Errorf("presence 1.2: picked %d, want 2 (1.8, 1.3, 2)", id)
	}
	if id := NewSampler(SamplerConfig{Temp: 0, Frequency: 0.3}).Sample(logits(), 4, hist); id != 1 {
		t.Errorf("frequency 0.3: picked %d, want 1 (2.1, 2.2, 2)", id)
	}
	l := logits()
	NewSampler(SamplerConfig{Temp: 0, Presence: 0.5, Frequency: 0.25, RepWindow: 2}).Sample(l, 4, hist)
	if l[0] != 3-0.5-0.25 || l[1] != 2.5-0.5-0.25 || l[2] != 2 {
		t.Errorf("window of 2 penalised logits to %v", l)
	}
	// The same window for the repetition penalty, except that a zero window
	// turns it off (presence/frequency above used the whole history).
	for _, c := range []struct {
		window int
		want   []float32
	}{{0, []float32{3, 2.5, 2, 0}}, {-1, []float32{1.5, 1.25, 2, 0}}, {1, []float32{3, 1.25, 2, 0}}} {
		l := logits()
		NewSampler(SamplerConfig{Temp: 0, RepPenalty: 2, RepWindow: c.window}).Sample(l, 4, hist)
		if !reflect.DeepEqual(l, c.want) {
			t.Errorf("repetition penalty, window %d: logits %v, want %v", c.window, l, c.want)
		}
	}
}
