// CUDA kernels of prehab-svd's covariance op and their launcher (prehab_svd/kernels/covariance.py is
// the Triton side). The math is prehab_svd/ops/reference.py; the shared helpers are in common.cuh.
//
// What is a custom kernel and what is cuBLAS (through ATen):
//
//  covariance_update   custom: one kernel computes G += xᵀx over the tiles on/above the diagonal only
//                      (each off-diagonal tile is also added, transposed, into its mirror, so G gets the
//                      full xᵀx as the reference adds it) and, in the same pass over x (each x tile
//                      staged in shared memory once), C += xᵀy (upper programs: G and C tiles; lower
//                      programs: C only). 16-bit inputs: tensor cores (WMMA 16x16x16 = mma.sync on
//                      sm_80/90, fp32 accumulators), 16-byte cp.async double-buffered tile loads when x
//                      is aligned; fp32 inputs: exact fp32 FMA (no TF32), like the reference. When the
//                      d×d tiles are too few to fill the GPU, the tokens are split across programs that
//                      add with fp32 atomics. No d×d temporaries.

#include "common.cuh"

namespace prehab_svd {
namespace kern {

// ------------------------------------------------------------------------------------------------
// covariance: G += xᵀx (upper tiles, mirrored), C += xᵀy
// ------------------------------------------------------------------------------------------------

constexpr int COV_BD = 64;  // d-tile (both sides)

struct CovArgs {
  const void* x;
  const void* y;
  float* G;
  float* C;
  int64_t T, d, ldx, ldy, g0, g1, c0, c1;
  int64_t n_upper;           // programs 0..n_upper-1: pairs i <= j (G, and C); the rest: i > j (C only)
  int64_t tokens_per_split;  // gridDim.y splits the tokens; > 1 split adds with atomics
  int has_c;
  int atomic;
};

// p = j(j+1)/2 + i, 0 <= i <= j (upper pairs, column by column) -> (i, j); exact integer correction.
__device__ __forceinline__ void upper_pair(int64_t p, int64_t& i, int64_t& j) {
  int64_t jj = static_cast<int64_t>((sqrt(8.0 * static_cast<double>(p) + 1.0) - 1.0) * 0.5);
  while (jj > 0 && jj * (jj + 1) / 2 > p) --jj;
  while ((jj + 1) * (jj + 2) / 2 <= p) ++jj;
  j = jj;
  i = p - jj * (jj + 1) / 2;
}

// q = i(i-1)/2 + j, 0 <= j < i (strictly lower pairs, row by row) -> (i, j).
__device__ __forceinline__ void lower_pair(int64_t q, int64_t& i, int64_t& j) {
  int64_t ii = static_cast<int64_t>((sqrt(8.0 * static_cast<double>(q) + 1.0) + 1.0) * 0.5);
  while (ii > 1 && ii * (ii - 1) / 2 > q) --ii;
  while ((ii + 1) * ii / 2 <= q) ++ii;
  i = ii;
  j = q - ii * (ii - 1) / 2;
}

// dst += the 64×64 tile E (row stride lde), placed at rows row0.., columns col0.. of the d×d matrix
// (strides s0, s1), or with `transposed` its transpose at rows col0.., columns row0.. (the mirror
// tile). Consecutive threads write consecutive columns of dst in both cases.
template <int NT>
__device__ __forceinline__ void tile_add(const float* E, int lde, float* dst, int64_t s0, int64_t s1, int64_t row0,
                                         int64_t col0, int64_t d, bool transposed, bool atomic) {
  for (int e = threadIdx.x; e < COV_BD * COV_BD; e += NT) {
    const int a = e / COV_BD, b = e % COV_BD;
    const int r = transposed ? b : a, c = transposed ? a : b;  // element (r, c) of E
    const int64_t gr = transposed ? col0 + c : row0 + r;
    const int64_t gc = transposed ? row0 + r : col0 + c;
    if (gr < d && gc < d) {
      float* p = dst + gr * s0 + gc * s1;
      const float v = E[r * lde + c];
      if (atomic) {
        atomicAdd(p, v);
      } else {
        *p += v;
      }
    }
  }
}

// Tensor-core version (16-bit x, y). 4 warps, a 64×64 output tile per matrix, each warp 32×32
// (2×2 WMMA fragments for G, 2×2 for C: 64 fp32 accumulators per thread); 32 tokens per step,
// double-buffered. The A operand x_iᵀ is the token-major x tile read column-major, B = x_j (or y_j)
// row-major, so no transposes are materialised.
constexpr int COVT_BT = 32, COVT_LDS = COV_BD + 8, COVT_NT = 128, COVT_LDE = COV_BD + 4;

template <typename T, bool VEC>
__global__ void __launch_bounds__(COVT_NT) cov_tc_kernel(const CovArgs a) {
#if PREHAB_SM80
  constexpr int TILE = COVT_BT * COVT_LDS;
  constexpr int PIPE_BYTES = 2 * 3 * TILE * static_cast<int>(sizeof(T));
  constexpr int EPI_BYTES = COV_BD * COVT_LDE * static_cast<int>(sizeof(float));
  __shared__ __align__(128) unsigned char smem[PIPE_BYTES > EPI_BYTES ? PIPE_BYTES : EPI_BYTES];
  T* st = reinterpret_cast<T*>(smem);

  const int64_t pid = blockIdx.x;
  const bool upper = pid < a.n_upper;
  int64_t bi, bj;
  if (upper) {
    upper_pair(pid, bi, bj);
  } else {
    lower_pair(pid - a.n_upper, bi, bj);
  }
  const bool diag = upper && bi == bj;
  const bool do_c = a.has_c != 0;
  const int64_t ci = bi * COV_BD, cj = bj * COV_BD;
  const int64_t t_begin = static_cast<int64_t>(blockIdx.y) * a.tokens_per_split;
  const int64_t t_end = min(a.T, t_begin + a.tokens_per_split);
  const T* x = static_cast<const T*>(a.x);
  const T* y = static_cast<const T*>(a.y);
  const int warp = threadIdx.x >> 5;
  const int wr = warp >> 1, wc = warp & 1;

  wmma::fragment<wmma::accumulator, 16, 16, 16, float> accg[2][2], accc[2][2];
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      wmma::fill_fragment(accg[i][j], 0.f);
      wmma::fill_fragment(accc[i][j], 0.f);
    }

