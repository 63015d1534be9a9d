package main

import (
	"fmt"
	"math"
	"math/rand"
	"os"
	"strconv"
	"testing"
)

// The AVX2 kernels give bit-identical results to the pure-Go fallbacks on
// random rows of every length class (odd block counts, lengths that are not
// a multiple of 8). (Assumes the default GOAMD64=v1, where Go does not fuse
// multiply-adds.)
func closeTo(got, want, scale float64) bool {
	_ = scale
	return got == want || math.IsNaN(got) && math.IsNaN(want)
}

func TestSIMDKernelsMatchGo(t *testing.T) {
	if !useAVX2 {
		t.Skip("no AVX2/FMA/F16C on this CPU")
	}
	rng := rand.New(rand.NewSource(7))
	for _, nb := range []int{1, 2, 3, 5, 12, 13, 32, 33} {
		n := nb * 32
		x := make([]float32, n)
		for i := range x {
			x[i] = float32(rng.NormFloat64())
		}
		for _, typ := range []GGMLType{TypeQ8_0, TypeQ4_0} {
			w := randomRow(rng, typ, n)
			a := newQAct(1, n)
			a.prepare(typ, x, 1, n)
			wf := make([]float32, n)
			dequantRow(typ, w, wf)
			var scale float64
			for i := range wf {
				scale += math.Abs(float64(wf[i]) * float64(a.qs[i]) * float64(a.d[i/32]))
			}
			var got, want float32
			if typ == TypeQ8_0 {
				got, want = dotQ8_0(w, a.qs[:n], a.d[:nb]), dotQ8_0Go(w, a.qs[:n], a.d[:nb])
			} else {
				got, want = dotQ4_0(w, a.qs[:n], a.d[:nb], a.isum[:nb]), dotQ4_0Go(w, a.qs[:n], a.d[:nb], a.isum[:nb])
			}
			if !closeTo(float64(got), float64(want), scale) {
				t.Errorf("%s nb=%d: avx2 %g, go %g", typ, nb, got, want)
			}
		}
	}
	// extreme int8 weights (-128, 127) against extreme activations
	w := make([]byte, 3*34)
	qs := make([]int8, 3*32)
	d := []float32{1, 0.5, 2}
	for b := 0; b < 3; b++ {
		h := f32ToF16(0.25)
		w[b*34], w[b*34+1] = byte(h), byte(h>>8)
		for j := 0; j < 32; j++ {
			w[b*34+2+j] = []byte{0x80, 0x7f, 0x81, 0}[j%4]
			qs[b*32+j] = []int8{127, -127, 127, -127, 5}[(j+b)%5]
		}
	}
	if got, want := dotQ8_0(w, qs, d), dotQ8_0Go(w, qs, d); got != want {
		t.Errorf("Q8_0 extremes: avx2 %g, go %g", got, want)
	}
	for _, n := range []int{1, 7, 8, 9, 31, 32, 33, 64, 100, 384, 1027} {
		x := make([]float32, n)
		w32 := make([]float32, n)
		w16 := make([]uint16, n)
		var scale float64
		for i := range x {
			x[i] = float32(rng.NormFloat64())
			w32[i] = float32(rng.NormFloat64())
			w16[i] = f32ToF16(w32[i])
			scale += math.Abs(float64(x[i] * w32[i]))
		}
		if got, want := dotF32(w32, x), dotF32Go(w32, x); !closeTo(float64(got), float64(want), scale) {
			t.Errorf("F32 n=%d: avx2 %g, go %g", n, got, want)
		}
		if got, want := dotF16(w16, x), dotF16Go(w16, x); !closeTo(float64(got), float64(want), scale) {
			t.Errorf("F16 n=%d: avx2 %g, go %g", n, got, want)
		}
		out := make([]float32, n)
		ref := make([]float32, n)
		for i := range out {
			out[i] = float32(rng.NormFloat64())
			ref[i] = out[i]
		}
		axpyF16(out, 0.37, w16)
		for i := range ref {
			ref[i] += 0.37 * f16Table[w16[i]]
			if out[i] != ref[i] {
				t.Fatalf("axpyF16 n=%d i=%d: %g, want %g", n, i, out[i], ref[i])
			}
		}
	}
}

