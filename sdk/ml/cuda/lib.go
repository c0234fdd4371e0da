package cuda

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"unsafe"

	"github.com/ebitengine/purego"
)

// LibName is the shared library built from cuda/ (make cuda).
const LibName = "liborch_cuda.so"

// abiVersion must equal ORCH_ABI_VERSION in cuda/include/orch_cuda.h.
const abiVersion = 10

// ErrUnavailable is returned (wrapped, with the reason) when the CUDA backend
// cannot run here: the library is missing or does not load, or there is no
// usable GPU. Callers fall back to the CPU backend.
var ErrUnavailable = errors.New("cuda backend unavailable")

// Status codes of the C ABI (orch_status).
const (
	stOK          = 0
	stInvalid     = 1
	stCUDA        = 2
	stOOM         = 3
	stUnsupported = 4
	stNoDevice    = 5
)

// ErrOutOfMemory is wrapped by errors of allocations that ran out of device memory.
var ErrOutOfMemory = errors.New("cuda: out of device memory")

// ErrUnsupported is wrapped by errors of ops whose dtype/shape the kernels do not implement.
var ErrUnsupported = errors.New("cuda: unsupported")

// lib holds the C entry points, bound once with purego (no cgo needed, so
// binaries that import this package still build with CGO_ENABLED=0).
type lib struct {
	handle uintptr
	path   string

	abiVersion   func() int32
	lastError    func(buf *byte, n int64) int32
	deviceCount  func(count *int32) int32
	initCtx      func(device int32, out *uintptr) int32
	destroy      func(ctx uintptr) int32
	deviceInfo   func(ctx uintptr, name *byte, nameLen int64, cc, sms *int32, free, total *int64) int32
	malloc       func(ctx uintptr, bytes int64, out *uintptr) int32
	free         func(ctx uintptr, p uintptr) int32
	memcpyH2D    func(ctx, dst uintptr, src *byte, bytes int64) int32
	memcpyD2D    func(ctx, dst, src uintptr, bytes int64) int32
	memcpyD2H    func(ctx uintptr, dst *byte, src uintptr, bytes int64) int32
	memset       func(ctx, dst uintptr, v int32, bytes int64) int32
	fillF32      func(ctx, dst uintptr, v float32, n int64) int32
	sync         func(ctx uintptr) int32
	graphBegin   func(ctx uintptr) int32
	graphEnd     func(ctx uintptr, exec *uintptr) int32
	graphLaunch  func(ctx, exec uintptr) int32
	graphDestroy func(exec uintptr) int32
	eventCreate  func(ev *uintptr) int32
	eventDestroy func(ev uintptr) int32
	eventRecord  func(ctx, ev uintptr) int32
	eventElapsed func(ev0, ev1 uintptr, ms *float32) int32
	// Session 11, optional (both or neither; nil: no step-ahead reads, ahead.go).
	memcpyD2HAsync func(ctx uintptr, dst unsafe.Pointer, src uintptr, bytes int64) int32 // dst: pinned (hostAlloc)
	eventSync      func(ev uintptr) int32
	hostAlloc      func(bytes int64, out *unsafe.Pointer) int32
	hostFree       func(p unsafe.Pointer) int32
	stepAdvance    func(ctx, buf uintptr, seg int64, inc uint32, src, params uintptr, n int32) int32
	// Session 14, optional (nil: ahead.go reads with memcpyD2HAsync): the read as a kernel; dst from hostAlloc.
	readI32Host func(ctx uintptr, dst unsafe.Pointer, src uintptr, n int64) int32
	// Session 14, optional (nil: rowsnorm.go is off): a row gather and the RMSNorm of those rows in one launch.
	getRowsRMSNorm func(ctx, xOut, hOut, table uintptr, ttype int32, ids uintptr, n, dim int64, w uintptr,
		eps float32) int32

	matmul     func(ctx, y, x, w uintptr, wtype int32, bias uintptr, n, k, m int64, acc int32) int32
	moeMatmul  func(ctx, y, x uintptr, xPerSlot int32, w uintptr, wtype int32, bias, ids uintptr, n int64, slots int32, k, m int64) int32
	getRows    func(ctx, out, table uintptr, ttype int32, ids uintptr, n, dim int64, acc int32) int32
	rowBytes   func(t int32, k int64) int64
	rmsnorm    func(ctx, out, x, add, w uintptr, n, dim int64, eps float32) int32
	layernorm  func(ctx, out, x, add, w, b uintptr, n, dim int64, eps float32) int32
	add        func(ctx, out, a, b uintptr, n int64) int32
	addBias    func(ctx, y, bias uintptr, n, dim int64) int32
	scale      func(ctx, out, x uintptr, s float32, n int64) int32
	gelu       func(ctx, out, x uintptr, n int64) int32
	swiglu     func(ctx, out, gate, up uintptr, n, dim, gs, us int64) int32
	swigluOAI  func(ctx, out, gate, up uintptr, n, dim, gs, us int64, alpha, limit float32) int32
	rope       func(ctx, x uintptr, rowStride, nTok int64, nHeads, headDim, rotDim int32, pos, invFreq uintptr, attnFactor float32, neox int32) int32
	kvWrite    func(ctx, kc, vc uintptr, kvType int32, k, v uintptr, ks, vs int64, slots uintptr, nTok int64, nKV, hd int32) int32
	attention  func(ctx uintptr, args *attnArgs) int32
	moeTopK    func(ctx, ids, w, logits uintptr, n int64, nExp, k int32) int32
	moeCombine func(ctx, out, y, w uintptr, n int64, k int32, dim int64, acc int32) int32
	moeFFN     func(ctx, out, x, ids, w, gate, up uintptr, guType int32, gateBias, upBias, down uintptr, downType int32, downBias, act uintptr, n int64, slots int32, dim, ff int64, alpha, limit float32) int32
	argmax     func(ctx, out, logits uintptr, n, vocab int64) int32
	// ABI 4: tensor-core GEMM with in-smem dequantization and the grouped MoE FFN.
	qgemm         func(ctx, y, x, w uintptr, wtype int32, bias uintptr, n, k, m int64, acc int32, xbf16 uintptr, tile int32) int32
	moeRouteInts  func(pairs int64, nExp int32) int64
	moeFFNGrouped func(ctx, out, x, ids, w, gate, up uintptr, guType int32, gateBias, upBias, down uintptr, downType int32, downBias uintptr, n int64, slots, nExp int32, dim, ff int64, alpha, limit float32, xg, act, ybuf, route uintptr, tile int32) int32
	// Session 3 (fuse.go): merged decode launches and the PDL switch.
	matmulMulti func(ctx, x uintptr, wtype int32, n, k int64, count int32, parts *gemvPart) int32
	rope2       func(ctx, x0 uintptr, stride0 int64, heads0 int32, x1 uintptr, stride1 int64, heads1 int32, nTok int64, headDim, rotDim int32, pos, invFreq uintptr, attnFactor float32, neox int32) int32
	setPDL      func(ctx uintptr, on int32, was *int32) int32
	ropeKV      func(ctx, q uintptr, qStride int64, qHeads int32, k uintptr, kStride int64, kvHeads int32, v uintptr, vStride int64, kCache, vCache uintptr, kvType int32, slots uintptr, nTok int64, headDim, rotDim int32, pos, invFreq uintptr, attnFactor float32, neox int32) int32

	// Session 6 (fuse.go foldSwiGLU): gateUp points at 2 parts (gate, up; same m).
	matmulSwiGLU func(ctx, x uintptr, wtype int32, n, k int64, gateUp *gemvPart, out uintptr) int32
	gemvTrace    func(ctx uintptr, on int32, out *gemvTraceRec, cap int64, count *int64) int32
	// Session 8, optional (nil when the library lacks them: normfold.go is then off): the folded RMSNorm.
	matmulAddNorm  func(ctx, y, x, w uintptr, wtype int32, bias uintptr, n, k, m int64, res, nw, xt, ss uintptr) int32
	matmulMultiNF  func(ctx, x uintptr, wtype int32, n, k int64, count int32, parts *gemvPart, ss uintptr, nss int64, eps float32) int32
	matmulSwiGLUNF func(ctx, x uintptr, wtype int32, n, k int64, gateUp *gemvPart, out, ss uintptr, nss int64, eps float32) int32
	// Session 16, optional (nil: matmulAddNorm alone): the producer that also prefetches the first consumer's
	// first rows into L2 before its PDL wait (normfold.go startNormFold, after an attention).
	matmulAddNormPF func(ctx, y, x, w uintptr, wtype int32, bias uintptr, n, k, m int64, res, nw, xt, ss, pfw uintptr, pfType int32, pfM, pfK int64) int32

	// ABI 5: NCCL collectives (comm.go).
	commAvailable    func(ctx uintptr, version *int32) int32
	commLibrary      func(buf *byte, n int64) int32
	commUniqueID     func(ctx uintptr, out *byte) int32
	commInit         func(ctx uintptr, id *byte, rank, size int32, out *uintptr) int32
	commAllreduceF32 func(ctx, comm, buf uintptr, n int64) int32
	commAsyncError   func(comm uintptr) int32
	commAbort        func(comm uintptr) int32
	commDestroy      func(comm uintptr) int32
	// MoE v9: top-k routing + the fused expert-major FFN (orch_moe_ffn_route; ABI 6).
	moeFFNRoute func(ctx, out, x, logits uintptr, nExp int32, ids, w, gate, up uintptr, guType int32, gateBias, upBias, down uintptr, downType int32, downBias, act, ybuf uintptr, n int64, slots int32, dim, ff int64, alpha, limit float32) int32
	// RoPE + KV write folded into the decode attention (session 7, fuse.go foldAttend; optional: nil
	// where the library lacks it).
	attentionRope func(ctx uintptr, args *attnArgs, r *attnRopeArgs) int32
	// bf16 weight cache (session 7, bf16cache.go; optional: nil where the library lacks it).
	bf16Cache func(ctx, w uintptr, wtype int32, m, k int64, bf16 uintptr) int32
	// MoE v10: router + top-k + fused expert FFN for 1..8 tokens (orch_moe_decode; ABI 7).
	moeDecode func(ctx, out, x, router uintptr, routerType int32, routerBias uintptr, nExp int32, ids, w, gate, up uintptr, guType int32, gateBias, upBias, down uintptr, downType int32, downBias, act, ybuf uintptr, n int64, slots int32, dim, ff int64, alpha, limit float32) int32
	// orch_moe_decode with the AddRMSNorm before it folded in (orch_moe_decode_norm; session 7).
	moeDecodeNorm func(ctx, out, x, res, add, normW uintptr, eps float32, router uintptr, routerType int32, routerBias uintptr, nExp int32, ids, w, gate, up uintptr, guType int32, gateBias, upBias, down uintptr, downType int32, downBias, act, ybuf uintptr, n int64, slots int32, dim, ff int64, alpha, limit float32) int32
	// orch_moe_decode(_norm) with the next RMSNorm's producer half in v10's down kernel (session 8, optional: nil
	// where the library lacks it; the orch_matmul_addnorm contract for orch_matmul_multi_nf).
	moeDecodeAddNorm func(ctx, out, x, res, add, normW uintptr, eps float32, router uintptr, routerType int32, routerBias uintptr, nExp int32, ids, w, gate, up uintptr, guType int32, gateBias, upBias, down uintptr, downType int32, downBias, act, ybuf uintptr, n int64, slots int32, dim, ff int64, alpha, limit float32, res2, nw2, xt, ss uintptr) int32
	// One token's attention out projection + AddRMSNorm + MoE v10 with the route in the projection's last CTA
	// (session 10, optional: nil where the library lacks it; normfold.go). Bound through the one-pointer wrapper
	// orch_moe_decode_oproj_args: orch_moe_decode_oproj's 35 integer arguments are more than purego passes (32).
	moeDecodeOProj func(ctx uintptr, a *oprojArgs) int32
	// MXFP4 / Q8_0 rows repacked after the original ones (session 12, optional: nil where the library lacks it;
	// weightrp.go).
	weightRepack func(ctx, dst, src uintptr, wtype int32, rows, k int64) int32
}

