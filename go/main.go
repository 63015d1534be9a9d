// Command nanollama runs llama-architecture GGUF models: one-shot, REPL,
// stdin, or as an HTTP server with an OpenAI-shaped API and a chat page.
package main

import (
	"bufio"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"os"
	"runtime"
	"strings"
	"time"
)

const usageText = `nanollama: a pure-Go inference engine for llama GGUF models.

Usage:
  nanollama --model m.gguf --prompt "Once upon a time" [options]
  echo "Once upon a time" | nanollama --model m.gguf
  nanollama --model m.gguf --interactive [--system "You are terse."]
  nanollama --model m.gguf --chat --prompt "What does len() return?"
  nanollama --model m.gguf --messages conversation.json --tokenize
  nanollama --model m.gguf --serve --host 127.0.0.1 --port 8080 [--api-key KEY] [--cors-origin '*']
  nanollama --model m.gguf --tokens ids.npy --dump-logits logits.npy
  nanollama --model m.gguf --list-tensors

Example:
  nanollama --model nano.gguf --prompt "The meaning of life is" --max-tokens 64 --temp 0.8 --seed 1

Options:
`

type options struct {
	model, prompt                   string
	maxTokens                       int
	temp, topP, minP, repPenalty    float64
	topK, repWindow, threads, ctx   int
	seed                            int64
	interactive, serve, listTensors bool
	chat                            bool
	system, messages                string
	tokenize, ignoreEOS             bool
	host                            string
	port, parallel                  int
	tokens, dumpLogits, kvType      string
	gamma, lora                     string
	alpha, loraScale                float64
	srv                             serverOptions
}

func main() {
	var o options
	fs := flag.NewFlagSet("nanollama", flag.ContinueOnError)
	fs.SetOutput(os.Stderr)
	fs.Usage = func() {
		fmt.Fprint(os.Stderr, usageText)
		fs.PrintDefaults()
	}
	fs.StringVar(&o.model, "model", "", "GGUF model file (required)")
	fs.StringVar(&o.prompt, "prompt", "", "prompt text (one-shot mode)")
	fs.IntVar(&o.maxTokens, "max-tokens", 256, "maximum tokens to generate")
	fs.Float64Var(&o.temp, "temp", 0.8, "temperature (0 = greedy)")
	fs.IntVar(&o.topK, "top-k", 50, "top-k (0 = off)")
	fs.Float64Var(&o.topP, "top-p", 0.9, "top-p / nucleus (1 = off)")
	fs.Float64Var(&o.minP, "min-p", 0, "min-p (0 = off)")
	fs.Float64Var(&o.repPenalty, "rep-penalty", 1.1, "repetition penalty (1 = off)")
	fs.IntVar(&o.repWindow, "rep-window", 64, "tokens the repetition penalty looks back over (-1 = all)")
	fs.Int64Var(&o.seed, "seed", 42, "random seed")
	fs.IntVar(&o.threads, "threads", runtime.NumCPU(), "worker threads")
	fs.IntVar(&o.ctx, "ctx", 0, "context length (0 = the model's, at most 2048)")
	fs.StringVar(&o.kvType, "kv-type", "f16", "KV cache precision: f16 (as llama.cpp) or f32")
	fs.BoolVar(&o.interactive, "interactive", false, "interactive chat: each line is a user message, rendered with the model's chat template")
	fs.BoolVar(&o.chat, "chat", false, "one-shot: the prompt is a user message, rendered with the model's chat template; the answer ends at end of turn")
	fs.StringVar(&o.system, "system", "", "system message for --chat and --interactive")
	fs.StringVar(&o.messages, "messages", "", "one-shot chat on a conversation: a JSON file of [{\"role\", \"content\"}, ...] (implies --chat)")
	fs.BoolVar(&o.serve, "serve", false, "run the HTTP server")
	fs.StringVar(&o.host, "host", "127.0.0.1", "server address")
	fs.IntVar(&o.port, "port", 8080, "server port")
	fs.IntVar(&o.parallel, "parallel", 4, "server: concurrent generations (KV-cache sessions)")
	fs.IntVar(&o.srv.queue, "queue", 64, "server: requests that may wait for a session; more get 503 + Retry-After")
	fs.DurationVar(&o.srv.timeout, "timeout", 10*time.Minute, "server: longest time one request may take (waiting included)")
	fs.StringVar(&o.srv.apiKey, "api-key", "", "server: require Authorization: Bearer KEY on the API (the page asks for it)")
	fs.StringVar(&o.srv.corsOrigin, "cors-origin", "", "server: allow browser requests from this origin (e.g. https://example.com or *)")
	fs.BoolVar(&o.listTensors, "list-tensors", false, "print metadata and tensors, then exit")
	fs.BoolVar(&o.tokenize, "tokenize", false, "print the token ids of the prompt (BOS included) and exit")
	fs.StringVar(&o.tokens, "tokens", "", "int32 .npy of token ids (BOS included): the prompt, or the input of --dump-logits")
	fs.BoolVar(&o.ignoreEOS, "ignore-eos", false, "keep generating past end-of-generation tokens (benchmarks)")
	fs.StringVar(&o.dumpLogits, "dump-logits", "", "write float32 logits [T, vocab] for --tokens to this .npy")
	fs.StringVar(&o.gamma, "gamma", "", "personality gamma .npz to add at load time")
	fs.Float64Var(&o.alpha, "alpha", 1, "gamma strength")
	fs.StringVar(&o.lora, "lora", "", "llama.cpp LoRA adapter GGUF to merge at load time")
	fs.Float64Var(&o.loraScale, "lora-scale", 1, "LoRA scale")
	if err := fs.Parse(os.Args[1:]); err != nil {
		if err == flag.ErrHelp {
			os.Exit(0)
		}
		os.Exit(2)
	}
	if fs.NArg() > 0 {
		fatal(fmt.Errorf("unexpected argument %q (see --help)", fs.Arg(0)))
	}
	if err := run(&o); err != nil {
		fatal(err)
	}
}

