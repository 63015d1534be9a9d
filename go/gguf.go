package main

import (
	"encoding/binary"
	"errors"
	"fmt"
	"math"
	"os"
)

const maxInt = int(^uint(0) >> 1)

// GGUF value types (gguf.GGUFValueType).
const (
	gUint8   = 0
	gInt8    = 1
	gUint16  = 2
	gInt16   = 3
	gUint32  = 4
	gInt32   = 5
	gFloat32 = 6
	gBool    = 7
	gString  = 8
	gArray   = 9
	gUint64  = 10
	gInt64   = 11
	gFloat64 = 12
)

const ggufMagic = 0x46554747 // "GGUF" little-endian

// GGUFTensor describes one tensor of a GGUF file. Dims are in ggml order:
// Dims[0] is the contiguous (innermost) dimension.
type GGUFTensor struct {
	Name   string
	Type   GGMLType
	Dims   []uint64
	Offset uint64 // relative to the start of the data section
	Data   []byte // view into the mapped file
}

// NumElements returns the product of the tensor's dimensions.
func (t *GGUFTensor) NumElements() uint64 {
	n := uint64(1)
	for _, d := range t.Dims {
		n *= d
	}
	return n
}

// GGUFFile is a parsed GGUF file whose tensor data stays memory-mapped.
type GGUFFile struct {
	Path      string
	Version   uint32
	Meta      map[string]interface{}
	MetaKeys  []string // in file order
	Tensors   []*GGUFTensor
	ByName    map[string]*GGUFTensor
	Alignment uint64
	data      []byte // the whole mapped file
}

// OpenGGUF maps path into memory and parses its header, metadata and tensor
// table. Tensor data is not copied.
func OpenGGUF(path string) (*GGUFFile, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return nil, err
	}
	size := st.Size()
	if st.IsDir() {
		return nil, fmt.Errorf("%s: is a directory, not a GGUF file", path)
	}
	if size < 24 {
		return nil, fmt.Errorf("%s: truncated GGUF file (%d bytes, header needs 24)", path, size)
	}
	if uint64(size) > uint64(maxInt) {
		return nil, fmt.Errorf("%s: %d bytes is too large to map on this platform", path, size)
	}
	data, err := mapFile(f, int(size))
	if err != nil {
		return nil, fmt.Errorf("%s: %v", path, err)
	}
	g, err := parseGGUF(data)
	if err != nil {
		unmapFile(data)
		return nil, fmt.Errorf("%s: %v", path, err)
	}
	g.Path = path
	return g, nil
}

// Close unmaps the file. Tensor data must not be used afterwards.
func (g *GGUFFile) Close() error {
	if g.data == nil {
		return nil
	}
	err := unmapFile(g.data)
	g.data = nil
	return err
}

var errTruncated = errors.New("truncated")

type reader struct {
	b   []byte
	pos uint64
}

func (r *reader) need(n uint64) error {
	if n > uint64(len(r.b)) || r.pos > uint64(len(r.b))-n {
		return errTruncated
	}
	return nil
}

func (r *reader) u8() (uint8, error) {
	if err := r.need(1); err != nil {
		return 0, err
	}
	v := r.b[r.pos]
	r.pos++
	return v, nil
}

func (r *reader) u16() (uint16, error) {
	if err := r.need(2); err != nil {
		return 0, err
	}
	v := binary.LittleEndian.Uint16(r.b[r.pos:])
	r.pos += 2
	return v, nil
}

func (r *reader) u32() (uint32, error) {
	if err := r.need(4); err != nil {
		return 0, err
	}
	v := binary.LittleEndian.Uint32(r.b[r.pos:])
	r.pos += 4
	return v, nil
}

func (r *reader) u64() (uint64, error) {
	if err := r.need(8); err != nil {
		return 0, err
	}
	v := binary.LittleEndian.Uint64(r.b[r.pos:])
	r.pos += 8
	return v, nil
}

func (r *reader) str() (string, error) {
	n, err := r.u64()
	if err != nil {
		return "", err
	}
	if err := r.need(n); err != nil {
		return "", err
	}
	s := string(r.b[r.pos : r.pos+n])
	r.pos += n
	return s, nil
}

