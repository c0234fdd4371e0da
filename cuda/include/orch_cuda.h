/*
 * orch_cuda.h — the C ABI of liborch_cuda.so, the only thing Go sees of cuda/.
 *
 * Rules of this header:
 *  - No CUDA types. Device memory is a plain pointer (void* or float*) that the
 *    caller got from orch_malloc; streams, graphs and events are opaque.
 *  - Every entry returns an orch_status; ORCH_OK (0) is success. On failure
 *    orch_last_error() copies a message naming the op and the CUDA error.
 *  - All ops enqueue work on the context's stream and return without waiting
 *    for the GPU (no host synchronisation), so a decode step can be captured
 *    into a CUDA graph between orch_graph_begin and orch_graph_end. Only the
 *    d2h copy and orch_sync wait.
 *  - Activations are float32, row-major. Weights are raw GGUF bytes on the
 *    device (quantized blocks exactly as llama.cpp lays them out), typed by
 *    the GGUF type ids below; a 2-D weight with ne=[k, m] is m rows of k.
 *  - Integer args that index memory are int64; counts are int32 or int64.
 *  - Positions, sequence ids, block tables, slot maps, expert ids and RNG
 *    states are device arrays so a captured graph reads this step's values.
 */
#ifndef ORCH_CUDA_H
#define ORCH_CUDA_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define ORCH_ABI_VERSION 10 /* 6: orch_moe_ffn_route (session 4); 7: orch_moe_decode (session 5); 8: orch_matmul_swiglu, orch_gemv_trace (session 6); 9: orch_moe_decode_norm required, orch_matmul_rmsnorm and orch_pf_* / orch_spin removed (session 7; orch_attention_rope, orch_bf16_cache and the *_xh entries are optional); 10: orch_sample and the *_xh entries removed, orch_sample_rows, orch_matmul_addnorm / orch_matmul_multi_nf / orch_matmul_swiglu_nf and orch_moe_decode_addnorm added as optional (session 8) */

typedef enum {
  ORCH_OK = 0,
  ORCH_ERR_INVALID = 1,     /* bad argument (shape, type, null pointer) */
  ORCH_ERR_CUDA = 2,        /* a CUDA runtime / cuBLAS call failed */
  ORCH_ERR_OOM = 3,         /* device or pinned memory exhausted */
  ORCH_ERR_UNSUPPORTED = 4, /* dtype/shape combination not implemented */
  ORCH_ERR_NO_DEVICE = 5    /* no usable CUDA device / driver */
} orch_status;

/* GGUF tensor type ids (ggml_type). */
enum {
  ORCH_T_F32 = 0,
  ORCH_T_F16 = 1,
  ORCH_T_Q4_0 = 2,
  ORCH_T_Q8_0 = 8,
  ORCH_T_Q4_K = 12,
  ORCH_T_Q6_K = 14,
  ORCH_T_BF16 = 30,
  ORCH_T_MXFP4 = 39,
  /* (session 12; not a GGUF type) an MXFP4 expert tensor followed by its rows repacked for the one-token expert
   * GEMVs: the rows * (k/32) * 17 original bytes, then from the next multiple of 256 bytes rows repacked rows of
   * (k/32) * 16 + ((k/32 + 15) & ~15) bytes (filled by orch_mxfp4_repack). Accepted as gu_type / down_type (all
   * three tensors so) by orch_moe_decode, _norm, _addnorm and _oproj: every kernel reads the original rows except
   * MoE v10's gate_up / down, which read the repacked ones (same results, bit for bit). The original rows are
   * (k/32) * 17 bytes, the repacked ones (k/32) * 16 + ((k/32 + 15) & ~15). */
  ORCH_T_MXFP4_DUAL = 139,
  /* (session 12; not a GGUF type) a Q8_0 matrix followed by its rows repacked for GEMV v5: the rows * (k/32) * 34
   * original bytes, then from the next multiple of 256 bytes rows repacked rows of 32 * (k/32) + ((2 * (k/32) + 15)
   * & ~15) bytes (orch_weight_repack). Accepted as the weight type by orch_matmul, orch_matmul_multi(_nf),
   * orch_matmul_swiglu(_nf), orch_matmul_addnorm (GEMV v5 reads the repacked rows: same results, bit for bit; every
   * other path the original ones) and as orch_moe_decode_oproj's owtype (the original rows). */
  ORCH_T_Q8_0_DUAL = 108
};

/* KV cache element types. */
enum { ORCH_KV_F32 = 0, ORCH_KV_F16 = 1 };

typedef struct orch_ctx orch_ctx;
typedef struct orch_comm orch_comm;

/* ---- runtime (runtime.cu) ---- */
int orch_abi_version(void);
/* Copies the last error message (thread-global) into buf (NUL-terminated). */
int orch_last_error(char *buf, int64_t n);
/* Number of CUDA devices; 0 with ORCH_ERR_NO_DEVICE when none or no driver. */
int orch_device_count(int32_t *count);
int orch_init(int32_t device, orch_ctx **out);
int orch_destroy(orch_ctx *ctx);
/* name: device name; cc = major*10+minor; sm_count; memory in bytes. */
int orch_device_info(orch_ctx *ctx, char *name, int64_t name_len, int32_t *cc, int32_t *sm_count,
                     int64_t *free_bytes, int64_t *total_bytes);