// gemvTraceRec mirrors gemv_trace_rec (cuda/src/gemv16.cuh; orch_gemv_trace).
type gemvTraceRec struct {
	t0, t1, t2, t3 uint64 // ns: CTA start, after the PDL wait, x staged, end
	blk, sm        uint32
	_              [2]uint32
}

// oprojArgs mirrors orch_moe_oproj_args field by field (same order, same sizes: 264 bytes).
type oprojArgs struct {
	ox, ow, obias, y                 uintptr
	out, x, res, normW               uintptr
	router, routerBias, ids, w       uintptr
	gate, up, gateBias, upBias       uintptr
	down, downBias, act, ybuf        uintptr
	res2, nw2, xt, ss                uintptr
	ok, n, dim, ff                   int64
	owtype, routerType, nExp, guType int32
	downType, slots                  int32
	eps, alpha, limit                float32
	_                                int32
}

// attnArgs mirrors orch_attn_args field by field (same order, same sizes).
type attnArgs struct {
	out, q, kCache, vCache, tokSeq, tokPos, blockTables, sinks uintptr
	qStride, nTok                                              int64
	maxBlocks, blockSize, nHeads, nKVHeads, headDim, window    int32
	kvDType                                                    int32
	scale                                                      float32
	maxPos                                                     int32
}

