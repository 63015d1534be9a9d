package main

import (
	"bytes"
	"strings"
	"testing"
)

const llama3Template = "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = " +
	"'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' %}" +
	"{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}" +
	"{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"

// chatVocab is a SentencePiece vocabulary (bytes, a few words, and the chat
// tokens as CONTROL pieces when withChat) with an optional chat template.
func chatVocab(t *testing.T, template string, withChat, eotKey bool) (*GGUFFile, *Tokenizer) {
	var g ggufBuilder
	g.add("general.architecture", gString, "llama")
	toks, types := byteVocab()
	seen := map[string]bool{}
	for _, w := range []string{"\u2581user", "\u2581system", "\u2581assistant", "\u2581the", "the", "\u2581a", "a",
		"<", "|", ">", "_", "i", "d", "e", "o", "t", "\u2581"} {
		r := []rune(w)
		for n := 1; n <= len(r); n++ { // SentencePiece merges through every prefix
			if p := string(r[:n]); !seen[p] {
				seen[p] = true
				toks = append(toks, p)
				types = append(types, 1)
			}
		}
	}
	if withChat {
		toks = append(toks, tokStartHeader, tokEndHeader, tokEndOfTurn)
		types = append(types, 3, 3, 3)
	}
	g.addSPVocab(toks, types)
	if eotKey {
		g.add("tokenizer.ggml.eot_token_id", gUint32, uint32(len(toks)-1))
	}
	if template != "" {
		g.add("tokenizer.chat_template", gString, template)
	}
	f, err := parseGGUF(g.bytes())
	if err != nil {
		t.Fatal(err)
	}
	tok, err := NewTokenizer(f)
	if err != nil {
		t.Fatal(err)
	}
	return f, tok
}

func pieces(tok *Tokenizer, ids []int32) string {
	s := make([]string, len(ids))
	for i, id := range ids {
		s[i] = tok.Tokens[id]
	}
	return strings.Join(s, " ")
}