int orch_malloc(orch_ctx *ctx, int64_t bytes, void **out);
int orch_free(orch_ctx *ctx, void *p);
int orch_host_alloc(int64_t bytes, void **out); /* pinned host memory */
int orch_host_free(void *p);
/* Async on the stream; src must stay valid until the stream reaches it. */
int orch_memcpy_h2d(orch_ctx *ctx, void *dst, const void *src, int64_t bytes);
int orch_memcpy_d2d(orch_ctx *ctx, void *dst, const void *src, int64_t bytes);
/* Synchronous: the copy is queued behind the stream's pending work and waited for with it (returns once dst holds it). */
int orch_memcpy_d2h(orch_ctx *ctx, void *dst, const void *src, int64_t bytes);
/* Optional (session 11): queued behind the stream's pending work, returns at once; dst must be pinned
 * (orch_host_alloc). Record an event after it and orch_event_sync before reading dst. */
int orch_memcpy_d2h_async(orch_ctx *ctx, void *dst, const void *src, int64_t bytes);
int orch_memset(orch_ctx *ctx, void *dst, int32_t byte_value, int64_t bytes);
int orch_fill_f32(orch_ctx *ctx, float *dst, float value, int64_t n);
int orch_sync(orch_ctx *ctx);
/* Graph capture of everything enqueued on ctx's stream between begin and end. */
int orch_graph_begin(orch_ctx *ctx);
int orch_graph_end(orch_ctx *ctx, void **graph_exec);
int orch_graph_launch(orch_ctx *ctx, void *graph_exec);
int orch_graph_destroy(void *graph_exec);
int orch_event_create(void **ev);
int orch_event_destroy(void *ev);
int orch_event_record(orch_ctx *ctx, void *ev);
/* Optional (session 11): waits until the stream has run the work queued before ev's last record. */
int orch_event_sync(void *ev);
/* Waits for ev1, returns milliseconds between ev0 and ev1. */
int orch_event_elapsed(void *ev0, void *ev1, float *ms);
/* Programmatic dependent launch of the decode kernels (Hopper; process-wide;
 * default on where the device supports it, off with ORCH_CUDA_PDL=0): on != 0
 * turns it on (only if the device has compute capability >= 9.0), 0 off;
 * *was (may be NULL) gets the previous state. Graphs captured before keep the
 * launches they captured. (Session 3.) */
int orch_set_pdl(orch_ctx *ctx, int32_t on, int32_t *was);

/* ---- matmul.cu ----
 * y[n, m] (+)= x[n, k] · W^T + bias. W: m rows of k elements of type wtype,
 * row stride row_bytes(wtype, k). bias: float[m] or NULL. accumulate != 0
 * adds into y (residual fusion). n <= 8 runs a dequantizing GEMV that reads
 * W once; larger n dequantizes W to bf16 tiles and calls cuBLAS. y must not
 * alias x. */
int orch_matmul(orch_ctx *ctx, float *y, const float *x, const void *w, int32_t wtype, const float *bias,
                int64_t n, int64_t k, int64_t m, int32_t accumulate);
/* bf16 weight cache (session 7; optional symbol): registers bf16 (m*k bf16,
 * 16-byte aligned, owned by the caller) as the bf16 copy of the weight w (m
 * rows of k elements of type wtype: quantized or F16; k % 32 == 0) and fills
 * it on ctx's stream with the dequantization the large-n path uses (the
 * same bf16 values). From then on orch_matmul's large-n path multiplies w,
 * and any whole-row range inside it, from bf16 instead of dequantizing per
 * call (bit-identical output). bf16 == NULL unregisters w (before the caller
 * frees the buffer or w). While ctx's stream is being captured the fill
 * runs at once on a private stream (waited for), not in the graph.
 * ORCH_ERR_UNSUPPORTED for F32 / BF16 weights (BF16 ones are used in place
 * anyway). */
int orch_bf16_cache(orch_ctx *ctx, const void *w, int32_t wtype, int64_t m, int64_t k, void *bf16);
/* Mixture-of-experts matmul: for each (token t, slot s), p = t*n_slots + s,
 * e = ids[p], y[p, :] = x[xi, :] · W_e^T + bias[e, :], xi = p if x_per_slot
 * else t. W: n_exp experts of m rows of k (GGUF ne=[k, m, n_exp]). */
int orch_moe_matmul(orch_ctx *ctx, float *y, const float *x, int32_t x_per_slot, const void *w, int32_t wtype,
                    const float *bias, const int32_t *ids, int64_t n, int32_t n_slots, int64_t k, int64_t m);
/* out[i, :] (+)= dequant(table row ids[i]), table: rows of dim elements. */
int orch_get_rows(orch_ctx *ctx, float *out, const void *table, int32_t ttype, const int32_t *ids, int64_t n,
                  int64_t dim, int32_t accumulate);
/* Session 14 (optional; ABI version unchanged): orch_get_rows(x_out, table, ttype, ids, n, dim, 0) then
 * orch_rmsnorm(h_out, x_out, NULL, w, n, dim, eps) in one launch (one CTA per row), both outputs bit-identical to
 * the two calls. x_out may be NULL (the gathered rows are not kept) or h_out (in place: only the normalised rows are
 * written); otherwise it must not overlap h_out. Neither output may overlap table, ids or w. ORCH_ERR_UNSUPPORTED
 * (nothing launched) where orch_get_rows declines, for dim > 8192 (orch_rmsnorm's looping kernel) and for an x_out
 * not 16-byte aligned. */
int orch_get_rows_rmsnorm(orch_ctx *ctx, float *x_out, float *h_out, const void *table, int32_t ttype,
                          const int32_t *ids, int64_t n, int64_t dim, const float *w, float eps);
/* Bytes of one row of k elements of type t (0 when k is not a multiple of
 * the block size or t is unknown). */
