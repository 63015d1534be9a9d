package main

import (
	"sync"
	"sync/atomic"
)

// chunkWorker is a unit of parallel work over an index range. scratch is a
// float buffer owned by the goroutine running the chunk.
type chunkWorker interface {
	do(lo, hi int, scratch *[]float32)
}

// parJob is one parallel-for; it lives in a Session and is reused, so
// running one allocates nothing.
type parJob struct {
	w     chunkWorker
	n     int
	chunk int
	next  int64
	wg    sync.WaitGroup
	mu    sync.Mutex
	panic interface{} // a helper's panic, re-raised on the caller
}

func (j *parJob) work(scratch *[]float32) {
	for {
		lo := int(atomic.AddInt64(&j.next, int64(j.chunk))) - j.chunk
		if lo >= j.n {
			return
		}
		hi := lo + j.chunk
		if hi > j.n {
			hi = j.n
		}
		j.w.do(lo, hi, scratch)
	}
}

// helpOnce runs a helper's share of j. A panic is handed to the caller of
// Run (where the server's per-request recovery sees it) instead of killing
// the process from a goroutine nothing can recover.
func (j *parJob) helpOnce(scratch *[]float32) {
	defer func() {
		if p := recover(); p != nil {
			j.mu.Lock()
			j.panic = p
			j.mu.Unlock()
		}
		j.wg.Done()
	}()
	j.work(scratch)
}

// Pool is a fixed set of helper goroutines shared by all sessions. The
// caller of Run always takes part, so a pool of n threads has n-1 helpers.
type Pool struct {
	threads int
	ch      chan *parJob
}

func NewPool(threads int) *Pool {
	if threads < 1 {
		threads = 1
	}
	p := &Pool{threads: threads, ch: make(chan *parJob, 256)}
	for i := 0; i < threads-1; i++ {
		go func() {
			var scratch []float32
			for j := range p.ch {
				j.helpOnce(&scratch)
			}
		}()
	}
	return p
}

// Run splits [0, n) into chunks of the given size and runs w over them on
// the caller and the pool's helpers, returning when all are done.
func (p *Pool) Run(j *parJob, w chunkWorker, n, chunk int, scratch *[]float32) {
	if chunk < 1 {
		chunk = 1
	}
	j.w, j.n, j.chunk, j.panic = w, n, chunk, nil
	atomic.StoreInt64(&j.next, 0)
	helpers := (n+chunk-1)/chunk - 1
	if helpers > p.threads-1 {
		helpers = p.threads - 1
	}
	if helpers > 0 {
		j.wg.Add(helpers)
		for i := 0; i < helpers; i++ {
			p.ch <- j
		}
	}
	func() {
		// Wait for the helpers even when the caller's share panics, so
		// none is still using j when it is reused.
		defer func() {
			if helpers > 0 {
				j.wg.Wait()
			}
		}()
		j.work(scratch)
	}()
	j.w = nil
	if j.panic != nil {
		p := j.panic
		j.panic = nil
		panic(p)
	}
}
