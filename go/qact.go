package main

import "math"

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
