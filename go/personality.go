package main

import (
	"fmt"
	"regexp"
	"sort"
	"strconv"
	"strings"
)

// Personality deltas applied at load time: the reference's gamma .npz and
// llama.cpp LoRA adapters. Affected matrices are dequantised to F32 once.

var layerKey = regexp.MustCompile(`^layers\.(\d+)\.(.+)$`)

// gammaTarget maps a nanollama state-dict key to the model's storage: a
// matrix (with the Q/K row permutation, if any) or a norm vector.
func (m *Model) gammaTarget(key string) (mat *Matrix, vec []float32, permHeads int, err error) {
	switch key {
	case "tok_embeddings.weight":
		return m.TokEmb, nil, 0, nil
	case "norm.weight":
		return nil, m.Norm, 0, nil
	case "output.weight":
		if m.Output == m.TokEmb {
			return nil, nil, 0, fmt.Errorf("gamma has output.weight but the model ties its output to token_embd")
		}
		return m.Output, nil, 0, nil
	}
	sm := layerKey.FindStringSubmatch(key)
	if sm == nil {
		return nil, nil, 0, fmt.Errorf("unknown gamma key %q", key)
	}
	i, _ := strconv.Atoi(sm[1])
	if i >= len(m.Layers) {
		return nil, nil, 0, fmt.Errorf("gamma key %q: the model has only %d layers", key, len(m.Layers))
	}
	l := &m.Layers[i]
	switch sm[2] {
	case "attn_norm.weight":
		return nil, l.AttnNorm, 0, nil
	case "ffn_norm.weight":
		return nil, l.FFNNorm, 0, nil
	case "attn.c_q.weight":
		return l.Wq, nil, m.Cfg.NHead, nil
	case "attn.c_k.weight":
		return l.Wk, nil, m.Cfg.NKVHead, nil
	case "attn.c_v.weight":
		return l.Wv, nil, 0, nil
	case "attn.c_proj.weight":
		return l.Wo, nil, 0, nil
	case "ffn.gate_proj.weight":
		return l.Gate, nil, 0, nil
	case "ffn.up_proj.weight":
		return l.Up, nil, 0, nil
	case "ffn.down_proj.weight":
		return l.Down, nil, 0, nil
	}
	return nil, nil, 0, fmt.Errorf("unknown gamma key %q", key)
}

// toF32 makes mat's storage a private F32 copy (once) and returns it.
func toF32(mat *Matrix) []float32 {
	if mat.Type == TypeF32 && mat.owned {
		return bytesAsF32(mat.Data)
	}
	w := mat.ToF32()
	mat.SetF32(w)
	mat.owned = true
	return w
}

// ApplyGamma adds alpha·gamma for every tensor of a reference-layout gamma
// .npz (sparse COO: K.indices_0, K.indices_1, K.values (f16), K.shape).
func (m *Model) ApplyGamma(path string, alpha float32) (int, error) {
	arrs, err := ReadNpz(path)
	if err != nil {
		return 0, err
	}
	var keys []string
	for name := range arrs {
		if strings.HasSuffix(name, ".values") && !strings.HasPrefix(name, "_metadata.") {
			keys = append(keys, strings.TrimSuffix(name, ".values"))
		}
	}
	sort.Strings(keys)
	if len(keys) == 0 {
		return 0, fmt.Errorf("%s: no gamma tensors (no *.values arrays)", path)
	}
	fail := func(key string, format string, a ...interface{}) error {
		return fmt.Errorf("%s: %s: %s", path, key, fmt.Sprintf(format, a...))
	}
	for _, key := range keys {
		shapeArr, ok := arrs[key+".shape"]
		if !ok {
			return 0, fail(key, "missing %s.shape", key)
		}
		shape64, err := shapeArr.Ints()
		if err != nil {
			return 0, fail(key, "shape: %v", err)
		}
		values, err := arrs[key+".values"].Floats()
		if err != nil {
			return 0, fail(key, "values: %v", err)
		}
		idx := make([][]int64, len(shape64))
		for d := range shape64 {
			a, ok := arrs[fmt.Sprintf("%s.indices_%d", key, d)]
			if !ok {
				return 0, fail(key, "missing %s.indices_%d", key, d)
			}
			if idx[d], err = a.Ints(); err != nil {
				return 0, fail(key, "indices_%d: %v", d, err)
			}
			if len(idx[d]) != len(values) {
				return 0, fail(key, "indices_%d has %d entries for %d values", d, len(idx[d]), len(values))
			}
		}
		mat, vec, permHeads, err := m.gammaTarget(key)
		if err != nil {
			return 0, fmt.Errorf("%s: %v", path, err)
		}
		if vec != nil {
			if len(shape64) != 1 || int(shape64[0]) != len(vec) {
				return 0, fail(key, "shape %v does not match the model's [%d]", shape64, len(vec))
			}
			for i, v := range values {
				j := idx[0][i]
				if j < 0 || j >= int64(len(vec)) {
					return 0, fail(key, "index %d out of range", j)
				}
				vec[j] += alpha * v
			}
			continue
		}
		if len(shape64) != 2 || int(shape64[1]) != mat.Cols || int(shape64[0]) < mat.Rows {
			return 0, fail(key, "shape %v does not match the model's %s [%d %d]", shape64, mat.Name, mat.Rows, mat.Cols)
		}
		if key != "tok_embeddings.weight" && key != "output.weight" && int(shape64[0]) != mat.Rows {
			return 0, fail(key, "shape %v does not match the model's %s [%d %d]", shape64, mat.Name, mat.Rows, mat.Cols)
		}
		w := toF32(mat)
		hd := m.Cfg.HeadDim
		for i, v := range values {
			r, c := idx[0][i], idx[1][i]
			if r < 0 || c < 0 || r >= shape64[0] || c >= shape64[1] {
				return 0, fail(key, "index (%d, %d) out of range", r, c)
			}
			if int(r) >= mat.Rows {
				continue // padded vocabulary rows the GGUF does not store
			}
			row := int(r)
			if permHeads > 0 {
				// HF half-split row order → llama.cpp's interleaved order.
				h, rest := row/hd, row%hd
				row = h*hd + 2*(rest%(hd/2)) + rest/(hd/2)
			}
			w[row*mat.Cols+int(c)] += alpha * v
		}
	}
	return len(keys), nil
}

