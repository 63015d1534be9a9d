package main

import (
	"context"
	"encoding/json"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"
)

func testServer(t *testing.T, m *Model, sessions int, queue int) *Server {
	ss := make([]*Session, sessions)
	for i := range ss {
		ss[i] = m.NewSession(64, false)
	}
	return &Server{m: m, name: "tiny", pool: newSessionPool(ss, queue), defaults: SamplerConfig{Temp: 0, RepPenalty: 1},
		defMax: 8, maxTokens: 64, timeout: time.Minute}
}

func do(t *testing.T, h http.Handler, method, path, body string, hdr ...string) (*http.Response, string) {
	req := httptest.NewRequest(method, path, strings.NewReader(body))
	if method == http.MethodPost {
		req.Header.Set("Content-Type", "application/json")
	}
	for i := 0; i+1 < len(hdr); i += 2 {
		req.Header.Set(hdr[i], hdr[i+1])
	}
	w := httptest.NewRecorder()
	h.ServeHTTP(w, req)
	b, _ := io.ReadAll(w.Result().Body)
	return w.Result(), string(b)
}

func completionText(t *testing.T, body string) string {
	var r struct {
		Choices []struct {
			Text    string `json:"text"`
			Message struct {
				Content string `json:"content"`
			} `json:"message"`
		} `json:"choices"`
	}
	if err := json.Unmarshal([]byte(body), &r); err != nil || len(r.Choices) != 1 {
		t.Fatalf("bad completion %q: %v", body, err)
	}
	return r.Choices[0].Text + r.Choices[0].Message.Content
}

// The request shapes real clients send give the same answer as the plain one.
func TestServerRequestShapes(t *testing.T) {
	m := tinyModel(t, TypeF32)
	h := testServer(t, m, 2, 4).routes()
	_, base := do(t, h, "POST", "/v1/completions", `{"prompt": "the a", "max_tokens": 6, "some_future_field": {"x": 1}}`)
	want := completionText(t, base)
	ids, _ := json.Marshal(m.Tok.Encode("the a", true))
	for _, body := range []string{
		`{"prompt": ["the a"], "max_tokens": 6}`,
		`{"prompt": ` + string(ids) + `, "max_completion_tokens": 6}`,
		`{"prompt": [` + string(ids) + `], "max_tokens": 6}`,
	} {
		if _, got := do(t, h, "POST", "/v1/completions", body); completionText(t, got) != want {
			t.Errorf("%s: %q, want %q", body, completionText(t, got), want)
		}
	}
	_, a := do(t, h, "POST", "/v1/chat/completions", `{"messages": [{"role": "user", "content": "the a"}], "max_tokens": 5}`)
	_, b := do(t, h, "POST", "/v1/chat/completions", `{"messages": [{"role": "user", "content": [{"type": "text", "text": "the "}, {"type": "text", "text": "a"}]}], "max_tokens": 5}`)
	if completionText(t, a) != completionText(t, b) {
		t.Errorf("content parts %q vs string %q", completionText(t, b), completionText(t, a))
	}
	for body, want := range map[string]string{
		`{"prompt": "x", "n": 2}`:                "n must be 1",
		`{"prompt": ["x", "y"]}`:                 "one prompt per request",
		`{"prompt": [999999]}`:                   "outside the vocabulary",
		`{"prompt": "x", "stop": 3}`:             "stop must be",
		`{"prompt": "x", "logprobs": 9}`:         "between 0 and 5",
		`{"prompt": "x", "presence_penalty": 3}`: "presence_penalty",
		`{"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}`: "not supported",
	} {
		path := "/v1/completions"
		if strings.Contains(body, "messages") {
			path = "/v1/chat/completions"
		}
		if resp, got := do(t, h, "POST", path, body); resp.StatusCode != 400 || !strings.Contains(got, want) {
			t.Errorf("%s: %d %s, want 400 with %q", body, resp.StatusCode, got, want)
		}
	}
	if resp, _ := do(t, h, "POST", "/v1/completions", `{"prompt": "x"}`, "Content-Type", "text/plain"); resp.StatusCode != 415 {
		t.Errorf("text/plain POST: %d, want 415", resp.StatusCode)
	}
	_, tk := do(t, h, "POST", "/tokenize", `{"content": "the a"}`)
	var tr struct{ Tokens []int32 }
	json.Unmarshal([]byte(tk), &tr)
	trIDs, _ := json.Marshal(tr.Tokens)
	if string(trIDs) != string(ids) {
		t.Errorf("/tokenize %s, want %s", trIDs, ids)
	}
	_, dt := do(t, h, "POST", "/detokenize", `{"tokens": [`+string(ids[len("[1,"):len(ids)-1])+`]}`)
	if !strings.Contains(dt, "the a") {
		t.Errorf("/detokenize %s", dt)
	}
	_, met := do(t, h, "GET", "/metrics", "")
	if !strings.Contains(met, "# TYPE nanollama_generated_tokens_total counter") || strings.Contains(met, "nanollama_requests_total 0\n") {
		t.Errorf("/metrics:\n%s", met)
	}
}

