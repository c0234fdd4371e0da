package cli

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/spf13/cobra"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/llama-orch/orch/host/config"
	"github.com/llama-orch/orch/sdk/synth"
)

func runHost(t *testing.T, args ...string) (string, string, error) {
	t.Helper()
	root := NewRoot()
	var out, errb bytes.Buffer
	root.SetOut(&out)
	root.SetErr(&errb)
	root.SetArgs(args)
	err := root.Execute()
	return out.String(), errb.String(), err
}

// fakeAdapters makes inspect see one adapter serving gpt-oss and gpt2.
func fakeAdapters(t *testing.T) {
	old := inspectAdapterHook
	t.Cleanup(func() { inspectAdapterHook = old })
	inspectAdapterHook = func(_ *cobra.Command, _ *config.Config, arch string) AdapterMatch {
		if arch == "gpt-oss" || arch == "gpt2" {
			return AdapterMatch{Adapter: "gpt", Version: "test", Path: "/bin/orch-adapter-gpt"}
		}
		return AdapterMatch{Reason: "no adapter serves architecture " + arch}
	}
}

// TestSynthInspectRoundTrip runs `synth` then `inspect --json` for every
// tiny preset and gpt2's small one (a real vocabulary). sdk/synth's own
// tests open every small preset; building o200k/cl100k merges again here
// would only add time.
func TestSynthInspectRoundTrip(t *testing.T) {
	fakeAdapters(t)
	for _, arch := range synth.Archs() {
		for _, size := range synth.Sizes(arch) {
			if !strings.HasPrefix(size, "tiny") && !(arch == "gpt2" && size == "small") {
				continue
			}
			t.Run(arch+"/"+size, func(t *testing.T) {
				if size == "small" && testing.Short() {
					t.Skip("small presets in -short mode")
				}
				path := filepath.Join(t.TempDir(), "m.gguf")
				out, _, err := runHost(t, "synth", "--arch", arch, "--size", size, "--out", path, "--seed", "3")
				require.NoError(t, err)
				assert.Contains(t, out, "wrote "+path)
				plan, err := synth.NewPlan(synth.Options{Arch: arch, Size: size})
				require.NoError(t, err)

				out, _, err = runHost(t, "inspect", "--json", path)
				require.NoError(t, err)
				var in Inspection
				require.NoError(t, json.Unmarshal([]byte(out), &in))
				assert.Equal(t, arch, in.Architecture)
				assert.Equal(t, plan.Params, in.Parameters)
				assert.Equal(t, len(plan.Tensors), in.TensorCount)
				assert.Equal(t, plan.Bytes, in.SizeBytes)
				assert.EqualValues(t, plan.Config.Context, in.ContextLength)
				assert.Equal(t, plan.Config.VocabSize, in.Tokenizer.VocabSize)
				assert.Equal(t, plan.Config.Embd, mustAtoi(t, in.Hyperparameters["embedding_length"]))
				assert.Equal(t, plan.Config.Layers, mustAtoi(t, in.Hyperparameters["block_count"]))
				var pct float64
				for _, d := range in.DTypes {
					pct += d.Percent
				}
				assert.InDelta(t, 100, pct, 0.01)
				if arch == "llama" {
					assert.Empty(t, in.Adapter.Adapter)
					assert.Contains(t, in.Adapter.Reason, "llama")
				} else {
					assert.Equal(t, "gpt", in.Adapter.Adapter)
				}
				if size == "tiny-llama2" {
					assert.Equal(t, "llama", in.Tokenizer.Model)
				} else {
					assert.Equal(t, "gpt2", in.Tokenizer.Model)
				}

				out, _, err = runHost(t, "inspect", path)
				require.NoError(t, err)
				assert.Contains(t, out, "architecture:")
				assert.Contains(t, out, arch)
				assert.Contains(t, out, "tokenizer:")
			})
		}
	}
}

func mustAtoi(t *testing.T, s string) int {
	var n int
	require.NoError(t, json.Unmarshal([]byte(s), &n), s)
	return n
}

