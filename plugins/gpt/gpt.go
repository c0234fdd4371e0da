// Package gpt is the model code of the GPT adapter: OpenAI's gpt-oss
// (RMSNorm, GQA attention with sinks and alternating sliding windows, RoPE
// NeoX + YaRN, MXFP4 mixture of experts with a clamped SwiGLU) and the GPT-2
// family (LayerNorm, GELU, MHA with a fused qkv, learned positions). It is
// written once against sdk/ml and runs on every backend; tensor names and
// metadata keys are llama.cpp's (see sdk/synth).
package gpt

import (
	"github.com/hashicorp/go-hclog"

	"github.com/llama-orch/orch/sdk"
	"github.com/llama-orch/orch/sdk/engine"
	"github.com/llama-orch/orch/sdk/ml"
	"github.com/llama-orch/orch/sdk/ml/nn"
)

// Options configure Load (see nn.Options: Backend is required).
type Options = nn.Options

// Architectures served by this package.
var builders = nn.Builders{"gpt-oss": buildGPTOSS, "gpt2": buildGPT2}

// Architectures lists the GGUF architectures this package serves.
func Architectures() []string { return builders.Architectures() }

// Load opens the GGUF at path and builds its model on opts.Backend. Close
// the model to unmap the file; the backend stays the caller's.
func Load(path string, opts Options) (engine.Model, error) {
	r, err := builders.Load(path, opts)
	if err != nil {
		return nil, err
	}
	return r, nil
}

// NewLoader returns the engine.Loader of the GPT adapter: it picks the
// backend from the request (CUDA when usable, else CPU), sizes the KV pool
// and builds a gpt-oss or gpt2 model; other architectures fail with
// sdk.ErrUnsupportedArchitecture.
func NewLoader(log hclog.Logger) engine.Loader { return builders.Loader(log) }

// Version is the adapter's version (set at build time with -ldflags -X).
var Version = "0.1.0"

// Info describes the GPT adapter.
func Info() sdk.Info {
	return sdk.Info{
		Name: "gpt", Version: Version, Architectures: Architectures(),
		DTypes:   dtypeNames(),
		Features: []string{"paged-kv", "prefix-cache", "logprobs", "cuda"},
	}
}

func dtypeNames() []string {
	var out []string
	for _, d := range ml.WeightDTypes {
		out = append(out, d.String())
	}
	return out
}

// New returns the GPT adapter: the engine's continuous batching over this
// package's models.
func New(log hclog.Logger) sdk.Adapter { return engine.NewAdapter(NewLoader(log), log) }
