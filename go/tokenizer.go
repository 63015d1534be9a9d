package main

import (
	"container/heap"
	"fmt"
	"sort"
	"strings"
	"unicode"
	"unicode/utf8"
)

// Token types (tokenizer.ggml.token_type), as llama.cpp.
const (
	tokNormal      = 1
	tokUnknown     = 2
	tokControl     = 3
	tokUserDefined = 4
	tokUnused      = 5
	tokByte        = 6
)

// Tokenizer is a SentencePiece ("llama") or byte-level BPE ("gpt2")
// tokenizer built from GGUF metadata, producing the same ids as llama.cpp.
type Tokenizer struct {
	Kind           string // "llama" or "gpt2"
	Pre            string
	Tokens         []string
	Scores         []float32
	Types          []int32
	ids            map[string]int32
	mergeRank      map[string]int // "left right" → rank
	BOS, EOS, UNK  int32
	AddBOS, AddEOS bool
	AddSpacePrefix bool
	byteTok        [256]int32 // SPM byte-fallback ids (-1: none)
	userDefined    []string   // longest first
	EOT            int32
	IgnoreEOS      bool // IsEOG always false (benchmarks)
}

// NewTokenizer reads tokenizer.ggml.* metadata.
func NewTokenizer(g *GGUFFile) (*Tokenizer, error) {
	kind, err := g.metaString("tokenizer.ggml.model")
	if err != nil {
		return nil, fmt.Errorf("missing tokenizer metadata: %v", err)
	}
	t := &Tokenizer{Kind: kind, EOT: -1}
	switch kind {
	case "llama":
		t.AddBOS, t.AddSpacePrefix = true, true
	case "gpt2":
		t.AddBOS, t.AddSpacePrefix = false, false
	default:
		return nil, fmt.Errorf("tokenizer model %q is not supported (llama or gpt2)", kind)
	}
	toks, ok := g.Meta["tokenizer.ggml.tokens"].([]string)
	if !ok || len(toks) == 0 {
		return nil, fmt.Errorf("missing tokenizer metadata: tokenizer.ggml.tokens (an array of strings)")
	}
	t.Tokens = toks
	n := len(toks)
	if v, ok := g.Meta["tokenizer.ggml.scores"]; ok {
		s, ok := v.([]float32)
		if !ok || len(s) != n {
			return nil, fmt.Errorf("tokenizer.ggml.scores must be %d float32", n)
		}
		t.Scores = s
	} else if kind == "llama" {
		return nil, fmt.Errorf("missing tokenizer metadata: tokenizer.ggml.scores")
	} else {
		t.Scores = make([]float32, n)
	}
	if v, ok := g.Meta["tokenizer.ggml.token_type"]; ok {
		s, ok := v.([]int32)
		if !ok || len(s) != n {
			return nil, fmt.Errorf("tokenizer.ggml.token_type must be %d int32", n)
		}
		t.Types = s
	} else {
		t.Types = make([]int32, n)
		for i := range t.Types {
			t.Types[i] = tokNormal
		}
	}
	t.ids = make(map[string]int32, n)
	for i, s := range toks {
		t.ids[s] = int32(i) // later duplicates win, as in llama.cpp
	}
	getID := func(key string, def int32) (int32, error) {
		if _, ok := g.Meta[key]; !ok {
			return def, nil
		}
		v, err := g.metaUint(key)
		if err != nil {
			return 0, err
		}
		if v >= uint64(n) {
			return 0, fmt.Errorf("%s = %d is outside the vocabulary (%d tokens)", key, v, n)
		}
		return int32(v), nil
	}
	def := [3]int32{1, 2, 0}
	if kind == "gpt2" {
		def = [3]int32{-1, -1, -1}
	}
	if t.BOS, err = getID("tokenizer.ggml.bos_token_id", def[0]); err != nil {
		return nil, err
	}
	if t.EOS, err = getID("tokenizer.ggml.eos_token_id", def[1]); err != nil {
		return nil, err
	}
	if t.UNK, err = getID("tokenizer.ggml.unknown_token_id", def[2]); err != nil {
		return nil, err
	}
	if t.EOT, err = getID("tokenizer.ggml.eot_token_id", -1); err != nil {
		return nil, err
	}
	if id, ok := t.ids[tokEndOfTurn]; ok && t.EOT < 0 {
		t.EOT = id // a Llama 3 vocabulary without the key: llama.cpp finds end of turn by this text too
	}
	t.AddBOS = g.metaBool("tokenizer.ggml.add_bos_token", t.AddBOS)
	t.AddEOS = g.metaBool("tokenizer.ggml.add_eos_token", false)
	t.AddSpacePrefix = g.metaBool("tokenizer.ggml.add_space_prefix", t.AddSpacePrefix)
	if t.AddBOS && t.BOS < 0 {
		return nil, fmt.Errorf("tokenizer adds BOS but has no tokenizer.ggml.bos_token_id")
	}
	for i := range t.byteTok {
		t.byteTok[i] = -1
		if id, ok := t.ids[fmt.Sprintf("<0x%02X>", i)]; ok {
			t.byteTok[i] = id
		} else if id, ok := t.ids[string([]byte{byte(i)})]; ok {
			t.byteTok[i] = id
		}
	}
	for i, ty := range t.Types {
		if ty == tokUserDefined && toks[i] != "" {
			t.userDefined = append(t.userDefined, toks[i])
		}
	}
	sort.SliceStable(t.userDefined, func(a, b int) bool { return len(t.userDefined[a]) > len(t.userDefined[b]) })
	if kind == "gpt2" {
		merges, ok := g.Meta["tokenizer.ggml.merges"].([]string)
		if !ok {
			return nil, fmt.Errorf("missing tokenizer metadata: tokenizer.ggml.merges (gpt2 vocab)")
		}
		t.mergeRank = make(map[string]int, len(merges))
		for i, m := range merges {
			if _, dup := t.mergeRank[m]; !dup {
				t.mergeRank[m] = i
			}
		}
		t.Pre, _ = g.metaString("tokenizer.ggml.pre")
		for i := range t.byteTok {
			t.byteTok[i] = -1
			if id, ok := t.ids[string(byteToRune[i])]; ok {
				t.byteTok[i] = id
			}
		}
	}
	return t, nil
}

