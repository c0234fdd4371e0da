package defaultmodel

import (
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/llama-orch/orch/sdk/gguf"
)

func TestEmbeddedModelIsGPT2(t *testing.T) {
	p, err := PathIn(t.TempDir())
	require.NoError(t, err)
	f, err := gguf.Open(p)
	require.NoError(t, err)
	defer f.Close()

	assert.Equal(t, "gpt2", f.Architecture())
	name, _ := f.String("general.name")
	assert.Equal(t, Name(), name)
	want := map[string]uint64{
		"gpt2.block_count": 6, "gpt2.embedding_length": 256, "gpt2.attention.head_count": 8,
		"gpt2.context_length": 512, "gpt2.feed_forward_length": 1024,
	}
	for k, v := range want {
		got, ok := f.Uint(k)
		require.True(t, ok, k)
		assert.Equal(t, v, got, k)
	}
	eps, ok := f.Float("gpt2.attention.layer_norm_epsilon")
	require.True(t, ok)
	assert.InDelta(t, 1e-5, eps, 1e-9)

	// Tokenizer: byte-level BPE with GPT-2 pre-tokenization and a chat template.
	model, _ := f.String("tokenizer.ggml.model")
	pre, _ := f.String("tokenizer.ggml.pre")
	assert.Equal(t, "gpt2", model)
	assert.Equal(t, "gpt-2", pre)
	toks, ok := f.Strings("tokenizer.ggml.tokens")
	require.True(t, ok)
	assert.Len(t, toks, 8192)
	merges, ok := f.Strings("tokenizer.ggml.merges")
	require.True(t, ok)
	assert.Greater(t, len(merges), 7000)
	eos, ok := f.Uint("tokenizer.ggml.eos_token_id")
	require.True(t, ok)
	assert.Equal(t, "<|endoftext|>", toks[eos])
	tmpl, ok := f.String("tokenizer.chat_template")
	require.True(t, ok)
	assert.Contains(t, tmpl, "Assistant:")

	// Tensors: llama.cpp's gpt2 layout, Q8_0 matrices, F32 norms/biases/positions.
	check := func(name string, typ gguf.Type, shape ...int64) {
		ti, ok := f.Tensor(name)
		if !assert.True(t, ok, "missing tensor %s", name) {
			return
		}
		assert.Equal(t, typ, ti.Type, name)
		assert.Equal(t, shape, ti.Shape, name)
	}
	check("token_embd.weight", gguf.TypeQ8_0, 256, 8192)
	check("position_embd.weight", gguf.TypeF32, 256, 512)
	check("output_norm.weight", gguf.TypeF32, 256)
	check("output_norm.bias", gguf.TypeF32, 256)
	check("output.weight", gguf.TypeQ8_0, 256, 8192)
	for i := 0; i < 6; i++ {
		b := fmt.Sprintf("blk.%d.", i)
		check(b+"attn_norm.weight", gguf.TypeF32, 256)
		check(b+"attn_norm.bias", gguf.TypeF32, 256)
		check(b+"attn_qkv.weight", gguf.TypeQ8_0, 256, 768)
		check(b+"attn_qkv.bias", gguf.TypeF32, 768)
		check(b+"attn_output.weight", gguf.TypeQ8_0, 256, 256)
		check(b+"attn_output.bias", gguf.TypeF32, 256)
		check(b+"ffn_norm.weight", gguf.TypeF32, 256)
		check(b+"ffn_norm.bias", gguf.TypeF32, 256)
		check(b+"ffn_up.weight", gguf.TypeQ8_0, 256, 1024)
		check(b+"ffn_up.bias", gguf.TypeF32, 1024)
		check(b+"ffn_down.weight", gguf.TypeQ8_0, 1024, 256)
		check(b+"ffn_down.bias", gguf.TypeF32, 256)
	}
	assert.Len(t, f.Tensors, 5+12*6)
	assert.Less(t, Size(), int64(15<<20), "the default model must stay under 15 MB")
}

func TestPathWritesOnceAndRepairs(t *testing.T) {
	dir := t.TempDir()
	p1, err := PathIn(dir)
	require.NoError(t, err)
	assert.Equal(t, FileName(), filepath.Base(p1))
	assert.True(t, strings.HasPrefix(FileName(), Name()+"-"))
	st1, err := os.Stat(p1)
	require.NoError(t, err)
	assert.Equal(t, Size(), st1.Size())

	// Second call reuses the file (same inode, nothing rewritten).
	p2, err := PathIn(dir)
	require.NoError(t, err)
	assert.Equal(t, p1, p2)
	st2, err := os.Stat(p2)
	require.NoError(t, err)
	assert.True(t, os.SameFile(st1, st2))

	// A corrupted file of the right size is replaced.
	b, err := os.ReadFile(p1)
	require.NoError(t, err)
	b[len(b)/2] ^= 0xff
	require.NoError(t, os.WriteFile(p1, b, 0o644))
	p3, err := PathIn(dir)
	require.NoError(t, err)
	assert.True(t, intact(p3))

	// A truncated one too; and no temporary files are left behind.
	require.NoError(t, os.Truncate(p1, 100))
	_, err = PathIn(dir)
	require.NoError(t, err)
	assert.True(t, intact(p1))
	ents, err := os.ReadDir(dir)
	require.NoError(t, err)
	assert.Len(t, ents, 1)
}

func TestPathConcurrent(t *testing.T) {
	dir := t.TempDir()
	var wg sync.WaitGroup
	paths := make([]string, 8)
	errs := make([]error, 8)
	for i := range paths {
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			paths[i], errs[i] = PathIn(dir)
		}(i)
	}
	wg.Wait()
	for i := range paths {
		require.NoError(t, errs[i])
		assert.Equal(t, paths[0], paths[i])
	}
	assert.True(t, intact(paths[0]))
}

func TestPathInUnwritableDir(t *testing.T) {
	if os.Geteuid() == 0 {
		// root ignores permissions; use a path under a regular file instead.
		f := filepath.Join(t.TempDir(), "file")
		require.NoError(t, os.WriteFile(f, nil, 0o644))
		_, err := PathIn(filepath.Join(f, "sub"))
		require.Error(t, err)
		assert.Contains(t, err.Error(), "default model")
		return
	}
	dir := t.TempDir()
	require.NoError(t, os.Chmod(dir, 0o500))
	_, err := PathIn(filepath.Join(dir, "sub"))
	require.Error(t, err)
}

func TestCacheDirUsesUserCacheDir(t *testing.T) {
	if runtime.GOOS != "linux" {
		t.Skip("XDG_CACHE_HOME is honoured on Linux only")
	}
	t.Setenv("XDG_CACHE_HOME", "/tmp/xdg-test-cache")
	d, err := CacheDir()
	require.NoError(t, err)
	assert.Equal(t, filepath.Join("/tmp/xdg-test-cache", "orch"), d)
}