int64_t orch_row_bytes(int32_t t, int64_t k);
/* Several decode GEMVs with the same x in one launch (q, k and v of a layer;
 * session 3): for each of count (1..3) parts, parts[i].y[n, m_i] =
 * x[n, k] · W_i^T + bias_i (bias may be NULL; no accumulate). Each y is
 * bit-identical to orch_matmul of that part alone. Returns
 * ORCH_ERR_UNSUPPORTED (nothing launched) unless orch_matmul would run the
 * same fp16-decode GEMV (v5, or the tensor-core v7 with x staged once) for
 * every part: n <= 8, Q8_0/Q4_0/MXFP4, ...; the caller then launches the
 * parts separately. No y may overlap x, a
 * weight, a bias or another y.
 * Session 4: with GEMV v9 routed (ORCH_CUDA_GEMV unset or v9, ORCH_CUDA_GEMM
 * not v1) it also takes 9 <= n <= 64 (Q8_0/Q4_0/MXFP4, m * row bytes a
 * multiple of 4), count 1 included — the decode GEMV for several streams,
 * which orch_matmul (n > 8: GEMM) does not run; each y is then bit-identical
 * to a count-1 call. */
typedef struct {
  const void *w;
  const float *bias;
  float *y;
  int64_t m;
} orch_gemv_part;
int orch_matmul_multi(orch_ctx *ctx, const float *x, int32_t wtype, int64_t n, int64_t k, int32_t count,
                      const orch_gemv_part *parts);
/* (session 6) gate_up[0] = gate, [1] = up (same m): writes their GEMVs to
 * gate_up[i].y exactly as orch_matmul_multi would, and out = silu(gate) * up
 * exactly as orch_swiglu (out may alias either y). ORCH_ERR_UNSUPPORTED
 * (nothing launched) unless both run the v5 GEMV (n = 1, 2), or with
 * ORCH_CUDA_GLU=0: the caller then runs the three ops. */
int orch_matmul_swiglu(orch_ctx *ctx, const float *x, int32_t wtype, int64_t n, int64_t k,
                       const orch_gemv_part *gate_up, float *out);
/* (session 8) The RMSNorm between two decode GEMVs folded into them (ORCH_CUDA_NORM_FOLD; gemv16.cuh gemv5_nf):
 * orch_matmul_addnorm is orch_matmul (accumulate 0; m = the norm's dim) that also does, per token j and row r,
 * res[j*m+r] += y[j*m+r], xt[j*m+r] = res[j*m+r] * nw[r], and writes ss[j * nss + b] = the sum of res^2 over the
 * rows of its block b (nss = m / 8 blocks: fixed slots, deterministic; ss 16-byte aligned). The consumers are
 * orch_matmul_multi / orch_matmul_swiglu on x = xt with every GEMV output (before its bias) scaled by
 * rsqrt(sum_b ss[j * nss + b] / k + eps): the GEMVs of RMSNorm(res) * nw up to rounding (res itself is
 * bit-identical to orch_rmsnorm's). ORCH_ERR_UNSUPPORTED (nothing launched) unless the v5 GEMV (n = 1, 2) or the
 * v7 GEMV (n = 3..8) runs, m % 32 == 0 and nss = m / 8 <= 1024 (swiglu_nf: v5 only). */
int orch_matmul_addnorm(orch_ctx *ctx, float *y, const float *x, const void *w, int32_t wtype, const float *bias,
                        int64_t n, int64_t k, int64_t m, float *res, const float *nw, float *xt, float *ss);
/* (session 16, optional) orch_matmul_addnorm that also asks for the first rows the v5 GEMV of the next weight
 * (pf_w: pf_m rows of pf_k elements of type pf_wtype, the first consumer's) will read to be prefetched into L2 while
 * its kernel waits for its input: for a producer launched right after a kernel that leaves DRAM idle (the decode
 * attention). How much: ORCH_CUDA_L2PF ("MB" or "MB,last"; default 8,last; 0: nothing). A hint: the results are
 * orch_matmul_addnorm's, bit for bit. */
int orch_matmul_addnorm_pf(orch_ctx *ctx, float *y, const float *x, const void *w, int32_t wtype, const float *bias,
                           int64_t n, int64_t k, int64_t m, float *res, const float *nw, float *xt, float *ss,
                           const void *pf_w, int32_t pf_wtype, int64_t pf_m, int64_t pf_k);
int orch_matmul_multi_nf(orch_ctx *ctx, const float *x, int32_t wtype, int64_t n, int64_t k, int32_t count,
                         const orch_gemv_part *parts, const float *ss, int64_t nss, float eps);
int orch_matmul_swiglu_nf(orch_ctx *ctx, const float *x, int32_t wtype, int64_t n, int64_t k,
                          const orch_gemv_part *gate_up, float *out, const float *ss, int64_t nss, float eps);
/* (session 6, timing aid) Syncs ctx's stream; copies up to cap records of
 * the GEMV trace (48 bytes each: u64 t0 CTA start, t1 after the PDL wait, t2
 * after x staging, t3 end (%globaltimer ns); u32 block, SM, 2 pad) to out,
 * *count = records since the last call (may exceed what is kept: 65536);
 * resets them; then traces (on != 0) or not the one-token Q8_0 v5 GEMVs
 * launched (or captured) from now on. */
int orch_gemv_trace(orch_ctx *ctx, int32_t on, void *out, int64_t cap, int64_t *count);

/* ---- norm.cu ----
 * If add != NULL: x += add (x is written back: the residual stream).
 * Then out = norm(x) * w (+ b). w, b may be NULL. out may alias x. */
int orch_rmsnorm(orch_ctx *ctx, float *out, float *x, const float *add, const float *w, int64_t n, int64_t dim,
                 float eps);
