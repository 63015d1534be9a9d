package main

import (
	"math"
	"math/rand"
	"testing"
)

func TestF16RoundTrip(t *testing.T) {
	for _, tc := range []struct {
		in   float32
		want uint16
	}{
		{0, 0x0000}, {1, 0x3c00}, {-2, 0xc000}, {65504, 0x7bff}, {1e6, 0x7c00},
		{float32(math.Inf(-1)), 0xfc00}, {5.960464477539063e-08, 0x0001}, {1e-9, 0},
		{0.333333343, 0x3555}, {1.00048828125, 0x3c00}, // tie rounds to even
	} {
		if got := f32ToF16(tc.in); got != tc.want {
			t.Errorf("f32ToF16(%g) = %#04x, want %#04x", tc.in, got, tc.want)
		}
	}
	for h := 0; h < 1<<16; h++ {
		f := f16ToF32(uint16(h))
		if f != f { // NaN
			continue
		}
		if got := f32ToF16(f); got != uint16(h) && !(f == 0 && got&0x7fff == 0) {
			t.Fatalf("round trip of %#04x gave %#04x", h, got)
		}
	}
	if f32ToBF16(1.00390625) != 0x3f80 || bf16ToF32(0x3f80) != 1 {
		t.Error("bf16 rounding")
	}
}

// randomBlocks fills a row of type typ with random bytes whose fp16 scales
// are small and finite.
func randomRow(rng *rand.Rand, typ GGMLType, n int) []byte {
	b := make([]byte, rowBytes(typ, n))
	rng.Read(b)
	d := typeInfo[typ]
	put := func(off int, v float32) {
		h := f32ToF16(v)
		b[off], b[off+1] = byte(h), byte(h>>8)
	}
	for blk := 0; blk < n/d.blockSize; blk++ {
		o := blk * d.typeSize
		switch typ {
		case TypeF32:
			f := bytesAsF32(b[o : o+4])
			f[0] = float32(rng.NormFloat64())
		case TypeF16:
			put(o, float32(rng.NormFloat64()))
		case TypeBF16:
			h := f32ToBF16(float32(rng.NormFloat64()))
			b[o], b[o+1] = byte(h), byte(h>>8)
		case TypeQ8_0, TypeQ4_0, TypeQ5_0:
			put(o, 0.01+0.01*rng.Float32())
		case TypeQ4_1, TypeQ5_1, TypeQ4_K, TypeQ5_K:
			put(o, 0.01+0.01*rng.Float32())
			put(o+2, 0.01*rng.Float32())
		case TypeQ6_K:
			put(o+208, 0.001+0.001*rng.Float32())
		}
	}
	return b
}

// The fused dot products equal the dot product of the dequantised weights
// with the dequantised (quantised) activations.
func TestFusedDotMatchesDequant(t *testing.T) {
	rng := rand.New(rand.NewSource(1))
	const n = 512
	for _, typ := range []GGMLType{TypeF32, TypeF16, TypeBF16, TypeQ8_0, TypeQ4_0, TypeQ4_1, TypeQ5_0, TypeQ5_1, TypeQ4_K, TypeQ5_K, TypeQ6_K} {
		t.Run(typ.String(), func(t *testing.T) {
			w := randomRow(rng, typ, n)
			wf := make([]float32, n)
			dequantRow(typ, w, wf)
			x := make([]float32, n)
			for i := range x {
				x[i] = float32(rng.NormFloat64())
			}
			a := newQAct(1, n)
			a.prepare(typ, x, 1, n)
			// The activations as the kernel sees them.
			xa := make([]float32, n)
			switch a.kind {
			case actF32, actF16, actBF16:
				copy(xa, a.f)
			case actQ8_0, actQ8_1:
				for i := range xa {
					xa[i] = float32(a.qs[i]) * a.d[i/32]
				}
			case actQ8_K:
				for i := range xa {
					xa[i] = float32(a.qs[i]) * a.d[i/256]
				}
			}
			var want, scale float64
			for i := range wf {
				want += float64(wf[i]) * float64(xa[i])
				scale += math.Abs(float64(wf[i]) * float64(xa[i]))
			}
			got := float64(dotRow(typ, w, a, 0))
			if math.Abs(got-want) > 1e-4*scale+1e-6 {
				t.Errorf("dot = %g, dequantised dot = %g", got, want)
			}
			// and the quantised activations are close to the originals
			var err, norm float64
			for i := range x {
				err += math.Abs(float64(x[i] - xa[i]))
				norm += math.Abs(float64(x[i]))
			}
			if err > 0.02*norm {
				t.Errorf("activation quantisation error %g of %g", err, norm)
			}
		})
	}
}

func TestDequantKnownBlocks(t *testing.T) {
	// Q8_0: d = 0.5, q = -3 → -1.5
	blk := make([]byte, 34)
	h := f32ToF16(0.5)
	blk[0], blk[1] = byte(h), byte(h>>8)
	for i := range blk[2:] {
		blk[2+i] = 0xfd // int8(-3)
	}
	out := make([]float32, 32)
	dequantRow(TypeQ8_0, blk, out)
	for _, v := range out {
		if v != -1.5 {
			t.Fatalf("Q8_0 dequant = %v", out)
		}
	}
	// Q4_0: nibble 0x9 → (9-8)*d, high nibble 0x2 → (2-8)*d
	q4 := make([]byte, 18)
	q4[0], q4[1] = byte(h), byte(h>>8)
	for i := 2; i < 18; i++ {
		q4[i] = 0x29
	}
	dequantRow(TypeQ4_0, q4, out)
	if out[0] != 0.5 || out[16] != -3 {
		t.Fatalf("Q4_0 dequant = %v", out)
	}
}

func BenchmarkDot(b *testing.B) {
	rng := rand.New(rand.NewSource(1))
	const n = 1024
	for _, typ := range []GGMLType{TypeF32, TypeF16, TypeQ8_0, TypeQ4_0, TypeQ4_K, TypeQ6_K} {
		w := randomRow(rng, typ, n)
		x := make([]float32, n)
		for i := range x {
			x[i] = float32(rng.NormFloat64())
		}
		a := newQAct(1, n)
		a.prepare(typ, x, 1, n)
		b.Run(typ.String(), func(b *testing.B) {
			b.SetBytes(n) // "MB/s" reads as million multiply-adds per second
			for i := 0; i < b.N; i++ {
				dotRow(typ, w, a, 0)
			}
		})
	}
}
