package main

import (
	"fmt"
	"math"
	"unsafe"
)

// GGMLType is a ggml tensor type id (gguf.GGMLQuantizationType).
type GGMLType uint32

const (
	TypeF32  GGMLType = 0
	TypeF16  GGMLType = 1
	TypeQ4_0 GGMLType = 2
	TypeQ4_1 GGMLType = 3
	TypeQ5_0 GGMLType = 6
	TypeQ5_1 GGMLType = 7
	TypeQ8_0 GGMLType = 8
	TypeQ8_1 GGMLType = 9
	TypeQ2_K GGMLType = 10
	TypeQ3_K GGMLType = 11
	TypeQ4_K GGMLType = 12
	TypeQ5_K GGMLType = 13
	TypeQ6_K GGMLType = 14
	TypeQ8_K GGMLType = 15
	TypeBF16 GGMLType = 30
)

type typeDesc struct {
	name      string
	blockSize int // elements per block
	typeSize  int // bytes per block
	supported bool
}

// typeInfo lists every type gguf-py knows, so files with other types parse
// and fail with a clear "unsupported" message at load time.
var typeInfo = map[GGMLType]typeDesc{
	0:  {"F32", 1, 4, true},
	1:  {"F16", 1, 2, true},
	2:  {"Q4_0", 32, 18, true},
	3:  {"Q4_1", 32, 20, true},
	6:  {"Q5_0", 32, 22, true},
	7:  {"Q5_1", 32, 24, true},
	8:  {"Q8_0", 32, 34, true},
	9:  {"Q8_1", 32, 36, false},
	10: {"Q2_K", 256, 84, false},
	11: {"Q3_K", 256, 110, false},
	12: {"Q4_K", 256, 144, true},
	13: {"Q5_K", 256, 176, true},
	14: {"Q6_K", 256, 210, true},
	15: {"Q8_K", 256, 292, false},
	16: {"IQ2_XXS", 256, 66, false},
	17: {"IQ2_XS", 256, 74, false},
	18: {"IQ3_XXS", 256, 98, false},
	19: {"IQ1_S", 256, 50, false},
	20: {"IQ4_NL", 32, 18, false},
	21: {"IQ3_S", 256, 110, false},
	22: {"IQ2_S", 256, 82, false},
	23: {"IQ4_XS", 256, 136, false},
	24: {"I8", 1, 1, false},
	25: {"I16", 1, 2, false},
	26: {"I32", 1, 4, false},
	27: {"I64", 1, 8, false},
	28: {"F64", 1, 8, false},
	29: {"IQ1_M", 256, 56, false},
	30: {"BF16", 1, 2, true},
	34: {"TQ1_0", 256, 54, false},
	35: {"TQ2_0", 256, 66, false},
	39: {"MXFP4", 32, 17, false},
	40: {"NVFP4", 64, 36, false},
	41: {"Q1_0", 128, 18, false},
}

func (t GGMLType) String() string {
	if d, ok := typeInfo[t]; ok {
		return d.name
	}
	return fmt.Sprintf("type%d", uint32(t))
}

func supportedTypeNames() string {
	return "F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K, Q6_K"
}

// rowBytes is the storage size of n elements of type t.
func rowBytes(t GGMLType, n int) int {
	d := typeInfo[t]
	return n / d.blockSize * d.typeSize
}

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

func le16(b []byte) uint16 { return uint16(b[0]) | uint16(b[1])<<8 }

// ---- dequantisation ----

