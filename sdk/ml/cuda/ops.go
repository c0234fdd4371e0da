package cuda

import (
	"os"
	"slices"
	"strconv"

	"github.com/llama-orch/orch/sdk/ml"
)

const anyType = ml.DType(1 << 30)

// Routing to the tensor-core GEMM (orch_qgemm, orch_moe_ffn_grouped; ABI 4).
// ORCH_CUDA_GEMM=v1 restores the session-2 paths exactly: GEMV for n <= 8,
// dequantize-to-bf16 + cuBLAS above, MoE through the fused / per-pair GEMVs.
var (
	// gemmV1 is read once; tests flip it to compare the two paths.
	gemmV1 = os.Getenv("ORCH_CUDA_GEMM") == "v1"
	// gemmTile forces the tile configuration of both kernels (0 = by shape,
	// 1..4: see orch_qgemm); tests and TestPerf set it.
	gemmTile int32
)

// Thresholds (docs/perf-cuda.md, Round 3, measured on the H100 in device run
// 2). Dense: GEMV v4 (n <= 4) reads W once at 44-98% of the bytes floor;
// n = 5..8 is the GEMV's (decode of several streams, fp32 activations, checked
// at 1e-4 by TestMatMul); for 9 <= n <= 96 the bf16 GEMM won (Q8_0
// 2880x5120: n=16 0.039 vs 0.097 ms, n=64 0.074-0.079 vs 0.098 ms); above,
// dequantize + cuBLAS wins (n=512: 0.117 vs 0.192 ms best tile), so large n
// goes back to it. Session 5 (cuda/src/matmul_prefill.cu v2: whole-m
// cuBLAS calls, coalesced dequantization; TestPerfPrefillMatMul on the H100,
// session 5 device run 2) moved that border down to 64: at n = 96 the
// large-n path beat the routed qgemm on every Q8_0 shape timed (Llama
// gate/up 0.115 vs 0.198 ms, down 0.120 vs 0.299, q/o 0.032 vs 0.089,
// gpt-oss q 0.021 vs 0.065). MoE: the grouped GEMMs read each routed
// expert once per tile of pairs instead of once per (token, slot) pair:
// n=64 (256 pairs) 1.06 vs 1.82 ms, n=512 1.73 vs 13.8 ms; at n=8 (32 pairs)
// the fused GEMVs win (0.25 vs 0.70 ms), so grouping starts at 64 pairs.
// (Variables so that TestPerf can time the new paths outside them.)
var (
	qgemmMinN       = 9
	qgemmMaxN       = 64
	moeGroupedPairs = 64
	// moeRouteMaxN: the largest n that tries the fused MoE v9 route
	// (orch_moe_ffn_route) before the grouped GEMMs when those run v3
	// (moe_gemm.cuh: MXFP4, ORCH_CUDA_MOEGEMM and ORCH_CUDA_MOE unset or v3
	// (or v4, moe_wg.cuh, which keeps v3's 64-pair tile up to 16 pairs per expert);
	// otherwise 64 as before). Session 5, device run 2 (H100, gpt-oss,
	// Backend.MoE with router, TestPerfMoEPrefill): n = 16 v9 0.430 ms vs
	// grouped v3 0.510; n = 64 v9 0.626 vs grouped 0.518. Grouped v3 is flat
	// at ~0.51 ms from 16 to 64 tokens (the weights streamed once per tile
	// dominate); v9 grows ~4.2 us a token (session 4: 406 / 472 / 606 us at
	// 16 / 32 / 64): they cross at ~41 tokens.
	moeRouteMaxN = 40
	// moeDecodeMaxN: the largest n that tries orch_moe_decode (v10 takes
	// up to 8 tokens, v13 — cuda/src/moe_dec13.cuh, where routed — up to 64;
	// the library declines the rest).
	moeDecodeMaxN = 64
	// moeV3 is read once, as the library reads ORCH_CUDA_MOEGEMM.
	moeV3 = func() bool {
		g, m := os.Getenv("ORCH_CUDA_MOEGEMM"), os.Getenv("ORCH_CUDA_MOE")
		return (g == "" || g == "v3" || g == "v4") && m == ""
	}()
)

func qgemmType(dt ml.DType) bool { return dt == ml.Q8_0 || dt == ml.Q4_0 || dt == ml.MXFP4 }

// The decode GEMV for several streams (session 4, docs/perf-cuda.md Round 5):
// GEMV v9 (cuda/src/gemv16.cuh) decodes each weight block once for up to 8
// tiles of 8 tokens. With it routed (ORCH_CUDA_GEMV unset or v9 and
// ORCH_CUDA_GEMM not v1: the library's matmul.cu gemv_max_n), quantized
// MatMuls that gemvWideFor picks take it (through orch_matmul_multi, merged
// with their siblings as for n <= 8) instead of the bf16 GEMM.
const gemvWideN = 64

