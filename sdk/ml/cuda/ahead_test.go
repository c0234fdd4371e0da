package cuda

import (
	"fmt"
	"testing"
	"unsafe"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/llama-orch/orch/sdk/ml"
)

// fakeAhead adds the step-ahead entries to a fake library: host memory is
// Go memory (kept alive here), a queued copy writes 100*read + i into value
// i at once, and every call is logged.
func fakeAhead(b *Backend, f *fakeLib) *[][]int32 {
	hosts := &[][]int32{}
	reads, evs := 0, uintptr(0)
	b.l.hostAlloc = func(bytes int64, out *unsafe.Pointer) int32 {
		m := make([]int32, bytes/4)
		*hosts = append(*hosts, m)
		*out = unsafe.Pointer(&m[0])
		return f.add("host_alloc %d", bytes)
	}
	b.l.hostFree = func(p unsafe.Pointer) int32 { return f.add("host_free") }
	b.l.eventCreate = func(ev *uintptr) int32 { evs++; *ev = evs; return f.add("event_create %d", evs) }
	b.l.eventDestroy = func(ev uintptr) int32 { return f.add("event_destroy %d", ev) }
	b.l.eventRecord = func(ctx, ev uintptr) int32 { return f.add("event_record %d", ev) }
	b.l.eventSync = func(ev uintptr) int32 { return f.add("event_sync %d", ev) }
	b.l.memcpyD2HAsync = func(ctx uintptr, dst unsafe.Pointer, src uintptr, bytes int64) int32 {
		reads++
		v := unsafe.Slice((*int32)(dst), bytes/4)
		for i := range v {
			v[i] = int32(100*reads + i)
		}
		return f.add("d2h_async %x %d", src, bytes)
	}
	b.l.destroy = func(ctx uintptr) int32 { return f.add("destroy") }
	b.l.stepAdvance = func(ctx, buf uintptr, seg int64, inc uint32, src, params uintptr, n int32) int32 {
		return f.add("step_advance buf=%x seg=%d inc=%#x src=%x params=%x n=%d", buf, seg, inc, src, params, n)
	}
	return hosts
}

// A queued read records an event after its copy and never waits for the
// stream; Wait waits for that event only. Slots (pinned buffer + event) are
// reused once waited for or dropped; Close syncs before freeing them.
func TestReadI32Async(t *testing.T) {
	t.Setenv("ORCH_CUDA_STEP_AHEAD", "")
	t.Setenv("ORCH_CUDA_READ_KERNEL", "") // (no orch_read_i32_host here: the memcpy)
	b, f := newFakeBackend(t)
	assert.False(t, b.StepAhead(), "library without the entries")
	_ = fakeAhead(b, f)
	require.True(t, b.StepAhead())
	tok := fakeT(b, ml.I32, 3)

	r1, err := b.ReadI32Async(tok)
	require.NoError(t, err)
	r2, err := b.ReadI32Async(tok)
	require.NoError(t, err)
	assert.Equal(t, []string{
		"host_alloc 1024", "event_create 1", fmt.Sprintf("d2h_async %x 12", tok.ptr), "event_record 1",
		"host_alloc 1024", "event_create 2", fmt.Sprintf("d2h_async %x 12", tok.ptr), "event_record 2",
	}, f.take(), "no stream sync")
	got := make([]int32, 3)
	require.NoError(t, r2.Wait(got))
	assert.Equal(t, []int32{200, 201, 202}, got)
	assert.Equal(t, []string{"event_sync 2"}, f.take())
	assert.Error(t, r2.Wait(got), "waited twice")
	r1.Drop()
	assert.Empty(t, f.take(), "a drop does not wait")

	// both slots are free again: no new allocation
	r3, err := b.ReadI32Async(tok)
	require.NoError(t, err)
	r4, err := b.ReadI32Async(tok)
	require.NoError(t, err)
	assert.NotContains(t, fmt.Sprint(f.take()), "host_alloc")
	require.NoError(t, r3.Wait(got[:2]))
	assert.Equal(t, []int32{300, 301, 202}, got, "two values read")
	r4.Drop()

	_, err = b.ReadI32Async(fakeT(b, ml.F32, 3))
	assert.Error(t, err, "F32")
	t.Setenv("ORCH_CUDA_STEP_AHEAD", "0")
	assert.False(t, b.StepAhead())
	_, err = b.ReadI32Async(tok)
	assert.Error(t, err, "switched off")

	f.take()
	require.NoError(t, b.Close())
	assert.Equal(t, []string{"sync", "event_destroy 1", "host_free", "event_destroy 2", "host_free", "destroy"}, f.take())
}

