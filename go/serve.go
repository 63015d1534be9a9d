package main

import (
	"context"
	"crypto/subtle"
	"encoding/json"
	"errors"
	"fmt"
	"log"
	"mime"
	"net"
	"net/http"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

const maxBodyBytes = 1 << 20 // request bodies above 1 MiB get 413

// Server serves the OpenAI-shaped API and the chat page. Generations run
// concurrently on a pool of sessions (each with its own KV cache); the
// weights are shared read-only.
type Server struct {
	m         *Model
	name      string
	pool      *sessionPool
	defaults  SamplerConfig
	defMax    int
	maxTokens int
	timeout   time.Duration // per request, generation included
	apiKey    string
	cors      string
	nextID    int64
	metrics   metrics
}

// serverOptions are the command-line knobs of --serve.
type serverOptions struct {
	queue      int
	timeout    time.Duration
	apiKey     string
	corsOrigin string
}

func serve(m *Model, o *options, smp SamplerConfig, ctx int) error {
	n := o.parallel
	if n < 1 {
		n = 1
	}
	if ctx > m.Cfg.CtxLen {
		ctx = m.Cfg.CtxLen
	}
	sessions := make([]*Session, n)
	for i := range sessions {
		sessions[i] = m.NewSession(ctx, o.kvType == "f32")
	}
	s := &Server{m: m, name: baseName(o.model), pool: newSessionPool(sessions, o.srv.queue), defaults: smp,
		defMax: o.maxTokens, maxTokens: ctx, timeout: o.srv.timeout, apiKey: o.srv.apiKey, cors: o.srv.corsOrigin}
	addr := net.JoinHostPort(o.host, strconv.Itoa(o.port))
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return fmt.Errorf("cannot listen on %s: %v", addr, err)
	}
	fmt.Fprintf(os.Stderr, "%s\nserving %s on http://%s (%d parallel sessions, queue %d, context %d)\n",
		m, s.name, ln.Addr(), n, o.srv.queue, ctx)
	srv := &http.Server{Handler: s.routes(), ReadHeaderTimeout: 10 * time.Second, ReadTimeout: 30 * time.Second,
		WriteTimeout: s.timeout + 10*time.Second, IdleTimeout: 120 * time.Second}
	// SIGTERM / Ctrl-C: stop accepting, let running generations finish.
	stop := make(chan os.Signal, 1)
	signal.Notify(stop, syscall.SIGTERM, os.Interrupt)
	done := make(chan error, 1)
	go func() {
		sig := <-stop
		fmt.Fprintf(os.Stderr, "%v: finishing running requests, then exiting\n", sig)
		c, cancel := context.WithTimeout(context.Background(), s.timeout+5*time.Second)
		defer cancel()
		done <- srv.Shutdown(c)
	}()
	if err := srv.Serve(ln); !errors.Is(err, http.ErrServerClosed) {
		return err
	}
	return <-done
}

func baseName(p string) string {
	if i := strings.LastIndexAny(p, "/\\"); i >= 0 {
		p = p[i+1:]
	}
	return strings.TrimSuffix(p, ".gguf")
}

func (s *Server) routes() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("/", s.handleIndex)
	mux.HandleFunc("/health", s.handleHealth)
	mux.HandleFunc("/metrics", s.handleMetrics)
	mux.HandleFunc("/v1/models", s.handleModels)
	mux.HandleFunc("/tokenize", s.handleTokenize)
	mux.HandleFunc("/detokenize", s.handleDetokenize)
	mux.HandleFunc("/v1/completions", func(w http.ResponseWriter, r *http.Request) { s.handleCompletion(w, r, false) })
	mux.HandleFunc("/v1/chat/completions", func(w http.ResponseWriter, r *http.Request) { s.handleCompletion(w, r, true) })
	return s.middleware(mux)
}

// middleware applies CORS (only with --cors-origin), the API key (only with
// --api-key; the page and /health stay open) and the JSON rule for POST.
func (s *Server) middleware(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if s.cors != "" {
			w.Header().Set("Access-Control-Allow-Origin", s.cors)
			w.Header().Set("Vary", "Origin")
			if r.Method == http.MethodOptions {
				w.Header().Set("Access-Control-Allow-Methods", "GET, POST, OPTIONS")
				w.Header().Set("Access-Control-Allow-Headers", "Authorization, Content-Type")
				w.Header().Set("Access-Control-Max-Age", "600")
				w.WriteHeader(http.StatusNoContent)
				return
			}
		}
		open := r.URL.Path == "/" || r.URL.Path == "/health"
		if s.apiKey != "" && !open {
			got := strings.TrimPrefix(r.Header.Get("Authorization"), "Bearer ")
			if subtle.ConstantTimeCompare([]byte(got), []byte(s.apiKey)) != 1 {
				w.Header().Set("WWW-Authenticate", "Bearer")
				writeError(w, http.StatusUnauthorized, "invalid or missing API key (send Authorization: Bearer KEY)")
				return
			}
		}
		if r.Method == http.MethodPost {
			mt, _, err := mime.ParseMediaType(r.Header.Get("Content-Type"))
			if err != nil || mt != "application/json" {
				writeError(w, http.StatusUnsupportedMediaType, "POST bodies must have Content-Type: application/json")
				return
			}
		}
		next.ServeHTTP(w, r)
	})
}

