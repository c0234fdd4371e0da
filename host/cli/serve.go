package cli

import (
	"context"
	"errors"
	"fmt"
	"math"
	"net"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/spf13/cobra"

	"github.com/llama-orch/orch/host/config"
	"github.com/llama-orch/orch/host/defaultmodel"
	"github.com/llama-orch/orch/host/placement"
	"github.com/llama-orch/orch/host/plugins"
	"github.com/llama-orch/orch/host/replica"
	"github.com/llama-orch/orch/host/server"
	"github.com/llama-orch/orch/sdk"
	"github.com/llama-orch/orch/sdk/gguf"
	"github.com/llama-orch/orch/sdk/tokenizer"
)

func init() { register(newServeCmd) }

// loadedModel is a model ready to serve and how to release it.
type loadedModel struct {
	model server.Model
	close func(ctx context.Context) error
}

// serveOpenModel loads one model for serve: it reads the GGUF's architecture
// and tokenizer, picks the adapter (host/plugins: Scan, Select, Supervise),
// loads the model in it and describes it for the server. Tests replace it.
var serveOpenModel = func(ctx context.Context, cfg *config.Config, found []plugins.Plugin, mc config.ModelConfig, log hclog.Logger) (loadedModel, error) {
	f, err := gguf.Open(mc.Path)
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return loadedModel{}, fmt.Errorf("model file %s does not exist: pass --model with the path of a .gguf file", mc.Path)
		}
		return loadedModel{}, err
	}
	arch := f.Architecture()
	p, err := plugins.Select(found, arch, plugins.PinFor(cfg.Plugins, mc, arch))
	if err != nil {
		_ = f.Close()
		return loadedModel{}, fmt.Errorf("%s: %w", mc.Path, err)
	}
	tok, err := tokenizer.FromGGUF(f)
	if err != nil {
		_ = f.Close()
		return loadedModel{}, fmt.Errorf("%s: tokenizer: %w", mc.Path, err)
	}
	reps, err := placement.ParseReplicas(mc.Replicas)
	if err != nil {
		_ = f.Close()
		return loadedModel{}, fmt.Errorf("%s: %w", mc.Path, err)
	}
	req := sdk.LoadRequest{Path: mc.Path, Options: loadOptions(mc)}
	a, _, err := replica.OpenModel(ctx, p, req, replica.OpenOptions{
		Replicas: reps, TensorParallel: mc.TensorParallel, Name: modelID(mc), Logger: log.Named(p.Name),
	})
	if err != nil {
		_ = f.Close()
		return loadedModel{}, fmt.Errorf("%s: %w", mc.Path, err)
	}
	closeAll := func(ctx context.Context) error {
		return errors.Join(a.Close(ctx), f.Close())
	}
	log.Info("loading model", "model", mc.Path, "arch", arch, "adapter", p.Name)
	info, err := a.Load(ctx, req, func(pr sdk.LoadProgress) {
		log.Debug("load", "model", mc.Path, "stage", pr.Stage, "done", pr.Done, "total", pr.Total)
	})
	if err != nil {
		_ = closeAll(context.Background())
		return loadedModel{}, fmt.Errorf("%s: load in adapter %s: %w", mc.Path, p.Name, err)
	}
	log.Info("model loaded", "model", mc.Path, "backend", info.Backend, "device", info.DeviceName,
		"context_length", info.ContextLength, "max_sequences", info.MaxSequences)
	return loadedModel{model: server.NewModel(modelID(mc), a, info, p.Info.Features, tok), close: closeAll}, nil
}

// loadOptions are the adapter's load options for a configured model.
func loadOptions(mc config.ModelConfig) sdk.LoadOptions {
	return sdk.LoadOptions{
		Device: mc.Device, ContextLength: mc.ContextLength, MaxSequences: mc.MaxSequences,
		KVCacheFraction: mc.KVCacheFraction,
	}
}

