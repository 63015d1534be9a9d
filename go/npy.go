package main

import (
	"archive/zip"
	"bytes"
	"encoding/binary"
	"fmt"
	"io"
	"math"
	"os"
	"path/filepath"
	"strconv"
	"strings"
)

// npyArray is a decoded .npy array (little-endian numeric dtypes only).
type npyArray struct {
	Dtype string // e.g. "<i4", "<f2"
	Shape []int
	Data  []byte
}

func (a *npyArray) Len() int {
	n := 1
	for _, d := range a.Shape {
		n *= d
	}
	return n
}

func parseNpy(b []byte) (*npyArray, error) {
	if len(b) < 10 || string(b[:6]) != "\x93NUMPY" {
		return nil, fmt.Errorf("not a .npy file (bad magic)")
	}
	major := b[6]
	var hlen, off int
	switch major {
	case 1:
		hlen, off = int(binary.LittleEndian.Uint16(b[8:10])), 10
	case 2, 3:
		if len(b) < 12 {
			return nil, fmt.Errorf("truncated .npy header")
		}
		hlen, off = int(binary.LittleEndian.Uint32(b[8:12])), 12
	default:
		return nil, fmt.Errorf("unsupported .npy version %d", major)
	}
	if off+hlen > len(b) {
		return nil, fmt.Errorf("truncated .npy header")
	}
	h := string(b[off : off+hlen])
	a := &npyArray{}
	descr := dictValue(h, "descr")
	a.Dtype = strings.Trim(descr, "'\" ")
	if strings.Contains(dictValue(h, "fortran_order"), "True") {
		return nil, fmt.Errorf("fortran-ordered .npy arrays are not supported")
	}
	shape := strings.Trim(dictValue(h, "shape"), "() ")
	for _, p := range strings.Split(shape, ",") {
		p = strings.TrimSpace(p)
		if p == "" {
			continue
		}
		v, err := strconv.Atoi(p)
		if err != nil || v < 0 {
			return nil, fmt.Errorf("bad .npy shape %q", shape)
		}
		a.Shape = append(a.Shape, v)
	}
	a.Data = b[off+hlen:]
	if sz := dtypeSize(a.Dtype); sz > 0 && len(a.Data) < a.Len()*sz {
		return nil, fmt.Errorf("truncated .npy data (%d bytes for %v %s)", len(a.Data), a.Shape, a.Dtype)
	}
	return a, nil
}

// dictValue extracts the raw text of key from a numpy header dict.
func dictValue(h, key string) string {
	i := strings.Index(h, "'"+key+"'")
	if i < 0 {
		return ""
	}
	rest := h[i+len(key)+2:]
	rest = strings.TrimLeft(rest, ": ")
	if strings.HasPrefix(rest, "(") {
		if j := strings.Index(rest, ")"); j >= 0 {
			return rest[:j+1]
		}
	}
	if j := strings.IndexAny(rest, ",}"); j >= 0 {
		return rest[:j]
	}
	return rest
}

func dtypeSize(dt string) int {
	switch strings.TrimLeft(dt, "<|=") {
	case "i1", "u1", "b1":
		return 1
	case "i2", "u2", "f2":
		return 2
	case "i4", "u4", "f4":
		return 4
	case "i8", "u8", "f8":
		return 8
	}
	return 0
}

// Ints returns integer data as int64.
func (a *npyArray) Ints() ([]int64, error) {
	n := a.Len()
	out := make([]int64, n)
	switch strings.TrimLeft(a.Dtype, "<|=") {
	case "i4":
		for i := range out {
			out[i] = int64(int32(binary.LittleEndian.Uint32(a.Data[4*i:])))
		}
	case "i8":
		for i := range out {
			out[i] = int64(binary.LittleEndian.Uint64(a.Data[8*i:]))
		}
	case "u4":
		for i := range out {
			out[i] = int64(binary.LittleEndian.Uint32(a.Data[4*i:]))
		}
	case "i2":
		for i := range out {
			out[i] = int64(int16(binary.LittleEndian.Uint16(a.Data[2*i:])))
		}
	case "u2":
		for i := range out {
			out[i] = int64(binary.LittleEndian.Uint16(a.Data[2*i:]))
		}
	default:
		return nil, fmt.Errorf("dtype %s is not an integer type", a.Dtype)
	}
	return out, nil
}