// gemvWide / gemvPin9 are read once (the library reads ORCH_CUDA_GEMV once per process).
var (
	gemvWide = func() bool { v := os.Getenv("ORCH_CUDA_GEMV"); return v == "" || v == "v9" }()
	gemvPin9 = os.Getenv("ORCH_CUDA_GEMV") == "v9"
)

// denseV2From is the smallest n whose quantized MatMuls skip GEMV v9 and the
// qgemm tile GEMM for orch_matmul's large-n path (dequantize the whole weight
// + one cuBLAS call, matmul_prefill.cu v2); ORCH_CUDA_GEMV=v9 (gemvPin9) keeps
// v9 up to 64. Session 6, device run 1 (H100, same card and call, bench
// pp128+tg128): ORCH_CUDA_DENSE_V2_FROM=17 vs 65 (session 5's routing) gave
// x32 gpt-oss 2,102 vs 2,043 and Llama 1,913 vs 1,788; =33 gave x64 gpt-oss
// 3,721 / 3,737 vs 3,526 and Llama 3,567 / 3,575 vs 2,849. Default 17;
// ORCH_CUDA_DENSE_V2_FROM=N (> 8) moves the border.
var denseV2From = func() int {
	if v, err := strconv.Atoi(os.Getenv("ORCH_CUDA_DENSE_V2_FROM")); err == nil && v > 8 {
		return v
	}
	return 17
}()

// gemvMaxN is the largest n a quantized MatMul may send to the decode GEMV.
func gemvMaxN() int {
	if gemvWide && !gemmV1 {
		return gemvWideN
	}
	return 8
}

// gemvWideFor reports whether a quantized MatMul of n > 8 tokens, k x m,
// takes GEMV v9. ORCH_CUDA_GEMV=v9 pins it for every n <= 64; by default
// where device run 7 (H100, commit 73e576b: v9 with two row groups from
// n = 17 and x prefetch; .orch-notes/run7-perf-gemv.md) measured v9 faster
// than the bf16 GEMM: every shape up to n = 32 (Llama down n = 16: 109 vs
// 137 us, gate/up n = 32: 86 vs 95), and n = 33..64 for m <= 8192 (qkv
// n = 64: 45 vs 61 us, down: 217 vs 290) but not Llama's gate/up (m = 14336:
// 122 vs 97 us at n = 64).
func gemvWideFor(n, k, m int) bool {
	if n <= 8 || n > gemvMaxN() || (n >= denseV2From && !gemvPin9) {
		return false
	}
	return gemvPin9 || n <= 32 || m <= 8192
}

// arg checks an op operand and returns it, recording an error otherwise.
func (b *Backend) arg(op, name string, t ml.Tensor, dt ml.DType) *tensor {
	if b.err != nil {
		return nil
	}
	if t == nil {
		b.failf(op, "%s is nil", name)
		return nil
	}
	ct, err := b.get(t)
	if err != nil {
		b.failf(op, "%s: %v", name, err)
		return nil
	}
	b.touchUnrotated(ct, op == "matmul" && name == "dst") // q / k a folded Attend left unrotated (fuse.go)
	// h holding a norm fold's xt (normfold.go)
	b.touchXT(ct, op == "matmul" && name == "dst", op == "matmul" && name == "x")
	if dt != anyType && ct.dt != dt {
		b.failf(op, "%s is %v, want %v", name, ct.dt, dt)
		return nil
	}
	return ct
}

// optF32 returns the device pointer of an optional F32 operand (0 when nil).
func (b *Backend) optF32(op, name string, t ml.Tensor, want int) (uintptr, bool) {
	if t == nil {
		return 0, true
	}
	ct := b.arg(op, name, t, ml.F32)
	if ct == nil {
		return 0, false
	}
	if want >= 0 && ct.n != want {
		b.failf(op, "%s %v: want %d values", name, ct.shape, want)
		return 0, false
	}
	return ct.ptr, true
}

func rows2(t *tensor) (inner, rows int) { return t.shape[0], t.n / t.shape[0] }

func b2i(v bool) int32 {
	if v {
		return 1
	}
	return 0
}

