package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"log"
	"net"
	"net/http"
	"os"
	"strconv"
	"strings"
	"sync/atomic"
	"time"
)

const maxBodyBytes = 1 << 20 // request bodies above 1 MiB get 413

// Server serves the OpenAI-shaped API and the chat page. Generations run
// concurrently on a pool of sessions (each with its own KV cache); the
// weights are shared read-only.
type Server struct {
	m         *Model
	name      string
	sessions  chan *Session
	defaults  SamplerConfig
	defMax    int
	maxTokens int
	nextID    int64
}

func serve(m *Model, o *options, smp SamplerConfig, ctx int) error {
	n := o.parallel
	if n < 1 {
		n = 1
	}
	if ctx > m.Cfg.CtxLen {
		ctx = m.Cfg.CtxLen
	}
	s := &Server{m: m, name: baseName(o.model), sessions: make(chan *Session, n), defaults: smp,
		defMax: o.maxTokens, maxTokens: ctx}
	for i := 0; i < n; i++ {
		s.sessions <- m.NewSession(ctx, o.kvType == "f32")
	}
	addr := net.JoinHostPort(o.host, strconv.Itoa(o.port))
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return fmt.Errorf("cannot listen on %s: %v", addr, err)
	}
	fmt.Fprintf(os.Stderr, "%s\nserving %s on http://%s (%d parallel sessions, context %d)\n", m, s.name, ln.Addr(), n, ctx)
	srv := &http.Server{Handler: s.routes(), ReadHeaderTimeout: 10 * time.Second}
	return srv.Serve(ln)
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
	mux.HandleFunc("/v1/models", s.handleModels)
	mux.HandleFunc("/v1/completions", func(w http.ResponseWriter, r *http.Request) { s.handleCompletion(w, r, false) })
	mux.HandleFunc("/v1/chat/completions", func(w http.ResponseWriter, r *http.Request) { s.handleCompletion(w, r, true) })
	return mux
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

func (s *Server) handleIndex(w http.ResponseWriter, r *http.Request) {
	if r.URL.Path != "/" {
		writeError(w, http.StatusNotFound, "not found: "+r.URL.Path)
		return
	}
	w.Header().Set("Content-Type", "text/html; charset=utf-8")
	fmt.Fprint(w, strings.Replace(chatPage, "{{MODEL}}", s.name, 1))
}

func (s *Server) handleHealth(w http.ResponseWriter, r *http.Request) {
	writeJSON(w, http.StatusOK, map[string]interface{}{"status": "ok", "model": s.name,
		"sessions_free": len(s.sessions), "sessions": cap(s.sessions)})
}

func (s *Server) handleModels(w http.ResponseWriter, r *http.Request) {
	writeJSON(w, http.StatusOK, map[string]interface{}{"object": "list", "data": []interface{}{
		map[string]interface{}{"id": s.name, "object": "model", "owned_by": "nanollama"}}})
}

type chatMessage struct {
	Role    string `json:"role"`
	Content string `json:"content"`
}

type completionRequest struct {
	Model       string        `json:"model"`
	Prompt      *string       `json:"prompt"`
	Messages    []chatMessage `json:"messages"`
	MaxTokens   *int          `json:"max_tokens"`
	Temperature *float64      `json:"temperature"`
	TopP        *float64      `json:"top_p"`
	TopK        *int          `json:"top_k"`
	MinP        *float64      `json:"min_p"`
	RepPenalty  *float64      `json:"repeat_penalty"`
	RepPenalty2 *float64      `json:"repetition_penalty"`
	RepWindow   *int          `json:"repeat_last_n"`
	Seed        *int64        `json:"seed"`
	Stream      bool          `json:"stream"`
}

// chatPrompt renders messages as plain text: each message's content,
// separated by blank lines, ending where the assistant should continue
// (the layout nanollama's personality data uses).
func chatPrompt(msgs []chatMessage) string {
	var b strings.Builder
	for _, m := range msgs {
		b.WriteString(m.Content)
		b.WriteString("\n\n")
	}
	return b.String()
}