  auto load_stage = [&](int s, int64_t t0) {
    T* base = st + s * 3 * TILE;
    load_tile<T, COVT_BT, COV_BD, COVT_LDS, COVT_NT, VEC>(base, x, a.ldx, t0, t_end, ci, a.d);
    if (upper && !diag) load_tile<T, COVT_BT, COV_BD, COVT_LDS, COVT_NT, VEC>(base + TILE, x, a.ldx, t0, t_end, cj, a.d);
    if (do_c) load_tile<T, COVT_BT, COV_BD, COVT_LDS, COVT_NT, VEC>(base + 2 * TILE, y, a.ldy, t0, t_end, cj, a.d);
  };

  const int64_t nk = t_end > t_begin ? (t_end - t_begin + COVT_BT - 1) / COVT_BT : 0;
  if (nk > 0) load_stage(0, t_begin);
  cp_async_commit();
  for (int64_t k = 0; k < nk; ++k) {
    const int s = static_cast<int>(k & 1);
    if (k + 1 < nk) load_stage(s ^ 1, t_begin + (k + 1) * COVT_BT);
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();
    const T* xi = st + s * 3 * TILE;
    const T* xj = diag ? xi : xi + TILE;
    const T* yj = xi + 2 * TILE;
#pragma unroll
    for (int kk = 0; kk < COVT_BT; kk += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::col_major> fa[2];
#pragma unroll
      for (int i = 0; i < 2; ++i) wmma::load_matrix_sync(fa[i], xi + kk * COVT_LDS + wr * 32 + i * 16, COVT_LDS);
      if (upper) {
#pragma unroll
        for (int j = 0; j < 2; ++j) {
          wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> fb;
          wmma::load_matrix_sync(fb, xj + kk * COVT_LDS + wc * 32 + j * 16, COVT_LDS);
#pragma unroll
          for (int i = 0; i < 2; ++i) wmma::mma_sync(accg[i][j], fa[i], fb, accg[i][j]);
        }
      }
      if (do_c) {
#pragma unroll
        for (int j = 0; j < 2; ++j) {
          wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> fb;
          wmma::load_matrix_sync(fb, yj + kk * COVT_LDS + wc * 32 + j * 16, COVT_LDS);
#pragma unroll
          for (int i = 0; i < 2; ++i) wmma::mma_sync(accc[i][j], fa[i], fb, accc[i][j]);
        }
      }
    }
    __syncthreads();  // stage s is reloaded by the next iteration
  }
  cp_async_wait<0>();
  __syncthreads();