// value reads one metadata value of type typ.
func (r *reader) value(typ uint32, depth int) (interface{}, error) {
	switch typ {
	case gUint8:
		return r.u8()
	case gInt8:
		v, err := r.u8()
		return int8(v), err
	case gUint16:
		return r.u16()
	case gInt16:
		v, err := r.u16()
		return int16(v), err
	case gUint32:
		return r.u32()
	case gInt32:
		v, err := r.u32()
		return int32(v), err
	case gFloat32:
		v, err := r.u32()
		return math.Float32frombits(v), err
	case gBool:
		v, err := r.u8()
		if err == nil && v > 1 {
			return nil, fmt.Errorf("bad bool value %d", v)
		}
		return v == 1, err
	case gString:
		return r.str()
	case gUint64:
		return r.u64()
	case gInt64:
		v, err := r.u64()
		return int64(v), err
	case gFloat64:
		v, err := r.u64()
		return math.Float64frombits(v), err
	case gArray:
		if depth > 4 {
			return nil, errors.New("arrays nested too deeply")
		}
		et, err := r.u32()
		if err != nil {
			return nil, err
		}
		n, err := r.u64()
		if err != nil {
			return nil, err
		}
		// Reject counts the rest of the file cannot hold before allocating,
		// so memory stays bounded by the file's size.
		if min := minElemBytes(et); n > (uint64(len(r.b))-r.pos)/min {
			return nil, fmt.Errorf("array of %d elements of type %d does not fit the %d bytes left in the file", n, et, uint64(len(r.b))-r.pos)
		}
		return r.array(et, int(n), depth)
	}
	return nil, fmt.Errorf("unknown metadata value type %d", typ)
}

// minElemBytes is the fewest bytes an array element of type et occupies.
func minElemBytes(et uint32) uint64 {
	switch et {
	case gUint16, gInt16:
		return 2
	case gUint32, gInt32, gFloat32:
		return 4
	case gUint64, gInt64, gFloat64, gString: // a string is at least its length
		return 8
	case gArray: // element type and count
		return 12
	}
	return 1
}

func (r *reader) array(et uint32, n int, depth int) (interface{}, error) {
	switch et {
	case gUint8:
		if err := r.need(uint64(n)); err != nil {
			return nil, err
		}
		out := make([]uint8, n)
		copy(out, r.b[r.pos:])
		r.pos += uint64(n)
		return out, nil
	case gInt8:
		if err := r.need(uint64(n)); err != nil {
			return nil, err
		}
		out := make([]int8, n)
		for i := range out {
			out[i] = int8(r.b[r.pos+uint64(i)])
		}
		r.pos += uint64(n)
		return out, nil
	case gUint16, gInt16:
		if err := r.need(2 * uint64(n)); err != nil {
			return nil, err
		}
		if et == gUint16 {
			out := make([]uint16, n)
			for i := range out {
				out[i], _ = r.u16()
			}
			return out, nil
		}
		out := make([]int16, n)
		for i := range out {
			v, _ := r.u16()
			out[i] = int16(v)
		}
		return out, nil
	case gUint32, gInt32, gFloat32:
		if err := r.need(4 * uint64(n)); err != nil {
			return nil, err
		}
		switch et {
		case gUint32:
			out := make([]uint32, n)
			for i := range out {
				out[i], _ = r.u32()
			}
			return out, nil
		case gInt32:
			out := make([]int32, n)
			for i := range out {
				v, _ := r.u32()
				out[i] = int32(v)
			}
			return out, nil
		default:
			out := make([]float32, n)
			for i := range out {
				v, _ := r.u32()
				out[i] = math.Float32frombits(v)
			}
			return out, nil
		}
	case gUint64, gInt64, gFloat64:
		if err := r.need(8 * uint64(n)); err != nil {
			return nil, err
		}
		switch et {
		case gUint64:
			out := make([]uint64, n)
			for i := range out {
				out[i], _ = r.u64()
			}
			return out, nil
		case gInt64:
			out := make([]int64, n)
			for i := range out {
				v, _ := r.u64()
				out[i] = int64(v)
			}
			return out, nil
		default:
			out := make([]float64, n)
			for i := range out {
				v, _ := r.u64()
				out[i] = math.Float64frombits(v)
			}
			return out, nil
		}
	case gBool:
		if err := r.need(uint64(n)); err != nil {
			return nil, err
		}
		out := make([]bool, n)
		for i := range out {
			out[i] = r.b[r.pos+uint64(i)] != 0
		}
		r.pos += uint64(n)
		return out, nil
	case gString:
		out := make([]string, n)
		for i := range out {
			s, err := r.str()
			if err != nil {
				return nil, err
			}
			out[i] = s
		}
		return out, nil
	case gArray:
		out := make([]interface{}, n)
		for i := range out {
			v, err := r.value(gArray, depth+1)
			if err != nil {
				return nil, err
			}
			out[i] = v
		}
		return out, nil
	}
	return nil, fmt.Errorf("unknown metadata array element type %d", et)
}

