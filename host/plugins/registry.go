// Package plugins is orch-host's adapter registry and lifecycle: it finds
// orch-adapter-* binaries and asks each to describe itself (Scan), picks
// the adapter for a model's architecture (Select), launches adapter
// processes over go-plugin gRPC (Launch, *Instance) and keeps them alive
// (Supervise, *Managed: health checks, relaunch with capped backoff, model
// reload, clean failure of in-flight calls).
//
// No adapter outlives the host: the child gets Pdeathsig on Linux (spawned
// from one dedicated OS thread, because Pdeathsig fires when the spawning
// thread exits), and sdk.Serve makes the adapter exit when its parent
// changes.
package plugins

import (
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/hashicorp/go-hclog"

	"github.com/llama-orch/orch/host/config"
	"github.com/llama-orch/orch/sdk"
)

// Prefix is the file name prefix of adapter binaries.
const Prefix = "orch-adapter-"

// ErrNoAdapter is returned by Select when no installed adapter fits.
var ErrNoAdapter = errors.New("no adapter")

// Plugin is an installed adapter binary and what it said about itself.
type Plugin struct {
	Name     string // Info.Name
	Path     string // absolute path of the binary
	Info     sdk.Info
	Checksum []byte // SHA-256 of the binary when scanned (used by SecureConfig)
}

// DefaultDirs returns the directories scanned for adapters: the directory of
// the running executable first, then configDir (plugins.dir) when set.
func DefaultDirs(configDir string) []string {
	var dirs []string
	if exe, err := os.Executable(); err == nil {
		if r, err := filepath.EvalSymlinks(exe); err == nil {
			exe = r
		}
		dirs = append(dirs, filepath.Dir(exe))
	}
	if configDir != "" {
		if abs, err := filepath.Abs(configDir); err == nil {
			configDir = abs
		}
		if !slices.Contains(dirs, configDir) {
			dirs = append(dirs, configDir)
		}
	}
	return dirs
}

type cacheKey struct {
	path  string
	mtime time.Time
	size  int64
}

var (
	cacheMu sync.Mutex
	cache   = map[cacheKey]Plugin{}
)

// Scan finds orch-adapter-* executables in dirs (in order; a name found
// again later is shadowed, with a warning), launches each briefly to ask
// for its Info (cached by path, mtime and size) and returns them in scan
// order. Missing directories are skipped; a binary that fails to describe
// itself is skipped with a warning. Errors are returned only for
// directories that exist but cannot be read.
func Scan(dirs []string, log hclog.Logger) ([]Plugin, error) {
	if log == nil {
		log = hclog.NewNullLogger()
	}
	var out []Plugin
	seen := map[string]string{}
	for _, dir := range dirs {
		if dir == "" {
			continue
		}
		entries, err := os.ReadDir(dir)
		if errors.Is(err, os.ErrNotExist) {
			log.Debug("plugin directory does not exist", "dir", dir)
			continue
		}
		if err != nil {
			return nil, fmt.Errorf("scan plugin directory %s: %w", dir, err)
		}
		for _, e := range entries {
			if !strings.HasPrefix(e.Name(), Prefix) || e.IsDir() {
				continue
			}
			path, err := filepath.Abs(filepath.Join(dir, e.Name()))
			if err != nil {
				continue
			}
			st, err := os.Stat(path)
			if err != nil || !st.Mode().IsRegular() || st.Mode().Perm()&0o111 == 0 {
				log.Debug("skipping non-executable file", "path", path)
				continue
			}
			p, err := describe(path, st, log)
			if err != nil {
				log.Warn("skipping adapter that failed to describe itself", "path", path, "error", err)
				continue
			}
			if prev, dup := seen[p.Name]; dup {
				log.Warn("adapter name found twice; the first one wins", "plugin", p.Name, "used", prev, "shadowed", path)
				continue
			}
			seen[p.Name] = path
			out = append(out, p)
		}
	}
	return out, nil
}

func describe(path string, st os.FileInfo, log hclog.Logger) (Plugin, error) {
	key := cacheKey{path: path, mtime: st.ModTime(), size: st.Size()}
	cacheMu.Lock()
	p, ok := cache[key]
	cacheMu.Unlock()
	if ok {
		return p, nil
	}
	sum, err := fileSHA256(path)
	if err != nil {
		return Plugin{}, err
	}
	p = Plugin{Name: strings.TrimPrefix(filepath.Base(path), Prefix), Path: path, Checksum: sum}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	inst, err := Launch(ctx, p, LaunchOptions{Logger: log, SecureConfig: true})
	if err != nil {
		return Plugin{}, err
	}
	defer inst.kill()
	info, err := inst.remote.Describe(ctx)
	if err != nil {
		return Plugin{}, fmt.Errorf("describe %s: %w", path, err)
	}
	if info.Name == "" {
		return Plugin{}, fmt.Errorf("describe %s: adapter reported no name", path)
	}
	p.Name, p.Info = info.Name, info
	cacheMu.Lock()
	cache[key] = p
	cacheMu.Unlock()
	return p, nil
}

func fileSHA256(path string) ([]byte, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("checksum %s: %w", path, err)
	}
	defer f.Close()
	h := sha256.New()
	if _, err := io.Copy(h, f); err != nil {
		return nil, fmt.Errorf("checksum %s: %w", path, err)
	}
	return h.Sum(nil), nil
}

// PinFor returns the adapter name pinned for a model: the model's own
// `adapter` key, else plugins.architectures[arch], else "".
func PinFor(cfg config.PluginsConfig, model config.ModelConfig, arch string) string {
	if model.Adapter != "" {
		return model.Adapter
	}
	return cfg.Architectures[arch]
}

// Select picks the adapter for a model of architecture arch: the adapter
// named pin when pin is set (even if it does not declare arch: pinning is
// how a user swaps in an adapter), else the first whose Architectures
// contain arch. The error (matching ErrNoAdapter) lists what is installed.
func Select(plugins []Plugin, arch string, pin string) (Plugin, error) {
	if pin != "" {
		for _, p := range plugins {
			if p.Name == pin {
				return p, nil
			}
		}
		return Plugin{}, fmt.Errorf("%w named %q (pinned for architecture %q) is installed; %s", ErrNoAdapter, pin, arch, Installed(plugins))
	}
	for _, p := range plugins {
		if slices.Contains(p.Info.Architectures, arch) {
			return p, nil
		}
	}
	return Plugin{}, fmt.Errorf("%w serves architecture %q; %s", ErrNoAdapter, arch, Installed(plugins))
}

// Installed describes the installed adapters in one line, for errors.
func Installed(plugins []Plugin) string {
	if len(plugins) == 0 {
		return "no adapters are installed (orch-adapter-* next to orch-host or in plugins.dir)"
	}
	parts := make([]string, len(plugins))
	for i, p := range plugins {
		archs := slices.Clone(p.Info.Architectures)
		sort.Strings(archs)
		parts[i] = fmt.Sprintf("%s [%s] at %s", p.Name, strings.Join(archs, ", "), p.Path)
	}
	return "installed: " + strings.Join(parts, "; ")
}