  float* E = reinterpret_cast<float*>(smem);
  if (upper) {
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < 2; ++j)
        wmma::store_matrix_sync(E + (wr * 32 + i * 16) * COVT_LDE + wc * 32 + j * 16, accg[i][j], COVT_LDE,
                                wmma::mem_row_major);
    __syncthreads();
    tile_add<COVT_NT>(E, COVT_LDE, a.G, a.g0, a.g1, ci, cj, a.d, false, a.atomic != 0);
    if (!diag) tile_add<COVT_NT>(E, COVT_LDE, a.G, a.g0, a.g1, ci, cj, a.d, true, a.atomic != 0);
    __syncthreads();
  }
  if (do_c) {
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < 2; ++j)
        wmma::store_matrix_sync(E + (wr * 32 + i * 16) * COVT_LDE + wc * 32 + j * 16, accc[i][j], COVT_LDE,
                                wmma::mem_row_major);
    __syncthreads();
    tile_add<COVT_NT>(E, COVT_LDE, a.C, a.c0, a.c1, ci, cj, a.d, false, a.atomic != 0);
  }
#else
  __trap();
#endif
}

// fp32 version: exact fp32 FMAs on the CUDA cores (the reference's products are exact fp32; TF32
// would cost ~1e-3 relative). 256 threads, 64×64 tiles, each thread 4×4 of G (+ 4×4 of C) at rows
// ty + 16a, columns tx + 16b (conflict-free shared-memory reads); 16 tokens per step.
constexpr int COVF_BT = 16, COVF_LDS = COV_BD, COVF_NT = 256, COVF_LDE = COV_BD + 1;

