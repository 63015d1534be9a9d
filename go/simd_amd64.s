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

DATA q4shift<>+0(SB)/4, $0
DATA q4shift<>+4(SB)/4, $0
DATA q4shift<>+8(SB)/4, $0
DATA q4shift<>+12(SB)/4, $0
DATA q4shift<>+16(SB)/4, $4
DATA q4shift<>+20(SB)/4, $4
DATA q4shift<>+24(SB)/4, $4
DATA q4shift<>+28(SB)/4, $4
GLOBL q4shift<>(SB), RODATA|NOPTR, $32

// PFD is how far ahead (bytes) the matrix kernels prefetch the weights.
#define PFD 2048

// ---- matrix kernels: out[r] = dot(row r, x) for nrows rows of stride bytes ----

// Q8PAIR leaves in dst the 8 int32 partial sums of the products of the
// Q8_0 weight quants at wo(SI) with the activations at qo(DI).
#define Q8PAIR(wo, qo, dst) \
	VMOVDQU    wo(SI), Y2; \
	VMOVDQU    qo(DI), Y3; \
	VPSIGNB    Y2, Y2, Y4; \
	VPSIGNB    Y2, Y3, Y5; \
	VPMADDUBSW Y5, Y4, Y4; \
	VPMADDWD   Y15, Y4, dst

// Q4UPAIR does the same for the raw Q4_0 nibbles at wo(SI) (0..15, used
// as the unsigned operand); SUM4Q4 subtracts 8*sum(y) afterwards (exact integers,
// the Go code's formula).
// (Y12 holds the dword shift counts 0,0,0,0,4,4,4,4: low nibbles in the
// low lane, high nibbles in the high lane, without a cross-lane shuffle.)
#define Q4UPAIR(wo, qo, dst) \
	VBROADCASTI128 wo(SI), Y2; \
	VPSRLVD        Y12, Y2, Y2; \
	VPAND          Y14, Y2, Y2; \
	VPMADDUBSW     qo(DI), Y2, Y4; \
	VPMADDWD       Y15, Y4, dst

// SUM4 turns the partial sums of 4 blocks (Y8..Y11) into their exact int32
// block sums, converts them, multiplies by the 4 scale products in X6 and
// adds the 4 products to X0 one after the other (the Go code's order).
#define SUM4 \
	VPHADDD      Y9, Y8, Y8; \
	VPHADDD      Y11, Y10, Y10; \
	VPHADDD      Y10, Y8, Y8; \
	VEXTRACTI128 $1, Y8, X9; \
	VPADDD       X9, X8, X8; \
	VCVTDQ2PS    X8, X8; \
	VMULPS       X8, X6, X6; \
	VMOVUPS      X6, p-16(SP); \
	VADDSS       p-16(SP), X0, X0; \
	VADDSS       p-12(SP), X0, X0; \
	VADDSS       p-8(SP), X0, X0; \
	VADDSS       p-4(SP), X0, X0

#define SUM4Q4 \
	VPHADDD      Y9, Y8, Y8; \
	VPHADDD      Y11, Y10, Y10; \
	VPHADDD      Y10, Y8, Y8; \
	VEXTRACTI128 $1, Y8, X9; \
	VPADDD       X9, X8, X8; \
	VMOVDQU      (R14), X9; \
	VPSLLD       $3, X9, X9; \
	VPSUBD       X9, X8, X8; \
	VCVTDQ2PS    X8, X8; \
	VMULPS       X8, X6, X6; \
	VMOVUPS      X6, p-16(SP); \
	VADDSS       p-16(SP), X0, X0; \
	VADDSS       p-12(SP), X0, X0; \
	VADDSS       p-8(SP), X0, X0; \
	VADDSS       p-4(SP), X0, X0

// SCALE4 puts the products of the 4 fp16 weight scales at SI+0, +b1, +b2,
// +b3 (gathered in AX, clobbers BX) with the 4 activation scales at (DX) into X6.
#define SCALE4(b1, b2, b3) \
	MOVWQZX   (SI), AX; \
	MOVWQZX   b1(SI), BX; \
	SHLQ      $16, BX; \
	ORQ       BX, AX; \
	MOVWQZX   b2(SI), BX; \
	SHLQ      $32, BX; \
	ORQ       BX, AX; \
	MOVWQZX   b3(SI), BX; \
	SHLQ      $48, BX; \
	ORQ       BX, AX; \
	VMOVQ     AX, X6; \
	VCVTPH2PS X6, X6; \
	VMULPS    (DX), X6, X6

// func matQ8_0AVX2(out *float32, w *byte, stride, nrows int, qs *int8, d *float32, nb int)
TEXT ·matQ8_0AVX2(SB), NOSPLIT, $16-56
	MOVQ out+0(FP), R8
	MOVQ w+8(FP), R9
	MOVQ stride+16(FP), R10
	MOVQ nrows+24(FP), R11
	MOVQ qs+32(FP), R12
	MOVQ d+40(FP), R13
	ONES16

m8row:
	MOVQ   R9, SI
	MOVQ   R12, DI
	MOVQ   R13, DX
	MOVQ   nb+48(FP), CX
	VXORPS X0, X0, X0

