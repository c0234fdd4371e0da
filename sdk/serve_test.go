package sdk_test

import (
	"context"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/hashicorp/go-plugin"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/llama-orch/orch/sdk"
)

// Serve in go-plugin's reattach (test) mode, and a go-plugin client with the
// host's plugin set: the whole go-plugin wiring in one process.
func TestServeReattach(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	reattach := make(chan *plugin.ReattachConfig, 1)
	closed := make(chan struct{})
	served := make(chan error, 1)
	go func() {
		served <- sdk.Serve(fakeInfo, func(hclog.Logger) (sdk.Adapter, error) { return &fake{vocab: 4}, nil },
			sdk.WithLogger(hclog.NewNullLogger()),
			sdk.WithTestConfig(&plugin.ServeTestConfig{Context: ctx, ReattachConfigCh: reattach, CloseCh: closed}))
	}()
	var rc *plugin.ReattachConfig
	select {
	case rc = <-reattach:
	case err := <-served:
		t.Fatalf("Serve returned early: %v", err)
	case <-time.After(10 * time.Second):
		t.Fatal("no reattach config")
	}
	client := plugin.NewClient(&plugin.ClientConfig{
		HandshakeConfig:  sdk.Handshake,
		Plugins:          sdk.ClientPlugins()[sdk.ProtocolVersion], // reattach does not negotiate versions
		Reattach:         rc,
		AllowedProtocols: []plugin.Protocol{plugin.ProtocolGRPC},
		Logger:           hclog.NewNullLogger(),
	})
	defer client.Kill()
	rpc, err := client.Client()
	require.NoError(t, err)
	raw, err := rpc.Dispense(sdk.PluginName)
	require.NoError(t, err)
	a, ok := raw.(sdk.RemoteAdapter)
	require.True(t, ok, "dispensed %T", raw)
	info, err := a.Describe(ctx)
	require.NoError(t, err)
	assert.Equal(t, fakeInfo, info)
	_, err = a.Evaluate(ctx, []int32{1})
	require.NoError(t, err)
	cancel()
	select {
	case <-closed:
	case <-time.After(10 * time.Second):
		t.Fatal("Serve did not stop when its test context ended")
	}
}
