//go:build amd64

package main

import "os"

// AVX2 + FMA + F16C kernels (simd_amd64.s); the pure-Go versions (dot.go,
// float16.go, qact.go, ...) remain the fallback on other CPUs and architectures.

func cpuid(eaxArg, ecxArg uint32) (eax, ebx, ecx, edx uint32)
func xgetbv() (eax, edx uint32)

// spinPause is one PAUSE: it tells the core (and a hypervisor watching for
// spinning virtual CPUs) that the caller is in a polling loop.
func spinPause()

// useAVX2 is true when the CPU and OS support AVX2, FMA and F16C, unless
// NANOLLAMA_NOSIMD is set (to run the pure-Go code, e.g. in tests).
var useAVX2 = detectAVX2() && os.Getenv("NANOLLAMA_NOSIMD") == ""

func detectAVX2() bool {
	maxID, _, _, _ := cpuid(0, 0)
	if maxID < 7 {
		return false
	}
	_, _, c1, _ := cpuid(1, 0)
	const fma, osxsave, avx, f16c = 1 << 12, 1 << 27, 1 << 28, 1 << 29
	if c1&(fma|osxsave|avx|f16c) != fma|osxsave|avx|f16c {
		return false
	}
	if xcr0, _ := xgetbv(); xcr0&6 != 6 { // XMM and YMM state enabled by the OS
		return false
	}
	_, b7, _, _ := cpuid(7, 0)
	return b7&(1<<5) != 0
}

// dotQ8_0AVX2 is the Q8_0 weight row w (nb blocks of 34 bytes) against
// Q8_0 activations qs (nb*32 int8) with block scales d.
//
//go:noescape
func dotQ8_0AVX2(w *byte, qs *int8, d *float32, nb int) float32

// dotQ4_0AVX2 is the same for a Q4_0 weight row (nb blocks of 18 bytes).
//
//go:noescape
func dotQ4_0AVX2(w *byte, qs *int8, d *float32, nb int) float32

// dotF16AVX2 is sum w[i]*x[i] over the first n&^7 elements.
//
//go:noescape
func dotF16AVX2(w *uint16, x *float32, n int) float32

// dotF32AVX2 is sum w[i]*x[i] over the first n&^7 elements.
//
//go:noescape
func dotF32AVX2(w *float32, x *float32, n int) float32

// axpyF16AVX2 does out[i] += a*v[i] over the first n&^7 elements.
//
//go:noescape
func axpyF16AVX2(out *float32, a float32, v *uint16, n int)

// The mat* kernels write out[r] = dot(row r, x) for nrows consecutive weight
// rows stride bytes apart, with the same arithmetic as the dot kernels.

//go:noescape
func matQ8_0AVX2(out *float32, w *byte, stride, nrows int, qs *int8, d *float32, nb int)

//go:noescape
func matQ4_0AVX2(out *float32, w *byte, stride, nrows int, qs *int8, d *float32, nb int, ysum *int32)

//go:noescape
func matF16AVX2(out *float32, w *uint16, stride, nrows int, x *float32, n int)

//go:noescape
func matF32AVX2(out *float32, w *float32, stride, nrows int, x *float32, n int)

//go:noescape
func f32ToF16AVX2(dst *uint16, src *float32, n int)

//go:noescape
func roundF16AVX2(dst, src *float32, n int)

//go:noescape
func wsumF16AVX2(out *float32, w *float32, v *uint16, stride, npos, n int)

//go:noescape
func quantQ8AVX2(x *float32, qs *int8, amax *float32, isum *int32, nb int)

//go:noescape
func expAVX2(sc *float32, max float32, n int) int

// The x4 kernels do the mat* work for 4 tokens at once: out[k*ostride/4+r]
// for token k (see QAct.interleave4 for the Q8 activation layout).

//go:noescape
func matQ8_0x4AVX2(out *float32, ostride int, w *byte, stride, nrows int, y *int8, d *float32, ys *int32, nb int)

//go:noescape
func matQ4_0x4AVX2(out *float32, ostride int, w *byte, stride, nrows int, y *int8, d *float32, ys *int32, nb int)

//go:noescape
func matF16x4AVX2(out *float32, ostride int, w *uint16, stride, nrows int, x *float32, xstride, n int)

//go:noescape
func siluMulAVX2(x, up *float32, n int) int
