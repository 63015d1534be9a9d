package main

import "fmt"

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
