package server

import (
	"context"
	"encoding/json"
	"fmt"
	"sync"
	"time"

	"github.com/llama-orch/orch/sdk"
)

// Tokenizer is what the server needs from a model's tokenizer. The real one
// (sdk/tokenizer) is adapted to it by the CLI; tests use fakes.
type Tokenizer interface {
	// Encode turns text into token ids. addSpecial adds BOS/EOS as the model's
	// metadata says; parseSpecial maps special-token text to its id.
	Encode(text string, addSpecial, parseSpecial bool) []int32
	// Decode renders ids as text (special tokens as their text).
	Decode(ids []int32) string
	// NewStreamDecoder returns an incremental decoder for one generation.
	NewStreamDecoder() StreamDecoder
	// TokenText is the text of one token ("" if out of range).
	TokenText(id int32) string
	// VocabSize is the number of token ids.
	VocabSize() int
	// EndOfGeneration lists the ids that end a generation (EOS, EOT, ...).
	EndOfGeneration() []int32
}

// StreamDecoder decodes tokens one at a time, returning only complete UTF-8.
type StreamDecoder interface {
	Add(id int32) string
	Flush() string
}

// Message is one chat message after validation, independent of the wire.
type Message struct {
	Role       string // system, developer, user, assistant, tool
	Content    string
	Name       string
	ToolCallID string
	ToolCalls  []ToolCallOut
	Reasoning  string
}

// ToolCallOut is a tool call made by the assistant.
type ToolCallOut struct {
	ID        string
	Name      string
	Arguments string // JSON text
}

// Tool is a function the model may call.
type Tool struct {
	Name        string
	Description string
	Parameters  json.RawMessage
}

// ToolChoiceMode says how tools may be used.
type ToolChoiceMode string

// Tool choice modes as OpenAI names them; ToolChoiceNamed forces ToolChoice.Name.
const (
	ToolChoiceAuto     ToolChoiceMode = "auto"
	ToolChoiceNone     ToolChoiceMode = "none"
	ToolChoiceRequired ToolChoiceMode = "required"
	ToolChoiceNamed    ToolChoiceMode = "named"
)

// ChatOptions are the chat-request parameters a ChatFormat sees.
type ChatOptions struct {
	Tools           []Tool
	ToolChoice      ToolChoiceMode
	ToolName        string // for ToolChoiceNamed
	ReasoningEffort string // "", low, medium, high
	JSONObject      bool   // response_format json_object
}

// ChatPrompt is a rendered chat prompt and how to read the model's output.
type ChatPrompt struct {
	// Text is the prompt, encoded with parseSpecial=true and addSpecial=false.
	Text string
	// NewParser returns a fresh output parser for one choice.
	NewParser func() OutputParser
}

// ChatFormat renders chat messages into a prompt and parses the generated
// tokens back into content, reasoning and tool calls. gpt-oss uses harmony;
// other models a Jinja chat template with the JSON tool-call convention.
type ChatFormat interface {
	// Name identifies the format in logs ("harmony", "template").
	Name() string
	// SupportsReasoningEffort says whether reasoning_effort is honoured.
	SupportsReasoningEffort() bool
	// Render builds the prompt. A bad message is an *APIError (400).
	Render(msgs []Message, opts ChatOptions) (ChatPrompt, error)
}

// DeltaKind says what an output delta carries.
type DeltaKind int

// Delta kinds.
const (
	DeltaContent DeltaKind = iota
	DeltaReasoning
	DeltaToolCall // a complete tool call (Name, Arguments)
)

// Delta is a piece of parsed output.
type Delta struct {
	Kind      DeltaKind
	Text      string // content or reasoning text
	ToolName  string
	Arguments string
}

// OutputParser turns generated tokens into deltas for one choice.
type OutputParser interface {
	// Push feeds one generated token (not an end-of-generation stop token)
	// and its decoded text (complete UTF-8 only; may be "").
	Push(id int32, text string) []Delta
	// Finish is called once at the end; stopToken is the end-of-generation
	// token that ended it (ok=false when it ended otherwise). It returns the
	// remaining deltas.
	Finish(stopToken int32, ok bool) []Delta
}

// Model is one served model.
type Model struct {
	// ID is the served model id (the request's `model` field).
	ID string
	// Adapter runs the model; it must already be loaded.
	Adapter sdk.Adapter
	// Info is what Load returned (ContextLength is used for validation).
	Info sdk.ModelInfo
	// Features are the adapter's declared features (sdk.Info.Features);
	// "logprobs" enables logprobs/top_logprobs.
	Features []string
	// Tokenizer is required.
	Tokenizer Tokenizer
	// Chat formats chat requests; nil makes /v1/chat/completions a 400.
	Chat ChatFormat
	// MaxRunning bounds generations admitted to the adapter at once
	// (0: Info.MaxSequences, else 8). Further requests wait in the queue.
	MaxRunning int
	// Created is reported by /v1/models (Unix seconds; 0: time of AddModel).
	Created int64
}

func (m *Model) hasFeature(f string) bool {
	for _, x := range m.Features {
		if x == f {
			return true
		}
	}
	return false
}

// servedModel is a Model with its admission gate and metrics.
type servedModel struct {
	Model
	gate    *gate
	metrics *modelMetrics
}

// errQueueFull is returned by gate.acquire when no slot is free and the
// waiting queue is full.
var errQueueFull = fmt.Errorf("request queue full")

// gate admits at most `running` requests at once and lets at most
// `maxWaiting` more wait; beyond that requests are refused (429).
type gate struct {
	slots      chan struct{}
	mu         sync.Mutex
	waiting    int
	maxWaiting int
	onChange   func(running, waiting int)
	running    int
}

func newGate(running, maxWaiting int, onChange func(running, waiting int)) *gate {
	if running < 1 {
		running = 1
	}
	if maxWaiting < 0 {
		maxWaiting = 0
	}
	return &gate{slots: make(chan struct{}, running), maxWaiting: maxWaiting, onChange: onChange}
}

func (g *gate) changed() {
	if g.onChange != nil {
		g.onChange(g.running, g.waiting)
	}
}

// acquire waits for a slot. It returns the release function and the time
// spent waiting, errQueueFull at once when the queue is full, or ctx.Err().
func (g *gate) acquire(ctx context.Context) (func(), time.Duration, error) {
	start := time.Now()
	g.mu.Lock()
	select {
	case g.slots <- struct{}{}:
		g.running++
		g.changed()
		g.mu.Unlock()
		return g.releaser(), 0, nil
	default:
	}
	if g.waiting >= g.maxWaiting {
		g.mu.Unlock()
		return nil, 0, errQueueFull
	}
	g.waiting++
	g.changed()
	g.mu.Unlock()
	select {
	case g.slots <- struct{}{}:
		g.mu.Lock()
		g.waiting--
		g.running++
		g.changed()
		g.mu.Unlock()
		return g.releaser(), time.Since(start), nil
	case <-ctx.Done():
		g.mu.Lock()
		g.waiting--
		g.changed()
		g.mu.Unlock()
		return nil, time.Since(start), ctx.Err()
	}
}

func (g *gate) releaser() func() {
	var once sync.Once
	return func() {
		once.Do(func() {
			g.mu.Lock()
			<-g.slots
			g.running--
			g.changed()
			g.mu.Unlock()
		})
	}
}
