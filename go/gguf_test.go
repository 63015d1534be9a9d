package main

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"math"
	"math/rand"
	"strings"
	"testing"
)

// ggufBuilder writes small GGUF v3 files for tests.
type ggufBuilder struct {
	kv      bytes.Buffer
	nkv     int
	tensors []testTensor
}

type testTensor struct {
	name string
	typ  GGMLType
	dims []uint64
	data []byte
}

func putStr(b *bytes.Buffer, s string) {
	binary.Write(b, binary.LittleEndian, uint64(len(s)))
	b.WriteString(s)
}

func (g *ggufBuilder) add(key string, typ uint32, val interface{}) {
	putStr(&g.kv, key)
	binary.Write(&g.kv, binary.LittleEndian, typ)
	if s, ok := val.(string); ok {
		putStr(&g.kv, s)
	} else if ss, ok := val.([]string); ok {
		binary.Write(&g.kv, binary.LittleEndian, uint32(gString))
		binary.Write(&g.kv, binary.LittleEndian, uint64(len(ss)))
		for _, s := range ss {
			putStr(&g.kv, s)
		}
	} else if fs, ok := val.([]float32); ok {
		binary.Write(&g.kv, binary.LittleEndian, uint32(gFloat32))
		binary.Write(&g.kv, binary.LittleEndian, uint64(len(fs)))
		binary.Write(&g.kv, binary.LittleEndian, fs)
	} else if is, ok := val.([]int32); ok {
		binary.Write(&g.kv, binary.LittleEndian, uint32(gInt32))
		binary.Write(&g.kv, binary.LittleEndian, uint64(len(is)))
		binary.Write(&g.kv, binary.LittleEndian, is)
	} else {
		binary.Write(&g.kv, binary.LittleEndian, val)
	}
	g.nkv++
}

func (g *ggufBuilder) tensor(name string, typ GGMLType, data []byte, dims ...uint64) {
	g.tensors = append(g.tensors, testTensor{name, typ, dims, data})
}

func (g *ggufBuilder) bytes() []byte {
	var b bytes.Buffer
	binary.Write(&b, binary.LittleEndian, uint32(ggufMagic))
	binary.Write(&b, binary.LittleEndian, uint32(3))
	binary.Write(&b, binary.LittleEndian, uint64(len(g.tensors)))
	binary.Write(&b, binary.LittleEndian, uint64(g.nkv))
	b.Write(g.kv.Bytes())
	off := uint64(0)
	for _, t := range g.tensors {
		putStr(&b, t.name)
		binary.Write(&b, binary.LittleEndian, uint32(len(t.dims)))
		for _, d := range t.dims {
			binary.Write(&b, binary.LittleEndian, d)
		}
		binary.Write(&b, binary.LittleEndian, uint32(t.typ))
		binary.Write(&b, binary.LittleEndian, off)
		off += (uint64(len(t.data)) + 31) / 32 * 32
	}
	for b.Len()%32 != 0 {
		b.WriteByte(0)
	}
	for _, t := range g.tensors {
		b.Write(t.data)
		for b.Len()%32 != 0 {
			b.WriteByte(0)
		}
	}
	return b.Bytes()
}

// llamaShape is the shape of a test llama: the hyperparameters written to
// the GGUF and the tensors addLlamaTensors lays out.
type llamaShape struct {
	layers, dim, ffn, nh, nkv, hd, vocab, ctx int
}

// addLlamaHParams writes the architecture and the llama hyperparameters.
func (g *ggufBuilder) addLlamaHParams(sh llamaShape) {
	g.add("general.architecture", gString, "llama")
	for _, kv := range []struct {
		k string
		v int
	}{{"llama.block_count", sh.layers}, {"llama.embedding_length", sh.dim}, {"llama.feed_forward_length", sh.ffn},
		{"llama.attention.head_count", sh.nh}, {"llama.attention.head_count_kv", sh.nkv}, {"llama.context_length", sh.ctx}} {
		g.add(kv.k, gUint32, uint32(kv.v))
	}
}

// byteVocab is the start of a SentencePiece byte-fallback vocabulary:
// <unk>, <s>, </s> and the 256 byte tokens <0x00>..<0xFF>.
func byteVocab() (toks []string, types []int32) {
	toks = []string{"<unk>", "<s>", "</s>"}
	types = []int32{2, 3, 3}
	for i := 0; i < 256; i++ {
		toks = append(toks, fmt.Sprintf("<0x%02X>", i))
		types = append(types, 6)
	}
	return toks, types
}