m8g4:
	CMPQ CX, $4
	JLT  m8b1
	PREFETCHT0 PFD(SI)
	PREFETCHT0 PFD+64(SI)
	PREFETCHT0 PFD+128(SI)
	SCALE4(34, 68, 102)
	Q8PAIR(2, 0, Y8)
	Q8PAIR(36, 32, Y9)
	Q8PAIR(70, 64, Y10)
	Q8PAIR(104, 96, Y11)
	SUM4
	ADDQ $136, SI
	ADDQ $128, DI
	ADDQ $16, DX
	SUBQ $4, CX
	JMP  m8g4

m8b1:
	TESTQ   CX, CX
	JZ      m8done
	BSCALE(0, 0)
	VMOVDQU 2(SI), Y2
	VMOVDQU (DI), Y3
	I8DOT
	ADDQ    $34, SI
	ADDQ    $32, DI
	ADDQ    $4, DX
	DECQ    CX
	JMP     m8b1

m8done:
	VMOVSS X0, (R8)
	ADDQ   $4, R8
	ADDQ   R10, R9
	DECQ   R11
	JNZ    m8row
	VZEROUPPER
	RET

// func matQ4_0AVX2(out *float32, w *byte, stride, nrows int, qs *int8, d *float32, nb int, ysum *int32)
TEXT ·matQ4_0AVX2(SB), NOSPLIT, $16-64
	MOVQ         out+0(FP), R8
	MOVQ         w+8(FP), R9
	MOVQ         stride+16(FP), R10
	MOVQ         nrows+24(FP), R11
	MOVQ         qs+32(FP), R12
	MOVQ         d+40(FP), R13
	ONES16
	VMOVDQU      q4shift<>(SB), Y12
	MOVL         $0x0f0f0f0f, AX
	VMOVD        AX, X14
	VPBROADCASTD X14, Y14
	MOVL         $0x08080808, AX
	VMOVD        AX, X13
	VPBROADCASTD X13, Y13

m4row:
	MOVQ   ysum+56(FP), R14
	MOVQ   R9, SI
	MOVQ   R12, DI
	MOVQ   R13, DX
	MOVQ   nb+48(FP), CX
	VXORPS X0, X0, X0

m4g4:
	CMPQ CX, $4
	JLT  m4b1
	PREFETCHT0 PFD(SI)
	PREFETCHT0 PFD+64(SI)
	SCALE4(18, 36, 54)
	Q4UPAIR(2, 0, Y8)
	Q4UPAIR(20, 32, Y9)
	Q4UPAIR(38, 64, Y10)
	Q4UPAIR(56, 96, Y11)
	SUM4Q4
	ADDQ $72, SI
	ADDQ $128, DI
	ADDQ $16, DX
	ADDQ $16, R14
	SUBQ $4, CX
	JMP  m4g4

m4b1:
	TESTQ   CX, CX
	JZ      m4done
	BSCALE(0, 0)
	Q4UNPACK(2)
	VMOVDQU (DI), Y3
	I8DOT
	ADDQ    $18, SI
	ADDQ    $32, DI
	ADDQ    $4, DX
	DECQ    CX
	JMP     m4b1

m4done:
	VMOVSS X0, (R8)
	ADDQ   $4, R8
	ADDQ   R10, R9
	DECQ   R11
	JNZ    m4row
	VZEROUPPER
	RET

// func matF16AVX2(out *float32, w *uint16, stride, nrows int, x *float32, n int)
// dotF16AVX2 for each of nrows rows (stride in bytes); n a positive multiple of 8.
TEXT ·matF16AVX2(SB), NOSPLIT, $0-48
	MOVQ out+0(FP), R8
	MOVQ w+8(FP), R9
	MOVQ stride+16(FP), R10
	MOVQ nrows+24(FP), R11
	MOVQ x+32(FP), R12
	MOVQ n+40(FP), BX

mhrow:
	MOVQ   R9, SI
	MOVQ   R12, DI
	MOVQ   BX, CX
	VXORPS Y0, Y0, Y0

mh32:
	CMPQ      CX, $32
	JLT       mh8
	PREFETCHT0 PFD(SI)
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
	JMP       mh32

mh8:
	CMPQ      CX, $8
	JLT       mhdone
	VCVTPH2PS (SI), Y4
	VMULPS    (DI), Y4, Y4
	VADDPS    Y4, Y0, Y0
	ADDQ      $16, SI
	ADDQ      $32, DI
	SUBQ      $8, CX
	JMP       mh8

mhdone:
	HSUM8
	VMOVSS X0, (R8)
	ADDQ   $4, R8
	ADDQ   R10, R9
	DECQ   R11
	JNZ    mhrow
	VZEROUPPER
	RET

// func matF32AVX2(out *float32, w *float32, stride, nrows int, x *float32, n int)
TEXT ·matF32AVX2(SB), NOSPLIT, $0-48
	MOVQ out+0(FP), R8
	MOVQ w+8(FP), R9
	MOVQ stride+16(FP), R10
	MOVQ nrows+24(FP), R11
	MOVQ x+32(FP), R12
	MOVQ n+40(FP), BX

