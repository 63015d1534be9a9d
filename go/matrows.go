package main

import "unsafe"

// matRows writes out[r-lo] = dotRow(t, row r, a, tok) for rows [lo, hi) of
// the matrix data (rows stride bytes apart) with one AVX2 call, and reports false when
// no kernel covers the case (the caller then loops over dotRow).
func matRows(t GGMLType, data []byte, stride, lo, hi int, a *QAct, tok int, out []float32) bool {
	nr := hi - lo
	c := a.cols
	if !useAVX2 || nr <= 0 || c == 0 {
		return false
	}
	out = out[:nr]
	w := data[lo*stride : hi*stride]
	switch t {
	case TypeQ8_0, TypeQ4_0:
		nb := c / 32
		qs := a.qs[tok*c : tok*c+c]
		d := a.d[tok*nb : tok*nb+nb]
		bs := 34
		if t == TypeQ4_0 {
			bs = 18
		}
		if nb == 0 || stride < nb*bs {
			return false
		}
		if t == TypeQ8_0 {
			matQ8_0AVX2(&out[0], &w[0], stride, nr, &qs[0], &d[0], nb)
		} else {
			ysum := a.isum[tok*nb : tok*nb+nb]
			matQ4_0AVX2(&out[0], &w[0], stride, nr, &qs[0], &d[0], nb, &ysum[0])
		}
	case TypeF16, TypeF32:
		es := 4
		if t == TypeF16 {
			es = 2
		}
		if c&7 != 0 || stride < c*es {
			return false
		}
		x := a.f[tok*c : tok*c+c]
		if t == TypeF16 {
			matF16AVX2(&out[0], (*uint16)(unsafe.Pointer(&w[0])), stride, nr, &x[0], c)
		} else {
			matF32AVX2(&out[0], (*float32)(unsafe.Pointer(&w[0])), stride, nr, &x[0], c)
		}
	default:
		return false
	}
	return true
}

// matRows4 is matRows for the 4 tokens tok..tok+3 at once: out[k*ostride+r-lo]
// for token tok+k. It reports false when no 4-token kernel applies.
func matRows4(t GGMLType, data []byte, stride, lo, hi int, a *QAct, tok int, out []float32, ostride int) bool {
	nr := hi - lo
	c := a.cols
	if !useAVX2 || nr <= 0 || c == 0 || tok%4 != 0 || tok+4 > a.rows {
		return false
	}
	_ = out[3*ostride+nr-1]
	w := data[lo*stride : hi*stride]
	switch t {
	case TypeQ8_0, TypeQ4_0:
		nb := c / 32
		g := tok / 4
		bs := 34
		if t == TypeQ4_0 {
			bs = 18
		}
		if a.kind != actQ8_0 || g >= a.groups4 || nb == 0 || stride < nb*bs {
			return false
		}
		y := a.qs4[g*4*c : g*4*c+4*c]
		d := a.d4[g*4*nb : g*4*nb+4*nb]
		ys := a.ys4[g*4*nb : g*4*nb+4*nb]
		if t == TypeQ8_0 {
			matQ8_0x4AVX2(&out[0], 4*ostride, &w[0], stride, nr, &y[0], &d[0], &ys[0], nb)
		} else {
			matQ4_0x4AVX2(&out[0], 4*ostride, &w[0], stride, nr, &y[0], &d[0], &ys[0], nb)
		}
	case TypeF16:
		if a.kind != actF16 || c&7 != 0 || stride < 2*c {
			return false
		}
		x := a.f[tok*c : tok*c+4*c]
		matF16x4AVX2(&out[0], 4*ostride, (*uint16)(unsafe.Pointer(&w[0])), stride, nr, &x[0], 4*c, c)
	default:
		return false
	}
	return true
}
