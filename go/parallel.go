package main

import (
	"runtime"
	"sync"
	"sync/atomic"
	"time"
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
	left  int32 // tickets handed out and not yet finished
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

// helpOnce runs the share of j that one ticket stands for. A panic is
// handed to the caller of Run (where the server's per-request recovery sees
// it) instead of killing the process from a goroutine nothing can recover.
func (j *parJob) helpOnce(scratch *[]float32) {
	defer func() {
		if p := recover(); p != nil {
			j.mu.Lock()
			j.panic = p
			j.mu.Unlock()
		}
		atomic.AddInt32(&j.left, -1)
	}()
	j.work(scratch)
}

// Pool is a fixed set of helper goroutines shared by all sessions. The
// caller of Run always takes part, so a pool of n threads has n-1 helpers.
//
// A decode step is some 60 parallel-fors of a few tens of microseconds
// each, about what it costs to wake a parked goroutine (and a goroutine
// woken by a channel send waits in the sender's run queue until another
// thread steals it). So helpers poll for work for a while before they
// park, and the caller waits for them by polling too.
type Pool struct {
	threads int
	ch      chan *parJob // tickets: each receiver runs helpOnce once
}

// spinFor is how long an idle helper keeps polling before it parks: longer
// than the gaps between the parallel-fors of a forward pass, short enough
// to give a shared core (a busy or virtual machine) back soon after.
const spinFor = 100 * time.Microsecond

func NewPool(threads int) *Pool {
	if threads < 1 {
		threads = 1
	}
	p := &Pool{threads: threads, ch: make(chan *parJob, 256)}
	for i := 0; i < threads-1; i++ {
		go func() {
			var scratch []float32
			for {
				p.take().helpOnce(&scratch)
			}
		}()
	}
	return p
}

// take returns the next ticket, polling the channel for up to spinFor
// before blocking on it. It yields now and then so that polling never
// keeps a runnable goroutine (the caller waiting on this thread, say) off
// the processor.
func (p *Pool) take() *parJob {
	var start time.Time
	for i := 1; ; i++ {
		select {
		case j := <-p.ch:
			return j
		default:
		}
		spinPause()
		if i%64 != 0 {
			continue
		}
		runtime.Gosched()
		if start.IsZero() {
			start = time.Now()
		} else if time.Since(start) > spinFor {
			return <-p.ch
		}
	}
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
		atomic.StoreInt32(&j.left, int32(helpers))
		for i := 0; i < helpers; i++ {
			p.ch <- j
		}
	}
	func() {
		// Wait for the helpers even when the caller's share panics, so
		// none is still using j when it is reused.
		defer p.wait(j, scratch)
		j.work(scratch)
	}()
	j.w = nil
	if j.panic != nil {
		p := j.panic
		j.panic = nil
		panic(p)
	}
}

// wait returns once no ticket for j is outstanding. Tickets still in the
// channel are run here (any receiver may run any ticket), so the caller
// never waits for a helper that has not even woken up.
func (p *Pool) wait(j *parJob, scratch *[]float32) {
	for i := 1; atomic.LoadInt32(&j.left) != 0; i++ {
		select {
		case o := <-p.ch:
			o.helpOnce(scratch)
		default:
			spinPause()
			if i%64 == 0 {
				runtime.Gosched()
			}
		}
	}
}