mfrow:
	MOVQ   R9, SI
	MOVQ   R12, DI
	MOVQ   BX, CX
	VXORPS Y0, Y0, Y0

mf32:
	CMPQ    CX, $32
	JLT     mf8
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
	JMP     mf32

mf8:
	CMPQ    CX, $8
	JLT     mfdone
	VMOVUPS (SI), Y4
	VMULPS  (DI), Y4, Y4
	VADDPS  Y4, Y0, Y0
	ADDQ    $32, SI
	ADDQ    $32, DI
	SUBQ    $8, CX
	JMP     mf8

mfdone:
	HSUM8
	VMOVSS X0, (R8)
	ADDQ   $4, R8
	ADDQ   R10, R9
	DECQ   R11
	JNZ    mfrow
	VZEROUPPER
	RET

// func f32ToF16AVX2(dst *uint16, src *float32, n int)
// n a multiple of 8; round to nearest even (as f32ToF16).
TEXT ·f32ToF16AVX2(SB), NOSPLIT, $0-24
	MOVQ dst+0(FP), DI
	MOVQ src+8(FP), SI
	MOVQ n+16(FP), CX
	SHRQ $3, CX
	JZ   cvdone

cvloop:
	VMOVUPS   (SI), Y0
	VCVTPS2PH $0, Y0, (DI)
	ADDQ      $32, SI
	ADDQ      $16, DI
	DECQ      CX
	JNZ       cvloop

cvdone:
	VZEROUPPER
	RET

// func roundF16AVX2(dst, src *float32, n int)
// dst[i] = float32(fp16(src[i])), n a multiple of 8.
TEXT ·roundF16AVX2(SB), NOSPLIT, $0-24
	MOVQ dst+0(FP), DI
	MOVQ src+8(FP), SI
	MOVQ n+16(FP), CX
	SHRQ $3, CX
	JZ   rhdone

rhloop:
	VMOVUPS   (SI), Y0
	VCVTPS2PH $0, Y0, X1
	VCVTPH2PS X1, Y1
	VMOVUPS   Y1, (DI)
	ADDQ      $32, SI
	ADDQ      $32, DI
	DECQ      CX
	JNZ       rhloop

rhdone:
	VZEROUPPER
	RET

// func wsumF16AVX2(out *float32, w *float32, v *uint16, stride, npos, n int)
// out[i] = sum over p of w[p]*v[p][i] (v rows stride bytes apart), added
// in order of p starting from 0, multiply then add: the same as zeroing
// out and calling axpyF16 for each p. n a multiple of 32, npos >= 1.
TEXT ·wsumF16AVX2(SB), NOSPLIT, $0-48
	MOVQ out+0(FP), DI
	MOVQ v+16(FP), R9
	MOVQ stride+24(FP), R10
	MOVQ n+40(FP), BX

wcol:
	CMPQ   BX, $64
	JLT    wcol32
	VXORPS Y0, Y0, Y0
	VXORPS Y1, Y1, Y1
	VXORPS Y2, Y2, Y2
	VXORPS Y3, Y3, Y3
	VXORPS Y4, Y4, Y4
	VXORPS Y5, Y5, Y5
	VXORPS Y6, Y6, Y6
	VXORPS Y7, Y7, Y7
	MOVQ   w+8(FP), DX
	MOVQ   R9, SI
	MOVQ   npos+32(FP), CX

wpos64:
	PREFETCHT0   (SI)(R10*4)
	PREFETCHT0   64(SI)(R10*4)
	VBROADCASTSS (DX), Y8
	VCVTPH2PS    (SI), Y9
	VCVTPH2PS    16(SI), Y10
	VCVTPH2PS    32(SI), Y11
	VCVTPH2PS    48(SI), Y12
	VMULPS       Y8, Y9, Y9
	VMULPS       Y8, Y10, Y10
	VMULPS       Y8, Y11, Y11
	VMULPS       Y8, Y12, Y12
	VADDPS       Y9, Y0, Y0
	VADDPS       Y10, Y1, Y1
	VADDPS       Y11, Y2, Y2
	VADDPS       Y12, Y3, Y3
	VCVTPH2PS    64(SI), Y9
	VCVTPH2PS    80(SI), Y10
	VCVTPH2PS    96(SI), Y11
	VCVTPH2PS    112(SI), Y12
	VMULPS       Y8, Y9, Y9
	VMULPS       Y8, Y10, Y10
	VMULPS       Y8, Y11, Y11
	VMULPS       Y8, Y12, Y12
	VADDPS       Y9, Y4, Y4
	VADDPS       Y10, Y5, Y5
	VADDPS       Y11, Y6, Y6
	VADDPS       Y12, Y7, Y7
	ADDQ         $4, DX
	ADDQ         R10, SI
	DECQ         CX
	JNZ          wpos64
	VMOVUPS      Y0, (DI)
	VMOVUPS      Y1, 32(DI)
	VMOVUPS      Y2, 64(DI)
	VMOVUPS      Y3, 96(DI)
	VMOVUPS      Y4, 128(DI)
	VMOVUPS      Y5, 160(DI)
	VMOVUPS      Y6, 192(DI)
	VMOVUPS      Y7, 224(DI)
	ADDQ         $256, DI
	ADDQ         $128, R9
	SUBQ         $64, BX
	JNZ          wcol
	VZEROUPPER
	RET

