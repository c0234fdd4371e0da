package cuda

// bf16 weight cache (session 7, issue 7). orch_matmul's large-n path
// (matmul_prefill.cu: prefill, and decode of many streams once
// n >= denseV2From) dequantizes the whole quantized weight to bf16 in
// scratch on every call and hands it to cuBLAS: at Llama x64 decode that is
// 8.5 GB read, 16 GB written and 16 GB read back per step for 16 GB of
// useful bf16 reads. With the cache, a weight's bf16 copy is made once, on
// its first large-n use (orch_bf16_cache: the same dequantization, so the
// same bf16 values and a bit-identical output), and cuBLAS reads it
// directly from then on.
//
// Memory policy: the copies are made after the model's load, so the KV pool
// and the runner's buffers already hold what the planner gave them; a copy
// is made only while, after it, at least `reserve` bytes of device memory
// stay free (for the scratch that grows with the step size, cuBLAS, other
// processes) and the cache stays within `cap`. A weight that does not fit is
// never retried and keeps the per-call dequantization. Hand-written rather
// than a general allocator: it is one map of device buffers owned by the
// backend, freed with the weight or at Close.
//
// ORCH_CUDA_BF16_CACHE (read once): unset or "on": on, no cap (the default
// since session 7's device run 1, H100: Llama-3-8B Q8_0 x32 / x64 decode
// 1,915 / 3,552 -> 3,690 / 6,491 tok/s, pp512 19,657 -> 28,073, pp2048
// 27,135 -> 29,805, for ~15 GB of bf16 copies); "off" or "0": off; N > 0:
// on, at most N MiB. ORCH_CUDA_BF16_CACHE_RESERVE=N (MiB) sets the reserve
// (default 4 GiB + 1/32 of the device's memory). Backend.SetBF16Cache sets
// both. What it takes: 2 bytes per weight element of every quantized weight
// that runs a large-n matmul (Llama-3-8B: all projections + the output head,
// ~15 GB; gpt-oss-20b: attention + head, ~1.3 GB), never more than leaves
// the reserve free; the log says how much.

import (
	"fmt"
	"os"
	"strconv"
	"strings"

	"github.com/llama-orch/orch/sdk/ml"
)

type bf16Entry struct {
	buf   uintptr // the bf16 copy (m x k); 0: rows of another entry's weight (a view)
	bytes int64
	end   uintptr // the quantized rows' end address
}

type bf16Cache struct {
	on       bool
	cap      int64 // bytes; 0 = no cap
	reserve  int64 // bytes to keep free; < 0: default, computed at first use
	bytes    int64
	entries  map[uintptr]bf16Entry // by the weight's device address
	declined map[uintptr]bool
	names    map[uintptr]string // weight names (Backend.Weight), for the log
	logged   int64              // GiB already reported
	full     bool               // the first decline was reported
	// free memory as last queried minus the copies made since (MemoryInfo
	// is a device-properties query: not once per weight); queried again
	// after 32 copies or when the estimate nears the reserve
	freeEst  int64
	sinceQry int
}

// bf16CacheEnv parses ORCH_CUDA_BF16_CACHE / _RESERVE (values as the file
// comment says): on, cap and reserve in bytes (reserve -1: default).
func bf16CacheEnv(v, reserve string) (on bool, capBytes, reserveBytes int64, err error) {
	reserveBytes = -1
	switch strings.TrimSpace(v) {
	case "off", "0":
	case "", "on", "auto":
		on = true
	default:
		mib, e := strconv.ParseInt(strings.TrimSpace(v), 10, 64)
		if e != nil || mib <= 0 || mib > 1<<30 {
			return false, 0, -1, fmt.Errorf("ORCH_CUDA_BF16_CACHE=%q: want off, on or a size in MiB", v)
		}
		on, capBytes = true, mib<<20
	}
	if r := strings.TrimSpace(reserve); r != "" {
		mib, e := strconv.ParseInt(r, 10, 64)
		if e != nil || mib < 0 || mib > 1<<30 {
			return false, 0, -1, fmt.Errorf("ORCH_CUDA_BF16_CACHE_RESERVE=%q: want a size in MiB", reserve)
		}
		reserveBytes = mib << 20
	}
	return on, capBytes, reserveBytes, nil
}