var (
	libOnce sync.Once
	theLib  *lib
	libErr  error
)

// candidates lists where the library is looked for, in order.
func candidates() []string {
	var c []string
	if p := os.Getenv("ORCH_CUDA_LIB"); p != "" {
		c = append(c, p)
	}
	if exe, err := os.Executable(); err == nil {
		d := filepath.Dir(exe)
		c = append(c, filepath.Join(d, LibName), filepath.Join(d, "..", "lib", LibName),
			filepath.Join(d, "..", "build", "cuda", LibName))
	}
	if wd, err := os.Getwd(); err == nil {
		for d := wd; ; d = filepath.Dir(d) {
			c = append(c, filepath.Join(d, "build", "cuda", LibName))
			if filepath.Dir(d) == d {
				break
			}
		}
	}
	return append(c, LibName) // the dynamic loader's own search (LD_LIBRARY_PATH, ldconfig)
}

func loadLib() (*lib, error) {
	libOnce.Do(func() { theLib, libErr = openLib() })
	return theLib, libErr
}

func openLib() (*lib, error) {
	var errs []error
	for _, p := range candidates() {
		if p != LibName {
			if _, err := os.Stat(p); err != nil {
				continue
			}
		}
		h, err := purego.Dlopen(p, purego.RTLD_NOW|purego.RTLD_LOCAL)
		if err != nil {
			errs = append(errs, fmt.Errorf("%s: %w", p, err))
			continue
		}
		l := &lib{handle: h, path: p}
		if err := l.bind(); err != nil {
			return nil, fmt.Errorf("%w: %s: %v", ErrUnavailable, p, err)
		}
		if v := l.abiVersion(); v != abiVersion {
			return nil, fmt.Errorf("%w: %s has ABI version %d, want %d (rebuild with make cuda)", ErrUnavailable, p, v, abiVersion)
		}
		return l, nil
	}
	return nil, fmt.Errorf("%w: %s not found or not loadable (build it with `make cuda`, or set ORCH_CUDA_LIB): %v",
		ErrUnavailable, LibName, errors.Join(errs...))
}