wcol32:
	VXORPS Y0, Y0, Y0
	VXORPS Y1, Y1, Y1
	VXORPS Y2, Y2, Y2
	VXORPS Y3, Y3, Y3
	MOVQ   w+8(FP), DX
	MOVQ   R9, SI
	MOVQ   npos+32(FP), CX

wpos:
	VBROADCASTSS (DX), Y8
	VCVTPH2PS    (SI), Y4
	VCVTPH2PS    16(SI), Y5
	VCVTPH2PS    32(SI), Y6
	VCVTPH2PS    48(SI), Y7
	VMULPS       Y8, Y4, Y4
	VMULPS       Y8, Y5, Y5
	VMULPS       Y8, Y6, Y6
	VMULPS       Y8, Y7, Y7
	VADDPS       Y4, Y0, Y0
	VADDPS       Y5, Y1, Y1
	VADDPS       Y6, Y2, Y2
	VADDPS       Y7, Y3, Y3
	ADDQ         $4, DX
	ADDQ         R10, SI
	DECQ         CX
	JNZ          wpos
	VMOVUPS      Y0, (DI)
	VMOVUPS      Y1, 32(DI)
	VMOVUPS      Y2, 64(DI)
	VMOVUPS      Y3, 96(DI)
	ADDQ         $128, DI
	ADDQ         $64, R9
	SUBQ         $32, BX
	JNZ          wcol
	VZEROUPPER
	RET

// dword order that undoes the lane interleaving of VPACKSSDW + VPACKSSWB
DATA packperm<>+0(SB)/4, $0
DATA packperm<>+4(SB)/4, $4
DATA packperm<>+8(SB)/4, $1
DATA packperm<>+12(SB)/4, $5
DATA packperm<>+16(SB)/4, $2
DATA packperm<>+20(SB)/4, $6
DATA packperm<>+24(SB)/4, $3
DATA packperm<>+28(SB)/4, $7
GLOBL packperm<>(SB), RODATA|NOPTR, $32

// func quantQ8AVX2(x *float32, qs *int8, amax *float32, isum *int32, nb int)
// For each block of 32 floats: amax = max |x|, q = round-to-even(x * (127/amax))
// (0 when amax is 0) stored as int8, isum = sum of q; as quantQ8Block.
TEXT ·quantQ8AVX2(SB), NOSPLIT, $0-40
	MOVQ         x+0(FP), SI
	MOVQ         qs+8(FP), DI
	MOVQ         amax+16(FP), R8
	MOVQ         isum+24(FP), R9
	MOVQ         nb+32(FP), CX
	MOVL         $0x7fffffff, AX
	VMOVD        AX, X15
	VPBROADCASTD X15, Y15                 // abs mask
	MOVL         $0x42fe0000, AX          // 127.0
	VMOVD        AX, X14
	VMOVDQU      packperm<>(SB), Y13

qloop:
	VMOVUPS      (SI), Y0
	VMOVUPS      32(SI), Y1
	VMOVUPS      64(SI), Y2
	VMOVUPS      96(SI), Y3
	VANDPS       Y15, Y0, Y4
	VANDPS       Y15, Y1, Y5
	VANDPS       Y15, Y2, Y6
	VANDPS       Y15, Y3, Y7
	VMAXPS       Y5, Y4, Y4
	VMAXPS       Y7, Y6, Y6
	VMAXPS       Y6, Y4, Y4
	VEXTRACTF128 $1, Y4, X5
	VMAXPS       X5, X4, X4
	VMOVHLPS     X4, X4, X5
	VMAXPS       X5, X4, X4
	VMOVSHDUP    X4, X5
	VMAXSS       X5, X4, X4
	VMOVSS       X4, (R8)
	VXORPS       X6, X6, X6
	VUCOMISS     X6, X4
	JEQ          qzero
	VDIVSS       X4, X14, X6              // 127/amax
	VBROADCASTSS X6, Y6
	VMULPS       Y6, Y0, Y0
	VMULPS       Y6, Y1, Y1
	VMULPS       Y6, Y2, Y2
	VMULPS       Y6, Y3, Y3
	VCVTPS2DQ    Y0, Y0
	VCVTPS2DQ    Y1, Y1
	VCVTPS2DQ    Y2, Y2
	VCVTPS2DQ    Y3, Y3
	VPADDD       Y1, Y0, Y4
	VPADDD       Y3, Y2, Y5
	VPADDD       Y5, Y4, Y4
	VEXTRACTI128 $1, Y4, X5
	VPADDD       X5, X4, X4
	VPSHUFD      $0x4e, X4, X5
	VPADDD       X5, X4, X4
	VPSHUFD      $0xb1, X4, X5
	VPADDD       X5, X4, X4
	VMOVD        X4, (R9)
	VPACKSSDW    Y1, Y0, Y0
	VPACKSSDW    Y3, Y2, Y2
	VPACKSSWB    Y2, Y0, Y0
	VPERMD       Y0, Y13, Y0
	VMOVDQU      Y0, (DI)
	JMP          qnext