func (b *Backend) Embed(dst, table, ids ml.Tensor, add bool) {
	const op = "embed"
	d, tb, id := b.arg(op, "dst", dst, ml.F32), b.arg(op, "table", table, anyType), b.arg(op, "ids", ids, ml.I32)
	if d == nil || tb == nil || id == nil {
		return
	}
	dim, _ := rows2(tb)
	if d.shape[0] != dim || d.n != dim*id.n {
		b.failf(op, "dst %v, table %v, %d ids", d.shape, tb.shape, id.n)
		return
	}
	if !add && b.holdRows(d, tb, id, dim) { // an RMSNorm of dst may take it in (rowsnorm.go)
		return
	}
	b.call(op, b.l.getRows(b.ctx, d.ptr, tb.ptr, int32(tb.dt), id.ptr, int64(id.n), int64(dim), b2i(add)))
}

func (b *Backend) Copy(dst, src ml.Tensor) {
	d, s := b.arg("copy", "dst", dst, anyType), b.arg("copy", "src", src, anyType)
	if d == nil || s == nil {
		return
	}
	if d.dt != s.dt || d.bytes != s.bytes {
		b.failf("copy", "%v into %v", s, d)
		return
	}
	b.call("copy", b.l.memcpyD2D(b.ctx, d.ptr, s.ptr, int64(d.bytes)))
}

func (b *Backend) Add(dst, x, y ml.Tensor) {
	const op = "add"
	d, a, c := b.arg(op, "dst", dst, ml.F32), b.arg(op, "a", x, ml.F32), b.arg(op, "b", y, ml.F32)
	if d == nil || a == nil || c == nil {
		return
	}
	if d.n != a.n || a.n != c.n {
		b.failf(op, "lengths %d, %d, %d differ", d.n, a.n, c.n)
		return
	}
	b.call(op, b.l.add(b.ctx, d.ptr, a.ptr, c.ptr, int64(d.n)))
}

// normOps: the validated operands of a norm.
type normOps struct {
	d, x, r  *tensor // r: the residual (nil without)
	wp, bp   uintptr
	dim, n   int
	xp, addp uintptr // the kernel normalises xp, adding addp into it first
}

func (b *Backend) normArgs(op string, res, dst, x, w, bias ml.Tensor, layer bool) (a normOps, ok bool) {
	a.d, a.x = b.arg(op, "dst", dst, ml.F32), b.arg(op, "x", x, ml.F32)
	if a.d == nil || a.x == nil {
		return a, false
	}
	if a.d.n != a.x.n {
		b.failf(op, "dst %v, x %v", a.d.shape, a.x.shape)
		return a, false
	}
	a.dim, a.n = rows2(a.x)
	if a.wp, ok = b.optF32(op, "w", w, a.dim); !ok {
		return a, false
	}
	if w == nil && !layer {
		b.failf(op, "w is nil")
		return a, false
	}
	if a.bp, ok = b.optF32(op, "b", bias, a.dim); !ok {
		return a, false
	}
	a.xp = a.x.ptr
	if res != nil {
		if a.r = b.arg(op, "res", res, ml.F32); a.r == nil {
			return a, false
		}
		if a.r.n != a.x.n {
			b.failf(op, "res %v, x %v", a.r.shape, a.x.shape)
			return a, false
		}
		a.xp, a.addp = a.r.ptr, a.x.ptr
	}
	return a, true
}

func (b *Backend) norm(op string, res, dst, x, w, bias ml.Tensor, eps float32, layer bool) {
	// normfold.go: an AddRMSNorm of a held GEMV's (or MoE's) output may be held with it
	fold := fuseNormFold && !layer && res != nil && b.prodHeld()
	b.preNormXT(res, dst, x)
	b.holdFlush = fold
	a, ok := b.normArgs(op, res, dst, x, w, bias, layer)
	b.holdFlush = false
	if !ok {
		return
	}
	if fold && b.holdProdNorm(op, res, dst, x, w, a, eps) {
		return
	}
	b.flush()
	if !layer && b.holdMoENorm(op, res, dst, x, w, a, eps) { // the MoE after it may take it in (fuse.go)
		return
	}
	if layer {
		b.call(op, b.l.layernorm(b.ctx, a.d.ptr, a.xp, a.addp, a.wp, a.bp, int64(a.n), int64(a.dim), eps))
	} else {
		b.call(op, b.l.rmsnorm(b.ctx, a.d.ptr, a.xp, a.addp, a.wp, int64(a.n), int64(a.dim), eps))
	}
}