// dequantRow converts n elements of type t from src into dst.
func dequantRow(t GGMLType, src []byte, dst []float32) {
	n := len(dst)
	switch t {
	case TypeF32:
		copy(dst, bytesAsF32(src[:4*n]))
	case TypeF16:
		h := bytesAsU16(src[:2*n])
		for i := range dst {
			dst[i] = f16Table[h[i]]
		}
	case TypeBF16:
		h := bytesAsU16(src[:2*n])
		for i := range dst {
			dst[i] = bf16ToF32(h[i])
		}
	case TypeQ8_0:
		for b := 0; b < n/32; b++ {
			blk := src[b*34 : b*34+34]
			d := f16Table[le16(blk)]
			for j := 0; j < 32; j++ {
				dst[b*32+j] = float32(int8(blk[2+j])) * d
			}
		}
	case TypeQ4_0:
		for b := 0; b < n/32; b++ {
			blk := src[b*18 : b*18+18]
			d := f16Table[le16(blk)]
			for j := 0; j < 16; j++ {
				dst[b*32+j] = float32(int32(blk[2+j]&15)-8) * d
				dst[b*32+j+16] = float32(int32(blk[2+j]>>4)-8) * d
			}
		}
	case TypeQ4_1:
		for b := 0; b < n/32; b++ {
			blk := src[b*20 : b*20+20]
			d, m := f16Table[le16(blk)], f16Table[le16(blk[2:])]
			for j := 0; j < 16; j++ {
				dst[b*32+j] = float32(blk[4+j]&15)*d + m
				dst[b*32+j+16] = float32(blk[4+j]>>4)*d + m
			}
		}
	case TypeQ5_0:
		for b := 0; b < n/32; b++ {
			blk := src[b*22 : b*22+22]
			d := f16Table[le16(blk)]
			qh := uint32(blk[2]) | uint32(blk[3])<<8 | uint32(blk[4])<<16 | uint32(blk[5])<<24
			for j := 0; j < 16; j++ {
				h0 := byte((qh>>uint(j))<<4) & 0x10
				h1 := byte(qh>>uint(j+12)) & 0x10
				dst[b*32+j] = float32(int32(blk[6+j]&15|h0)-16) * d
				dst[b*32+j+16] = float32(int32(blk[6+j]>>4|h1)-16) * d
			}
		}
	case TypeQ5_1:
		for b := 0; b < n/32; b++ {
			blk := src[b*24 : b*24+24]
			d, m := f16Table[le16(blk)], f16Table[le16(blk[2:])]
			qh := uint32(blk[4]) | uint32(blk[5])<<8 | uint32(blk[6])<<16 | uint32(blk[7])<<24
			for j := 0; j < 16; j++ {
				h0 := byte((qh>>uint(j))<<4) & 0x10
				h1 := byte(qh>>uint(j+12)) & 0x10
				dst[b*32+j] = float32(blk[8+j]&15|h0)*d + m
				dst[b*32+j+16] = float32(blk[8+j]>>4|h1)*d + m
			}
		}
	case TypeQ4_K:
		for b := 0; b < n/256; b++ {
			blk := src[b*144 : b*144+144]
			d, dmin := f16Table[le16(blk)], f16Table[le16(blk[2:])]
			var sc, mn [8]uint8
			kScales(blk[4:16], &sc, &mn)
			qs := blk[16:144]
			out := dst[b*256:]
			for j := 0; j < 8; j++ {
				ds, dm := d*float32(sc[j]), dmin*float32(mn[j])
				q := qs[(j/2)*32:]
				shift := uint(4 * (j & 1))
				for l := 0; l < 32; l++ {
					out[j*32+l] = ds*float32((q[l]>>shift)&15) - dm
				}
			}
		}
	case TypeQ5_K:
		for b := 0; b < n/256; b++ {
			blk := src[b*176 : b*176+176]
			d, dmin := f16Table[le16(blk)], f16Table[le16(blk[2:])]
			var sc, mn [8]uint8
			kScales(blk[4:16], &sc, &mn)
			qh := blk[16:48]
			qs := blk[48:176]
			out := dst[b*256:]
			for j := 0; j < 8; j++ {
				ds, dm := d*float32(sc[j]), dmin*float32(mn[j])
				q := qs[(j/2)*32:]
				shift := uint(4 * (j & 1))
				for l := 0; l < 32; l++ {
					v := (q[l]>>shift)&15 | ((qh[l]>>uint(j))&1)<<4
					out[j*32+l] = ds*float32(v) - dm
				}
			}
		}
	case TypeQ6_K:
		for b := 0; b < n/256; b++ {
			blk := src[b*210 : b*210+210]
			ql, qh, scales := blk[0:128], blk[128:192], blk[192:208]
			d := f16Table[le16(blk[208:])]
			out := dst[b*256:]
			for e := 0; e < 256; e++ {
				out[e] = d * float32(int8(scales[e/16])) * float32(q6At(ql, qh, e))
			}
		}
	default:
		panic("dequantRow: unsupported type " + t.String())
	}
}

