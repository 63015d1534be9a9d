package main

import (
	"fmt"
	"io"
	"strings"
	"sync"
)

// Chat special tokens of the Llama 3 format (looked up by string: their ids
// differ between vocabularies).
const (
	tokStartHeader = "<|start_header_id|>"
	tokEndHeader   = "<|end_header_id|>"
	tokEndOfTurn   = "<|eot_id|>"
)

// ChatMessage is one turn of a conversation.
type ChatMessage struct {
	Role, Content string
}

// ChatTemplate renders conversations to token ids the way the model was
// trained to read them. It implements the Llama 3 template natively
// (recognised, as llama.cpp does, by "<|start_header_id|>" in the GGUF's
// tokenizer.chat_template); any other template, or none, falls back to
// plain text — each message's content followed by a blank line — with a
// warning printed once.
type ChatTemplate struct {
	Kind string // "llama3" or "plain"
	// Why the plain fallback was chosen (empty for llama3).
	Reason                      string
	tok                         *Tokenizer
	startHeader, endHeader, eot int32
	warnOnce                    sync.Once
	Warn                        io.Writer // where the one-time fallback warning goes (nil: nowhere)
}

// NewChatTemplate picks the template for a model from its GGUF metadata.
func NewChatTemplate(g *GGUFFile, tok *Tokenizer, warn io.Writer) *ChatTemplate {
	c := &ChatTemplate{Kind: "plain", tok: tok, Warn: warn}
	text, err := g.metaString("tokenizer.chat_template")
	switch {
	case err != nil:
		c.Reason = "the model has no tokenizer.chat_template"
	case !strings.Contains(text, tokStartHeader):
		c.Reason = "its tokenizer.chat_template is not the Llama 3 template, the one this engine implements"
	default:
		ids := [3]int32{-1, -1, -1}
		var missing []string
		for i, s := range []string{tokStartHeader, tokEndHeader, tokEndOfTurn} {
			if id, ok := tok.ids[s]; ok {
				ids[i] = id
			} else {
				missing = append(missing, s)
			}
		}
		if len(missing) > 0 {
			c.Reason = "its Llama 3 chat template names tokens the vocabulary lacks: " + strings.Join(missing, " ")
			break
		}
		c.Kind, c.startHeader, c.endHeader, c.eot = "llama3", ids[0], ids[1], ids[2]
	}
	return c
}

// checkRole accepts the roles the template knows.
func checkRole(role string) error {
	switch role {
	case "system", "user", "assistant":
		return nil
	}
	return fmt.Errorf("role %q is not supported (system, user or assistant)", role)
}

// asciiTrim trims the characters llama.cpp's template trim() removes.
func asciiTrim(s string) string { return strings.Trim(s, " \t\n\r\f\v") }

// Render returns the token ids of msgs (BOS first), followed by the header
// that asks the assistant to answer when addGenerationPrompt is set.
//
// Llama 3: <s> then per message <|start_header_id|>role<|end_header_id|>\n\n
// trim(content)<|eot_id|>; the chat tokens are single ids, and each text
// fragment between them is tokenised on its own with the space prefix, as
// llama.cpp tokenises the template's output (parse_special=true). Content
// is always text: a "<|eot_id|>" typed by a user stays characters.
func (c *ChatTemplate) Render(msgs []ChatMessage, addGenerationPrompt bool) ([]int32, error) {
	for i, m := range msgs {
		if err := checkRole(m.Role); err != nil {
			return nil, fmt.Errorf("messages[%d]: %v", i, err)
		}
	}
	if c.Kind != "llama3" {
		c.warnOnce.Do(func() {
			if c.Warn != nil {
				fmt.Fprintf(c.Warn, "nanollama: warning: chat uses plain text (contents separated by blank lines): %s\n", c.Reason)
			}
		})
		var b strings.Builder
		for _, m := range msgs {
			b.WriteString(m.Content)
			b.WriteString("\n\n")
		}
		return c.tok.Encode(b.String(), true), nil
	}
	ids := []int32{c.tok.BOS}
	header := func(role string) {
		ids = append(ids, c.startHeader)
		ids = append(ids, c.tok.Encode(role, false)...)
		ids = append(ids, c.endHeader)
	}
	for _, m := range msgs {
		header(m.Role)
		ids = append(ids, c.tok.Encode("\n\n"+asciiTrim(m.Content), false)...)
		ids = append(ids, c.eot)
	}
	if addGenerationPrompt {
		header("assistant")
		ids = append(ids, c.tok.Encode("\n\n", false)...)
	}
	return ids, nil
}