// initBF16Cache applies the environment (New).
func (b *Backend) initBF16Cache() {
	b.bc = bf16Cache{reserve: -1, entries: map[uintptr]bf16Entry{}, declined: map[uintptr]bool{}, names: map[uintptr]string{}}
	on, c, r, err := bf16CacheEnv(os.Getenv("ORCH_CUDA_BF16_CACHE"), os.Getenv("ORCH_CUDA_BF16_CACHE_RESERVE"))
	if err != nil {
		fmt.Fprintf(os.Stderr, "orch cuda: %v: bf16 weight cache off\n", err)
		return
	}
	b.SetBF16Cache(on, c, r)
}

// SetBF16Cache turns the bf16 weight cache on or off for weights not yet
// cached (copies already made stay until their weight is freed): capBytes
// bounds the cache (0: no bound), reserveBytes is the device memory that
// must stay free after each copy (< 0: 4 GiB + 1/32 of the device's
// memory). Off where the library lacks orch_bf16_cache.
func (b *Backend) SetBF16Cache(on bool, capBytes, reserveBytes int64) {
	b.bc.on = on && b.l.bf16Cache != nil
	b.bc.cap = max(capBytes, 0)
	b.bc.reserve = reserveBytes
	clear(b.bc.declined)
	b.bc.full = false
	b.bc.sinceQry = 0 // query free memory at the next copy
}

// BF16CacheStats reports the weights that have a bf16 copy and its bytes.
func (b *Backend) BF16CacheStats() (weights int, bytes int64) {
	for _, e := range b.bc.entries {
		if e.buf != 0 {
			weights++
		}
	}
	return weights, b.bc.bytes
}

// bf16Eligible: a weight type the large-n path dequantizes (F32 runs in
// fp32 and BF16 in place).
func bf16Eligible(dt ml.DType) bool {
	switch dt {
	case ml.Q8_0, ml.Q4_0, ml.MXFP4, ml.F16, ml.Q4_K, ml.Q6_K:
		return true
	}
	return false
}

// largeNPath reports whether a MatMul of n tokens with weights of type dt
// reaches orch_matmul's large-n path (MatMul's routing; a GEMV or qgemm
// that declines a shape also ends there, which is not predicted).
func largeNPath(dt ml.DType, n int) bool {
	switch {
	case n <= 8:
		return false
	case gemmV1 || !qgemmType(dt): // F16, K-quants: no GEMV v9 / qgemm above 8
		return true
	case gemvPin9 && n <= gemvMaxN():
		return false
	}
	return n >= denseV2From || n > qgemmMaxN
}

// bf16From: from this many tokens a MatMul whose weight has a bf16 copy
// runs cuBLAS on it (bf16Route) instead of GEMV v9 / qgemm below
// denseV2From. Session 7, device run 2 (H100, with the cache): Llama x16
// decode 1,997 tok/s with 9 vs 1,207 with 17; weights without a copy keep
// denseV2From. ORCH_CUDA_GEMV=v9 keeps v9.
var bf16From = 9

// bf16Route reports whether MatMul sends w at n tokens to the large-n path
// because w has a bf16 copy (see bf16From).
func (b *Backend) bf16Route(w *tensor, n int) bool {
	if n < bf16From || n >= denseV2From || gemvPin9 || gemmV1 {
		return false // the large-n path anyway, or the pinned routes
	}
	_, ok := b.bc.entries[w.ptr]
	return ok
}

