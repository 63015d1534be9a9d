package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log"
	"net/http"
	"runtime/debug"
	"strings"
	"sync/atomic"
	"time"
)

// completionRequest is the union of /v1/completions and
// /v1/chat/completions bodies. Fields OpenAI accepts that change nothing
// here (user, metadata, ...) are ignored, as unknown fields are.
type completionRequest struct {
	Model         string          `json:"model"`
	Prompt        json.RawMessage `json:"prompt"`   // string, [string], [int] or [[int]]
	Messages      []chatMessage   `json:"messages"` // content: string or [{type: text, text}]
	MaxTokens     *int            `json:"max_tokens"`
	MaxCompletion *int            `json:"max_completion_tokens"`
	Temperature   *float64        `json:"temperature"`
	TopP          *float64        `json:"top_p"`
	TopK          *int            `json:"top_k"`
	MinP          *float64        `json:"min_p"`
	RepPenalty    *float64        `json:"repeat_penalty"`
	RepPenalty2   *float64        `json:"repetition_penalty"`
	RepWindow     *int            `json:"repeat_last_n"`
	Presence      *float64        `json:"presence_penalty"`
	Frequency     *float64        `json:"frequency_penalty"`
	Seed          *int64          `json:"seed"`
	Stop          json.RawMessage `json:"stop"` // string or [string]
	N             *int            `json:"n"`
	Logprobs      json.RawMessage `json:"logprobs"` // chat: bool; completions: int
	TopLogprobs   *int            `json:"top_logprobs"`
	Stream        bool            `json:"stream"`
	StreamOptions *struct {
		IncludeUsage bool `json:"include_usage"`
	} `json:"stream_options"`
}

type chatMessage struct {
	Role    string          `json:"role"`
	Content json.RawMessage `json:"content"`
}

// messageText flattens a message's content: a string, or an array of parts
// of which the text parts are kept.
func messageText(raw json.RawMessage) (string, error) {
	var s string
	if err := json.Unmarshal(raw, &s); err == nil {
		return s, nil
	}
	var parts []struct {
		Type string `json:"type"`
		Text string `json:"text"`
	}
	if err := json.Unmarshal(raw, &parts); err != nil {
		return "", errors.New("message content must be a string or an array of {type: \"text\", text} parts")
	}
	var b strings.Builder
	for _, p := range parts {
		if p.Type != "text" {
			return "", fmt.Errorf("content parts of type %q are not supported (text only)", p.Type)
		}
		b.WriteString(p.Text)
	}
	return b.String(), nil
}

// promptIDs turns the request's prompt or messages into token ids.
func (s *Server) promptIDs(req *completionRequest, chat bool) ([]int32, error) {
	if chat {
		if len(req.Messages) == 0 {
			return nil, errors.New("messages must be a non-empty array of {role, content}")
		}
		msgs := make([]ChatMessage, len(req.Messages))
		for i, m := range req.Messages {
			t, err := messageText(m.Content)
			if err != nil {
				return nil, fmt.Errorf("messages[%d]: %v", i, err)
			}
			msgs[i] = ChatMessage{Role: m.Role, Content: t}
		}
		return s.m.Chat.Render(msgs, true)
	}
	if len(req.Prompt) == 0 || string(req.Prompt) == "null" {
		return nil, errors.New("prompt is required (a string, or an array of one string or of token ids)")
	}
	var text string
	if json.Unmarshal(req.Prompt, &text) == nil {
		return s.m.Tok.Encode(text, true), nil
	}
	var texts []string
	if json.Unmarshal(req.Prompt, &texts) == nil {
		if len(texts) != 1 {
			return nil, fmt.Errorf("prompt arrays of %d strings are not supported (send one prompt per request)", len(texts))
		}
		return s.m.Tok.Encode(texts[0], true), nil
	}
	var ids []int64
	if json.Unmarshal(req.Prompt, &ids) == nil {
		return s.tokenIDs(ids)
	}
	var batches [][]int64
	if json.Unmarshal(req.Prompt, &batches) == nil && len(batches) == 1 {
		return s.tokenIDs(batches[0])
	}
	return nil, errors.New("prompt must be a string, an array of one string, an array of token ids, or an array of one such array")
}

