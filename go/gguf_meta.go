package main

import (
	"fmt"
	"sort"
)

// Metadata accessors with clear errors, and listings for --list-tensors.

func (g *GGUFFile) metaUint(key string) (uint64, error) {
	v, ok := g.Meta[key]
	if !ok {
		return 0, fmt.Errorf("missing metadata %q", key)
	}
	switch x := v.(type) {
	case uint8:
		return uint64(x), nil
	case uint16:
		return uint64(x), nil
	case uint32:
		return uint64(x), nil
	case uint64:
		return x, nil
	case int8:
		if x >= 0 {
			return uint64(x), nil
		}
	case int16:
		if x >= 0 {
			return uint64(x), nil
		}
	case int32:
		if x >= 0 {
			return uint64(x), nil
		}
	case int64:
		if x >= 0 {
			return uint64(x), nil
		}
	}
	return 0, fmt.Errorf("metadata %q is %v (%T), want a non-negative integer", key, v, v)
}

func (g *GGUFFile) metaFloat(key string) (float64, error) {
	v, ok := g.Meta[key]
	if !ok {
		return 0, fmt.Errorf("missing metadata %q", key)
	}
	switch x := v.(type) {
	case float32:
		return float64(x), nil
	case float64:
		return x, nil
	}
	if u, err := g.metaUint(key); err == nil {
		return float64(u), nil
	}
	return 0, fmt.Errorf("metadata %q is %v (%T), want a number", key, v, v)
}

func (g *GGUFFile) metaString(key string) (string, error) {
	v, ok := g.Meta[key]
	if !ok {
		return "", fmt.Errorf("missing metadata %q", key)
	}
	s, ok := v.(string)
	if !ok {
		return "", fmt.Errorf("metadata %q is %T, want a string", key, v)
	}
	return s, nil
}

func (g *GGUFFile) metaBool(key string, def bool) bool {
	if b, ok := g.Meta[key].(bool); ok {
		return b
	}
	return def
}

// describeMeta renders a metadata value briefly for --list-tensors.
func describeMeta(v interface{}) string {
	switch x := v.(type) {
	case string:
		if len(x) > 60 {
			return fmt.Sprintf("%q…", x[:60])
		}
		return fmt.Sprintf("%q", x)
	case []string:
		return fmt.Sprintf("[%d strings]", len(x))
	case []float32:
		return fmt.Sprintf("[%d float32]", len(x))
	case []int32:
		return fmt.Sprintf("[%d int32]", len(x))
	case []uint8, []int8, []uint16, []int16, []uint32, []uint64, []int64, []float64, []bool, []interface{}:
		return fmt.Sprintf("[array %T]", x)
	}
	return fmt.Sprintf("%v", v)
}

// sortedTensorNames is a helper for stable listings.
func (g *GGUFFile) sortedTensorNames() []string {
	names := make([]string, 0, len(g.Tensors))
	for _, t := range g.Tensors {
		names = append(names, t.Name)
	}
	sort.Strings(names)
	return names
}
