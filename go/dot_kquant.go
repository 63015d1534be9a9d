package main

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
