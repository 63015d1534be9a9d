package main

import (
	"math"
	"unsafe"
)

// ---- fused dot products: one weight row against activation row r ----

func dotRow(t GGMLType, w []byte, a *QAct, r int) float32 {
	c := a.cols
	switch t {
	case TypeF32:
		return dotF32(bytesAsF32(w[:4*c]), a.f[r*c:r*c+c])
	case TypeF16:
		return dotF16(bytesAsU16(w[:2*c]), a.f[r*c:r*c+c])
	case TypeBF16:
		return dotBF16(bytesAsU16(w[:2*c]), a.f[r*c:r*c+c])
	case TypeQ8_0:
		return dotQ8_0(w, a.qs[r*c:r*c+c], a.d[r*c/32:(r+1)*c/32])
	case TypeQ4_0:
		return dotQ4_0(w, a.qs[r*c:r*c+c], a.d[r*c/32:(r+1)*c/32], a.isum[r*c/32:(r+1)*c/32])
	case TypeQ5_0:
		return dotQ5_0(w, a.qs[r*c:r*c+c], a.d[r*c/32:(r+1)*c/32])
	case TypeQ4_1:
		return dotQ4_1(w, a.qs[r*c:r*c+c], a.d[r*c/32:(r+1)*c/32], a.s[r*c/32:(r+1)*c/32])
	case TypeQ5_1:
		return dotQ5_1(w, a.qs[r*c:r*c+c], a.d[r*c/32:(r+1)*c/32], a.s[r*c/32:(r+1)*c/32])
	case TypeQ4_K:
		return dotQ4_K(w, a.qs[r*c:r*c+c], a.d[r*c/256:(r+1)*c/256], a.bsums[r*c/16:(r+1)*c/16])
	case TypeQ5_K:
		return dotQ5_K(w, a.qs[r*c:r*c+c], a.d[r*c/256:(r+1)*c/256], a.bsums[r*c/16:(r+1)*c/16])
	case TypeQ6_K:
		return dotQ6_K(w, a.qs[r*c:r*c+c], a.d[r*c/256:(r+1)*c/256])
	}
	panic("dotRow: unsupported type " + t.String())
}

// dotF32, dotF16, dotQ8_0 and dotQ4_0 use the AVX2 kernels when the CPU
// has them (simd_amd64.s) and the pure-Go versions otherwise. The kernels
// give bit-identical results to the Go code (same float operations in the
// same order; integer block sums are exact), which matters: llama.cpp
// parity depends on activation quantisation rounding the same way, and one
// flipped rounding propagates through the KV cache.

func dotF32(w, x []float32) float32 {
	n := len(w)
	if !useAVX2 || n&7 != 0 || n == 0 {
		return dotF32Go(w, x)
	}
	x = x[:n]
	return dotF32AVX2(&w[0], &x[0], n)
}

func dotF16(w []uint16, x []float32) float32 {
	n := len(w)
	if !useAVX2 || n&7 != 0 || n == 0 {
		return dotF16Go(w, x)
	}
	x = x[:n]
	return dotF16AVX2(&w[0], &x[0], n)
}

// axpyF16 does out[i] += a*v[i].
func axpyF16(out []float32, a float32, v []uint16) {
	n := len(v)
	out = out[:n]
	m := 0
	if useAVX2 && n >= 8 {
		m = n &^ 7
		axpyF16AVX2(&out[0], a, &v[0], m)
	}
	for i := m; i < n; i++ {
		out[i] += a * f16Table[v[i]]
	}
}

func dotQ8_0(w []byte, qs []int8, d []float32) float32 {
	nb := len(d)
	if !useAVX2 || nb == 0 {
		return dotQ8_0Go(w, qs, d)
	}
	_, _ = w[nb*34-1], qs[nb*32-1]
	return dotQ8_0AVX2(&w[0], &qs[0], &d[0], nb)
}

func dotQ4_0(w []byte, qs []int8, d []float32, ysum []int32) float32 {
	nb := len(d)
	if !useAVX2 || nb == 0 {
		return dotQ4_0Go(w, qs, d, ysum)
	}
	_, _ = w[nb*18-1], qs[nb*32-1]
	return dotQ4_0AVX2(&w[0], &qs[0], &d[0], nb)
}

func dotF32Go(w, x []float32) float32 {
	x = x[:len(w)]
	var s0, s1, s2, s3, s4, s5, s6, s7 float32
	i := 0
	for ; i+8 <= len(w); i += 8 {
		ww := (*[8]float32)(w[i : i+8])
		xx := (*[8]float32)(x[i : i+8])
		s0 += ww[0] * xx[0]
		s1 += ww[1] * xx[1]
		s2 += ww[2] * xx[2]
		s3 += ww[3] * xx[3]
		s4 += ww[4] * xx[4]
		s5 += ww[5] * xx[5]
		s6 += ww[6] * xx[6]
		s7 += ww[7] * xx[7]
	}
	for ; i < len(w); i++ {
		s0 += w[i] * x[i]
	}
	return ((s0 + s4) + (s1 + s5)) + ((s2 + s6) + (s3 + s7))
}

