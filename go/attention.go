package main

import "math"

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