template <bool VEC>
__global__ void __launch_bounds__(COVF_NT) cov_f32_kernel(const CovArgs a) {
#if PREHAB_SM80
  constexpr int TILE = COVF_BT * COVF_LDS;
  constexpr int PIPE_BYTES = 2 * 3 * TILE * 4;
  constexpr int EPI_BYTES = COV_BD * COVF_LDE * 4;
  __shared__ __align__(128) float smem[(PIPE_BYTES > EPI_BYTES ? PIPE_BYTES : EPI_BYTES) / 4];

  const int64_t pid = blockIdx.x;
  const bool upper = pid < a.n_upper;
  int64_t bi, bj;
  if (upper) {
    upper_pair(pid, bi, bj);
  } else {
    lower_pair(pid - a.n_upper, bi, bj);
  }
  const bool diag = upper && bi == bj;
  const bool do_c = a.has_c != 0;
  const int64_t ci = bi * COV_BD, cj = bj * COV_BD;
  const int64_t t_begin = static_cast<int64_t>(blockIdx.y) * a.tokens_per_split;
  const int64_t t_end = min(a.T, t_begin + a.tokens_per_split);
  const float* x = static_cast<const float*>(a.x);
  const float* y = static_cast<const float*>(a.y);
  const int tx = threadIdx.x & 15, ty = threadIdx.x >> 4;

  float accg[4][4], accc[4][4];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) accg[i][j] = accc[i][j] = 0.f;

  auto load_stage = [&](int s, int64_t t0) {
    float* base = smem + s * 3 * TILE;
    load_tile<float, COVF_BT, COV_BD, COVF_LDS, COVF_NT, VEC>(base, x, a.ldx, t0, t_end, ci, a.d);
    if (upper && !diag) load_tile<float, COVF_BT, COV_BD, COVF_LDS, COVF_NT, VEC>(base + TILE, x, a.ldx, t0, t_end, cj, a.d);
    if (do_c) load_tile<float, COVF_BT, COV_BD, COVF_LDS, COVF_NT, VEC>(base + 2 * TILE, y, a.ldy, t0, t_end, cj, a.d);
  };

  const int64_t nk = t_end > t_begin ? (t_end - t_begin + COVF_BT - 1) / COVF_BT : 0;
  if (nk > 0) load_stage(0, t_begin);
  cp_async_commit();
  for (int64_t k = 0; k < nk; ++k) {
    const int s = static_cast<int>(k & 1);
    if (k + 1 < nk) load_stage(s ^ 1, t_begin + (k + 1) * COVF_BT);
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();
    const float* xi = smem + s * 3 * TILE;
    const float* xj = diag ? xi : xi + TILE;
    const float* yj = xi + 2 * TILE;
#pragma unroll 4
    for (int t = 0; t < COVF_BT; ++t) {
      float av[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) av[i] = xi[t * COVF_LDS + ty + 16 * i];
      if (upper) {
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          const float bv = xj[t * COVF_LDS + tx + 16 * j];
#pragma unroll
          for (int i = 0; i < 4; ++i) accg[i][j] = fmaf(av[i], bv, accg[i][j]);
        }
      }
      if (do_c) {
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          const float yv = yj[t * COVF_LDS + tx + 16 * j];
#pragma unroll
          for (int i = 0; i < 4; ++i) accc[i][j] = fmaf(av[i], yv, accc[i][j]);
        }
      }
    }
    __syncthreads();
  }
  cp_async_wait<0>();
  __syncthreads();

  float* E = smem;
  if (upper) {
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) E[(ty + 16 * i) * COVF_LDE + tx + 16 * j] = accg[i][j];
    __syncthreads();
    tile_add<COVF_NT>(E, COVF_LDE, a.G, a.g0, a.g1, ci, cj, a.d, false, a.atomic != 0);
    if (!diag) tile_add<COVF_NT>(E, COVF_LDE, a.G, a.g0, a.g1, ci, cj, a.d, true, a.atomic != 0);
    __syncthreads();
  }
  if (do_c) {
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) E[(ty + 16 * i) * COVF_LDE + tx + 16 * j] = accc[i][j];
    __syncthreads();
    tile_add<COVF_NT>(E, COVF_LDE, a.C, a.c0, a.c1, ci, cj, a.d, false, a.atomic != 0);
  }
#else
  __trap();
#endif
}

}  // namespace kern

// ==================================================================================================
// host side
// ==================================================================================================

