package main

import (
	"encoding/json"
	"fmt"
	"net/http"
)

// responder shapes one request's answer in OpenAI's formats: a whole
// response, or server-sent events.
type responder struct {
	s       *Server
	w       http.ResponseWriter
	flusher http.Flusher
	chat    bool
	id      string
	created int64
	prompt  int // prompt tokens
	offset  int // completions logprobs: text offset of the next token
}

func (rs *responder) object(stream bool) string {
	switch {
	case rs.chat && stream:
		return "chat.completion.chunk"
	case rs.chat:
		return "chat.completion"
	}
	return "text_completion"
}

func (rs *responder) choice(text string, finish interface{}, stream bool, lps []TokenLogprob, withLP bool) map[string]interface{} {
	c := map[string]interface{}{"index": 0, "finish_reason": finish}
	switch {
	case rs.chat && stream:
		c["delta"] = map[string]string{"content": text}
	case rs.chat:
		c["message"] = map[string]string{"role": "assistant", "content": text}
	default:
		c["text"] = text
	}
	c["logprobs"] = nil
	if withLP {
		c["logprobs"] = rs.logprobs(lps)
	}
	return c
}

func tokenBytes(s string) []int {
	out := make([]int, len(s))
	for i := 0; i < len(s); i++ {
		out[i] = int(s[i])
	}
	return out
}

// logprobs renders chat's {"content": [...]} or completions' parallel lists.
func (rs *responder) logprobs(lps []TokenLogprob) interface{} {
	if rs.chat {
		content := make([]interface{}, len(lps))
		for i, lp := range lps {
			top := make([]interface{}, len(lp.Top))
			for j, t := range lp.Top {
				top[j] = map[string]interface{}{"token": t.Text, "logprob": t.Logprob, "bytes": tokenBytes(t.Text)}
			}
			content[i] = map[string]interface{}{"token": lp.Text, "logprob": lp.Logprob, "bytes": tokenBytes(lp.Text), "top_logprobs": top}
		}
		return map[string]interface{}{"content": content}
	}
	toks := make([]string, len(lps))
	vals := make([]float64, len(lps))
	tops := make([]map[string]float64, len(lps))
	offs := make([]int, len(lps))
	for i, lp := range lps {
		toks[i], vals[i], offs[i] = lp.Text, lp.Logprob, rs.offset
		rs.offset += len(lp.Text)
		tops[i] = map[string]float64{}
		for _, t := range lp.Top {
			tops[i][t.Text] = t.Logprob
		}
	}
	return map[string]interface{}{"tokens": toks, "token_logprobs": vals, "top_logprobs": tops, "text_offset": offs}
}

func (rs *responder) response(text string, lps []TokenLogprob, withLP bool, st GenStats) map[string]interface{} {
	return map[string]interface{}{
		"id": rs.id, "object": rs.object(false), "created": rs.created, "model": rs.s.name,
		"choices": []interface{}{rs.choice(text, st.StopReason, false, lps, withLP)},
		"usage":   usage(rs.prompt, st),
	}
}

func (rs *responder) chunk(c map[string]interface{}) map[string]interface{} {
	return map[string]interface{}{"id": rs.id, "object": rs.object(true), "created": rs.created, "model": rs.s.name,
		"choices": []interface{}{c}}
}

func (rs *responder) startStream() {
	rs.flusher, _ = rs.w.(http.Flusher)
	h := rs.w.Header()
	h.Set("Content-Type", "text/event-stream")
	h.Set("Cache-Control", "no-cache")
	h.Set("X-Accel-Buffering", "no")
	rs.w.WriteHeader(http.StatusOK)
	if rs.chat {
		rs.send(rs.chunk(map[string]interface{}{"index": 0, "delta": map[string]string{"role": "assistant", "content": ""},
			"finish_reason": nil, "logprobs": nil}))
	}
}

// send writes one event; false means the client is gone.
func (rs *responder) send(v interface{}) bool {
	b, _ := json.Marshal(v)
	if _, err := fmt.Fprintf(rs.w, "data: %s\n\n", b); err != nil {
		return false
	}
	if rs.flusher != nil {
		rs.flusher.Flush()
	}
	return true
}

// sendError writes an error event, for failures after the stream began.
func (rs *responder) sendError(msg string) bool {
	return rs.send(map[string]interface{}{"error": map[string]string{"message": msg}})
}

func (rs *responder) done() {
	fmt.Fprint(rs.w, "data: [DONE]\n\n")
	if rs.flusher != nil {
		rs.flusher.Flush()
	}
}
