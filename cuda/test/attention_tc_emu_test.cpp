// CPU emulation test of the tensor-core prefill attention kernel: compiles the
// kernel source itself (cuda/src/attention_tc.cuh) with g++ against the CUDA
// emulation of cuda_emu.h (a std::thread per CUDA thread, real barriers,
// WMMA as whole fp32 tiles, fp16 as _Float16) and checks it against a float64
// reference on paged caches with
// shuffled block tables, windows, sinks, GQA, F16 and F32 KV, and mixed
// batches (rows the kernel must not take stay untouched). The WMMA emulation
// also checks WMMA's preconditions (32-byte aligned pointers, ldm multiples,
// accesses inside the shared-memory buffer); AddressSanitizer checks the
// global-memory reads.
//
//   g++ -std=c++20 -O1 -g -pthread -fsanitize=address -Wno-unknown-pragmas -Icuda/include
//     -o /tmp/attn_tc_emu cuda/test/attention_tc_emu_test.cpp && /tmp/attn_tc_emu
//
// What it cannot show: timing, real bank conflicts, and the real fragment
// layouts (the kernel never depends on them: fragments only go through
// load/store/mma/fill, which is the documented contract).
#include <chrono>
#include <random>

#include "cuda_emu.h"
#define __shared__ // the kernel's shared memory is extern (dynamic): attn_tc::smem
#include "../src/attention_tc.cuh"
#undef __shared__
#include "../src/attention_fa.cuh"

// ---- the test ----
struct Seq {
  int hist, n; // cached positions before, new rows (queries) of this batch
};

// As attention_tc.cu launches it: head dim 64/128 attention_fa.cuh's kernel
// (mma.sync fragments in registers, ldmatrix, cp.async; two query heads per
// CTA where the group size is even, else one), the other head dims the WMMA
// kernel (O in registers, lazy rescale). (Session 7 deleted the v3 variant,
// O in shared memory, and the WMMA runs of head dim 64/128.)
template <typename KV, int HD>
static void run_case(const char *name, std::mt19937 &rng, std::vector<Seq> seqs, int nh, int nkv, int bs, int window,
                      bool sinks, float qmul = 1.f) {
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
  // Slots of positions no sequence has written hold NaN (as garbage could):
  // a kernel that reads one into its sums shows it.
  std::vector<KV> kc((size_t)nb * bs * slot_stride), vc(kc.size());
  std::vector<double> kd(kc.size(), NAN), vd(kc.size(), NAN); // exact values the cache holds
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
  const int64_t q_stride = (int64_t)nh * HD + 8; // not the packed stride: as a fused qkv row
  std::vector<float> q(n_tok * q_stride), out(n_tok * nh * HD, NAN), sk(nh);
  for (auto &x : q) x = qmul * nd(rng);
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

  using namespace attn_tc;
  const bool two = (nh / nkv) % 2 == 0;
  if constexpr (HD == 64 || HD == 128) {
    if (two)
      emu_launch(dim3{(unsigned)((n_tok + attn_fa::FA_BQ - 1) / attn_fa::FA_BQ), (unsigned)nh / 2, 1},
                 2 * attn_fa::FA_THREADS, attn_fa::Fa11Smem<HD>::BYTES,
                 [&] { attn_fa::attn_fa11_kernel<KV, HD, 2>(a); });
    else
      emu_launch(dim3{(unsigned)((n_tok + attn_fa::FA_BQ - 1) / attn_fa::FA_BQ), (unsigned)nh, 1},
                 attn_fa::FA_THREADS, attn_fa::Fa11Smem<HD>::BYTES, [&] { attn_fa::attn_fa11_kernel<KV, HD, 1>(a); });
  } else {
    emu_launch(dim3{(unsigned)((n_tok + TC_BQ - 1) / TC_BQ), (unsigned)nh, 1}, TC_WARPS * 32, TcLayout<HD>::BYTES,
               [&] { attn_tc_kernel<KV, HD>(a); });
  }

  // Which rows the kernel must take (same rule, computed on the host).
  int taken = 0;
  double num = 0, den = 0, worst = 0;
  for (int64_t t = 0; t < n_tok; t++) {
    const int64_t t0 = t - t % ATTN_TC_ROWS;
    int run = 0;
    while (run < ATTN_TC_ROWS && attn_tc_row_ok(tseq.data(), tpos.data(), n_tok, t0, t0 + run)) run++;
    const bool take = attn_tc_takes(run, (int)(t - t0));
    taken += take;
    const int s = tseq[t], qp = tpos[t];
    for (int h = 0; h < nh; h++) {
      const float *o = &out[(t * nh + h) * HD];
      if (!take) {
        for (int d = 0; d < HD; d++) CHECK(std::isnan(o[d]), "%s: row %ld head %d written but not taken", name, (long)t, h);
        continue;
      }
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
      num += rn;
      den += rd;
      worst = std::max(worst, std::sqrt(rn / std::max(rd, 1e-30)));
    }
  }
  const double rel = std::sqrt(num / std::max(den, 1e-30));
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t_start).count();
  std::printf("%-44s %s rows %3ld taken %3d  rel err %.2e  worst row %.2e  (%.1f s)\n", name,
              HD == 64 || HD == 128 ? (two ? "mma.sync x2" : "mma.sync x1") : "WMMA",
              (long)n_tok, taken, rel, worst, secs);
  // fp16 rounding of q, K/V (F32 cache) and P: ~1e-3; a wrong index is O(1).
  CHECK(rel < 3e-3 && worst < 1e-2, "%s: error too large", name);
}

