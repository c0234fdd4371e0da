package nntest

import (
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"os"
	"path/filepath"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/llama-orch/orch/sdk/engine"
	"github.com/llama-orch/orch/sdk/gguf"
)

// ReadNPY reads a little-endian float32 .npy file (C order) and returns its
// shape and data. It accepts format versions 1-3.
func ReadNPY(path string) ([]int, []float32, error) {
	raw, err := os.ReadFile(path)
	if err != nil {
		return nil, nil, err
	}
	if len(raw) < 10 || string(raw[:6]) != "\x93NUMPY" {
		return nil, nil, fmt.Errorf("%s: not a .npy file", path)
	}
	var hlen, off int
	switch raw[6] {
	case 1:
		hlen, off = int(binary.LittleEndian.Uint16(raw[8:])), 10
	case 2, 3:
		if len(raw) < 12 {
			return nil, nil, fmt.Errorf("%s: truncated header", path)
		}
		hlen, off = int(binary.LittleEndian.Uint32(raw[8:])), 12
	default:
		return nil, nil, fmt.Errorf("%s: .npy version %d", path, raw[6])
	}
	if off+hlen > len(raw) {
		return nil, nil, fmt.Errorf("%s: truncated header", path)
	}
	header := string(raw[off : off+hlen])
	if !strings.Contains(header, "'descr': '<f4'") {
		return nil, nil, fmt.Errorf("%s: dtype is not little-endian float32: %s", path, header)
	}
	if strings.Contains(header, "'fortran_order': True") {
		return nil, nil, fmt.Errorf("%s: Fortran order not supported", path)
	}
	m := regexp.MustCompile(`'shape': \(([^)]*)\)`).FindStringSubmatch(header)
	if m == nil {
		return nil, nil, fmt.Errorf("%s: no shape in header %q", path, header)
	}
	var shape []int
	n := 1
	for _, f := range strings.Split(m[1], ",") {
		f = strings.TrimSpace(f)
		if f == "" {
			continue
		}
		v, err := strconv.Atoi(f)
		if err != nil || v < 0 {
			return nil, nil, fmt.Errorf("%s: bad shape %q", path, m[1])
		}
		shape = append(shape, v)
		n *= v
	}
	body := raw[off+hlen:]
	if len(body) != 4*n {
		return nil, nil, fmt.Errorf("%s: %d data bytes for shape %v", path, len(body), shape)
	}
	out := make([]float32, n)
	for i := range out {
		out[i] = math.Float32frombits(binary.LittleEndian.Uint32(body[4*i:]))
	}
	return shape, out, nil
}

// Golden is one reference case: <Name>.gguf with its prompt, the
// reference logits [n_tokens, vocab] and the greedy continuation.
type Golden struct {
	Name, GGUF, Arch string
	Tokens           []int32
	LogitsPath       string
	Greedy           []int32 // nil when <name>.greedy.json is absent
}

// Goldens lists the cases in dir (files <name>.gguf with <name>.tokens.json
// and <name>.logits.npy). It skips the test when dir holds none at all.
func Goldens(t *testing.T, dir string) []Golden {
	t.Helper()
	matches, _ := filepath.Glob(filepath.Join(dir, "*.logits.npy"))
	sort.Strings(matches)
	if len(matches) == 0 {
		t.Skipf("no golden logits in %s (produced on the GPU box by plugins/testdata/reference/run.sh)", dir)
	}
	var out []Golden
	for _, lp := range matches {
		name := strings.TrimSuffix(filepath.Base(lp), ".logits.npy")
		g := Golden{Name: name, GGUF: filepath.Join(dir, name+".gguf"), LogitsPath: lp}
		f, err := gguf.Open(g.GGUF)
		require.NoError(t, err, "golden %s", name)
		g.Arch = f.Architecture()
		f.Close()
		raw, err := os.ReadFile(filepath.Join(dir, name+".tokens.json"))
		require.NoError(t, err, "golden %s", name)
		require.NoError(t, json.Unmarshal(raw, &g.Tokens), "golden %s tokens", name)
		if raw, err := os.ReadFile(filepath.Join(dir, name+".greedy.json")); err == nil {
			require.NoError(t, json.Unmarshal(raw, &g.Greedy), "golden %s greedy", name)
		} else if !errors.Is(err, os.ErrNotExist) {
			require.NoError(t, err)
		}
		out = append(out, g)
	}
	return out
}