func dotF16Go(w []uint16, x []float32) float32 {
	x = x[:len(w)]
	tab := &f16Table
	var s0, s1, s2, s3, s4, s5, s6, s7 float32
	i := 0
	for ; i+8 <= len(w); i += 8 {
		ww := (*[8]uint16)(w[i : i+8])
		xx := (*[8]float32)(x[i : i+8])
		s0 += tab[ww[0]] * xx[0]
		s1 += tab[ww[1]] * xx[1]
		s2 += tab[ww[2]] * xx[2]
		s3 += tab[ww[3]] * xx[3]
		s4 += tab[ww[4]] * xx[4]
		s5 += tab[ww[5]] * xx[5]
		s6 += tab[ww[6]] * xx[6]
		s7 += tab[ww[7]] * xx[7]
	}
	for ; i < len(w); i++ {
		s0 += tab[w[i]] * x[i]
	}
	return ((s0 + s4) + (s1 + s5)) + ((s2 + s6) + (s3 + s7))
}

func dotBF16(w []uint16, x []float32) float32 {
	x = x[:len(w)]
	var s0, s1, s2, s3 float32
	i := 0
	for ; i+4 <= len(w); i += 4 {
		ww := (*[4]uint16)(w[i : i+4])
		xx := (*[4]float32)(x[i : i+4])
		s0 += math.Float32frombits(uint32(ww[0])<<16) * xx[0]
		s1 += math.Float32frombits(uint32(ww[1])<<16) * xx[1]
		s2 += math.Float32frombits(uint32(ww[2])<<16) * xx[2]
		s3 += math.Float32frombits(uint32(ww[3])<<16) * xx[3]
	}
	for ; i < len(w); i++ {
		s0 += bf16ToF32(w[i]) * x[i]
	}
	return (s0 + s1) + (s2 + s3)
}

// dot32 is the integer inner product of two 32-element int8 vectors,
// unrolled (Go does not vectorise loops).
func dot32(a *[32]int8, b *[32]int8) int32 {
	s0 := int32(a[0])*int32(b[0]) + int32(a[1])*int32(b[1]) + int32(a[2])*int32(b[2]) + int32(a[3])*int32(b[3]) + int32(a[4])*int32(b[4]) + int32(a[5])*int32(b[5]) + int32(a[6])*int32(b[6]) + int32(a[7])*int32(b[7])
	s1 := int32(a[8])*int32(b[8]) + int32(a[9])*int32(b[9]) + int32(a[10])*int32(b[10]) + int32(a[11])*int32(b[11]) + int32(a[12])*int32(b[12]) + int32(a[13])*int32(b[13]) + int32(a[14])*int32(b[14]) + int32(a[15])*int32(b[15])
	s2 := int32(a[16])*int32(b[16]) + int32(a[17])*int32(b[17]) + int32(a[18])*int32(b[18]) + int32(a[19])*int32(b[19]) + int32(a[20])*int32(b[20]) + int32(a[21])*int32(b[21]) + int32(a[22])*int32(b[22]) + int32(a[23])*int32(b[23])
	s3 := int32(a[24])*int32(b[24]) + int32(a[25])*int32(b[25]) + int32(a[26])*int32(b[26]) + int32(a[27])*int32(b[27]) + int32(a[28])*int32(b[28]) + int32(a[29])*int32(b[29]) + int32(a[30])*int32(b[30]) + int32(a[31])*int32(b[31])
	return (s0 + s1) + (s2 + s3)
}

func dotQ8_0Go(w []byte, qs []int8, d []float32) float32 {
	nb := len(d)
	w = w[:nb*34]
	qs = qs[:nb*32]
	var sum float32
	for b := 0; b < nb; b++ {
		blk := (*[34]byte)(w[b*34 : b*34+34])
		wq := (*[32]int8)(unsafe.Pointer(&blk[2]))
		s := dot32(wq, (*[32]int8)(qs[b*32:b*32+32]))
		sum += f16Table[uint16(blk[0])|uint16(blk[1])<<8] * d[b] * float32(s)
	}
	return sum
}