// API key, CORS only when asked, 503 with Retry-After when the queue is full.
func TestServerGuards(t *testing.T) {
	m := tinyModel(t, TypeF32)
	s := testServer(t, m, 1, 0)
	s.apiKey = "sekret"
	h := s.routes()
	if resp, _ := do(t, h, "POST", "/v1/completions", `{"prompt": "x", "max_tokens": 1}`); resp.StatusCode != 401 {
		t.Errorf("no key: %d", resp.StatusCode)
	}
	if resp, _ := do(t, h, "POST", "/v1/completions", `{"prompt": "x", "max_tokens": 1}`, "Authorization", "Bearer sekret"); resp.StatusCode != 200 {
		t.Errorf("with key: %d", resp.StatusCode)
	}
	if resp, _ := do(t, h, "GET", "/", ""); resp.StatusCode != 200 || resp.Header.Get("Access-Control-Allow-Origin") != "" {
		t.Errorf("page: %d, CORS %q without --cors-origin", resp.StatusCode, resp.Header.Get("Access-Control-Allow-Origin"))
	}
	s.cors = "https://example.com"
	if resp, _ := do(t, s.routes(), "OPTIONS", "/v1/completions", ""); resp.StatusCode != 204 || resp.Header.Get("Access-Control-Allow-Origin") != "https://example.com" {
		t.Errorf("preflight: %d %v", resp.StatusCode, resp.Header)
	}
	// The only session is taken and nobody may wait: 503.
	held, _ := s.pool.acquire(context.Background(), nil)
	resp, body := do(t, h, "POST", "/v1/completions", `{"prompt": "x"}`, "Authorization", "Bearer sekret")
	if resp.StatusCode != 503 || resp.Header.Get("Retry-After") == "" || !strings.Contains(body, "busy") {
		t.Errorf("full queue: %d %v %s", resp.StatusCode, resp.Header, body)
	}
	s.pool.release(held)
}

// The pool hands out the session whose cache shares the longest prefix.
func TestPoolPicksLongestSharedPrefix(t *testing.T) {
	m := tinyModel(t, TypeF32)
	a, b, c := m.NewSession(64, false), m.NewSession(64, false), m.NewSession(64, false)
	a.Forward([]int32{1, 270, 5}, nil)
	b.Forward([]int32{1, 270, 5, 99, 260}, nil)
	c.Forward([]int32{1, 42}, nil)
	p := newSessionPool([]*Session{a, b, c}, 0)
	if got, _ := p.acquire(context.Background(), []int32{1, 270, 5, 99, 260, 261}); got != b {
		t.Fatalf("picked the session with %v", got.History())
	}
	if got, _ := p.acquire(context.Background(), []int32{1, 42, 43}); got != c {
		t.Fatalf("picked the session with %v", got.History())
	}
}

