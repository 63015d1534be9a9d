//go:build amd64

#include "textflag.h"

// func cpuid(eaxArg, ecxArg uint32) (eax, ebx, ecx, edx uint32)
TEXT ·cpuid(SB), NOSPLIT, $0-24
	MOVL eaxArg+0(FP), AX
	MOVL ecxArg+4(FP), CX
	CPUID
	MOVL AX, eax+8(FP)
	MOVL BX, ebx+12(FP)
	MOVL CX, ecx+16(FP)
	MOVL DX, edx+20(FP)
	RET

// func xgetbv() (eax, edx uint32)
TEXT ·xgetbv(SB), NOSPLIT, $0-8
	MOVL $0, CX
	XGETBV
	MOVL AX, eax+0(FP)
	MOVL DX, edx+4(FP)
	RET

// BSCALE loads the fp16 weight scale at wo(SI), multiplies it by the
// activation scale at do(DX) and leaves the product in X1.
#define BSCALE(wo, do) \
	MOVWLZX   wo(SI), AX; \
	VMOVD     AX, X1; \
	VCVTPH2PS X1, X1; \
	VMULSS    do(DX), X1, X1

// I8DOT multiplies the signed bytes of Y2 (weights) by those of Y3
// (activations) with ggml's sign trick (VPSIGNB, VPMADDUBSW, VPMADDWD),
// sums the 32 products exactly into an int32, and does
// X0 += X1 * float32(that) in float32, as the Go code does. Needs Y15 = 1s
// as int16; clobbers Y4, Y5.
#define I8DOT \
	VPSIGNB      Y2, Y2, Y4; \
	VPSIGNB      Y2, Y3, Y5; \
	VPMADDUBSW   Y5, Y4, Y4; \
	VPMADDWD     Y15, Y4, Y4; \
	VEXTRACTI128 $1, Y4, X5; \
	VPADDD       X5, X4, X4; \
	VPSHUFD      $0x4e, X4, X5; \
	VPADDD       X5, X4, X4; \
	VPSHUFD      $0xb1, X4, X5; \
	VPADDD       X5, X4, X4; \
	VCVTDQ2PS    X4, X4; \
	VMULSS       X4, X1, X1; \
	VADDSS       X1, X0, X0

#define ONES16 \
	MOVL         $0x00010001, AX; \
	VMOVD        AX, X15; \
	VPBROADCASTD X15, Y15

// func dotQ8_0AVX2(w *byte, qs *int8, d *float32, nb int) float32
TEXT ·dotQ8_0AVX2(SB), NOSPLIT, $0-36
	MOVQ w+0(FP), SI
	MOVQ qs+8(FP), DI
	MOVQ d+16(FP), DX
	MOVQ nb+24(FP), CX
	ONES16
	VXORPS X0, X0, X0

q8loop:
	BSCALE(0, 0)
	VMOVDQU 2(SI), Y2
	VMOVDQU (DI), Y3
	I8DOT
	ADDQ    $34, SI
	ADDQ    $32, DI
	ADDQ    $4, DX
	DECQ    CX
	JNZ     q8loop
	VZEROUPPER
	MOVSS   X0, ret+32(FP)
	RET

// Q4UNPACK puts the 32 nibbles of the Q4_0 block at wo(SI), minus 8, into
// Y2 as signed bytes (low nibbles first). Needs Y14 = 0x0f bytes, Y13 = 8s.
#define Q4UNPACK(wo) \
	VMOVDQU     wo(SI), X2; \
	VPSRLW      $4, X2, X3; \
	VINSERTI128 $1, X3, Y2, Y2; \
	VPAND       Y14, Y2, Y2; \
	VPSUBB      Y13, Y2, Y2

// func dotQ4_0AVX2(w *byte, qs *int8, d *float32, nb int) float32
TEXT ·dotQ4_0AVX2(SB), NOSPLIT, $0-36
	MOVQ w+0(FP), SI
	MOVQ qs+8(FP), DI
	MOVQ d+16(FP), DX
	MOVQ nb+24(FP), CX
	ONES16
	MOVL         $0x0f0f0f0f, AX
	VMOVD        AX, X14
	VPBROADCASTD X14, Y14
	MOVL         $0x08080808, AX
	VMOVD        AX, X13
	VPBROADCASTD X13, Y13
	VXORPS       X0, X0, X0

q4loop:
	BSCALE(0, 0)
	Q4UNPACK(2)
	VMOVDQU (DI), Y3
	I8DOT
	ADDQ    $18, SI
	ADDQ    $32, DI
	ADDQ    $4, DX
	DECQ    CX
	JNZ     q4loop
	VZEROUPPER
	MOVSS   X0, ret+32(FP)
	RET

// HSUM8 reduces the 8 lane sums s0..s7 in Y0 the way the Go code does:
// ((s0+s4) + (s1+s5)) + ((s2+s6) + (s3+s7)), result in X0.
#define HSUM8 \
	VEXTRACTF128 $1, Y0, X1; \
	VADDPS       X1, X0, X0; \
	VHADDPS      X0, X0, X0; \
	VHADDPS      X0, X0, X0