// addSPVocab writes a SentencePiece ("llama") tokenizer whose piece scores
// fall with the id (-i), so earlier pieces merge first.
func (g *ggufBuilder) addSPVocab(toks []string, types []int32) {
	scores := make([]float32, len(toks))
	for i := range scores {
		scores[i] = -float32(i)
	}
	g.add("tokenizer.ggml.model", gString, "llama")
	g.add("tokenizer.ggml.tokens", gArray, toks)
	g.add("tokenizer.ggml.scores", gArray, scores)
	g.add("tokenizer.ggml.token_type", gArray, types)
}

// addLlamaTensors adds a llama's tensors in a fixed order: the matrices
// from mat (called in that order, so a caller's random draws are
// reproducible) and the norms as f32 ones.
func (g *ggufBuilder) addLlamaTensors(sh llamaShape, mat func(name string, rows, cols int)) {
	vec := func(name string, n int) {
		f := make([]float32, n)
		for i := range f {
			f[i] = 1
		}
		g.tensor(name, TypeF32, f32AsBytes(f), uint64(n))
	}
	mat("token_embd.weight", sh.vocab, sh.dim)
	vec("output_norm.weight", sh.dim)
	for l := 0; l < sh.layers; l++ {
		p := fmt.Sprintf("blk.%d.", l)
		vec(p+"attn_norm.weight", sh.dim)
		vec(p+"ffn_norm.weight", sh.dim)
		mat(p+"attn_q.weight", sh.nh*sh.hd, sh.dim)
		mat(p+"attn_k.weight", sh.nkv*sh.hd, sh.dim)
		mat(p+"attn_v.weight", sh.nkv*sh.hd, sh.dim)
		mat(p+"attn_output.weight", sh.dim, sh.nh*sh.hd)
		mat(p+"ffn_gate.weight", sh.ffn, sh.dim)
		mat(p+"ffn_up.weight", sh.ffn, sh.dim)
		mat(p+"ffn_down.weight", sh.dim, sh.ffn)
	}
}

func TestParseAllMetadataTypes(t *testing.T) {
	var g ggufBuilder
	g.add("u8", gUint8, uint8(7))
	g.add("i8", gInt8, int8(-7))
	g.add("u16", gUint16, uint16(700))
	g.add("i16", gInt16, int16(-700))
	g.add("u32", gUint32, uint32(70000))
	g.add("i32", gInt32, int32(-70000))
	g.add("f32", gFloat32, float32(1.5))
	g.add("bool", gBool, uint8(1))
	g.add("str", gString, "héllo")
	g.add("u64", gUint64, uint64(1<<40))
	g.add("i64", gInt64, int64(-1<<40))
	g.add("f64", gFloat64, 2.25)
	g.add("strs", gArray, []string{"a", "bc"})
	g.add("floats", gArray, []float32{1, 2, 3})
	g.tensor("w", TypeF32, f32AsBytes([]float32{1, 2, 3, 4, 5, 6}), 3, 2)
	f, err := parseGGUF(g.bytes())
	if err != nil {
		t.Fatal(err)
	}
	want := map[string]interface{}{"u8": uint8(7), "i8": int8(-7), "u16": uint16(700), "i16": int16(-700),
		"u32": uint32(70000), "i32": int32(-70000), "f32": float32(1.5), "bool": true, "str": "héllo",
		"u64": uint64(1 << 40), "i64": int64(-1 << 40), "f64": 2.25}
	for k, v := range want {
		if f.Meta[k] != v {
			t.Errorf("%s = %v (%T), want %v", k, f.Meta[k], f.Meta[k], v)
		}
	}
	if s := f.Meta["strs"].([]string); len(s) != 2 || s[1] != "bc" {
		t.Errorf("strs = %v", s)
	}
	if fl := f.Meta["floats"].([]float32); len(fl) != 3 || fl[2] != 3 {
		t.Errorf("floats = %v", fl)
	}
	w := f.ByName["w"]
	if w == nil || w.NumElements() != 6 || bytesAsF32(w.Data)[5] != 6 {
		t.Fatalf("tensor w = %+v", w)
	}
}