func (b *Backend) RMSNorm(dst, x, w ml.Tensor, eps float32) {
	if b.foldRowsNorm(dst, x, w, eps) { // the held Embed of x and this norm in one launch (rowsnorm.go)
		return
	}
	b.norm("rms_norm", nil, dst, x, w, nil, eps, false)
}
func (b *Backend) AddRMSNorm(res, dst, x, w ml.Tensor, eps float32) {
	b.norm("add_rms_norm", res, dst, x, w, nil, eps, false)
}
func (b *Backend) LayerNorm(dst, x, w, bias ml.Tensor, eps float32) {
	b.norm("layer_norm", nil, dst, x, w, bias, eps, true)
}
func (b *Backend) AddLayerNorm(res, dst, x, w, bias ml.Tensor, eps float32) {
	b.norm("add_layer_norm", res, dst, x, w, bias, eps, true)
}

func (b *Backend) MatMul(dst, x, w, bias ml.Tensor) {
	const op = "matmul"
	b.holdFlush = true // a held MatMul may merge with this one (fuse.go)
	d, xx, ww := b.arg(op, "dst", dst, ml.F32), b.arg(op, "x", x, ml.F32), b.arg(op, "w", w, anyType)
	bp, okb := uintptr(0), false
	if d != nil && xx != nil && ww != nil && len(ww.shape) == 2 {
		bp, okb = b.optF32(op, "bias", bias, ww.shape[1])
	}
	b.holdFlush = false
	if d == nil || xx == nil || ww == nil {
		return
	}
	in, n := rows2(xx)
	if len(ww.shape) != 2 || ww.shape[0] != in {
		b.failf(op, "w %v for x %v", ww.shape, xx.shape)
		return
	}
	out := ww.shape[1]
	if d.shape[0] != out || d.n != out*n {
		b.failf(op, "dst %v, want [%d, %d]", d.shape, out, n)
		return
	}
	if !okb {
		return
	}
	if b.xt.on && (span{xx.ptr, uintptr(xx.bytes)}).overlaps(b.xt.h) && !b.nfJoins(d, xx, ww, bp, n, in, out) {
		b.flush() // x is a fold's h (normfold.go) and this MatMul is not one of its scaled consumers
		b.materializeXT()
	}
	if ww.weight {
		b.bf16Want(ww, n, in, out) // its bf16 copy for the large-n path (bf16cache.go)
		if b.bf16Route(ww, n) {
			// a weight with a bf16 copy: cuBLAS on it from bf16From tokens
			// (not GEMV v9 / qgemm; not merged with siblings into a v9 launch)
			b.flush()
			b.call(op, b.l.matmul(b.ctx, d.ptr, xx.ptr, ww.ptr, int32(ww.dt), bp, int64(n), int64(in), int64(out), 0))
			return
		}
	}
	if n > 8 && gemvWideFor(n, in, out) && qgemmType(ww.dt) {
		// GEMV v9: held for merging, or one orch_matmul_multi part
		// (orch_matmul runs the GEMM for n > 8); the library declines
		// shapes v9 does not take, which go on to the GEMM below.
		if b.holdMatMul(d, xx, ww, bp, n, in, out) {
			return
		}
		part := gemvPart{w: ww.ptr, bias: bp, y: d.ptr, m: int64(out)}
		dst := span{d.ptr, uintptr(d.bytes)}
		if !dst.overlaps(span{xx.ptr, uintptr(xx.bytes)}) && !dst.overlaps(span{ww.ptr, uintptr(ww.bytes)}) &&
			!dst.overlaps(span{bp, uintptr(4 * out)}) {
			if rc := b.l.matmulMulti(b.ctx, xx.ptr, int32(ww.dt), int64(n), int64(in), 1, &part); rc != stUnsupported {
				b.call(op, rc)
				return
			}
		}
	}
	if !gemmV1 && n >= qgemmMinN && n <= qgemmMaxN && n < denseV2From && qgemmType(ww.dt) {
		b.flush()
		xbf := b.scratchBuf("qgemm.x", 2*n*in)
		if b.err != nil {
			return
		}
		rc := b.l.qgemm(b.ctx, d.ptr, xx.ptr, ww.ptr, int32(ww.dt), bp, int64(n), int64(in), int64(out), 0, xbf, gemmTile)
		if rc != stUnsupported { // unsupported shape: the v1 path below
			b.call(op, rc)
			return
		}
	}
	if b.holdMatMul(d, xx, ww, bp, n, in, out) {
		return
	}
	b.call(op, b.l.matmul(b.ctx, d.ptr, xx.ptr, ww.ptr, gemvWType(ww), bp, int64(n), int64(in), int64(out), 0))
}

