// CUDA kernels of prehab-svd's low-rank linear op and their launchers (prehab_svd/kernels/lowrank_linear.py
// is the Triton side). The math is prehab_svd/ops/reference.py; the shared helpers are in common.cuh.
//
// What is a custom kernel and what is cuBLAS (through ATen):
//
//  lowrank_linear      custom for few tokens: T <= 8 two GEMV kernels (each factor streamed once, 16-byte
//                      loads, fp32 intermediate z = x Vᵀ [T, r] kept in a small L2-resident buffer);
//                      8 < T <= 64 (16-bit) two tensor-core kernels (WMMA, z rounded to x's dtype as the
//                      reference rounds it). Above 64 tokens it is a compute-bound pair of GEMMs and
//                      cuBLAS is the fastest answer available (at::mm / at::addmm with the bias in the
//                      GEMM epilogue), so that regime calls it.

#include "common.cuh"

namespace prehab_svd {
namespace kern {

// ------------------------------------------------------------------------------------------------
// low-rank linear, few tokens: C[m, n] = Σ_k A[m, k] B[n, k] (B a factor, streamed once)
// ------------------------------------------------------------------------------------------------

// Epilogue of both decode kernels: FINAL writes y[m, n] = acc + bias[n] in the factors' dtype; else
// the fp32 intermediate z[m, n] (added atomically when K is split over gridDim.y).
struct DecodeOut {
  float* z;
  int64_t ldz;
  int atomic;
  void* y;
  int64_t ldy;
  const void* bias;
};

template <typename TB, bool FINAL>
__device__ __forceinline__ void decode_store(const DecodeOut& o, int64_t m, int64_t n, float v) {
  if constexpr (FINAL) {
    if (o.bias != nullptr) v += Cvt<TB>::to(static_cast<const TB*>(o.bias)[n]);
    static_cast<TB*>(o.y)[m * o.ldy + n] = Cvt<TB>::from(v);
  } else {
    float* p = o.z + m * o.ldz + n;
    if (o.atomic) {
      atomicAdd(p, v);
    } else {
      *p = v;
    }
  }
}

// GEMV kernel (T <= 8 tokens; CUDA cores: a GEMV has nothing for tensor cores to do). One warp per
// row n of B at a time, 8 warps per block; the lanes stride over k with 16-byte loads of B (and A),
// fp32 accumulation, a warp reduction at the end. A (x or z) is small and L1/L2-resident. MT = 1
// is the single-token decode; MT = 8 handles 2..8 tokens (M at run time).
constexpr int GV_NT = 256;

template <typename TA, typename TB, int MT, bool VEC, bool FINAL>
__global__ void __launch_bounds__(GV_NT) gemv_nt_kernel(const TA* __restrict__ A, int64_t lda, int M,
                                                        const TB* __restrict__ B, int64_t ldb, int64_t N, int64_t K,
                                                        int64_t k_per_split, const DecodeOut o) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t n = static_cast<int64_t>(blockIdx.x) * (GV_NT / 32) + warp;
  if (n >= N) return;  // the whole warp: no block-level synchronisation below
  const int64_t k0 = static_cast<int64_t>(blockIdx.y) * k_per_split;
  const int64_t k1 = min(K, k0 + k_per_split);
  float acc[MT];
#pragma unroll
  for (int m = 0; m < MT; ++m) acc[m] = 0.f;
  const TB* brow = B + n * ldb;
  if constexpr (VEC) {
    // whole 16-byte vectors below k_vec (k0 is a multiple of E: the splits are multiples of 32·E),
    // then the last (k1 − k0) mod E elements (a ragged rank: K = r for the up product) one by one
    constexpr int E = 16 / sizeof(TB);
    const int64_t k_vec = k0 + ((k1 - k0) / E) * E;
#pragma unroll 2
    for (int64_t k = k0 + lane * E; k < k_vec; k += 32 * E) {
      float bv[E];
      load_vec<TB, E>(brow + k, bv);
#pragma unroll
      for (int m = 0; m < MT; ++m) {
        if (m < M) {
          float av[E];
          load_vec<TA, E>(A + m * lda + k, av);
#pragma unroll
          for (int e = 0; e < E; ++e) acc[m] = fmaf(av[e], bv[e], acc[m]);
        }
      }
    }
    for (int64_t k = k_vec + lane; k < k1; k += 32) {
      const float bv = Cvt<TB>::to(brow[k]);
#pragma unroll
      for (int m = 0; m < MT; ++m)
        if (m < M) acc[m] = fmaf(Cvt<TA>::to(A[m * lda + k]), bv, acc[m]);
    }
  } else {
#pragma unroll 4
    for (int64_t k = k0 + lane; k < k1; k += 32) {
      const float bv = Cvt<TB>::to(brow[k]);
#pragma unroll
      for (int m = 0; m < MT; ++m)
        if (m < M) acc[m] = fmaf(Cvt<TA>::to(A[m * lda + k]), bv, acc[m]);
    }
  }
#pragma unroll
  for (int m = 0; m < MT; ++m) acc[m] = warp_sum(acc[m]);
  if (lane == 0) {
#pragma unroll
    for (int m = 0; m < MT; ++m)
      if (m < M) decode_store<TB, FINAL>(o, m, n, acc[m]);
  }
}

// Tensor-core decode kernel (16-bit, 8 < T <= 64; any T works): a [TM tokens × 32] output tile per
// block, K in steps of 64, double-buffered (cp.async for 16-bit operands; the fp32 intermediate z is
// rounded to T while staged). 4 warps: warp (wn, wk) owns output columns 16wn.. and the k16-steps
// wk, wk+2 of each step; the two k-halves are summed in the epilogue. Grid (N/32, K splits, T/TM).
constexpr int TC_BN = 32, TC_BK = 64, TC_LDS = TC_BK + 8, TC_NT = 128, TC_LDE = TC_BN + 4;

template <typename T, typename TA, int TM, bool VEC, bool FINAL>
__global__ void __launch_bounds__(TC_NT) gemm_nt_tc_kernel(const TA* __restrict__ A, int64_t lda, int64_t M,
                                                           const T* __restrict__ B, int64_t ldb, int64_t N, int64_t K,
                                                           int64_t k_per_split, const DecodeOut o) {
#if PREHAB_SM80
  constexpr int STAGE = (TM + TC_BN) * TC_LDS;
  constexpr int PIPE_BYTES = 2 * STAGE * static_cast<int>(sizeof(T));
  constexpr int EPI_BYTES = 2 * TM * TC_LDE * static_cast<int>(sizeof(float));
  __shared__ __align__(128) unsigned char smem[PIPE_BYTES > EPI_BYTES ? PIPE_BYTES : EPI_BYTES];
  T* st = reinterpret_cast<T*>(smem);

  const int64_t n0 = static_cast<int64_t>(blockIdx.x) * TC_BN;
  const int64_t m0 = static_cast<int64_t>(blockIdx.z) * TM;
  const int64_t k_begin = static_cast<int64_t>(blockIdx.y) * k_per_split;
  const int64_t k_end = min(K, k_begin + k_per_split);
  const int warp = threadIdx.x >> 5;
  const int wn = warp & 1, wk = warp >> 1;

  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[TM / 16];
#pragma unroll
  for (int i = 0; i < TM / 16; ++i) wmma::fill_fragment(acc[i], 0.f);

  auto load_stage = [&](int s, int64_t k0) {
    T* As = st + s * STAGE;
    T* Bs = As + TM * TC_LDS;
    if constexpr (std::is_same<TA, float>::value) {
      load_tile_f32_as<T, TM, TC_BK, TC_LDS, TC_NT>(As, A, lda, m0, M, k0, k_end);
    } else {
      load_tile<T, TM, TC_BK, TC_LDS, TC_NT, VEC>(As, A, lda, m0, M, k0, k_end);
    }
    load_tile<T, TC_BN, TC_BK, TC_LDS, TC_NT, VEC>(Bs, B, ldb, n0, N, k0, k_end);
  };

  const int64_t nk = k_end > k_begin ? (k_end - k_begin + TC_BK - 1) / TC_BK : 0;
  if (nk > 0) load_stage(0, k_begin);
  cp_async_commit();
  for (int64_t k = 0; k < nk; ++k) {
    const int s = static_cast<int>(k & 1);
    if (k + 1 < nk) load_stage(s ^ 1, k_begin + (k + 1) * TC_BK);
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();
    const T* As = st + s * STAGE;
    const T* Bs = As + TM * TC_LDS;
#pragma unroll
    for (int step = 0; step < 2; ++step) {
      const int kk = 16 * (wk + 2 * step);
      wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> fb;  // (k, n) = Bs[n][k]
      wmma::load_matrix_sync(fb, Bs + (wn * 16) * TC_LDS + kk, TC_LDS);
#pragma unroll
      for (int i = 0; i < TM / 16; ++i) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> fa;
        wmma::load_matrix_sync(fa, As + (i * 16) * TC_LDS + kk, TC_LDS);
        wmma::mma_sync(acc[i], fa, fb, acc[i]);
      }
    }
    __syncthreads();
  }
  cp_async_wait<0>();
  __syncthreads();