qzero:
	VPXOR   Y0, Y0, Y0
	VMOVDQU Y0, (DI)
	MOVL    $0, (R9)

qnext:
	ADDQ $128, SI
	ADDQ $32, DI
	ADDQ $4, R8
	ADDQ $4, R9
	DECQ CX
	JNZ  qloop
	VZEROUPPER
	RET

// ---- softmax exponentials: Go's math.Exp (exp_amd64.s, FMA path), 4 lanes ----

#define DC4(name, v) \
	DATA name<>+0(SB)/8, v; \
	DATA name<>+8(SB)/8, v; \
	DATA name<>+16(SB)/8, v; \
	DATA name<>+24(SB)/8, v; \
	GLOBL name<>(SB), RODATA|NOPTR, $32

DC4(eLOG2E, $1.4426950408889634073599246810018920)
DC4(eLN2U, $0.69314718055966295651160180568695068359375)
DC4(eLN2L, $0.28235290563031577122588448175013436025525412068e-12)
DC4(eSIXTEENTH, $0.0625)
DC4(eLOW, $-700.0)
DC4(eHIGH, $700.0)
DC4(eC0, $0.5)
DC4(eC1, $1.0)
DC4(eC2, $2.0)
DC4(eC3, $1.6666666666666666667e-1)
DC4(eC4, $4.1666666666666666667e-2)
DC4(eC5, $8.3333333333333333333e-3)
DC4(eC6, $1.3888888888888888889e-3)
DC4(eC7, $1.9841269841269841270e-4)
DC4(eC8, $2.4801587301587301587e-5)

// EXPCORE: Y0 = exp(Y0) for 4 doubles, Go's algorithm (needs Y14 = 1023
// as int64; clobbers Y1..Y4).
#define EXPCORE \
	VMULPD       eLOG2E<>(SB), Y0, Y1; \
	VCVTPD2DQY   Y1, X2; \
	VCVTDQ2PD    X2, Y3; \
	VFNMADD231PD eLN2U<>(SB), Y3, Y0; \
	VFNMADD231PD eLN2L<>(SB), Y3, Y0; \
	VMULPD       eSIXTEENTH<>(SB), Y0, Y0; \
	VMOVUPD      eC8<>(SB), Y1; \
	VFMADD213PD  eC7<>(SB), Y0, Y1; \
	VFMADD213PD  eC6<>(SB), Y0, Y1; \
	VFMADD213PD  eC5<>(SB), Y0, Y1; \
	VFMADD213PD  eC4<>(SB), Y0, Y1; \
	VFMADD213PD  eC3<>(SB), Y0, Y1; \
	VFMADD213PD  eC0<>(SB), Y0, Y1; \
	VFMADD213PD  eC1<>(SB), Y0, Y1; \
	VMULPD       Y1, Y0, Y0; \
	VADDPD       eC2<>(SB), Y0, Y1; \
	VMULPD       Y1, Y0, Y0; \
	VADDPD       eC2<>(SB), Y0, Y1; \
	VMULPD       Y1, Y0, Y0; \
	VADDPD       eC2<>(SB), Y0, Y1; \
	VMULPD       Y1, Y0, Y0; \
	VADDPD       eC2<>(SB), Y0, Y1; \
	VFMADD213PD  eC1<>(SB), Y1, Y0; \
	VPMOVSXDQ    X2, Y2; \
	VPADDQ       Y14, Y2, Y2; \
	VPSLLQ       $52, Y2, Y2; \
	VMULPD       Y2, Y0, Y0

// func expAVX2(sc *float32, max float32, n int) int
// sc[i] = float32(math.Exp(float64(sc[i] - max))) for groups of 4 while all
// four arguments are > -700 (no NaN, no denormal or zero results);
// returns how many elements it did (a multiple of 4).
TEXT ·expAVX2(SB), NOSPLIT, $0-32
	MOVQ         sc+0(FP), SI
	VBROADCASTSS max+8(FP), X15
	MOVQ         n+16(FP), CX
	XORQ         AX, AX
	MOVQ         $0x3ff, DX
	MOVQ         DX, X14
	VPBROADCASTQ X14, Y14

eloop:
	CMPQ         CX, $4
	JLT          edone
	VMOVUPS      (SI), X0
	VSUBPS       X15, X0, X0
	VCVTPS2PD    X0, Y0
	VCMPPD       $0x1e, eLOW<>(SB), Y0, Y4
	VMOVMSKPD    Y4, DX
	CMPQ         DX, $15
	JNE          edone
	EXPCORE
	VCVTPD2PSY   Y0, X0
	VMOVUPS      X0, (SI)
	ADDQ         $16, SI
	ADDQ         $4, AX
	SUBQ         $4, CX
	JMP          eloop

edone:
	VZEROUPPER
	MOVQ AX, ret+24(FP)
	RET

// ---- 4-token matrix kernels (prefill): weight rows against 4 tokens ----
// The activations of the 4 tokens are interleaved per block (y: block b of
// token k at 128*b + 32*k; d and ysum: 4 per block). Lane k of X0 is token
// k's sum, added block after block as in the Go code.