func (b *Backend) unary(op string, dst, x ml.Tensor) (*tensor, *tensor) {
	d, xx := b.arg(op, "dst", dst, ml.F32), b.arg(op, "x", x, ml.F32)
	if d == nil || xx == nil {
		return nil, nil
	}
	if d.n != xx.n {
		b.failf(op, "dst %v, x %v", d.shape, xx.shape)
		return nil, nil
	}
	return d, xx
}

func (b *Backend) GELU(dst, x ml.Tensor) {
	if d, xx := b.unary("gelu", dst, x); d != nil {
		b.call("gelu", b.l.gelu(b.ctx, d.ptr, xx.ptr, int64(d.n)))
	}
}

func (b *Backend) glu(op string, dst, gate, up ml.Tensor) (d, g, u *tensor) {
	d, g, u = b.arg(op, "dst", dst, ml.F32), b.arg(op, "gate", gate, ml.F32), b.arg(op, "up", up, ml.F32)
	if d == nil || g == nil || u == nil {
		return nil, nil, nil
	}
	if d.n != g.n || g.n != u.n {
		b.failf(op, "dst %v, gate %v, up %v", d.shape, g.shape, u.shape)
		return nil, nil, nil
	}
	return
}

func (b *Backend) SwiGLU(dst, gate, up ml.Tensor) {
	b.holdFlush = true // held gate/up GEMVs may take the SwiGLU into their launch (fuse.go)
	d, g, u := b.glu("swiglu", dst, gate, up)
	b.holdFlush = false
	if d == nil || b.foldSwiGLU(d, g, u) {
		return
	}
	b.flush()
	n := int64(d.n)
	b.call("swiglu", b.l.swiglu(b.ctx, d.ptr, g.ptr, u.ptr, 1, n, n, n))
}

func (b *Backend) SwiGLUOAI(dst, gate, up ml.Tensor, alpha, limit float32) {
	if d, g, u := b.glu("swiglu_oai", dst, gate, up); d != nil {
		n := int64(d.n)
		b.call("swiglu_oai", b.l.swigluOAI(b.ctx, d.ptr, g.ptr, u.ptr, 1, n, n, n, alpha, limit))
	}
}

func (b *Backend) RoPE(x, pos ml.Tensor, r *ml.Rope) {
	const op = "rope"
	b.holdFlush = true // a held RoPE may merge with this one (fuse.go)
	xx, p := b.arg(op, "x", x, ml.F32), b.arg(op, "pos", pos, ml.I32)
	var f *tensor
	if xx != nil && p != nil && r != nil {
		f = b.arg(op, "inv_freq", r.InvFreq, ml.F32)
	}
	b.holdFlush = false
	if xx == nil || p == nil {
		return
	}
	if r == nil {
		b.failf(op, "nil parameters")
		return
	}
	if f == nil {
		return
	}
	n := p.n
	hd, heads, err := ml.RopeShape(xx.shape, n, r, f.n)
	if err != nil {
		b.failf(op, "%v", err)
		return
	}
	scale := r.Scale
	if scale == 0 {
		scale = 1
	}
	if b.holdRoPE(xx, int64(hd*heads), int64(n), int32(heads), int32(hd), int32(r.Dims), p.ptr, f.ptr, scale,
		b2i(r.Mode == ml.RopeNeoX)) {
		return
	}
	b.call(op, b.l.rope(b.ctx, xx.ptr, int64(hd*heads), int64(n), int32(heads), int32(hd), int32(r.Dims), p.ptr, f.ptr,
		scale, b2i(r.Mode == ml.RopeNeoX)))
}

func kvType(dt ml.DType) (int32, bool) {
	switch dt {
	case ml.F32:
		return 0, true
	case ml.F16:
		return 1, true
	}
	return 0, false
}

func (b *Backend) caches(op string, kCache, vCache ml.Tensor) (kc, vc *tensor, kvt int32, ok bool) {
	kc, vc = b.arg(op, "k_cache", kCache, anyType), b.arg(op, "v_cache", vCache, anyType)
	if kc == nil || vc == nil {
		return
	}
	if len(kc.shape) != 4 || !slices.Equal(kc.shape, vc.shape) || kc.dt != vc.dt {
		b.failf(op, "caches %v %v, %v %v: want equal [head_dim, kv_heads, block_size, blocks]", kc.dt, kc.shape, vc.dt, vc.shape)
		return
	}
	if kvt, ok = kvType(kc.dt); !ok {
		b.failf(op, "cache type %v: %v", kc.dt, ErrUnsupported)
	}
	return
}