// q6At returns the signed 6-bit value of element e (0..255) of a Q6_K block.
func q6At(ql, qh []byte, e int) int32 {
	h, r := e/128, e%128
	lo := ql[h*64+r%64]
	if r >= 64 {
		lo >>= 4
	}
	hi := (qh[h*32+r%32] >> uint(2*(r/32))) & 3
	return int32(lo&15|hi<<4) - 32
}

// kScales unpacks the 6-bit scales and mins of a Q4_K/Q5_K block.
func kScales(q []byte, sc, mn *[8]uint8) {
	for j := 0; j < 4; j++ {
		sc[j] = q[j] & 63
		mn[j] = q[j+4] & 63
	}
	for j := 4; j < 8; j++ {
		sc[j] = q[j+4]&0xF | (q[j-4]>>6)<<4
		mn[j] = q[j+4]>>4 | (q[j]>>6)<<4
	}
}

func bytesAsF32(b []byte) []float32 {
	if len(b) == 0 {
		return nil
	}
	return unsafe.Slice((*float32)(unsafe.Pointer(&b[0])), len(b)/4)
}

func bytesAsU16(b []byte) []uint16 {
	if len(b) == 0 {
		return nil
	}
	return unsafe.Slice((*uint16)(unsafe.Pointer(&b[0])), len(b)/2)
}

func f32AsBytes(f []float32) []byte {
	if len(f) == 0 {
		return nil
	}
	return unsafe.Slice((*byte)(unsafe.Pointer(&f[0])), len(f)*4)
}

// ---- activations ----

// actKind says how activations are prepared for a weight type, following
// ggml's vec_dot_type: F32 stays F32, F16/BF16 round the activations to
// that type, the 32-blocks quantise to Q8_0 / Q8_1 and the K-quants to Q8_K.
type actKind int

const (
	actF32 actKind = iota
	actF16
	actBF16
	actQ8_0
	actQ8_1
	actQ8_K
)

func actKindFor(t GGMLType) actKind {
	switch t {
	case TypeF16:
		return actF16
	case TypeBF16:
		return actBF16
	case TypeQ8_0, TypeQ4_0, TypeQ5_0:
		return actQ8_0
	case TypeQ4_1, TypeQ5_1:
		return actQ8_1
	case TypeQ4_K, TypeQ5_K, TypeQ6_K:
		return actQ8_K
	}
	return actF32
}

// QAct holds up to maxRows activation rows prepared for one actKind.
type QAct struct {
	kind  actKind
	cols  int
	rows  int
	f     []float32 // actF32 (aliases the input), actF16/actBF16 (rounded copy)
	fbuf  []float32 // storage for the rounded copy
	qs    []int8    // quantised values
	d     []float32 // one scale per block
	s     []float32 // actQ8_1: d*sum(qs) per block
	bsums []int32   // actQ8_K: sums of 16-element groups
	isum  []int32   // actQ8_0/actQ8_1: sum of each block's quants
	// actQ8_0 with AVX2: groups of 4 rows interleaved per block for the
	// 4-token kernels (qs4: block b of row 4g+k at g*4*cols + 128*b + 32*k;
	// d4, ys4: the scales and isums, 4 per block); groups4 are valid.
	qs4     []int8
	d4      []float32
	ys4     []int32
	groups4 int
}

func newQAct(maxRows, maxCols int) *QAct {
	return &QAct{
		fbuf:  make([]float32, maxRows*maxCols),
		qs:    make([]int8, maxRows*maxCols),
		d:     make([]float32, maxRows*maxCols/32),
		s:     make([]float32, maxRows*maxCols/32),
		bsums: make([]int32, maxRows*maxCols/16),
		isum:  make([]int32, maxRows*maxCols/32),
		qs4:   make([]int8, maxRows*maxCols),
		d4:    make([]float32, maxRows*maxCols/32),
		ys4:   make([]int32, maxRows*maxCols/32),
	}
}

// prepare converts rows×cols activations x for a weight of type t.
func (a *QAct) prepare(t GGMLType, x []float32, rows, cols int) {
	a.setup(t, x, rows, cols)
	a.convert(x, 0, rows)
}

// setup readies a for rows×cols activations x for a weight of type t;
// convert then fills it in, a range of rows at a time.
func (a *QAct) setup(t GGMLType, x []float32, rows, cols int) {
	a.kind, a.rows, a.cols = actKindFor(t), rows, cols
	a.groups4 = 0
	switch a.kind {
	case actF32:
		a.f = x[:rows*cols]
	case actF16, actBF16:
		a.f = a.fbuf[:rows*cols]
	case actQ8_0:
		if useAVX2 {
			a.groups4 = rows / 4
		}
	}
}

