// CPU emulation test of every attention path as attention.cu launches it,
// compiled from the kernel sources themselves (cuda/src/attention_kernels.cuh,
// attention_tc.cuh, attention_fa.cuh) against cuda/test/cuda_emu.h:
//  - rows of prefill tiles (>= 16 consecutive rows of one sequence): head dim
//    64/128 attn_fa11_kernel (two query heads per CTA where the group size is
//    even, else one), the other head dims up to 128 attn_tc_kernel (WMMA);
//  - every other row: the depth-adaptive decode kernels with tc_skip:
//    attn_gd7_kernel (grouped, 1/2/4/8 heads per CTA, PDL; head dim 64/128)
//    or attn2 with the adaptive split, and attn_combine6 where the grid has
//    splits; the grid's splits are sized for a long context while the rows
//    are short (a captured graph's condition).
// Every supported head dim (16 .. 256), F32 and F16 KV, decode rows at
// several depths and a mixed batch (prefill chunk, decode row, short chunk),
// windows and sinks, GQA 8/6/4/2 and MHA, shuffled block tables; the slots of
// unwritten positions hold NaN, outputs start as NaN, so a missed or
// double-covered row, a read past a sequence or a mask bug shows. Reference:
// float64 on the values the cache holds. AddressSanitizer checks the global
// reads and writes. (Session 7 deleted the opt-in versions v1..v8, v11 and
// their cases: this file took ~8 min of CI.)
//
//   g++ -std=c++20 -O1 -g -pthread -fsanitize=address -Wno-unknown-pragmas -Icuda/include
//     -o /tmp/attn_emu cuda/test/attention_emu_test.cpp && /tmp/attn_emu
#include <chrono>
#include <random>

#include "cuda_emu.h"

#define __shared__ // extern dynamic shared memory: attn_tc::smem
#include "../src/attention_tc.cuh"
#undef __shared__
#include "../src/attention_fa.cuh"
// common.cuh's PDL hooks (the kernel header is included after common.cuh on
// the device): the emulation checks that a PDL-launched kernel waits in every
// thread (emu_launch_pdl).
inline void pdl_wait() { emu_pdl_wait(); }
inline void pdl_trigger() {}
// rope.cuh's explicit roundings (cuda_emu.h has no math intrinsics beyond __expf).
inline float __fmaf_rn(float a, float b, float c) { return std::fma(a, b, c); }
inline float __fmul_rn(float a, float b) { return a * b; }
inline int __popc(unsigned x) { return __builtin_popcount(x); }
#define ROPE_KERNELS // rope_kv_kernel: the two-launch reference of the folded RoPE + KV write
#include "../src/rope.cuh"
// attn_gdr_kernel's copies before pdl_wait (ORCH_CUDA_ATTN_KV0): none may read a cache slot this step writes.
struct PreWaitGuard {
  const char *kc = nullptr, *vc = nullptr; // the caches of the folded run (null: unchecked)
  int64_t row_bytes = 0;                   // a slot's bytes (every kv head)
  std::vector<int32_t> slots;              // the slots the step writes
  long reads = 0;                          // 16-byte copies seen
} g_pre_wait;
inline void attn_emu_pre_wait_read(const void *src, int bytes) {
  if (!g_pre_wait.kc) return;
  g_pre_wait.reads++;
  CHECK(!g_cur->pdl_waited, "kv0 copy after pdl_wait");
  const char *p = (const char *)src;
  for (const char *c : {g_pre_wait.kc, g_pre_wait.vc})
    for (int32_t sl : g_pre_wait.slots) {
      const char *s0 = c + sl * g_pre_wait.row_bytes;
      CHECK(p + bytes <= s0 || p >= s0 + g_pre_wait.row_bytes, "kv0: slot %d (written this step) read before pdl_wait",
            sl);
    }
}
#define ATTN_EMU_PRE_WAIT_READ(src, bytes) attn_emu_pre_wait_read(src, bytes)
#define __shared__ static // static __shared__ arrays: one CTA at a time
#include "../src/attention_kernels.cuh"
#undef __shared__