// Greedy decodes steps tokens greedily after prompt (prefill, then one
// token per step) and returns them.
func Greedy(t testing.TB, m engine.Model, prompt []int32, steps int) []int32 {
	t.Helper()
	spec := m.Spec()
	n := len(prompt) + steps
	blocks := make([]int32, (n+spec.BlockSize-1)/spec.BlockSize)
	require.LessOrEqual(t, len(blocks), spec.NumBlocks)
	for i := range blocks {
		blocks[i] = int32(i)
	}
	argmax := func(row []float32) int32 {
		best := 0
		for i, v := range row {
			if v > row[best] {
				best = i
			}
		}
		return int32(best)
	}
	out, err := m.Forward(context.Background(), &engine.Batch{Seqs: []engine.SeqInput{{Tokens: prompt, Blocks: blocks}}})
	require.NoError(t, err)
	var gen []int32
	next := argmax(out.Logits[0])
	for len(gen) < steps {
		gen = append(gen, next)
		if len(gen) == steps {
			break
		}
		pos := len(prompt) + len(gen) - 1
		out, err = m.Forward(context.Background(), &engine.Batch{Seqs: []engine.SeqInput{{Tokens: []int32{next}, Pos: pos, Blocks: blocks}}})
		require.NoError(t, err)
		next = argmax(out.Logits[0])
	}
	return gen
}

// RelErr is ||got-want|| / ||want||.
func RelErr(got, want []float32) float64 {
	var num, den float64
	for i := range want {
		d := float64(got[i]) - float64(want[i])
		num += d * d
		den += float64(want[i]) * float64(want[i])
	}
	return math.Sqrt(num / den)
}

// CheckGolden runs g through the model (loaded by load) and asserts the
// logits within tol (relative, whole matrix) and the identical greedy
// continuation.
func CheckGolden(t *testing.T, g Golden, m engine.Model, tol float64) {
	shape, want, err := ReadNPY(g.LogitsPath)
	require.NoError(t, err)
	V := m.Spec().VocabSize
	require.Equal(t, []int{len(g.Tokens), V}, shape, "golden logits shape")
	blocks := make([]int32, (len(g.Tokens)+m.Spec().BlockSize-1)/m.Spec().BlockSize)
	for i := range blocks {
		blocks[i] = int32(i)
	}
	got := Prefill(t, m, g.Tokens, blocks)
	rel := RelErr(got, want)
	t.Logf("%s (%s): %d tokens, relative error %.3g", g.Name, g.Arch, len(g.Tokens), rel)
	assert.LessOrEqual(t, rel, tol, "relative error of the logits")
	for r := 0; r < len(g.Tokens); r++ { // per row too, so one bad position is not averaged away
		if e := RelErr(got[r*V:(r+1)*V], want[r*V:(r+1)*V]); e > 100*tol {
			t.Errorf("row %d: relative error %.3g", r, e)
		}
	}
	if g.Greedy != nil {
		gen := Greedy(t, m, g.Tokens, len(g.Greedy))
		assert.Equal(t, g.Greedy, gen, "greedy continuation")
	}
}

// RunGoldens checks every golden in dir whose architecture is in archs with
// models from load (CPU, float32: tolerance 1e-4). It skips when dir holds no
// goldens at all, and each case whose architecture another adapter serves.
func RunGoldens(t *testing.T, dir string, archs []string, load func(t *testing.T, path string, maxPositions int) engine.Model) {
	for _, g := range Goldens(t, dir) {
		t.Run(g.Name, func(t *testing.T) {
			served := false
			for _, a := range archs {
				served = served || a == g.Arch
			}
			if !served {
				t.Skipf("architecture %s is served by another adapter", g.Arch)
			}
			m := load(t, g.GGUF, len(g.Tokens)+len(g.Greedy)+1)
			CheckGolden(t, g, m, 1e-4)
		})
	}
}