  float* E = reinterpret_cast<float*>(smem);  // [2 k-halves][TM][TC_LDE]
#pragma unroll
  for (int i = 0; i < TM / 16; ++i)
    wmma::store_matrix_sync(E + wk * TM * TC_LDE + (i * 16) * TC_LDE + wn * 16, acc[i], TC_LDE, wmma::mem_row_major);
  __syncthreads();
  for (int e = threadIdx.x; e < TM * TC_BN; e += TC_NT) {
    const int r = e / TC_BN, c = e % TC_BN;
    const int64_t gm = m0 + r, gn = n0 + c;
    if (gm < M && gn < N) decode_store<T, FINAL>(o, gm, gn, E[r * TC_LDE + c] + E[TM * TC_LDE + r * TC_LDE + c]);
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

template <typename TB>
void launch_gemv(const void* A, bool a_is_f32, int64_t lda, int M, const TB* B, int64_t ldb, int64_t N, int64_t K,
                 int64_t splits, int64_t kps, bool vec, bool final_, const DecodeOut& o, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(cdiv(N, GV_NT / 32)), static_cast<unsigned>(splits));
#define PREHAB_GEMV(TA, MT, VEC, FIN) \
  gemv_nt_kernel<TA, TB, MT, VEC, FIN><<<grid, GV_NT, 0, stream>>>(static_cast<const TA*>(A), lda, M, B, ldb, N, K, kps, o)
  if (!final_) {  // down: A = x (TB), z fp32
    TORCH_CHECK(!a_is_f32 || (std::is_same<TB, float>::value), "internal: GEMV down takes x in the factors' dtype");
    if (M == 1) {
      if (vec) PREHAB_GEMV(TB, 1, true, false); else PREHAB_GEMV(TB, 1, false, false);
    } else {
      if (vec) PREHAB_GEMV(TB, 8, true, false); else PREHAB_GEMV(TB, 8, false, false);
    }
  } else {  // up: A = z (fp32), y = z Uᵀ + b
    if (M == 1) {
      if (vec) PREHAB_GEMV(float, 1, true, true); else PREHAB_GEMV(float, 1, false, true);
    } else {
      if (vec) PREHAB_GEMV(float, 8, true, true); else PREHAB_GEMV(float, 8, false, true);
    }
  }
#undef PREHAB_GEMV
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
void launch_tc(const void* A, int64_t lda, int64_t M, const T* B, int64_t ldb, int64_t N, int64_t K, int64_t splits,
               int64_t kps, bool vec, bool final_, int tm, const DecodeOut& o, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(cdiv(N, TC_BN)), static_cast<unsigned>(splits),
                  static_cast<unsigned>(cdiv(M, tm)));
#define PREHAB_TC(TA, TM, VEC, FIN) \
  gemm_nt_tc_kernel<T, TA, TM, VEC, FIN><<<grid, TC_NT, 0, stream>>>(static_cast<const TA*>(A), lda, M, B, ldb, N, K, kps, o)
  if (!final_) {
    if (tm == 16) {
      if (vec) PREHAB_TC(T, 16, true, false); else PREHAB_TC(T, 16, false, false);
    } else {
      if (vec) PREHAB_TC(T, 64, true, false); else PREHAB_TC(T, 64, false, false);
    }
  } else {
    if (tm == 16) {
      if (vec) PREHAB_TC(float, 16, true, true); else PREHAB_TC(float, 16, false, true);
    } else {
      if (vec) PREHAB_TC(float, 64, true, true); else PREHAB_TC(float, 64, false, true);
    }
  }
#undef PREHAB_TC
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Splits of K (multiples of `quantum`) so that blocks·splits fills the SMs about twice, keeping at
// least `min_per_split` of K per split. Returns (splits, K per split).
std::pair<int64_t, int64_t> k_splits(int64_t blocks, int64_t K, int64_t quantum, int64_t min_per_split) {
  const int64_t sms = num_sms();
  int64_t splits = 1;
  if (blocks < 2 * sms) splits = std::max<int64_t>(1, std::min(cdiv(2 * sms, blocks), K / min_per_split));
  const int64_t kps = round_up(cdiv(K, splits), quantum);
  return {std::min<int64_t>(cdiv(K, kps), 65535), kps};
}

template <typename T>
void lowrank_decode(const at::Tensor& x, const at::Tensor& U, const at::Tensor& V, const at::Tensor& bias,
                    at::Tensor& y, bool tensor_cores) {
  using CT = typename CudaType<T>::type;
  const int64_t Tn = x.size(0), K = x.size(1), R = V.size(0), N = U.size(0);
  const auto stream = at::cuda::getCurrentCUDAStream();
  const int64_t es = x.element_size();
  const int64_t E = 16 / es;
  // z = x Vᵀ in fp32, rows padded to a multiple of 16 elements (16-byte aligned row starts)
  const int64_t ldz = round_up(std::max<int64_t>(R, 1), kAlign);
  const auto f32 = x.options().dtype(at::kFloat);
  const CT* Vp = reinterpret_cast<const CT*>(V.data_ptr());
  const CT* Up = reinterpret_cast<const CT*>(U.data_ptr());
  // 16-byte loads need 16-byte aligned row starts only: the kernels finish a ragged K (in, or the
  // rank r for the up product) element by element. So a rank that is not a multiple of 8 (819, 1228,
  // 1638, 1791 ...) still takes the vector path when U's rows are padded (LowRankLinear stores U as a
  // view of an [out, r16] buffer); an unpadded [out, 819] U has misaligned rows and scalar loads.
  const bool vec_down = x.stride(0) % E == 0 && V.stride(0) % E == 0 && aligned16(x.data_ptr()) &&
                        aligned16(V.data_ptr());
  const bool vec_up = U.stride(0) % E == 0 && aligned16(U.data_ptr());

  DecodeOut o{};
  o.ldy = y.stride(0);
  o.y = y.data_ptr();
  o.bias = bias.defined() ? bias.data_ptr() : nullptr;
  if (!tensor_cores) {
    const auto [splits, kps] = k_splits(cdiv(R, GV_NT / 32), K, 32 * E, 1024);
    at::Tensor z = splits > 1 ? at::zeros({Tn, ldz}, f32) : workspace({Tn, ldz}, f32);
    o.z = z.data_ptr<float>();
    o.ldz = ldz;
    o.atomic = splits > 1;
    launch_gemv<CT>(x.data_ptr(), std::is_same<CT, float>::value, x.stride(0), static_cast<int>(Tn), Vp, V.stride(0),
                    R, K, splits, kps, vec_down, false, o, stream);
    launch_gemv<CT>(z.data_ptr(), true, ldz, static_cast<int>(Tn), Up, U.stride(0), N, R, 1, R, vec_up, true, o,
                    stream);
  } else {
    if constexpr (std::is_same<CT, float>::value) {
      TORCH_CHECK(false, "internal: no fp32 tensor-core decode path");
    } else {
      const int tm = Tn <= 16 ? 16 : 64;
      const auto [splits, kps] = k_splits(cdiv(R, TC_BN) * cdiv(Tn, tm), K, TC_BK, 4 * TC_BK);
      at::Tensor z = splits > 1 ? at::zeros({Tn, ldz}, f32) : workspace({Tn, ldz}, f32);
      o.z = z.data_ptr<float>();
      o.ldz = ldz;
      o.atomic = splits > 1;
      launch_tc<CT>(x.data_ptr(), x.stride(0), Tn, Vp, V.stride(0), R, K, splits, kps, vec_down, false, tm, o, stream);
      launch_tc<CT>(z.data_ptr(), ldz, Tn, Up, U.stride(0), N, R, 1, std::max<int64_t>(R, 1), vec_up, true, tm, o,
                    stream);
    }
  }
}

}  // namespace

at::Tensor lowrank_linear(const at::Tensor& x_in, const at::Tensor& U_in, const at::Tensor& V_in,
                          const std::optional<at::Tensor>& bias_opt, int64_t path,
                          const std::optional<at::Tensor>& out_opt) {
  check_cuda(x_in, "x");
  check_cuda(U_in, "U");
  check_cuda(V_in, "V");
  TORCH_CHECK(x_in.dim() == 2 && U_in.dim() == 2 && V_in.dim() == 2, "lowrank_linear: x [T, in], U [out, r], V [r, in]");
  const int64_t Tn = x_in.size(0), K = x_in.size(1), R = V_in.size(0), N = U_in.size(0);
  TORCH_CHECK(V_in.size(1) == K && U_in.size(1) == R, "lowrank_linear: shapes x ", x_in.sizes(), ", U ",
              U_in.sizes(), ", V ", V_in.sizes(), " do not chain");
  const auto dt = x_in.scalar_type();
  TORCH_CHECK(dt == at::kFloat || is16(dt), "lowrank_linear: dtype must be float32, float16 or bfloat16, got ", dt);
  TORCH_CHECK(U_in.scalar_type() == dt && V_in.scalar_type() == dt, "lowrank_linear: x, U, V must share a dtype");
  at::Tensor bias;
  if (bias_opt.has_value() && bias_opt->defined()) {
    bias = bias_opt->contiguous();
    check_cuda(bias, "bias");
    TORCH_CHECK(bias.scalar_type() == dt && bias.dim() == 1 && bias.size(0) == N, "lowrank_linear: bias must be [", N,
                "] of x's dtype");
  }
  const c10::cuda::CUDAGuard guard(x_in.device());
  at::Tensor y;
  if (out_opt.has_value() && out_opt->defined()) {
    y = *out_opt;
    TORCH_CHECK(y.is_cuda() && y.scalar_type() == dt && y.dim() == 2 && y.size(0) == Tn && y.size(1) == N &&
                    y.stride(1) == 1,
                "lowrank_linear: out must be a [", Tn, ", ", N, "] tensor of x's dtype with unit column stride");
  } else {
    y = at::empty({Tn, N}, x_in.options());
  }
  if (Tn == 0 || N == 0) return y;
  if (path == kPathAuto) path = Tn <= kGemvMaxT ? kPathGemv : (is16(dt) && Tn <= kDecodeMaxT) ? kPathTensorCore : kPathCublas;
  if (path == kPathCublas || R == 0 || K == 0) {
    // Many tokens: two compute-bound GEMMs, where cuBLAS is the fastest kernel available (the same
    // calls as the reference, bias fused into the second GEMM's epilogue).
    // z in a [T, r16] buffer: cuBLAS(Lt) takes its fast kernels only for 16-byte aligned leading
    // dimensions, which an odd rank's [T, r] z would not have.
    at::Tensor z = at::empty({Tn, round_up(std::max<int64_t>(R, 1), kAlign)}, x_in.options()).narrow(1, 0, R);
    at::mm_out(z, x_in, V_in.t());
    if (bias.defined()) {
      at::addmm_out(y, bias, z, U_in.t());
    } else {
      at::mm_out(y, z, U_in.t());
    }
    return y;
  }
  check_arch();
  const at::Tensor x = x_in.stride(1) == 1 ? x_in : x_in.contiguous();
  const at::Tensor U = U_in.stride(1) == 1 ? U_in : U_in.contiguous();
  const at::Tensor V = V_in.stride(1) == 1 ? V_in : V_in.contiguous();
  if (path == kPathGemv) {
    TORCH_CHECK(Tn <= kGemvMaxT, "lowrank_linear: the GEMV path takes at most ", kGemvMaxT, " tokens, got ", Tn);
  } else {
    TORCH_CHECK(path == kPathTensorCore, "lowrank_linear: unknown path ", path);
    TORCH_CHECK(is16(dt), "lowrank_linear: the tensor-core path takes float16/bfloat16, got ", dt);
  }
  const bool tc = path == kPathTensorCore;
  if (dt == at::kFloat) {
    lowrank_decode<float>(x, U, V, bias, y, tc);
  } else if (dt == at::kHalf) {
    lowrank_decode<at::Half>(x, U, V, bias, y, tc);
  } else {
    lowrank_decode<at::BFloat16>(x, U, V, bias, y, tc);
  }
  return y;
}

}  // namespace prehab_svd
