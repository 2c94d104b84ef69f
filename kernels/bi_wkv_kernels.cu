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

// ---------------------------------------------------------------------------------------------
// Pass 1: chunk states. Forward: key k2, values (v, 1). Backward: key -lse2, values (g, g*y).
// Causal state of a chunk = its tokens seen from just after its last token (distance n-1-j);
// anti-causal = seen from just before its first token (distance j).
template <typename scalar_t, bool GRAD>
__global__ void summary_kernel(const scalar_t* __restrict__ kin, const scalar_t* __restrict__ ain,
                               const float* __restrict__ lse, const float* __restrict__ yf,
                               const float* __restrict__ w, float* __restrict__ out, int B, int T, int C,
                               int nch) {
  // grid: (ceil(nch * C / kThreads), B); 32-bit index arithmetic inside one batch element
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= nch * C) return;
  const int b = blockIdx.y;
  const int c = i % C;
  const int chunk = i / C;
  const int64_t bc = static_cast<int64_t>(b) * nch + chunk;  // b * nch + chunk
  const int64_t idx = bc * C + c;
  const int64_t total = static_cast<int64_t>(B) * nch * C;
  const int s0 = chunk * kChunk;
  const int n = min(T - s0, kChunk);
  const float w2 = w[c] * kLog2e;
  float key[kChunk], a1[kChunk], a2[kChunk];
  // Loads are unconditional (rows past the chunk's end re-read its last row and are ignored below):
  // a guarded load becomes a branch per token and the loads then wait for each other.
#pragma unroll
  for (int j = 0; j < kChunk; ++j) {
    const int64_t off = (static_cast<int64_t>(b) * T + s0 + min(j, n - 1)) * C + c;
    if (GRAD) {
      key[j] = -lse[off];
      a1[j] = to_f(ain[off]);
      a2[j] = a1[j] * yf[off];
    } else {
      key[j] = to_f(kin[off]) * kLog2e;
      a1[j] = to_f(ain[off]);
      a2[j] = 1.f;
    }
  }
  const int64_t plane = total;
#pragma unroll
  for (int d = 0; d < 2; ++d) {
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
        s.s1 += e * a1[j];
        s.s2 += e * a2[j];
        if (GRAD) {
          s.r1 -= dist * e * a1[j];
          s.r2 -= dist * e * a2[j];
        }
      }
    }
    store_state<GRAD>(out, plane, d, idx, s);
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
// Pass 3 (forward): one thread per (b, chunk, c). Anti-causal sweep right-to-left keeps B_j in
// registers, causal sweep left-to-right combines A_j, B_j and the token's own term.
// WRITE_LSE: also writes lse2 and, when yf is not null, y in float32 (the backward's inputs).
template <typename scalar_t, typename out_t, bool WRITE_LSE>
__global__ void __launch_bounds__(kThreads, 5) fwd_out_kernel(const scalar_t* __restrict__ kin, const scalar_t* __restrict__ vin,
                               const float* __restrict__ w, const float* __restrict__ u,
                               const float* __restrict__ carry, out_t* __restrict__ y, float* __restrict__ lse,
                               float* __restrict__ yf, int B, int T, int C, int nch) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= nch * C) return;
  const int b = blockIdx.y;
  const int c = i % C;
  const int chunk = i / C;
  const int64_t bc = static_cast<int64_t>(b) * nch + chunk;
  const int64_t idx = bc * C + c;
  const int64_t total = static_cast<int64_t>(B) * nch * C;
  const int s0 = chunk * kChunk;
  const int n = min(T - s0, kChunk);
  const float w2 = w[c] * kLog2e;
  const float u2 = u[c] * kLog2e;
  const int64_t base = (static_cast<int64_t>(b) * T + s0) * C + c;
  float k2[kChunk], vv[kChunk];