func writeJSON(w http.ResponseWriter, code int, v interface{}) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(code)
	json.NewEncoder(w).Encode(v)
}

func writeError(w http.ResponseWriter, code int, msg string) {
	typ := "invalid_request_error"
	if code >= 500 {
		typ = "server_error"
	}
	writeJSON(w, code, map[string]interface{}{"error": map[string]interface{}{"message": msg, "type": typ, "code": code}})
}

// decodeBody reads a JSON request body into v, answering 413/400 itself.
func decodeBody(w http.ResponseWriter, r *http.Request, v interface{}) bool {
	if r.Method != http.MethodPost {
		w.Header().Set("Allow", "POST")
		writeError(w, http.StatusMethodNotAllowed, "use POST")
		return false
	}
	if err := json.NewDecoder(http.MaxBytesReader(w, r.Body, maxBodyBytes)).Decode(v); err != nil {
		var mbe *http.MaxBytesError
		if errors.As(err, &mbe) {
			writeError(w, http.StatusRequestEntityTooLarge, fmt.Sprintf("request body exceeds %d bytes", maxBodyBytes))
		} else {
			writeError(w, http.StatusBadRequest, "invalid JSON body: "+err.Error())
		}
		return false
	}
	return true
}

func (s *Server) handleIndex(w http.ResponseWriter, r *http.Request) {
	if r.URL.Path != "/" {
		writeError(w, http.StatusNotFound, "not found: "+r.URL.Path)
		return
	}
	w.Header().Set("Content-Type", "text/html; charset=utf-8")
	fmt.Fprint(w, chatPage)
}

func (s *Server) handleHealth(w http.ResponseWriter, r *http.Request) {
	free, total := s.pool.free()
	writeJSON(w, http.StatusOK, map[string]interface{}{"status": "ok", "model": s.name,
		"sessions_free": free, "sessions": total})
}

func (s *Server) handleModels(w http.ResponseWriter, r *http.Request) {
	writeJSON(w, http.StatusOK, map[string]interface{}{"object": "list", "data": []interface{}{
		map[string]interface{}{"id": s.name, "object": "model", "created": 0, "owned_by": "nanollama"}}})
}

// handleTokenize answers {"content": TEXT, "add_special": BOOL} with the
// token ids, as llama-server does.
func (s *Server) handleTokenize(w http.ResponseWriter, r *http.Request) {
	var req struct {
		Content    *string `json:"content"`
		AddSpecial *bool   `json:"add_special"`
	}
	if !decodeBody(w, r, &req) {
		return
	}
	if req.Content == nil {
		writeError(w, http.StatusBadRequest, "content (a string) is required")
		return
	}
	add := req.AddSpecial == nil || *req.AddSpecial
	ids := s.m.Tok.Encode(*req.Content, add)
	if ids == nil {
		ids = []int32{}
	}
	writeJSON(w, http.StatusOK, map[string]interface{}{"tokens": ids})
}

func (s *Server) handleDetokenize(w http.ResponseWriter, r *http.Request) {
	var req struct {
		Tokens []int64 `json:"tokens"`
	}
	if !decodeBody(w, r, &req) {
		return
	}
	ids, err := s.tokenIDs(req.Tokens)
	if err != nil {
		writeError(w, http.StatusBadRequest, err.Error())
		return
	}
	writeJSON(w, http.StatusOK, map[string]interface{}{"content": s.m.Tok.Decode(ids)})
}

// tokenIDs checks ids sent by a client against the vocabulary.
func (s *Server) tokenIDs(in []int64) ([]int32, error) {
	n := len(s.m.Tok.Tokens)
	out := make([]int32, len(in))
	for i, id := range in {
		if id < 0 || id >= int64(n) {
			return nil, fmt.Errorf("token id %d is outside the vocabulary [0, %d)", id, n)
		}
		out[i] = int32(id)
	}
	return out, nil
}

// ---- the session pool: a bounded wait for a free KV cache ----