struct Seq {
  int hist, n; // cached positions before, new rows (queries) of this batch
};

template <typename KV, int HD>
static void run_case(const char *name, std::mt19937 &rng, std::vector<Seq> seqs, int nh, int nkv, int bs, int window,
                     bool sinks, int splits, int row_ctas = 0, int gc = 0) {
  const auto t_start = std::chrono::steady_clock::now();
  std::normal_distribution<float> nd(0.f, 1.f);
  int max_len = 0;
  for (auto &s : seqs) max_len = max(max_len, s.hist + s.n);
  const int max_blocks = (max_len + bs - 1) / bs, nseq = (int)seqs.size();
  const int nb = max_blocks * nseq + 3;
  std::vector<int32_t> perm(nb);
  for (int i = 0; i < nb; i++) perm[i] = i;
  std::shuffle(perm.begin(), perm.end(), rng);
  std::vector<int32_t> blocks(perm.begin(), perm.begin() + max_blocks * nseq);
  const int64_t slot_stride = (int64_t)nkv * HD;
  std::vector<KV> kc((size_t)nb * bs * slot_stride), vc(kc.size());
  std::vector<double> kd(kc.size(), NAN), vd(kc.size(), NAN);
  std::vector<bool> written(kc.size());
  for (int s = 0; s < nseq; s++)
    for (int p = 0; p < seqs[s].hist + seqs[s].n; p++) {
      int64_t slot = (int64_t)blocks[s * max_blocks + p / bs] * bs + p % bs;
      for (int64_t j = 0; j < slot_stride; j++) written[slot * slot_stride + j] = true;
    }
  for (size_t i = 0; i < kc.size(); i++) {
    float k = written[i] ? nd(rng) : NAN, v = written[i] ? nd(rng) : NAN;
    if constexpr (sizeof(KV) == 2) {
      kc[i] = __float2half(k);
      vc[i] = __float2half(v);
      kd[i] = __half2float(kc[i]);
      vd[i] = __half2float(vc[i]);
    } else {
      kc[i] = k;
      vc[i] = v;
      kd[i] = k;
      vd[i] = v;
    }
  }
  std::vector<int32_t> tseq, tpos;
  for (int s = 0; s < nseq; s++)
    for (int p = seqs[s].hist; p < seqs[s].hist + seqs[s].n; p++) tseq.push_back(s), tpos.push_back(p);
  const int64_t n_tok = (int64_t)tseq.size();
  const int64_t q_stride = (int64_t)nh * HD + 16;
  std::vector<float> q(n_tok * q_stride), out(n_tok * nh * HD, NAN), sk(nh);
  for (auto &x : q) x = nd(rng);
  for (auto &x : sk) x = 2 * nd(rng);
  orch_attn_args a{};
  a.out = out.data();
  a.q = q.data();
  a.k_cache = kc.data();
  a.v_cache = vc.data();
  a.tok_seq = tseq.data();
  a.tok_pos = tpos.data();
  a.block_tables = blocks.data();
  a.sinks = sinks ? sk.data() : nullptr;
  a.q_stride = q_stride;
  a.n_tok = n_tok;
  a.max_blocks = max_blocks;
  a.block_size = bs;
  a.n_heads = nh;
  a.n_kv_heads = nkv;
  a.head_dim = HD;
  a.window = window;
  a.kv_dtype = sizeof(KV) == 2 ? ORCH_KV_F16 : ORCH_KV_F32;
  a.scale = 1.f / std::sqrt((float)HD);
  a.max_pos = max_len;

  // The launches of attention.cu's launch_attn / attention_tc.cu's attn_tc_launch.
  const int G = nh / nkv;
  const bool tc = n_tok >= ATTN_TC_MIN_RUN && HD <= 128;
  if (tc) {
    if constexpr (HD == 64 || HD == 128) {
      using namespace attn_fa;
      if (G % 2 == 0)
        emu_launch(dim3{(unsigned)((n_tok + FA_BQ - 1) / FA_BQ), (unsigned)nh / 2, 1}, 2 * FA_THREADS,
                   Fa11Smem<HD>::BYTES, [&] { attn_fa11_kernel<KV, HD, 2>(a); });
      else
        emu_launch(dim3{(unsigned)((n_tok + FA_BQ - 1) / FA_BQ), (unsigned)nh, 1}, FA_THREADS, Fa11Smem<HD>::BYTES,
                   [&] { attn_fa11_kernel<KV, HD, 1>(a); });
    } else {
      using namespace attn_tc;
      emu_launch(dim3{(unsigned)((n_tok + TC_BQ - 1) / TC_BQ), (unsigned)nh, 1}, TC_WARPS * 32, TcLayout<HD>::BYTES,
                 [&] { attn_tc_kernel<KV, HD>(a); });
    }
  }
  std::vector<float> part(splits > 1 ? n_tok * nh * splits * (HD + 2) : 0, NAN);
  // attention.cu launches min(n_tok, 256) row CTAs after the tensor-core
  // kernel (each takes a chunk of consecutive rows); row_ctas exercises
  // that at these small sizes (5 CTAs of 15 rows straddle the 64-row tiles).
  const unsigned grid_rows = row_ctas > 0 ? (unsigned)min<int64_t>(row_ctas, n_tok) : (unsigned)n_tok;
  if (HD == 64 || HD == 128) {
    // launch_attn_gd_any: gc heads per CTA (the host's choice unless the case pins one), PDL.
    if (gc == 0) gc = attn_gd_heads_per_cta(G, nh, grid_rows, splits, 256);
    CHECK(G % gc == 0, "%s: gc %d does not divide G %d", name, gc, G);
    emu_launch_pdl(dim3{(unsigned)(nh / gc), grid_rows, (unsigned)splits}, attn_k::ATTN_WARPS * 32, 0, [&] {
      if constexpr (HD == 64 || HD == 128) {
        using namespace attn_k;
        switch (gc) {
          case 1: attn_gd7_kernel<KV, HD, 1>(a, part.data(), splits, tc); break;
          case 2: attn_gd7_kernel<KV, HD, 2>(a, part.data(), splits, tc); break;
          case 4: attn_gd7_kernel<KV, HD, 4>(a, part.data(), splits, tc); break;
          default: attn_gd7_kernel<KV, HD, 8>(a, part.data(), splits, tc); break;
        }
      }
    });
  } else {
    emu_launch(dim3{(unsigned)nh, grid_rows, (unsigned)splits}, attn_k::ATTN_WARPS * 32, 0, [&] {
      attn_k::attn2_kernel<KV, HD>(a, part.data(), splits, tc, attn_k::ATTN_GD_GRAN);
    });
  }
  if (splits > 1)
    ((HD == 64 || HD == 128) ? emu_launch_pdl : emu_launch)(
        dim3{(unsigned)nh, (unsigned)n_tok, 1}, 32, 0,
        [&] { attn_k::attn_combine6_kernel<HD>(a, part.data(), splits, attn_k::ATTN_GD_GRAN, tc); });

  double num[2] = {0, 0}, den[2] = {0, 0}, worst[2] = {0, 0};
  int rows[2] = {0, 0};
  for (int64_t t = 0; t < n_tok; t++) {
    const int64_t t0 = t - t % ATTN_TC_ROWS;
    int run = 0;
    while (run < ATTN_TC_ROWS && attn_tc_row_ok(tseq.data(), tpos.data(), n_tok, t0, t0 + run)) run++;
    const int k = tc && attn_tc_takes(run, (int)(t - t0)) ? 1 : 0;
    rows[k]++;
    const int s = tseq[t], qp = tpos[t];
    for (int h = 0; h < nh; h++) {
      const float *o = &out[(t * nh + h) * HD];
      const int kvh = h / (nh / nkv);
      const int start = window > 0 ? max(0, qp - window + 1) : 0;
      std::vector<double> sc;
      double mx = sinks ? sk[h] : -INFINITY;
      for (int kp = start; kp <= qp; kp++) {
        int64_t slot = (int64_t)blocks[s * max_blocks + kp / bs] * bs + kp % bs;
        double d = 0;
        for (int e = 0; e < HD; e++) d += (double)q[t * q_stride + h * HD + e] * kd[slot * slot_stride + kvh * HD + e];
        d *= a.scale;
        sc.push_back(d);
        mx = std::max(mx, d);
      }
      double L = sinks ? std::exp(sk[h] - mx) : 0;
      std::vector<double> acc(HD, 0);
      for (int kp = start; kp <= qp; kp++) {
        int64_t slot = (int64_t)blocks[s * max_blocks + kp / bs] * bs + kp % bs;
        double p = std::exp(sc[kp - start] - mx);
        L += p;
        for (int e = 0; e < HD; e++) acc[e] += p * vd[slot * slot_stride + kvh * HD + e];
      }
      double rn = 0, rd = 0;
      for (int d = 0; d < HD; d++) {
        double ref = acc[d] / L;
        CHECK(std::isfinite(o[d]), "%s: row %ld head %d dim %d is %f", name, (long)t, h, d, o[d]);
        rn += (o[d] - ref) * (o[d] - ref);
        rd += ref * ref;
      }
      num[k] += rn;
      den[k] += rd;
      worst[k] = std::max(worst[k], std::sqrt(rn / std::max(rd, 1e-30)));
    }
  }
  const double tol[2] = {2e-6, 3e-3}, row_tol[2] = {1e-5, 1e-2};
  for (int k = 0; k < 2; k++) {
    if (!rows[k]) continue;
    const double rel = std::sqrt(num[k] / std::max(den[k], 1e-30));
    std::printf("%-38s hd %3d %s splits %3d: %-11s rows %3d rel err %.2e worst row %.2e (%.1f s)\n", name, HD,
                sizeof(KV) == 2 ? "f16" : "f32", splits, k ? "tensor-core" : "fp32", rows[k], rel, worst[k],
                std::chrono::duration<double>(std::chrono::steady_clock::now() - t_start).count());
    CHECK(rel < tol[k] && worst[k] < row_tol[k], "%s: error too large", name);
  }
}