// ApplyLoRA merges a llama.cpp LoRA adapter: W += scale·alpha/r · B·A.
func (m *Model) ApplyLoRA(path string, scale float32) (int, error) {
	g, err := OpenGGUF(path)
	if err != nil {
		return 0, err
	}
	defer g.Close()
	if t, _ := g.metaString("general.type"); t != "adapter" {
		return 0, fmt.Errorf("%s: not a LoRA adapter (general.type is %q, want \"adapter\")", path, t)
	}
	if t, _ := g.metaString("adapter.type"); t != "lora" {
		return 0, fmt.Errorf("%s: adapter.type is %q, want \"lora\"", path, t)
	}
	if a, err := g.metaString("general.architecture"); err == nil && a != "llama" {
		return 0, fmt.Errorf("%s: adapter is for architecture %q, not llama", path, a)
	}
	alpha := float32(0)
	if _, ok := g.Meta["adapter.lora.alpha"]; ok {
		a, err := g.metaFloat("adapter.lora.alpha")
		if err != nil {
			return 0, fmt.Errorf("%s: %v", path, err)
		}
		alpha = float32(a)
	}
	targets := map[string]*Matrix{"token_embd.weight": m.TokEmb}
	if m.Output != m.TokEmb {
		targets["output.weight"] = m.Output
	}
	for i := range m.Layers {
		l := &m.Layers[i]
		for name, mat := range map[string]*Matrix{
			"attn_q": l.Wq, "attn_k": l.Wk, "attn_v": l.Wv, "attn_output": l.Wo,
			"ffn_gate": l.Gate, "ffn_up": l.Up, "ffn_down": l.Down,
		} {
			targets[fmt.Sprintf("blk.%d.%s.weight", i, name)] = mat
		}
	}
	n := 0
	for _, ta := range g.Tensors {
		if !strings.HasSuffix(ta.Name, ".lora_a") {
			continue
		}
		base := strings.TrimSuffix(ta.Name, ".lora_a")
		tb, ok := g.ByName[base+".lora_b"]
		if !ok {
			return 0, fmt.Errorf("%s: %s has no matching %s.lora_b", path, ta.Name, base)
		}
		mat, ok := targets[base]
		if !ok {
			return 0, fmt.Errorf("%s: adapter tensor %s targets %q, which the model does not have", path, ta.Name, base)
		}
		for _, t := range []*GGUFTensor{ta, tb} {
			if len(t.Dims) != 2 || !typeInfo[t.Type].supported {
				return 0, fmt.Errorf("%s: %s must be a 2-D tensor of a supported type (got %v %s)", path, t.Name, t.Dims, t.Type)
			}
		}
		// ggml dims: A [in, r] (numpy [r, in]), B [r, out] (numpy [out, r]).
		in, r := int(ta.Dims[0]), int(ta.Dims[1])
		if in != mat.Cols || int(tb.Dims[0]) != r || int(tb.Dims[1]) != mat.Rows {
			return 0, fmt.Errorf("%s: %s %v / lora_b %v do not fit %s [%d %d]", path, ta.Name, ta.Dims, tb.Dims, base, mat.Rows, mat.Cols)
		}
		A := make([]float32, r*in)
		for i := 0; i < r; i++ {
			dequantRow(ta.Type, ta.Data[i*rowBytes(ta.Type, in):], A[i*in:(i+1)*in])
		}
		B := make([]float32, mat.Rows*r)
		for i := 0; i < mat.Rows; i++ {
			dequantRow(tb.Type, tb.Data[i*rowBytes(tb.Type, r):], B[i*r:(i+1)*r])
		}
		s := scale
		if alpha != 0 {
			s = scale * alpha / float32(r)
		}
		w := toF32(mat)
		for o := 0; o < mat.Rows; o++ {
			wr := w[o*in : (o+1)*in]
			for k := 0; k < r; k++ {
				bk := s * B[o*r+k]
				if bk == 0 {
					continue
				}
				for c, av := range A[k*in : (k+1)*in] {
					wr[c] += bk * av
				}
			}
		}
		n++
	}
	if n == 0 {
		return 0, fmt.Errorf("%s: adapter has no *.lora_a tensors", path)
	}
	return n, nil
}