func fatal(err error) {
	msg := strings.ReplaceAll(err.Error(), "\n", " ")
	fmt.Fprintf(os.Stderr, "nanollama: error: %s\n", msg)
	os.Exit(1)
}

func run(o *options) error {
	if o.model == "" {
		return fmt.Errorf("--model is required (see --help)")
	}
	if o.listTensors {
		return listTensors(o.model)
	}
	if o.dumpLogits != "" && o.tokens == "" {
		return fmt.Errorf("--dump-logits needs --tokens IDS.npy")
	}
	if o.maxTokens < 0 {
		return fmt.Errorf("--max-tokens must be ≥ 0")
	}
	if o.srv.queue < 0 || o.srv.timeout <= 0 {
		return fmt.Errorf("--queue must be ≥ 0 and --timeout positive")
	}
	m, err := LoadModel(o.model, o.threads)
	if err != nil {
		return err
	}
	if o.gamma != "" {
		if _, err := m.ApplyGamma(o.gamma, float32(o.alpha)); err != nil {
			return err
		}
	}
	if o.lora != "" {
		if _, err := m.ApplyLoRA(o.lora, float32(o.loraScale)); err != nil {
			return err
		}
	}
	if o.kvType != "f16" && o.kvType != "f32" {
		return fmt.Errorf("--kv-type must be f16 or f32, not %q", o.kvType)
	}
	ctx := o.ctx
	if ctx <= 0 {
		ctx = 2048
	}
	if o.dumpLogits != "" {
		return dumpLogits(m, o.tokens, o.dumpLogits, o.kvType == "f32")
	}
	tok, err := NewTokenizer(m.File)
	if err != nil {
		return fmt.Errorf("%s: %v", o.model, err)
	}
	if err := m.SetTokenizer(tok); err != nil {
		return fmt.Errorf("%s: %v", o.model, err)
	}
	tok.IgnoreEOS = o.ignoreEOS
	smp := SamplerConfig{Temp: float32(o.temp), TopK: o.topK, TopP: float32(o.topP), MinP: float32(o.minP),
		RepPenalty: float32(o.repPenalty), RepWindow: o.repWindow, Seed: o.seed}
	if o.serve {
		return serve(m, o, smp, ctx)
	}
	s := m.NewSession(ctx, o.kvType == "f32")
	if o.interactive {
		return repl(m, s, o, smp)
	}
	var ids []int32
	if o.tokens != "" {
		if ids, err = ReadTokensNpy(o.tokens); err != nil {
			return err
		}
	}
	if o.messages != "" {
		msgs, err := readMessages(o.messages)
		if err != nil {
			return err
		}
		if ids, err = m.Chat.Render(conversation(o.system, msgs...), true); err != nil {
			return fmt.Errorf("%s: %v", o.messages, err)
		}
	}
	prompt := o.prompt
	if ids == nil && (prompt == "" && !o.tokenize || o.tokenize && o.prompt == "") {
		st, err := os.Stdin.Stat()
		if err != nil || st.Mode()&os.ModeCharDevice != 0 {
			return fmt.Errorf("no prompt: use --prompt, --interactive or --serve, or pipe text on stdin")
		}
		b, err := io.ReadAll(io.LimitReader(os.Stdin, 16<<20))
		if err != nil {
			return fmt.Errorf("reading stdin: %v", err)
		}
		prompt = strings.TrimRight(string(b), "\n")
	}
	if ids == nil && o.chat {
		if ids, err = m.Chat.Render(conversation(o.system, ChatMessage{"user", prompt}), true); err != nil {
			return err
		}
	} else if ids == nil {
		ids = tok.Encode(prompt, true)
	}
	if o.tokenize {
		parts := make([]string, len(ids))
		for i, id := range ids {
			parts[i] = fmt.Sprint(id)
		}
		fmt.Println(strings.Join(parts, " "))
		return nil
	}
	out := bufio.NewWriter(os.Stdout)
	stats, err := Generate(s, tok, ids, o.maxTokens, NewSampler(smp), func(t string) bool {
		out.WriteString(t)
		out.Flush()
		return true
	})
	out.WriteString("\n")
	out.Flush()
	if err != nil {
		return err
	}
	fmt.Fprintln(os.Stderr, stats)
	return nil
}