// The folded RoPE + KV write (attn_gdr_kernel, orch_attention_rope) on
// decode batches (<= 8 rows) from unrotated q / k / v, against the two
// launches it replaces (rope_kv_kernel, then attn_gd7 + combine) on the same
// inputs: the output and both caches bit-identical (memcmp, the caches'
// untouched NaN slots included), q and k left unrotated, nothing NaN; with
// each kv0 mode (no copies before pdl_wait, the first key step's K rows, K
// and V rows), whose copies must not touch a slot the step writes (g_pre_wait).
// Rows of one sequence at consecutive positions (a multi-token step) need
// each other's new keys (staged in shared memory, across split boundaries).
template <typename KV, int HD>
static void rope_case(const char *name, std::mt19937 &rng, std::vector<Seq> seqs, int nh, int nkv, int bs, int window,
                      bool sinks, int splits, int rot, int neox, int gc = 0) {
  const auto t_start = std::chrono::steady_clock::now();
  std::normal_distribution<float> nd(0.f, 1.f);
  int max_len = 0;
  for (auto &s : seqs) max_len = max(max_len, s.hist + s.n);
  const int max_blocks = (max_len + bs - 1) / bs, nseq = (int)seqs.size();
  const int nb = max_blocks * nseq + 3;
  std::vector<int32_t> perm(nb);
  for (int i = 0; i < nb; i++) perm[i] = i;
  std::shuffle(perm.begin(), perm.end(), rng);
  std::vector<int32_t> blocks(perm.begin(), perm.begin() + max_blocks * nseq);
  const int64_t slot_stride = (int64_t)nkv * HD;
  auto slot_of = [&](int s, int p) { return (int64_t)blocks[s * max_blocks + p / bs] * bs + p % bs; };
  // Cached history (positions < hist) random, everything else NaN (the new positions are written by the op).
  std::vector<KV> kc0((size_t)nb * bs * slot_stride), vc0(kc0.size());
  for (size_t i = 0; i < kc0.size(); i++) kc0[i] = vc0[i] = KV(NAN);
  for (int s = 0; s < nseq; s++)
    for (int p = 0; p < seqs[s].hist; p++)
      for (int64_t j = 0; j < slot_stride; j++) {
        kc0[slot_of(s, p) * slot_stride + j] = KV(nd(rng));
        vc0[slot_of(s, p) * slot_stride + j] = KV(nd(rng));
      }
  std::vector<int32_t> tseq, tpos, tslot;
  for (int s = 0; s < nseq; s++)
    for (int p = seqs[s].hist; p < seqs[s].hist + seqs[s].n; p++)
      tseq.push_back(s), tpos.push_back(p), tslot.push_back((int32_t)slot_of(s, p));
  const int64_t n_tok = (int64_t)tseq.size();
  CHECK(n_tok <= attn_k::ATTN_ROPE_MAX_TOK, "%s: %ld rows", name, (long)n_tok);
  // q, k, v as one fused GEMV output row each: [q | k | v], strides past the packed sizes.
  const int64_t q_stride = (int64_t)nh * HD + 2 * slot_stride + 8;
  std::vector<float> qkv(n_tok * q_stride), sk(nh), inv(rot / 2);
  for (auto &x : qkv) x = nd(rng);
  for (auto &x : sk) x = 2 * nd(rng);
  for (int i = 0; i < rot / 2; i++) inv[i] = std::pow(10000.f, -2.f * i / rot) * (1.f + 0.1f * nd(rng));
  const float attn_factor = 1.1f;
  orch_attn_args a{};
  a.tok_seq = tseq.data();
  a.tok_pos = tpos.data();
  a.block_tables = blocks.data();
  a.sinks = sinks ? sk.data() : nullptr;
  a.q_stride = q_stride;
  a.n_tok = n_tok;
  a.max_blocks = max_blocks;
  a.block_size = bs;
  a.n_heads = nh;
  a.n_kv_heads = nkv;
  a.head_dim = HD;
  a.window = window;
  a.kv_dtype = sizeof(KV) == 2 ? ORCH_KV_F16 : ORCH_KV_F32;
  a.scale = 1.f / std::sqrt((float)HD);
  a.max_pos = max_len;
  const int G = nh / nkv;
  if (gc == 0) gc = attn_gd_heads_per_cta(G, nh, n_tok, splits, 256);
  CHECK(G % gc == 0, "%s: gc %d does not divide G %d", name, gc, G);
  auto gd = [&](auto kern) { // grid of attn_gd7: heads / gc, rows, splits
    emu_launch_pdl(dim3{(unsigned)(nh / gc), (unsigned)n_tok, (unsigned)splits}, attn_k::ATTN_WARPS * 32, 0, kern);
  };
  auto combine = [&](std::vector<float> &part) {
    if (splits > 1)
      emu_launch_pdl(dim3{(unsigned)nh, (unsigned)n_tok, 1}, 32, 0,
                     [&] { attn_k::attn_combine6_kernel<HD>(a, part.data(), splits, attn_k::ATTN_GD_GRAN, 0); });
  };
  // A: orch_rope_kv, then orch_attention (the grouped decode kernel).
  std::vector<float> qa = qkv, outa(n_tok * nh * HD, NAN), parta(n_tok * nh * splits * (HD + 2), NAN);
  std::vector<KV> kca = kc0, vca = vc0;
  {
    const rope_set qs{qa.data(), q_stride, nh}, ks{qa.data() + (int64_t)nh * HD, q_stride, nkv};
    const float *v = qa.data() + (int64_t)nh * HD + slot_stride;
    const int64_t total = n_tok * ((int64_t)nh * (rot / 2) + (int64_t)nkv * (rot / 2) + (int64_t)nkv * (HD - rot) +
                                   slot_stride);
    emu_launch_pdl(dim3{(unsigned)((total + 255) / 256), 1, 1}, 256, 0, [&] {
      rope_kv_kernel<KV>(qs, ks, v, q_stride, kca.data(), vca.data(), tslot.data(), n_tok, HD, rot, tpos.data(),
                         inv.data(), attn_factor, neox);
    });
    a.q = qa.data(), a.out = outa.data(), a.k_cache = kca.data(), a.v_cache = vca.data();
    gd([&] {
      using namespace attn_k;
      switch (gc) {
        case 1: attn_gd7_kernel<KV, HD, 1>(a, parta.data(), splits, 0); break;
        case 2: attn_gd7_kernel<KV, HD, 2>(a, parta.data(), splits, 0); break;
        case 4: attn_gd7_kernel<KV, HD, 4>(a, parta.data(), splits, 0); break;
        default: attn_gd7_kernel<KV, HD, 8>(a, parta.data(), splits, 0); break;
      }
    });
    combine(parta);
  }
  // B: orch_attention_rope from the unrotated rows; kv0 0 (no copies before the wait), 1 (K rows), 2 (K and V).
  long copies[3] = {};
  for (int kv0 = 0; kv0 < 3; kv0++) {
    std::vector<float> qb = qkv, outb(outa.size(), NAN), partb(parta.size(), NAN);
    std::vector<KV> kcb = kc0, vcb = vc0;
    {
      g_pre_wait.kc = (const char *)kcb.data(), g_pre_wait.vc = (const char *)vcb.data();
      g_pre_wait.row_bytes = slot_stride * (int64_t)sizeof(KV);
      g_pre_wait.slots = tslot;
      g_pre_wait.reads = 0;
      a.q = qb.data(), a.out = outb.data(), a.k_cache = kcb.data(), a.v_cache = vcb.data();
      orch_attn_rope_args r{};
      r.k = qb.data() + (int64_t)nh * HD;
      r.v = qb.data() + (int64_t)nh * HD + slot_stride;
      r.k_stride = r.v_stride = q_stride;
      r.slots = tslot.data();
      r.inv_freq = inv.data();
      r.attn_factor = attn_factor;
      r.rot_dim = rot;
      r.neox = neox;
      const size_t smem = (size_t)attn_k::attn_kv0_bytes(HD, (int)sizeof(KV), kv0);
      emu_launch_pdl(dim3{(unsigned)(nh / gc), (unsigned)n_tok, (unsigned)splits}, attn_k::ATTN_WARPS * 32, smem, [&] {
        using namespace attn_k;
        switch (gc) {
          case 1: attn_gdr_kernel<KV, HD, 1>(a, r, partb.data(), splits, 1, kv0); break;
          case 2: attn_gdr_kernel<KV, HD, 2>(a, r, partb.data(), splits, 1, kv0); break;
          case 4: attn_gdr_kernel<KV, HD, 4>(a, r, partb.data(), splits, 1, kv0); break;
          default: attn_gdr_kernel<KV, HD, 8>(a, r, partb.data(), splits, 1, kv0); break;
        }
      });
      copies[kv0] = g_pre_wait.reads;
      g_pre_wait.kc = g_pre_wait.vc = nullptr;
      combine(partb);
    }
    for (float x : outb) CHECK(std::isfinite(x), "%s: output not finite", name);
    CHECK(std::memcmp(outa.data(), outb.data(), outa.size() * sizeof(float)) == 0, "%s: output differs", name);
    CHECK(std::memcmp(kca.data(), kcb.data(), kca.size() * sizeof(KV)) == 0, "%s: k cache differs", name);
    CHECK(std::memcmp(vca.data(), vcb.data(), vca.size() * sizeof(KV)) == 0, "%s: v cache differs", name);
    CHECK(std::memcmp(qkv.data(), qb.data(), qkv.size() * sizeof(float)) == 0, "%s: q/k/v were modified", name);
    CHECK(std::memcmp(qkv.data(), qa.data(), qkv.size() * sizeof(float)) != 0, "%s: the reference rotated nothing",
          name);
  }
  // Every cached key of a first step was copied (16-byte pieces: K; K and V), none without kv0.
  CHECK(copies[0] == 0 && copies[1] > 0 && copies[2] == 2 * copies[1], "%s: kv0 copies %ld %ld %ld", name, copies[0],
        copies[1], copies[2]);
  std::printf("%-38s hd %3d %s splits %3d gc %d rot %3d %s rows %ld: folded (kv0 0/1/2: %ld/%ld 16-byte copies) == "
              "rope_kv + attention (bits) (%.1f s)\n",
              name, HD, sizeof(KV) == 2 ? "f16" : "f32", splits, gc, rot, neox ? "neox" : "gptj", (long)n_tok,
              copies[1], copies[2], std::chrono::duration<double>(std::chrono::steady_clock::now() - t_start).count());
}