func (b *Backend) batch(op string, bt *ml.Batch, n, bs int) (pos, seq, slots, blocks *tensor, ok bool) {
	if bt == nil {
		b.failf(op, "nil batch")
		return
	}
	pos, seq = b.arg(op, "pos", bt.Pos, ml.I32), b.arg(op, "seq", bt.Seq, ml.I32)
	slots, blocks = b.arg(op, "slots", bt.Slots, ml.I32), b.arg(op, "blocks", bt.Blocks, ml.I32)
	if pos == nil || seq == nil || slots == nil || blocks == nil {
		return
	}
	if pos.n < n || seq.n < n || slots.n < n {
		b.failf(op, "batch tensors shorter than %d tokens", n)
		return
	}
	if bt.BlockSize != bs {
		b.failf(op, "batch block size %d, cache block size %d", bt.BlockSize, bs)
		return
	}
	return pos, seq, slots, blocks, true
}

func (b *Backend) KVWrite(kCache, vCache, k, v ml.Tensor, bt *ml.Batch) {
	const op = "kv_write"
	b.holdFlush = true // a held RoPE of q and k may fuse with this write (fuse.go)
	kc, vc, kk, vv, slots, kvt, n, ok := b.kvWriteArgs(op, kCache, vCache, k, v, bt)
	b.holdFlush = false
	if !ok {
		return
	}
	hd, nkv := kc.shape[0], kc.shape[1]
	row := hd * nkv
	if b.holdKVWrite(kc, vc, kvt, kk, vv, slots.ptr, int64(n), int32(nkv), int32(hd)) {
		return
	}
	b.call(op, b.l.kvWrite(b.ctx, kc.ptr, vc.ptr, kvt, kk.ptr, vv.ptr, int64(row), int64(row), slots.ptr, int64(n),
		int32(nkv), int32(hd)))
}

// kvWriteArgs checks KVWrite's operands: caches, k and v rows, the batch's slots.
func (b *Backend) kvWriteArgs(op string, kCache, vCache, k, v ml.Tensor, bt *ml.Batch) (kc, vc, kk, vv, slots *tensor,
	kvt int32, n int, ok bool) {
	kc, vc, kvt, ok = b.caches(op, kCache, vCache)
	if !ok {
		return
	}
	kk, vv = b.arg(op, "k", k, ml.F32), b.arg(op, "v", v, ml.F32)
	if kk == nil || vv == nil {
		return kc, vc, kk, vv, nil, kvt, 0, false
	}
	hd, nkv, bs := kc.shape[0], kc.shape[1], kc.shape[2]
	n, err := ml.KVRows(kk.shape, vv.shape, hd, nkv)
	if err != nil {
		b.failf(op, "%v", err)
		return kc, vc, kk, vv, nil, kvt, 0, false
	}
	_, _, slots, _, ok = b.batch(op, bt, n, bs)
	return
}

func (b *Backend) Attend(dst, q, kCache, vCache ml.Tensor, bt *ml.Batch, a *ml.Attention) {
	const op = "attend"
	b.holdFlush = true // a held RoPE pair + KV write may fold into this launch (fuse.go foldAttend)
	defer func() { b.holdFlush = false }()
	kc, vc, kvt, ok := b.caches(op, kCache, vCache)
	if !ok {
		return
	}
	d, qq := b.arg(op, "dst", dst, ml.F32), b.arg(op, "q", q, ml.F32)
	if d == nil || qq == nil {
		return
	}
	if a == nil {
		b.failf(op, "nil parameters")
		return
	}
	hd, nkv, bs := kc.shape[0], kc.shape[1], kc.shape[2]
	nh, n, err := ml.AttendShape(qq.shape, d.shape, hd, nkv)
	if err != nil {
		b.failf(op, "%v", err)
		return
	}
	pos, seq, slots, blocks, ok := b.batch(op, bt, n, bs)
	if !ok {
		return
	}
	sp, ok := b.optF32(op, "sinks", a.Sinks, nh)
	if !ok {
		return
	}
	b.holdFlush = false
	args := attnArgs{
		out: d.ptr, q: qq.ptr, kCache: kc.ptr, vCache: vc.ptr, tokSeq: seq.ptr, tokPos: pos.ptr,
		blockTables: blocks.ptr, sinks: sp, qStride: int64(hd * nh), nTok: int64(n),
		maxBlocks: int32(blocks.shape[0]), blockSize: int32(bs), nHeads: int32(nh), nKVHeads: int32(nkv),
		headDim: int32(hd), window: int32(a.Window), kvDType: kvt, scale: a.Scale, maxPos: int32(bt.MaxPos),
	}
	if b.foldAttend(&args, span{d.ptr, uintptr(d.bytes)}, pos.ptr, slots.ptr) {
		return
	}
	b.flush() // a held RoPE pair + KV write that did not fold
	b.call(op, b.l.attention(b.ctx, &args))
}

