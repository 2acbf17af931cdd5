// Shared by the CUDA kernels of prehab-svd's three ops, one file per op as in prehab_svd/kernels/
// (covariance.cu, stable_rank.cu, lowrank_linear.cu; the math is prehab_svd/ops/reference.py): the
// includes, the small device helpers (conversions, warp and block sums, cp.async, vector and tile
// loads) and the host helpers of the launchers.
//
// Every kernel is correct for any shape and stride (odd d, T = 1, misaligned rows): the 16-byte
// vector paths are template variants chosen on the host only when every row start is 16-byte aligned,
// the others load element by element. Everything launches on the current stream under a device guard.
#pragma once

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>
#include <torch/version.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <type_traits>

#include "prehab_svd.h"

#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
#define PREHAB_SM80 1  // cp.async and bf16 WMMA need compute capability 8.0
#else
#define PREHAB_SM80 0
#endif

namespace prehab_svd {
namespace kern {

using namespace nvcuda;

// ------------------------------------------------------------------------------------------------
// small device helpers
// ------------------------------------------------------------------------------------------------

template <typename T>
struct Cvt;
template <>
struct Cvt<float> {
  static __device__ __forceinline__ float to(float v) { return v; }
  static __device__ __forceinline__ float from(float v) { return v; }
};
template <>
struct Cvt<__half> {
  static __device__ __forceinline__ float to(__half v) { return __half2float(v); }
  static __device__ __forceinline__ __half from(float v) { return __float2half_rn(v); }
  static __device__ __forceinline__ unsigned short bits(float v) { return __half_as_ushort(__float2half_rn(v)); }
};
template <>
struct Cvt<__nv_bfloat16> {
  static __device__ __forceinline__ float to(__nv_bfloat16 v) { return __bfloat162float(v); }
  static __device__ __forceinline__ __nv_bfloat16 from(float v) { return __float2bfloat16_rn(v); }
  static __device__ __forceinline__ unsigned short bits(float v) {
    return __bfloat16_as_ushort(__float2bfloat16_rn(v));
  }
};

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Sum over the block (NT threads, a multiple of 32); every thread gets it. The order of the additions
// depends only on the thread layout, so every block of a grid computes bitwise the same sum of the same
// data (the stable-rank kernels rely on this to agree on scalars without a separate launch).
template <int NT>
__device__ __forceinline__ float block_sum(float v, float* red) {
  v = warp_sum(v);
  __syncthreads();  // red may still be read by a previous call
  if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = v;
  __syncthreads();
  float s = 0.f;
#pragma unroll
  for (int i = 0; i < NT / 32; ++i) s += red[i];
  return s;
}

__device__ __forceinline__ float safe_inv(float s) { return s > 0.f ? __frcp_rn(s) : 0.f; }

// 16-byte asynchronous copy global -> shared that reads only the first n (0..16) bytes at gmem and
// zero-fills the rest (PTX cp.async's src-size): a chunk straddling the end of a row is copied
// without reading past it. gmem must be 16-byte aligned even when n < 16.
__device__ __forceinline__ void cp_async16_n(void* smem, const void* gmem, int n) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem), "r"(n));
#endif
}
// 16-byte asynchronous copy global -> shared; pred false writes 16 zero bytes (reads nothing).
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool pred) {
  cp_async16_n(smem, gmem, pred ? 16 : 0);
}
__device__ __forceinline__ void cp_async_commit() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\n" ::);
#endif
}
template <int N>
__device__ __forceinline__ void cp_async_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
#endif
}

// E consecutive elements at p (16-byte aligned; E·sizeof(T) a multiple of 16) as floats.
template <typename T, int E>
__device__ __forceinline__ void load_vec(const T* __restrict__ p, float (&out)[E]) {
  static_assert((E * sizeof(T)) % 16 == 0, "whole 16-byte vectors only");
  constexpr int PER = 16 / sizeof(T);
#pragma unroll
  for (int v = 0; v < E / PER; ++v) {
    const uint4 raw = __ldg(reinterpret_cast<const uint4*>(p) + v);
    const T* t = reinterpret_cast<const T*>(&raw);
#pragma unroll
    for (int e = 0; e < PER; ++e) out[v * PER + e] = Cvt<T>::to(t[e]);
  }
}

// A [ROWS][COLS] tile of a row-major matrix g (row stride ldg elements) into shared memory s (row
// stride LDS), rows row0.. (valid below row_end), columns col0.. (valid below col_end); the rest is
// zero. VEC: 16-byte cp.async chunks; the caller guarantees 16-byte aligned rows and col0 a multiple
// of the chunk. A chunk that straddles col_end (a ragged K such as the rank 819 of a padded U) reads
// only its valid bytes (cp.async src-size) and zero-fills the rest, so col_end may be anything. Else
// (not VEC) element by element.
template <typename T, int ROWS, int COLS, int LDS, int NT, bool VEC>
__device__ __forceinline__ void load_tile(T* __restrict__ s, const T* __restrict__ g, int64_t ldg, int64_t row0,
                                          int64_t row_end, int64_t col0, int64_t col_end) {
  if constexpr (VEC) {
    constexpr int E = 16 / sizeof(T);
    constexpr int CPR = COLS / E;
    static_assert(COLS % E == 0 && (LDS * sizeof(T)) % 16 == 0, "16-byte chunks");
#pragma unroll
    for (int q0 = 0; q0 < ROWS * CPR; q0 += NT) {
      const int q = q0 + static_cast<int>(threadIdx.x);
      if (ROWS * CPR % NT == 0 || q < ROWS * CPR) {
        const int r = q / CPR, c = (q % CPR) * E;
        const int64_t gr = row0 + r, gc = col0 + c;
        const bool ok = gr < row_end && gc < col_end;
        const int bytes = ok ? static_cast<int>(min(static_cast<int64_t>(E), col_end - gc) * sizeof(T)) : 0;
        cp_async16_n(s + r * LDS + c, ok ? static_cast<const void*>(g + gr * ldg + gc) : static_cast<const void*>(g),
                     bytes);
      }
    }
  } else {
#pragma unroll 4
    for (int e0 = 0; e0 < ROWS * COLS; e0 += NT) {
      const int e = e0 + static_cast<int>(threadIdx.x);
      if (ROWS * COLS % NT == 0 || e < ROWS * COLS) {
        const int r = e / COLS, c = e % COLS;
        const int64_t gr = row0 + r, gc = col0 + c;
        s[r * LDS + c] = (gr < row_end && gc < col_end) ? g[gr * ldg + gc] : Cvt<T>::from(0.f);
      }
    }
  }
}