// bind resolves every symbol; a missing one is an error, not a panic.
func (l *lib) bind() (err error) {
	defer func() {
		if r := recover(); r != nil {
			err = fmt.Errorf("binding symbols: %v", r)
		}
	}()
	syms := []struct {
		fn   any
		name string
	}{
		{&l.abiVersion, "orch_abi_version"}, {&l.lastError, "orch_last_error"},
		{&l.deviceCount, "orch_device_count"}, {&l.initCtx, "orch_init"}, {&l.destroy, "orch_destroy"},
		{&l.deviceInfo, "orch_device_info"}, {&l.malloc, "orch_malloc"}, {&l.free, "orch_free"},
		{&l.memcpyH2D, "orch_memcpy_h2d"}, {&l.memcpyD2D, "orch_memcpy_d2d"}, {&l.memcpyD2H, "orch_memcpy_d2h"},
		{&l.memset, "orch_memset"}, {&l.fillF32, "orch_fill_f32"}, {&l.sync, "orch_sync"},
		{&l.graphBegin, "orch_graph_begin"}, {&l.graphEnd, "orch_graph_end"},
		{&l.graphLaunch, "orch_graph_launch"}, {&l.graphDestroy, "orch_graph_destroy"},
		{&l.eventCreate, "orch_event_create"}, {&l.eventDestroy, "orch_event_destroy"},
		{&l.eventRecord, "orch_event_record"}, {&l.eventElapsed, "orch_event_elapsed"},
		{&l.matmul, "orch_matmul"}, {&l.moeMatmul, "orch_moe_matmul"}, {&l.getRows, "orch_get_rows"},
		{&l.rowBytes, "orch_row_bytes"}, {&l.rmsnorm, "orch_rmsnorm"}, {&l.layernorm, "orch_layernorm"},
		{&l.add, "orch_add"}, {&l.addBias, "orch_add_bias"}, {&l.scale, "orch_scale"}, {&l.gelu, "orch_gelu"},
		{&l.swiglu, "orch_swiglu"}, {&l.swigluOAI, "orch_swiglu_oai"}, {&l.rope, "orch_rope"},
		{&l.kvWrite, "orch_kv_write"}, {&l.attention, "orch_attention"}, {&l.moeTopK, "orch_moe_topk"},
		{&l.moeCombine, "orch_moe_combine"}, {&l.moeFFN, "orch_moe_ffn"}, {&l.argmax, "orch_argmax"},
		{&l.qgemm, "orch_qgemm"}, {&l.moeRouteInts, "orch_moe_route_ints"}, {&l.moeFFNGrouped, "orch_moe_ffn_grouped"},
		{&l.matmulMulti, "orch_matmul_multi"}, {&l.rope2, "orch_rope2"}, {&l.setPDL, "orch_set_pdl"},
		{&l.ropeKV, "orch_rope_kv"},
		{&l.commAvailable, "orch_comm_available"}, {&l.commLibrary, "orch_comm_library"},
		{&l.commUniqueID, "orch_comm_unique_id"}, {&l.commInit, "orch_comm_init"},
		{&l.commAllreduceF32, "orch_comm_allreduce_f32"}, {&l.commAsyncError, "orch_comm_async_error"},
		{&l.commAbort, "orch_comm_abort"}, {&l.commDestroy, "orch_comm_destroy"},
		{&l.moeFFNRoute, "orch_moe_ffn_route"},
		{&l.moeDecode, "orch_moe_decode"},
		{&l.moeDecodeNorm, "orch_moe_decode_norm"},
		{&l.matmulSwiGLU, "orch_matmul_swiglu"}, {&l.gemvTrace, "orch_gemv_trace"},
	}
	for _, s := range syms {
		if _, err := purego.Dlsym(l.handle, s.name); err != nil {
			return fmt.Errorf("symbol %s: %w", s.name, err)
		}
		purego.RegisterLibFunc(s.fn, l.handle, s.name)
	}
	// Optional: the folded RoPE + KV write + attention (fuse.go; nil: off).
	if _, err := purego.Dlsym(l.handle, "orch_attention_rope"); err == nil {
		purego.RegisterLibFunc(&l.attentionRope, l.handle, "orch_attention_rope")
	}
	// Optional: MoE v10 with the next RMSNorm's producer half (orch_moe_decode_addnorm; nil: off).
	if _, err := purego.Dlsym(l.handle, "orch_moe_decode_addnorm"); err == nil {
		purego.RegisterLibFunc(&l.moeDecodeAddNorm, l.handle, "orch_moe_decode_addnorm")
	}
	// Optional: the out projection with the MoE's route in its tail (orch_moe_decode_oproj through its struct
	// wrapper; nil: off).
	if _, err := purego.Dlsym(l.handle, "orch_moe_decode_oproj_args"); err == nil {
		purego.RegisterLibFunc(&l.moeDecodeOProj, l.handle, "orch_moe_decode_oproj_args")
	}
	// Optional: the bf16 weight cache (bf16cache.go; nil: off).
	if _, err := purego.Dlsym(l.handle, "orch_bf16_cache"); err == nil {
		purego.RegisterLibFunc(&l.bf16Cache, l.handle, "orch_bf16_cache")
	}
	// Optional: the queued token read of a step launched ahead (ahead.go).
	bindAll(l.handle, []symbol{
		{&l.memcpyD2HAsync, "orch_memcpy_d2h_async"}, {&l.eventSync, "orch_event_sync"},
		{&l.hostAlloc, "orch_host_alloc"}, {&l.hostFree, "orch_host_free"},
	})
	bindAll(l.handle, []symbol{{&l.stepAdvance, "orch_step_advance"}})
	bindAll(l.handle, []symbol{{&l.readI32Host, "orch_read_i32_host"}})
	bindAll(l.handle, []symbol{{&l.getRowsRMSNorm, "orch_get_rows_rmsnorm"}})
	bindAll(l.handle, []symbol{{&l.weightRepack, "orch_weight_repack"}})
	// Optional entry points: all or none (the feature is then off).
	bindAll(l.handle, []symbol{
		{&l.matmulAddNorm, "orch_matmul_addnorm"}, {&l.matmulMultiNF, "orch_matmul_multi_nf"},
		{&l.matmulSwiGLUNF, "orch_matmul_swiglu_nf"},
	})
	bindAll(l.handle, []symbol{{&l.matmulAddNormPF, "orch_matmul_addnorm_pf"}})
	return nil
}