int orch_layernorm(orch_ctx *ctx, float *out, float *x, const float *add, const float *w, const float *b,
                   int64_t n, int64_t dim, float eps);

/* ---- act.cu ---- (elementwise; out may alias inputs) */
int orch_add(orch_ctx *ctx, float *out, const float *a, const float *b, int64_t n);
/* y[i, :] += bias for n rows of dim. */
int orch_add_bias(orch_ctx *ctx, float *y, const float *bias, int64_t n, int64_t dim);
int orch_scale(orch_ctx *ctx, float *out, const float *x, float s, int64_t n);
int orch_gelu(orch_ctx *ctx, float *out, const float *x, int64_t n); /* tanh form */
/* out = silu(gate) * up, rows of dim; gate/up/out have row strides in elements. */
int orch_swiglu(orch_ctx *ctx, float *out, const float *gate, const float *up, int64_t n, int64_t dim,
                int64_t gate_stride, int64_t up_stride);
/* gpt-oss: g = min(gate, limit); u = clamp(up, -limit, limit);
 * out = (u + 1) * g * sigmoid(alpha * g). */
int orch_swiglu_oai(orch_ctx *ctx, float *out, const float *gate, const float *up, int64_t n, int64_t dim,
                    int64_t gate_stride, int64_t up_stride, float alpha, float limit);

/* ---- rope.cu ----
 * In place on x: n_tok rows (row_stride elements apart) of n_heads heads of
 * head_dim; the first rot_dim dims of each head rotate by
 * theta_i = pos * inv_freq[i] (i < rot_dim/2; inv_freq is a device array so
 * YaRN / llama3 / rope_freqs are computed on the host), cos and sin scaled by
 * attn_factor. neox != 0: pairs (i, i + rot_dim/2); else adjacent (2i, 2i+1). */
int orch_rope(orch_ctx *ctx, float *x, int64_t row_stride, int64_t n_tok, int32_t n_heads, int32_t head_dim,
              int32_t rot_dim, const int32_t *pos, const float *inv_freq, float attn_factor, int32_t neox);
/* orch_rope of x0 (n_heads0 heads, row_stride0) and of x1 (n_heads1,
 * row_stride1) with the same positions and parameters (q and k of a layer) in
 * one launch; results bit-identical to two orch_rope calls. x0 and x1 must not
 * overlap. (Session 3.) */
int orch_rope2(orch_ctx *ctx, float *x0, int64_t row_stride0, int32_t n_heads0, float *x1, int64_t row_stride1,
               int32_t n_heads1, int64_t n_tok, int32_t head_dim, int32_t rot_dim, const int32_t *pos,
               const float *inv_freq, float attn_factor, int32_t neox);
/* orch_rope2 of q (q_heads) and k (kv_heads) followed by orch_kv_write of
 * the rotated k and of v (kv_heads x head_dim per token, strides in floats)
 * into k_cache / v_cache at slots, in one launch; results bit-identical to
 * the two calls. q, k, v and the caches must not overlap. (Session 3.) */
int orch_rope_kv(orch_ctx *ctx, float *q, int64_t q_stride, int32_t q_heads, float *k, int64_t k_stride,
                 int32_t kv_heads, const float *v, int64_t v_stride, void *k_cache, void *v_cache, int32_t kv_dtype,
                 const int32_t *slots, int64_t n_tok, int32_t head_dim, int32_t rot_dim, const int32_t *pos,
                 const float *inv_freq, float attn_factor, int32_t neox);

/* ---- attention.cu ----
 * Paged KV cache: per layer, K and V are [n_slots, n_kv_heads, head_dim] of
 * kv_dtype; slot = block_tables[seq*max_blocks + pos/block_size]*block_size
 * + pos%block_size. */
int orch_kv_write(orch_ctx *ctx, void *k_cache, void *v_cache, int32_t kv_dtype, const float *k, const float *v,
                  int64_t k_stride, int64_t v_stride, const int32_t *slots, int64_t n_tok, int32_t n_kv_heads,
                  int32_t head_dim);

typedef struct {
  float *out;                  /* [n_tok, n_heads*head_dim] */
  const float *q;              /* n_tok rows, q_stride elements apart */
  const void *k_cache;
  const void *v_cache;
  const int32_t *tok_seq;      /* [n_tok] sequence index of each query token */
  const int32_t *tok_pos;      /* [n_tok] absolute position of each query token */
  const int32_t *block_tables; /* [n_seq, max_blocks] */
  const float *sinks;          /* [n_heads] or NULL */
  int64_t q_stride;
  int64_t n_tok;
  int32_t max_blocks;
  int32_t block_size;
  int32_t n_heads;
  int32_t n_kv_heads;
  int32_t head_dim; /* a multiple of 16 from 16 to 256 (else ORCH_ERR_UNSUPPORTED) */
  int32_t window;   /* >0: key kp visible iff qpos - kp < window */
  int32_t kv_dtype;
  float scale; /* usually 1/sqrt(head_dim) */
  /* Upper bound of tok_pos[t]+1 over the batch (sizes the split over keys of
   * the decode kernel; a captured graph may pass the context length); 0 =
   * unknown (no split). */
  int32_t max_pos;
} orch_attn_args;
/* Causal attention of each query token over keys 0..pos of its sequence
 * (already written to the cache), softmax with optional sinks (one extra
 * logit per head in the denominator only). */
int orch_attention(orch_ctx *ctx, const orch_attn_args *a);