// T4SUM reduces Y8..Y11 (token 0..3 partial sums of one block) to the 4
// block sums in X8.
#define T4SUM \
	VPHADDD      Y9, Y8, Y8; \
	VPHADDD      Y11, Y10, Y10; \
	VPHADDD      Y10, Y8, Y8; \
	VEXTRACTI128 $1, Y8, X9; \
	VPADDD       X9, X8, X8

// T4ACC: X0 += (dw * d[k]) * float32(X8[k]) for the weight scale at (SI).
#define T4ACC \
	VCVTDQ2PS    X8, X8; \
	MOVWLZX      (SI), AX; \
	VMOVD        AX, X6; \
	VCVTPH2PS    X6, X6; \
	VBROADCASTSS X6, X6; \
	VMULPS       (DX), X6, X6; \
	VMULPS       X8, X6, X6; \
	VADDPS       X6, X0, X0

// T4STORE writes lane k of X0 to R8 + k*BX.
#define T4STORE \
	MOVQ      R8, AX; \
	VMOVSS    X0, (AX); \
	ADDQ      BX, AX; \
	VEXTRACTPS $1, X0, (AX); \
	ADDQ      BX, AX; \
	VEXTRACTPS $2, X0, (AX); \
	ADDQ      BX, AX; \
	VEXTRACTPS $3, X0, (AX)

// The pair loops below run two weight rows against the 4 tokens, so each
// activation load serves both rows and the two rows' block sums are reduced
// and scaled together in one register (row 0 in the low half, row 1 in the
// high half), with each lane's arithmetic that of T4SUM and T4ACC.

// T8SUM reduces row 0's token sums Y8..Y11 and row 1's Y5, Y6, Y7, Y13 to
// Y9 = [row 0's 4 block sums | row 1's]. Clobbers Y5, Y7, Y8, Y10.
#define T8SUM \
	VPHADDD    Y9, Y8, Y8; \
	VPHADDD    Y11, Y10, Y10; \
	VPHADDD    Y10, Y8, Y8; \
	VPHADDD    Y6, Y5, Y5; \
	VPHADDD    Y13, Y7, Y7; \
	VPHADDD    Y7, Y5, Y5; \
	VPERM2I128 $0x20, Y5, Y8, Y9; \
	VPERM2I128 $0x31, Y5, Y8, Y10; \
	VPADDD     Y10, Y9, Y9

// T8ACC: Y0 += (dw * d[k]) * float32(Y9) lane by lane, dw the fp16 weight
// scale at (SI) for row 0 and at (r1) for row 1. Clobbers Y6, Y7.
#define T8ACC(r1) \
	VCVTDQ2PS      Y9, Y9; \
	VPBROADCASTW   (SI), X6; \
	VPBROADCASTW   (r1), X7; \
	VPUNPCKLQDQ    X7, X6, X6; \
	VCVTPH2PS      X6, Y6; \
	VBROADCASTF128 (DX), Y7; \
	VMULPS         Y7, Y6, Y6; \
	VMULPS         Y9, Y6, Y6; \
	VADDPS         Y6, Y0, Y0

// T8STORE writes lane k of X0 to R8 + k*BX and lane k of Y0's high half 4
// bytes after it.
#define T8STORE \
	VEXTRACTF128 $1, Y0, X1; \
	MOVQ         R8, AX; \
	VMOVSS       X0, (AX); \
	VMOVSS       X1, 4(AX); \
	ADDQ         BX, AX; \
	VEXTRACTPS   $1, X0, (AX); \
	VEXTRACTPS   $1, X1, 4(AX); \
	ADDQ         BX, AX; \
	VEXTRACTPS   $2, X0, (AX); \
	VEXTRACTPS   $2, X1, 4(AX); \
	ADDQ         BX, AX; \
	VEXTRACTPS   $3, X0, (AX); \
	VEXTRACTPS   $3, X1, 4(AX)

// Q8P: token k's block products with row 0 (Y2, |Y2| in Y3) into d0 and
// with row 1 (Y12, |Y12| in Y14) into d1. Clobbers Y1, Y4.
#define Q8P(k, d0, d1) \
	VMOVDQU    k(DI), Y4; \
	VPSIGNB    Y2, Y4, Y1; \
	VPMADDUBSW Y1, Y3, Y1; \
	VPMADDWD   Y15, Y1, d0; \
	VPSIGNB    Y12, Y4, Y4; \
	VPMADDUBSW Y4, Y14, Y4; \
	VPMADDWD   Y15, Y4, d1

// Q4P: the same for the unpacked Q4_0 rows in Y2 and Y3.
#define Q4P(k, d0, d1) \
	VPMADDUBSW k(DI), Y2, Y4; \
	VPMADDWD   Y15, Y4, d0; \
	VPMADDUBSW k(DI), Y3, Y1; \
	VPMADDWD   Y15, Y1, d1

#define Q8T(k, dst) \
	VMOVDQU    k(DI), Y5; \
	VPSIGNB    Y2, Y5, Y5; \
	VPMADDUBSW Y5, Y3, Y4; \
	VPMADDWD   Y15, Y4, dst

