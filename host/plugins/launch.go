package plugins

import (
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"sort"
	"strings"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/hashicorp/go-plugin"

	"github.com/llama-orch/orch/sdk"
)

// LaunchOptions configure an adapter process.
type LaunchOptions struct {
	// Env is added to the child's environment (e.g. CUDA_VISIBLE_DEVICES).
	// The child does not inherit the host's environment: it gets PATH,
	// HOME, TMPDIR, LD_LIBRARY_PATH, ORCH_* and CUDA_* from the host, then
	// ORCH_LOG_LEVEL (the logger's level), then Env.
	Env map[string]string
	// SecureConfig makes go-plugin verify the binary's SHA-256 against the
	// checksum taken when it was scanned (Plugin.Checksum) before starting it.
	SecureConfig bool
	// Logger receives go-plugin's logs and the adapter's own log lines
	// (under the binary's name). Default: a null logger.
	Logger hclog.Logger
	// StartTimeout bounds the go-plugin handshake only (loading happens in
	// the Load RPC). Default 30 s.
	StartTimeout time.Duration
}

// childEnv builds the adapter's environment explicitly.
func childEnv(opts LaunchOptions) []string {
	env := map[string]string{}
	for _, kv := range os.Environ() {
		k, v, ok := strings.Cut(kv, "=")
		if !ok {
			continue
		}
		switch {
		case k == "PATH", k == "HOME", k == "TMPDIR", k == "LD_LIBRARY_PATH", k == "LD_PRELOAD",
			strings.HasPrefix(k, "ORCH_"), strings.HasPrefix(k, "CUDA_"),
			// NCCL's own settings, and NVIDIA's tools (Nsight Compute / Systems, compute-sanitizer)
			// that reach a profiled child process through NV*-prefixed variables and LD_PRELOAD
			strings.HasPrefix(k, "NCCL_"), strings.HasPrefix(k, "NV"):
			if k != sdk.Handshake.MagicCookieKey {
				env[k] = v
			}
		}
	}
	if opts.Logger != nil {
		if l := opts.Logger.GetLevel(); l != hclog.NoLevel && l != hclog.Off {
			env[sdk.EnvLogLevel] = l.String()
		}
	}
	for k, v := range opts.Env {
		env[k] = v
	}
	out := make([]string, 0, len(env))
	for k, v := range env {
		out = append(out, k+"="+v)
	}
	sort.Strings(out)
	return out
}

// Instance is one running adapter process. It implements sdk.Adapter: the
// host calls it like a local adapter. Calls that fail because the process
// died return errors matching sdk.ErrAdapterCrashed.
type Instance struct {
	plugin Plugin
	client *plugin.Client
	rpc    plugin.ClientProtocol
	remote sdk.RemoteAdapter
	log    hclog.Logger
}

var _ sdk.Adapter = (*Instance)(nil)

// Launch starts the adapter process of p and connects to it (AutoMTLS,
// gRPC only, protocol version sdk.ProtocolVersion).
func Launch(ctx context.Context, p Plugin, opts LaunchOptions) (*Instance, error) {
	if err := ctx.Err(); err != nil {
		return nil, fmt.Errorf("launch adapter %s: %w", p.Name, err)
	}
	log := opts.Logger
	if log == nil {
		log = hclog.NewNullLogger()
	}
	if opts.StartTimeout <= 0 {
		opts.StartTimeout = 30 * time.Second
	}
	var secure *plugin.SecureConfig
	if opts.SecureConfig {
		if len(p.Checksum) == 0 {
			return nil, fmt.Errorf("launch adapter %s: secure config needs the checksum taken at scan time", p.Name)
		}
		secure = &plugin.SecureConfig{Checksum: p.Checksum, Hash: sha256.New()}
	}
	cmd := exec.Command(p.Path)
	cmd.Env = childEnv(opts)
	setPdeathsig(cmd)
	client := plugin.NewClient(&plugin.ClientConfig{
		HandshakeConfig:  sdk.Handshake,
		VersionedPlugins: sdk.ClientPlugins(),
		Cmd:              cmd,
		AllowedProtocols: []plugin.Protocol{plugin.ProtocolGRPC},
		AutoMTLS:         true,
		SkipHostEnv:      true,
		SecureConfig:     secure,
		StartTimeout:     opts.StartTimeout,
		Logger:           log,
		GRPCDialOptions:  sdk.ClientDialOptions(),
	})
	var rpc plugin.ClientProtocol
	var err error
	spawn(func() { rpc, err = client.Client() }) // forks on the dedicated thread (Pdeathsig)
	if err != nil {
		client.Kill()
		if errors.Is(err, plugin.ErrChecksumsDoNotMatch) {
			return nil, fmt.Errorf("launch adapter %s (%s): binary changed since it was scanned: %w", p.Name, p.Path, err)
		}
		return nil, fmt.Errorf("launch adapter %s (%s): %w", p.Name, p.Path, err)
	}
	raw, err := rpc.Dispense(sdk.PluginName)
	if err != nil {
		client.Kill()
		return nil, fmt.Errorf("launch adapter %s: dispense: %w", p.Name, err)
	}
	remote, ok := raw.(sdk.RemoteAdapter)
	if !ok {
		client.Kill()
		return nil, fmt.Errorf("launch adapter %s: unexpected client type %T", p.Name, raw)
	}
	inst := &Instance{plugin: p, client: client, rpc: rpc, remote: remote, log: log}
	if err := ctx.Err(); err != nil {
		inst.kill()
		return nil, fmt.Errorf("launch adapter %s: %w", p.Name, err)
	}
	if rc := client.ReattachConfig(); rc != nil {
		log.Debug("adapter started", "plugin", p.Name, "pid", rc.Pid)
	}
	return inst, nil
}