// symbol is a C entry point and the function variable it binds.
type symbol struct {
	fn   any
	name string
}

// bindAll binds every symbol of syms, or none when the library lacks one
// (an optional feature is then off).
func bindAll(handle uintptr, syms []symbol) {
	for _, s := range syms {
		if _, err := purego.Dlsym(handle, s.name); err != nil {
			return
		}
	}
	for _, s := range syms {
		purego.RegisterLibFunc(s.fn, handle, s.name)
	}
}

// status turns an orch_status into a Go error naming op and the library's message.
func (l *lib) status(op string, rc int32) error {
	if rc == stOK {
		return nil
	}
	buf := make([]byte, 1024)
	l.lastError(&buf[0], int64(len(buf)))
	n := 0
	for n < len(buf) && buf[n] != 0 {
		n++
	}
	msg := string(buf[:n])
	switch rc {
	case stOOM:
		return fmt.Errorf("cuda %s: %w: %s", op, ErrOutOfMemory, msg)
	case stUnsupported:
		return fmt.Errorf("cuda %s: %w: %s", op, ErrUnsupported, msg)
	case stNoDevice:
		return fmt.Errorf("cuda %s: %w: %s", op, ErrUnavailable, msg)
	default:
		return fmt.Errorf("cuda %s: status %d: %s", op, rc, msg)
	}
}

func sizeofAttnArgs(a *attnArgs) uintptr { return unsafe.Sizeof(*a) }