// func matQ8_0x4AVX2(out *float32, ostride int, w *byte, stride, nrows int, y *int8, d *float32, ys *int32, nb int)
TEXT ·matQ8_0x4AVX2(SB), NOSPLIT, $0-72
	MOVQ out+0(FP), R8
	MOVQ ostride+8(FP), BX
	MOVQ w+16(FP), R9
	MOVQ stride+24(FP), R10
	MOVQ nrows+32(FP), R11
	ONES16

t8pair:
	CMPQ   R11, $2
	JLT    t8tail
	MOVQ   R9, SI
	LEAQ   (R9)(R10*1), R12
	MOVQ   y+40(FP), DI
	MOVQ   d+48(FP), DX
	MOVQ   nb+64(FP), CX
	VXORPS Y0, Y0, Y0

t8pblk:
	VMOVDQU 2(SI), Y2
	VPSIGNB Y2, Y2, Y3
	VMOVDQU 2(R12), Y12
	VPSIGNB Y12, Y12, Y14
	Q8P(0, Y8, Y5)
	Q8P(32, Y9, Y6)
	Q8P(64, Y10, Y7)
	Q8P(96, Y11, Y13)
	T8SUM
	T8ACC(R12)
	ADDQ    $34, SI
	ADDQ    $34, R12
	ADDQ    $128, DI
	ADDQ    $16, DX
	DECQ    CX
	JNZ     t8pblk
	T8STORE
	ADDQ    $8, R8
	LEAQ    (R9)(R10*2), R9
	SUBQ    $2, R11
	JMP     t8pair

t8tail:
	TESTQ R11, R11
	JZ    t8done

t8row:
	MOVQ   R9, SI
	MOVQ   y+40(FP), DI
	MOVQ   d+48(FP), DX
	MOVQ   nb+64(FP), CX
	VXORPS X0, X0, X0

t8blk:
	VMOVDQU 2(SI), Y2
	VPSIGNB Y2, Y2, Y3
	Q8T(0, Y8)
	Q8T(32, Y9)
	Q8T(64, Y10)
	Q8T(96, Y11)
	T4SUM
	T4ACC
	ADDQ    $34, SI
	ADDQ    $128, DI
	ADDQ    $16, DX
	DECQ    CX
	JNZ     t8blk
	T4STORE
	ADDQ    $4, R8
	ADDQ    R10, R9
	DECQ    R11
	JNZ     t8row

t8done:
	VZEROUPPER
	RET

#define Q4T(k, dst) \
	VPMADDUBSW k(DI), Y2, Y4; \
	VPMADDWD   Y15, Y4, dst

// func matQ4_0x4AVX2(out *float32, ostride int, w *byte, stride, nrows int, y *int8, d *float32, ys *int32, nb int)
TEXT ·matQ4_0x4AVX2(SB), NOSPLIT, $0-72
	MOVQ         out+0(FP), R8
	MOVQ         ostride+8(FP), BX
	MOVQ         w+16(FP), R9
	MOVQ         stride+24(FP), R10
	MOVQ         nrows+32(FP), R11
	ONES16
	VMOVDQU      q4shift<>(SB), Y12
	MOVL         $0x0f0f0f0f, AX
	VMOVD        AX, X14
	VPBROADCASTD X14, Y14

t4pair:
	CMPQ   R11, $2
	JLT    t4tail
	MOVQ   R9, SI
	LEAQ   (R9)(R10*1), R13
	MOVQ   y+40(FP), DI
	MOVQ   d+48(FP), DX
	MOVQ   ys+56(FP), R14
	MOVQ   nb+64(FP), CX
	VXORPS Y0, Y0, Y0

t4pblk:
	VBROADCASTI128 2(SI), Y2
	VPSRLVD        Y12, Y2, Y2
	VPAND          Y14, Y2, Y2
	VBROADCASTI128 2(R13), Y3
	VPSRLVD        Y12, Y3, Y3
	VPAND          Y14, Y3, Y3
	Q4P(0, Y8, Y5)
	Q4P(32, Y9, Y6)
	Q4P(64, Y10, Y7)
	Q4P(96, Y11, Y13)
	T8SUM
	VBROADCASTI128 (R14), Y10
	VPSLLD         $3, Y10, Y10
	VPSUBD         Y10, Y9, Y9
	T8ACC(R13)
	ADDQ           $18, SI
	ADDQ           $18, R13
	ADDQ           $128, DI
	ADDQ           $16, DX
	ADDQ           $16, R14
	DECQ           CX
	JNZ            t4pblk
	T8STORE
	ADDQ           $8, R8
	LEAQ           (R9)(R10*2), R9
	SUBQ           $2, R11
	JMP            t4pair

t4tail:
	TESTQ R11, R11
	JZ    t4done

t4row:
	MOVQ   R9, SI
	MOVQ   y+40(FP), DI
	MOVQ   d+48(FP), DX
	MOVQ   ys+56(FP), R14
	MOVQ   nb+64(FP), CX
	VXORPS X0, X0, X0

