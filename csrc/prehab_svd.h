// The C++ entry points of the CUDA backend, implemented one file per op as in prehab_svd/kernels/
// (covariance.cu, stable_rank.cu, lowrank_linear.cu; their shared helpers in common.cuh) and bound to
// Python in bindings.cpp.
// The math of every op is prehab_svd/ops/reference.py; these compute the same numbers on CUDA tensors.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <string>
#include <tuple>

namespace prehab_svd {

// Token counts of the low-rank linear's regimes (see lowrank_linear.cu): GEMV kernels up to kGemvMaxT tokens,
// the tensor-core decode kernels (16-bit) up to kDecodeMaxT, cuBLAS above.
constexpr int64_t kGemvMaxT = 8;
constexpr int64_t kDecodeMaxT = 64;
// Row length (elements) the low-rank linear pads its intermediate z to, and LowRankLinear pads U and
// V to (prehab_svd.layers.ALIGN): 16-byte aligned rows for every dtype.
constexpr int64_t kAlign = 16;

// Paths of lowrank_linear, for tests and benchmarks (0 = choose by the token count).
enum LowRankPath : int64_t { kPathAuto = 0, kPathGemv = 1, kPathTensorCore = 2, kPathCublas = 3 };

// In place: G += xᵀx and, with C and y, C += xᵀy. x, y [T, d] (fp32/fp16/bf16), G, C [d, d] fp32.
void covariance_update(at::Tensor G, const at::Tensor& x, const std::optional<at::Tensor>& C,
                       const std::optional<at::Tensor>& y);

// (value [B], grad [B, m, n], state [B, n] or [B, 0]) in fp32 for W [B, m, n] and M = W L (L: none,
// [n, n] or [B, n, n]). "stable" (nuclear = false): power iteration from v0 [B, n] (any scale), iters
// steps. "nuclear": Newton–Schulz with iters steps (v0 unused).
std::tuple<at::Tensor, at::Tensor, at::Tensor> stable_rank(const at::Tensor& W, const std::optional<at::Tensor>& L,
                                                           const std::optional<at::Tensor>& v0, bool nuclear,
                                                           int64_t iters);

// y = (x Vᵀ) Uᵀ + bias for x [T, in], V [r, in], U [out, r], bias [out]; into `out` ([T, out],
// contiguous, x's dtype) when given.
at::Tensor lowrank_linear(const at::Tensor& x, const at::Tensor& U, const at::Tensor& V,
                          const std::optional<at::Tensor>& bias, int64_t path, const std::optional<at::Tensor>& out);

// The compute capabilities this file was compiled for (nvcc's __CUDA_ARCH_LIST__), e.g. "900".
std::string arch_list();

}  // namespace prehab_svd