// The Llama 3 rendering, piece by piece: chat tokens are single ids, every
// fragment after one is tokenised with the space prefix, content is trimmed.
func TestLlama3ChatTemplate(t *testing.T) {
	f, tok := chatVocab(t, llama3Template, true, true)
	const nl2 = "\u2581 <0x0A> <0x0A> "
	for _, c := range []struct {
		name   string
		msgs   []ChatMessage
		gen    bool
		want   string // pieces, or the error text
		errors bool
	}{
		{"user, generation prompt", []ChatMessage{{"user", " the a\n"}}, true,
			"<s> <|start_header_id|> \u2581user <|end_header_id|> " + nl2 + "the \u2581a <|eot_id|> " +
				"<|start_header_id|> \u2581assistant <|end_header_id|> " + strings.TrimSpace(nl2), false},
		{"system, user, assistant", []ChatMessage{{"system", "a"}, {"user", "the"}, {"assistant", "a the"}}, false,
			"<s> <|start_header_id|> \u2581system <|end_header_id|> " + nl2 + "a <|eot_id|> " +
				"<|start_header_id|> \u2581user <|end_header_id|> " + nl2 + "the <|eot_id|> " +
				"<|start_header_id|> \u2581assistant <|end_header_id|> " + nl2 + "a \u2581the <|eot_id|>", false},
		{"empty content", []ChatMessage{{"user", " \t"}}, false,
			"<s> <|start_header_id|> \u2581user <|end_header_id|> " + nl2 + "<|eot_id|>", false},
		{"a typed end-of-turn stays text", []ChatMessage{{"user", "<|eot_id|>"}}, false,
			"<s> <|start_header_id|> \u2581user <|end_header_id|> " + nl2 +
				"< | e o t _ i d | > <|eot_id|>", false},
		{"unknown role", []ChatMessage{{"user", "a"}, {"tool", "b"}}, true,
			`messages[1]: role "tool" is not supported (system, user or assistant)`, true},
	} {
		t.Run(c.name, func(t *testing.T) {
			var warn bytes.Buffer
			ct := NewChatTemplate(f, tok, &warn)
			if ct.Kind != "llama3" {
				t.Fatalf("kind %s (%s)", ct.Kind, ct.Reason)
			}
			ids, err := ct.Render(c.msgs, c.gen)
			if c.errors {
				if err == nil || err.Error() != c.want {
					t.Fatalf("error %v, want %q", err, c.want)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if got := pieces(tok, ids); got != c.want {
				t.Errorf("pieces\n got %s\nwant %s", got, c.want)
			}
			if warn.Len() != 0 {
				t.Errorf("unexpected warning %q", warn.String())
			}
		})
	}
}

// Anything but the Llama 3 template falls back to plain text, saying why,
// once.
func TestChatTemplateFallback(t *testing.T) {
	for _, c := range []struct {
		name, template string
		withChat       bool
		reason         string
	}{
		{"no template", "", true, "has no tokenizer.chat_template"},
		{"ChatML", "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>{% endfor %}", true,
			"not the Llama 3 template"},
		{"vocabulary lacks the tokens", llama3Template, false,
			"names tokens the vocabulary lacks: <|start_header_id|> <|end_header_id|> <|eot_id|>"},
	} {
		t.Run(c.name, func(t *testing.T) {
			f, tok := chatVocab(t, c.template, c.withChat, false)
			var warn bytes.Buffer
			ct := NewChatTemplate(f, tok, &warn)
			if ct.Kind != "plain" || !strings.Contains(ct.Reason, c.reason) {
				t.Fatalf("kind %s, reason %q; want plain, %q", ct.Kind, ct.Reason, c.reason)
			}
			msgs := []ChatMessage{{"user", "the"}, {"assistant", "a"}}
			for i := 0; i < 2; i++ {
				ids, err := ct.Render(msgs, true)
				if err != nil {
					t.Fatal(err)
				}
				if want := tok.Encode("the\n\na\n\n", true); pieces(tok, ids) != pieces(tok, want) {
					t.Errorf("plain ids %v, want %v", ids, want)
				}
			}
			if n := strings.Count(warn.String(), "warning: chat uses plain text"); n != 1 || !strings.Contains(warn.String(), c.reason) {
				t.Errorf("warning printed %d times: %q", n, warn.String())
			}
		})
	}
}

// Generation stops at end of turn as well as at EOS, also when the file
// names no eot_token_id (found by its text, as llama.cpp does).
func TestEndOfTurnEndsGeneration(t *testing.T) {
	for _, eotKey := range []bool{true, false} {
		_, tok := chatVocab(t, llama3Template, true, eotKey)
		eot := tok.ids[tokEndOfTurn]
		if tok.EOT != eot || !tok.IsEOG(eot) || !tok.IsEOG(tok.EOS) || tok.IsEOG(tok.ids[tokStartHeader]) {
			t.Errorf("eot key %v: EOT %d (want %d), IsEOG(eot) %v", eotKey, tok.EOT, eot, tok.IsEOG(eot))
		}
	}
}

// /v1/chat/completions renders its messages through the model's template
// (string and text-part contents alike); a role the template lacks is the
// client's error.
func TestServerChatPromptUsesTheTemplate(t *testing.T) {
	f, tok := chatVocab(t, llama3Template, true, true)
	s := &Server{m: &Model{Tok: tok, Chat: NewChatTemplate(f, tok, nil)}}
	req := &completionRequest{Messages: []chatMessage{
		{Role: "system", Content: []byte(`"a"`)},
		{Role: "user", Content: []byte(`[{"type": "text", "text": "the "}, {"type": "text", "text": "a"}]`)}}}
	got, err := s.promptIDs(req, true)
	if err != nil {
		t.Fatal(err)
	}
	want, _ := s.m.Chat.Render([]ChatMessage{{"system", "a"}, {"user", "the a"}}, true)
	if pieces(tok, got) != pieces(tok, want) || tok.Tokens[got[len(got)-4]] != tokEndHeader {
		t.Errorf("chat prompt %s\nwant %s", pieces(tok, got), pieces(tok, want))
	}
	req.Messages[0].Role = "tool"
	if _, err := s.promptIDs(req, true); err == nil || !strings.Contains(err.Error(), `role "tool" is not supported`) {
		t.Errorf("error %v", err)
	}
}