// func dotF16AVX2(w *uint16, x *float32, n int) float32
// n is a positive multiple of 8; lane j of Y0 accumulates the products of
// the elements i with i%8 == j, multiply then add (no FMA), as dotF16Go.
TEXT ·dotF16AVX2(SB), NOSPLIT, $0-28
	MOVQ   w+0(FP), SI
	MOVQ   x+8(FP), DI
	MOVQ   n+16(FP), CX
	VXORPS Y0, Y0, Y0

h32:
	CMPQ      CX, $32
	JLT       h8
	VCVTPH2PS (SI), Y4
	VCVTPH2PS 16(SI), Y5
	VCVTPH2PS 32(SI), Y6
	VCVTPH2PS 48(SI), Y7
	VMULPS    (DI), Y4, Y4
	VMULPS    32(DI), Y5, Y5
	VMULPS    64(DI), Y6, Y6
	VMULPS    96(DI), Y7, Y7
	VADDPS    Y4, Y0, Y0
	VADDPS    Y5, Y0, Y0
	VADDPS    Y6, Y0, Y0
	VADDPS    Y7, Y0, Y0
	ADDQ      $64, SI
	ADDQ      $128, DI
	SUBQ      $32, CX
	JMP       h32

h8:
	CMPQ      CX, $8
	JLT       hdone
	VCVTPH2PS (SI), Y4
	VMULPS    (DI), Y4, Y4
	VADDPS    Y4, Y0, Y0
	ADDQ      $16, SI
	ADDQ      $32, DI
	SUBQ      $8, CX
	JMP       h8

hdone:
	HSUM8
	VZEROUPPER
	MOVSS X0, ret+24(FP)
	RET

// func dotF32AVX2(w *float32, x *float32, n int) float32
// As dotF16AVX2 for float32 weights (dotF32Go's order).
TEXT ·dotF32AVX2(SB), NOSPLIT, $0-28
	MOVQ   w+0(FP), SI
	MOVQ   x+8(FP), DI
	MOVQ   n+16(FP), CX
	VXORPS Y0, Y0, Y0

f32:
	CMPQ    CX, $32
	JLT     f8
	VMOVUPS (SI), Y4
	VMOVUPS 32(SI), Y5
	VMOVUPS 64(SI), Y6
	VMOVUPS 96(SI), Y7
	VMULPS  (DI), Y4, Y4
	VMULPS  32(DI), Y5, Y5
	VMULPS  64(DI), Y6, Y6
	VMULPS  96(DI), Y7, Y7
	VADDPS  Y4, Y0, Y0
	VADDPS  Y5, Y0, Y0
	VADDPS  Y6, Y0, Y0
	VADDPS  Y7, Y0, Y0
	ADDQ    $128, SI
	ADDQ    $128, DI
	SUBQ    $32, CX
	JMP     f32

f8:
	CMPQ    CX, $8
	JLT     fdone
	VMOVUPS (SI), Y4
	VMULPS  (DI), Y4, Y4
	VADDPS  Y4, Y0, Y0
	ADDQ    $32, SI
	ADDQ    $32, DI
	SUBQ    $8, CX
	JMP     f8

fdone:
	HSUM8
	VZEROUPPER
	MOVSS X0, ret+24(FP)
	RET

// func axpyF16AVX2(out *float32, a float32, v *uint16, n int)
// out[i] += a*v[i] (multiply then add, as the Go loop) for n&^7 elements.
TEXT ·axpyF16AVX2(SB), NOSPLIT, $0-32
	MOVQ         out+0(FP), DI
	VBROADCASTSS a+8(FP), Y0
	MOVQ         v+16(FP), SI
	MOVQ         n+24(FP), CX

a32:
	CMPQ      CX, $32
	JLT       a8
	VCVTPH2PS (SI), Y4
	VCVTPH2PS 16(SI), Y5
	VCVTPH2PS 32(SI), Y6
	VCVTPH2PS 48(SI), Y7
	VMULPS    Y0, Y4, Y4
	VMULPS    Y0, Y5, Y5
	VMULPS    Y0, Y6, Y6
	VMULPS    Y0, Y7, Y7
	VADDPS    (DI), Y4, Y4
	VADDPS    32(DI), Y5, Y5
	VADDPS    64(DI), Y6, Y6
	VADDPS    96(DI), Y7, Y7
	VMOVUPS   Y4, (DI)
	VMOVUPS   Y5, 32(DI)
	VMOVUPS   Y6, 64(DI)
	VMOVUPS   Y7, 96(DI)
	ADDQ      $64, SI
	ADDQ      $128, DI
	SUBQ      $32, CX
	JMP       a32

a8:
	CMPQ      CX, $8
	JLT       adone
	VCVTPH2PS (SI), Y4
	VMULPS    Y0, Y4, Y4
	VADDPS    (DI), Y4, Y4
	VMOVUPS   Y4, (DI)
	ADDQ      $16, SI
	ADDQ      $32, DI
	SUBQ      $8, CX
	JMP       a8

adone:
	VZEROUPPER
	RET
