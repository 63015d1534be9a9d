//go:build !unix

package main

import (
	"fmt"
	"io"
	"os"
)

// mapFile reads the whole file where the standard library has no mmap
// (Windows): the same bytes, held in memory instead of paged in.
func mapFile(f *os.File, size int) ([]byte, error) {
	b := make([]byte, size)
	if _, err := io.ReadFull(f, b); err != nil {
		return nil, fmt.Errorf("read: %v", err)
	}
	return b, nil
}

func unmapFile([]byte) error { return nil }
