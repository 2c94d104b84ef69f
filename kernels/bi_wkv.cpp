// PyTorch glue of the Bi-WKV CUDA kernels: argument checks, allocation, dtype dispatch. The
// functions are exposed through pybind11; rwkvsam_core/ops/cuda_ext.py defines the custom ops
//   rwkvsam::bi_wkv(Tensor w, Tensor u, Tensor k, Tensor v) -> Tensor
//   rwkvsam::bi_wkv_backward(Tensor w, Tensor u, Tensor k, Tensor v, Tensor grad_y)
//       -> (Tensor dw, Tensor du, Tensor dk, Tensor dv)
// on top of them (validating arguments in Python first), with fake implementations and autograd.
// Everything runs on the current CUDA stream, allocates through PyTorch's caching allocator and
// never synchronises, so the ops can be captured in CUDA graphs.

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/extension.h>

#include <tuple>

#include "bi_wkv.h"

namespace rwkvsam {
namespace {

void check_inputs(const at::Tensor& w, const at::Tensor& u, const at::Tensor& k, const at::Tensor& v) {
  TORCH_CHECK(k.dim() == 3, "bi_wkv: k must have shape (B, T, C), got ", k.sizes());
  TORCH_CHECK(v.sizes() == k.sizes(), "bi_wkv: v must have k's shape ", k.sizes(), ", got ", v.sizes());
  TORCH_CHECK(v.scalar_type() == k.scalar_type(), "bi_wkv: v must have k's dtype ", k.scalar_type(), ", got ",
              v.scalar_type());
  const auto st = k.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kHalf || st == at::kBFloat16,
              "bi_wkv CUDA kernel: k and v must be float32, float16 or bfloat16, got ", st);
  const int64_t C = k.size(2);
  TORCH_CHECK(w.dim() == 1 && w.size(0) == C && u.dim() == 1 && u.size(0) == C,
              "bi_wkv: w and u must have shape (C,) = (", C, ",), got w ", w.sizes(), " and u ", u.sizes());
  TORCH_CHECK(w.is_floating_point() && u.is_floating_point(), "bi_wkv: w and u must be floating point");
  TORCH_CHECK(k.is_cuda() && v.is_cuda() && w.is_cuda() && u.is_cuda(),
              "bi_wkv CUDA kernel: all inputs must be CUDA tensors");
  TORCH_CHECK(w.device() == k.device() && u.device() == k.device() && v.device() == k.device(),
              "bi_wkv: all inputs must be on one device");
  TORCH_CHECK(k.size(0) <= 65535, "bi_wkv CUDA kernel: batch size above 65535 is not supported, got ", k.size(0));
  TORCH_CHECK(((k.size(1) + kChunk - 1) / kChunk) * C < (int64_t{1} << 31),
              "bi_wkv CUDA kernel: T * C / ", kChunk, " must stay below 2^31, got T=", k.size(1), " C=", C);
}

int64_t num_chunks(int64_t T) { return (T + kChunk - 1) / kChunk; }

template <typename F>
void dispatch_dtype(at::ScalarType st, F&& f) {
  switch (st) {
    case at::kFloat:
      f(static_cast<float*>(nullptr));
      break;
    case at::kHalf:
      f(static_cast<__half*>(nullptr));
      break;
    case at::kBFloat16:
      f(static_cast<__nv_bfloat16*>(nullptr));
      break;
    default:
      TORCH_CHECK(false, "bi_wkv: unsupported dtype ", st);
  }
}

enum class FwdMode {
  kOutput,  // y in k's dtype
  kFloat,   // y in float32 and lse (the backward's recomputation)
  kSaved,   // y in k's dtype, lse, and yf = y in float32 unless k is float32 (empty then)
};

// (y, lse, yf) per mode; lse and yf undefined where the mode has none.
// gate_in: undefined, or (kOutput only) r of k's shape, dtype and device: y = sigmoid(r) * Bi-WKV.
std::tuple<at::Tensor, at::Tensor, at::Tensor> forward_impl(const at::Tensor& w_in, const at::Tensor& u_in,
                                                            const at::Tensor& k_in, const at::Tensor& v_in,
                                                            FwdMode mode, const at::Tensor& gate_in = at::Tensor()) {
  check_inputs(w_in, u_in, k_in, v_in);
  if (gate_in.defined()) {
    TORCH_CHECK(mode == FwdMode::kOutput, "bi_wkv: a gate only goes with the inference forward");
    TORCH_CHECK(gate_in.sizes() == k_in.sizes() && gate_in.scalar_type() == k_in.scalar_type() &&
                    gate_in.device() == k_in.device(),
                "bi_wkv_gated: r must have k's shape ", k_in.sizes(), ", dtype and device, got ", gate_in.sizes(),
                " ", gate_in.scalar_type(), " on ", gate_in.device());
  }
  const c10::cuda::CUDAGuard guard(k_in.device());
  const auto k = k_in.contiguous();
  const auto v = v_in.contiguous();
  const auto gate = gate_in.defined() ? gate_in.contiguous() : gate_in;
  const auto w = w_in.to(at::kFloat).contiguous();
  const auto u = u_in.to(at::kFloat).contiguous();
  const int64_t B = k.size(0), T = k.size(1), C = k.size(2);
  const bool fp32_y = mode == FwdMode::kFloat;
  auto y = at::empty(k.sizes(), k.options().dtype(fp32_y ? at::kFloat : k.scalar_type()));
  at::Tensor lse, yf;
  if (mode != FwdMode::kOutput) lse = at::empty(k.sizes(), k.options().dtype(at::kFloat));
  if (mode == FwdMode::kSaved) {
    yf = k.scalar_type() == at::kFloat ? at::empty({0}, k.options()) : at::empty(k.sizes(), k.options().dtype(at::kFloat));
  }
  if (k.numel() == 0) return {y, lse, yf};
  const int64_t nch = num_chunks(T);
  auto scratch = at::empty({2, 2 * 3 * B * nch * C}, k.options().dtype(at::kFloat));
  const auto stream = at::cuda::getCurrentCUDAStream();
  const int num_sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  float* lse_ptr = lse.defined() ? lse.data_ptr<float>() : nullptr;
  float* yf_ptr = (yf.defined() && yf.numel() > 0) ? yf.data_ptr<float>() : nullptr;
  dispatch_dtype(k.scalar_type(), [&](auto* tag) {
    using scalar_t = std::remove_pointer_t<decltype(tag)>;
    launch_forward<scalar_t>(reinterpret_cast<const scalar_t*>(k.data_ptr()),
                             reinterpret_cast<const scalar_t*>(v.data_ptr()), w.data_ptr<float>(),
                             u.data_ptr<float>(), y.data_ptr(), lse_ptr, yf_ptr,
                             gate.defined() ? reinterpret_cast<const scalar_t*>(gate.data_ptr()) : nullptr,
                             scratch[0].data_ptr<float>(),
                             scratch[1].data_ptr<float>(), static_cast<int>(B), static_cast<int>(T),
                             static_cast<int>(C), fp32_y, num_sms, stream);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {y, lse, yf};
}

at::Tensor bi_wkv_cuda(const at::Tensor& w, const at::Tensor& u, const at::Tensor& k, const at::Tensor& v) {
  return std::get<0>(forward_impl(w, u, k, v, FwdMode::kOutput));
}

// sigmoid(r) * Bi-WKV(w, u, k, v) in one pass (inference): the spatial mix's gate, rounded once.
at::Tensor bi_wkv_gated_cuda(const at::Tensor& w, const at::Tensor& u, const at::Tensor& k, const at::Tensor& v,
                             const at::Tensor& r) {
  TORCH_CHECK(r.defined(), "bi_wkv_gated: r is required");
  return std::get<0>(forward_impl(w, u, k, v, FwdMode::kOutput, r));
}

// The training forward: y plus what the backward needs, so that it does not recompute the forward.
std::tuple<at::Tensor, at::Tensor, at::Tensor> bi_wkv_forward_saved_cuda(const at::Tensor& w, const at::Tensor& u,
                                                                         const at::Tensor& k, const at::Tensor& v) {
  return forward_impl(w, u, k, v, FwdMode::kSaved);
}

using Grads = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// yf_in, lse_in: float32 (B, T, C) from the forward, or undefined to recompute them here.
Grads backward_impl(const at::Tensor& w_in, const at::Tensor& u_in, const at::Tensor& k_in, const at::Tensor& v_in,
                    const at::Tensor& g_in, const at::Tensor& yf_in, const at::Tensor& lse_in) {
  check_inputs(w_in, u_in, k_in, v_in);
  TORCH_CHECK(g_in.sizes() == k_in.sizes(), "bi_wkv_backward: grad_y must have k's shape ", k_in.sizes(),
              ", got ", g_in.sizes());
  TORCH_CHECK(g_in.device() == k_in.device(), "bi_wkv_backward: grad_y must be on k's device");
  const c10::cuda::CUDAGuard guard(k_in.device());
  const auto k = k_in.contiguous();
  const auto v = v_in.contiguous();
  const auto g = g_in.to(k.scalar_type()).contiguous();
  const auto w = w_in.to(at::kFloat).contiguous();
  const auto u = u_in.to(at::kFloat).contiguous();
  const int64_t B = k.size(0), T = k.size(1), C = k.size(2);
  auto dk = at::empty(k.sizes(), k.options());
  auto dv = at::empty(k.sizes(), k.options());
  if (k.numel() == 0) {
    return {at::zeros_like(w_in), at::zeros_like(u_in), dk, dv};
  }
  at::Tensor yf, lse;
  if (yf_in.defined()) {
    for (const auto* t : {&yf_in, &lse_in}) {
      TORCH_CHECK(t->defined() && t->sizes() == k.sizes() && t->scalar_type() == at::kFloat &&
                      t->device() == k.device(),
                  "bi_wkv_backward_saved: saved y and lse must be float32 tensors of k's shape on k's device");
    }
    yf = yf_in.contiguous();
    lse = lse_in.contiguous();
  } else {
    auto fw = forward_impl(w, u, k, v, FwdMode::kFloat);
    yf = std::get<0>(fw);
    lse = std::get<1>(fw);
  }
  const int64_t nch = num_chunks(T);
  auto scratch = at::empty({2, 2 * 5 * B * nch * C}, k.options().dtype(at::kFloat));
  auto partial = at::empty({2, B * nch, C}, k.options().dtype(at::kFloat));
  auto dw = at::empty({C}, k.options().dtype(at::kFloat));
  auto du = at::empty({C}, k.options().dtype(at::kFloat));
  const auto stream = at::cuda::getCurrentCUDAStream();
  dispatch_dtype(k.scalar_type(), [&](auto* tag) {
    using scalar_t = std::remove_pointer_t<decltype(tag)>;
    launch_backward<scalar_t>(
        reinterpret_cast<const scalar_t*>(k.data_ptr()), reinterpret_cast<const scalar_t*>(v.data_ptr()),
        reinterpret_cast<const scalar_t*>(g.data_ptr()), yf.data_ptr<float>(), lse.data_ptr<float>(),
        w.data_ptr<float>(), u.data_ptr<float>(), scratch[0].data_ptr<float>(), scratch[1].data_ptr<float>(),
        reinterpret_cast<scalar_t*>(dk.data_ptr()), reinterpret_cast<scalar_t*>(dv.data_ptr()),
        partial[0].data_ptr<float>(), partial[1].data_ptr<float>(), dw.data_ptr<float>(), du.data_ptr<float>(),
        static_cast<int>(B),
        static_cast<int>(T),
        static_cast<int>(C), stream);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  // dw, du: fixed-order reduction of the partials over (batch, chunk), deterministic run to run
  return {dw.to(w_in.scalar_type()), du.to(u_in.scalar_type()), dk, dv};
}

Grads bi_wkv_backward_cuda(const at::Tensor& w, const at::Tensor& u, const at::Tensor& k, const at::Tensor& v,
                           const at::Tensor& g) {
  return backward_impl(w, u, k, v, g, at::Tensor(), at::Tensor());
}

// y, yf, lse: the outputs of forward_saved (yf empty when k is float32: y is float32 then).
Grads bi_wkv_backward_saved_cuda(const at::Tensor& w, const at::Tensor& u, const at::Tensor& k, const at::Tensor& v,
                                 const at::Tensor& y, const at::Tensor& yf, const at::Tensor& lse,
                                 const at::Tensor& g) {
  return backward_impl(w, u, k, v, g, yf.numel() > 0 ? yf : y, lse);
}

}  // namespace
}  // namespace rwkvsam

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "Bi-WKV CUDA kernels (the torch.ops.rwkvsam.bi_wkv op is defined in rwkvsam_core/ops/cuda_ext.py)";
  m.attr("chunk") = rwkvsam::kChunk;
  m.def("forward", &rwkvsam::bi_wkv_cuda, "y = Bi-WKV(w, u, k, v), y in k's dtype");
  m.def("forward_gated", &rwkvsam::bi_wkv_gated_cuda, "y = sigmoid(r) * Bi-WKV(w, u, k, v), y in k's dtype");
  m.def("backward", &rwkvsam::bi_wkv_backward_cuda, "(dw, du, dk, dv) for grad_y (recomputes the forward)");
  m.def("forward_saved", &rwkvsam::bi_wkv_forward_saved_cuda,
        "(y in k's dtype, lse2 float32, y float32 or empty when k is float32): the training forward");
  m.def("backward_saved", &rwkvsam::bi_wkv_backward_saved_cuda,
        "(dw, du, dk, dv) from forward_saved's (y, yf, lse) and grad_y");
  m.def(
      "forward_with_lse",
      [](const at::Tensor& w, const at::Tensor& u, const at::Tensor& k, const at::Tensor& v) {
        auto r = rwkvsam::forward_impl(w, u, k, v, rwkvsam::FwdMode::kFloat);
        return std::make_tuple(std::get<0>(r), std::get<1>(r));
      },
      "(y float32, lse2 float32): forward in float32 with log2 of every denominator");
}