// stopStrings reads "stop": a string or an array of up to 4 strings.
func stopStrings(raw json.RawMessage) ([]string, error) {
	if len(raw) == 0 || string(raw) == "null" {
		return nil, nil
	}
	var one string
	if json.Unmarshal(raw, &one) == nil {
		raw, _ = json.Marshal([]string{one})
	}
	var list []string
	if err := json.Unmarshal(raw, &list); err != nil || len(list) > 4 {
		return nil, errors.New("stop must be a string or an array of at most 4 strings")
	}
	out := list[:0]
	for _, x := range list {
		if x != "" {
			out = append(out, x)
		}
	}
	return out, nil
}

// logprobCount reads logprobs the way each endpoint defines it: chat takes
// logprobs: true with top_logprobs 0-20, completions logprobs 0-5. -1: off.
func logprobCount(req *completionRequest, chat bool) (int, error) {
	raw := req.Logprobs
	if len(raw) == 0 || string(raw) == "null" || string(raw) == "false" {
		if req.TopLogprobs != nil && *req.TopLogprobs > 0 {
			return 0, errors.New("top_logprobs needs logprobs: true")
		}
		return -1, nil
	}
	if chat {
		if string(raw) != "true" {
			return 0, errors.New("logprobs must be a boolean")
		}
		n := 0
		if req.TopLogprobs != nil {
			n = *req.TopLogprobs
		}
		if n < 0 || n > 20 {
			return 0, errors.New("top_logprobs must be between 0 and 20")
		}
		return n, nil
	}
	var n int
	if err := json.Unmarshal(raw, &n); err != nil || n < 0 || n > 5 {
		return 0, errors.New("logprobs must be an integer between 0 and 5")
	}
	return n, nil
}

// samplerFor applies the request's sampling fields over the server's defaults.
func (s *Server) samplerFor(req *completionRequest) (SamplerConfig, error) {
	cfg := s.defaults
	cfg.Seed = time.Now().UnixNano()
	setF := func(dst *float32, v *float64) {
		if v != nil {
			*dst = float32(*v)
		}
	}
	setF(&cfg.Temp, req.Temperature)
	setF(&cfg.TopP, req.TopP)
	setF(&cfg.MinP, req.MinP)
	setF(&cfg.RepPenalty, req.RepPenalty)
	setF(&cfg.RepPenalty, req.RepPenalty2)
	setF(&cfg.Presence, req.Presence)
	setF(&cfg.Frequency, req.Frequency)
	if req.TopK != nil {
		cfg.TopK = *req.TopK
	}
	if req.RepWindow != nil {
		cfg.RepWindow = *req.RepWindow
	}
	if req.Seed != nil {
		cfg.Seed = *req.Seed
	}
	switch {
	case cfg.Temp < 0 || cfg.Temp > 100:
		return cfg, errors.New("temperature must be between 0 and 100")
	case cfg.TopP < 0 || cfg.TopP > 1:
		return cfg, errors.New("top_p must be between 0 and 1")
	case cfg.MinP < 0 || cfg.MinP > 1:
		return cfg, errors.New("min_p must be between 0 and 1")
	case cfg.TopK < 0:
		return cfg, errors.New("top_k must be ≥ 0")
	case cfg.RepPenalty < 0:
		return cfg, errors.New("repetition penalty must be ≥ 0")
	case cfg.Presence < -2 || cfg.Presence > 2:
		return cfg, errors.New("presence_penalty must be between -2 and 2")
	case cfg.Frequency < -2 || cfg.Frequency > 2:
		return cfg, errors.New("frequency_penalty must be between -2 and 2")
	}
	return cfg, nil
}