func parseGGUF(data []byte) (*GGUFFile, error) {
	r := &reader{b: data}
	magic, err := r.u32()
	if err != nil {
		return nil, fmt.Errorf("truncated GGUF header")
	}
	if magic != ggufMagic {
		return nil, fmt.Errorf("not a GGUF file (bad magic %q)", string(data[:4]))
	}
	version, _ := r.u32()
	if version != 2 && version != 3 {
		return nil, fmt.Errorf("unsupported GGUF version %d (want 3)", version)
	}
	nTensors, _ := r.u64()
	nKV, err := r.u64()
	if err != nil {
		return nil, fmt.Errorf("truncated GGUF header")
	}
	// A key takes at least 13 bytes (length, type, one-byte value) and a
	// tensor info at least 32, so larger counts cannot be real. The maps
	// grow as entries are read, never pre-sized from the header's counts.
	if nKV > uint64(len(data))/13 || nTensors > uint64(len(data))/32 {
		return nil, fmt.Errorf("truncated or corrupt GGUF header (%d tensors and %d metadata keys cannot fit in a %d-byte file)", nTensors, nKV, len(data))
	}
	g := &GGUFFile{
		Version:   version,
		Meta:      map[string]interface{}{},
		ByName:    map[string]*GGUFTensor{},
		Alignment: 32,
		data:      data,
	}
	for i := uint64(0); i < nKV; i++ {
		key, err := r.str()
		if err != nil {
			return nil, fmt.Errorf("truncated file while reading metadata key %d of %d", i+1, nKV)
		}
		typ, err := r.u32()
		if err != nil {
			return nil, fmt.Errorf("truncated file while reading metadata %q", key)
		}
		v, err := r.value(typ, 0)
		if err == errTruncated {
			return nil, fmt.Errorf("truncated file while reading metadata %q", key)
		} else if err != nil {
			return nil, fmt.Errorf("metadata %q: %v", key, err)
		}
		if _, dup := g.Meta[key]; dup {
			return nil, fmt.Errorf("duplicate metadata key %q", key)
		}
		g.Meta[key] = v
		g.MetaKeys = append(g.MetaKeys, key)
	}
	if a, ok := g.Meta["general.alignment"]; ok {
		av, ok := a.(uint32)
		if !ok || av == 0 || av&(av-1) != 0 {
			return nil, fmt.Errorf("bad general.alignment %v", a)
		}
		g.Alignment = uint64(av)
	}
	for i := uint64(0); i < nTensors; i++ {
		name, err := r.str()
		if err != nil {
			return nil, fmt.Errorf("truncated file while reading tensor info %d of %d", i+1, nTensors)
		}
		nd, err := r.u32()
		if err != nil {
			return nil, fmt.Errorf("truncated file while reading tensor info %q", name)
		}
		if nd == 0 || nd > 4 {
			return nil, fmt.Errorf("tensor %q has %d dimensions (want 1-4)", name, nd)
		}
		t := &GGUFTensor{Name: name, Dims: make([]uint64, nd)}
		for j := range t.Dims {
			if t.Dims[j], err = r.u64(); err != nil {
				return nil, fmt.Errorf("truncated file while reading tensor info %q", name)
			}
			if t.Dims[j] == 0 || t.Dims[j] > math.MaxInt32 {
				return nil, fmt.Errorf("tensor %q: dimension %d is %d (want 1..%d)", name, j, t.Dims[j], math.MaxInt32)
			}
		}
		typ, err := r.u32()
		if err != nil {
			return nil, fmt.Errorf("truncated file while reading tensor info %q", name)
		}
		t.Type = GGMLType(typ)
		if t.Offset, err = r.u64(); err != nil {
			return nil, fmt.Errorf("truncated file while reading tensor info %q", name)
		}
		if _, ok := typeInfo[t.Type]; !ok {
			return nil, fmt.Errorf("tensor %q has unknown type %d", name, typ)
		}
		if _, dup := g.ByName[name]; dup {
			return nil, fmt.Errorf("duplicate tensor %q", name)
		}
		g.Tensors = append(g.Tensors, t)
		g.ByName[name] = t
	}
	start := (r.pos + g.Alignment - 1) / g.Alignment * g.Alignment
	for _, t := range g.Tensors {
		info := typeInfo[t.Type]
		n := uint64(1)
		for _, d := range t.Dims {
			if d != 0 && n > math.MaxUint64/d {
				return nil, fmt.Errorf("tensor %q: dimensions overflow", t.Name)
			}
			n *= d
		}
		if n%uint64(info.blockSize) != 0 || t.Dims[0]%uint64(info.blockSize) != 0 {
			return nil, fmt.Errorf("tensor %q: row length %d is not a multiple of the %s block size %d", t.Name, t.Dims[0], t.Type, info.blockSize)
		}
		blocks := n / uint64(info.blockSize)
		if blocks > math.MaxUint64/uint64(info.typeSize) {
			return nil, fmt.Errorf("tensor %q: byte size overflows (dimensions %v)", t.Name, t.Dims)
		}
		nbytes := blocks * uint64(info.typeSize)
		if t.Offset%g.Alignment != 0 {
			return nil, fmt.Errorf("tensor %q: data offset %d is not aligned to %d", t.Name, t.Offset, g.Alignment)
		}
		end := start + t.Offset + nbytes
		if start+t.Offset < start || end < start+t.Offset || end > uint64(len(data)) {
			return nil, fmt.Errorf("truncated file: tensor %q needs bytes %d..%d but the file has %d", t.Name, start+t.Offset, end, len(data))
		}
		t.Data = data[start+t.Offset : end]
	}
	return g, nil
}
