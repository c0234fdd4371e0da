package cuda

import (
	"fmt"
	"sync"
	"testing"
	"time"
	"unsafe"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/llama-orch/orch/sdk/ml"
)

var _ ml.Comm = (*comm)(nil)

func TestNCCLVersionString(t *testing.T) {
	for code, want := range map[int]string{
		22105: "2.21.5", 21903: "2.19.3", 20900: "2.9.0", 22703: "2.27.3",
		2804: "2.8.4", 2708: "2.7.8", // the pre-2.9 encoding X*1000 + Y*100 + Z
	} {
		assert.Equal(t, want, ncclVersionString(code), "code %d", code)
	}
}

func TestClosedBackendComm(t *testing.T) {
	b := &Backend{} // ctx 0: closed (or never opened)
	_, err := b.CommID()
	assert.ErrorContains(t, err, "closed")
	_, err = b.NewComm(make([]byte, CommIDBytes), 0, 2)
	assert.ErrorContains(t, err, "closed")
	_, err = b.NewComm(make([]byte, 16), 0, 2)
	assert.ErrorContains(t, err, "id of 16 bytes")
	for _, rs := range [][2]int{{0, 0}, {2, 2}, {-1, 2}} {
		_, err = b.NewComm(make([]byte, CommIDBytes), rs[0], rs[1])
		assert.ErrorContains(t, err, "rank", "rank %d size %d", rs[0], rs[1])
	}
	_, _, err = b.NCCLVersion()
	assert.ErrorContains(t, err, "closed")
}

// fakeComm is a liborch_cuda with fake collectives recording what the
// backend calls, for the Go side of comm.go without a GPU.
type fakeComm struct {
	mu      sync.Mutex
	log     []string
	ncclRC  int32         // answer of the comm entries (stUnsupported: no NCCL)
	arRC    int32         // answer of orch_comm_allreduce_f32
	asyncRC int32         // answer of orch_comm_async_error
	abortGo chan struct{} // orch_comm_abort blocks until closed (nil: returns at once)
	inAbort chan struct{} // closed when orch_comm_abort was entered
	lastErr string
}

func (f *fakeComm) add(format string, a ...any) {
	f.mu.Lock()
	f.log = append(f.log, fmt.Sprintf(format, a...))
	f.mu.Unlock()
}

func (f *fakeComm) take() []string {
	f.mu.Lock()
	defer f.mu.Unlock()
	l := f.log
	f.log = nil
	return l
}

func newCommBackend(t *testing.T) (*Backend, *fakeComm) {
	f := &fakeComm{inAbort: make(chan struct{})}
	l := &lib{
		lastError: func(buf *byte, n int64) int32 {
			s := unsafe.Slice(buf, n)
			copy(s, f.lastErr+"\x00")
			return stOK
		},
		commAvailable: func(ctx uintptr, v *int32) int32 { *v = 22809; return f.ncclRC },
		commLibrary: func(buf *byte, n int64) int32 {
			copy(unsafe.Slice(buf, n), "libnccl.so.2\x00")
			return f.ncclRC
		},
		commUniqueID: func(ctx uintptr, out *byte) int32 {
			unsafe.Slice(out, CommIDBytes)[127] = 7
			return f.ncclRC
		},
		commInit: func(ctx uintptr, id *byte, rank, size int32, out *uintptr) int32 {
			f.add("init rank=%d size=%d id[127]=%d", rank, size, unsafe.Slice(id, CommIDBytes)[127])
			*out = 0xc0
			return f.ncclRC
		},
		commAllreduceF32: func(ctx, comm, buf uintptr, n int64) int32 {
			f.add("allreduce comm=%x buf=%x n=%d", comm, buf, n)
			return f.arRC
		},
		commAsyncError: func(comm uintptr) int32 { return f.asyncRC },
		commAbort: func(comm uintptr) int32 {
			f.add("abort comm=%x", comm)
			close(f.inAbort)
			if f.abortGo != nil {
				<-f.abortGo
			}
			return stOK
		},
		commDestroy: func(comm uintptr) int32 {
			f.add("destroy comm=%x", comm)
			return stOK
		},
		graphDestroy: func(exec uintptr) int32 { f.add("graph_destroy %x", exec); return stOK },
		sync:         func(ctx uintptr) int32 { return stOK },
	}
	return &Backend{l: l, ctx: 1, scratch: map[string]*tensor{}, graphs: map[string]uintptr{}}, f
}

func TestCommWithoutNCCL(t *testing.T) {
	b, f := newCommBackend(t)
	f.ncclRC, f.lastErr = stUnsupported, "comm_unique_id: NCCL not available: libnccl.so.2: cannot open"
	_, err := b.CommID()
	require.ErrorIs(t, err, ErrUnavailable)
	assert.ErrorContains(t, err, "libnccl.so.2: cannot open")
	_, err = b.NewComm(make([]byte, CommIDBytes), 1, 2)
	require.ErrorIs(t, err, ErrUnavailable)
	_, _, err = b.NCCLVersion()
	require.ErrorIs(t, err, ErrUnavailable)
	// A real failure of the group (not a missing library) is not "unavailable".
	f.ncclRC, f.lastErr = stCUDA, "comm_init: ncclCommInitRank: NCCL error 2: unhandled system error"
	_, err = b.NewComm(make([]byte, CommIDBytes), 1, 2)
	require.Error(t, err)
	assert.NotErrorIs(t, err, ErrUnavailable)
	assert.ErrorContains(t, err, "rank 1 of 2")
}

