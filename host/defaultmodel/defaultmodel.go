// Package defaultmodel embeds orch's default model, so that `orch-host serve` without --model serves
// something on any machine, CPU only.
//
// The model is a 7M-parameter GPT-2 (6 layers, 256 wide, 8 heads, context 512, byte-level BPE of
// 8192 tokens) trained on Jane Austen's six novels (Debian package r-cran-janeaustenr 1.0.0-1, MIT;
// the texts are public domain). It writes readable, Austen-flavoured English; it is a tiny language
// model, not an assistant. The file is a llama.cpp-layout `gpt2` GGUF with Q8_0 matrices and F32
// norms, biases and positions (about 10 MB). How it was made: host/defaultmodel/train and
// docs/default-model.md.
//
// The GGUF is embedded with go:embed; Path writes it once into the user cache directory, under a
// content-hash name, so adapters can mmap it like any other model file.
package defaultmodel

import (
	"bytes"
	"crypto/sha256"
	_ "embed"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sync"
)

//go:embed model.gguf
var model []byte

const name = "orch-austen-gpt2-7m"

// Name is the default model's name, as reported by the API (e.g. in /v1/models).
func Name() string { return name }

// Size is the size in bytes of the embedded GGUF.
func Size() int64 { return int64(len(model)) }

// SHA256 is the hex SHA-256 of the embedded GGUF.
func SHA256() string {
	sumOnce.Do(func() {
		s := sha256.Sum256(model)
		sum = hex.EncodeToString(s[:])
	})
	return sum
}

var (
	sumOnce sync.Once
	sum     string
	pathMu  sync.Mutex
)

// FileName is the name Path gives the file: the model name and the first 16 hex digits of its hash.
func FileName() string { return name + "-" + SHA256()[:16] + ".gguf" }

// CacheDir is where Path writes the model: os.UserCacheDir()/orch.
func CacheDir() (string, error) {
	d, err := os.UserCacheDir()
	if err != nil {
		return "", fmt.Errorf("default model: no user cache directory (set XDG_CACHE_HOME or HOME): %w", err)
	}
	return filepath.Join(d, "orch"), nil
}

// Path returns the path of the default model's GGUF, writing it into CacheDir first if it is not
// already there intact.
func Path() (string, error) {
	dir, err := CacheDir()
	if err != nil {
		return "", err
	}
	return PathIn(dir)
}

// PathIn is Path with an explicit directory. An existing file of the right name is reused when its
// size and hash match; otherwise the model is written to a temporary file in dir and renamed into
// place, so concurrent callers and interrupted writes never leave a partial file under the final name.
func PathIn(dir string) (string, error) {
	if len(model) == 0 {
		return "", errors.New("default model: binary built without the embedded model")
	}
	pathMu.Lock()
	defer pathMu.Unlock()
	p := filepath.Join(dir, FileName())
	if intact(p) {
		return p, nil
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return "", fmt.Errorf("default model: create %s: %w", dir, err)
	}
	tmp, err := os.CreateTemp(dir, ".tmp-"+name+"-*")
	if err != nil {
		return "", fmt.Errorf("default model: write into %s: %w", dir, err)
	}
	defer os.Remove(tmp.Name()) // no-op after a successful rename
	if _, err := io.Copy(tmp, bytes.NewReader(model)); err != nil {
		tmp.Close()
		return "", fmt.Errorf("default model: write %s: %w", tmp.Name(), err)
	}
	if err := tmp.Sync(); err != nil {
		tmp.Close()
		return "", fmt.Errorf("default model: sync %s: %w", tmp.Name(), err)
	}
	if err := tmp.Close(); err != nil {
		return "", fmt.Errorf("default model: close %s: %w", tmp.Name(), err)
	}
	if err := os.Chmod(tmp.Name(), 0o644); err != nil {
		return "", fmt.Errorf("default model: chmod %s: %w", tmp.Name(), err)
	}
	if err := os.Rename(tmp.Name(), p); err != nil {
		return "", fmt.Errorf("default model: rename into %s: %w", p, err)
	}
	return p, nil
}

// intact reports whether p holds exactly the embedded model.
func intact(p string) bool {
	f, err := os.Open(p)
	if err != nil {
		return false
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil || !st.Mode().IsRegular() || st.Size() != int64(len(model)) {
		return false
	}
	h := sha256.New()
	if _, err := io.Copy(h, f); err != nil {
		return false
	}
	return hex.EncodeToString(h.Sum(nil)) == SHA256()
}
