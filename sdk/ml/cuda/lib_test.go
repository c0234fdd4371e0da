package cuda

import (
	"errors"
	"os"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/require"
)

// Without a usable liborch_cuda.so (CI, laptops) the backend must answer with
// ErrUnavailable and a reason, never panic.
func TestOpenLibGarbage(t *testing.T) {
	p := filepath.Join(t.TempDir(), LibName)
	require.NoError(t, os.WriteFile(p, []byte("not an ELF file"), 0o644))
	t.Setenv("ORCH_CUDA_LIB", p)
	l, err := openLib()
	if err == nil {
		require.NotEqual(t, p, l.path, "a garbage file must not load")
		t.Skipf("a real %s was found at %s", LibName, l.path)
	}
	require.True(t, errors.Is(err, ErrUnavailable), "error %v must wrap ErrUnavailable", err)
	require.Contains(t, err.Error(), LibName)
}

func TestNewWithoutGPUIsClean(t *testing.T) {
	b, err := New(0)
	if err == nil {
		defer b.Close()
		t.Skipf("a GPU is available here: %s", b.DeviceName())
	}
	require.True(t, errors.Is(err, ErrUnavailable), "error %v must wrap ErrUnavailable", err)
	require.Error(t, Available())
}

func TestAttnArgsLayout(t *testing.T) {
	// orch_attn_args: 8 pointers, 2 int64, 7 int32, 1 float, 1 int32 = 116 -> 120 bytes.
	var a attnArgs
	require.Equal(t, uintptr(120), sizeofAttnArgs(&a))
}
