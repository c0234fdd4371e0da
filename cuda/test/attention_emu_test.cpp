// CPU emulation test of every attention path as attention.cu launches it,
// compiled from the kernel sources themselves (cuda/src/attention_kernels.cuh,
// attention_tc.cuh) against cuda/test/cuda_emu.h:
//   v1: attn_kernel;
//   v2: attn2_kernel (splits 1: direct output; splits > 1: + attn_combine;
//       fewer row CTAs than rows: each walks rows y, y + gridDim.y, ...);
//   v3, v4: attn_tc_kernel (O in shared memory / in registers) for the tiles
//       it takes, then v2 with tc_skip for the other rows;
//   v5: v4, with attn_gq_kernel (GQA-grouped flash-decoding) instead of v2
//       where it has an instance (head dim 64/128, group 1/2/4/8).
//   v6: v4's tensor-core part, then the depth-adaptive decode kernels for
//       the other rows: attn_gd_kernel (grouped, 1/2/4/8 heads per CTA; head
//       dim 64/128) or attn2 with the adaptive split, and attn_combine6; the
//       grid's splits are sized for a long context while the rows are short
//       (a captured graph's condition).
//   v7: v6 with PDL and the tighter grouped kernel (attn_gd7_kernel);
//   v8: v7 in one launch (attn_gd8_kernel: heads spread over idle splits,
//       the last CTA of a row's head group merges), checked bit-identical to
//       v7 and with its tickets back at zero.
// `attention_emu_test v5` / `v6` / `v8` runs only the v5 / v6 / v8 cases (v6:
// all six configs; the full run has two of them).
// Every supported head dim (16 .. 256; v3's tensor-core part up to 128), F32
// and F16 KV, decode rows at several depths and a mixed batch (prefill chunk,
// decode row, short chunk), windows and sinks, shuffled block tables; the
// slots of unwritten positions hold NaN, outputs start as NaN, so a missed or
// double-covered row, a read past a sequence or a mask bug shows. Reference:
// float64 on the values the cache holds. AddressSanitizer checks the global
// reads and writes.
//
//   g++ -std=c++20 -O1 -g -pthread -fsanitize=address -Wno-unknown-pragmas -Icuda/include
//     -o /tmp/attn_emu cuda/test/attention_emu_test.cpp && /tmp/attn_emu
#include <random>

#include "cuda_emu.h"

#define __shared__ // extern dynamic shared memory: attn_tc::smem
#include "../src/attention_tc.cuh"
#undef __shared__
// common.cuh's PDL hooks (the kernel header is included after common.cuh on
// the device): the emulation checks that a PDL-launched kernel waits in every
// thread (emu_launch_pdl).
inline void pdl_wait() { emu_pdl_wait(); }
inline void pdl_trigger() {}
// v8's in-kernel combine: L2 loads, a fence and atomic tickets. CTAs run one
// at a time here (in grid order), so the ticket logic is checked, not the
// memory ordering.
inline float __ldcg(const float *p) { return *p; }
inline float2 __ldcg(const float2 *p) { return *p; }
inline void __threadfence() {}
inline unsigned atomicAdd(unsigned *p, unsigned v) {
  const unsigned o = *p;
  *p = o + v;
  return o;
}
inline unsigned atomicExch(unsigned *p, unsigned v) {
  const unsigned o = *p;
  *p = v;
  return o;
}
#define __shared__ static // static __shared__ arrays: one CTA at a time
#include "../src/attention_kernels.cuh"
#undef __shared__

struct Seq {
  int hist, n; // cached positions before, new rows (queries) of this batch
};