// foreignGGUF hand-assembles a v2 file unlike our writer's output:
// general.alignment 64 stored last as uint32 after the tensors' keys,
// hyperparameters as uint16/int8/uint64, token types as int8, a nested array,
// and tensor infos out of data order.
func foreignGGUF(t *testing.T) string {
	var b bytes.Buffer
	le := binary.LittleEndian
	u32 := func(x uint32) { binary.Write(&b, le, x) }
	u64 := func(x uint64) { binary.Write(&b, le, x) }
	str := func(s string) { u64(uint64(len(s))); b.WriteString(s) }
	b.WriteString("GGUF")
	u32(2)
	u64(2) // tensors
	u64(9) // kv
	str("llama.context_length")
	u32(10) // uint64
	u64(512)
	str("llama.block_count")
	u32(2) // uint16
	binary.Write(&b, le, uint16(1))
	str("llama.embedding_length")
	u32(1) // int8
	b.WriteByte(32)
	str("tokenizer.ggml.model")
	u32(8)
	str("gpt2")
	str("tokenizer.ggml.tokens")
	u32(9)
	u32(8)
	u64(3)
	str("a")
	str("b")
	str("ab")
	str("tokenizer.ggml.token_type")
	u32(9)
	u32(1) // int8 array
	u64(3)
	b.Write([]byte{1, 1, 1})
	str("x.nested")
	u32(9)
	u32(9)
	u64(1)
	u32(4)
	u64(1)
	u32(7)
	str("general.architecture")
	u32(8)
	str("llama")
	str("general.alignment")
	u32(4)
	u32(64)
	str("output.weight")
	u32(2)
	u64(32)
	u64(3)
	u32(8) // Q8_0
	u64(128)
	str("token_embd.weight")
	u32(2)
	u64(32)
	u64(1)
	u32(0) // F32
	u64(0)
	for b.Len()%64 != 0 {
		b.WriteByte(0)
	}
	b.Write(make([]byte, 128)) // token_embd: 32 F32
	b.Write(make([]byte, 3*34))
	p := filepath.Join(t.TempDir(), "foreign.gguf")
	require.NoError(t, os.WriteFile(p, b.Bytes(), 0o644))
	return p
}

func TestInspectForeignFile(t *testing.T) {
	fakeAdapters(t)
	out, _, err := runHost(t, "inspect", "--json", foreignGGUF(t))
	require.NoError(t, err)
	var in Inspection
	require.NoError(t, json.Unmarshal([]byte(out), &in))
	assert.EqualValues(t, 2, in.GGUFVersion)
	assert.EqualValues(t, 64, in.Alignment)
	assert.Equal(t, "llama", in.Architecture)
	assert.EqualValues(t, 512, in.ContextLength)
	assert.Equal(t, "1", in.Hyperparameters["block_count"])
	assert.Equal(t, "32", in.Hyperparameters["embedding_length"])
	assert.EqualValues(t, 32+96, in.Parameters)
	assert.Equal(t, 2, in.TensorCount)
	assert.Equal(t, 3, in.Tokenizer.VocabSize)
	require.Len(t, in.DTypes, 2)
	assert.Equal(t, "F32", in.DTypes[0].Type) // 128 bytes > 102
}

func TestInspectErrors(t *testing.T) {
	fakeAdapters(t)
	_, _, err := runHost(t, "inspect", filepath.Join(t.TempDir(), "missing.gguf"))
	assert.Error(t, err)
	bad := filepath.Join(t.TempDir(), "bad.gguf")
	require.NoError(t, os.WriteFile(bad, []byte("GGML not really"), 0o644))
	_, _, err = runHost(t, "inspect", bad)
	assert.ErrorContains(t, err, "wrong magic")
	_, _, err = runHost(t, "synth", "--arch", "gpt-oss", "--size", "40b", "--out", filepath.Join(t.TempDir(), "x"))
	assert.ErrorContains(t, err, `unknown gpt-oss size "40b"`)
	_, _, err = runHost(t, "synth", "--size", "tiny", "--out", "x")
	assert.ErrorContains(t, err, "arch")
}

func TestSynthDryRun(t *testing.T) {
	out, _, err := runHost(t, "synth", "--arch", "gpt-oss", "--size", "20b", "--dry-run")
	require.NoError(t, err)
	assert.Contains(t, out, "11.27 GiB")
	assert.Contains(t, out, "24 layers")
	out, _, err = runHost(t, "synth", "--help")
	require.NoError(t, err)
	assert.Contains(t, out, "tiny-swa")
}