/* (session 7, optional) RoPE of q and k + the KV write of the rotated k and v
 * folded into the decode attention launch: the result (out, k_cache,
 * v_cache) of orch_rope_kv(q, k, v, ...) followed by orch_attention(a),
 * bit-identical, in one launch (plus the split combine where the grid has
 * splits). a->q and k are the UNROTATED rows and stay unrotated (the kernel
 * rotates in registers; orch_rope_kv rotates them in place). slots[t] must
 * be the cache slot of (tok_seq[t], tok_pos[t]) per the block tables.
 * Returns ORCH_ERR_UNSUPPORTED (without recording an error, nothing
 * launched) for batches it does not fold (more than 8 tokens, head dims
 * other than 64/128); the caller then runs the two ops. */
typedef struct {
  const float *k;         /* n_tok rows of n_kv_heads*head_dim, k_stride apart (unrotated) */
  const float *v;         /* n_tok rows, v_stride apart */
  int64_t k_stride;
  int64_t v_stride;
  const int32_t *slots;   /* [n_tok] cache slot of each token */
  const float *inv_freq;  /* [rot_dim/2] (as orch_rope) */
  float attn_factor;      /* multiplies cos and sin */
  int32_t rot_dim;        /* rotated dims per head (even, <= head_dim) */
  int32_t neox;           /* 1: rotate halves (NeoX), 0: adjacent pairs (GPT-J) */
} orch_attn_rope_args;
int orch_attention_rope(orch_ctx *ctx, const orch_attn_args *a, const orch_attn_rope_args *r);

/* ---- moe.cu ----
 * Router: for each row of logits[n, n_exp], the top-k expert ids (largest
 * first; ties by lower index) and weights = softmax over the k selected. */
int orch_moe_topk(orch_ctx *ctx, int32_t *ids, float *weights, const float *logits, int64_t n, int32_t n_exp,
                  int32_t k);
/* out[t, :] (+)= sum_s w[t, s] * y[t*k + s, :]. */
int orch_moe_combine(orch_ctx *ctx, float *out, const float *y, const float *w, int64_t n, int32_t k, int64_t dim,
                     int32_t accumulate);
/* (ABI 3) Fused expert FFN after routing, two launches: for p = t*n_slots + s,
 * e = ids[p]: act[p, :] = swiglu_oai(x[t] . gate_e^T + gate_bias[e],
 * x[t] . up_e^T + up_bias[e]) (act: scratch of n*n_slots*ff floats), then
 * out[t, :] = sum_s weights[p] * (act[p] . down_e^T + down_bias[e]).
 * gate/up: [n_exp][ff rows of dim] of gu_type, down: [n_exp][dim rows of ff]
 * of down_type; biases may be NULL. out may alias x. Returns
 * ORCH_ERR_UNSUPPORTED (without recording an error) for types/shapes it does
 * not fuse or when ORCH_CUDA_MOE=v1; the caller then runs the unfused ops. */
int orch_moe_ffn(orch_ctx *ctx, float *out, const float *x, const int32_t *ids, const float *weights,
                 const void *gate, const void *up, int32_t gu_type, const float *gate_bias, const float *up_bias,
                 const void *down, int32_t down_type, const float *down_bias, float *act, int64_t n,
                 int32_t n_slots, int64_t dim, int64_t ff, float alpha, float limit);

/* (ABI 6) Routing + fused expert FFN for 2..64 tokens (MoE v9; v8 was
 * removed in session 5): orch_moe_topk over the router logits [n][n_exp]
 * (n_exp <= 32; ids / weights [n][n_slots] written as it writes them), then
 * expert-major tensor-core kernels (MXFP4) that read and decode each routed
 * expert once for all its tokens, then orch_moe_combine (fp32 sums, not v6's
 * bits). ybuf: scratch of n*n_slots*dim floats, 16-byte aligned. Other
 * operands and the result as orch_moe_ffn. Returns ORCH_ERR_UNSUPPORTED
 * (without recording an error) unless ORCH_CUDA_MOE=v9 (or unset and n >= 16),
 * for weights other than MXFP4, one token or more than 64, n_exp > 32,
 * gate/up and down of different types, an infinite limit (no fixed activation
 * scale), ybuf NULL, and what orch_moe_ffn declines; the caller then runs
 * orch_moe_topk and orch_moe_ffn / orch_moe_ffn_grouped. */
int orch_moe_ffn_route(orch_ctx *ctx, float *out, const float *x, const float *logits, int32_t n_exp, int32_t *ids,
                       float *weights, const void *gate, const void *up, int32_t gu_type, const float *gate_bias,
                       const float *up_bias, const void *down, int32_t down_type, const float *down_bias, float *act,
                       float *ybuf, int64_t n, int32_t n_slots, int64_t dim, int64_t ff, float alpha, float limit);

/* (ABI 7, session 5) The whole MoE op for 1..8 tokens, MoE v10 (three
 * launches): router logits x . router^T + router_bias (router: F32
 * [n_exp][dim], bias may be NULL) and the top-n_slots routing (ids / weights
 * [n][n_slots], as orch_moe_topk computes them from the logits), then the
 * fused expert FFN with orch_moe_ffn's result. Scratch: act n*n_slots*ff
 * floats, ybuf n*n_slots*dim floats, both 16-byte aligned. Returns
 * ORCH_ERR_UNSUPPORTED (without recording an error) unless ORCH_CUDA_MOE=v10
 * (or unset and n >= 2: the default for 2..8 tokens), for more than 8 tokens, a router that is not F32, n_exp > 32, gate/up and
 * down of different types, an infinite limit, and what orch_moe_ffn declines;
 * the caller then runs the router GEMV, orch_moe_topk and orch_moe_ffn. */