namespace {

void launch_covariance(const CovArgs& a, at::ScalarType dt, bool vec, int64_t programs, int64_t splits,
                       cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(programs), static_cast<unsigned>(splits));
  if (dt == at::kFloat) {
    if (vec) {
      cov_f32_kernel<true><<<grid, COVF_NT, 0, stream>>>(a);
    } else {
      cov_f32_kernel<false><<<grid, COVF_NT, 0, stream>>>(a);
    }
  } else if (dt == at::kHalf) {
    if (vec) {
      cov_tc_kernel<__half, true><<<grid, COVT_NT, 0, stream>>>(a);
    } else {
      cov_tc_kernel<__half, false><<<grid, COVT_NT, 0, stream>>>(a);
    }
  } else {
    if (vec) {
      cov_tc_kernel<__nv_bfloat16, true><<<grid, COVT_NT, 0, stream>>>(a);
    } else {
      cov_tc_kernel<__nv_bfloat16, false><<<grid, COVT_NT, 0, stream>>>(a);
    }
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

void covariance_update(at::Tensor G, const at::Tensor& x_in, const std::optional<at::Tensor>& C_opt,
                       const std::optional<at::Tensor>& y_opt) {
  const bool has_c = C_opt.has_value() && C_opt->defined();
  TORCH_CHECK(has_c == (y_opt.has_value() && y_opt->defined()), "covariance_update: pass C and y together");
  check_cuda(x_in, "x");
  check_cuda(G, "G");
  TORCH_CHECK(x_in.dim() == 2, "covariance_update: x must be [T, d], got ", x_in.sizes());
  const int64_t T = x_in.size(0), d = x_in.size(1);
  TORCH_CHECK(G.scalar_type() == at::kFloat && G.dim() == 2 && G.size(0) == d && G.size(1) == d,
              "covariance_update: G must be a float32 [", d, ", ", d, "] accumulator, got ", G.scalar_type(), " ",
              G.sizes());
  at::Tensor C;
  at::Tensor x = x_in, y;
  if (has_c) {
    C = *C_opt;
    y = *y_opt;
    check_cuda(C, "C");
    check_cuda(y, "y");
    TORCH_CHECK(C.scalar_type() == at::kFloat && C.sizes() == G.sizes(), "covariance_update: C must be like G");
    TORCH_CHECK(y.sizes() == x.sizes(), "covariance_update: y must have x's shape");
    if (y.scalar_type() != x.scalar_type()) {  // one tile dtype for the MMA; exact (products are fp32)
      const auto dt = at::promote_types(x.scalar_type(), y.scalar_type());
      x = x.to(dt);
      y = y.to(dt);
    }
  }
  const auto dt = x.scalar_type();
  TORCH_CHECK(dt == at::kFloat || is16(dt), "covariance_update: x must be float32, float16 or bfloat16, got ", dt);
  if (T == 0 || d == 0) return;
  const c10::cuda::CUDAGuard guard(x.device());
  check_arch();
  if (x.stride(1) != 1) x = x.contiguous();
  if (has_c && y.stride(1) != 1) y = y.contiguous();

  const int64_t nb = cdiv(d, COV_BD);
  const int64_t n_upper = nb * (nb + 1) / 2;
  const int64_t programs = n_upper + (has_c ? nb * (nb - 1) / 2 : 0);
  TORCH_CHECK(programs < (int64_t{1} << 31), "covariance_update: d = ", d, " is too large");
  // Few tiles (small d): split the tokens over more programs (fp32 atomics), keeping >= 8 steps each.
  const int64_t bt = dt == at::kFloat ? COVF_BT : COVT_BT;
  const int64_t sms = num_sms();
  int64_t splits = 1;
  if (programs < 2 * sms) splits = std::max<int64_t>(1, std::min(cdiv(2 * sms, programs), T / (8 * bt)));
  const int64_t tps = round_up(cdiv(T, splits), bt);
  splits = std::min<int64_t>(cdiv(T, tps), 65535);

  const int64_t E = 16 / x.element_size();
  bool vec = d % E == 0 && x.stride(0) % E == 0 && aligned16(x.data_ptr());
  if (has_c) vec = vec && y.stride(0) % E == 0 && aligned16(y.data_ptr());

  CovArgs a;
  a.x = x.data_ptr();
  a.y = has_c ? y.data_ptr() : x.data_ptr();
  a.G = G.data_ptr<float>();
  a.C = has_c ? C.data_ptr<float>() : G.data_ptr<float>();
  a.T = T;
  a.d = d;
  a.ldx = x.stride(0);
  a.ldy = has_c ? y.stride(0) : x.stride(0);
  a.g0 = G.stride(0);
  a.g1 = G.stride(1);
  a.c0 = has_c ? C.stride(0) : G.stride(0);
  a.c1 = has_c ? C.stride(1) : G.stride(1);
  a.n_upper = n_upper;
  a.tokens_per_split = tps;
  a.has_c = has_c ? 1 : 0;
  a.atomic = splits > 1 ? 1 : 0;
  launch_covariance(a, dt, vec, programs, splits, at::cuda::getCurrentCUDAStream());
}

// ---------------------------------------------------------------- arch_list

// Here rather than in a file of its own: nvcc defines __CUDA_ARCH_LIST__ in every .cu it compiles,
// the same for all of them (one TORCH_CUDA_ARCH_LIST per build).
#define PREHAB_STR2(x) #x
#define PREHAB_STR(x) PREHAB_STR2(x)

std::string arch_list() {
#ifdef __CUDA_ARCH_LIST__
  return PREHAB_STR(__CUDA_ARCH_LIST__);
#else
  return "";
#endif
}

}  // namespace prehab_svd