// IsEOG reports whether id ends generation.
func (t *Tokenizer) IsEOG(id int32) bool {
	return !t.IgnoreEOS && (id == t.EOS || (t.EOT >= 0 && id == t.EOT))
}

// Encode tokenizes text as llama.cpp's llama_tokenize(text, add_special,
// parse_special=false).
func (t *Tokenizer) Encode(text string, addSpecial bool) []int32 {
	var out []int32
	if addSpecial && t.AddBOS {
		out = append(out, t.BOS)
	}
	type frag struct {
		text string
		tok  int32 // ≥ 0 for a user-defined token
	}
	var frags []frag
	if text != "" {
		frags = append(frags, frag{text, -1})
	}
	// Split out user-defined tokens, longest first, as llama.cpp's
	// tokenizer_st_partition does.
	for _, ud := range t.userDefined {
		id := t.ids[ud]
		var next []frag
		for _, f := range frags {
			if f.tok >= 0 {
				next = append(next, f)
				continue
			}
			s := f.text
			for {
				i := strings.Index(s, ud)
				if i < 0 {
					break
				}
				if i > 0 {
					next = append(next, frag{s[:i], -1})
				}
				next = append(next, frag{"", id})
				s = s[i+len(ud):]
			}
			if s != "" {
				next = append(next, frag{s, -1})
			}
		}
		frags = next
	}
	prevSpecial := true
	for _, f := range frags {
		if f.tok >= 0 {
			out = append(out, f.tok)
			prevSpecial = true
			continue
		}
		if t.Kind == "llama" {
			s := f.text
			if t.AddSpacePrefix && prevSpecial {
				s = " " + s
			}
			out = t.spm(strings.ReplaceAll(s, " ", "\u2581"), out)
		} else {
			for _, w := range t.preTokenize(f.text) {
				out = t.bpe(w, out)
			}
		}
		prevSpecial = false
	}
	if addSpecial && t.AddEOS && t.EOS >= 0 {
		out = append(out, t.EOS)
	}
	return out
}

