// Bi-WKV forward and exact backward: chunked scan in base-2 log space (see kernels/README.md).
//
// Notation (per batch b, channel c, positions 0..T-1, everything float32):
//   k2 = k*log2(e), w2 = w*log2(e), u2 = u*log2(e)
//   y_t = (A_t + B_t + 2^(u2+k2_t) v_t) / (A'_t + B'_t + 2^(u2+k2_t))
//   A_t = sum_{i<t} 2^(k2_i - (t-1-i) w2) v_i   (causal),  B_t = sum_{i>t} 2^(k2_i - (i-t-1) w2) v_i
// A state is (p, x1, x2[, r1, r2]) meaning (x1, x2) * 2^p; r1, r2 are d/dw of x1, x2 (backward only).
//
// Three launches per scan:
//   summary_kernel: one thread per (b, chunk of kChunk tokens, c) -> chunk state per direction
//   carry_kernel:   one block per (32 channels, b, direction): exclusive scan of chunk states
//   fwd_out_kernel / bwd_out_kernel: one thread per (b, chunk, c), two sweeps over the chunk
// No atomics anywhere; dw and du partials are written per (b, chunk) and summed in a fixed order.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "bi_wkv.h"

namespace rwkvsam {
namespace {

constexpr float kLog2e = 1.4426950408889634f;
constexpr int kThreads = 128;      // threads per block of the per-(chunk, channel) kernels
// Channels with |w2| <= kFastW2 (and, for the output pass, |u2| <= kFastU2) take the forward's fast
// forms: one reference exponent a chunk instead of a running maximum (see out_sweep_fast).
constexpr float kFastW2 = 2.f;
constexpr float kFastU2 = 40.f;

__device__ __forceinline__ float ex2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

__device__ __forceinline__ float lg2(float x) {
  float y;
  asm("lg2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// 1 / (1 + e^-x); 0 for x below about -88 (ex2 gives inf, the approximate division 0)
__device__ __forceinline__ float sigmoid_f(float x) { return __fdividef(1.f, 1.f + ex2(-x * kLog2e)); }

template <typename T>
__device__ __forceinline__ float to_f(T x);
template <>
__device__ __forceinline__ float to_f<float>(float x) { return x; }
template <>
__device__ __forceinline__ float to_f<__half>(__half x) { return __half2float(x); }
template <>
__device__ __forceinline__ float to_f<__nv_bfloat16>(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_f(float x);
template <>
__device__ __forceinline__ float from_f<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_f<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// (2^(a - m), 2^(b - m)) with m = max(a, b), from one ex2: the larger side is exactly 2^0 = 1 (the
// same numbers as two ex2 calls, as ex2.approx(0) is 1; the MUFU unit that runs ex2 is the
// forward's busiest). Needs a or b finite.
__device__ __forceinline__ float exp2_pair(float a, float b, float& ea, float& eb) {
  const float d = a - b;
  const float e = ex2(-fabsf(d));
  const bool a_big = d > 0.f;
  ea = a_big ? 1.f : e;
  eb = a_big ? e : 1.f;
  return a_big ? a : b;
}

// The (b, chunk, c) a thread of the per-(chunk, channel) kernels owns (grid_for's layout): false for
// the threads past the last one. idx indexes (B, nch, C) planes, base the chunk's first token in (B, T, C).
struct ChunkThread {
  int b, c, chunk, n;
  int64_t idx, base;
};

__device__ __forceinline__ bool chunk_thread(int T, int C, int nch, ChunkThread& q) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= nch * C) return false;
  q.b = blockIdx.y;
  q.c = i % C;
  q.chunk = i / C;
  q.n = min(T - q.chunk * kChunk, kChunk);
  q.idx = (static_cast<int64_t>(q.b) * nch + q.chunk) * C + q.c;
  q.base = (static_cast<int64_t>(q.b) * T + q.chunk * kChunk) * C + q.c;
  return true;
}

// The chunk's rows of x (float32 values of one channel, stride C from base) into registers, scaled.
// Loads are unconditional (rows past the chunk's end re-read its last row and are ignored later): a
// guarded load becomes a branch per token and the loads then wait for each other.
template <typename T>
__device__ __forceinline__ void load_rows(const T* __restrict__ x, int64_t base, int n, int C, float scale,
                                          float (&out)[kChunk]) {
#pragma unroll
  for (int j = 0; j < kChunk; ++j) out[j] = to_f(x[base + static_cast<int64_t>(min(j, n - 1)) * C]) * scale;
}

// k (in log2 units) and v of the thread's chunk
template <typename scalar_t>
__device__ __forceinline__ void load_chunk(const scalar_t* __restrict__ kin, const scalar_t* __restrict__ vin,
                                           int64_t base, int n, int C, float (&k2)[kChunk], float (&vv)[kChunk]) {
  load_rows(kin, base, n, C, kLog2e, k2);
  load_rows(vin, base, n, C, 1.f, vv);
}

// One scan state: value (s1, s2) * 2^p, derivatives (r1, r2) w.r.t. w (natural units).
struct State {
  float p, s1, s2, r1, r2;
};

__device__ __forceinline__ State empty_state() { return State{-INFINITY, 0.f, 0.f, 0.f, 0.f}; }

// State of segment X followed (in scan order) by segment Y of len_y tokens.
template <bool GRAD>
__device__ __forceinline__ State combine(const State& x, const State& y, float len_y, float w2) {
  const float px = x.p - len_y * w2;
  if (fmaxf(px, y.p) == -INFINITY) return y;  // both empty
  float ex, ey;
  const float q = exp2_pair(px, y.p, ex, ey);
  State r;
  r.p = q;
  r.s1 = ex * x.s1 + ey * y.s1;
  r.s2 = ex * x.s2 + ey * y.s2;
  if (GRAD) {
    r.r1 = ex * (x.r1 - len_y * x.s1) + ey * y.r1;
    r.r2 = ex * (x.r2 - len_y * x.s2) + ey * y.r2;
  } else {
    r.r1 = 0.f;
    r.r2 = 0.f;
  }
  return r;
}

template <bool GRAD>
__device__ __forceinline__ State load_state(const float* buf, int64_t plane, int d, int64_t idx) {
  constexpr int NC = GRAD ? 5 : 3;
  State s;
  s.p = buf[(d * NC + 0) * plane + idx];
  s.s1 = buf[(d * NC + 1) * plane + idx];
  s.s2 = buf[(d * NC + 2) * plane + idx];
  s.r1 = GRAD ? buf[(d * NC + 3) * plane + idx] : 0.f;
  s.r2 = GRAD ? buf[(d * NC + 4) * plane + idx] : 0.f;
  return s;
}

template <bool GRAD>
__device__ __forceinline__ void store_state(float* buf, int64_t plane, int d, int64_t idx, const State& s) {
  constexpr int NC = GRAD ? 5 : 3;
  buf[(d * NC + 0) * plane + idx] = s.p;
  buf[(d * NC + 1) * plane + idx] = s.s1;
  buf[(d * NC + 2) * plane + idx] = s.s2;
  if (GRAD) {
    buf[(d * NC + 3) * plane + idx] = s.r1;
    buf[(d * NC + 4) * plane + idx] = s.r2;
  }
}

// State of one chunk of n <= kChunk tokens (key[j], values a1[j] and a2[j], or 1 when !GRAD) in
// direction d: causal (d = 0) seen from just after its last token (distance n-1-j), anti-causal
// (d = 1) from just before its first token (distance j). A max over the exponents, then one ex2 each.
template <bool GRAD>
__device__ __forceinline__ State chunk_state(const float (&key)[kChunk], const float (&a1)[kChunk],
                                             const float (&a2)[kChunk], int n, float w2, int d) {
  float mx = -INFINITY;
#pragma unroll
  for (int j = 0; j < kChunk; ++j) {
    if (j < n) {
      const float dist = d == 0 ? static_cast<float>(n - 1 - j) : static_cast<float>(j);
      mx = fmaxf(mx, key[j] - dist * w2);
    }
  }
  State s{mx, 0.f, 0.f, 0.f, 0.f};
#pragma unroll
  for (int j = 0; j < kChunk; ++j) {
    if (j < n) {
      const float dist = d == 0 ? static_cast<float>(n - 1 - j) : static_cast<float>(j);
      const float e = ex2(key[j] - dist * w2 - mx);
      const float b2 = GRAD ? a2[j] : 1.f;
      s.s1 += e * a1[j];
      s.s2 += e * b2;
      if (GRAD) {
        s.r1 -= dist * e * a1[j];
        s.r2 -= dist * e * b2;
      }
    }
  }
  return s;
}

// Forward chunk states of both directions where |w2| <= kFastW2: one ex2 a token (against one a token
// and direction after a max per direction), Horner sums in 2^-w2 under the chunk's largest key m,
// then each state normalised to s2 = 1 (p = m + log2 of its sum, which is >= 2^-(15 |w2|) > 0).
template <bool FULL>
__device__ __forceinline__ void forward_chunk_states_fast(float (&k2)[kChunk], float (&vv)[kChunk], int n, float w2,
                                                          State& causal, State& anti) {
  float m = -INFINITY;
#pragma unroll
  for (int j = 0; j < kChunk; ++j) {
    if (FULL || j < n) m = fmaxf(m, k2[j]);
  }
  const float dec = ex2(-w2);
  float cn = 0.f, cd = 0.f;
#pragma unroll
  for (int j = 0; j < kChunk; ++j) {  // k2[j] becomes e_j = 2^(k2_j - m), vv[j] becomes e_j v_j
    k2[j] = ex2(k2[j] - m);
    vv[j] *= k2[j];
    if (FULL || j < n) {
      cn = fmaf(cn, dec, vv[j]);
      cd = fmaf(cd, dec, k2[j]);
    }
  }
  float an = 0.f, ad = 0.f;
#pragma unroll
  for (int j = kChunk - 1; j >= 0; --j) {
    if (FULL || j < n) {
      an = fmaf(an, dec, vv[j]);
      ad = fmaf(ad, dec, k2[j]);
    }
  }
  causal = State{m + lg2(cd), __fdividef(cn, cd), 1.f, 0.f, 0.f};
  anti = State{m + lg2(ad), __fdividef(an, ad), 1.f, 0.f, 0.f};
}

// Both forward chunk states (fast form where the channel allows it). k2 and vv are overwritten.
__device__ __forceinline__ void forward_chunk_states(float (&k2)[kChunk], float (&vv)[kChunk], int n, float w2,
                                                     State& causal, State& anti) {
  if (fabsf(w2) <= kFastW2) {
    if (n == kChunk) {
      forward_chunk_states_fast<true>(k2, vv, n, w2, causal, anti);
    } else {
      forward_chunk_states_fast<false>(k2, vv, n, w2, causal, anti);
    }
  } else {
    causal = chunk_state<false>(k2, vv, vv, n, w2, 0);
    anti = chunk_state<false>(k2, vv, vv, n, w2, 1);
  }
}

// ---------------------------------------------------------------------------------------------
// Pass 1: chunk states. Forward: key k2, values (v, 1). Backward: key -lse2, values (g, g*y).
// Causal state of a chunk = its tokens seen from just after its last token (distance n-1-j);
// anti-causal = seen from just before its first token (distance j).
template <typename scalar_t, bool GRAD>
__global__ void summary_kernel(const scalar_t* __restrict__ kin, const scalar_t* __restrict__ ain,
                               const float* __restrict__ lse, const float* __restrict__ yf,
                               const float* __restrict__ w, float* __restrict__ out, int B, int T, int C,
                               int nch) {
  // grid: (ceil(nch * C / kThreads), B)
  ChunkThread q;
  if (!chunk_thread(T, C, nch, q)) return;
  const int n = q.n;
  const int64_t idx = q.idx;
  const float w2 = w[q.c] * kLog2e;
  const int64_t plane = static_cast<int64_t>(B) * nch * C;
  float key[kChunk], a1[kChunk];
  if (GRAD) {
    float a2[kChunk];
#pragma unroll
    for (int j = 0; j < kChunk; ++j) {  // unconditional loads, as in load_rows
      const int64_t off = q.base + static_cast<int64_t>(min(j, n - 1)) * C;
      key[j] = -lse[off];
      a1[j] = to_f(ain[off]);
      a2[j] = a1[j] * yf[off];
    }
#pragma unroll
    for (int d = 0; d < 2; ++d) store_state<GRAD>(out, plane, d, idx, chunk_state<GRAD>(key, a1, a2, n, w2, d));
  } else {
    load_chunk(kin, ain, q.base, n, C, key, a1);
    State causal, anti;
    forward_chunk_states(key, a1, n, w2, causal, anti);
    store_state<GRAD>(out, plane, 0, idx, causal);
    store_state<GRAD>(out, plane, 1, idx, anti);
  }
}

// ---------------------------------------------------------------------------------------------
// Pass 2: exclusive scan of the chunk states along the sequence, per (b, c, direction).
// Block = 1024 threads = CH channels x NSEG = 1024 / CH segments; thread t owns channel t % CH and
// the contiguous segment of chunks t / CH. (a) each thread folds its segment; (b) warp w scans the
// segment totals of channel w % CH, half w / CH (32 segments, with shuffles), the second half
// starting from the first half's total; (c) each thread re-walks its segment from its prefix and
// writes every chunk's carry-in. CH = 16 doubles the blocks (and halves each thread's segment)
// where 32-channel blocks would leave most SMs idle (batch 1).
template <bool GRAD, int CH>
__global__ void __launch_bounds__(1024)
    carry_kernel(const float* __restrict__ summ, float* __restrict__ carry, const float* __restrict__ w, int B,
                 int T, int C, int nch) {
  constexpr int NSEG = 1024 / CH;
  static_assert(NSEG == 32 || NSEG == 64, "CH must be 32 or 16");
  __shared__ float sh[6][NSEG][CH + 1];
  __shared__ float tot[5][CH];  // inclusive total of the first 32 segments, per channel (NSEG == 64)
  const int tid = threadIdx.y * 32 + threadIdx.x;
  const int lc = tid % CH;
  const int seg = tid / CH;
  const int b = blockIdx.y;
  const int d = blockIdx.z;
  const int c = blockIdx.x * CH + lc;
  const bool cvalid = c < C;
  const int64_t plane = static_cast<int64_t>(B) * nch * C;
  const int per = (nch + NSEG - 1) / NSEG;
  const int r0 = min(seg * per, nch);
  const int r1 = min(r0 + per, nch);
  const float w2 = cvalid ? w[c] * kLog2e : 0.f;
  // chunk states loaded at once by a thread (fewer for the 5-component states: 64 registers a thread)
  constexpr int kPrefetch = GRAD ? 4 : 8;

  State agg = empty_state();
  float agg_len = 0.f;
  if (cvalid) {
    // loads are issued kPrefetch at a time so that their latencies overlap; they are unconditional
    // (past the segment's end they re-read its last chunk, ignored below), as a guarded load is a
    // branch that makes the loads wait for each other
    for (int r = r0; r < r1; r += kPrefetch) {
      State ys[kPrefetch];
      float lns[kPrefetch];
#pragma unroll
      for (int i = 0; i < kPrefetch; ++i) {
        const int rr = min(r + i, r1 - 1);
        const int chk = d == 0 ? rr : nch - 1 - rr;
        lns[i] = static_cast<float>(min(T - chk * kChunk, kChunk));
        ys[i] = load_state<GRAD>(summ, plane, d, (static_cast<int64_t>(b) * nch + chk) * C + c);
      }
#pragma unroll
      for (int i = 0; i < kPrefetch; ++i) {
        if (r + i < r1) {
          agg = combine<GRAD>(agg, ys[i], lns[i], w2);
          agg_len += lns[i];
        }
      }
    }
  }
  sh[0][seg][lc] = agg.p;
  sh[1][seg][lc] = agg.s1;
  sh[2][seg][lc] = agg.s2;
  sh[3][seg][lc] = agg.r1;
  sh[4][seg][lc] = agg.r2;
  sh[5][seg][lc] = agg_len;
  __syncthreads();

  {
    // transposed: warp threadIdx.y scans channel ch_l of the block over the 32 segments of its half
    const int lane = threadIdx.x;
    const int ch_l = threadIdx.y % CH;
    const int half = threadIdx.y / CH;
    const int sg = half * 32 + lane;
    const int cc = blockIdx.x * CH + ch_l;
    const float w2c = cc < C ? w[cc] * kLog2e : 0.f;
    State x{sh[0][sg][ch_l], sh[1][sg][ch_l], sh[2][sg][ch_l], sh[3][sg][ch_l], sh[4][sg][ch_l]};
    float xl = sh[5][sg][ch_l];
#pragma unroll
    for (int off = 1; off < 32; off <<= 1) {
      State o;
      o.p = __shfl_up_sync(0xffffffffu, x.p, off);
      o.s1 = __shfl_up_sync(0xffffffffu, x.s1, off);
      o.s2 = __shfl_up_sync(0xffffffffu, x.s2, off);
      o.r1 = __shfl_up_sync(0xffffffffu, x.r1, off);
      o.r2 = __shfl_up_sync(0xffffffffu, x.r2, off);
      const float ol = __shfl_up_sync(0xffffffffu, xl, off);
      if (lane >= off) {
        x = combine<GRAD>(o, x, xl, w2c);
        xl += ol;
      }
    }
    State e;
    e.p = __shfl_up_sync(0xffffffffu, x.p, 1);
    e.s1 = __shfl_up_sync(0xffffffffu, x.s1, 1);
    e.s2 = __shfl_up_sync(0xffffffffu, x.s2, 1);
    e.r1 = __shfl_up_sync(0xffffffffu, x.r1, 1);
    e.r2 = __shfl_up_sync(0xffffffffu, x.r2, 1);
    float el = __shfl_up_sync(0xffffffffu, xl, 1);  // tokens of the half's segments before this one
    if (lane == 0) {
      e = empty_state();
      el = 0.f;
    }
    if (NSEG == 64 && half == 0 && lane == 31) {
      tot[0][ch_l] = x.p;
      tot[1][ch_l] = x.s1;
      tot[2][ch_l] = x.s2;
      tot[3][ch_l] = x.r1;
      tot[4][ch_l] = x.r2;
    }
    __syncthreads();  // everyone has read sh (and the first half's totals are written)
    if (NSEG == 64 && half == 1) {
      const State t0{tot[0][ch_l], tot[1][ch_l], tot[2][ch_l], tot[3][ch_l], tot[4][ch_l]};
      e = combine<GRAD>(t0, e, el, w2c);
    }
    sh[0][sg][ch_l] = e.p;
    sh[1][sg][ch_l] = e.s1;
    sh[2][sg][ch_l] = e.s2;
    sh[3][sg][ch_l] = e.r1;
    sh[4][sg][ch_l] = e.r2;
  }
  __syncthreads();

  if (!cvalid) return;
  State run{sh[0][seg][lc], sh[1][seg][lc], sh[2][seg][lc], sh[3][seg][lc], sh[4][seg][lc]};
  for (int r = r0; r < r1; r += kPrefetch) {
    State ys[kPrefetch];
    float lns[kPrefetch];
    int64_t idxs[kPrefetch];
#pragma unroll
    for (int i = 0; i < kPrefetch; ++i) {  // unconditional loads, as above
      const int rr = min(r + i, r1 - 1);
      const int chk = d == 0 ? rr : nch - 1 - rr;
      lns[i] = static_cast<float>(min(T - chk * kChunk, kChunk));
      idxs[i] = (static_cast<int64_t>(b) * nch + chk) * C + c;
      ys[i] = load_state<GRAD>(summ, plane, d, idxs[i]);
    }
#pragma unroll
    for (int i = 0; i < kPrefetch; ++i) {
      if (r + i < r1) {
        store_state<GRAD>(carry, plane, d, idxs[i], run);
        run = combine<GRAD>(run, ys[i], lns[i], w2);
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Pass 3 (forward): outputs of one chunk of n tokens (k2 = k log2 e, v) of channel (w2, u2), from
// the causal state before its first token (cc) and the anti-causal one after its last token (ca).
// y[j * C], lse[j * C], yf[j * C] are the chunk's outputs (lse and yf when WRITE_LSE, yf when not null).

// Exact at any w, u: every step rescales to the running maximum exponent (three per output).
template <typename out_t, bool WRITE_LSE, bool GATED>
__device__ __forceinline__ void out_sweep_exact(const float (&k2)[kChunk], const float (&vv)[kChunk], int n,
                                                float w2, float u2, const State& cc, const State& ca, out_t* y,
                                                float* lse, float* yf, const out_t* gate, int C) {
  float bp[kChunk], bn[kChunk], bd[kChunk];
  {
    float p = ca.p, sn = ca.s1, sd = ca.s2;
#pragma unroll
    for (int j = kChunk - 1; j >= 0; --j) {
      if (j < n) {
        bp[j] = p;
        bn[j] = sn;
        bd[j] = sd;
        float e1, e2;
        const float q = exp2_pair(p - w2, k2[j], e1, e2);
        sn = e1 * sn + e2 * vv[j];
        sd = e1 * sd + e2;
        p = q;
      }
    }
  }
  float p = cc.p, sn = cc.s1, sd = cc.s2;
#pragma unroll
  for (int j = 0; j < kChunk; ++j) {
    if (j < n) {
      const float uk = u2 + k2[j];
      const float q = fmaxf(fmaxf(p, bp[j]), uk);
      // one of the three exponents is q (its term is 1): two ex2 for the other two
      const bool p_max = q == p, b_max = q == bp[j];
      const float o1 = ex2((p_max ? uk : p) - q);
      const float o2 = ex2((b_max ? uk : bp[j]) - q);
      const float e1 = p_max ? 1.f : o1;
      const float e2 = b_max ? 1.f : o2;
      const float e3 = p_max ? o1 : (b_max ? o2 : 1.f);
      const float num = e1 * sn + e2 * bn[j] + e3 * vv[j];
      const float den = e1 * sd + e2 * bd[j] + e3;
      const float yj = __fdividef(num, den);
      y[j * C] = from_f<out_t>(GATED ? yj * sigmoid_f(to_f(gate[j * C])) : yj);
      if (WRITE_LSE) {
        lse[j * C] = q + lg2(den);
        if (yf != nullptr) yf[j * C] = yj;
      }
      float f1, f2;
      const float q2 = exp2_pair(p - w2, k2[j], f1, f2);
      sn = f1 * sn + f2 * vv[j];
      sd = f1 * sd + f2;
      p = q2;
    }
  }
}

// Fast form where |w2| <= kFastW2 and |u2| <= kFastU2 (always in the model: w = spatial_decay / T).
// One reference exponent R for the whole chunk (the largest of its keys and the two carried states),
// so a token costs one ex2 and the recurrences are plain multiply-adds by 2^-w2. Why it is safe:
// the carried states have s2 >= 1 at their exponent, so every denominator (scaled by 2^-R) has a
// term >= 2^-(15 |w2| + |u2|) >= 2^-70 (the largest element seen from any token of the chunk);
// a term that flushes to zero (< 2^-126) changes it by less than 2^-50. Nothing exceeds
// T 2^(15 |w2| + max(u2, 0)) <= 2^101.

template <typename out_t, bool WRITE_LSE, bool GATED, bool FULL>
__device__ __forceinline__ void out_sweep_fast(float (&k2)[kChunk], float (&vv)[kChunk], int n, float w2, float u2,
                                               const State& cc, const State& ca, out_t* y, float* lse, float* yf,
                                               const out_t* gate, int C) {
  float r = fmaxf(cc.p, ca.p);
#pragma unroll
  for (int j = 0; j < kChunk; ++j) {
    if (FULL || j < n) r = fmaxf(r, k2[j]);
  }
  const float dec = ex2(-w2);
  const float eu = ex2(u2);
  const float fc = ex2(cc.p - r), fa = ex2(ca.p - r);  // 0 for an empty state (p = -inf)
  float an = fc * cc.s1, ad = fc * cc.s2;
  float bn_run = fa * ca.s1, bd_run = fa * ca.s2;
  // k2[j] becomes e_j = 2^(k2_j - r), vv[j] becomes e_j v_j
#pragma unroll
  for (int j = 0; j < kChunk; ++j) {
    k2[j] = ex2(k2[j] - r);
    vv[j] *= k2[j];
  }
  float bn[kChunk], bd[kChunk];
#pragma unroll
  for (int j = kChunk - 1; j >= 0; --j) {
    if (FULL || j < n) {
      bn[j] = bn_run;
      bd[j] = bd_run;
      bn_run = fmaf(dec, bn_run, vv[j]);
      bd_run = fmaf(dec, bd_run, k2[j]);
    }
  }
#pragma unroll
  for (int j = 0; j < kChunk; ++j) {
    if (FULL || j < n) {
      const float num = fmaf(eu, vv[j], an + bn[j]);
      const float den = fmaf(eu, k2[j], ad + bd[j]);
      const float yj = __fdividef(num, den);
      y[j * C] = from_f<out_t>(GATED ? yj * sigmoid_f(to_f(gate[j * C])) : yj);
      if (WRITE_LSE) {
        lse[j * C] = r + lg2(den);
        if (yf != nullptr) yf[j * C] = yj;
      }
      an = fmaf(dec, an, vv[j]);
      ad = fmaf(dec, ad, k2[j]);
    }
  }
}

// GATED: y = sigmoid(gate) * the Bi-WKV output, in float32 and rounded once (the inference
// forward of the spatial mix, which gates with its receptance).
template <typename out_t, bool WRITE_LSE, bool GATED>
__device__ __forceinline__ void out_sweep(float (&k2)[kChunk], float (&vv)[kChunk], int n, float w2, float u2,
                                          const State& cc, const State& ca, out_t* y, float* lse, float* yf,
                                          const out_t* gate, int C) {
  if (fabsf(w2) <= kFastW2 && fabsf(u2) <= kFastU2) {
    if (n == kChunk) {
      out_sweep_fast<out_t, WRITE_LSE, GATED, true>(k2, vv, n, w2, u2, cc, ca, y, lse, yf, gate, C);
    } else {
      out_sweep_fast<out_t, WRITE_LSE, GATED, false>(k2, vv, n, w2, u2, cc, ca, y, lse, yf, gate, C);
    }
  } else {
    out_sweep_exact<out_t, WRITE_LSE, GATED>(k2, vv, n, w2, u2, cc, ca, y, lse, yf, gate, C);
  }
}

// One thread per (b, chunk, c), carries from carry_kernel.
// WRITE_LSE: also writes lse2 and, when yf is not null, y in float32 (the backward's inputs).
template <typename scalar_t, typename out_t, bool WRITE_LSE, bool GATED>
__global__ void __launch_bounds__(kThreads, 5) fwd_out_kernel(const scalar_t* __restrict__ kin, const scalar_t* __restrict__ vin,
                               const float* __restrict__ w, const float* __restrict__ u,
                               const float* __restrict__ carry, out_t* __restrict__ y, float* __restrict__ lse,
                               float* __restrict__ yf, const out_t* __restrict__ gate, int B, int T, int C,
                               int nch) {
  ChunkThread q;
  if (!chunk_thread(T, C, nch, q)) return;
  const int n = q.n;
  const int64_t base = q.base;
  const float w2 = w[q.c] * kLog2e;
  const float u2 = u[q.c] * kLog2e;
  float k2[kChunk], vv[kChunk];
  load_chunk(kin, vin, base, n, C, k2, vv);
  const int64_t plane = static_cast<int64_t>(B) * nch * C;
  const State cc = load_state<false>(carry, plane, 0, q.idx);
  const State ca = load_state<false>(carry, plane, 1, q.idx);
  out_sweep<out_t, WRITE_LSE, GATED>(k2, vv, n, w2, u2, cc, ca, y + base, WRITE_LSE ? lse + base : nullptr,
                                     (WRITE_LSE && yf != nullptr) ? yf + base : nullptr,
                                     GATED ? gate + base : nullptr, C);
}

// ---------------------------------------------------------------------------------------------
// Two-launch forward for T <= kSupChunks * kChunk * kMaxSupFused (the carry kernel's chain of
// dependent steps was a third of the forward's time). Tokens are grouped in superchunks of
// kSupChunks chunks; one block of kSupLanes x kSupChunks threads owns (32 channels, superchunk, b).
//   sup_summary_kernel: the state of every chunk and every superchunk in both directions;
//   fwd_fused_kernel:   each block folds the states of the superchunks before (causal) and after
//                       (anti-causal) its own, scans its chunks' states in shared memory, then
//                       reads its tokens and writes the outputs.
constexpr int kSupChunks = 8;
constexpr int kSupLanes = 32;
constexpr int kSupTokens = kSupChunks * kChunk;

__device__ __forceinline__ void put_state(float (*sh)[kSupChunks][kSupLanes + 1], int row, int lane, const State& s) {
  sh[0][row][lane] = s.p;
  sh[1][row][lane] = s.s1;
  sh[2][row][lane] = s.s2;
}

__device__ __forceinline__ State get_state(const float (*sh)[kSupChunks][kSupLanes + 1], int row, int lane) {
  return State{sh[0][row][lane], sh[1][row][lane], sh[2][row][lane], 0.f, 0.f};
}

template <typename scalar_t>
__global__ void __launch_bounds__(kSupLanes* kSupChunks)
    sup_summary_kernel(const scalar_t* __restrict__ kin, const scalar_t* __restrict__ vin,
                       const float* __restrict__ w, float* __restrict__ chst, float* __restrict__ sup, int B,
                       int T, int C, int nch, int nsup) {
  __shared__ float sh[2][3][kSupChunks][kSupLanes + 1];
  const int lane = threadIdx.x, row = threadIdx.y;
  const int c = blockIdx.x * kSupLanes + lane;
  const int sc = blockIdx.y, b = blockIdx.z;
  const int chunk = sc * kSupChunks + row;
  const bool valid = c < C && chunk < nch;
  const float w2 = c < C ? w[c] * kLog2e : 0.f;
  State st0 = empty_state(), st1 = empty_state();
  if (valid) {
    const int n = min(T - chunk * kChunk, kChunk);
    float k2[kChunk], vv[kChunk];
    load_chunk(kin, vin, (static_cast<int64_t>(b) * T + chunk * kChunk) * C + c, n, C, k2, vv);
    forward_chunk_states(k2, vv, n, w2, st0, st1);
    const int64_t plane = static_cast<int64_t>(B) * nch * C;
    const int64_t idx = (static_cast<int64_t>(b) * nch + chunk) * C + c;
    store_state<false>(chst, plane, 0, idx, st0);
    store_state<false>(chst, plane, 1, idx, st1);
  }
  put_state(sh[0], row, lane, st0);
  put_state(sh[1], row, lane, st1);
  __syncthreads();
  if (row < 2 && c < C) {  // warp 0 folds the causal states left to right, warp 1 the others right to left
    const int d = row;
    State agg = empty_state();
#pragma unroll
    for (int i = 0; i < kSupChunks; ++i) {
      const int r = d == 0 ? i : kSupChunks - 1 - i;
      const int g = sc * kSupChunks + r;
      if (g < nch) agg = combine<false>(agg, get_state(sh[d], r, lane), static_cast<float>(min(T - g * kChunk, kChunk)), w2);
    }
    store_state<false>(sup, static_cast<int64_t>(B) * nsup * C, d, (static_cast<int64_t>(b) * nsup + sc) * C + c, agg);
  }
}

template <typename scalar_t, typename out_t, bool WRITE_LSE, bool GATED>
__global__ void __launch_bounds__(kSupLanes* kSupChunks, 3)
    fwd_fused_kernel(const scalar_t* __restrict__ kin, const scalar_t* __restrict__ vin,
                     const float* __restrict__ w, const float* __restrict__ u, const float* __restrict__ chst,
                     const float* __restrict__ sup, out_t* __restrict__ y, float* __restrict__ lse,
                     float* __restrict__ yf, const out_t* __restrict__ gate, int B, int T, int C, int nch, int nsup) {
  __shared__ float chs[2][3][kSupChunks][kSupLanes + 1];   // chunk states, then each chunk's carry-in
  __shared__ float part[2][3][kSupChunks][kSupLanes + 1];  // folds of parts of the other superchunks
  __shared__ float plen[2][kSupChunks][kSupLanes + 1];     // their lengths in tokens
  const int lane = threadIdx.x, row = threadIdx.y;
  const int c = blockIdx.x * kSupLanes + lane;
  const int sc = blockIdx.y, b = blockIdx.z;
  const int chunk = sc * kSupChunks + row;
  const bool valid = c < C && chunk < nch;
  const bool cvalid = c < C;
  const float w2 = cvalid ? w[c] * kLog2e : 0.f;
  const float u2 = cvalid ? u[c] * kLog2e : 0.f;
  const int n = valid ? min(T - chunk * kChunk, kChunk) : 0;
  const int64_t base = (static_cast<int64_t>(b) * T + chunk * kChunk) * C + c;
  {
    State st0 = empty_state(), st1 = empty_state();
    if (valid) {
      const int64_t plane = static_cast<int64_t>(B) * nch * C;
      const int64_t idx = (static_cast<int64_t>(b) * nch + chunk) * C + c;
      st0 = load_state<false>(chst, plane, 0, idx);
      st1 = load_state<false>(chst, plane, 1, idx);
    }
    put_state(chs[0], row, lane, st0);
    put_state(chs[1], row, lane, st1);
  }

  // Other superchunks, in scan order: causal 0 .. sc-1, anti-causal nsup-1 .. sc+1. Row r folds the
  // r-th of kSupChunks contiguous parts of each list.
  {
    const int64_t plane = static_cast<int64_t>(B) * nsup * C;
    const int64_t sbase = static_cast<int64_t>(b) * nsup * C + c;
#pragma unroll
    for (int d = 0; d < 2; ++d) {
      const int cnt = d == 0 ? sc : nsup - 1 - sc;
      const int per = (cnt + kSupChunks - 1) / kSupChunks;
      const int lo = min(row * per, cnt), hi = min(lo + per, cnt);
      State agg = empty_state();
      float len = 0.f;
      if (cvalid) {
        for (int i = lo; i < hi; i += 4) {
          State ys[4];
          float lns[4];
#pragma unroll
          for (int q = 0; q < 4; ++q) {  // unconditional loads, see carry_kernel
            const int ii = min(i + q, hi - 1);
            const int s = d == 0 ? ii : nsup - 1 - ii;
            lns[q] = static_cast<float>(min(T - s * kSupTokens, kSupTokens));
            ys[q] = load_state<false>(sup, plane, d, sbase + static_cast<int64_t>(s) * C);
          }
#pragma unroll
          for (int q = 0; q < 4; ++q) {
            if (i + q < hi) {
              agg = combine<false>(agg, ys[q], lns[q], w2);
              len += lns[q];
            }
          }
        }
      }
      put_state(part[d], row, lane, agg);
      plen[d][row][lane] = len;
    }
  }
  __syncthreads();
  if (row < 2 && cvalid) {  // warp 0: causal carries, warp 1: anti-causal
    const int d = row;
    State run = empty_state();
#pragma unroll
    for (int r = 0; r < kSupChunks; ++r) run = combine<false>(run, get_state(part[d], r, lane), plen[d][r][lane], w2);
#pragma unroll
    for (int i = 0; i < kSupChunks; ++i) {
      const int r = d == 0 ? i : kSupChunks - 1 - i;
      const int g = sc * kSupChunks + r;
      if (g < nch) {
        const State s = get_state(chs[d], r, lane);
        put_state(chs[d], r, lane, run);
        run = combine<false>(run, s, static_cast<float>(min(T - g * kChunk, kChunk)), w2);
      }
    }
  }
  __syncthreads();
  if (!valid) return;
  const State cc = get_state(chs[0], row, lane);
  const State ca = get_state(chs[1], row, lane);
  float k2[kChunk], vv[kChunk];
  load_chunk(kin, vin, base, n, C, k2, vv);
  out_sweep<out_t, WRITE_LSE, GATED>(k2, vv, n, w2, u2, cc, ca, y + base, WRITE_LSE ? lse + base : nullptr,
                                     (WRITE_LSE && yf != nullptr) ? yf + base : nullptr,
                                     GATED ? gate + base : nullptr, C);
}

// ---------------------------------------------------------------------------------------------
// Pass 3 (backward). With kappa_t = -lse2_t (so alpha_t = g_t 2^kappa_t = g_t / D_t):
//   P_i = sum_{t!=i} 2^(kappa_t - (|t-i|-1) w2) g_t,  Q_i = same with g_t y_t,  R*, S* their d/dw
//   dv_i = 2^k2_i P_i + o_i,  dk_i = 2^k2_i (v_i P_i - Q_i) + o_i (v_i - y_i),  o_i = 2^(u2+k2_i+kappa_i) g_i
//   dw = sum_i 2^k2_i (v_i RP_i - RQ_i),  du = sum_i o_i (v_i - y_i)
// 2^(k2_i + scale) <= 1 because D_t contains the term of token i, so each direction's share is
// formed on its own, without a common scale.
template <typename scalar_t>
__global__ void bwd_out_kernel(const scalar_t* __restrict__ kin, const scalar_t* __restrict__ vin,
                               const scalar_t* __restrict__ gin, const float* __restrict__ yf,
                               const float* __restrict__ lse, const float* __restrict__ w,
                               const float* __restrict__ u, const float* __restrict__ carry,
                               scalar_t* __restrict__ dk, scalar_t* __restrict__ dv, float* __restrict__ dwp,
                               float* __restrict__ dup, int B, int T, int C, int nch) {
  ChunkThread q;
  if (!chunk_thread(T, C, nch, q)) return;
  const int n = q.n;
  const int64_t idx = q.idx;
  const int64_t base = q.base;
  const float w2 = w[q.c] * kLog2e;
  const float u2 = u[q.c] * kLog2e;
  float k2[kChunk], vv[kChunk], gg[kChunk], gy[kChunk], kap[kChunk];
  load_chunk(kin, vin, base, n, C, k2, vv);
  load_rows(gin, base, n, C, 1.f, gg);
  load_rows(yf, base, n, C, 1.f, gy);
  load_rows(lse, base, n, C, -1.f, kap);
#pragma unroll
  for (int j = 0; j < kChunk; ++j) gy[j] *= gg[j];
  const int64_t plane = static_cast<int64_t>(B) * nch * C;
  float dva[kChunk], dka[kChunk];
  float dw_acc = 0.f, du_acc = 0.f;
  {
    State s = load_state<true>(carry, plane, 1, idx);
#pragma unroll
    for (int j = kChunk - 1; j >= 0; --j) {
      if (j < n) {
        const float a = ex2(k2[j] + s.p);
        dva[j] = a * s.s1;
        dka[j] = a * (vv[j] * s.s1 - s.s2);
        dw_acc += a * (vv[j] * s.r1 - s.r2);
        float e1, e2;
        const float q = exp2_pair(s.p - w2, kap[j], e1, e2);
        s.r1 = e1 * (s.r1 - s.s1);
        s.r2 = e1 * (s.r2 - s.s2);
        s.s1 = e1 * s.s1 + e2 * gg[j];
        s.s2 = e1 * s.s2 + e2 * gy[j];
        s.p = q;
      }
    }
  }
  State s = load_state<true>(carry, plane, 0, idx);
#pragma unroll
  for (int j = 0; j < kChunk; ++j) {
    if (j < n) {
      const float a = ex2(k2[j] + s.p);
      const float eo = ex2(u2 + k2[j] + kap[j]);
      const float o = eo * gg[j];
      const float oy = eo * gy[j];
      const float own_k = o * vv[j] - oy;
      const float dvj = dva[j] + a * s.s1 + o;
      const float dkj = dka[j] + a * (vv[j] * s.s1 - s.s2) + own_k;
      dw_acc += a * (vv[j] * s.r1 - s.r2);
      du_acc += own_k;
      const int64_t off = base + static_cast<int64_t>(j) * C;
      dv[off] = from_f<scalar_t>(dvj);
      dk[off] = from_f<scalar_t>(dkj);
      float e1, e2;
      const float q = exp2_pair(s.p - w2, kap[j], e1, e2);
      s.r1 = e1 * (s.r1 - s.s1);
      s.r2 = e1 * (s.r2 - s.s2);
      s.s1 = e1 * s.s1 + e2 * gg[j];
      s.s2 = e1 * s.s2 + e2 * gy[j];
      s.p = q;
    }
  }
  dwp[idx] = dw_acc;
  dup[idx] = du_acc;
}

// Sums the rows of two (rows, C) float32 planes in a fixed order: out[plane][c] = sum_r in[plane][r][c].
// Block = 32 channels x 32 row groups; each thread keeps 4 independent partial sums, then one warp
// adds the 32 row-group sums in order. Deterministic (no atomics).
__global__ void __launch_bounds__(1024)
    column_sum_kernel(const float* __restrict__ in, float* __restrict__ out0, float* __restrict__ out1, int rows,
                      int C) {
  __shared__ float sh[32][33];
  const int lane = threadIdx.x;
  const int grp = threadIdx.y;
  const int c = blockIdx.x * 32 + lane;
  const int plane = blockIdx.y;
  float acc0 = 0.f, acc1 = 0.f, acc2 = 0.f, acc3 = 0.f;
  if (c < C) {
    const float* p = in + static_cast<int64_t>(plane) * rows * C + c;
    int r = grp;
    for (; r + 96 < rows; r += 128) {
      acc0 += p[static_cast<int64_t>(r) * C];
      acc1 += p[static_cast<int64_t>(r + 32) * C];
      acc2 += p[static_cast<int64_t>(r + 64) * C];
      acc3 += p[static_cast<int64_t>(r + 96) * C];
    }
    for (; r < rows; r += 32) acc0 += p[static_cast<int64_t>(r) * C];
  }
  sh[grp][lane] = (acc0 + acc1) + (acc2 + acc3);
  __syncthreads();
  if (grp == 0 && c < C) {
    float t = 0.f;
#pragma unroll
    for (int g = 0; g < 32; ++g) t += sh[g][lane];
    (plane == 0 ? out0 : out1)[c] = t;
  }
}

// ---- host launchers ----

// one thread per (chunk, channel) of a batch element along x, batch along y
inline dim3 grid_for(int nch, int C, int B) {
  return dim3(static_cast<unsigned>((static_cast<int64_t>(nch) * C + kThreads - 1) / kThreads), B);
}

template <bool GRAD>
void launch_carry(const float* summ, float* carry, const float* w, int B, int T, int C, int nch,
                  cudaStream_t stream) {
  const dim3 block(32, 32);
  const int64_t blocks32 = static_cast<int64_t>((C + 31) / 32) * B * 2;
  if (blocks32 < 128) {  // few 32-channel blocks (batch 1): twice as many 16-channel blocks
    carry_kernel<GRAD, 16><<<dim3((C + 15) / 16, B, 2), block, 0, stream>>>(summ, carry, w, B, T, C, nch);
  } else {
    carry_kernel<GRAD, 32><<<dim3((C + 31) / 32, B, 2), block, 0, stream>>>(summ, carry, w, B, T, C, nch);
  }
}

// The two-launch forward while its blocks fit in one wave (3 of 256 threads per SM at 80 registers)
// and every block's fold of the other superchunks stays short. Beyond one wave the three-launch
// forward is faster (H200: (8, 4096, 384) bf16 110 vs 142 us, (1, 16384, 384) 55 vs 82 us): the
// fused kernel's blocks then wait on their serial carry steps instead of overlapping them.
constexpr int kFusedBlocksPerSm = 3;
constexpr int kMaxSupFused = 128;

template <typename scalar_t, typename out_t, bool WRITE_LSE, bool GATED>
void launch_forward_pass(const scalar_t* k, const scalar_t* v, const float* w, const float* u, out_t* y, float* lse,
                         float* yf, const out_t* gate, float* summ, float* carry, int B, int T, int C, int num_sms,
                         cudaStream_t stream) {
  const int nch = (T + kChunk - 1) / kChunk;
  const int nsup = (nch + kSupChunks - 1) / kSupChunks;
  const int64_t fused_blocks = static_cast<int64_t>((C + kSupLanes - 1) / kSupLanes) * nsup * B;
  if (nsup <= kMaxSupFused && fused_blocks <= static_cast<int64_t>(kFusedBlocksPerSm) * num_sms) {
    const dim3 grid((C + kSupLanes - 1) / kSupLanes, nsup, B);
    const dim3 block(kSupLanes, kSupChunks);
    sup_summary_kernel<scalar_t><<<grid, block, 0, stream>>>(k, v, w, summ, carry, B, T, C, nch, nsup);
    fwd_fused_kernel<scalar_t, out_t, WRITE_LSE, GATED>
        <<<grid, block, 0, stream>>>(k, v, w, u, summ, carry, y, lse, yf, gate, B, T, C, nch, nsup);
    return;
  }
  summary_kernel<scalar_t, false>
      <<<grid_for(nch, C, B), kThreads, 0, stream>>>(k, v, nullptr, nullptr, w, summ, B, T, C, nch);
  launch_carry<false>(summ, carry, w, B, T, C, nch, stream);
  fwd_out_kernel<scalar_t, out_t, WRITE_LSE, GATED>
      <<<grid_for(nch, C, B), kThreads, 0, stream>>>(k, v, w, u, carry, y, lse, yf, gate, B, T, C, nch);
}

}  // namespace

template <typename scalar_t>
void launch_forward(const scalar_t* k, const scalar_t* v, const float* w, const float* u, void* y, float* lse,
                    float* yf, const scalar_t* gate, float* summ, float* carry, int B, int T, int C,
                    bool fp32_out_with_lse, int num_sms, cudaStream_t stream) {
  if (fp32_out_with_lse) {
    launch_forward_pass<scalar_t, float, true, false>(k, v, w, u, static_cast<float*>(y), lse, nullptr, nullptr, summ,
                                                      carry, B, T, C, num_sms, stream);
  } else if (lse != nullptr) {
    launch_forward_pass<scalar_t, scalar_t, true, false>(k, v, w, u, static_cast<scalar_t*>(y), lse, yf, nullptr,
                                                         summ, carry, B, T, C, num_sms, stream);
  } else if (gate != nullptr) {
    launch_forward_pass<scalar_t, scalar_t, false, true>(k, v, w, u, static_cast<scalar_t*>(y), nullptr, nullptr,
                                                         gate, summ, carry, B, T, C, num_sms, stream);
  } else {
    launch_forward_pass<scalar_t, scalar_t, false, false>(k, v, w, u, static_cast<scalar_t*>(y), nullptr, nullptr,
                                                          nullptr, summ, carry, B, T, C, num_sms, stream);
  }
}

template <typename scalar_t>
void launch_backward(const scalar_t* k, const scalar_t* v, const scalar_t* g, const float* yf, const float* lse,
                     const float* w, const float* u, float* summ, float* carry, scalar_t* dk, scalar_t* dv,
                     float* dwp, float* dup, float* dw, float* du, int B, int T, int C, cudaStream_t stream) {
  const int nch = (T + kChunk - 1) / kChunk;
  summary_kernel<scalar_t, true>
      <<<grid_for(nch, C, B), kThreads, 0, stream>>>(nullptr, g, lse, yf, w, summ, B, T, C, nch);
  launch_carry<true>(summ, carry, w, B, T, C, nch, stream);
  bwd_out_kernel<scalar_t><<<grid_for(nch, C, B), kThreads, 0, stream>>>(k, v, g, yf, lse, w, u, carry, dk, dv, dwp,
                                                                      dup, B, T, C, nch);
  // dwp and dup are the two planes of one (2, B * nch, C) buffer
  column_sum_kernel<<<dim3((C + 31) / 32, 2), dim3(32, 32), 0, stream>>>(dwp, dw, du, B * nch, C);
}

#define RWKVSAM_INSTANTIATE(T)                                                                           \
  template void launch_forward<T>(const T*, const T*, const float*, const float*, void*, float*, float*,  \
                                  const T*, float*, float*, int, int, int, bool, int, cudaStream_t);           \
  template void launch_backward<T>(const T*, const T*, const T*, const float*, const float*, const float*, \
                                   const float*, float*, float*, T*, T*, float*, float*, float*, float*, int, \
                                   int, int, cudaStream_t);

RWKVSAM_INSTANTIATE(float)
RWKVSAM_INSTANTIATE(__half)
RWKVSAM_INSTANTIATE(__nv_bfloat16)

}  // namespace rwkvsam