// bf16Want makes w's bf16 copy if the cache is on, w has none yet and it
// fits the policy (MatMul, before the large-n call).
func (b *Backend) bf16Want(w *tensor, n, k, m int) {
	c := &b.bc
	if !c.on || !bf16Eligible(w.dt) || k%32 != 0 || !(largeNPath(w.dt, n) || n >= bf16From && !gemvPin9) {
		return
	}
	if _, ok := c.entries[w.ptr]; ok || c.declined[w.ptr] {
		return
	}
	// A view (Rows) of a weight with a copy: the library finds its rows in
	// that copy (orch_bf16_cache: any whole-row range), nothing to make.
	for wp, e := range c.entries {
		if e.buf != 0 && w.ptr >= wp && w.ptr+uintptr(w.bytes) <= e.end {
			c.entries[w.ptr] = bf16Entry{end: w.ptr + uintptr(w.bytes)}
			return
		}
	}
	need := (int64(m)*int64(k)*2 + 255) / 256 * 256
	if c.reserve < 0 || c.sinceQry == 0 || c.sinceQry >= 32 || c.freeEst-need < c.reserve+2<<30 {
		free, total := b.MemoryInfo()
		if c.reserve < 0 {
			c.reserve = 4<<30 + total/32
		}
		c.freeEst, c.sinceQry = free, 0
	}
	free := c.freeEst
	name := c.names[w.ptr]
	if name == "" {
		name = fmt.Sprintf("%v %v", w.dt, w.shape)
	}
	if (c.cap > 0 && c.bytes+need > c.cap) || free-need < c.reserve {
		c.declined[w.ptr] = true
		if !c.full {
			c.full = true
			n, _ := b.BF16CacheStats()
			fmt.Fprintf(os.Stderr, "orch cuda: bf16 weight cache full at %d weights, %.2f GiB: %s (%.0f MiB) and any later "+
				"weight that does not fit dequantize per call (free %.2f GiB, reserve %.2f GiB, cap %s; "+
				"ORCH_CUDA_BF16_CACHE_RESERVE / ORCH_CUDA_BF16_CACHE=<MiB> set them)\n",
				n, gib(c.bytes), name, float64(need)/(1<<20), gib(free), gib(c.reserve), capStr(c.cap))
		}
		return
	}
	var p uintptr
	if err := b.l.status("bf16 cache", b.l.malloc(b.ctx, need, &p)); err != nil {
		c.declined[w.ptr] = true
		fmt.Fprintf(os.Stderr, "orch cuda: bf16 weight cache: %s not cached: %v\n", name, err)
		return
	}
	if err := b.l.status("bf16 cache", b.l.bf16Cache(b.ctx, w.ptr, int32(w.dt), int64(m), int64(k), p)); err != nil {
		b.l.free(b.ctx, p)
		c.declined[w.ptr] = true
		fmt.Fprintf(os.Stderr, "orch cuda: bf16 weight cache: %s not cached: %v\n", name, err)
		return
	}
	if c.bytes == 0 {
		fmt.Fprintf(os.Stderr, "orch cuda: bf16 weight cache on: each quantized weight gets a bf16 copy (2 bytes a weight, "+
			"device memory) at its first large-n matmul while %.2f GiB stay free (cap %s; ORCH_CUDA_BF16_CACHE=off turns it off)\n",
			gib(c.reserve), capStr(c.cap))
	}
	c.entries[w.ptr] = bf16Entry{buf: p, bytes: need, end: w.ptr + uintptr(w.bytes)}
	c.bytes += need
	c.freeEst -= need
	c.sinceQry++
	// at 1 GiB, then each time the total doubles (a few lines, not one per weight)
	if g := c.bytes >> 30; g >= 1 && g >= 2*c.logged {
		c.logged = g
		n, _ := b.BF16CacheStats()
		fmt.Fprintf(os.Stderr, "orch cuda: bf16 weight cache: %d weights, %.2f GiB (last %s)\n", n, gib(c.bytes), name)
	}
}

// bf16Drop unregisters and frees the copies of weights inside [p, p+bytes)
// (Free of an owned weight; a view's copy is keyed by the view's address).
func (b *Backend) bf16Drop(p uintptr, bytes int) {
	c := &b.bc
	delete(c.names, p)
	for wp, e := range c.entries {
		if wp >= p && wp < p+uintptr(bytes) {
			if e.buf != 0 {
				b.l.bf16Cache(b.ctx, wp, 0, 0, 0, 0)
				b.l.free(b.ctx, e.buf)
				c.bytes -= e.bytes
			}
			delete(c.entries, wp)
		}
	}
	for wp := range c.declined {
		if wp >= p && wp < p+uintptr(bytes) {
			delete(c.declined, wp)
		}
	}
}

// bf16Close frees every copy (Close, before the context goes).
func (b *Backend) bf16Close() {
	for _, e := range b.bc.entries {
		if e.buf != 0 {
			b.l.free(b.ctx, e.buf)
		}
	}
	clear(b.bc.entries)
	b.bc.bytes = 0
}

func gib(b int64) float64 { return float64(b) / (1 << 30) }

func capStr(c int64) string {
	if c <= 0 {
		return "none"
	}
	return fmt.Sprintf("%d MiB", c>>20)
}