// modelID is the served id: models[].name, else the file name without .gguf.
func modelID(mc config.ModelConfig) string {
	if mc.Name != "" {
		return mc.Name
	}
	return strings.TrimSuffix(filepath.Base(mc.Path), ".gguf")
}

func newServeCmd() *cobra.Command {
	var (
		models   []string
		device   string
		ctxLen   int
		maxSeqs  int
		kvFrac   float64
		replicas string
		tpSize   int
		shutdown time.Duration
	)
	cmd := &cobra.Command{
		Use:   "serve [--model FILE ...] [--addr 127.0.0.1:8080]",
		Short: "Serve models through an OpenAI-compatible HTTP API",
		Long: `serve loads each model through the adapter plugin that declares its
architecture and serves them over an OpenAI-compatible HTTP API:

  POST /v1/chat/completions, POST /v1/completions   (stream with "stream": true)
  GET  /v1/models, GET /health, GET /metrics (Prometheus), POST /tokenize, POST /detokenize

The request's "model" field picks the model: models[].name, else the file
name without .gguf. Models come from --model (repeatable; replaces the
config's models) or the config's models[]; with neither, the embedded
default model is served. API keys (server.api_keys, ORCH_SERVER__API_KEYS or
--api-key) make /v1/*, /tokenize and /detokenize require
"Authorization: Bearer <key>". SIGINT/SIGTERM stop accepting requests, let
running ones finish for --shutdown-timeout, then cancel the rest.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			cfg, err := loadConfig(cmd)
			if err != nil {
				return err
			}
			log := newLogger(cfg)
			mcs := cfg.Models
			if len(models) > 0 {
				mcs = nil
				for _, p := range models {
					mcs = append(mcs, config.ModelConfig{Path: p})
				}
			}
			for i := range mcs {
				if cmd.Flags().Changed("device") || mcs[i].Device == "" {
					mcs[i].Device = device
				}
				if cmd.Flags().Changed("context-length") {
					mcs[i].ContextLength = ctxLen
				}
				if cmd.Flags().Changed("max-sequences") {
					mcs[i].MaxSequences = maxSeqs
				}
				if cmd.Flags().Changed("kv-cache-fraction") {
					mcs[i].KVCacheFraction = kvFrac
				}
				if cmd.Flags().Changed("replicas") {
					mcs[i].Replicas = replicas
				}
				if cmd.Flags().Changed("tensor-parallel") {
					mcs[i].TensorParallel = tpSize
				}
			}
			if len(mcs) == 0 {
				p, err := defaultmodel.Path()
				if err != nil {
					return fmt.Errorf("serve: no model given and the default model is unavailable (%v); pass --model FILE.gguf", err)
				}
				log.Info("no --model given: serving the embedded default model", "model", defaultmodel.Name())
				mcs = []config.ModelConfig{{Path: p, Name: defaultmodel.Name(), Device: device, Replicas: replicas, TensorParallel: tpSize, KVCacheFraction: kvFrac}}
			}
			for _, mc := range mcs {
				if mc.TensorParallel < 0 {
					return fmt.Errorf("serve: %s: tensor_parallel %d: want 0 or 1 (unsplit) or a rank count >= 2", mc.Path, mc.TensorParallel)
				}
				if fr := mc.KVCacheFraction; math.IsNaN(fr) || fr < 0 || fr > 1 {
					return fmt.Errorf("serve: %s: kv_cache_fraction %v: want a share of free memory in (0, 1], or 0 for context x sequences", mc.Path, fr)
				}
			}
			ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
			defer stop()
			return runServe(ctx, cfg, mcs, shutdown, log, cmd)
		},
	}
	f := cmd.Flags()
	f.StringArrayVarP(&models, "model", "m", nil, "GGUF model file to serve (repeatable)")
	f.String("addr", "127.0.0.1:8080", "listen address (server.addr)")
	f.StringArray("api-key", nil, "accepted API key (repeatable; server.api_keys)")
	f.Int("max-queue", 64, "requests per model that may wait for a slot before 429 (server.max_queue)")
	f.String("plugins-dir", "", "extra directory with orch-adapter-* binaries (plugins.dir)")
	f.StringVar(&device, "device", "auto", "device for models without one: auto, cpu or cuda")
	f.IntVar(&ctxLen, "context-length", 0, "max tokens per sequence (0 = model's, capped by memory)")
	f.IntVar(&maxSeqs, "max-sequences", 0, "max concurrent sequences per model (0 = adapter default)")
	f.Float64Var(&kvFrac, "kv-cache-fraction", 0, "share of free device memory (after weights and workspace) for the KV cache, in (0, 1]; 0 = context x sequences (models[].kv_cache_fraction)")
	f.StringVar(&replicas, "replicas", "", "adapter processes per model, one per GPU: a number or \"all\" (default: one; docs/multi-gpu.md)")
	f.IntVar(&tpSize, "tensor-parallel", 0, "split each model over N ranks, one adapter process per GPU (N CPU processes with --device cpu), even when it fits one GPU; 0 = only when it fits no GPU (models[].tensor_parallel; docs/multi-gpu.md)")
	f.DurationVar(&shutdown, "shutdown-timeout", 30*time.Second, "on SIGINT/SIGTERM, how long running requests may finish")
	return cmd
}

// runServe listens, loads the models (health says "loading" meanwhile),
// serves until ctx ends, then shuts down gracefully and unloads.
func runServe(ctx context.Context, cfg *config.Config, mcs []config.ModelConfig, grace time.Duration, log hclog.Logger, cmd *cobra.Command) error {
	maxQueue := cfg.Server.MaxQueue
	if maxQueue == 0 {
		maxQueue = -1 // configured 0: no waiting room
	}
	srv := server.New(server.Options{Logger: log.Named("http"), APIKeys: cfg.Server.APIKeys, MaxQueue: maxQueue})
	l, err := net.Listen("tcp", cfg.Server.Addr)
	if err != nil {
		if errors.Is(err, syscall.EADDRINUSE) {
			return fmt.Errorf("serve: address %s is already in use (another orch-host?): stop it or pick another with --addr", cfg.Server.Addr)
		}
		return fmt.Errorf("serve: %w", err)
	}
	serveErr := make(chan error, 1)
	go func() { serveErr <- srv.Serve(l) }()
	log.Info("listening", "addr", l.Addr().String(), "api_keys", len(cfg.Server.APIKeys) > 0)
	fmt.Fprintf(cmd.ErrOrStderr(), "orch-host: listening on http://%s\n", l.Addr())

	var loaded []loadedModel
	defer func() {
		cctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		for _, lm := range loaded {
			if lm.close != nil {
				if err := lm.close(cctx); err != nil {
					log.Warn("closing model", "model", lm.model.ID, "error", err)
				}
			}
		}
	}()
	var found []plugins.Plugin
	if serveOpenModel != nil {
		found, err = plugins.Scan(plugins.DefaultDirs(cfg.Plugins.Dir), log.Named("plugins"))
		if err != nil {
			log.Warn("scanning plugins", "error", err)
		}
	}
	for _, mc := range mcs {
		lm, err := serveOpenModel(ctx, cfg, found, mc, log)
		if err != nil {
			_ = srv.Shutdown(context.Background())
			return fmt.Errorf("serve: %w", err)
		}
		loaded = append(loaded, lm)
		if err := srv.AddModel(lm.model); err != nil {
			_ = srv.Shutdown(context.Background())
			return fmt.Errorf("serve: %w", err)
		}
	}
	srv.SetReady(true)
	log.Info("ready", "models", len(loaded))

	select {
	case err := <-serveErr:
		if err != nil {
			return fmt.Errorf("serve: %w", err)
		}
		return nil
	case <-ctx.Done():
	}
	log.Info("shutting down", "grace", grace)
	sctx, cancel := context.WithTimeout(context.Background(), grace)
	defer cancel()
	if err := srv.Shutdown(sctx); err != nil {
		return fmt.Errorf("serve: %w", err)
	}
	<-serveErr
	return nil
}