func (b *Backend) MoE(dst, x ml.Tensor, m *ml.MoE) {
	if b.foldMoENorm(dst, x, m) { // with the AddRMSNorm of x held before it (fuse.go), or held itself (normfold.go)
		return
	}
	b.moePlain(dst, x, m)
}

// moePlain is the MoE op without the held-norm fold (a held norm is launched
// by the first operand lookup); normfold.go's held MoE re-enters it where the
// library declines the call it held.
func (b *Backend) moePlain(dst, x ml.Tensor, m *ml.MoE) {
	const op = "moe"
	d, xx := b.arg(op, "dst", dst, ml.F32), b.arg(op, "x", x, ml.F32)
	if d == nil || xx == nil {
		return
	}
	if m == nil {
		b.failf(op, "nil weights")
		return
	}
	router, gate := b.arg(op, "router", m.Router, anyType), b.arg(op, "gate", m.Gate, anyType)
	up, down := b.arg(op, "up", m.Up, anyType), b.arg(op, "down", m.Down, anyType)
	if router == nil || gate == nil || up == nil || down == nil {
		return
	}
	md, err := ml.MoEShapes(d.shape, xx.shape, router.shape, gate.shape, up.shape, down.shape, m.TopK)
	if err != nil {
		b.failf(op, "%v", err)
		return
	}
	dim, n, ne, ff, k := md.Dim, md.N, md.Experts, md.FF, m.TopK
	if k > 16 {
		b.failf(op, "top-k %d of %d experts (at most 16)", k, ne)
		return
	}
	rb, ok1 := b.optF32(op, "router_bias", m.RouterBias, ne)
	gb, ok2 := b.optF32(op, "gate_bias", m.GateBias, ff*ne)
	ub, ok3 := b.optF32(op, "up_bias", m.UpBias, ff*ne)
	db, ok4 := b.optF32(op, "down_bias", m.DownBias, dim*ne)
	if !ok1 || !ok2 || !ok3 || !ok4 {
		return
	}
	logits := b.scratchBuf("moe.logits", 4*ne*n)
	ids := b.scratchBuf("moe.ids", 4*k*n)
	wts := b.scratchBuf("moe.w", 4*k*n)
	g := b.scratchBuf("moe.gate", 4*ff*k*n)
	u := b.scratchBuf("moe.up", 4*ff*k*n)
	y := b.scratchBuf("moe.down", 4*dim*k*n)
	if b.err != nil {
		return
	}
	N, K := int64(n), int32(k)
	if n <= moeDecodeMaxN && router.dt == ml.F32 && gate.dt == up.dt {
		// MoE v10 (ORCH_CUDA_MOE=v10 1..8 tokens; unpinned 2..8): router
		// GEMV + top-k in one kernel, then the fused expert FFN (three
		// launches). MoE v13 (ORCH_CUDA_MOE=v13 2..64 tokens; unpinned from
		// ORCH_CUDA_MOE13_FROM tokens when set): the same route kernel, then
		// each touched expert read once for all its tokens (MXFP4). The
		// library declines otherwise (other versions, one token unpinned,
		// more than 8 tokens outside v13, other router types, what
		// orch_moe_ffn declines) and the path below runs.
		gt, dt := moeWTypes(gate, up, down) // the repacked rows where all three have them (weightrp.go)
		rc := b.l.moeDecode(b.ctx, d.ptr, xx.ptr, router.ptr, int32(router.dt), rb, int32(ne), ids, wts, gate.ptr,
			up.ptr, gt, gb, ub, down.ptr, dt, db, g, y, N, K, int64(dim), int64(ff), m.Alpha, m.Limit)
		if rc != stUnsupported {
			b.call(op, rc)
			return
		}
	}
	b.call(op, b.l.matmul(b.ctx, logits, xx.ptr, router.ptr, int32(router.dt), rb, N, int64(dim), int64(ne), 0))
	grouped := !gemmV1 && n*k >= moeGroupedPairs && gate.dt == up.dt && qgemmType(gate.dt) && qgemmType(down.dt)
	routeMax := 64
	if grouped && moeV3 && gate.dt == ml.MXFP4 && down.dt == ml.MXFP4 {
		routeMax = moeRouteMaxN
	}
	if n >= 2 && n <= routeMax && gate.dt == up.dt && b.err == nil {
		// MoE v9 (2..64 tokens, MXFP4): top-k, then each routed expert
		// read once for all its tokens; unpinned (ORCH_CUDA_MOE unset): from
		// 16 tokens. The library declines otherwise (other versions and
		// types, one token, more than 32 experts, an infinite limit, where
		// orch_moe_ffn would): top-k + orch_moe_ffn / the grouped GEMMs.
		rc := b.l.moeFFNRoute(b.ctx, d.ptr, xx.ptr, logits, int32(ne), ids, wts, gate.ptr, up.ptr, int32(gate.dt), gb,
			ub, down.ptr, int32(down.dt), db, g, y, N, K, int64(dim), int64(ff), m.Alpha, m.Limit)
		if rc != stUnsupported {
			b.call(op, rc)
			return
		}
	}
	b.call(op, b.l.moeTopK(b.ctx, ids, wts, logits, N, int32(ne), K))
	// Fused expert FFN (gate+up+act, then down+bias+combine: two launches);
	// the library declines (stUnsupported) for types/shapes it does not fuse
	// and under ORCH_CUDA_MOE=v1, and the unfused ops below run instead.
	if b.err != nil {
		return
	}
	if grouped {
		// Grouped GEMMs: bf16 activations in moe.gate (4*ff*k*n bytes, twice
		// what they need), the per-pair down output in moe.down.
		xg := b.scratchBuf("moe.xg", 2*dim*k*n)
		route := b.scratchBuf("moe.route", 4*int(b.l.moeRouteInts(int64(n*k), int32(ne))))
		if b.err != nil {
			return
		}
		rc := b.l.moeFFNGrouped(b.ctx, d.ptr, xx.ptr, ids, wts, gate.ptr, up.ptr, int32(gate.dt), gb, ub, down.ptr,
			int32(down.dt), db, N, K, int32(ne), int64(dim), int64(ff), m.Alpha, m.Limit, xg, g, y, route, gemmTile)
		if rc != stUnsupported {
			b.call(op, rc)
			return
		}
	}
	if gate.dt == up.dt {
		rc := b.l.moeFFN(b.ctx, d.ptr, xx.ptr, ids, wts, gate.ptr, up.ptr, int32(gate.dt), gb, ub, down.ptr,
			int32(down.dt), db, g, N, K, int64(dim), int64(ff), m.Alpha, m.Limit)
		if rc != stUnsupported {
			b.call(op, rc)
			return
		}
	}
	b.call(op, b.l.moeMatmul(b.ctx, g, xx.ptr, 0, gate.ptr, int32(gate.dt), gb, ids, N, K, int64(dim), int64(ff)))
	b.call(op, b.l.moeMatmul(b.ctx, u, xx.ptr, 0, up.ptr, int32(up.dt), ub, ids, N, K, int64(dim), int64(ff)))
	nk := N * int64(K)
	b.call(op, b.l.swigluOAI(b.ctx, g, g, u, nk, int64(ff), int64(ff), int64(ff), m.Alpha, m.Limit))
	b.call(op, b.l.moeMatmul(b.ctx, y, g, 1, down.ptr, int32(down.dt), db, ids, N, K, int64(ff), int64(dim)))
	b.call(op, b.l.moeCombine(b.ctx, d.ptr, y, wts, N, K, int64(dim), 0))
}