func (s *Server) handleCompletion(w http.ResponseWriter, r *http.Request, chat bool) {
	if r.Method != http.MethodPost {
		w.Header().Set("Allow", "POST")
		writeError(w, http.StatusMethodNotAllowed, "use POST")
		return
	}
	var req completionRequest
	dec := json.NewDecoder(http.MaxBytesReader(w, r.Body, maxBodyBytes))
	if err := dec.Decode(&req); err != nil {
		var mbe *http.MaxBytesError
		if errors.As(err, &mbe) {
			writeError(w, http.StatusRequestEntityTooLarge, fmt.Sprintf("request body exceeds %d bytes", maxBodyBytes))
			return
		}
		writeError(w, http.StatusBadRequest, "invalid JSON body: "+err.Error())
		return
	}
	var prompt string
	if chat {
		if len(req.Messages) == 0 {
			writeError(w, http.StatusBadRequest, "messages must be a non-empty array of {role, content}")
			return
		}
		prompt = chatPrompt(req.Messages)
	} else {
		if req.Prompt == nil {
			writeError(w, http.StatusBadRequest, "prompt (a string) is required")
			return
		}
		prompt = *req.Prompt
	}
	cfg := s.defaults
	cfg.Seed = time.Now().UnixNano()
	maxTok := s.defMax
	if req.MaxTokens != nil {
		maxTok = *req.MaxTokens
	}
	if maxTok < 0 || maxTok > s.maxTokens {
		writeError(w, http.StatusBadRequest, fmt.Sprintf("max_tokens must be between 0 and %d", s.maxTokens))
		return
	}
	if req.Temperature != nil {
		cfg.Temp = float32(*req.Temperature)
	}
	if req.TopP != nil {
		cfg.TopP = float32(*req.TopP)
	}
	if req.TopK != nil {
		cfg.TopK = *req.TopK
	}
	if req.MinP != nil {
		cfg.MinP = float32(*req.MinP)
	}
	if req.RepPenalty != nil {
		cfg.RepPenalty = float32(*req.RepPenalty)
	}
	if req.RepPenalty2 != nil {
		cfg.RepPenalty = float32(*req.RepPenalty2)
	}
	if req.RepWindow != nil {
		cfg.RepWindow = *req.RepWindow
	}
	if req.Seed != nil {
		cfg.Seed = *req.Seed
	}
	if cfg.Temp < 0 || cfg.TopP < 0 || cfg.TopP > 1 || cfg.MinP < 0 || cfg.MinP > 1 || cfg.TopK < 0 || cfg.RepPenalty < 0 {
		writeError(w, http.StatusBadRequest, "sampling parameters out of range")
		return
	}
	ids := s.m.Tok.Encode(prompt, true)
	if len(ids) >= s.maxTokens {
		writeError(w, http.StatusBadRequest, fmt.Sprintf("prompt is %d tokens; the context holds %d", len(ids), s.maxTokens))
		return
	}
	if len(ids)+maxTok > s.maxTokens {
		maxTok = s.maxTokens - len(ids)
	}

	// Wait for a free session (or for the client to go away).
	var sess *Session
	select {
	case sess = <-s.sessions:
	case <-r.Context().Done():
		return
	}
	defer func() { s.sessions <- sess }()

	id := fmt.Sprintf("cmpl-%d", atomic.AddInt64(&s.nextID, 1))
	created := time.Now().Unix()
	object := "text_completion"
	if chat {
		object = "chat.completion"
		id = "chat" + id
	}
	choice := func(text string, finish interface{}, stream bool) map[string]interface{} {
		c := map[string]interface{}{"index": 0, "finish_reason": finish}
		switch {
		case chat && stream:
			c["delta"] = map[string]string{"content": text}
		case chat:
			c["message"] = map[string]string{"role": "assistant", "content": text}
		default:
			c["text"] = text
		}
		return c
	}
	smp := NewSampler(cfg)
	if !req.Stream {
		var out strings.Builder
		st, err := Generate(sess, s.m.Tok, ids, maxTok, smp, func(t string) bool {
			out.WriteString(t)
			return r.Context().Err() == nil
		})
		if err != nil {
			writeError(w, http.StatusInternalServerError, err.Error())
			return
		}
		logStats(r, st)
		writeJSON(w, http.StatusOK, map[string]interface{}{
			"id": id, "object": object, "created": created, "model": s.name,
			"choices": []interface{}{choice(out.String(), st.StopReason, false)},
			"usage": map[string]int{"prompt_tokens": len(ids), "completion_tokens": st.GenTokens,
				"total_tokens": len(ids) + st.GenTokens},
		})
		return
	}
	flusher, _ := w.(http.Flusher)
	w.Header().Set("Content-Type", "text/event-stream")
	w.Header().Set("Cache-Control", "no-cache")
	w.Header().Set("Connection", "keep-alive")
	w.WriteHeader(http.StatusOK)
	if chat {
		object = "chat.completion.chunk"
	}
	send := func(v interface{}) bool {
		b, _ := json.Marshal(v)
		if _, err := fmt.Fprintf(w, "data: %s\n\n", b); err != nil {
			return false
		}
		if flusher != nil {
			flusher.Flush()
		}
		return r.Context().Err() == nil
	}
	chunk := func(c map[string]interface{}) map[string]interface{} {
		return map[string]interface{}{"id": id, "object": object, "created": created, "model": s.name,
			"choices": []interface{}{c}}
	}
	if chat {
		send(chunk(map[string]interface{}{"index": 0, "delta": map[string]string{"role": "assistant"}, "finish_reason": nil}))
	}
	st, err := Generate(sess, s.m.Tok, ids, maxTok, smp, func(t string) bool {
		return send(chunk(choice(t, nil, true)))
	})
	if err != nil {
		send(map[string]interface{}{"error": map[string]string{"message": err.Error()}})
	} else {
		last := choice("", st.StopReason, true)
		if chat {
			last["delta"] = map[string]string{}
		}
		final := chunk(last)
		final["usage"] = map[string]int{"prompt_tokens": len(ids), "completion_tokens": st.GenTokens,
			"total_tokens": len(ids) + st.GenTokens}
		send(final)
		logStats(r, st)
	}
	fmt.Fprint(w, "data: [DONE]\n\n")
	if flusher != nil {
		flusher.Flush()
	}
}

