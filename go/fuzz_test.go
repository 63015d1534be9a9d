package main

import (
	"bytes"
	"encoding/binary"
	"math/rand"
	"runtime"
	"strings"
	"testing"
)

// microModel is a 1-layer llama small enough (a few KB) for the fuzzer to
// mutate quickly: Q8_0 matrices, f32 norms, a 20-token SentencePiece vocab.
func microModel(typ GGMLType) []byte {
	toks := []string{"<unk>", "<s>", "</s>", "\u2581", "\u2581h", "\u2581t", "hi", "he", "h", "i", "t", "e", "r", "\u2581the", "re", "<0x0A>", "a", "b", "c", "d"}
	sh := llamaShape{layers: 1, dim: 32, ffn: 32, nh: 2, nkv: 1, hd: 16, vocab: len(toks), ctx: 16}
	rng := rand.New(rand.NewSource(7))
	var g ggufBuilder
	g.addLlamaHParams(sh)
	types := make([]int32, len(toks))
	for i := range types {
		types[i] = 1
	}
	types[0], types[1], types[2], types[15] = 2, 3, 3, 6
	g.addSPVocab(toks, types)
	g.addLlamaTensors(sh, func(name string, rows, cols int) {
		g.tensor(name, typ, randomRow(rng, typ, rows*cols), uint64(cols), uint64(rows))
	})
	return g.bytes()
}

// loadAndRun takes bytes the way the engine takes a file: parse, build the
// model and tokenizer, and run one forward pass. Any failure must be an
// error, never a panic or an unbounded allocation.
func loadAndRun(data []byte) error {
	g, err := parseGGUF(data)
	if err != nil {
		return err
	}
	m, err := newModel(g, 1)
	if err != nil {
		return err
	}
	tok, err := NewTokenizer(g)
	if err != nil {
		return err
	}
	if err := m.SetTokenizer(tok); err != nil {
		return err
	}
	ctx := 16
	if m.Cfg.CtxLen < ctx {
		ctx = m.Cfg.CtxLen
	}
	ids := tok.Encode("hi there\nthe", true)
	if len(ids) >= ctx {
		ids = ids[:ctx-1]
	}
	if len(ids) == 0 {
		ids = []int32{0}
	}
	s := m.NewSession(ctx, false)
	_, err = Generate(s, tok, ids, 2, NewSampler(SamplerConfig{Temp: 0}), func(string) bool { return true })
	return err
}

func FuzzReadGGUF(f *testing.F) {
	for _, typ := range []GGMLType{TypeQ8_0, TypeF16} {
		model := microModel(typ)
		f.Add(model)
		f.Add(model[:len(model)/2])
	}
	f.Add([]byte("GGUF\x03\x00\x00\x00"))
	f.Fuzz(func(t *testing.T, data []byte) {
		if err := loadAndRun(data); err != nil && (err.Error() == "" || strings.Contains(err.Error(), "\n")) {
			t.Fatalf("error is not one line: %q", err)
		}
	})
}

// The seed models are valid: the fuzzer starts from files that reach the
// forward pass.
func TestMicroModelsRun(t *testing.T) {
	for _, typ := range []GGMLType{TypeQ8_0, TypeF16} {
		if err := loadAndRun(microModel(typ)); err != nil {
			t.Fatalf("%s: %v", typ, err)
		}
	}
}

// Crafted headers that claim huge counts or sizes fail (or parse) with
// memory bounded by a small multiple of the file's size, and each names the
// field at fault.
func TestParseMemoryBoundedAndOverflowChecked(t *testing.T) {
	const size = 1 << 20
	header := func(nTensors, nKV uint64) *bytes.Buffer {
		var b bytes.Buffer
		binary.Write(&b, binary.LittleEndian, []uint32{ggufMagic, 3})
		binary.Write(&b, binary.LittleEndian, []uint64{nTensors, nKV})
		return &b
	}
	pad := func(b *bytes.Buffer) []byte {
		out := make([]byte, size)
		copy(out, b.Bytes())
		return out
	}
	arrayOf := func(et uint32, n uint64) []byte {
		b := header(0, 1)
		putStr(b, "k")
		binary.Write(b, binary.LittleEndian, []uint32{gArray, et})
		binary.Write(b, binary.LittleEndian, n)
		return pad(b)
	}
	tensorFile := func(dims ...uint64) []byte {
		b := header(1, 0)
		putStr(b, "w")
		binary.Write(b, binary.LittleEndian, uint32(len(dims)))
		binary.Write(b, binary.LittleEndian, dims)
		binary.Write(b, binary.LittleEndian, uint32(TypeQ8_0))
		binary.Write(b, binary.LittleEndian, uint64(0))
		return pad(b)
	}
	cases := []struct {
		name, want string
		data       []byte
	}{
		{"metadata count", "corrupt GGUF header", pad(header(0, size))},
		{"tensor count", "corrupt GGUF header", pad(header(size/8, 0))},
		{"string array count", "does not fit", arrayOf(gString, size)},
		{"nested array count", "does not fit", arrayOf(gArray, size/4)},
		{"u64 array count", "does not fit", arrayOf(gUint64, 1<<61)},
		{"empty strings fill the file", "", arrayOf(gString, (size-49)/8)},
		{"tensor bytes overflow", "dimension 1", tensorFile(32, 1<<58)},
		{"tensor bigger than the file", "truncated file: tensor \"w\"", tensorFile(1<<20, 1<<20)},
		{"zero dimension", "dimension 0 is 0", tensorFile(0, 16)},
	}
	for _, c := range cases {
		runtime.GC()
		var before, after runtime.MemStats
		runtime.ReadMemStats(&before)
		_, err := parseGGUF(c.data)
		runtime.ReadMemStats(&after)
		if c.want == "" && err != nil || c.want != "" && (err == nil || !strings.Contains(err.Error(), c.want)) {
			t.Errorf("%s: error %v, want one containing %q", c.name, err, c.want)
		}
		if alloc := after.TotalAlloc - before.TotalAlloc; alloc > 4*size {
			t.Errorf("%s: parsing a %d-byte file allocated %d bytes", c.name, size, alloc)
		}
	}
}