// convert prepares rows [lo, hi) of x. Ranges start at multiples of 4, and
// end at one or at the last row, so that each 4-row group of the 4-token
// kernels is interleaved by the call that converts it.
func (a *QAct) convert(x []float32, lo, hi int) {
	i0, i1 := lo*a.cols, hi*a.cols
	switch a.kind {
	case actF16:
		roundF16(a.f[i0:i1], x[i0:i1])
	case actBF16:
		for i := i0; i < i1; i++ {
			a.f[i] = bf16ToF32(f32ToBF16(x[i]))
		}
	case actQ8_0, actQ8_1:
		b0, b1 := i0/32, i1/32
		if useAVX2 && b1 > b0 {
			// a.d and a.s get amax and sum in the kernel, then the scales
			quantQ8AVX2(&x[i0], &a.qs[i0], &a.d[b0], &a.isum[b0], b1-b0)
			for b := b0; b < b1; b++ {
				dd := a.d[b] / 127
				a.d[b] = f16Table[f32ToF16(dd)]
				a.s[b] = f16Table[f32ToF16(float32(a.isum[b])*dd)]
			}
			for g := lo / 4; g < hi/4 && g < a.groups4; g++ {
				a.interleave4(g)
			}
			return
		}
		for b := b0; b < b1; b++ {
			a.isum[b] = quantQ8Block(x[b*32:b*32+32], a.qs[b*32:b*32+32], &a.d[b], &a.s[b])
		}
	case actQ8_K:
		for b := i0 / 256; b < i1/256; b++ {
			quantQ8KBlock(x[b*256:b*256+256], a.qs[b*256:b*256+256], &a.d[b], a.bsums[b*16:b*16+16])
		}
	}
}

// quantQ8Block quantises 32 values like ggml's quantize_row_q8_0/q8_1
// (scale stored as fp16; s = d*sum for Q8_1, also fp16).
func quantQ8Block(x []float32, qs []int8, d, s *float32) int32 {
	x = x[:32]
	qs = qs[:32]
	var amax float32
	for _, v := range x {
		if v < 0 {
			v = -v
		}
		if v > amax {
			amax = v
		}
	}
	dd := amax / 127
	var id float32
	if amax != 0 {
		id = 127 / amax
	}
	sum := int32(0)
	for j, v := range x {
		q := int32(math.RoundToEven(float64(v * id)))
		qs[j] = int8(q)
		sum += q
	}
	*d = f16Table[f32ToF16(dd)]
	*s = f16Table[f32ToF16(float32(sum)*dd)]
	return sum
}

// quantQ8KBlock quantises 256 values like ggml's quantize_row_q8_K_ref.
func quantQ8KBlock(x []float32, qs []int8, d *float32, bsums []int32) {
	x = x[:256]
	qs = qs[:256]
	var amax, max float32
	for _, v := range x {
		av := v
		if av < 0 {
			av = -av
		}
		if av > amax {
			amax, max = av, v
		}
	}
	if amax == 0 {
		*d = 0
		for j := range qs {
			qs[j] = 0
		}
		for j := range bsums[:16] {
			bsums[j] = 0
		}
		return
	}
	iscale := -127 / max
	for j, v := range x {
		q := int32(math.RoundToEven(float64(iscale * v)))
		if q > 127 {
			q = 127
		}
		qs[j] = int8(q)
	}
	for j := 0; j < 16; j++ {
		s := int32(0)
		for _, q := range qs[j*16 : j*16+16] {
			s += int32(q)
		}
		bsums[j] = s
	}
	*d = 1 / iscale
}

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