// ---- SentencePiece (llama.cpp's llm_tokenizer_spm) ----

type symbol struct {
	start, n   int
	prev, next int
}

type bigram struct {
	left, right int
	score       float32 // SPM: higher first
	rank        int     // BPE: lower first
	size        int
}

type bigramQueue struct {
	items []bigram
	bpe   bool
}

func (q *bigramQueue) Len() int { return len(q.items) }
func (q *bigramQueue) Less(i, j int) bool {
	a, b := q.items[i], q.items[j]
	if q.bpe {
		return a.rank < b.rank || (a.rank == b.rank && a.left < b.left)
	}
	return a.score > b.score || (a.score == b.score && a.left < b.left)
}
func (q *bigramQueue) Swap(i, j int)      { q.items[i], q.items[j] = q.items[j], q.items[i] }
func (q *bigramQueue) Push(x interface{}) { q.items = append(q.items, x.(bigram)) }
func (q *bigramQueue) Pop() interface{} {
	x := q.items[len(q.items)-1]
	q.items = q.items[:len(q.items)-1]
	return x
}

// utf8Len is llama.cpp's unicode_len_utf8: the length implied by the first
// byte (continuation bytes count as one).
func utf8Len(b byte) int {
	return [16]int{1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 3, 4}[b>>4]
}

func splitSymbols(text string) []symbol {
	var syms []symbol
	for off := 0; off < len(text); {
		n := utf8Len(text[off])
		if off+n > len(text) {
			n = len(text) - off
		}
		idx := len(syms)
		next := idx + 1
		if off+n >= len(text) {
			next = -1
		}
		syms = append(syms, symbol{start: off, n: n, prev: idx - 1, next: next})
		off += n
	}
	return syms
}

// mergeSymbols splits text into UTF-8 symbols and merges adjacent pairs best
// first, as llama.cpp's SentencePiece and BPE tokenizers both do; they differ
// only in how a pair is ranked (pair returns the ranking, false for no merge).
func mergeSymbols(text string, bpe bool, pair func(l, r symbol) (bigram, bool)) []symbol {
	syms := splitSymbols(text)
	q := &bigramQueue{bpe: bpe}
	try := func(l, r int) {
		if l < 0 || r < 0 {
			return
		}
		if b, ok := pair(syms[l], syms[r]); ok {
			b.left, b.right = l, r
			heap.Push(q, b)
		}
	}
	for i := 1; i < len(syms); i++ {
		try(i-1, i)
	}
	for q.Len() > 0 {
		b := heap.Pop(q).(bigram)
		ls, rs := &syms[b.left], &syms[b.right]
		if ls.n == 0 || rs.n == 0 || ls.n+rs.n != b.size {
			continue
		}
		ls.n += rs.n
		rs.n = 0
		ls.next = rs.next
		if rs.next >= 0 {
			syms[rs.next].prev = b.left
		}
		try(ls.prev, b.left)
		try(b.left, ls.next)
	}
	return syms
}

func (t *Tokenizer) spm(text string, out []int32) []int32 {
	syms := mergeSymbols(text, false, func(l, r symbol) (bigram, bool) {
		s := text[l.start : r.start+r.n]
		id, ok := t.ids[s]
		if !ok {
			return bigram{}, false
		}
		return bigram{score: t.Scores[id], size: len(s)}, true
	})
	for i := 0; i != -1 && len(syms) > 0; i = syms[i].next {
		s := text[syms[i].start : syms[i].start+syms[i].n]
		if id, ok := t.ids[s]; ok {
			out = append(out, id)
			continue
		}
		for j := 0; j < len(s); j++ {
			if id := t.byteTok[s[j]]; id >= 0 {
				out = append(out, id)
			} else {
				out = append(out, t.UNK)
			}
		}
	}
	return out
}

// ---- byte-level BPE (llama.cpp's llm_tokenizer_bpe) ----

