package adaptertest_test

import (
	"context"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"testing"

	"github.com/hashicorp/go-hclog"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/llama-orch/orch/sdk"
	"github.com/llama-orch/orch/sdk/adaptertest"
	"github.com/llama-orch/orch/sdk/example"
)

// broken is the example adapter with one deliberate contract violation.
type broken struct {
	*example.Adapter
	mode string
}

func (b *broken) Generate(ctx context.Context, req sdk.GenerateRequest, emit func(sdk.Chunk) error) error {
	switch b.mode {
	case "ignore-stop":
		req.StopTokens = nil
	case "no-finish":
		inner := emit
		emit = func(c sdk.Chunk) error {
			c.Finish = sdk.FinishNone
			return inner(c)
		}
	}
	err := b.Adapter.Generate(ctx, req, emit)
	if b.mode == "untyped-errors" && err != nil {
		return errors.New(err.Error()) // loses the sentinel
	}
	return err
}

func (b *broken) Cancel(ctx context.Context, id string) error {
	if b.mode == "ignore-cancel" {
		return nil
	}
	return b.Adapter.Cancel(ctx, id)
}

func runKit(t *testing.T, mode string) {
	dir := t.TempDir()
	model := filepath.Join(dir, "m.json")
	require.NoError(t, example.WriteModel(model, example.ModelFile{Architecture: "example-counter", VocabSize: 32, ContextLength: 256}))
	info := sdk.Info{Name: "example", Version: "0", Architectures: []string{"example-counter"}}
	adaptertest.Run(t, func(l hclog.Logger) (sdk.Adapter, error) {
		return &broken{Adapter: example.New(l, info.Architectures), mode: mode}, nil
	}, adaptertest.Options{Info: info, ModelPath: model})
}

// TestBrokenAdapter runs the kit against a broken adapter; it is a helper
// process for TestKitCatchesBrokenAdapters and skips on its own.
func TestBrokenAdapter(t *testing.T) {
	mode := os.Getenv("ADAPTERTEST_BROKEN")
	if mode == "" {
		t.Skip("helper for TestKitCatchesBrokenAdapters")
	}
	runKit(t, mode)
}

func TestKitPassesUnmodifiedAdapter(t *testing.T) { runKit(t, "") }

// The kit must fail, in the right sub-test, for each contract violation.
func TestKitCatchesBrokenAdapters(t *testing.T) {
	if os.Getenv("ADAPTERTEST_BROKEN") != "" {
		t.Skip("inside the helper process")
	}
	cases := []struct{ mode, failing string }{
		{"ignore-stop", "stop_tokens"},
		{"no-finish", "generate_max_tokens"},
		{"untyped-errors", "not_loaded"},
		{"ignore-cancel", "cancel_by_id"},
	}
	for _, c := range cases {
		t.Run(c.mode, func(t *testing.T) {
			cmd := exec.Command(os.Args[0], "-test.run=^TestBrokenAdapter$", "-test.v")
			cmd.Env = append(os.Environ(), "ADAPTERTEST_BROKEN="+c.mode)
			out, err := cmd.CombinedOutput()
			require.Error(t, err, "the kit passed a broken adapter:\n%s", out)
			assert.Contains(t, string(out), "--- FAIL: TestBrokenAdapter/"+c.failing, "%s", out)
		})
	}
}