int main() {
  std::mt19937 rng(12345);
  // One prefill chunk after a history: 150 rows = tiles of 64, 64, 22.
  run_case<__half, 64>("hd64 f16 gqa sinks hist37 n150 bs7", rng, {{37, 150}}, 4, 2, 7, 0, true);
  run_case<float, 64>("hd64 f32 gqa window20 n150", rng, {{5, 150}}, 4, 1, 16, 20, false);
  run_case<float, 112>("hd112 f32 gqa window20 n70", rng, {{5, 70}}, 4, 2, 16, 20, true);
  // Mixed batch: a decode row, a chunk of 100, a decode row, a chunk of 30:
  // tile 0 (run 1) and tile 2 (run 4) are not taken; tile 1 takes 37 rows.
  run_case<float, 128>("hd128 f32 mixed window16 sinks", rng, {{5, 1}, {0, 100}, {50, 1}, {10, 30}}, 2, 2, 5, 16,
                       true);
  run_case<__half, 16>("hd16 f16 mixed", rng, {{0, 70}, {3, 1}, {0, 20}}, 4, 2, 16, 0, true);
  run_case<float, 32>("hd32 f32 window8 (gpt-oss-tiny-swa like)", rng, {{0, 40}}, 4, 2, 16, 8, true);
  run_case<__half, 80>("hd80 f16 window 130 long history", rng, {{300, 64}}, 2, 1, 16, 130, false);
  run_case<float, 96>("hd96 f32 mha", rng, {{0, 16}, {0, 15}}, 3, 3, 4, 0, false);
  // Large, growing scores (q scaled up): the running max moves by more than
  // e^8 over the keys, so v4's lazy rescale path runs, not just its first tile.
  run_case<float, 80>("hd80 f32 long n200 big scores", rng, {{100, 200}}, 2, 1, 16, 0, true, 12.f);
  run_case<__half, 128>("hd128 f16 window 70 big scores", rng, {{0, 130}}, 2, 2, 16, 70, false, 12.f);
  // gpt-oss's layer shapes (window 128, sinks, GQA 8:1) over several key
  // tiles: a 64-row tile whose window starts mid-tile, whole tiles, the
  // causal diagonal; the double-buffered staging across 4+ key tiles.
  run_case<__half, 64>("hd64 f16 gqa8 window128 sinks hist200 n70", rng, {{200, 70}}, 8, 1, 16, 128, true);
  run_case<__half, 64>("hd64 f16 full sinks hist130 n64", rng, {{130, 64}}, 2, 1, 16, 0, true);
  run_case<__half, 128>("hd128 f16 gqa4 hist90 n100 mixed", rng, {{90, 100}, {7, 1}}, 4, 1, 16, 0, false);
  std::printf("attention_tc_emu_test: ok\n");
  return 0;
}