func logStats(r *http.Request, st GenStats) {
	log.Printf("%s %s: %s", r.Method, r.URL.Path, st)
}

const chatPage = `<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>nanollama · {{MODEL}}</title>
<style>
body{font-family:system-ui,sans-serif;max-width:760px;margin:0 auto;padding:1rem;background:#fafafa;color:#222}
h1{font-size:1.2rem} #log{display:flex;flex-direction:column;gap:.6rem;margin-bottom:1rem}
.msg{padding:.6rem .8rem;border-radius:.6rem;white-space:pre-wrap;line-height:1.4}
.user{background:#dbeafe;align-self:flex-end;max-width:85%} .assistant{background:#fff;border:1px solid #ddd;max-width:85%}
form{display:flex;gap:.5rem} textarea{flex:1;font:inherit;padding:.5rem;min-height:3rem}
button{font:inherit;padding:.5rem 1rem} .opts{font-size:.85rem;color:#555;margin:.5rem 0}
.opts input{width:4rem} #stats{font-size:.8rem;color:#777}
</style></head><body>
<h1>nanollama · {{MODEL}}</h1>
<div id="log"></div>
<form id="f"><textarea id="q" placeholder="Say something… (Enter to send, Shift+Enter for a new line)"></textarea><button id="send">Send</button></form>
<div class="opts">temperature <input id="temp" value="0.8"> top-p <input id="topp" value="0.9"> top-k <input id="topk" value="50"> max tokens <input id="maxt" value="256">
<button type="button" id="clear">Clear</button></div>
<div id="stats"></div>
<script>
const log = document.getElementById('log'), q = document.getElementById('q'), stats = document.getElementById('stats');
let messages = [];
function add(role, text) { const d = document.createElement('div'); d.className = 'msg ' + role; d.textContent = text; log.appendChild(d); d.scrollIntoView(); return d; }
document.getElementById('clear').onclick = () => { messages = []; log.innerHTML = ''; };
q.addEventListener('keydown', e => { if (e.key === 'Enter' && !e.shiftKey) { e.preventDefault(); document.getElementById('f').requestSubmit(); } });
document.getElementById('f').onsubmit = async e => {
  e.preventDefault();
  const text = q.value.trim(); if (!text) return;
  q.value = ''; add('user', text); messages.push({role: 'user', content: text});
  const out = add('assistant', ''); const t0 = performance.now(); let n = 0;
  const body = {messages, stream: true, temperature: +document.getElementById('temp').value,
    top_p: +document.getElementById('topp').value, top_k: +document.getElementById('topk').value,
    max_tokens: +document.getElementById('maxt').value};
  try {
    const res = await fetch('/v1/chat/completions', {method: 'POST', headers: {'Content-Type': 'application/json'}, body: JSON.stringify(body)});
    if (!res.ok) { out.textContent = 'error: ' + (await res.json()).error.message; return; }
    const reader = res.body.getReader(), dec = new TextDecoder(); let buf = '';
    for (;;) {
      const {value, done} = await reader.read(); if (done) break;
      buf += dec.decode(value, {stream: true});
      let i;
      while ((i = buf.indexOf('\n\n')) >= 0) {
        const line = buf.slice(0, i); buf = buf.slice(i + 2);
        if (!line.startsWith('data: ')) continue;
        const data = line.slice(6); if (data === '[DONE]') continue;
        const ev = JSON.parse(data);
        if (ev.error) { out.textContent += '\n[error: ' + ev.error.message + ']'; continue; }
        const c = ev.choices[0];
        if (c.delta && c.delta.content) { out.textContent += c.delta.content; n++; out.scrollIntoView(); }
        if (ev.usage) n = ev.usage.completion_tokens;
      }
    }
    messages.push({role: 'assistant', content: out.textContent});
    const s = (performance.now() - t0) / 1000; stats.textContent = n + ' tokens in ' + s.toFixed(2) + 's (' + (n / s).toFixed(1) + ' tok/s)';
  } catch (err) { out.textContent += '\n[error: ' + err + ']'; }
};
</script></body></html>
`
