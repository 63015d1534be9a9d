package main

import (
	"fmt"
	"os"
)

// Config is the llama hyper-parameters read from GGUF metadata.
type Config struct {
	NLayer   int
	Dim      int
	NHead    int
	NKVHead  int
	HeadDim  int
	NRot     int
	FFN      int
	Vocab    int // rows of the output matrix
	CtxLen   int
	Eps      float32
	RopeBase float32
}

// Matrix is a 2-D weight [Rows, Cols] (ggml dims [Cols, Rows]) stored row by
// row in its GGUF type, usually a view into the mapped file.
type Matrix struct {
	Name     string
	Type     GGMLType
	Rows     int
	Cols     int
	Data     []byte
	RowBytes int
	owned    bool // Data is a private F32 copy (after a gamma/LoRA merge)
}

func (m *Matrix) Row(r int) []byte { return m.Data[r*m.RowBytes : (r+1)*m.RowBytes] }

// ToF32 dequantises the whole matrix.
func (m *Matrix) ToF32() []float32 {
	out := make([]float32, m.Rows*m.Cols)
	for r := 0; r < m.Rows; r++ {
		dequantRow(m.Type, m.Row(r), out[r*m.Cols:(r+1)*m.Cols])
	}
	return out
}

// SetF32 replaces the matrix storage by F32 values.
func (m *Matrix) SetF32(w []float32) {
	m.Type, m.Data, m.RowBytes = TypeF32, f32AsBytes(w), 4*m.Cols
}

type Layer struct {
	AttnNorm, FFNNorm              []float32
	Wq, Wk, Wv, Wo, Gate, Up, Down *Matrix
}

// Model is the llama weights (shared read-only by all sessions).
type Model struct {
	Cfg     Config
	File    *GGUFFile
	TokEmb  *Matrix
	Norm    []float32
	Output  *Matrix
	Layers  []Layer
	Pool    *Pool
	ropeCos []float32 // [positions][NRot/2], for the longest session opened
	ropeSin []float32
	ropeLen int // positions the tables cover
	Tok     *Tokenizer
	Chat    *ChatTemplate // how conversations become token ids (set with the tokenizer)
}

// LoadModel maps a llama GGUF and wires its tensors.
func LoadModel(path string, threads int) (*Model, error) {
	g, err := OpenGGUF(path)
	if err != nil {
		return nil, err
	}
	m, err := newModel(g, threads)
	if err != nil {
		g.Close()
		return nil, fmt.Errorf("%s: %v", path, err)
	}
	return m, nil
}