int orch_moe_decode(orch_ctx *ctx, float *out, const float *x, const void *router, int32_t router_type,
                    const float *router_bias, int32_t n_exp, int32_t *ids, float *weights, const void *gate,
                    const void *up, int32_t gu_type, const float *gate_bias, const float *up_bias, const void *down,
                    int32_t down_type, const float *down_bias, float *act, float *ybuf, int64_t n, int32_t n_slots,
                    int64_t dim, int64_t ff, float alpha, float limit);
/* (session 7) orch_moe_decode with the AddRMSNorm before it folded into its
 * route kernel: res[n][dim] += add (written back), x = RMSNorm(res) * norm_w
 * (written, bit-identical to orch_rmsnorm(x, res, add, norm_w)), then the MoE
 * op of x as orch_moe_decode (v10's kernels, also at one token). x, res and
 * add must not overlap. Declines (ORCH_ERR_UNSUPPORTED, nothing launched)
 * where orch_moe_decode would at n = 2, for dim > 4096, and when ORCH_CUDA_MOE
 * pins another version; the caller then runs orch_rmsnorm and the MoE op. */
int orch_moe_decode_norm(orch_ctx *ctx, float *out, float *x, float *res, const float *add, const float *norm_w,
                         float eps, const void *router, int32_t router_type, const float *router_bias, int32_t n_exp,
                         int32_t *ids, float *weights, const void *gate, const void *up, int32_t gu_type,
                         const float *gate_bias, const float *up_bias, const void *down, int32_t down_type,
                         const float *down_bias, float *act, float *ybuf, int64_t n, int32_t n_slots, int64_t dim,
                         int64_t ff, float alpha, float limit);
/* (session 8, optional) orch_moe_decode (res == NULL) or orch_moe_decode_norm (res, add, norm_w) under MoE v10
 * with the NEXT RMSNorm's producer half folded into the down kernel (the orch_matmul_addnorm contract for the
 * orch_matmul_multi_nf consumer): per token j and row r, res2[j*dim+r] += out[j*dim+r], xt[j*dim+r] = res2[j*dim+r] *
 * nw2[r], ss[j * (dim / 8) + b] = the sum of res2^2 over rows [8b, 8b + 8) (fixed order). out is written as by
 * orch_moe_decode. ORCH_ERR_UNSUPPORTED (nothing launched) where orch_moe_decode_norm would decline (v10 not
 * routed: 1..8 tokens, ORCH_CUDA_MOE unset or v10), dim % 8, dim / 8 > 1024, under ORCH_CUDA_MOE_ONLY. */
int orch_moe_decode_addnorm(orch_ctx *ctx, float *out, float *x, float *res, const float *add, const float *norm_w,
                            float eps, const void *router, int32_t router_type, const float *router_bias,
                            int32_t n_exp, int32_t *ids, float *weights, const void *gate, const void *up,
                            int32_t gu_type, const float *gate_bias, const float *up_bias, const void *down,
                            int32_t down_type, const float *down_bias, float *act, float *ybuf, int64_t n,
                            int32_t n_slots, int64_t dim, int64_t ff, float alpha, float limit, float *res2,
                            const float *nw2, float *xt, float *ss);
/* (session 10, optional) One token's attention output projection, the AddRMSNorm after it and the MoE of the norm's
 * output in three launches (no route kernel): the projection runs as orch_matmul_addnorm's producer (y[r] = ox .
 * ow[r] + obias[r] written (obias may be NULL), res[r] += y[r], x[r] = res[r] * norm_w[r] -- x holds xt, NOT the
 * normalized row), and its last CTA routes (logits = rsqrt(sum res^2 / dim + eps) * (router . x) + router_bias,
 * v10's top-k: ids / weights written) and stages x for v10's gate_up; then v10's gate_up and down. With res2, nw2, xt,
 * ss all non-NULL down also does orch_moe_decode_addnorm's next-norm producer half; all NULL: out written as
 * orch_moe_decode. ow: owtype (Q8_0 / Q4_0 / MXFP4) rows of ok elements, dim rows. n == 1 only. act / ybuf: as
 * orch_moe_decode (sizes n*n_slots*ff and n*n_slots*dim floats); act must also hold the n_exp * dim / 8 partial
 * logits, ybuf dim / 8 sums of squares after v10's staged x. ORCH_ERR_UNSUPPORTED (nothing launched) where
 * orch_moe_decode_addnorm would decline, for n != 1, where the projection would not run v5's one-token GEMV, or where
 * the scratch cannot hold the tail's partials, for unaligned pointers and under ORCH_CUDA_MOE_OPROJ=0 (read once);
 * the caller then runs the projection and orch_moe_decode_norm(_addnorm). */
int orch_moe_decode_oproj(orch_ctx *ctx, const float *ox, const void *ow, int32_t owtype, const float *obias,
                          int64_t ok, float *y, float *out, float *x, float *res, const float *norm_w, float eps,
                          const void *router, int32_t router_type, const float *router_bias, int32_t n_exp,
                          int32_t *ids, float *weights, const void *gate, const void *up, int32_t gu_type,
                          const float *gate_bias, const float *up_bias, const void *down, int32_t down_type,
                          const float *down_bias, float *act, float *ybuf, int64_t n, int32_t n_slots, int64_t dim,
                          int64_t ff, float alpha, float limit, float *res2, const float *nw2, float *xt, float *ss);
/* orch_moe_decode_oproj's operands in one struct (its 38 arguments are more than Go's purego passes: at most 32
 * integer ones on amd64); orch_moe_decode_oproj_args(ctx, a) makes exactly orch_moe_decode_oproj's call (optional
 * symbol). Field order is the Go mirror's (sdk/ml/cuda/lib.go oprojArgs): 24 pointers, 4 int64, 6 int32, 3 floats,
 * 1 pad = 264 bytes. */