// Floats returns float data as float32.
func (a *npyArray) Floats() ([]float32, error) {
	n := a.Len()
	out := make([]float32, n)
	switch strings.TrimLeft(a.Dtype, "<|=") {
	case "f2":
		for i := range out {
			out[i] = f16ToF32(binary.LittleEndian.Uint16(a.Data[2*i:]))
		}
	case "f4":
		for i := range out {
			out[i] = math.Float32frombits(binary.LittleEndian.Uint32(a.Data[4*i:]))
		}
	case "f8":
		for i := range out {
			out[i] = float32(math.Float64frombits(binary.LittleEndian.Uint64(a.Data[8*i:])))
		}
	default:
		return nil, fmt.Errorf("dtype %s is not a float type", a.Dtype)
	}
	return out, nil
}

// ReadTokensNpy reads a 1-D integer .npy of token ids.
func ReadTokensNpy(path string) ([]int32, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	a, err := parseNpy(b)
	if err != nil {
		return nil, fmt.Errorf("%s: %v", path, err)
	}
	if len(a.Shape) != 1 && !(len(a.Shape) == 2 && a.Shape[0] == 1) {
		return nil, fmt.Errorf("%s: token ids must be 1-D, got shape %v", path, a.Shape)
	}
	v, err := a.Ints()
	if err != nil {
		return nil, fmt.Errorf("%s: %v", path, err)
	}
	out := make([]int32, len(v))
	for i, x := range v {
		if x < 0 || x > math.MaxInt32 {
			return nil, fmt.Errorf("%s: token id %d out of range", path, x)
		}
		out[i] = int32(x)
	}
	return out, nil
}

// WriteF32Npy writes data with the given shape as a float32 .npy, via a
// temporary file renamed into place.
func WriteF32Npy(path string, data []float32, shape ...int) error {
	dims := make([]string, len(shape))
	for i, d := range shape {
		dims[i] = strconv.Itoa(d)
	}
	st := strings.Join(dims, ", ")
	if len(shape) == 1 {
		st += ","
	}
	header := fmt.Sprintf("{'descr': '<f4', 'fortran_order': False, 'shape': (%s), }", st)
	pad := 64 - (10+len(header)+1)%64
	if pad == 64 {
		pad = 0
	}
	header += strings.Repeat(" ", pad) + "\n"
	var buf bytes.Buffer
	buf.WriteString("\x93NUMPY\x01\x00")
	binary.Write(&buf, binary.LittleEndian, uint16(len(header)))
	buf.WriteString(header)
	tmp, err := os.CreateTemp(filepath.Dir(path), ".nanollama-*.npy")
	if err != nil {
		return err
	}
	ok := false
	defer func() {
		if !ok {
			tmp.Close()
			os.Remove(tmp.Name())
		}
	}()
	if _, err := tmp.Write(buf.Bytes()); err != nil {
		return err
	}
	if _, err := tmp.Write(f32AsBytes(data)); err != nil {
		return err
	}
	if err := tmp.Close(); err != nil {
		return err
	}
	ok = true
	return os.Rename(tmp.Name(), path)
}

// ReadNpz reads every array of a .npz archive (names without ".npy").
func ReadNpz(path string) (map[string]*npyArray, error) {
	zr, err := zip.OpenReader(path)
	if err != nil {
		return nil, fmt.Errorf("%s: not a readable .npz (zip) file: %v", path, err)
	}
	defer zr.Close()
	out := map[string]*npyArray{}
	for _, f := range zr.File {
		rc, err := f.Open()
		if err != nil {
			return nil, fmt.Errorf("%s: %s: %v", path, f.Name, err)
		}
		b, err := io.ReadAll(io.LimitReader(rc, 1<<34))
		rc.Close()
		if err != nil {
			return nil, fmt.Errorf("%s: %s: %v", path, f.Name, err)
		}
		name := strings.TrimSuffix(f.Name, ".npy")
		if dtypeSize(strings.TrimLeft(npyDescrPeek(b), "<|=")) == 0 {
			continue // strings / objects (e.g. layer names) are not needed
		}
		a, err := parseNpy(b)
		if err != nil {
			return nil, fmt.Errorf("%s: %s: %v", path, f.Name, err)
		}
		out[name] = a
	}
	return out, nil
}

func npyDescrPeek(b []byte) string {
	if len(b) < 10 {
		return ""
	}
	end := 10 + int(binary.LittleEndian.Uint16(b[8:10]))
	if b[6] >= 2 && len(b) >= 12 {
		end = 12 + int(binary.LittleEndian.Uint32(b[8:12]))
	}
	if end > len(b) {
		end = len(b)
	}
	return strings.Trim(dictValue(string(b[:end]), "descr"), "'\" ")
}