// readMessages reads a conversation: a JSON array of {"role", "content"}.
func readMessages(path string) ([]ChatMessage, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	var raw []struct {
		Role    *string `json:"role"`
		Content *string `json:"content"`
	}
	if err := json.Unmarshal(b, &raw); err != nil {
		return nil, fmt.Errorf("%s: not a JSON array of {\"role\", \"content\"} messages (%v)", path, err)
	}
	if len(raw) == 0 {
		return nil, fmt.Errorf("%s: the conversation is empty", path)
	}
	msgs := make([]ChatMessage, len(raw))
	for i, m := range raw {
		if m.Role == nil || m.Content == nil {
			return nil, fmt.Errorf("%s: message %d needs a \"role\" and a \"content\" string", path, i)
		}
		msgs[i] = ChatMessage{*m.Role, *m.Content}
	}
	return msgs, nil
}

// conversation is the optional system message followed by msgs.
func conversation(system string, msgs ...ChatMessage) []ChatMessage {
	if system == "" {
		return msgs
	}
	return append([]ChatMessage{{"system", system}}, msgs...)
}

// repl chats: each line is a user message; the whole conversation is
// rendered with the chat template every turn, and the session's KV cache
// keeps what the previous turn already computed.
func repl(m *Model, s *Session, o *options, cfg SamplerConfig) error {
	in := bufio.NewScanner(os.Stdin)
	in.Buffer(make([]byte, 1<<20), 1<<20)
	smp := NewSampler(cfg)
	fmt.Fprintln(os.Stderr, m.String())
	fmt.Fprintf(os.Stderr, "chat template: %s; type a message and press enter; /reset starts over, /quit or Ctrl-D exits\n", m.Chat.Kind)
	msgs := conversation(o.system)
	for {
		fmt.Fprint(os.Stderr, "> ")
		if !in.Scan() {
			fmt.Fprintln(os.Stderr)
			return in.Err()
		}
		line := in.Text()
		switch strings.TrimSpace(line) {
		case "":
			continue
		case "/quit", "/exit":
			return nil
		case "/reset":
			msgs = conversation(o.system)
			s.Reset()
			continue
		}
		msgs = append(msgs, ChatMessage{"user", line})
		prompt, err := m.Chat.Render(msgs, true)
		keep := len(conversation(o.system)) // the system message stays
		for err == nil && len(prompt)+o.maxTokens >= s.Ctx && len(msgs) > keep+1 {
			msgs = append(msgs[:keep], msgs[keep+1:]...) // the oldest turns go first when the context is full
			prompt, err = m.Chat.Render(msgs, true)
		}
		if err != nil {
			return err
		}
		var reply strings.Builder
		st, err := Generate(s, m.Tok, prompt, o.maxTokens, smp, func(t string) bool {
			fmt.Print(t)
			reply.WriteString(t)
			return true
		})
		fmt.Println()
		if err != nil {
			fmt.Fprintln(os.Stderr, "nanollama: error:", err)
			msgs = msgs[:len(msgs)-1]
			continue
		}
		msgs = append(msgs, ChatMessage{"assistant", reply.String()})
		fmt.Fprintln(os.Stderr, st)
	}
}

func dumpLogits(m *Model, in, out string, kvF32 bool) error {
	ids, err := ReadTokensNpy(in)
	if err != nil {
		return err
	}
	if len(ids) == 0 {
		return fmt.Errorf("%s: no tokens", in)
	}
	if len(ids) > m.Cfg.CtxLen {
		return fmt.Errorf("%s: %d tokens exceed the model's context length %d", in, len(ids), m.Cfg.CtxLen)
	}
	s := m.NewSession(len(ids), kvF32)
	all := make([]float32, len(ids)*m.Cfg.Vocab)
	if _, err := s.Forward(ids, all); err != nil {
		return fmt.Errorf("%s: %v", in, err)
	}
	if err := WriteF32Npy(out, all, len(ids), m.Cfg.Vocab); err != nil {
		return fmt.Errorf("%s: %v", out, err)
	}
	return nil
}

func listTensors(path string) error {
	g, err := OpenGGUF(path)
	if err != nil {
		return err
	}
	defer g.Close()
	fmt.Printf("%s: GGUF v%d, %d metadata keys, %d tensors\n", path, g.Version, len(g.Meta), len(g.Tensors))
	for _, k := range g.MetaKeys {
		fmt.Printf("  %-45s %s\n", k, describeMeta(g.Meta[k]))
	}
	var total uint64
	for _, t := range g.Tensors {
		fmt.Printf("  %-32s %-6s %v\n", t.Name, t.Type, t.Dims)
		total += t.NumElements()
	}
	fmt.Printf("total parameters: %d\n", total)
	return nil
}
