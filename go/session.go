package main

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