func (b *Backend) Argmax(dst, x ml.Tensor) {
	d, xx := b.arg("argmax", "dst", dst, ml.I32), b.arg("argmax", "x", x, ml.F32)
	if d == nil || xx == nil {
		return
	}
	v, n := rows2(xx)
	if d.n < n {
		b.failf("argmax", "dst of %d for %d rows", d.n, n)
		return
	}
	b.call("argmax", b.l.argmax(b.ctx, d.ptr, xx.ptr, int64(n), int64(v)))
}

func (b *Backend) CopyBlock(cache ml.Tensor, dst, src int) {
	c := b.arg("copy_block", "cache", cache, anyType)
	if c == nil {
		return
	}
	nb := c.shape[len(c.shape)-1]
	if dst < 0 || src < 0 || dst >= nb || src >= nb {
		b.failf("copy_block", "blocks %d <- %d of %d", dst, src, nb)
		return
	}
	if dst == src {
		return
	}
	bb := c.bytes / nb
	b.call("copy_block", b.l.memcpyD2D(b.ctx, c.ptr+uintptr(dst*bb), c.ptr+uintptr(src*bb), int64(bb)))
}

// Fill sets every element of an F32 tensor to v (tests poison outputs with NaN).
func (b *Backend) Fill(t ml.Tensor, v float32) {
	ct := b.arg("fill", "t", t, ml.F32)
	if ct != nil {
		b.call("fill", b.l.fillF32(b.ctx, ct.ptr, v, int64(ct.n)))
	}
}