typedef struct {
  const float *ox;
  const void *ow;
  const float *obias;
  float *y;
  float *out;
  float *x;
  float *res;
  const float *norm_w;
  const void *router;
  const float *router_bias;
  int32_t *ids;
  float *weights;
  const void *gate;
  const void *up;
  const float *gate_bias;
  const float *up_bias;
  const void *down;
  const float *down_bias;
  float *act;
  float *ybuf;
  float *res2;
  const float *nw2;
  float *xt;
  float *ss;
  int64_t ok, n, dim, ff;
  int32_t owtype, router_type, n_exp, gu_type, down_type, n_slots;
  float eps, alpha, limit;
  int32_t pad_;
} orch_moe_oproj_args;
int orch_moe_decode_oproj_args(orch_ctx *ctx, const orch_moe_oproj_args *a);
/* (session 12, optional) Repacks rows wtype (ORCH_T_MXFP4 or ORCH_T_Q8_0) rows of k elements (k % 32 == 0) at src
 * into dst (16-byte aligned): dst = the tensor + the 256-aligned size of its original rows (the layouts of
 * ORCH_T_MXFP4_DUAL and ORCH_T_Q8_0_DUAL). Asynchronous on the context's stream. */
int orch_weight_repack(orch_ctx *ctx, void *dst, const void *src, int32_t wtype, int64_t rows, int64_t k);

/* ---- qgemm.cu (ABI 4) ----
 * Tensor-core GEMM over raw GGUF weights: y[n, m] (+)= x[n, k] . W^T + bias,
 * same operands as orch_matmul. x is first rounded to bf16 into the caller's
 * scratch xbf16 (n*k*2 bytes, 16-byte aligned); W tiles are dequantized into
 * shared memory as bf16 (exact for MXFP4; Q8_0 / Q4_0 rounded as the cuBLAS
 * path does); sums are fp32. Handles Q8_0, Q4_0, MXFP4 with k % 32 == 0; any
 * n, m. tile: 0 = chosen by n; 1..5 = 16x32, 64x64, 64x128, 128x128, 96x128
 * (token rows x W rows per CTA); + 8 = the same with the unpipelined (two-barrier)
 * schedule; kept selectable for tests and timing. Returns
 * ORCH_ERR_UNSUPPORTED for other types/shapes: the caller uses orch_matmul. */
int orch_qgemm(orch_ctx *ctx, float *y, const float *x, const void *w, int32_t wtype, const float *bias,
               int64_t n, int64_t k, int64_t m, int32_t accumulate, void *xbf16, int32_t tile);
/* Ints of the route scratch orch_moe_ffn_grouped needs for n_pairs pairs. */
int64_t orch_moe_route_ints(int64_t n_pairs, int32_t n_exp);
/* Grouped MoE expert FFN after routing (same result as orch_moe_ffn up to
 * bf16 rounding): pairs p = t*n_slots + s are bucketed by expert ids[p] on
 * the device (no host sync: graph-capturable), their x rows gathered as bf16,
 * then per expert tile: act = swiglu_oai(x[t] . gate_e^T + gate_bias[e],
 * x[t] . up_e^T + up_bias[e]) (bf16), ybuf[p] = act . down_e^T +
 * down_bias[e], and out[t] = sum_s weights[p] * ybuf[p] (orch_moe_combine,
 * fixed order). Caller scratch (16-byte aligned), P = n*n_slots: xg P*dim*2
 * bytes, act P*ff*2 bytes, ybuf P*dim floats, route orch_moe_route_ints(P,
 * n_exp) ints. Types as orch_qgemm (gate and up one type); dim, ff % 32 == 0.
 * out may alias x. tile as orch_qgemm (0: chosen by pairs per expert), and
 * for MXFP4 also 17 / 19: the v3 kernel of moe_gemm.cuh with 96 / 64 pairs a
 * tile (what 0 picks for MXFP4 unless ORCH_CUDA_MOEGEMM=v1; session 5), and
 * 30: the v4 kernel of moe_wg.cuh (wgmma; sm_90a builds only, else
 * ORCH_ERR_UNSUPPORTED) with 256 pairs a tile (session 6), 32 the same with
 * the activations loaded by TMA (31 / 33 / 34 / 35 were deleted in session
 * 7 and are invalid); 36: hybrid, v4 (30) for the experts with >= 96
 * pairs and v3 (17) for the others (v3 alone where v4 is not built or the
 * route scratch cannot hold both tile lists: below ~175 tokens at top-4 of
 * 32); what 0 picks above 64 pairs per expert (ORCH_CUDA_MOEGEMM4_FROM)
 * with ORCH_CUDA_MOEGEMM=v4 (the default; v3's tile 17 from 17 to 64).
 * Returns ORCH_ERR_UNSUPPORTED for what it does not handle. */
int orch_moe_ffn_grouped(orch_ctx *ctx, float *out, const float *x, const int32_t *ids, const float *weights,
                         const void *gate, const void *up, int32_t gu_type, const float *gate_bias,
                         const float *up_bias, const void *down, int32_t down_type, const float *down_bias,
                         int64_t n, int32_t n_slots, int32_t n_exp, int64_t dim, int64_t ff, float alpha,
                         float limit, void *xg, void *act, float *ybuf, int32_t *route, int32_t tile);