var errBusy = errors.New("server busy")

// sessionPool hands out free sessions, preferring the one whose cache
// shares the longest prefix with the prompt. At most maxWait requests wait;
// more are refused (503) rather than queued without bound.
type sessionPool struct {
	slots   chan struct{} // one token per free session
	mu      sync.Mutex
	idle    []*Session
	total   int
	waiting int64
	maxWait int64
}

func newSessionPool(sessions []*Session, maxWait int) *sessionPool {
	p := &sessionPool{slots: make(chan struct{}, len(sessions)), idle: sessions, total: len(sessions), maxWait: int64(maxWait)}
	for range sessions {
		p.slots <- struct{}{}
	}
	return p
}

func (p *sessionPool) acquire(ctx context.Context, prompt []int32) (*Session, error) {
	select {
	case <-p.slots:
	default:
		if atomic.AddInt64(&p.waiting, 1) > p.maxWait {
			atomic.AddInt64(&p.waiting, -1)
			return nil, errBusy
		}
		select {
		case <-p.slots:
			atomic.AddInt64(&p.waiting, -1)
		case <-ctx.Done():
			atomic.AddInt64(&p.waiting, -1)
			return nil, ctx.Err()
		}
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	best, bestLen := 0, -1
	for i, s := range p.idle {
		if n := s.SharedPrefix(prompt); n > bestLen {
			best, bestLen = i, n
		}
	}
	s := p.idle[best]
	p.idle = append(p.idle[:best], p.idle[best+1:]...)
	return s, nil
}

func (p *sessionPool) release(s *Session) {
	p.mu.Lock()
	p.idle = append(p.idle, s)
	p.mu.Unlock()
	p.slots <- struct{}{}
}

func (p *sessionPool) free() (free, total int) { return len(p.slots), p.total }

// ---- Prometheus metrics ----

type metrics struct {
	requests, rejected, failed, promptTokens, cachedTokens, genTokens int64
	prefillNanos, decodeNanos                                         int64
}

func (m *metrics) add(st GenStats) {
	atomic.AddInt64(&m.promptTokens, int64(st.PromptTokens))
	atomic.AddInt64(&m.cachedTokens, int64(st.CachedTokens))
	atomic.AddInt64(&m.genTokens, int64(st.GenTokens))
	atomic.AddInt64(&m.prefillNanos, int64(st.Prefill))
	atomic.AddInt64(&m.decodeNanos, int64(st.Decode))
}

func (s *Server) handleMetrics(w http.ResponseWriter, r *http.Request) {
	m := &s.metrics
	free, total := s.pool.free()
	w.Header().Set("Content-Type", "text/plain; version=0.0.4")
	for _, x := range []struct {
		name, typ, help string
		v               float64
	}{
		{"nanollama_requests_total", "counter", "Generation requests accepted.", float64(atomic.LoadInt64(&m.requests))},
		{"nanollama_requests_rejected_total", "counter", "Requests refused with 503 because the queue was full.", float64(atomic.LoadInt64(&m.rejected))},
		{"nanollama_requests_failed_total", "counter", "Requests that ended in a server error.", float64(atomic.LoadInt64(&m.failed))},
		{"nanollama_prompt_tokens_total", "counter", "Prompt tokens received.", float64(atomic.LoadInt64(&m.promptTokens))},
		{"nanollama_prompt_tokens_cached_total", "counter", "Prompt tokens served from a session's KV cache.", float64(atomic.LoadInt64(&m.cachedTokens))},
		{"nanollama_generated_tokens_total", "counter", "Tokens generated.", float64(atomic.LoadInt64(&m.genTokens))},
		{"nanollama_prefill_seconds_total", "counter", "Time spent evaluating prompts.", float64(atomic.LoadInt64(&m.prefillNanos)) / 1e9},
		{"nanollama_decode_seconds_total", "counter", "Time spent generating tokens.", float64(atomic.LoadInt64(&m.decodeNanos)) / 1e9},
		{"nanollama_sessions_busy", "gauge", "Sessions generating now.", float64(total - free)},
		{"nanollama_sessions", "gauge", "Sessions (parallel generations).", float64(total)},
		{"nanollama_requests_waiting", "gauge", "Requests waiting for a free session.", float64(atomic.LoadInt64(&s.pool.waiting))},
	} {
		fmt.Fprintf(w, "# HELP %s %s\n# TYPE %s %s\n%s %g\n", x.name, x.help, x.name, x.typ, x.name, x.v)
	}
}

func logStats(r *http.Request, st GenStats) {
	log.Printf("%s %s: %s", r.Method, r.URL.Path, st)
}