// full: every case (head dim 64 F16, 128 F32); else three (the other two configs).
template <typename KV, int HD>
static void rope_cases(std::mt19937 &rng, bool full) {
  // gpt-oss-like decode (GQA 8, NeoX, sinks; full and window 128 layers), depths 1, 38, 300.
  const std::vector<Seq> decode = {{0, 1}, {37, 1}, {299, 1}};
  if (full) {
    // The host's grid for a context of 8320 (one decode row of 8 kv heads: 65 splits).
    const int s8k = attn_grid_splits(8, 8320, attn_k::ATTN_GD_GRAN, 4096, attn_k::ATTN_GD_MAX_SPLITS);
    rope_case<KV, HD>("rope gqa8 neox sinks grid 65", rng, decode, 8, 1, 16, 0, true, s8k, HD, 1);
  }
  rope_case<KV, HD>("rope gqa8 neox window128 grid 1", rng, decode, 8, 1, 16, 128, true, 1, HD, 1);
  // Llama-like (GQA 4, GPT-J pairs), odd block size; partial rotary (rot < head dim); MHA.
  rope_case<KV, HD>("rope gqa4 gptj gc2 grid 3 bs7", rng, decode, 8, 2, 7, 0, false, 3, HD, 0, 2);
  // Llama-3-8B's tg128 shape: GQA 4, one head per CTA, 64 and 200 keys in a grid of 2 (200: both splits used).
  rope_case<KV, HD>("rope llama gqa4 gc1 grid 2", rng, {{63, 1}, {199, 1}}, 8, 2, 16, 0, false, 2, HD, 0, 1);
  if (!full) return;
  rope_case<KV, HD>("rope gqa2 neox rot/2 gc1 grid 2", rng, decode, 4, 2, 16, 0, true, 2, HD / 2, 1, 1);
  rope_case<KV, HD>("rope mha gptj rot/4 window16", rng, decode, 2, 2, 16, 16, false, 4, HD / 4, 0);
  // Multi-token rows of one sequence: positions 126..129 straddle the 128-key split boundary (grid 3: 128 keys
  // per split), next to a 2-token row of another sequence; 8 rows, window 3 over 5 new rows.
  rope_case<KV, HD>("rope multi-token gqa8 grid 3", rng, {{126, 4}, {5, 2}}, 8, 1, 16, 0, true, 3, HD, 1, 8);
  rope_case<KV, HD>("rope multi-token gqa4 gc4 window3", rng, {{20, 5}, {0, 1}, {300, 2}}, 8, 2, 5, 3, true, 2, HD,
                    0, 4);
}