func TestCommAllReduceCalls(t *testing.T) {
	b, f := newCommBackend(t)
	v, p, err := b.NCCLVersion()
	require.NoError(t, err)
	assert.Equal(t, "2.28.9", v)
	assert.Equal(t, "libnccl.so.2", p)
	id, err := b.CommID()
	require.NoError(t, err)
	c, err := b.NewComm(id, 1, 2)
	require.NoError(t, err)
	assert.Equal(t, []string{"init rank=1 size=2 id[127]=7"}, f.take())
	assert.True(t, c.Graphable())
	assert.Equal(t, 1, c.Rank())
	assert.Equal(t, 2, c.Size())

	x := fakeT(b, ml.F32, 2880, 2)
	c.AllReduce(b, x)
	assert.Equal(t, []string{fmt.Sprintf("allreduce comm=c0 buf=%x n=5760", x.ptr)}, f.take())
	require.NoError(t, c.Err())
	require.NoError(t, b.Err())

	// A wrong operand: no call, sticky on the comm and on the backend.
	c.AllReduce(b, fakeT(b, ml.I32, 4))
	assert.Empty(t, f.take())
	require.ErrorContains(t, c.Err(), "is I32, want F32")
	require.ErrorContains(t, b.Sync(), "is I32, want F32")
	// Later calls enqueue nothing and fail the backend's Sync again.
	c.AllReduce(b, x)
	assert.Empty(t, f.take())
	require.ErrorContains(t, b.Sync(), "is I32, want F32")

	b.graphs["step"] = 0x9
	require.NoError(t, c.Close())
	assert.Equal(t, []string{"graph_destroy 9", "destroy comm=c0"}, f.take(), "graphs go before the comm")
	assert.Empty(t, b.graphs)
	require.NoError(t, c.Close(), "a second Close is a no-op")
	assert.Empty(t, f.take())
}

func TestCommErrors(t *testing.T) {
	b, f := newCommBackend(t)
	c, err := b.NewComm(make([]byte, CommIDBytes), 0, 2)
	require.NoError(t, err)
	f.take()
	x := fakeT(b, ml.F32, 16)

	// Another backend's call is refused.
	other, _ := newCommBackend(t)
	c.AllReduce(other, fakeT(other, ml.F32, 16))
	require.ErrorContains(t, c.Err(), "not the one the comm was made on")
	require.Error(t, b.Sync())

	c2, err := b.NewComm(make([]byte, CommIDBytes), 0, 2)
	require.NoError(t, err)
	f.arRC, f.lastErr = stCUDA, "comm_allreduce_f32: ncclAllReduce: NCCL error 5: invalid usage"
	c2.AllReduce(b, x)
	require.ErrorContains(t, c2.Err(), "invalid usage")
	require.ErrorContains(t, b.Sync(), "rank 0 of 2, 16 floats")

	f.arRC = stOK
	c3, err := b.NewComm(make([]byte, CommIDBytes), 0, 2)
	require.NoError(t, err)
	f.asyncRC, f.lastErr = stCUDA, "comm_async_error: NCCL error 6: remote process exited"
	require.ErrorContains(t, c3.Err(), "remote process exited")
	f.take()
	require.NoError(t, c3.Close())
	require.NoError(t, c.Close())
	require.NoError(t, c2.Close())
	c.AllReduce(b, x) // after Close: no call, an error
	assert.Equal(t, []string{"destroy comm=c0", "destroy comm=c0", "destroy comm=c0"}, f.take())
	require.ErrorContains(t, b.Sync(), "not the one") // c's first error stays its error
}

// Abort runs outside the comm's lock: while it is blocked (NCCL waits for
// the graphs that hold the comm), AllReduce and Err answer at once, and Close
// destroys the graphs, then waits for the abort before freeing the comm.
func TestCommAbort(t *testing.T) {
	b, f := newCommBackend(t)
	c, err := b.NewComm(make([]byte, CommIDBytes), 0, 2)
	require.NoError(t, err)
	f.take()
	a, ok := c.(interface{ Abort() error })
	require.True(t, ok, "sdk/tp's aborter")
	f.abortGo = make(chan struct{})
	aborted := make(chan error, 1)
	go func() { aborted <- a.Abort() }()
	<-f.inAbort

	x := fakeT(b, ml.F32, 16)
	answered := make(chan error, 1)
	go func() {
		c.AllReduce(b, x)
		answered <- c.Err()
	}()
	select {
	case err := <-answered:
		require.ErrorContains(t, err, "aborted")
	case <-time.After(5 * time.Second):
		t.Fatal("AllReduce / Err blocked behind a running Abort")
	}
	require.ErrorContains(t, b.Sync(), "aborted")
	b.graphs["step"] = 0x9
	closed := make(chan error, 1)
	go func() { closed <- c.Close() }()
	select {
	case <-closed:
		t.Fatal("Close returned while the abort was still running")
	case <-time.After(50 * time.Millisecond):
	}
	close(f.abortGo) // NCCL's abort returns once the graphs are gone
	require.NoError(t, <-aborted)
	require.NoError(t, <-closed)
	assert.Equal(t, []string{"abort comm=c0", "graph_destroy 9", "destroy comm=c0"}, f.take())
	require.NoError(t, a.Abort(), "Abort after Close is a no-op")
}