template <typename KV, int HD>
static void run_case(const char *name, std::mt19937 &rng, std::vector<Seq> seqs, int nh, int nkv, int bs, int window,
                     bool sinks, int version, int splits, int row_ctas = 0, int gc = 0) {
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

  // The launches of attention.cu's launch_attn / launch_attn2 / attn_tc_launch.
  const bool tc = version >= 3 && n_tok >= ATTN_TC_MIN_RUN && HD <= 128;
  const int gc_pin = gc;
  auto launch_version = [&](int version, float *outp) {
  a.out = outp;
  int gc = gc_pin;
  if (version == 1) {
    emu_launch(dim3{(unsigned)nh, (unsigned)n_tok, 1}, attn_k::ATTN_WARPS * 32, 0,
               [&] { attn_k::attn_kernel<KV, HD>(a); });
  } else {
    if (tc) {
      using namespace attn_tc;
      emu_launch(dim3{(unsigned)((n_tok + TC_BQ - 1) / TC_BQ), (unsigned)nh, 1}, TC_WARPS * 32, TcLayout<HD>::BYTES,
                 [&] {
                   if (version >= 4)
                     attn_tc_kernel<KV, HD, true>(a);
                   else
                     attn_tc_kernel<KV, HD, false>(a);
                 });
    }
    std::vector<float> part(splits > 1 ? n_tok * nh * splits * (HD + 2) : 0, NAN);
    // attention.cu launches min(n_tok, 256) row CTAs after the tensor-core
    // kernel (each takes a chunk of consecutive rows); row_ctas exercises
    // that at these small sizes (5 CTAs of 15 rows straddle the 64-row tiles).
    const unsigned rows = row_ctas > 0 ? (unsigned)min<int64_t>(row_ctas, n_tok) : (unsigned)n_tok;
    const int G = nh / nkv;
    const bool gq = version == 5 && (HD == 64 || HD == 128) && (G == 1 || G == 2 || G == 4 || G == 8);
    if (version >= 6) {
      // attention.cu launch_attn_gd_any / launch_attn2_adaptive: the grouped
      // kernel with gc heads per CTA (the host's choice unless the case pins
      // one) for head dim 64/128, else attn2 with the adaptive split; then
      // the v6 combine. `splits` is the grid's (a graph sized for max_pos).
      if (gc == 0) gc = attn_gd_heads_per_cta(G, nh, rows, splits, 256);
      if (HD == 64 || HD == 128) {
        CHECK(G % gc == 0, "%s: gc %d does not divide G %d", name, gc, G);
        // v7: the same body with PDL (every thread must wait) and the
        // half-size V chunks at 8 heads per CTA. v8 (grids with splits):
        // one launch, tickets zero before and after.
        auto launch = version >= 7 ? emu_launch_pdl : emu_launch;
        const bool v8 = version >= 8 && splits > 1;
        std::vector<unsigned> tickets(v8 ? n_tok * (nh / gc) : 0, 0u);
        launch(dim3{(unsigned)(nh / gc), rows, (unsigned)splits}, attn_k::ATTN_WARPS * 32, 0, [&] {
          if constexpr (HD == 64 || HD == 128) {
            using namespace attn_k;
            if (v8) {
              switch (gc) {
                case 1: attn_gd8_kernel<KV, HD, 1>(a, part.data(), splits, tc, tickets.data()); break;
                case 2: attn_gd8_kernel<KV, HD, 2>(a, part.data(), splits, tc, tickets.data()); break;
                case 4: attn_gd8_kernel<KV, HD, 4>(a, part.data(), splits, tc, tickets.data()); break;
                default: attn_gd8_kernel<KV, HD, 8>(a, part.data(), splits, tc, tickets.data()); break;
              }
            } else if (version >= 7) {
              switch (gc) {
                case 1: attn_gd7_kernel<KV, HD, 1>(a, part.data(), splits, tc); break;
                case 2: attn_gd7_kernel<KV, HD, 2>(a, part.data(), splits, tc); break;
                case 4: attn_gd7_kernel<KV, HD, 4>(a, part.data(), splits, tc); break;
                default: attn_gd7_kernel<KV, HD, 8>(a, part.data(), splits, tc); break;
              }
            } else {
              switch (gc) {
                case 1: attn_gd_kernel<KV, HD, 1>(a, part.data(), splits, tc); break;
                case 2: attn_gd_kernel<KV, HD, 2>(a, part.data(), splits, tc); break;
                case 4: attn_gd_kernel<KV, HD, 4>(a, part.data(), splits, tc); break;
                default: attn_gd_kernel<KV, HD, 8>(a, part.data(), splits, tc); break;
              }
            }
          }
        });
        for (size_t i = 0; i < tickets.size(); i++)
          CHECK(tickets[i] == 0, "%s: v8 ticket %zu left at %u", name, i, tickets[i]);
        if (v8) return; // merged in the kernel
      } else {
        emu_launch(dim3{(unsigned)nh, rows, (unsigned)splits}, attn_k::ATTN_WARPS * 32, 0, [&] {
          attn_k::attn2_kernel<KV, HD>(a, part.data(), splits, tc, attn_k::ATTN_GD_GRAN);
        });
      }
      if (splits > 1)
        (version >= 7 && (HD == 64 || HD == 128) ? emu_launch_pdl : emu_launch)(
            dim3{(unsigned)nh, (unsigned)n_tok, 1}, 32, 0,
            [&] { attn_k::attn_combine6_kernel<HD>(a, part.data(), splits, attn_k::ATTN_GD_GRAN, tc); });
    } else if (gq) {
      emu_launch(dim3{(unsigned)nkv, rows, (unsigned)splits}, attn_k::ATTN_WARPS * 32, 0, [&] {
        if constexpr (HD == 64 || HD == 128) {
          switch (G) {
            case 1: attn_k::attn_gq_kernel<KV, HD, 1>(a, part.data(), splits, tc); break;
            case 2: attn_k::attn_gq_kernel<KV, HD, 2>(a, part.data(), splits, tc); break;
            case 4: attn_k::attn_gq_kernel<KV, HD, 4>(a, part.data(), splits, tc); break;
            default: attn_k::attn_gq_kernel<KV, HD, 8>(a, part.data(), splits, tc); break;
          }
        }
      });
    } else {
      emu_launch(dim3{(unsigned)nh, rows, (unsigned)splits}, attn_k::ATTN_WARPS * 32, 0,
                 [&] { attn_k::attn2_kernel<KV, HD>(a, part.data(), splits, tc); });
    }
    if (splits > 1 && version < 6)
      emu_launch(dim3{(unsigned)nh, (unsigned)n_tok, 1}, 32, 0,
                 [&] { attn_k::attn_combine_kernel<HD>(a, part.data(), splits, tc); });
  }
  };
  launch_version(version, out.data());
  if (version >= 8) {
    // v8 is v7's arithmetic in v7's order (heads spread over CTAs, the merge
    // in the kernel): bit-identical to v7 on the same inputs.
    std::vector<float> out7(out.size(), NAN);
    launch_version(7, out7.data());
    CHECK(std::memcmp(out.data(), out7.data(), out.size() * sizeof(float)) == 0, "%s: v8 differs from v7", name);
  }

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
    std::printf("%-34s hd %3d %s v%d splits %3d: %-11s rows %3d rel err %.2e worst row %.2e\n", name, HD,
                sizeof(KV) == 2 ? "f16" : "f32", version, splits, k ? "tensor-core" : "fp32", rows[k], rel, worst[k]);
    CHECK(rel < tol[k] && worst[k] < row_tol[k], "%s: error too large", name);
  }
}