t4blk:
	VBROADCASTI128 2(SI), Y2
	VPSRLVD        Y12, Y2, Y2
	VPAND          Y14, Y2, Y2
	Q4T(0, Y8)
	Q4T(32, Y9)
	Q4T(64, Y10)
	Q4T(96, Y11)
	T4SUM
	VMOVDQU        (R14), X9
	VPSLLD         $3, X9, X9
	VPSUBD         X9, X8, X8
	T4ACC
	ADDQ           $18, SI
	ADDQ           $128, DI
	ADDQ           $16, DX
	ADDQ           $16, R14
	DECQ           CX
	JNZ            t4blk
	T4STORE
	ADDQ           $4, R8
	ADDQ           R10, R9
	DECQ           R11
	JNZ            t4row

t4done:
	VZEROUPPER
	RET

// HSUMR reduces the 8 lanes of Y as HSUM8 does, into X (T is scratch).
#define HSUMR(Y, X, T) \
	VEXTRACTF128 $1, Y, T; \
	VADDPS       T, X, X; \
	VHADDPS      X, X, X; \
	VHADDPS      X, X, X

// func matF16x4AVX2(out *float32, ostride int, w *uint16, stride, nrows int, x *float32, xstride, n int)
// matF16AVX2 for 4 tokens at once (x rows xstride bytes apart).
TEXT ·matF16x4AVX2(SB), NOSPLIT, $0-64
	MOVQ out+0(FP), R8
	MOVQ w+16(FP), R9
	MOVQ stride+24(FP), R10
	MOVQ nrows+32(FP), R11
	MOVQ xstride+48(FP), R12
	LEAQ (R12)(R12*2), R13

throw:
	MOVQ   R9, SI
	MOVQ   x+40(FP), DI
	MOVQ   n+56(FP), CX
	VXORPS Y0, Y0, Y0
	VXORPS Y1, Y1, Y1
	VXORPS Y2, Y2, Y2
	VXORPS Y3, Y3, Y3

th8:
	VCVTPH2PS (SI), Y4
	VMULPS    (DI), Y4, Y5
	VMULPS    (DI)(R12*1), Y4, Y6
	VMULPS    (DI)(R12*2), Y4, Y7
	VMULPS    (DI)(R13*1), Y4, Y8
	VADDPS    Y5, Y0, Y0
	VADDPS    Y6, Y1, Y1
	VADDPS    Y7, Y2, Y2
	VADDPS    Y8, Y3, Y3
	ADDQ      $16, SI
	ADDQ      $32, DI
	SUBQ      $8, CX
	JNZ       th8
	HSUMR(Y0, X0, X4)
	HSUMR(Y1, X1, X5)
	HSUMR(Y2, X2, X6)
	HSUMR(Y3, X3, X7)
	MOVQ      ostride+8(FP), BX
	MOVQ      R8, AX
	VMOVSS    X0, (AX)
	ADDQ      BX, AX
	VMOVSS    X1, (AX)
	ADDQ      BX, AX
	VMOVSS    X2, (AX)
	ADDQ      BX, AX
	VMOVSS    X3, (AX)
	ADDQ      $4, R8
	ADDQ      R10, R9
	DECQ      R11
	JNZ       throw
	VZEROUPPER
	RET

// func siluMulAVX2(x, up *float32, n int) int
// x[i] = x[i] / (1 + float32(math.Exp(float64(-x[i])))) * up[i] for groups
// of 4 while all -x are in (-700, 700); returns how many it did.
TEXT ·siluMulAVX2(SB), NOSPLIT, $0-32
	MOVQ         x+0(FP), SI
	MOVQ         up+8(FP), DI
	MOVQ         n+16(FP), CX
	XORQ         AX, AX
	MOVQ         $0x3ff, DX
	MOVQ         DX, X14
	VPBROADCASTQ X14, Y14
	MOVL         $0x3f800000, DX
	VMOVD        DX, X13
	VPBROADCASTD X13, X13 // 1.0f
	MOVL         $0x80000000, DX
	VMOVD        DX, X12
	VPBROADCASTD X12, X12 // sign bit

sloop:
	CMPQ      CX, $4
	JLT       sdone
	VMOVUPS   (SI), X5
	VXORPS    X12, X5, X0 // -g
	VCVTPS2PD X0, Y0
	VCMPPD    $0x1e, eLOW<>(SB), Y0, Y4
	VMOVMSKPD Y4, DX
	CMPQ      DX, $15
	JNE       sdone
	VCMPPD    $0x11, eHIGH<>(SB), Y0, Y4
	VMOVMSKPD Y4, DX
	CMPQ      DX, $15
	JNE       sdone
	EXPCORE
	VCVTPD2PSY Y0, X0
	VADDPS    X0, X13, X0
	VDIVPS    X0, X5, X5
	VMULPS    (DI), X5, X5
	VMOVUPS   X5, (SI)
	ADDQ      $16, SI
	ADDQ      $16, DI
	ADDQ      $4, AX
	SUBQ      $4, CX
	JMP       sloop

sdone:
	VZEROUPPER
	MOVQ AX, ret+24(FP)
	RET

// func spinPause()
// 30 PAUSEs back to back, as the runtime's own spin loops do, so that a
// hypervisor sees a pause loop.
TEXT ·spinPause(SB), NOSPLIT, $0-0
	MOVL $30, AX
spl:
	PAUSE
	DECL AX
	JNZ  spl
	RET