func dotQ4_0Go(w []byte, qs []int8, d []float32, ysum []int32) float32 {
	nb := len(d)
	w = w[:nb*18]
	qs = qs[:nb*32]
	ysum = ysum[:nb]
	var sum float32
	for b := 0; b < nb; b++ {
		blk := (*[18]byte)(w[b*18 : b*18+18])
		q := (*[16]byte)(blk[2:18])
		y := (*[32]int8)(qs[b*32 : b*32+32])
		s0 := int32(q[0]&15)*int32(y[0]) + int32(q[1]&15)*int32(y[1]) + int32(q[2]&15)*int32(y[2]) + int32(q[3]&15)*int32(y[3]) + int32(q[4]&15)*int32(y[4]) + int32(q[5]&15)*int32(y[5]) + int32(q[6]&15)*int32(y[6]) + int32(q[7]&15)*int32(y[7]) + int32(q[8]&15)*int32(y[8]) + int32(q[9]&15)*int32(y[9]) + int32(q[10]&15)*int32(y[10]) + int32(q[11]&15)*int32(y[11]) + int32(q[12]&15)*int32(y[12]) + int32(q[13]&15)*int32(y[13]) + int32(q[14]&15)*int32(y[14]) + int32(q[15]&15)*int32(y[15])
		s1 := int32(q[0]>>4)*int32(y[16]) + int32(q[1]>>4)*int32(y[17]) + int32(q[2]>>4)*int32(y[18]) + int32(q[3]>>4)*int32(y[19]) + int32(q[4]>>4)*int32(y[20]) + int32(q[5]>>4)*int32(y[21]) + int32(q[6]>>4)*int32(y[22]) + int32(q[7]>>4)*int32(y[23]) + int32(q[8]>>4)*int32(y[24]) + int32(q[9]>>4)*int32(y[25]) + int32(q[10]>>4)*int32(y[26]) + int32(q[11]>>4)*int32(y[27]) + int32(q[12]>>4)*int32(y[28]) + int32(q[13]>>4)*int32(y[29]) + int32(q[14]>>4)*int32(y[30]) + int32(q[15]>>4)*int32(y[31])
		sum += f16Table[uint16(blk[0])|uint16(blk[1])<<8] * d[b] * float32(s0+s1-8*ysum[b])
	}
	return sum
}

func dotQ4_1(w []byte, qs []int8, d, s []float32) float32 {
	nb := len(d)
	w = w[:nb*20]
	qs = qs[:nb*32]
	s = s[:nb]
	var sum float32
	for b := 0; b < nb; b++ {
		blk := (*[20]byte)(w[b*20 : b*20+20])
		y := (*[32]int8)(qs[b*32 : b*32+32])
		var si int32
		for j := 0; j < 16; j++ {
			q := blk[4+j]
			si += int32(q&15)*int32(y[j]) + int32(q>>4)*int32(y[j+16])
		}
		dx := f16Table[uint16(blk[0])|uint16(blk[1])<<8]
		mx := f16Table[uint16(blk[2])|uint16(blk[3])<<8]
		sum += dx*d[b]*float32(si) + mx*s[b]
	}
	return sum
}

func dotQ5_0(w []byte, qs []int8, d []float32) float32 {
	nb := len(d)
	w = w[:nb*22]
	qs = qs[:nb*32]
	var sum float32
	for b := 0; b < nb; b++ {
		blk := (*[22]byte)(w[b*22 : b*22+22])
		y := (*[32]int8)(qs[b*32 : b*32+32])
		qh := uint32(blk[2]) | uint32(blk[3])<<8 | uint32(blk[4])<<16 | uint32(blk[5])<<24
		var si int32
		for j := 0; j < 16; j++ {
			q := blk[6+j]
			h0 := byte((qh>>uint(j))<<4) & 0x10
			h1 := byte(qh>>uint(j+12)) & 0x10
			si += (int32(q&15|h0)-16)*int32(y[j]) + (int32(q>>4|h1)-16)*int32(y[j+16])
		}
		sum += f16Table[uint16(blk[0])|uint16(blk[1])<<8] * d[b] * float32(si)
	}
	return sum
}

func dotQ5_1(w []byte, qs []int8, d, s []float32) float32 {
	nb := len(d)
	w = w[:nb*24]
	qs = qs[:nb*32]
	s = s[:nb]
	var sum float32
	for b := 0; b < nb; b++ {
		blk := (*[24]byte)(w[b*24 : b*24+24])
		y := (*[32]int8)(qs[b*32 : b*32+32])
		qh := uint32(blk[4]) | uint32(blk[5])<<8 | uint32(blk[6])<<16 | uint32(blk[7])<<24
		var si int32
		for j := 0; j < 16; j++ {
			q := blk[8+j]
			h0 := byte((qh>>uint(j))<<4) & 0x10
			h1 := byte(qh>>uint(j+12)) & 0x10
			si += int32(q&15|h0)*int32(y[j]) + int32(q>>4|h1)*int32(y[j+16])
		}
		dx := f16Table[uint16(blk[0])|uint16(blk[1])<<8]
		mx := f16Table[uint16(blk[2])|uint16(blk[3])<<8]
		sum += dx*d[b]*float32(si) + mx*s[b]
	}
	return sum
}