static bool g_only_v5 = false, g_only_v6 = false, g_only_v8 = false;

// v6 (depth-adaptive splits): the grid is sized for a long context (graph
// capture: Batch.MaxPos = context length) while the rows are short, long,
// or of very different lengths in one batch; every heads-per-CTA instance.
template <typename KV, int HD>
static void cases_v6(std::mt19937 &rng, int v = 6) {
  // Depths 1, 38, 129 (one split + a 1-key tail), 300, 700 in one batch.
  const std::vector<Seq> decode = {{0, 1}, {37, 1}, {128, 1}, {299, 1}, {699, 1}};
  const std::vector<Seq> mixed = {{3, 66}, {9, 1}, {0, 5}, {700, 1}};
  // The host's grid for a context of 8320 and of 131072 positions, one
  // decode token of gpt-oss's 8 kv heads: 65 and 128 splits.
  const int s8k = attn_grid_splits(8, 8320, attn_k::ATTN_GD_GRAN, 4096, attn_k::ATTN_GD_MAX_SPLITS);
  const int s128k = attn_grid_splits(8, 131072, attn_k::ATTN_GD_GRAN, 4096, attn_k::ATTN_GD_MAX_SPLITS);
  CHECK(s8k == 65 && s128k == 128, "grid splits %d %d", s8k, s128k);
  run_case<KV, HD>("v6 decode gqa8 sinks, grid 65", rng, decode, 8, 1, 16, 0, true, v, s8k);
  if (HD == 64 || HD == 128) // (attn2 for the other head dims: a CTA per head, 8x the emulation time)
    run_case<KV, HD>("v6 decode gqa8 sinks, grid 128", rng, decode, 8, 1, 16, 0, true, v, s128k, 0, 8);
  run_case<KV, HD>("v6 decode gqa8 window128, grid 1", rng, decode, 8, 1, 16, 128, true, v, 1);
  run_case<KV, HD>("v6 decode gqa8 window128 gc2 grid 3", rng, decode, 8, 1, 16, 128, true, v, 3, 0, 2);
  run_case<KV, HD>("v6 decode gqa8 window16 gc4 grid 7", rng, decode, 8, 1, 7, 16, true, v, 7, 0, 4);
  run_case<KV, HD>("v6 decode gqa4 gc1 grid 5", rng, decode, 8, 2, 16, 0, false, v, 5, 0, 1);
  run_case<KV, HD>("v6 decode mha sinks grid 13", rng, decode, 2, 2, 16, 0, true, v, 13);
  run_case<KV, HD>("v6 decode gqa6 gc2 grid 2", rng, decode, 6, 1, 16, 0, true, v, 2, 0, 2);
  run_case<KV, HD>("v6 mixed gqa8 sinks grid 6", rng, mixed, 8, 1, 5, 0, true, v, 6);
  run_case<KV, HD>("v6 mixed gqa2 window9 grid 3", rng, mixed, 4, 2, 16, 9, true, v, 3);
  run_case<KV, HD>("v6 mixed gqa8, 5 row CTAs grid 4", rng, mixed, 8, 1, 16, 0, true, v, 4, 5);
  if (v >= 8 && (HD == 64 || HD == 128)) {
    // v8's heads per working CTA at 8 heads per group in a grid of 65: depth
    // 1 -> 1 head per CTA (direct), 1500 -> 2 (12 splits), 3000 -> 4 (24).
    const std::vector<Seq> deep = {{0, 1}, {1499, 1}, {2999, 1}};
    run_case<KV, HD>("v8 decode gqa8 sinks deep, grid 65", rng, deep, 8, 1, 16, 0, true, v, s8k, 0, 8);
  }
}