// A panic inside a generation (here in a pool worker) answers 500, resets
// that session and leaves the server serving.
func TestServerRecoversFromPanic(t *testing.T) {
	m := tinyModel(t, TypeF32)
	m.Pool = NewPool(3)
	s := testServer(t, m, 1, 2)
	h := s.routes()
	wq := m.Layers[1].Wq
	m.Layers[1].Wq = &Matrix{Name: "broken", Type: TypeF32, Rows: wq.Rows, Cols: wq.Cols, RowBytes: wq.RowBytes}
	resp, body := do(t, h, "POST", "/v1/completions", `{"prompt": "the a the a the a the a", "max_tokens": 3}`)
	if resp.StatusCode != 500 || !strings.Contains(body, "internal error") {
		t.Fatalf("panicking request: %d %s", resp.StatusCode, body)
	}
	sess, _ := s.pool.acquire(context.Background(), nil)
	if sess.Pos != 0 || len(sess.History()) != 0 {
		t.Errorf("session not reset after a panic: pos %d", sess.Pos)
	}
	s.pool.release(sess)
	m.Layers[1].Wq = wq
	if resp, body := do(t, h, "POST", "/v1/completions", `{"prompt": "the a", "max_tokens": 3}`); resp.StatusCode != 200 {
		t.Fatalf("after the panic: %d %s", resp.StatusCode, body)
	}
}

// Streaming: stop strings never leak, usage comes when asked for.
func TestServerStreamStopAndUsage(t *testing.T) {
	m := tinyModel(t, TypeF32)
	h := testServer(t, m, 1, 1).routes()
	_, full := do(t, h, "POST", "/v1/completions", `{"prompt": "the a", "max_tokens": 10}`)
	text := completionText(t, full)
	// Stop at the first pair of ASCII letters after the start (the random
	// model also emits stray bytes, which JSON shows as U+FFFD).
	i := 1
	for ; i+1 < len(text) && !(isLetter(text[i]) && isLetter(text[i+1])); i++ {
	}
	if i+1 >= len(text) {
		t.Fatalf("no letters to stop at in %q", text)
	}
	stop, _ := json.Marshal(text[i : i+2])
	_, stream := do(t, h, "POST", "/v1/completions", `{"prompt": "the a", "max_tokens": 10, "stream": true, "stop": [`+string(stop)+`], "stream_options": {"include_usage": true}}`)
	var got strings.Builder
	var sawUsage bool
	for _, ev := range strings.Split(stream, "\n\n") {
		ev = strings.TrimPrefix(ev, "data: ")
		if ev == "" || ev == "[DONE]" {
			continue
		}
		var c struct {
			Choices []struct{ Text string }
			Usage   *struct {
				CompletionTokens int `json:"completion_tokens"`
			}
		}
		if err := json.Unmarshal([]byte(ev), &c); err != nil {
			t.Fatalf("event %q: %v", ev, err)
		}
		for _, ch := range c.Choices {
			got.WriteString(ch.Text)
		}
		sawUsage = sawUsage || c.Usage != nil && len(c.Choices) == 0
	}
	if got.String() != text[:i] || !sawUsage {
		t.Fatalf("streamed %q (usage %v), want %q", got.String(), sawUsage, text[:i])
	}
}

func isLetter(c byte) bool { return c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' }

// A request that outlives --timeout gets 504, not silence.
func TestServerTimeout(t *testing.T) {
	m := tinyModel(t, TypeF32)
	s := testServer(t, m, 1, 1)
	s.timeout = time.Nanosecond
	resp, body := do(t, s.routes(), "POST", "/v1/completions", `{"prompt": "the a", "max_tokens": 20}`)
	// The one session is free, so acquire takes it at once (a ready slot
	// wins over the expired deadline) and the generation is what times out.
	if resp.StatusCode != 504 || !strings.Contains(body, "--timeout") {
		t.Fatalf("timeout: %d %s", resp.StatusCode, body)
	}
}