var byteToRune [256]rune
var runeToByte = map[rune]byte{}

func init() {
	n := 0
	for b := 0; b < 256; b++ {
		if (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF) {
			byteToRune[b] = rune(b)
		} else {
			byteToRune[b] = rune(256 + n)
			n++
		}
		runeToByte[byteToRune[b]] = byte(b)
	}
}

// isSpaceLC is llama.cpp's whitespace class (\s).
func isSpaceLC(r rune) bool {
	switch r {
	case '\t', '\n', '\v', '\f', '\r', ' ', 0x85, 0xA0, 0x1680, 0x2028, 0x2029, 0x202F, 0x205F, 0x3000:
		return true
	}
	return r >= 0x2000 && r <= 0x200A
}

// preTokenize splits text with the GPT-2 pattern
// 's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
// (llama.cpp's unicode_regex_split_custom_gpt2), or the llama-3 pattern
// for pre = "llama-bpe"/"llama3".
func (t *Tokenizer) preTokenize(text string) []string {
	cp := []rune(text)
	n := len(cp)
	at := func(i int) rune {
		if i < 0 || i >= n {
			return -1
		}
		return cp[i]
	}
	isL := func(i int) bool { r := at(i); return r >= 0 && unicode.IsLetter(r) }
	isN := func(i int) bool { r := at(i); return r >= 0 && unicode.IsNumber(r) }
	isS := func(i int) bool { r := at(i); return r >= 0 && isSpaceLC(r) }
	isP := func(i int) bool { return at(i) >= 0 && !isL(i) && !isN(i) && !isS(i) }
	llama3 := t.Pre == "llama-bpe" || t.Pre == "llama3"
	var words []string
	start := 0
	emit := func(end int) {
		if end > start {
			words = append(words, string(cp[start:end]))
		}
		start = end
	}
	for pos := 0; pos < n; {
		c := cp[pos]
		if c == '\'' && pos+1 < n {
			c1 := at(pos + 1)
			if llama3 {
				c1 = unicode.ToLower(c1)
			}
			if c1 == 's' || c1 == 't' || c1 == 'm' || c1 == 'd' {
				pos += 2
				emit(pos)
				continue
			}
			if pos+2 < n {
				c2 := at(pos + 2)
				if llama3 {
					c2 = unicode.ToLower(c2)
				}
				if (c1 == 'r' && c2 == 'e') || (c1 == 'v' && c2 == 'e') || (c1 == 'l' && c2 == 'l') {
					pos += 3
					emit(pos)
					continue
				}
			}
		}
		if llama3 {
			// [^\r\n\p{L}\p{N}]?\p{L}+
			if isL(pos) || (c != '\r' && c != '\n' && !isL(pos) && !isN(pos) && isL(pos+1)) {
				pos++
				for isL(pos) {
					pos++
				}
				emit(pos)
				continue
			}
			// \p{N}{1,3}
			if isN(pos) {
				k := 0
				for isN(pos) && k < 3 {
					pos++
					k++
				}
				emit(pos)
				continue
			}
			// <space>?[^\s\p{L}\p{N}]+[\r\n]*
			p2 := pos
			if c == ' ' {
				p2++
			}
			if isP(p2) {
				pos = p2
				for isP(pos) {
					pos++
				}
				for at(pos) == '\r' || at(pos) == '\n' {
					pos++
				}
				emit(pos)
				continue
			}
			// \s*[\r\n]+
			ns, lastNL := 0, -1
			for isS(pos + ns) {
				if r := at(pos + ns); r == '\r' || r == '\n' {
					lastNL = pos + ns
				}
				ns++
			}
			if lastNL >= 0 {
				pos = lastNL + 1
				emit(pos)
				continue
			}
		} else {
			p2 := pos
			if c == ' ' {
				p2++
			}
			switch {
			case isL(p2):
				pos = p2
				for isL(pos) {
					pos++
				}
				emit(pos)
				continue
			case isN(p2):
				pos = p2
				for isN(pos) {
					pos++
				}
				emit(pos)
				continue
			case isP(p2):
				pos = p2
				for isP(pos) {
					pos++
				}
				emit(pos)
				continue
			}
		}
		ns := 0
		for isS(pos + ns) {
			ns++
		}
		if ns > 1 && pos+ns < n {
			pos += ns - 1
			emit(pos)
			continue
		}
		if ns > 0 {
			pos += ns
			emit(pos)
			continue
		}
		pos++
		emit(pos)
	}
	return words
}

