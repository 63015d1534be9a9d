package main

import (
	"fmt"
	"math"
)

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
