package main

import (
	"os"
	"path/filepath"
	"reflect"
	"testing"
)

func TestSampler(t *testing.T) {
	logits := func() []float32 { return []float32{0.1, 2.0, 1.9, -1, 0.5} }
	greedy := NewSampler(SamplerConfig{Temp: 0})
	if id := greedy.Sample(logits(), 5, nil); id != 1 {
		t.Errorf("greedy = %d, want 1", id)
	}
	// A repetition penalty on the best token hands the win to the runner-up.
	pen := NewSampler(SamplerConfig{Temp: 0, RepPenalty: 1.5, RepWindow: 4})
	if id := pen.Sample(logits(), 5, []int32{3, 1}); id != 2 {
		t.Errorf("penalised greedy = %d, want 2", id)
	}
	// top-k 2 only ever yields the two best tokens.
	k2 := NewSampler(SamplerConfig{Temp: 1.5, TopK: 2, Seed: 1})
	for i := 0; i < 200; i++ {
		if id := k2.Sample(logits(), 5, nil); id != 1 && id != 2 {
			t.Fatalf("top-k 2 sampled %d", id)
		}
	}
	// min-p 0.5 removes tokens much less likely than the best.
	mp := NewSampler(SamplerConfig{Temp: 1, MinP: 0.5, Seed: 2})
	for i := 0; i < 200; i++ {
		if id := mp.Sample(logits(), 5, nil); id != 1 && id != 2 {
			t.Fatalf("min-p sampled %d", id)
		}
	}
	// top-p 0.5: the best token alone covers half the mass here.
	tp := NewSampler(SamplerConfig{Temp: 0.2, TopP: 0.5, Seed: 3})
	for i := 0; i < 50; i++ {
		if id := tp.Sample(logits(), 5, nil); id != 1 {
			t.Fatalf("top-p sampled %d", id)
		}
	}
	// Same seed, same draws; nValid hides the padded tail.
	a, b := NewSampler(SamplerConfig{Temp: 1, Seed: 9}), NewSampler(SamplerConfig{Temp: 1, Seed: 9})
	for i := 0; i < 50; i++ {
		l := []float32{1, 1, 1, 1, 100}
		x, y := a.Sample(append([]float32{}, l...), 4, nil), b.Sample(l, 4, nil)
		if x != y || x == 4 {
			t.Fatalf("draw %d: %d vs %d", i, x, y)
		}
	}
}

func TestNpyRoundTrip(t *testing.T) {
	dir := t.TempDir()
	p := filepath.Join(dir, "x.npy")
	data := []float32{1, -2, 3.5, 0, 7, 8}
	if err := WriteF32Npy(p, data, 2, 3); err != nil {
		t.Fatal(err)
	}
	b, _ := os.ReadFile(p)
	a, err := parseNpy(b)
	if err != nil {
		t.Fatal(err)
	}
	got, _ := a.Floats()
	if !reflect.DeepEqual(a.Shape, []int{2, 3}) || !reflect.DeepEqual(got, data) || (len(b)-len(a.Data))%64 != 0 {
		t.Errorf("shape %v data %v header %d", a.Shape, got, len(b)-len(a.Data))
	}
	if _, err := parseNpy([]byte("nonsense")); err == nil {
		t.Error("bad magic accepted")
	}
}

func TestGPT2PreTokenize(t *testing.T) {
	tok := &Tokenizer{Kind: "gpt2"}
	for _, tc := range []struct {
		in   string
		want []string
	}{
		{"Hello world", []string{"Hello", " world"}},
		{"it's 2026!!", []string{"it", "'s", " 2026", "!!"}},
		{"a  b\n\nc ", []string{"a", " ", " b", "\n", "\n", "c", " "}},
		{"naïve café", []string{"naïve", " café"}},
	} {
		if got := tok.preTokenize(tc.in); !reflect.DeepEqual(got, tc.want) {
			t.Errorf("preTokenize(%q) = %q, want %q", tc.in, got, tc.want)
		}
	}
	tok.Pre = "llama-bpe"
	if got := tok.preTokenize("abc 12345"); !reflect.DeepEqual(got, []string{"abc", " ", "123", "45"}) {
		t.Errorf("llama3 pre-tokenize = %q", got)
	}
}

func TestSentencePieceAndStreamDecoding(t *testing.T) {
	m := tinyModel(t, TypeF32)
	tok := m.Tok
	ids := tok.Encode("the hat é", true)
	// "▁the" is a piece; "é" has no piece and falls back to its two bytes.
	if ids[0] != 1 || tok.Tokens[ids[1]] != "\u2581the" {
		t.Fatalf("ids %v", ids)
	}
	n := len(ids)
	if tok.Tokens[ids[n-2]] != "<0xC3>" || tok.Tokens[ids[n-1]] != "<0xA9>" {
		t.Fatalf("byte fallback: %v", ids)
	}
	if got := tok.Decode(ids); got != " the hat é" {
		t.Errorf("decode = %q", got)
	}
	d := StreamDecoder{t: tok}
	var out []string
	for _, id := range ids {
		out = append(out, d.Add(id))
	}
	if out[n-2] != "" || out[n-1] != " é"[1:] && out[n-1] != "é" {
		t.Errorf("stream pieces %q", out)
	}
	if len(tok.Encode("", true)) != 1 {
		t.Error("empty text should give only BOS")
	}
}