// With orch_read_i32_host bound the read is the kernel (n values into the
// slot) unless ORCH_CUDA_READ_KERNEL=0; a failed launch returns the slot.
func TestReadI32AsyncKernel(t *testing.T) {
	t.Setenv("ORCH_CUDA_STEP_AHEAD", "")
	t.Setenv("ORCH_CUDA_READ_KERNEL", "")
	b, f := newFakeBackend(t)
	_ = fakeAhead(b, f)
	fail := false
	b.l.readI32Host = func(ctx uintptr, dst unsafe.Pointer, src uintptr, n int64) int32 {
		if fail {
			return stInvalid
		}
		v := unsafe.Slice((*int32)(dst), n)
		for i := range v {
			v[i] = int32(-i)
		}
		return f.add("read_i32_host %x %d", src, n)
	}
	tok := fakeT(b, ml.I32, 3)
	got := make([]int32, 3)

	r, err := b.ReadI32Async(tok)
	require.NoError(t, err)
	assert.Equal(t, []string{"host_alloc 1024", "event_create 1", fmt.Sprintf("read_i32_host %x 3", tok.ptr), "event_record 1"},
		f.take())
	require.NoError(t, r.Wait(got))
	assert.Equal(t, []int32{0, -1, -2}, got)
	assert.Equal(t, []string{"event_sync 1"}, f.take())

	t.Setenv("ORCH_CUDA_READ_KERNEL", "0")
	r, err = b.ReadI32Async(tok)
	require.NoError(t, err)
	assert.Equal(t, []string{fmt.Sprintf("d2h_async %x 12", tok.ptr), "event_record 1"}, f.take(), "the memcpy, slot reused")
	require.NoError(t, r.Wait(got))
	assert.Equal(t, []int32{100, 101, 102}, got)
	f.take()

	t.Setenv("ORCH_CUDA_READ_KERNEL", "")
	fail = true
	_, err = b.ReadI32Async(tok)
	assert.Error(t, err)
	assert.Empty(t, f.take(), "no event after a failed launch")
	fail = false
	r, err = b.ReadI32Async(tok)
	require.NoError(t, err)
	assert.NotContains(t, fmt.Sprint(f.take()), "host_alloc", "the failed read's slot is free")
	r.Drop()
}

// AdvanceStep launches orch_step_advance with the segments it is given and
// refuses segments past the buffer, segment 0 in inc, and short params.
func TestAdvanceStep(t *testing.T) {
	t.Setenv("ORCH_CUDA_STEP_AHEAD", "")
	b, f := newFakeBackend(t)
	_ = fakeAhead(b, f)
	const m = 8
	buf, src, params := fakeT(b, ml.I32, 6*m), fakeT(b, ml.I32, m), fakeT(b, ml.I32, ml.SampleParamsWords*m)
	assert.True(t, b.AdvanceStep(buf, m, 1<<1|1<<3|1<<5, src, nil, 2))
	assert.True(t, b.AdvanceStep(buf, m, 1<<1|1<<3, src, params, 3))
	require.NoError(t, b.Err())
	assert.Equal(t, []string{
		fmt.Sprintf("step_advance buf=%x seg=8 inc=0x2a src=%x params=0 n=2", buf.ptr, src.ptr),
		fmt.Sprintf("step_advance buf=%x seg=8 inc=0xa src=%x params=%x n=3", buf.ptr, src.ptr, params.ptr),
	}, f.take())
	t.Setenv("ORCH_CUDA_STEP_ADVANCE", "0")
	assert.False(t, b.AdvanceStep(buf, m, 1<<1, src, nil, 2), "switched off")
	assert.Empty(t, f.take())
	t.Setenv("ORCH_CUDA_STEP_ADVANCE", "")
	for _, bad := range []func() bool{
		func() bool { return b.AdvanceStep(buf, m, 1<<6, src, nil, 1) },                                    // segment 6 is past the buffer
		func() bool { return b.AdvanceStep(buf, m, 1|1<<1, src, nil, 1) },                                  // segment 0 is the tokens'
		func() bool { return b.AdvanceStep(buf, m, 1<<1, src, fakeT(b, ml.I32, ml.SampleParamsWords), 2) }, // params of one row
	} {
		assert.True(t, bad(), "queued an error")
		assert.Error(t, b.Sync())
		assert.NotContains(t, fmt.Sprint(f.take()), "step_advance")
	}
}
