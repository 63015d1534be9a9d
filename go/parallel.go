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
				j.work(&scratch)
				j.wg.Done()
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
	j.w, j.n, j.chunk = w, n, chunk
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
	j.work(scratch)
	if helpers > 0 {
		j.wg.Wait()
	}
	j.w = nil
}
