package example_test

import (
	"path/filepath"
	"testing"

	"github.com/hashicorp/go-hclog"
	"github.com/stretchr/testify/require"

	"github.com/llama-orch/orch/sdk"
	"github.com/llama-orch/orch/sdk/adaptertest"
	"github.com/llama-orch/orch/sdk/example"
)

func TestConformance(t *testing.T) {
	dir := t.TempDir()
	model := filepath.Join(dir, "counter.json")
	require.NoError(t, example.WriteModel(model, example.ModelFile{
		Architecture: "example-counter", Name: "counter", VocabSize: 64, ContextLength: 256}))
	other := filepath.Join(dir, "other.json")
	require.NoError(t, example.WriteModel(other, example.ModelFile{
		Architecture: "llama", VocabSize: 64, ContextLength: 256}))

	info := sdk.Info{Name: "example", Version: "0.1.0", Architectures: []string{"example-counter"}}
	adaptertest.Run(t, func(l hclog.Logger) (sdk.Adapter, error) {
		return example.New(l, info.Architectures), nil
	}, adaptertest.Options{Info: info, ModelPath: model, UnsupportedModelPath: other})
}
