// Launchers of the Bi-WKV CUDA kernels (bi_wkv_kernels.cu); the op glue lives in bi_wkv.cpp.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

namespace rwkvsam {

// Tokens per chunk: one thread handles kChunk consecutive tokens of one (batch, channel).
constexpr int kChunk = 16;

// y: (B, T, C) in scalar_t, or float32 together with lse (log2 of every denominator) when
// fp32_out_with_lse. Otherwise a non-null lse asks for the backward's saved state with y in scalar_t:
// lse, and y once more in float32 into yf when yf is not null (pass null when scalar_t is float).
// gate: null, or (with y in scalar_t and no lse) a (B, T, C) tensor r: y = sigmoid(r) * Bi-WKV.
// summ, carry: float32 scratch of 2 * 3 * B * ceil(T / kChunk) * C elements each. num_sms: the
// GPU's multiprocessor count (the launch shape depends on how many blocks fit in one wave).
template <typename scalar_t>
void launch_forward(const scalar_t* k, const scalar_t* v, const float* w, const float* u, void* y, float* lse,
                    float* yf, const scalar_t* gate, float* summ, float* carry, int B, int T, int C,
                    bool fp32_out_with_lse, int num_sms, cudaStream_t stream);

// yf, lse: y in float32 and lse2 from launch_forward (either mode). summ, carry: float32 scratch of
// 2 * 5 * B * ceil(T / kChunk) * C elements each. dwp, dup: the two consecutive planes of a
// (2, B * ceil(T / kChunk), C) buffer of partial sums; dw, du: (C,) float32 outputs.
template <typename scalar_t>
void launch_backward(const scalar_t* k, const scalar_t* v, const scalar_t* g, const float* yf, const float* lse,
                     const float* w, const float* u, float* summ, float* carry, scalar_t* dk, scalar_t* dv,
                     float* dwp, float* dup, float* dw, float* du, int B, int T, int C, cudaStream_t stream);

}  // namespace rwkvsam