// BenchmarkDecode times single-token decode steps on the GGUF named by
// NANOLLAMA_BENCH_MODEL (skipped when unset), e.g. for -cpuprofile:
//
//	NANOLLAMA_BENCH_MODEL=/path/nano-Q8_0.gguf go test -run X -bench Decode -cpuprofile cpu.out
func BenchmarkDecode(b *testing.B) {
	path := os.Getenv("NANOLLAMA_BENCH_MODEL")
	if path == "" {
		b.Skip("NANOLLAMA_BENCH_MODEL not set")
	}
	threads := 1
	if v, err := strconv.Atoi(os.Getenv("NANOLLAMA_BENCH_THREADS")); err == nil {
		threads = v
	}
	m, err := LoadModel(path, threads)
	if err != nil {
		b.Fatal(err)
	}
	s := m.NewSession(1024, false)
	prompt := make([]int32, 128)
	for i := range prompt {
		prompt[i] = int32(259 + i*97%(m.Cfg.Vocab-259))
	}
	if _, err := s.Forward(prompt, nil); err != nil {
		b.Fatal(err)
	}
	b.ResetTimer()
	tok := []int32{300}
	for i := 0; i < b.N; i++ {
		if s.Pos >= 256 {
			s.Truncate(128)
		}
		if _, err := s.Forward(tok, nil); err != nil {
			b.Fatal(err)
		}
	}
}

// matRows (the AVX2 row-loop kernels) equals dotRow row by row, bit for bit.
func TestMatRowsMatchesDotRow(t *testing.T) {
	if !useAVX2 {
		t.Skip("no AVX2/FMA/F16C on this CPU")
	}
	rng := rand.New(rand.NewSource(3))
	for _, typ := range []GGMLType{TypeQ8_0, TypeQ4_0, TypeF16, TypeF32} {
		for _, nb := range []int{1, 3, 4, 5, 8, 12, 13} {
			cols, rows, toks := nb*32, 7, 3
			if typ == TypeF16 || typ == TypeF32 {
				cols = nb*8 + 32*(nb%2)
			}
			rb := rowBytes(typ, cols)
			data := make([]byte, 0, rows*rb)
			for r := 0; r < rows; r++ {
				data = append(data, randomRow(rng, typ, cols)...)
			}
			x := make([]float32, toks*cols)
			for i := range x {
				x[i] = float32(rng.NormFloat64())
			}
			a := newQAct(toks, cols)
			a.prepare(typ, x, toks, cols)
			for tok := 0; tok < toks; tok++ {
				out := make([]float32, rows)
				if !matRows(typ, data, rb, 2, rows, a, tok, out[2:]) {
					t.Fatalf("%s: no kernel", typ)
				}
				for r := 2; r < rows; r++ {
					if want := dotRow(typ, data[r*rb:(r+1)*rb], a, tok); out[r] != want {
						t.Errorf("%s cols=%d tok=%d row %d: %g, want %g", typ, cols, tok, r, out[r], want)
					}
				}
			}
		}
	}
}

// The F16C conversions round exactly as f32ToF16, over every exponent,
// subnormals, ties, infinities and NaNs; wsumF16 equals repeated axpyF16.
func TestF16ConversionsAndWeightedSum(t *testing.T) {
	if !useAVX2 {
		t.Skip("no AVX2/FMA/F16C on this CPU")
	}
	rng := rand.New(rand.NewSource(5))
	const n = 1 << 16
	src := make([]float32, n+5)
	for i := range src {
		b := rng.Uint32()
		switch i % 4 {
		case 1: // near the fp16 range: exponents 100..145
			b = b&0x807fffff | uint32(100+rng.Intn(46))<<23
		case 2: // ties
			b = b&0xffffe000 | 0x1000
		case 3:
			b = b&0x807fffff | uint32(100+rng.Intn(46))<<23&^0x1fff | 0x1000
		}
		src[i] = math.Float32frombits(b)
	}
	src[0], src[1], src[2] = float32(math.Inf(1)), float32(math.NaN()), 65520
	h := make([]uint16, len(src))
	f32sToF16(h, src)
	r := make([]float32, len(src))
	roundF16(r, src)
	for i, v := range src {
		want := f32ToF16(v)
		if h[i] != want && !(v != v && h[i]&0x7e00 == 0x7e00) {
			t.Fatalf("f32sToF16(%g = %#08x) = %#04x, want %#04x", v, math.Float32bits(v), h[i], want)
		}
		if w := f16Table[want]; r[i] != w && !(v != v && r[i] != r[i]) {
			t.Fatalf("roundF16(%g) = %g, want %g", v, r[i], w)
		}
	}
	for _, hd := range []int{32, 64, 96, 128} {
		for _, npos := range []int{1, 2, 7, 40} {
			stride := hd + 32 // elements between rows, as a KV cache with several heads
			v := make([]uint16, npos*stride)
			for i := range v {
				v[i] = f32ToF16(float32(rng.NormFloat64()))
			}
			w := make([]float32, npos)
			for i := range w {
				w[i] = f16Table[f32ToF16(rng.Float32())]
			}
			got := make([]float32, hd)
			wsumF16AVX2(&got[0], &w[0], &v[16], 2*stride, npos, hd)
			want := make([]float32, hd)
			for p := range w {
				axpyF16(want, w[p], v[p*stride+16:p*stride+16+hd])
			}
			for i := range got {
				if got[i] != want[i] {
					t.Fatalf("wsumF16 hd=%d npos=%d [%d] = %g, want %g", hd, npos, i, got[i], want[i])
				}
			}
		}
	}
}