func (t *Tokenizer) bpe(word string, out []int32) []int32 {
	var sb strings.Builder
	for i := 0; i < len(word); i++ {
		sb.WriteRune(byteToRune[word[i]])
	}
	text := sb.String()
	if t.Pre == "llama-bpe" || t.Pre == "llama3" { // ignore_merges
		if id, ok := t.ids[text]; ok {
			return append(out, id)
		}
	}
	syms := mergeSymbols(text, true, func(l, r symbol) (bigram, bool) {
		a, b := text[l.start:l.start+l.n], text[r.start:r.start+r.n]
		rank, ok := t.mergeRank[a+" "+b]
		return bigram{rank: rank, size: len(a) + len(b)}, ok
	})
	for i := 0; i != -1 && len(syms) > 0; i = syms[i].next {
		s := text[syms[i].start : syms[i].start+syms[i].n]
		if id, ok := t.ids[s]; ok {
			out = append(out, id)
			continue
		}
		for j := 0; j < len(s); j++ {
			if id, ok := t.ids[s[j:j+1]]; ok {
				out = append(out, id)
			}
		}
	}
	return out
}

// ---- decoding ----

// Piece returns the bytes token id stands for (control tokens give nothing).
func (t *Tokenizer) Piece(id int32) []byte {
	if id < 0 || int(id) >= len(t.Tokens) {
		return nil
	}
	s := t.Tokens[id]
	switch t.Types[id] {
	case tokControl, tokUnused:
		return nil
	case tokUnknown:
		if t.Kind == "llama" {
			return []byte(" \u2047 ")
		}
	case tokByte:
		if t.Kind == "llama" {
			var b byte
			if _, err := fmt.Sscanf(s, "<0x%02X>", &b); err == nil {
				return []byte{b}
			}
		}
	}
	if t.Kind == "llama" {
		return []byte(strings.ReplaceAll(s, "\u2581", " "))
	}
	if t.Types[id] == tokUserDefined {
		return []byte(s)
	}
	out := make([]byte, 0, len(s))
	for _, r := range s {
		if b, ok := runeToByte[r]; ok {
			out = append(out, b)
		} else {
			out = append(out, string(r)...)
		}
	}
	return out
}

// Decode turns ids into text; with a leading space prefix removed when
// the first id follows BOS the way SentencePiece does.
func (t *Tokenizer) Decode(ids []int32) string {
	var b []byte
	for _, id := range ids {
		b = append(b, t.Piece(id)...)
	}
	return string(b)
}

// StreamDecoder turns a token stream into valid UTF-8 text chunks, holding
// back bytes of an incomplete character.
type StreamDecoder struct {
	t   *Tokenizer
	buf []byte
}

func (d *StreamDecoder) Add(id int32) string {
	d.buf = append(d.buf, d.t.Piece(id)...)
	// Emit everything up to the last complete character.
	end := len(d.buf)
	for k := 1; k <= 3 && k <= len(d.buf); k++ {
		c := d.buf[len(d.buf)-k]
		if c&0xC0 == 0x80 {
			continue // continuation byte: keep looking for the start
		}
		if c >= 0xC0 && utf8Len(c) > k {
			end = len(d.buf) - k
		}
		break
	}
	s := string(d.buf[:end])
	d.buf = append(d.buf[:0], d.buf[end:]...)
	return s
}

// Flush returns any held-back bytes (as replacement characters if invalid).
func (d *StreamDecoder) Flush() string {
	s := string(d.buf)
	d.buf = d.buf[:0]
	if !utf8.ValidString(s) {
		s = strings.ToValidUTF8(s, "\uFFFD")
	}
	return s
}