// The same tile from an fp32 matrix, rounded to the 16-bit T on the way into shared memory (the
// low-rank linear's fp32 intermediate z). g's rows must be 16-byte aligned (ldg % 4 == 0, the
// launcher pads z's rows to a multiple of 8); a chunk that straddles col_end is read element-wise.
template <typename T, int ROWS, int COLS, int LDS, int NT>
__device__ __forceinline__ void load_tile_f32_as(T* __restrict__ s, const float* __restrict__ g, int64_t ldg,
                                                 int64_t row0, int64_t row_end, int64_t col0, int64_t col_end) {
  constexpr int CPR = COLS / 8;
#pragma unroll
  for (int q0 = 0; q0 < ROWS * CPR; q0 += NT) {
    const int q = q0 + static_cast<int>(threadIdx.x);
    if (ROWS * CPR % NT == 0 || q < ROWS * CPR) {
      const int r = q / CPR, c = (q % CPR) * 8;
      const int64_t gr = row0 + r, gc = col0 + c;
      float v[8];
      if (gr < row_end && gc + 8 <= col_end) {
        const float4 lo = *reinterpret_cast<const float4*>(g + gr * ldg + gc);
        const float4 hi = *reinterpret_cast<const float4*>(g + gr * ldg + gc + 4);
        v[0] = lo.x; v[1] = lo.y; v[2] = lo.z; v[3] = lo.w;
        v[4] = hi.x; v[5] = hi.y; v[6] = hi.z; v[7] = hi.w;
      } else {
#pragma unroll
        for (int e = 0; e < 8; ++e) v[e] = (gr < row_end && gc + e < col_end) ? g[gr * ldg + gc + e] : 0.f;
      }
      uint4 packed;
      packed.x = Cvt<T>::bits(v[0]) | (static_cast<unsigned>(Cvt<T>::bits(v[1])) << 16);
      packed.y = Cvt<T>::bits(v[2]) | (static_cast<unsigned>(Cvt<T>::bits(v[3])) << 16);
      packed.z = Cvt<T>::bits(v[4]) | (static_cast<unsigned>(Cvt<T>::bits(v[5])) << 16);
      packed.w = Cvt<T>::bits(v[6]) | (static_cast<unsigned>(Cvt<T>::bits(v[7])) << 16);
      *reinterpret_cast<uint4*>(s + r * LDS + c) = packed;
    }
  }
}

}  // namespace kern

// ==================================================================================================
// host helpers of the launchers
// ==================================================================================================

// The launchers (in the op files) name the kernels and their constants unqualified. The helpers are
// inline: one definition for the three translation units.
using namespace kern;

inline int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }
inline int64_t round_up(int64_t a, int64_t b) { return cdiv(a, b) * b; }

inline int num_sms() { return at::cuda::getCurrentDeviceProperties()->multiProcessorCount; }

inline bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

// PREHAB_SVD_CUDA_NAN_WORKSPACES=1 (tests): every buffer a kernel must fully overwrite starts as NaN,
// so an element no kernel wrote shows up. Read at each call (a getenv is nothing next to a launch).
inline bool nan_workspaces() {
  const char* v = std::getenv("PREHAB_SVD_CUDA_NAN_WORKSPACES");
  return v != nullptr && v[0] != '\0' && v[0] != '0';
}

inline at::Tensor workspace(at::IntArrayRef sizes, const at::TensorOptions& opts) {
  return nan_workspaces() ? at::full(sizes, std::numeric_limits<float>::quiet_NaN(), opts) : at::empty(sizes, opts);
}

inline bool is16(at::ScalarType t) { return t == at::kHalf || t == at::kBFloat16; }

inline void check_cuda(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), "prehab_svd CUDA backend: ", name, " must be a CUDA tensor, got ", t.device());
}

inline void check_arch() {
  const auto* p = at::cuda::getCurrentDeviceProperties();
  TORCH_CHECK(p->major >= 8, "prehab_svd CUDA backend needs compute capability >= 8.0 (cp.async, bf16 MMA); ",
              p->name, " is ", p->major, ".", p->minor);
}

template <typename T>
struct CudaType {
  using type = T;
};
template <>
struct CudaType<at::Half> {
  using type = __half;
};
template <>
struct CudaType<at::BFloat16> {
  using type = __nv_bfloat16;
};

}  // namespace prehab_svd