func dotQ4_K(w []byte, qs []int8, d []float32, bsums []int32) float32 {
	nb := len(d)
	w = w[:nb*144]
	qs = qs[:nb*256]
	bsums = bsums[:nb*16]
	var sum float32
	var sc, mn [8]uint8
	for b := 0; b < nb; b++ {
		blk := (*[144]byte)(w[b*144 : b*144+144])
		kScales(blk[4:16], &sc, &mn)
		y := (*[256]int8)(qs[b*256 : b*256+256])
		bs := (*[16]int32)(bsums[b*16 : b*16+16])
		var msum, acc int32
		for j := 0; j < 8; j++ {
			msum += int32(mn[j]) * (bs[2*j] + bs[2*j+1])
		}
		for i := 0; i < 4; i++ {
			q := (*[32]byte)(blk[16+32*i : 48+32*i])
			y0 := (*[32]int8)(y[64*i : 64*i+32])
			y1 := (*[32]int8)(y[64*i+32 : 64*i+64])
			s0 := int32(q[0]&15)*int32(y0[0]) + int32(q[1]&15)*int32(y0[1]) + int32(q[2]&15)*int32(y0[2]) + int32(q[3]&15)*int32(y0[3]) + int32(q[4]&15)*int32(y0[4]) + int32(q[5]&15)*int32(y0[5]) + int32(q[6]&15)*int32(y0[6]) + int32(q[7]&15)*int32(y0[7]) + int32(q[8]&15)*int32(y0[8]) + int32(q[9]&15)*int32(y0[9]) + int32(q[10]&15)*int32(y0[10]) + int32(q[11]&15)*int32(y0[11]) + int32(q[12]&15)*int32(y0[12]) + int32(q[13]&15)*int32(y0[13]) + int32(q[14]&15)*int32(y0[14]) + int32(q[15]&15)*int32(y0[15]) + int32(q[16]&15)*int32(y0[16]) + int32(q[17]&15)*int32(y0[17]) + int32(q[18]&15)*int32(y0[18]) + int32(q[19]&15)*int32(y0[19]) + int32(q[20]&15)*int32(y0[20]) + int32(q[21]&15)*int32(y0[21]) + int32(q[22]&15)*int32(y0[22]) + int32(q[23]&15)*int32(y0[23]) + int32(q[24]&15)*int32(y0[24]) + int32(q[25]&15)*int32(y0[25]) + int32(q[26]&15)*int32(y0[26]) + int32(q[27]&15)*int32(y0[27]) + int32(q[28]&15)*int32(y0[28]) + int32(q[29]&15)*int32(y0[29]) + int32(q[30]&15)*int32(y0[30]) + int32(q[31]&15)*int32(y0[31])
			s1 := int32(q[0]>>4)*int32(y1[0]) + int32(q[1]>>4)*int32(y1[1]) + int32(q[2]>>4)*int32(y1[2]) + int32(q[3]>>4)*int32(y1[3]) + int32(q[4]>>4)*int32(y1[4]) + int32(q[5]>>4)*int32(y1[5]) + int32(q[6]>>4)*int32(y1[6]) + int32(q[7]>>4)*int32(y1[7]) + int32(q[8]>>4)*int32(y1[8]) + int32(q[9]>>4)*int32(y1[9]) + int32(q[10]>>4)*int32(y1[10]) + int32(q[11]>>4)*int32(y1[11]) + int32(q[12]>>4)*int32(y1[12]) + int32(q[13]>>4)*int32(y1[13]) + int32(q[14]>>4)*int32(y1[14]) + int32(q[15]>>4)*int32(y1[15]) + int32(q[16]>>4)*int32(y1[16]) + int32(q[17]>>4)*int32(y1[17]) + int32(q[18]>>4)*int32(y1[18]) + int32(q[19]>>4)*int32(y1[19]) + int32(q[20]>>4)*int32(y1[20]) + int32(q[21]>>4)*int32(y1[21]) + int32(q[22]>>4)*int32(y1[22]) + int32(q[23]>>4)*int32(y1[23]) + int32(q[24]>>4)*int32(y1[24]) + int32(q[25]>>4)*int32(y1[25]) + int32(q[26]>>4)*int32(y1[26]) + int32(q[27]>>4)*int32(y1[27]) + int32(q[28]>>4)*int32(y1[28]) + int32(q[29]>>4)*int32(y1[29]) + int32(q[30]>>4)*int32(y1[30]) + int32(q[31]>>4)*int32(y1[31])
			acc += int32(sc[2*i])*s0 + int32(sc[2*i+1])*s1
		}
		dd := f16Table[uint16(blk[0])|uint16(blk[1])<<8] * d[b]
		dm := f16Table[uint16(blk[2])|uint16(blk[3])<<8] * d[b]
		sum += dd*float32(acc) - dm*float32(msum)
	}
	return sum
}

