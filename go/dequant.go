package main

import "unsafe"

// ---- dequantisation ----

func le16(b []byte) uint16 { return uint16(b[0]) | uint16(b[1])<<8 }

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