template <typename KV, int HD>
static void cases(std::mt19937 &rng, bool with_v1) {
  if (g_only_v5) {
    if (HD != 64 && HD != 128) return;
    const std::vector<Seq> decode = {{0, 1}, {37, 1}, {600, 1}};
    const std::vector<Seq> mixed = {{3, 66}, {9, 1}, {0, 5}};
    run_case<KV, HD>("v5 decode gqa8 sinks", rng, decode, 8, 1, 16, 0, true, 5, 1);
    run_case<KV, HD>("v5 decode gqa8 window16 splits5", rng, decode, 8, 1, 7, 16, true, 5, 5);
    run_case<KV, HD>("v5 decode gqa4", rng, decode, 8, 2, 16, 0, false, 5, 3);
    run_case<KV, HD>("v5 mixed gqa2 sinks", rng, mixed, 4, 2, 5, 0, true, 5, 1);
    run_case<KV, HD>("v5 mixed mha window9 splits2", rng, mixed, 2, 2, 16, 9, true, 5, 2);
    run_case<KV, HD>("v5 mixed gqa8, 5 row CTAs", rng, mixed, 8, 1, 16, 0, true, 5, 1, 5);
    return;
  }
  // Decode rows at depths 1, 38 and 601 (window 0 and 16, sinks).
  const std::vector<Seq> decode = {{0, 1}, {37, 1}, {600, 1}};
  // A 66-row chunk (tile 0 is the tensor-core kernel's, rows 64-65 are not),
  // a decode row, a 5-row chunk.
  const std::vector<Seq> mixed = {{3, 66}, {9, 1}, {0, 5}};
  // v3 (O in shared memory) differs from v4 only in the tensor-core kernel:
  // two head dims suffice (cut in session 4 to keep the file's CI time).
  for (int version : {2, 3, 4}) {
    if (version == 3 && HD != 16 && HD != 64) continue;
    run_case<KV, HD>("decode", rng, decode, 2, 1, 16, 0, true, version, 1);
    run_case<KV, HD>("decode window16", rng, decode, 4, 2, 7, 16, false, version, 3);
    run_case<KV, HD>("mixed", rng, mixed, 2, 1, 5, 0, true, version, 1);
    run_case<KV, HD>("mixed window9", rng, mixed, 2, 2, 16, 9, true, version, 2);
    run_case<KV, HD>("mixed, 5 row CTAs", rng, mixed, 2, 1, 16, 0, true, version, 1, 5);
  }
  // v6 here for one grouped (64, f16) and one attn2 (16, f32) config; `attention_emu_test v6` runs all six.
  if (HD == 16 || HD == 64) cases_v6<KV, HD>(rng);
  if (HD == 64) cases_v6<KV, HD>(rng, 8); // v8, each case also run as v7 (bit-identical)
  if (with_v1) {
    run_case<KV, HD>("decode", rng, decode, 2, 1, 16, 0, true, 1, 1);
    run_case<KV, HD>("mixed window9", rng, mixed, 2, 2, 16, 9, true, 1, 1);
  }
}