func newModel(g *GGUFFile, threads int) (*Model, error) {
	arch, err := g.metaString("general.architecture")
	if err != nil {
		return nil, err
	}
	if arch != "llama" {
		return nil, fmt.Errorf("architecture %q is not supported (only llama)", arch)
	}
	geti := func(key string, def int) (int, error) {
		if _, ok := g.Meta[key]; !ok && def >= 0 {
			return def, nil
		}
		v, err := g.metaUint(key)
		if err != nil {
			return 0, err
		}
		if v > 1<<31 {
			return 0, fmt.Errorf("metadata %q = %d is too large", key, v)
		}
		return int(v), nil
	}
	var c Config
	if c.NLayer, err = geti("llama.block_count", -1); err != nil {
		return nil, err
	}
	if c.Dim, err = geti("llama.embedding_length", -1); err != nil {
		return nil, err
	}
	if c.NHead, err = geti("llama.attention.head_count", -1); err != nil {
		return nil, err
	}
	if c.NKVHead, err = geti("llama.attention.head_count_kv", c.NHead); err != nil {
		return nil, err
	}
	if c.NHead == 0 || c.NKVHead == 0 || c.NHead%c.NKVHead != 0 {
		return nil, fmt.Errorf("bad head counts: %d heads, %d kv heads", c.NHead, c.NKVHead)
	}
	if c.HeadDim, err = geti("llama.attention.key_length", c.Dim/c.NHead); err != nil {
		return nil, err
	}
	if vl, err := geti("llama.attention.value_length", c.HeadDim); err != nil || vl != c.HeadDim {
		return nil, fmt.Errorf("value_length must equal key_length (%d)", c.HeadDim)
	}
	if c.NRot, err = geti("llama.rope.dimension_count", c.HeadDim); err != nil {
		return nil, err
	}
	if c.NRot > c.HeadDim || c.NRot%2 != 0 {
		return nil, fmt.Errorf("bad rope.dimension_count %d for head dim %d", c.NRot, c.HeadDim)
	}
	if c.FFN, err = geti("llama.feed_forward_length", -1); err != nil {
		return nil, err
	}
	if c.CtxLen, err = geti("llama.context_length", 2048); err != nil {
		return nil, err
	}
	c.Eps = 1e-5
	if _, ok := g.Meta["llama.attention.layer_norm_rms_epsilon"]; ok {
		e, err := g.metaFloat("llama.attention.layer_norm_rms_epsilon")
		if err != nil {
			return nil, err
		}
		c.Eps = float32(e)
	}
	c.RopeBase = 10000
	if _, ok := g.Meta["llama.rope.freq_base"]; ok {
		b, err := g.metaFloat("llama.rope.freq_base")
		if err != nil {
			return nil, err
		}
		c.RopeBase = float32(b)
	}
	if c.NLayer < 1 || c.Dim < 1 || c.FFN < 1 || c.HeadDim < 1 {
		return nil, fmt.Errorf("bad model shape (layers %d, dim %d, ffn %d)", c.NLayer, c.Dim, c.FFN)
	}

	m := &Model{File: g}
	getMat := func(name string, rows, cols int) (*Matrix, error) {
		t, ok := g.ByName[name]
		if !ok {
			return nil, fmt.Errorf("missing tensor %q", name)
		}
		if len(t.Dims) != 2 || int(t.Dims[0]) != cols || (rows >= 0 && int(t.Dims[1]) != rows) {
			return nil, fmt.Errorf("tensor %q has shape %v, want [%d %d]", name, t.Dims, cols, rows)
		}
		if !typeInfo[t.Type].supported {
			return nil, fmt.Errorf("tensor %q has type %s, which this engine does not support (supported: %s)", name, t.Type, supportedTypeNames())
		}
		if cols%typeInfo[t.Type].blockSize != 0 || (actKindFor(t.Type) == actQ8_0 || actKindFor(t.Type) == actQ8_1) && cols%32 != 0 {
			return nil, fmt.Errorf("tensor %q: row length %d does not fit type %s", name, cols, t.Type)
		}
		r := int(t.Dims[1])
		return &Matrix{Name: name, Type: t.Type, Rows: r, Cols: cols, Data: t.Data, RowBytes: rowBytes(t.Type, cols)}, nil
	}
	getVec := func(name string, n int) ([]float32, error) {
		t, ok := g.ByName[name]
		if !ok {
			return nil, fmt.Errorf("missing tensor %q", name)
		}
		if len(t.Dims) != 1 || int(t.Dims[0]) != n {
			return nil, fmt.Errorf("tensor %q has shape %v, want [%d]", name, t.Dims, n)
		}
		if !typeInfo[t.Type].supported {
			return nil, fmt.Errorf("tensor %q has type %s, which this engine does not support (supported: %s)", name, t.Type, supportedTypeNames())
		}
		out := make([]float32, n)
		dequantRow(t.Type, t.Data, out)
		return out, nil
	}
	if m.TokEmb, err = getMat("token_embd.weight", -1, c.Dim); err != nil {
		return nil, err
	}
	if m.Norm, err = getVec("output_norm.weight", c.Dim); err != nil {
		return nil, err
	}
	if _, ok := g.ByName["output.weight"]; ok {
		if m.Output, err = getMat("output.weight", -1, c.Dim); err != nil {
			return nil, err
		}
	} else {
		m.Output = m.TokEmb // tied embeddings
	}
	if m.Output.Rows != m.TokEmb.Rows {
		return nil, fmt.Errorf("output.weight has %d rows but token_embd.weight has %d (the vocabulary sizes must match)", m.Output.Rows, m.TokEmb.Rows)
	}
	c.Vocab = m.Output.Rows
	qd, kvd := c.NHead*c.HeadDim, c.NKVHead*c.HeadDim
	for i := 0; i < c.NLayer; i++ {
		var l Layer
		p := fmt.Sprintf("blk.%d.", i)
		if l.AttnNorm, err = getVec(p+"attn_norm.weight", c.Dim); err != nil {
			return nil, err
		}
		if l.FFNNorm, err = getVec(p+"ffn_norm.weight", c.Dim); err != nil {
			return nil, err
		}
		for _, w := range []struct {
			dst        **Matrix
			name       string
			rows, cols int
		}{
			{&l.Wq, "attn_q", qd, c.Dim}, {&l.Wk, "attn_k", kvd, c.Dim}, {&l.Wv, "attn_v", kvd, c.Dim},
			{&l.Wo, "attn_output", c.Dim, qd}, {&l.Gate, "ffn_gate", c.FFN, c.Dim},
			{&l.Up, "ffn_up", c.FFN, c.Dim}, {&l.Down, "ffn_down", c.Dim, c.FFN},
		} {
			if *w.dst, err = getMat(p+w.name+".weight", w.rows, w.cols); err != nil {
				return nil, err
			}
		}
		m.Layers = append(m.Layers, l)
	}
	m.Cfg = c
	m.Pool = NewPool(threads)
	return m, nil
}

// SetTokenizer attaches tok after checking that its ids are rows of the
// embedding.
func (m *Model) SetTokenizer(tok *Tokenizer) error {
	if len(tok.Tokens) > m.TokEmb.Rows {
		return fmt.Errorf("the tokenizer has %d tokens but token_embd.weight only %d rows", len(tok.Tokens), m.TokEmb.Rows)
	}
	m.Tok = tok
	m.Chat = NewChatTemplate(m.File, tok, os.Stderr)
	return nil
}

// String describes the model's shape in one line.
func (m *Model) String() string {
	c := m.Cfg
	return fmt.Sprintf("llama: %d layers, dim %d, %d heads (%d kv, head dim %d), ffn %d, vocab %d, ctx %d",
		c.NLayer, c.Dim, c.NHead, c.NKVHead, c.HeadDim, c.FFN, c.Vocab, c.CtxLen)
}