func dotQ5_K(w []byte, qs []int8, d []float32, bsums []int32) float32 {
	nb := len(d)
	w = w[:nb*176]
	qs = qs[:nb*256]
	bsums = bsums[:nb*16]
	var sum float32
	var sc, mn [8]uint8
	for b := 0; b < nb; b++ {
		blk := (*[176]byte)(w[b*176 : b*176+176])
		kScales(blk[4:16], &sc, &mn)
		qh := (*[32]byte)(blk[16:48])
		y := (*[256]int8)(qs[b*256 : b*256+256])
		bs := (*[16]int32)(bsums[b*16 : b*16+16])
		var msum, acc int32
		for j := 0; j < 8; j++ {
			msum += int32(mn[j]) * (bs[2*j] + bs[2*j+1])
		}
		for i := 0; i < 4; i++ {
			q := (*[32]byte)(blk[48+32*i : 80+32*i])
			y0 := (*[32]int8)(y[64*i : 64*i+32])
			y1 := (*[32]int8)(y[64*i+32 : 64*i+64])
			sh0, sh1 := uint(2*i), uint(2*i+1)
			var s0, s1 int32
			for l := 0; l < 32; l++ {
				a, h := q[l], qh[l]
				s0 += int32(a&15|((h>>sh0)&1)<<4) * int32(y0[l])
				s1 += int32(a>>4|((h>>sh1)&1)<<4) * int32(y1[l])
			}
			acc += int32(sc[2*i])*s0 + int32(sc[2*i+1])*s1
		}
		dd := f16Table[uint16(blk[0])|uint16(blk[1])<<8] * d[b]
		dm := f16Table[uint16(blk[2])|uint16(blk[3])<<8] * d[b]
		sum += dd*float32(acc) - dm*float32(msum)
	}
	return sum
}

func dotQ6_K(w []byte, qs []int8, d []float32) float32 {
	nb := len(d)
	w = w[:nb*210]
	qs = qs[:nb*256]
	var sum float32
	for b := 0; b < nb; b++ {
		blk := (*[210]byte)(w[b*210 : b*210+210])
		y := (*[256]int8)(qs[b*256 : b*256+256])
		var acc int32
		for h := 0; h < 2; h++ {
			ql := (*[64]byte)(blk[64*h : 64*h+64])
			qh := (*[32]byte)(blk[128+32*h : 160+32*h])
			yy := (*[128]int8)(y[128*h : 128*h+128])
			sc := blk[192+8*h : 200+8*h]
			// four groups of 32: (ql low, qh>>0), (ql[32:] low, qh>>2),
			// (ql high, qh>>4), (ql[32:] high, qh>>6); each two 16-scales.
			var s [8]int32
			for l := 0; l < 32; l++ {
				hb := qh[l]
				q1 := int32(ql[l]&15|(hb&3)<<4) - 32
				q2 := int32(ql[l+32]&15|((hb>>2)&3)<<4) - 32
				q3 := int32(ql[l]>>4|((hb>>4)&3)<<4) - 32
				q4 := int32(ql[l+32]>>4|((hb>>6)&3)<<4) - 32
				k := l / 16
				s[k] += q1 * int32(yy[l])
				s[k+2] += q2 * int32(yy[l+32])
				s[k+4] += q3 * int32(yy[l+64])
				s[k+6] += q4 * int32(yy[l+96])
			}
			for k := 0; k < 8; k++ {
				acc += int32(int8(sc[k])) * s[k]
			}
		}
		sum += f16Table[uint16(blk[208])|uint16(blk[209])<<8] * d[b] * float32(acc)
	}
	return sum
}

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

// interleave4 lays out group g (rows 4g..4g+3) of the activations for the
// 4-token kernels.
func (a *QAct) interleave4(g int) {
	c := a.cols
	nb := c / 32
	for k := 0; k < 4; k++ {
		r := 4*g + k
		for b := 0; b < nb; b++ {
			copy(a.qs4[g*4*c+128*b+32*k:g*4*c+128*b+32*k+32], a.qs[r*c+32*b:r*c+32*b+32])
			a.d4[g*4*nb+4*b+k] = a.d[r*nb+b]
			a.ys4[g*4*nb+4*b+k] = a.isum[r*nb+b]
		}
	}
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