/* ---- sample.cu ---- */
int orch_argmax(orch_ctx *ctx, int32_t *out, const float *logits, int64_t n, int64_t vocab);
/* Per-row sampling settings of orch_sample_rows (32 bytes; sdk/ml SampleParams packs them). */
typedef struct {
  float temperature; /* < 1e-5 (or NaN): greedy (argmax) */
  float top_p;       /* in (0, 1) keeps the smallest top set with at least this mass; else off */
  float min_p;       /* > 0 keeps p >= min_p * p_max */
  int32_t top_k;     /* in (0, vocab) keeps the k largest (ties at the k-th all kept); else off */
  uint64_t seed;     /* the request's seed */
  uint64_t counter;  /* the token's index in the request: the draw is a pure function of (logits, params) */
} orch_sample_params;
/* Session 8 (optional entry point; cuda/src/sample_rows.cuh): one token per row of logits [n, vocab] into out,
 * each row with its own params (DEVICE memory, n entries): greedy rows the argmax, the others an exact draw
 * from softmax(l / T) over the top-k / top-p / min-p set (Gumbel-max with counter-based noise; thresholds by
 * radix select). filters: 0 when no row samples with a filter (one launch per 64 rows), else 1 + the number
 * of threshold searches any row needs (0, 1 or 2: top-k and/or top-p): the launches are fixed by it, so a
 * captured graph replays any params with the same filters value. */
int orch_sample_rows(orch_ctx *ctx, int32_t *out, const float *logits, int64_t n, int64_t vocab,
                     const orch_sample_params *params, int32_t filters);
/* Session 11 (optional; the runner's decode steps launched ahead): the next step's inputs from this one's, on
 * the device. buf holds segments of seg values: segment 0's first n values = src's (the drawn tokens), and for each
 * bit s >= 1 of inc, segment s's first n values + 1 (positions, KV slots); params (NULL: none; n rows): each row
 * that draws (temperature >= 1e-5) gets counter + 1. n <= 65535; bit 0 of inc must be clear. */
int orch_step_advance(orch_ctx *ctx, int32_t *buf, int64_t seg, uint32_t inc, const int32_t *src,
                      orch_sample_params *params, int32_t n);
/* Session 14 (optional; ABI version unchanged, as for the other optional entries): as orch_memcpy_d2h_async of n
 * int32 values, written by a kernel (PDL-launched) instead of the copy engine. host_dst must come from
 * orch_host_alloc (mapped; the kernel writes through its cudaHostGetDevicePointer address). Record an event after
 * it and orch_event_sync before reading host_dst. */
int orch_read_i32_host(orch_ctx *ctx, int32_t *host_dst, const int32_t *src, int64_t n);

/* ---- comm.cu (ABI 5): tensor-parallel collectives through NCCL ----
 * libnccl is loaded at run time (dlopen) on first use: $ORCH_NCCL_LIB, then
 * "libnccl.so.2", then "libnccl.so" (LD_LIBRARY_PATH, ldconfig); NCCL >= 2.9.
 * Without it these entries return ORCH_ERR_UNSUPPORTED and orch_last_error
 * names every place looked at; the rest of the library is unaffected.
 * Before the first NCCL call the process gets NCCL_NVLS_ENABLE=0 unless it
 * already has that variable (NVLink multicast stays off).
 * One process per rank and device: ctx's device is the rank's GPU. */
/* ORCH_OK with the NCCL version code (X*10000 + Y*100 + Z, 22105 = 2.21.5)
 * when NCCL was found; ORCH_ERR_UNSUPPORTED otherwise. ctx may be NULL. */
int orch_comm_available(orch_ctx *ctx, int32_t *version);
/* Path (or soname) the NCCL library was loaded from. */
int orch_comm_library(char *buf, int64_t n);
/* The group's bootstrap id (ncclGetUniqueId, 128 bytes), made by rank 0 and
 * handed to every rank out of band. ctx may be NULL. */
int orch_comm_unique_id(orch_ctx *ctx, uint8_t out[128]);
/* Joins the group as rank of size on ctx's device (set first). Blocks until
 * every rank joined (ncclCommInitRank: no timeout; a rank that never calls
 * it blocks the others), then runs a warm-up all-reduce on ctx's stream and
 * waits for it (the group works; lazy connections are made outside graph
 * capture). Not while ctx's stream is being captured. */
int orch_comm_init(orch_ctx *ctx, const uint8_t id[128], int32_t rank, int32_t size, orch_comm **out);
/* In place: buf[0..n) = sum over ranks, enqueued on ctx's stream (captured
 * into a graph between orch_graph_begin and orch_graph_end). */
int orch_comm_allreduce_f32(orch_ctx *ctx, orch_comm *comm, float *buf, int64_t n);
/* ORCH_OK, or the error a collective of comm hit asynchronously (a peer died,
 * a transport failed); host-side check, does not wait for the GPU. */
int orch_comm_async_error(orch_comm *comm);
/* Abandons the group now (ncclCommAbort): collectives of comm in flight on
 * the GPU end (with undefined results) instead of waiting for a dead peer, so
 * a thread blocked in orch_sync returns. May be called from another thread,
 * but not concurrently with another call on comm. comm must still be freed
 * with orch_comm_destroy. */
int orch_comm_abort(orch_comm *comm);
/* Leaves the group and frees comm (aborts it instead when it holds an
 * asynchronous error, so that destroy cannot hang on a dead peer).
 * NCCL's destroy and abort both wait until every CUDA graph that recorded
 * collectives of comm was destroyed (orch_graph_destroy): destroy those
 * graphs first. */
int orch_comm_destroy(orch_comm *comm);

#ifdef __cplusplus
}
#endif
#endif /* ORCH_CUDA_H */
