//go:build unix

package main

import (
	"fmt"
	"os"
	"syscall"
)

// mapFile maps the file read-only: weights are shared between processes
// and paged in at once where the system can (mapPopulate), else on demand.
func mapFile(f *os.File, size int) ([]byte, error) {
	b, err := syscall.Mmap(int(f.Fd()), 0, size, syscall.PROT_READ, syscall.MAP_SHARED|mapPopulate)
	if err != nil {
		return nil, fmt.Errorf("mmap: %v", err)
	}
	return b, nil
}

func unmapFile(b []byte) error { return syscall.Munmap(b) }
