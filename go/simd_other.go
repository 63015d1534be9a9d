//go:build !amd64

package main

const useAVX2 = false

func spinPause() {}

func dotQ8_0AVX2(w *byte, qs *int8, d *float32, nb int) float32 { panic("no AVX2") }
func dotQ4_0AVX2(w *byte, qs *int8, d *float32, nb int) float32 { panic("no AVX2") }
func dotF16AVX2(w *uint16, x *float32, n int) float32           { panic("no AVX2") }
func dotF32AVX2(w *float32, x *float32, n int) float32          { panic("no AVX2") }
func axpyF16AVX2(out *float32, a float32, v *uint16, n int)     { panic("no AVX2") }

func matQ8_0AVX2(out *float32, w *byte, stride, nrows int, qs *int8, d *float32, nb int) {
	panic("no AVX2")
}
func matQ4_0AVX2(out *float32, w *byte, stride, nrows int, qs *int8, d *float32, nb int, ysum *int32) {
	panic("no AVX2")
}
func matF16AVX2(out *float32, w *uint16, stride, nrows int, x *float32, n int)  { panic("no AVX2") }
func matF32AVX2(out *float32, w *float32, stride, nrows int, x *float32, n int) { panic("no AVX2") }

func f32ToF16AVX2(dst *uint16, src *float32, n int) { panic("no AVX2") }
func roundF16AVX2(dst, src *float32, n int)         { panic("no AVX2") }
func wsumF16AVX2(out *float32, w *float32, v *uint16, stride, npos, n int) {
	panic("no AVX2")
}

func quantQ8AVX2(x *float32, qs *int8, amax *float32, isum *int32, nb int) { panic("no AVX2") }

func expAVX2(sc *float32, max float32, n int) int { panic("no AVX2") }

func matQ8_0x4AVX2(out *float32, ostride int, w *byte, stride, nrows int, y *int8, d *float32, ys *int32, nb int) {
	panic("no AVX2")
}
func matQ4_0x4AVX2(out *float32, ostride int, w *byte, stride, nrows int, y *int8, d *float32, ys *int32, nb int) {
	panic("no AVX2")
}
func matF16x4AVX2(out *float32, ostride int, w *uint16, stride, nrows int, x *float32, xstride, n int) {
	panic("no AVX2")
}

func siluMulAVX2(x, up *float32, n int) int { panic("no AVX2") }