// The depth-adaptive decode: the grid is sized for a long context (graph
// capture: Batch.MaxPos = context length) while the rows are short, long,
// or of very different lengths in one batch; every heads-per-CTA instance;
// and mixed batches with tensor-core tiles. `full`: every case; else the
// core ones (each head dim runs those).
template <typename KV, int HD>
static void cases(std::mt19937 &rng, bool full) {
  // Depths 1, 38, 129 (one split + a 1-key tail), 300, 700 in one batch.
  const std::vector<Seq> decode = {{0, 1}, {37, 1}, {128, 1}, {299, 1}, {699, 1}};
  // A 66-row chunk (tile 0 is the tensor-core kernel's, rows 64-65 are not),
  // a decode row, a 5-row chunk, a deep decode row.
  const std::vector<Seq> mixed = {{3, 66}, {9, 1}, {0, 5}, {700, 1}};
  // The host's grid for a context of 8320 and of 131072 positions, one
  // decode token of gpt-oss's 8 kv heads: 65 and 128 splits.
  const int s8k = attn_grid_splits(8, 8320, attn_k::ATTN_GD_GRAN, 4096, attn_k::ATTN_GD_MAX_SPLITS);
  const int s128k = attn_grid_splits(8, 131072, attn_k::ATTN_GD_GRAN, 4096, attn_k::ATTN_GD_MAX_SPLITS);
  CHECK(s8k == 65 && s128k == 128, "grid splits %d %d", s8k, s128k);
  // (attn2 for head dims other than 64/128: a CTA per head, 8x the emulation time of the grouped kernel)
  if (HD == 64 || HD == 128 || (full && HD == 80))
    run_case<KV, HD>("decode gqa8 sinks, grid 65", rng, decode, 8, 1, 16, 0, true, s8k);
  run_case<KV, HD>("decode gqa4 window16 gc4 grid 7 bs7", rng, decode, 8, 2, 7, 16, false, 7, 0, 4);
  // Mixed batches: 4 heads in the full runs of the grouped kernel, else 2 (CI time: a CTA per head and row).
  const int nhm = full && (HD == 64 || HD == 128) ? 4 : 2;
  run_case<KV, HD>("mixed gqa sinks grid 6 bs5", rng, mixed, nhm, 1, 5, 0, true, HD > 128 ? 3 : 6);
  run_case<KV, HD>("mixed gqa3 window9, 5 row CTAs grid 3", rng, mixed, 3, 1, 16, 9, true, 3, 5);
  if (!full) return;
  if (HD == 64 || HD == 128)
    run_case<KV, HD>("decode gqa8 sinks, grid 128", rng, decode, 8, 1, 16, 0, true, s128k, 0, 8);
  run_case<KV, HD>("decode gqa8 window128, grid 1", rng, decode, 8, 1, 16, 128, true, 1);
  run_case<KV, HD>("decode gqa8 window128 gc2 grid 3", rng, decode, 8, 1, 16, 128, true, 3, 0, 2);
  run_case<KV, HD>("decode gqa4 gc1 grid 5", rng, decode, 8, 2, 16, 0, false, 5, 0, 1);
  run_case<KV, HD>("decode mha sinks grid 13", rng, decode, 2, 2, 16, 0, true, 13);
  run_case<KV, HD>("decode gqa6 gc2 grid 2", rng, decode, 6, 1, 16, 0, true, 2, 0, 2);
  run_case<KV, HD>("mixed gqa2 window9 grid 3", rng, mixed, 4, 2, 16, 9, true, 3);
  run_case<KV, HD>("mixed gqa, 5 row CTAs grid 4", rng, mixed, nhm, 1, 16, 0, true, 4, 5);
}

int main(int argc, char **argv) {
  std::setvbuf(stdout, nullptr, _IOLBF, 0);
  std::mt19937 rng(777);
  rope_cases<__half, 64>(rng, true);
  rope_cases<float, 128>(rng, true);
  rope_cases<float, 64>(rng, false);
  rope_cases<__half, 128>(rng, false);
  if (argc > 1 && std::strcmp(argv[1], "rope") == 0) { // `attention_emu_test rope`: only the folded RoPE cases
    std::printf("attention_emu_test rope: ok\n");
    return 0;
  }
  cases<float, 16>(rng, true);
  cases<__half, 32>(rng, false);
  cases<float, 48>(rng, false);
  cases<__half, 64>(rng, true);
  cases<__half, 80>(rng, true);
  cases<float, 96>(rng, false);
  cases<float, 128>(rng, true);
  cases<__half, 256>(rng, false);
  std::printf("attention_emu_test: ok\n");
  return 0;
}
