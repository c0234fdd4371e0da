package nntest

import (
	"encoding/binary"
	"math"
	"math/rand/v2"
	"testing"

	"github.com/llama-orch/orch/sdk/ml"
	"github.com/llama-orch/orch/sdk/ml/nn"
)

// TokNet is the smallest nn.Net with real logits: hidden = the tokens'
// embedding rows, logits = hidden x head (random F32 [64, vocab] tables).
// The runner's own paths (staging, graphs, sampling after the LM head) need
// no model; the device-sampling tests use it on the CPU and the GPU.
type TokNet struct {
	B          ml.Backend
	Table, Out ml.Tensor // F32 [64, vocab]: embedding, LM head
	HiddenBuf  ml.Tensor // F32 [64, maxTokens]
}

// Hidden implements nn.Net.
func (n *TokNet) Hidden(st *nn.Staged) (ml.Tensor, error) {
	h, err := n.B.Rows(n.HiddenBuf, 0, st.N)
	if err != nil {
		return nil, err
	}
	n.B.Embed(h, n.Table, st.Tokens, false)
	return h, n.B.Err()
}

// Head implements nn.Net.
func (n *TokNet) Head(dst, rows ml.Tensor) error {
	n.B.MatMul(dst, rows, n.Out, nil)
	return n.B.Err()
}

// Close implements nn.Net (the backend frees the tables).
func (n *TokNet) Close() error { return nil }

// NewTokRunner makes an nn.Runner over a TokNet on b (context 256, blocks of
// 4 tokens, 64 blocks; closed at the end of the test).
func NewTokRunner(t testing.TB, b ml.Backend, maxTokens, vocab int) *nn.Runner {
	t.Helper()
	const d = 64
	r := rand.New(rand.NewPCG(3, 4))
	w := func() ml.Tensor {
		v := make([]byte, 4*d*vocab)
		for i := 0; i < len(v); i += 4 {
			binary.LittleEndian.PutUint32(v[i:], math.Float32bits(float32(r.NormFloat64())))
		}
		x, err := b.Weight("w", ml.F32, []int{d, vocab}, v)
		if err != nil {
			t.Fatal(err)
		}
		return x
	}
	hidden, err := b.Alloc(ml.F32, d, maxTokens)
	if err != nil {
		t.Fatal(err)
	}
	net := &TokNet{B: b, Table: w(), Out: w(), HiddenBuf: hidden}
	kv, err := nn.NewKVCache(b, ml.F32, 1, 2, 1, 4, 64)
	if err != nil {
		t.Fatal(err)
	}
	cfg := nn.RunnerConfig{Width: d, MaxTokens: maxTokens}
	cfg.Spec.VocabSize, cfg.Spec.ContextLength, cfg.Spec.BlockSize, cfg.Spec.NumBlocks = vocab, 256, 4, 64
	rn, err := nn.NewRunner(b, kv, net, cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { rn.Close() })
	return rn
}
