package main

import (
	"fmt"
	"math"
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

// ensureRope builds cos/sin tables for positions [0, n) the way ggml's rope
// cache does (float32, theta multiplied step by step by base^(-2/n_rot)).
// They are sized by the sessions actually opened, never by the file's
// context_length, which a file may set to anything. Sessions are opened
// before any of them runs, so this needs no lock.
func (m *Model) ensureRope(n int) {
	c := m.Cfg
	half := c.NRot / 2
	if n <= m.ropeLen {
		return
	}
	m.ropeLen = n
	m.ropeCos = make([]float32, n*half)
	m.ropeSin = make([]float32, n*half)
	scale := float32(math.Pow(float64(c.RopeBase), -2.0/float64(c.NRot)))
	for p := 0; p < n; p++ {
		theta := float32(p)
		for i := 0; i < half; i++ {
			m.ropeCos[p*half+i] = float32(math.Cos(float64(theta)))
			m.ropeSin[p*half+i] = float32(math.Sin(float64(theta)))
			theta *= scale
		}
	}
}

// CheckTypes reports the first matrix whose type cannot be used.
func (m *Model) String() string {
	c := m.Cfg
	return fmt.Sprintf("llama: %d layers, dim %d, %d heads (%d kv, head dim %d), ffn %d, vocab %d, ctx %d",
		c.NLayer, c.Dim, c.NHead, c.NKVHead, c.HeadDim, c.FFN, c.Vocab, c.CtxLen)
}

// ---- sessions: a KV cache plus every scratch buffer a forward pass needs ----

const maxBatch = 64

type Session struct {
	m      *Model
	Ctx    int
	Pos    int     // tokens in the KV cache
	hist   []int32 // the tokens behind the cache: always len(hist) == Pos
	kvF32  bool
	kcache [][]uint16 // [layer][pos*kvd + i], fp16 like llama.cpp's default cache
	vcache [][]uint16
	kc32   [][]float32 // the same in fp32 (--kv-type f32)
	vc32   [][]float32

	x, xb, q, k, v, att, hb, hb2 []float32
	logits                       []float32 // [maxBatch*vocab] or [vocab]
	act                          *QAct
	scratch                      []float32
	job                          parJob
	mm                           matmulJob
	aj                           attnJob
	nj                           normJob
	sj                           siluJob
}

// NewSession allocates a KV cache for ctx positions (≤ the model's), in
// fp16 (as llama.cpp's default) or fp32.
func (m *Model) NewSession(ctx int, kvF32 bool) *Session {
	c := m.Cfg
	if ctx <= 0 || ctx > c.CtxLen {
		ctx = c.CtxLen
	}
	kvd := c.NKVHead * c.HeadDim
	qd := c.NHead * c.HeadDim
	m.ensureRope(ctx)
	s := &Session{m: m, Ctx: ctx, kvF32: kvF32, hist: make([]int32, 0, ctx)}
	for i := 0; i < c.NLayer; i++ {
		if kvF32 {
			s.kc32 = append(s.kc32, make([]float32, ctx*kvd))
			s.vc32 = append(s.vc32, make([]float32, ctx*kvd))
		} else {
			s.kcache = append(s.kcache, make([]uint16, ctx*kvd))
			s.vcache = append(s.vcache, make([]uint16, ctx*kvd))
		}
	}
	B := maxBatch
	wide := c.Dim
	if qd > wide {
		wide = qd
	}
	s.x = make([]float32, B*c.Dim)
	s.xb = make([]float32, B*wide)
	s.q = make([]float32, B*qd)
	s.k = make([]float32, B*kvd)
	s.v = make([]float32, B*kvd)
	s.att = make([]float32, B*qd)
	s.hb = make([]float32, B*c.FFN)
	s.hb2 = make([]float32, B*c.FFN)
	s.logits = make([]float32, c.Vocab)
	big := c.FFN
	if wide > big {
		big = wide
	}
	s.act = newQAct(B, (big+255)/256*256)
	s.scratch = make([]float32, ctx)
	return s
}

// Reset empties the KV cache.
func (s *Session) Reset() { s.Pos, s.hist = 0, s.hist[:0] }

// Truncate keeps only the first n cached positions.
func (s *Session) Truncate(n int) {
	if n < s.Pos {
		s.Pos = n
		s.hist = s.hist[:n]
	}
}

// History returns the tokens whose keys and values the cache holds.
func (s *Session) History() []int32 { return s.hist }

// SharedPrefix is how many leading tokens of prompt the cache can serve.
// It leaves at least one prompt token to evaluate, since the caller needs
// the logits after the last prompt token.
func (s *Session) SharedPrefix(prompt []int32) int {
	n := 0
	for n < len(s.hist) && n < len(prompt)-1 && s.hist[n] == prompt[n] {
		n++
	}
	return n
}

// matmulJob computes up to three matrix products over the same prepared
// activations as one parallel-for over their stacked rows (Q/K/V and
// gate/up share a single synchronisation).
type matmulJob struct {
	ws   [3]*Matrix
	outs [3][]float32
	nm   int
	a    *QAct
	n    int
}

func (j *matmulJob) do(lo, hi int, _ *[]float32) {
	off := 0
	for k := 0; k < j.nm && lo < hi; k++ {
		w := j.ws[k]
		if lo < off+w.Rows {
			h := hi
			if h > off+w.Rows {
				h = off + w.Rows
			}
			j.rows(w, j.outs[k], lo-off, h-off)
			lo = h
		}
		off += w.Rows
	}
}

func (j *matmulJob) rows(w *Matrix, out []float32, lo, hi int) {
	a, n, rows := j.a, j.n, w.Rows
	t := 0
	for t+4 <= n && matRows4(w.Type, w.Data, w.RowBytes, lo, hi, a, t, out[t*rows+lo:], rows) {
		t += 4
	}
	if t < n && matRows(w.Type, w.Data, w.RowBytes, lo, hi, a, t, out[t*rows+lo:t*rows+hi]) {
		for t++; t < n; t++ {
			matRows(w.Type, w.Data, w.RowBytes, lo, hi, a, t, out[t*rows+lo:t*rows+hi])
		}
		return
	}
	for r := lo; r < hi; r++ {
		row := w.Row(r)
		for u := t; u < n; u++ {
			out[u*rows+r] = dotRow(w.Type, row, a, u)
		}
	}
}

// matmul computes out[t, r] = W[r] · x[t] for n rows of x.
func (s *Session) matmul(out []float32, w *Matrix, x []float32, n int) {
	s.act.prepare(w.Type, x, n, w.Cols)
	s.matmulPrepared(n, w, out, nil, nil, nil, nil)
}

// matmulPrepared runs the products of up to three (matrix, output) pairs
// (nil matrices are skipped) with the activations already in s.act, as one
// parallel-for.
func (s *Session) matmulPrepared(n int, w0 *Matrix, o0 []float32, w1 *Matrix, o1 []float32, w2 *Matrix, o2 []float32) {
	s.mm = matmulJob{a: s.act, n: n}
	total := 0
	for _, p := range [3]struct {
		w *Matrix
		o []float32
	}{{w0, o0}, {w1, o1}, {w2, o2}} {
		if p.w != nil {
			s.mm.ws[s.mm.nm], s.mm.outs[s.mm.nm] = p.w, p.o
			s.mm.nm++
			total += p.w.Rows
		}
	}
	// Each thread gets about 4 runs of rows to balance the load. With
	// 4 tokens or more, chunks are at most 16 rows so that they stay in L1
	// while all the tokens go by; a decode step reads each row once, and
	// long runs keep each thread's reads sequential for the prefetchers.
	chunk := (total + 4*s.m.Pool.threads - 1) / (4 * s.m.Pool.threads)
	if n >= 4 && chunk > 16 {
		chunk = 16
	}
	s.m.Pool.Run(&s.job, &s.mm, total, chunk, &s.scratch)
	s.mm = matmulJob{}
}

type attnJob struct {
	s     *Session
	layer int
	n     int // tokens in this batch
	pos0  int // position of the first one
}

// do runs attention for items (t, h) in [lo, hi): token t, query head h.
func (j *attnJob) do(lo, hi int, scratch *[]float32) {
	s, c := j.s, j.s.m.Cfg
	hd, kvd, qd := c.HeadDim, c.NKVHead*c.HeadDim, c.NHead*c.HeadDim
	group := c.NHead / c.NKVHead
	scale := float32(1 / math.Sqrt(float64(hd)))
	if cap(*scratch) < s.Ctx+hd {
		*scratch = make([]float32, s.Ctx+hd)
	}
	buf := (*scratch)[:s.Ctx+hd]
	qh := buf[s.Ctx:]
	for it := lo; it < hi; it++ {
		t, h := it/c.NHead, it%c.NHead
		npos := j.pos0 + t + 1
		kvo := (h / group) * hd
		q := s.q[t*qd+h*hd : t*qd+h*hd+hd]
		out := s.att[t*qd+h*hd : t*qd+h*hd+hd]
		sc := buf[:npos]
		max := float32(math.Inf(-1))
		if s.kvF32 {
			kc := s.kc32[j.layer]
			for p := 0; p < npos; p++ {
				d := dotF32(kc[p*kvd+kvo:p*kvd+kvo+hd], q) * scale
				sc[p] = d
				if d > max {
					max = d
				}
			}
		} else {
			// llama.cpp multiplies q by the fp16 cache in fp16 precision.
			roundF16(qh, q)
			kc := s.kcache[j.layer]
			if useAVX2 && hd&7 == 0 {
				// sc[p] = dotF16(K row p, qh), bit for bit
				_ = kc[(npos-1)*kvd+kvo+hd-1]
				matF16AVX2(&sc[0], &kc[kvo], 2*kvd, npos, &qh[0], hd)
				for p, d := range sc {
					d *= scale
					sc[p] = d
					if d > max {
						max = d
					}
				}
			} else {
				for p := 0; p < npos; p++ {
					d := dotF16(kc[p*kvd+kvo:p*kvd+kvo+hd], qh) * scale
					sc[p] = d
					if d > max {
						max = d
					}
				}
			}
		}
		for p := 0; p < npos; {
			if useAVX2 && npos-p >= 4 {
				if k := expAVX2(&sc[p], max, npos-p); k > 0 {
					p += k // math.Exp's own algorithm, 4 at a time
					continue
				}
			}
			sc[p] = float32(math.Exp(float64(sc[p] - max)))
			p++
		}
		var sum float64
		for _, e := range sc {
			sum += float64(e)
		}
		inv := float32(1 / sum)
		for i := range out {
			out[i] = 0
		}
		if s.kvF32 {
			vc := s.vc32[j.layer]
			for p := range sc {
				w := sc[p] * inv
				vr := vc[p*kvd+kvo : p*kvd+kvo+hd]
				for i, v := range vr {
					out[i] += w * v
				}
			}
			continue
		}
		vc := s.vcache[j.layer]
		// llama.cpp rounds the probabilities to fp16 for the V product.
		for p := range sc {
			sc[p] *= inv
		}
		roundF16(sc, sc)
		if useAVX2 && hd&31 == 0 {
			// the sum of the axpyF16 calls below, bit for bit
			_, _ = vc[(npos-1)*kvd+kvo+hd-1], out[hd-1]
			wsumF16AVX2(&out[0], &sc[0], &vc[kvo], 2*kvd, npos, hd)
			continue
		}
		for p, w := range sc {
			axpyF16(out, w, vc[p*kvd+kvo:p*kvd+kvo+hd])
		}
	}
}

// rowsJob runs w over the batch's n tokens, as a parallel-for over groups
// of 4 (QAct.convert's unit) when there are several groups: the per-token
// work between the matrix products would otherwise be left to the caller
// while the helpers wait (some 10% of a 1-thread prefill).
func (s *Session) rowsJob(w chunkWorker, n int) {
	if n <= 4 {
		w.do(0, n, &s.scratch)
		return
	}
	s.m.Pool.Run(&s.job, w, n, 4, &s.scratch)
}

// normPrepare sets xb = rmsnorm(x)·w for the batch's n tokens and prepares
// them in s.act for weights of type t.
func (s *Session) normPrepare(w []float32, t GGMLType, n int) {
	s.act.setup(t, s.xb, n, s.m.Cfg.Dim)
	s.nj = normJob{s: s, w: w}
	s.rowsJob(&s.nj, n)
	s.nj = normJob{}
}

type normJob struct {
	s *Session
	w []float32
}

func (j *normJob) do(lo, hi int, _ *[]float32) {
	s, d := j.s, j.s.m.Cfg.Dim
	for t := lo; t < hi; t++ {
		rmsnorm(s.xb[t*d:(t+1)*d], s.x[t*d:(t+1)*d], j.w, s.m.Cfg.Eps)
	}
	s.act.convert(s.xb, lo, hi)
}

// siluJob sets hb = silu(hb)·hb2 for tokens and prepares them in s.act
// (set up for the down matrix).
type siluJob struct{ s *Session }

func (j *siluJob) do(lo, hi int, _ *[]float32) {
	s, f := j.s, j.s.m.Cfg.FFN
	siluMul(s.hb[lo*f:hi*f], s.hb2[lo*f:hi*f])
	s.act.convert(s.hb, lo, hi)
}

// siluMul sets g[i] = silu(g[i]) * up[i].
func siluMul(g, up []float32) {
	up = up[:len(g)]
	for i := 0; i < len(g); {
		if useAVX2 && len(g)-i >= 4 {
			if k := siluMulAVX2(&g[i], &up[i], len(g)-i); k > 0 {
				i += k // math.Exp's own algorithm, 4 at a time
				continue
			}
		}
		x := g[i]
		g[i] = x / (1 + float32(math.Exp(float64(-x)))) * up[i]
		i++
	}
}

func rmsnorm(out, x, w []float32, eps float32) {
	var ss float64
	for _, v := range x {
		ss += float64(v * v)
	}
	scale := float32(1 / math.Sqrt(float64(float32(ss/float64(len(x)))+eps)))
	for i, v := range x {
		out[i] = v * scale * w[i]
	}
}

// rope rotates adjacent pairs (llama.cpp's LLAMA rope, mode 0).
func (m *Model) rope(x []float32, nheads, pos int) {
	c := m.Cfg
	half := c.NRot / 2
	cs := m.ropeCos[pos*half : pos*half+half]
	sn := m.ropeSin[pos*half : pos*half+half]
	for h := 0; h < nheads; h++ {
		v := x[h*c.HeadDim : h*c.HeadDim+c.NRot]
		for i := 0; i < half; i++ {
			x0, x1 := v[2*i], v[2*i+1]
			v[2*i] = x0*cs[i] - x1*sn[i]
			v[2*i+1] = x0*sn[i] + x1*cs[i]
		}
	}
}

// Forward runs tokens through the model starting at s.Pos and advances the
// cache. If all is non-nil it receives logits for every token
// ([len(tokens)][vocab]); the returned slice holds the last token's logits
// and stays valid until the next call.
func (s *Session) Forward(tokens []int32, all []float32) ([]float32, error) {
	m := s.m
	c := m.Cfg
	if s.Pos+len(tokens) > s.Ctx {
		return nil, fmt.Errorf("context full: %d cached + %d new tokens > context %d", s.Pos, len(tokens), s.Ctx)
	}
	for _, tk := range tokens {
		if tk < 0 || int(tk) >= m.TokEmb.Rows {
			return nil, fmt.Errorf("token id %d out of range [0, %d)", tk, m.TokEmb.Rows)
		}
	}
	for start := 0; start < len(tokens); start += maxBatch {
		end := start + maxBatch
		if end > len(tokens) {
			end = len(tokens)
		}
		var out []float32
		if all != nil {
			out = all[start*c.Vocab : end*c.Vocab]
		}
		s.forwardBatch(tokens[start:end], out, end == len(tokens))
		s.hist = append(s.hist, tokens[start:end]...)
	}
	return s.logits, nil
}

func (s *Session) forwardBatch(tokens []int32, allOut []float32, last bool) {
	m := s.m
	c := m.Cfg
	n := len(tokens)
	d, qd, kvd := c.Dim, c.NHead*c.HeadDim, c.NKVHead*c.HeadDim
	pos0 := s.Pos
	for t, tk := range tokens {
		dequantRow(m.TokEmb.Type, m.TokEmb.Row(int(tk)), s.x[t*d:(t+1)*d])
	}
	for li := range m.Layers {
		l := &m.Layers[li]
		s.normPrepare(l.AttnNorm, l.Wq.Type, n)
		if actKindFor(l.Wk.Type) == s.act.kind && actKindFor(l.Wv.Type) == s.act.kind {
			s.matmulPrepared(n, l.Wq, s.q, l.Wk, s.k, l.Wv, s.v)
		} else {
			s.matmulPrepared(n, l.Wq, s.q, nil, nil, nil, nil)
			s.matmul(s.k, l.Wk, s.xb, n)
			s.matmul(s.v, l.Wv, s.xb, n)
		}
		for t := 0; t < n; t++ {
			p := pos0 + t
			m.rope(s.q[t*qd:(t+1)*qd], c.NHead, p)
			m.rope(s.k[t*kvd:(t+1)*kvd], c.NKVHead, p)
			if s.kvF32 {
				copy(s.kc32[li][p*kvd:(p+1)*kvd], s.k[t*kvd:(t+1)*kvd])
				copy(s.vc32[li][p*kvd:(p+1)*kvd], s.v[t*kvd:(t+1)*kvd])
				continue
			}
			f32sToF16(s.kcache[li][p*kvd:(p+1)*kvd], s.k[t*kvd:(t+1)*kvd])
			f32sToF16(s.vcache[li][p*kvd:(p+1)*kvd], s.v[t*kvd:(t+1)*kvd])
		}
		s.aj = attnJob{s: s, layer: li, n: n, pos0: pos0}
		s.m.Pool.Run(&s.job, &s.aj, n*c.NHead, 1, &s.scratch)
		s.aj = attnJob{}
		s.matmul(s.xb, l.Wo, s.att, n)
		for i := 0; i < n*d; i++ {
			s.x[i] += s.xb[i]
		}
		s.normPrepare(l.FFNNorm, l.Gate.Type, n)
		if actKindFor(l.Up.Type) == s.act.kind {
			s.matmulPrepared(n, l.Gate, s.hb, l.Up, s.hb2, nil, nil)
		} else {
			s.matmulPrepared(n, l.Gate, s.hb, nil, nil, nil, nil)
			s.matmul(s.hb2, l.Up, s.xb, n)
		}
		s.act.setup(l.Down.Type, s.hb, n, c.FFN)
		s.sj = siluJob{s: s}
		s.rowsJob(&s.sj, n)
		s.matmulPrepared(n, l.Down, s.xb, nil, nil, nil, nil)
		for i := 0; i < n*d; i++ {
			s.x[i] += s.xb[i]
		}
	}
	s.Pos += n
	if allOut != nil {
		for t := 0; t < n; t++ {
			rmsnorm(s.xb[t*d:(t+1)*d], s.x[t*d:(t+1)*d], m.Norm, c.Eps)
		}
		// Output rows in chunks of maxBatch keep one logits buffer.
		s.matmul(allOut, m.Output, s.xb, n)
		copy(s.logits, allOut[(n-1)*c.Vocab:])
		return
	}
	if last {
		rmsnorm(s.xb[:d], s.x[(n-1)*d:n*d], m.Norm, c.Eps)
		s.matmul(s.logits, m.Output, s.xb[:d], 1)
	}
}