// Plugin returns the plugin this instance runs.
func (i *Instance) Plugin() Plugin { return i.plugin }

// Info returns the adapter's Info (from the scan).
func (i *Instance) Info() sdk.Info { return i.plugin.Info }

// Describe asks the running adapter for its Info.
func (i *Instance) Describe(ctx context.Context) (sdk.Info, error) {
	info, err := i.remote.Describe(ctx)
	return info, i.wrap(err)
}

// Pid returns the adapter's process id (0 if unknown).
func (i *Instance) Pid() int {
	if rc := i.client.ReattachConfig(); rc != nil {
		return rc.Pid
	}
	return 0
}

// Exited reports whether the adapter process has exited.
func (i *Instance) Exited() bool { return i.client.Exited() }

// Ping checks that the adapter answers (gRPC health service) within timeout.
func (i *Instance) Ping(timeout time.Duration) error {
	if i.client.Exited() {
		return fmt.Errorf("adapter %s: %w: process exited", i.plugin.Name, sdk.ErrAdapterCrashed)
	}
	done := make(chan error, 1)
	go func() { done <- i.rpc.Ping() }()
	t := time.NewTimer(timeout)
	defer t.Stop()
	select {
	case err := <-done:
		if err != nil {
			return fmt.Errorf("adapter %s: ping: %w", i.plugin.Name, err)
		}
		return nil
	case <-t.C:
		return fmt.Errorf("adapter %s: ping: no answer within %s", i.plugin.Name, timeout)
	}
}

// wrap turns an error of a call whose process died into one matching
// sdk.ErrAdapterCrashed, and names the adapter.
func (i *Instance) wrap(err error) error {
	if err == nil {
		return nil
	}
	if errors.Is(err, sdk.ErrAdapterCrashed) {
		return fmt.Errorf("adapter %s: %w", i.plugin.Name, err)
	}
	if i.client.Exited() {
		return fmt.Errorf("adapter %s: %w: %w", i.plugin.Name, sdk.ErrAdapterCrashed, err)
	}
	return err
}

// Load implements sdk.Adapter.
func (i *Instance) Load(ctx context.Context, req sdk.LoadRequest, progress func(sdk.LoadProgress)) (sdk.ModelInfo, error) {
	info, err := i.remote.Load(ctx, req, progress)
	return info, i.wrap(err)
}

// Plan asks for a memory plan; the error matches sdk.ErrNotImplemented when
// the adapter cannot plan.
func (i *Instance) Plan(ctx context.Context, req sdk.LoadRequest) (sdk.MemoryPlan, error) {
	p, err := i.remote.Plan(ctx, req)
	return p, i.wrap(err)
}

// Generate implements sdk.Adapter.
func (i *Instance) Generate(ctx context.Context, req sdk.GenerateRequest, emit func(sdk.Chunk) error) error {
	return i.wrap(i.remote.Generate(ctx, req, emit))
}

// Cancel implements sdk.Adapter.
func (i *Instance) Cancel(ctx context.Context, id string) error {
	return i.wrap(i.remote.Cancel(ctx, id))
}

// Evaluate implements sdk.Adapter.
func (i *Instance) Evaluate(ctx context.Context, tokens []int32) (sdk.Logits, error) {
	l, err := i.remote.Evaluate(ctx, tokens)
	return l, i.wrap(err)
}

// Stats implements sdk.Adapter.
func (i *Instance) Stats(ctx context.Context) (sdk.Stats, error) {
	s, err := i.remote.Stats(ctx)
	return s, i.wrap(err)
}

// Unload implements sdk.Adapter.
func (i *Instance) Unload(ctx context.Context) error {
	return i.wrap(i.remote.Unload(ctx))
}

// Close unloads the model (go-plugin's Kill waits only 2 s for a graceful
// exit, too little to free a big model) and then stops the process.
func (i *Instance) Close(ctx context.Context) error {
	var err error
	if !i.client.Exited() {
		uctx, cancel := context.WithTimeout(ctx, 30*time.Second)
		err = i.Unload(uctx)
		cancel()
		if errors.Is(err, sdk.ErrNotLoaded) {
			err = nil
		}
	}
	i.kill()
	if err != nil {
		return fmt.Errorf("close adapter %s: %w", i.plugin.Name, err)
	}
	return nil
}

func (i *Instance) kill() { i.client.Kill() }
