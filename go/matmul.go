package main

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