func BenchmarkMatRows(b *testing.B) {
	rng := rand.New(rand.NewSource(1))
	const cols = 384
	for _, typ := range []GGMLType{TypeQ8_0, TypeQ4_0, TypeF16} {
		for _, rows := range []int{1024, 32000} {
			rb := rowBytes(typ, cols)
			data := make([]byte, 0, rows*rb)
			row := randomRow(rng, typ, cols)
			for r := 0; r < rows; r++ {
				data = append(data, row...)
			}
			x := make([]float32, cols)
			for i := range x {
				x[i] = float32(rng.NormFloat64())
			}
			a := newQAct(1, cols)
			a.prepare(typ, x, 1, cols)
			out := make([]float32, rows)
			b.Run(fmt.Sprintf("%s/%d", typ, rows), func(b *testing.B) {
				b.SetBytes(int64(rows * cols)) // "MB/s" = million multiply-adds per second
				for i := 0; i < b.N; i++ {
					if !matRows(typ, data, rb, 0, rows, a, 0, out) {
						b.Fatal("no kernel")
					}
				}
			})
		}
	}
}

// The AVX2 activation quantisation equals quantQ8Block, including zero
// blocks and values at rounding ties.
func TestQuantQ8MatchesGo(t *testing.T) {
	if !useAVX2 {
		t.Skip("no AVX2/FMA/F16C on this CPU")
	}
	rng := rand.New(rand.NewSource(9))
	const nb = 41
	x := make([]float32, nb*32)
	for i := range x {
		x[i] = float32(rng.NormFloat64()) * float32(math.Pow(10, float64(rng.Intn(7)-3)))
	}
	for i := 64; i < 96; i++ { // a zero block
		x[i] = 0
	}
	for i := 96; i < 128; i++ { // ties: amax 127 → id 1, x.5 values
		x[i] = float32(i-112) + 0.5
	}
	x[96] = 127
	for _, kind := range []GGMLType{TypeQ8_0, TypeQ4_1} {
		a := newQAct(1, len(x))
		a.prepare(kind, x, 1, len(x))
		for b := 0; b < nb; b++ {
			qs := make([]int8, 32)
			var d, s float32
			sum := quantQ8Block(x[b*32:b*32+32], qs, &d, &s)
			if d != a.d[b] || s != a.s[b] || sum != a.isum[b] {
				t.Fatalf("block %d: d %g/%g s %g/%g sum %d/%d", b, a.d[b], d, a.s[b], s, a.isum[b], sum)
			}
			for j := range qs {
				if qs[j] != a.qs[b*32+j] {
					t.Fatalf("block %d q[%d] = %d, want %d", b, j, a.qs[b*32+j], qs[j])
				}
			}
		}
	}
}

