package main

import "math"

// ---- half precision ----

var f16Table [1 << 16]float32

func init() {
	for i := range f16Table {
		f16Table[i] = f16ToF32Slow(uint16(i))
	}
}

func f16ToF32Slow(h uint16) float32 {
	sign := uint32(h>>15) << 31
	exp := uint32(h>>10) & 0x1f
	man := uint32(h) & 0x3ff
	switch {
	case exp == 0 && man == 0:
		return math.Float32frombits(sign)
	case exp == 0: // subnormal
		f := float32(man) / 1024 / 16384
		if sign != 0 {
			f = -f
		}
		return f
	case exp == 0x1f:
		return math.Float32frombits(sign | 0x7f800000 | man<<13)
	}
	return math.Float32frombits(sign | (exp+112)<<23 | man<<13)
}

func f16ToF32(h uint16) float32 { return f16Table[h] }

// f32ToF16 rounds to nearest even, like F16C's vcvtps2ph.
func f32ToF16(f float32) uint16 {
	b := math.Float32bits(f)
	sign := uint16(b>>16) & 0x8000
	exp := int32(b>>23) & 0xff
	man := b & 0x7fffff
	if exp == 0xff {
		if man != 0 {
			return sign | 0x7e00
		}
		return sign | 0x7c00
	}
	e := exp - 127 + 15
	if e >= 0x1f {
		return sign | 0x7c00
	}
	if e <= 0 {
		if e < -10 {
			return sign
		}
		man |= 0x800000
		shift := uint32(14 - e)
		half := uint32(1) << (shift - 1)
		rest := man & (1<<shift - 1)
		v := man >> shift
		if rest > half || (rest == half && v&1 == 1) {
			v++
		}
		return sign | uint16(v)
	}
	v := uint32(e)<<10 | man>>13
	rest := man & 0x1fff
	if rest > 0x1000 || (rest == 0x1000 && v&1 == 1) {
		v++ // may carry into the exponent, which is correct
	}
	return sign | uint16(v)
}

func bf16ToF32(h uint16) float32 { return math.Float32frombits(uint32(h) << 16) }

// f32ToBF16 rounds to nearest even as ggml does.
func f32ToBF16(f float32) uint16 {
	u := math.Float32bits(f)
	if u&0x7fffffff > 0x7f800000 {
		return uint16(u>>16) | 64
	}
	return uint16((u + (0x7fff + (u>>16)&1)) >> 16)
}

// f32sToF16 converts src to fp16 (f32ToF16 element by element).
func f32sToF16(dst []uint16, src []float32) {
	n := len(src)
	dst = dst[:n]
	m := 0
	if useAVX2 && n >= 8 {
		m = n &^ 7
		f32ToF16AVX2(&dst[0], &src[0], m)
	}
	for i := m; i < n; i++ {
		dst[i] = f32ToF16(src[i])
	}
}

// roundF16 sets dst[i] to src[i] rounded to fp16 precision.
func roundF16(dst, src []float32) {
	n := len(src)
	dst = dst[:n]
	m := 0
	if useAVX2 && n >= 8 {
		m = n &^ 7
		roundF16AVX2(&dst[0], &src[0], m)
	}
	for i := m; i < n; i++ {
		dst[i] = f16Table[f32ToF16(src[i])]
	}
}