int main(int argc, char **argv) {
  std::mt19937 rng(777);
  g_only_v5 = argc > 1 && std::strcmp(argv[1], "v5") == 0; // only the GQA-grouped decode kernel's cases
  g_only_v6 = argc > 1 && std::strcmp(argv[1], "v6") == 0; // only the depth-adaptive decode kernels' cases
  g_only_v8 = argc > 1 && std::strcmp(argv[1], "v8") == 0; // only the single-launch decode (and v7) cases
  if (g_only_v8) {
    cases_v6<__half, 64>(rng, 8);
    cases_v6<float, 64>(rng, 8);
    cases_v6<__half, 128>(rng, 8);
    cases_v6<float, 128>(rng, 8);
    std::printf("attention_emu_test v8: ok\n");
    return 0;
  }
  if (g_only_v6) {
    // The grouped kernel (64/128, both caches) and attn2's adaptive split.
    cases_v6<float, 64>(rng);
    cases_v6<__half, 64>(rng);
    cases_v6<float, 128>(rng);
    cases_v6<__half, 128>(rng);
    cases_v6<float, 16>(rng);
    cases_v6<__half, 80>(rng);
    cases_v6<__half, 64>(rng, 7);
    cases_v6<float, 128>(rng, 7);
    std::printf("attention_emu_test v6: ok\n");
    return 0;
  }
  cases<float, 16>(rng, true);
  cases<__half, 32>(rng, false);
  cases<float, 48>(rng, false);
  cases<__half, 64>(rng, true);
  cases<float, 80>(rng, true);
  cases<__half, 96>(rng, false);
  cases<float, 128>(rng, false);
  cases<__half, 256>(rng, true);
  std::printf("attention_emu_test: ok\n");
  return 0;
}