// expAVX2 reproduces math.Exp bit for bit (it is Go's own amd64 algorithm)
// and stops at arguments it does not handle.
func TestExpMatchesMathExp(t *testing.T) {
	if !useAVX2 {
		t.Skip("no AVX2/FMA/F16C on this CPU")
	}
	rng := rand.New(rand.NewSource(11))
	const n = 1 << 16
	sc := make([]float32, n)
	for i := range sc {
		switch i % 3 {
		case 0:
			sc[i] = -rng.Float32() * 5
		case 1:
			sc[i] = -rng.Float32() * 697
		default:
			sc[i] = float32(rng.NormFloat64())
		}
	}
	const max = 2.5
	want := make([]float32, n)
	for i, v := range sc {
		want[i] = float32(math.Exp(float64(v - max)))
	}
	got := append([]float32(nil), sc...)
	if k := expAVX2(&got[0], max, n); k != n {
		t.Fatalf("did %d of %d", k, n)
	}
	for i := range got {
		if got[i] != want[i] {
			t.Fatalf("exp(%g) = %g, want %g", sc[i]-max, got[i], want[i])
		}
	}
	edge := []float32{0, -1, -800, 0, 0, 0, 0, 0}
	if k := expAVX2(&edge[0], 0, len(edge)); k != 0 {
		t.Fatalf("did %d elements past an argument below -700", k)
	}
}

// The 4-token kernels equal dotRow for every (row, token), bit for bit.
func TestMatRows4MatchesDotRow(t *testing.T) {
	if !useAVX2 {
		t.Skip("no AVX2/FMA/F16C on this CPU")
	}
	rng := rand.New(rand.NewSource(4))
	for _, typ := range []GGMLType{TypeQ8_0, TypeQ4_0, TypeF16} {
		for _, nb := range []int{1, 3, 12} {
			cols, rows, toks := nb*32, 9, 11
			rb := rowBytes(typ, cols)
			data := make([]byte, 0, rows*rb)
			for r := 0; r < rows; r++ {
				data = append(data, randomRow(rng, typ, cols)...)
			}
			x := make([]float32, toks*cols)
			for i := range x {
				x[i] = float32(rng.NormFloat64())
			}
			a := newQAct(toks, cols)
			a.prepare(typ, x, toks, cols)
			out := make([]float32, toks*rows)
			for lo := 0; lo < 2; lo++ { // an odd and an even number of rows
				for i := range out {
					out[i] = float32(math.NaN())
				}
				for tok := 0; tok+4 <= toks; tok += 4 {
					if !matRows4(typ, data, rb, lo, rows, a, tok, out[tok*rows+lo:], rows) {
						t.Fatalf("%s: no kernel", typ)
					}
					for k := 0; k < 4; k++ {
						for r := lo; r < rows; r++ {
							if want := dotRow(typ, data[r*rb:(r+1)*rb], a, tok+k); out[(tok+k)*rows+r] != want {
								t.Fatalf("%s nb=%d lo=%d tok=%d row %d: %g, want %g", typ, nb, lo, tok+k, r, out[(tok+k)*rows+r], want)
							}
						}
					}
				}
			}
			if matRows4(typ, data, rb, 1, rows, a, 8, out[8*rows+1:], rows) {
				t.Fatalf("%s: ran past the last complete group", typ)
			}
		}
	}
}

// BenchmarkPrefill times a 128-token prompt on NANOLLAMA_BENCH_MODEL.
func BenchmarkPrefill(b *testing.B) {
	path := os.Getenv("NANOLLAMA_BENCH_MODEL")
	if path == "" {
		b.Skip("NANOLLAMA_BENCH_MODEL not set")
	}
	m, err := LoadModel(path, 1)
	if err != nil {
		b.Fatal(err)
	}
	s := m.NewSession(1024, false)
	prompt := make([]int32, 128)
	for i := range prompt {
		prompt[i] = int32(259 + i*97%(m.Cfg.Vocab-259))
	}
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		s.Reset()
		if _, err := s.Forward(prompt, nil); err != nil {
			b.Fatal(err)
		}
	}
}

func TestSiluMulMatchesGo(t *testing.T) {
	rng := rand.New(rand.NewSource(12))
	const n = 1 << 15
	g := make([]float32, n)
	up := make([]float32, n)
	for i := range g {
		g[i] = float32(rng.NormFloat64()) * float32(math.Pow(10, float64(rng.Intn(5)-2)))
		up[i] = float32(rng.NormFloat64())
	}
	g[5], g[100], g[200] = 800, -800, 90 // outside the kernel's range; exp overflow in float32
	want := make([]float32, n)
	for i, x := range g {
		want[i] = x / (1 + float32(math.Exp(float64(-x)))) * up[i]
	}
	siluMul(g, up)
	for i := range g {
		if g[i] != want[i] && !(g[i] != g[i] && want[i] != want[i]) {
			t.Fatalf("silu[%d] = %g, want %g", i, g[i], want[i])
		}
	}
}