func TestParseErrors(t *testing.T) {
	var g ggufBuilder
	g.add("general.architecture", gString, "llama")
	g.tensor("w", TypeF32, make([]byte, 64), 16)
	good := g.bytes()
	// Every truncation is an error, never a panic.
	for n := 0; n < len(good); n++ {
		if _, err := parseGGUF(good[:n]); err == nil {
			t.Fatalf("truncated to %d bytes: no error", n)
		}
	}
	bad := append([]byte("GGML"), good[4:]...)
	if _, err := parseGGUF(bad); err == nil || !strings.Contains(err.Error(), "magic") {
		t.Errorf("bad magic: %v", err)
	}
	var u ggufBuilder
	u.tensor("w", GGMLType(99), make([]byte, 64), 16)
	if _, err := parseGGUF(u.bytes()); err == nil || !strings.Contains(err.Error(), "unknown type 99") {
		t.Errorf("unknown type: %v", err)
	}
}

// tinyModel builds a random 2-layer llama with a byte-level SentencePiece
// vocab, stored as typ.
func tinyModel(t testing.TB, typ GGMLType) *Model {
	sh := llamaShape{layers: 2, dim: 64, ffn: 128, nh: 4, nkv: 2, hd: 16, vocab: 300, ctx: 2 * maxBatch}
	rng := rand.New(rand.NewSource(1))
	var g ggufBuilder
	g.addLlamaHParams(sh)
	toks, types := byteVocab()
	for _, w := range []string{"\u2581the", "\u2581a", "he", "th", "\u2581t", "\u2581h", "e", "t", "h", "a", "\u2581"} {
		toks = append(toks, w)
		types = append(types, 1)
	}
	for len(toks) < sh.vocab {
		toks = append(toks, "x"+string(rune('a'+len(toks)%26))+string(rune('a'+len(toks)/26%26)))
		types = append(types, 1)
	}
	g.addSPVocab(toks, types)
	g.addLlamaTensors(sh, func(name string, rows, cols int) {
		f := make([]float32, rows*cols)
		for i := range f {
			f[i] = float32(rng.NormFloat64() / math.Sqrt(float64(cols)))
		}
		data := make([]byte, 0, rowBytes(typ, rows*cols))
		if typ == TypeF32 {
			data = f32AsBytes(f)
		} else {
			data = append(data, randomRow(rng, typ, rows*cols)...)
		}
		g.tensor(name, typ, data, uint64(cols), uint64(rows))
	})
	f, err := parseGGUF(g.bytes())
	if err != nil {
		t.Fatal(err)
	}
	m, err := newModel(f, 2)
	if err != nil {
		t.Fatal(err)
	}
	tok, err := NewTokenizer(f)
	if err != nil {
		t.Fatal(err)
	}
	if err := m.SetTokenizer(tok); err != nil {
		t.Fatal(err)
	}
	return m
}

// Batched prefill equals token-by-token evaluation, and decoding a token
// allocates nothing.
func TestForwardBatchedEqualsSequentialAndNoAllocs(t *testing.T) {
	for _, typ := range []GGMLType{TypeF32, TypeQ8_0} {
		m := tinyModel(t, typ)
		ids := []int32{1, 270, 5, 99, 260, 261, 42, 7, 8, 9}
		for len(ids) < maxBatch+3 { // past the end of the first batch
			ids = append(ids, int32(100+len(ids)))
		}
		v := m.Cfg.Vocab
		all := make([]float32, len(ids)*v)
		s := m.NewSession(2*maxBatch, false)
		if _, err := s.Forward(ids, all); err != nil {
			t.Fatal(err)
		}
		s2 := m.NewSession(2*maxBatch, false)
		for i, id := range ids {
			logits, err := s2.Forward([]int32{id}, nil)
			if err != nil {
				t.Fatal(err)
			}
			for j := 0; j < v; j++ {
				if d := math.Abs(float64(logits[j] - all[i*v+j])); d > 1e-4 {
					t.Fatalf("%s: position %d logit %d: batched %g, sequential %g", typ, i, j, all[i*v+j], logits[j])
				}
			}
		}
		s2.Truncate(10)
		allocs := testing.AllocsPerRun(20, func() {
			s2.Truncate(10)
			s2.Forward(ids[10:11], nil)
		})
		if allocs != 0 {
			t.Errorf("%s: %v allocations per decoded token", typ, allocs)
		}
	}
}
