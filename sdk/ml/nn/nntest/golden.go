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
	"slices"
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

// Ties bounds the greedy check of CheckGoldenTies.
type Ties struct {
	// Gap: a step whose argmax differs from the reference token passes when
	// logit[argmax] - logit[reference] <= Gap * max|logit| of that row (a
	// near tie that the path's rounding may flip).
	Gap float64
	// MaxFlips: at most this many such steps.
	MaxFlips int
}

// CheckGoldenTies is CheckGolden for reduced-precision paths (fp16/bf16
// activations on the GPU): the logits are checked the same way, and the
// greedy continuation teacher-forced through the decode path — the prompt,
// then the reference tokens one per step — must pick the reference token at
// every step except near ties (see Ties). Free-running greedy decoding would
// diverge for good after the first flipped tie and check nothing afterwards;
// forcing the reference keeps every one of the steps checked. The length of
// the identical free-running prefix is logged.
func CheckGoldenTies(t *testing.T, g Golden, m engine.Model, tol float64, ties Ties) {
	t.Helper()
	if g.Greedy == nil {
		CheckGolden(t, g, m, tol)
		return
	}
	ref := g
	ref.Greedy = nil
	CheckGolden(t, ref, m, tol)
	flips, worst := ForcedGreedy(t, m, g.Tokens, g.Greedy, ties)
	gen := Greedy(t, m, g.Tokens, len(g.Greedy))
	same := 0
	for same < len(gen) && gen[same] == g.Greedy[same] {
		same++
	}
	t.Logf("%s: teacher-forced greedy: %d of %d steps flipped a near tie (largest gap %.3g of max|logit|); free-running greedy identical for %d of %d steps",
		g.Name, flips, len(g.Greedy), worst, same, len(g.Greedy))
}

// GPUTies: the default CUDA kernels use fp16 activations in the decode GEMVs
// and bf16 in the prefill GEMMs (logits within 2e-2 of transformers); a
// greedy step may flip a near tie (docs/correctness.md).
var GPUTies = Ties{Gap: 1e-2, MaxFlips: 4}

// RunGPUGoldens checks every golden in dir whose architecture is in archs on
// a GPU backend, twice: the whole prompt in one sub-batch (tensor-core
// prefill GEMMs and attention) and in sub-batches of 8 (the decode GEMVs and
// flash-decoding); logits within 2e-2, greedy teacher-forced with GPUTies.
// load builds the model for a context of n positions with maxTokens tokens
// per sub-batch (0: the whole prompt). It skips when dir is empty.
func RunGPUGoldens(t *testing.T, dir string, archs []string, load func(t *testing.T, path string, n, maxTokens int) engine.Model) {
	if dir == "" {
		t.Skip("no golden directory")
	}
	for _, g := range Goldens(t, dir) {
		if !slices.Contains(archs, g.Arch) {
			continue
		}
		for _, mt := range []int{0, 8} {
			t.Run(fmt.Sprintf("%s/max_tokens=%d", g.Name, mt), func(t *testing.T) {
				t.Logf("head dim %d", HeadDim(g.GGUF))
				m := load(t, g.GGUF, len(g.Tokens)+len(g.Greedy)+1, mt)
				defer m.Close()
				CheckGoldenTies(t, g, m, 2e-2, GPUTies)
			})
		}
	}
}

// ForcedGreedy feeds prompt, then want[:len(want)-1] one token per step (the
// decode path), and checks that each step's argmax is the next want token up
// to ties. It returns the number of tolerated flips and the largest relative
// gap among them.
func ForcedGreedy(t testing.TB, m engine.Model, prompt, want []int32, ties Ties) (int, float64) {
	t.Helper()
	spec := m.Spec()
	n := len(prompt) + len(want)
	blocks := make([]int32, (n+spec.BlockSize-1)/spec.BlockSize)
	require.LessOrEqual(t, len(blocks), spec.NumBlocks)
	for i := range blocks {
		blocks[i] = int32(i)
	}
	out, err := m.Forward(context.Background(), &engine.Batch{Seqs: []engine.SeqInput{{Tokens: prompt, Blocks: blocks}}})
	require.NoError(t, err)
	flips, worst := 0, 0.0
	for i, w := range want {
		row := out.Logits[0]
		best, peak := 0, 0.0
		for j, v := range row {
			if v > row[best] {
				best = j
			}
			peak = max(peak, math.Abs(float64(v)))
		}
		if int32(best) != w {
			gap := float64(row[best]-row[w]) / max(peak, 1e-30)
			if gap > ties.Gap {
				t.Errorf("step %d: argmax %d, reference %d: gap %.3g of max|logit| (> %.3g): not a near tie", i, best, w, gap, ties.Gap)
			}
			flips++
			worst = max(worst, gap)
		}
		if i == len(want)-1 {
			break
		}
		out, err = m.Forward(context.Background(), &engine.Batch{Seqs: []engine.SeqInput{{Tokens: []int32{w}, Pos: len(prompt) + i, Blocks: blocks}}})
		require.NoError(t, err)
	}
	if flips > ties.MaxFlips {
		t.Errorf("%d near-tie flips in %d steps (at most %d)", flips, len(want), ties.MaxFlips)
	}
	return flips, worst
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
			if g.Greedy != nil { // float32: the teacher-forced check allows no flip at all
				ForcedGreedy(t, m, g.Tokens, g.Greedy, Ties{})
			}
		})
	}
}