func (s *Server) handleCompletion(w http.ResponseWriter, r *http.Request, chat bool) {
	var req completionRequest
	if !decodeBody(w, r, &req) {
		return
	}
	bad := func(msg string) { writeError(w, http.StatusBadRequest, msg) }
	if req.N != nil && *req.N != 1 {
		bad("n must be 1: this server returns one choice per request (send several requests instead)")
		return
	}
	ids, err := s.promptIDs(&req, chat)
	if err != nil {
		bad(err.Error())
		return
	}
	if len(ids) == 0 {
		bad("the prompt is empty")
		return
	}
	maxTok := s.defMax
	for _, m := range []*int{req.MaxTokens, req.MaxCompletion} {
		if m != nil {
			maxTok = *m
		}
	}
	if maxTok < 0 || maxTok > s.maxTokens {
		bad(fmt.Sprintf("max_tokens must be between 0 and %d", s.maxTokens))
		return
	}
	cfg, err := s.samplerFor(&req)
	if err != nil {
		bad(err.Error())
		return
	}
	stops, err := stopStrings(req.Stop)
	if err != nil {
		bad(err.Error())
		return
	}
	nLogprobs, err := logprobCount(&req, chat)
	if err != nil {
		bad(err.Error())
		return
	}
	if len(ids) >= s.maxTokens {
		bad(fmt.Sprintf("prompt is %d tokens; the context holds %d", len(ids), s.maxTokens))
		return
	}
	if len(ids)+maxTok > s.maxTokens {
		maxTok = s.maxTokens - len(ids)
	}

	ctx, cancel := context.WithTimeout(r.Context(), s.timeout)
	defer cancel()
	sess, err := s.pool.acquire(ctx, ids)
	if err == errBusy {
		atomic.AddInt64(&s.metrics.rejected, 1)
		w.Header().Set("Retry-After", "1")
		writeError(w, http.StatusServiceUnavailable, "server busy: all sessions are generating and the queue is full; retry shortly")
		return
	} else if err != nil {
		if r.Context().Err() == nil { // our deadline, not the client leaving
			w.Header().Set("Retry-After", "1")
			writeError(w, http.StatusServiceUnavailable, "timed out waiting for a free session; retry shortly")
		}
		return
	}
	atomic.AddInt64(&s.metrics.requests, 1)
	headerSent := false
	defer func() {
		// A panic in one generation must not take the others down: its
		// session's cache may be half-written, so it starts empty again.
		if p := recover(); p != nil {
			sess.Reset()
			atomic.AddInt64(&s.metrics.failed, 1)
			log.Printf("panic serving %s: %v\n%s", r.URL.Path, p, debug.Stack())
			if !headerSent {
				writeError(w, http.StatusInternalServerError, fmt.Sprintf("internal error: %v", p))
			}
		}
		s.pool.release(sess)
	}()

	rs := &responder{s: s, w: w, chat: chat, created: time.Now().Unix(), prompt: len(ids),
		id: fmt.Sprintf("cmpl-%d", atomic.AddInt64(&s.nextID, 1))}
	if chat {
		rs.id = "chat" + rs.id
	}
	opts := GenOptions{MaxTokens: maxTok, Sampler: NewSampler(cfg), Stop: stops, Logprobs: nLogprobs, Ctx: ctx}
	timeoutMsg := fmt.Sprintf("generation exceeded the server's --timeout of %v", s.timeout)
	if !req.Stream {
		var out strings.Builder
		var lps []TokenLogprob
		st, err := GenerateWith(sess, s.m.Tok, ids, opts, func(p Piece) bool {
			out.WriteString(p.Text)
			lps = append(lps, p.Logprobs...)
			return true
		})
		if err != nil {
			atomic.AddInt64(&s.metrics.failed, 1)
			writeError(w, http.StatusInternalServerError, err.Error())
			return
		}
		if st.StopReason == "cancelled" {
			if r.Context().Err() == nil {
				headerSent = true
				writeError(w, http.StatusGatewayTimeout, timeoutMsg)
			}
			return
		}
		s.metrics.add(st)
		logStats(r, st)
		headerSent = true
		writeJSON(w, http.StatusOK, rs.response(out.String(), lps, nLogprobs >= 0, st))
		return
	}
	headerSent = true
	rs.startStream()
	st, err := GenerateWith(sess, s.m.Tok, ids, opts, func(p Piece) bool {
		return rs.send(rs.chunk(rs.choice(p.Text, nil, true, p.Logprobs, nLogprobs >= 0)))
	})
	if err != nil {
		atomic.AddInt64(&s.metrics.failed, 1)
		rs.sendError(err.Error())
	} else if st.StopReason == "cancelled" {
		if r.Context().Err() == nil {
			rs.sendError(timeoutMsg)
		}
	} else {
		s.metrics.add(st)
		last := rs.choice("", st.StopReason, true, nil, false)
		if chat {
			last["delta"] = map[string]string{}
		}
		rs.send(rs.chunk(last))
		if req.StreamOptions != nil && req.StreamOptions.IncludeUsage {
			// As OpenAI: a last chunk with no choices carries the usage.
			final := rs.chunk(nil)
			final["choices"] = []interface{}{}
			final["usage"] = usage(rs.prompt, st)
			rs.send(final)
		}
		logStats(r, st)
	}
	rs.done()
}

func usage(prompt int, st GenStats) map[string]interface{} {
	return map[string]interface{}{"prompt_tokens": prompt, "completion_tokens": st.GenTokens,
		"total_tokens":          prompt + st.GenTokens,
		"prompt_tokens_details": map[string]int{"cached_tokens": st.CachedTokens}}
}
