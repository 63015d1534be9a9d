package main

import (
	"math"
	"math/rand"
)

// SamplerConfig holds the sampling knobs; Temp <= 0 means greedy.
type SamplerConfig struct {
	Temp       float32
	TopK       int
	TopP       float32
	MinP       float32
	RepPenalty float32
	RepWindow  int
	Presence   float32 // OpenAI's presence_penalty: subtracted once from every seen token
	Frequency  float32 // OpenAI's frequency_penalty: subtracted per occurrence
	Seed       int64
}

// Sampler draws tokens from logits. It keeps its buffers, so sampling
// allocates nothing after the first call.
type Sampler struct {
	cfg   SamplerConfig
	rng   *rand.Rand
	heap  []int32
	keep  []int32
	probs []float64
	seen  map[int32]bool
	count map[int32]int
}

func NewSampler(cfg SamplerConfig) *Sampler {
	return &Sampler{cfg: cfg, rng: rand.New(rand.NewSource(cfg.Seed)), seen: map[int32]bool{}, count: map[int32]int{}}
}

// Sample picks the next token from logits[:nValid] (modified in place by the
// repetition penalty and temperature) given the tokens so far.
func (s *Sampler) Sample(logits []float32, nValid int, history []int32) int32 {
	l := logits[:nValid]
	c := s.cfg
	// The penalty window: the last RepWindow tokens, or all of them when
	// RepWindow < 0 (and, for presence/frequency, when it is 0; a zero
	// window turns off only the repetition penalty).
	window := history
	if c.RepWindow > 0 && len(history) > c.RepWindow {
		window = history[len(history)-c.RepWindow:]
	}
	if c.RepPenalty > 0 && c.RepPenalty != 1 && c.RepWindow != 0 {
		for k := range s.seen {
			delete(s.seen, k)
		}
		for _, id := range window {
			if id < 0 || int(id) >= nValid || s.seen[id] {
				continue
			}
			s.seen[id] = true
			if l[id] > 0 {
				l[id] /= c.RepPenalty
			} else {
				l[id] *= c.RepPenalty
			}
		}
	}
	if c.Presence != 0 || c.Frequency != 0 {
		for k := range s.count {
			delete(s.count, k)
		}
		for _, id := range window {
			if id >= 0 && int(id) < nValid {
				s.count[id]++
			}
		}
		for id, n := range s.count {
			l[id] -= c.Presence + c.Frequency*float32(n)
		}
	}
	if c.Temp <= 0 || c.TopK == 1 {
		best := 0
		for i, v := range l {
			if v > l[best] {
				best = i
			}
		}
		return int32(best)
	}
	inv := 1 / c.Temp
	max := float32(math.Inf(-1))
	for i := range l {
		l[i] *= inv
		if l[i] > max {
			max = l[i]
		}
	}
	// Max-heap of all ids by logit: popping yields them in order, so top-k,
	// top-p and min-p need no full sort.
	if cap(s.heap) < nValid {
		s.heap = make([]int32, nValid)
		s.keep = make([]int32, 0, nValid)
		s.probs = make([]float64, 0, nValid)
	}
	h := s.heap[:nValid]
	for i := range h {
		h[i] = int32(i)
	}
	for i := nValid/2 - 1; i >= 0; i-- {
		siftDown(h, l, i)
	}
	pop := func() int32 {
		top := h[0]
		h[0] = h[len(h)-1]
		h = h[:len(h)-1]
		siftDown(h, l, 0)
		return top
	}
	keep := s.keep[:0]
	var z float64
	if c.TopK > 0 && c.TopK < nValid {
		for i := 0; i < c.TopK; i++ {
			id := pop()
			keep = append(keep, id)
			z += math.Exp(float64(l[id] - max))
		}
	} else {
		for _, v := range l {
			z += math.Exp(float64(v - max))
		}
	}
	// Walk the candidates in order applying top-p then min-p.
	probs := s.probs[:0]
	var cum float64
	pmax := 1 / z // the best token has exp(0)
	for i := 0; ; i++ {
		var id int32
		if c.TopK > 0 && c.TopK < nValid {
			if i >= len(keep) {
				break
			}
			id = keep[i]
		} else {
			if len(h) == 0 {
				break
			}
			id = pop()
			keep = append(keep, id)
		}
		p := math.Exp(float64(l[id]-max)) / z
		if i > 0 && c.MinP > 0 && p < float64(c.MinP)*pmax {
			keep = keep[:i]
			break
		}
		probs = append(probs, p)
		cum += p
		if c.TopP > 0 && c.TopP < 1 && cum >= float64(c.TopP) {
			keep = keep[:i+1]
			break
		}
	}
	keep = keep[:len(probs)]
	r := s.rng.Float64() * cum
	for i, p := range probs {
		r -= p
		if r < 0 {
			return keep[i]
		}
	}
	return keep[len(keep)-1]
}

func siftDown(h []int32, l []float32, i int) {
	n := len(h)
	for {
		best := i
		a, b := 2*i+1, 2*i+2
		if a < n && l[h[a]] > l[h[best]] {
			best = a
		}
		if b < n && l[h[b]] > l[h[best]] {
			best = b
		}
		if best == i {
			return
		}
		h[i], h[best] = h[best], h[i]
		i = best
	}
}