#pragma unroll
  for (int j = 0; j < kChunk; ++j) {  // unconditional loads, see summary_kernel
    const int64_t off = base + static_cast<int64_t>(min(j, n - 1)) * C;
    k2[j] = to_f(kin[off]) * kLog2e;
    vv[j] = to_f(vin[off]);
  }
  const int64_t plane = total;
  const State cc = load_state<false>(carry, plane, 0, idx);
  const State ca = load_state<false>(carry, plane, 1, idx);

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
      const int64_t off = base + static_cast<int64_t>(j) * C;
      const float yj = __fdividef(num, den);
      y[off] = from_f<out_t>(yj);
      if (WRITE_LSE) {
        lse[off] = q + lg2(den);
        if (yf != nullptr) yf[off] = yj;
      }
      float f1, f2;
      const float q2 = exp2_pair(p - w2, k2[j], f1, f2);
      sn = f1 * sn + f2 * vv[j];
      sd = f1 * sd + f2;
      p = q2;
    }
  }
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
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= nch * C) return;
  const int b = blockIdx.y;
  const int c = i % C;
  const int chunk = i / C;
  const int64_t bc = static_cast<int64_t>(b) * nch + chunk;
  const int64_t idx = bc * C + c;
  const int64_t total = static_cast<int64_t>(B) * nch * C;
  const int s0 = chunk * kChunk;
  const int n = min(T - s0, kChunk);
  const float w2 = w[c] * kLog2e;
  const float u2 = u[c] * kLog2e;
  const int64_t base = (static_cast<int64_t>(b) * T + s0) * C + c;
  float k2[kChunk], vv[kChunk], gg[kChunk], gy[kChunk], kap[kChunk];
#pragma unroll
  for (int j = 0; j < kChunk; ++j) {  // unconditional loads, see summary_kernel
    const int64_t off = base + static_cast<int64_t>(min(j, n - 1)) * C;
    k2[j] = to_f(kin[off]) * kLog2e;
    vv[j] = to_f(vin[off]);
    gg[j] = to_f(gin[off]);
    gy[j] = gg[j] * yf[off];
    kap[j] = -lse[off];
  }
  const int64_t plane = total;
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

}  // namespace

template <typename scalar_t>
void launch_forward(const scalar_t* k, const scalar_t* v, const float* w, const float* u, void* y, float* lse,
                    float* yf, float* summ, float* carry, int B, int T, int C, bool fp32_out_with_lse,
                    cudaStream_t stream) {
  const int nch = (T + kChunk - 1) / kChunk;
  summary_kernel<scalar_t, false>
      <<<grid_for(nch, C, B), kThreads, 0, stream>>>(k, v, nullptr, nullptr, w, summ, B, T, C, nch);
  launch_carry<false>(summ, carry, w, B, T, C, nch, stream);
  if (fp32_out_with_lse) {
    fwd_out_kernel<scalar_t, float, true><<<grid_for(nch, C, B), kThreads, 0, stream>>>(
        k, v, w, u, carry, static_cast<float*>(y), lse, nullptr, B, T, C, nch);
  } else if (lse != nullptr) {
    fwd_out_kernel<scalar_t, scalar_t, true><<<grid_for(nch, C, B), kThreads, 0, stream>>>(
        k, v, w, u, carry, static_cast<scalar_t*>(y), lse, yf, B, T, C, nch);
  } else {
    fwd_out_kernel<scalar_t, scalar_t, false><<<grid_for(nch, C, B), kThreads, 0, stream>>>(
        k, v, w, u, carry, static_cast<scalar_t*>(y), nullptr, nullptr, B, T, C, nch);
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
                                  float*, float*, int, int, int, bool, cudaStream_t);                     \
  template void launch_backward<T>(const T*, const T*, const T*, const float*, const float*, const float*, \
                                   const float*, float*, float*, T*, T*, float*, float*, float*, float*, int, \
                                   int, int, cudaStream_t);

RWKVSAM_INSTANTIATE(float)
RWKVSAM_INSTANTIATE(__half)
RWKVSAM_INSTANTIATE(__nv_bfloat16)

}  // namespace rwkvsam
