// CUDA kernels of prehab-svd's stable-rank op and their launcher (prehab_svd/kernels/stable_rank.py is
// the Triton side). The math is prehab_svd/ops/reference.py; the shared helpers are in common.cuh.
//
// What is a custom kernel and what is cuBLAS (through ATen):
//
//  stable_rank         cuBLAS: M = W L (16-bit W, L: tensor cores with fp32 output), the Newton–Schulz
//                      products (the reference's bmm/baddbmm sequence), grad_M Lᵀ. Custom: the power
//                      iteration's matvecs (y = M x/‖x‖ with the normalisation, and ‖M‖_F² on the first
//                      pass, fused; w = Mᵀy split over row blocks), the reductions (‖M‖_F², ⟨P, M⟩), and
//                      one fused epilogue for value and gradient (the rank-1 term −2‖M‖²/σ³ u vᵀ fused).

#include "common.cuh"

namespace prehab_svd {
namespace kern {

// ------------------------------------------------------------------------------------------------
// stable rank: power-iteration matvecs, reductions, fused value/gradient epilogue (fp32 M [B, m, n])
// ------------------------------------------------------------------------------------------------

constexpr int SR_NT = 256;
constexpr int MV_RPW = 4;                          // rows per warp
constexpr int MV_ROWS = (SR_NT / 32) * MV_RPW;     // rows per block
constexpr int MTV_COLS = 128;                      // columns per block
constexpr int SR_ROWS = 16;                        // rows per block of the reductions / epilogue

// y[b, i] = Σ_k M[b, i, k] x[b, k] / ‖x[b]‖ for the block's 32 rows, x = Σ_{s<S} parts[s, b, :]
// (the row-split partials of the previous w = Mᵀy, or the start vector with S = 1). Each block
// computes ‖x‖ itself (n floats from L2). fro: fpart[b, block] = Σ M² over its rows (‖M‖_F² rides
// on the first pass). write_v: block 0 stores v = x/‖x‖ (the new state).
template <bool VEC>
__global__ void __launch_bounds__(SR_NT) mv_kernel(const float* __restrict__ M, int64_t m, int64_t n,
                                                   const float* __restrict__ parts, int S, int64_t ps,
                                                   float* __restrict__ y, float* __restrict__ fpart, int64_t nfp,
                                                   float* __restrict__ v, int fro, int write_v) {
  __shared__ float red[SR_NT / 32];
  const int64_t b = blockIdx.y;
  const float* xb = parts + b * n;
  float sq = 0.f;
  for (int64_t k = threadIdx.x; k < n; k += SR_NT) {
    float xk = 0.f;
    for (int s = 0; s < S; ++s) xk += xb[s * ps + k];
    sq = fmaf(xk, xk, sq);
  }
  sq = block_sum<SR_NT>(sq, red);
  const float inv = safe_inv(__fsqrt_rn(sq));
  if (write_v && blockIdx.x == 0) {
    for (int64_t k = threadIdx.x; k < n; k += SR_NT) {
      float xk = 0.f;
      for (int s = 0; s < S; ++s) xk += xb[s * ps + k];
      v[b * n + k] = xk * inv;
    }
  }
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t r0 = static_cast<int64_t>(blockIdx.x) * MV_ROWS + warp * MV_RPW;
  const float* Mb = M + b * m * n;
  float acc[MV_RPW], facc = 0.f;
#pragma unroll
  for (int r = 0; r < MV_RPW; ++r) acc[r] = 0.f;
  if constexpr (VEC) {
    for (int64_t k = lane * 4; k < n; k += 128) {
      float4 xv = make_float4(0.f, 0.f, 0.f, 0.f);
      for (int s = 0; s < S; ++s) {
        const float4 p = *reinterpret_cast<const float4*>(xb + s * ps + k);
        xv.x += p.x; xv.y += p.y; xv.z += p.z; xv.w += p.w;
      }
#pragma unroll
      for (int r = 0; r < MV_RPW; ++r) {
        if (r0 + r < m) {
          const float4 a = __ldg(reinterpret_cast<const float4*>(Mb + (r0 + r) * n + k));
          acc[r] = fmaf(a.x, xv.x, fmaf(a.y, xv.y, fmaf(a.z, xv.z, fmaf(a.w, xv.w, acc[r]))));
          if (fro) facc = fmaf(a.x, a.x, fmaf(a.y, a.y, fmaf(a.z, a.z, fmaf(a.w, a.w, facc))));
        }
      }
    }
  } else {
    for (int64_t k = lane; k < n; k += 32) {
      float xk = 0.f;
      for (int s = 0; s < S; ++s) xk += xb[s * ps + k];
#pragma unroll
      for (int r = 0; r < MV_RPW; ++r) {
        if (r0 + r < m) {
          const float a = __ldg(Mb + (r0 + r) * n + k);
          acc[r] = fmaf(a, xk, acc[r]);
          if (fro) facc = fmaf(a, a, facc);
        }
      }
    }
  }
#pragma unroll
  for (int r = 0; r < MV_RPW; ++r) {
    const float t = warp_sum(acc[r]);
    if (lane == 0 && r0 + r < m) y[b * m + r0 + r] = t * inv;
  }
  if (fro) {
    const float f = block_sum<SR_NT>(facc, red);
    if (threadIdx.x == 0) fpart[b * nfp + blockIdx.x] = f;
  }
}

// parts[s, b, j] = Σ_{i in row split s} M[b, i, j] y[b, i] for the block's 128 columns. 8 warps take
// rows i ≡ warp (mod 8), lanes 4 columns each (VEC) or columns lane + 32e; summed over the warps in
// shared memory in a fixed order. Grid (n/128, S, B).
template <bool VEC>
__global__ void __launch_bounds__(SR_NT) mtv_kernel(const float* __restrict__ M, int64_t m, int64_t n,
                                                    const float* __restrict__ y, int64_t rows_per_split,
                                                    float* __restrict__ parts, int64_t ps) {
  __shared__ float red[SR_NT / 32][MTV_COLS];
  const int64_t b = blockIdx.z;
  const int64_t s = blockIdx.y;
  const int64_t c0 = static_cast<int64_t>(blockIdx.x) * MTV_COLS;
  const int64_t i0 = s * rows_per_split, i1 = min(m, i0 + rows_per_split);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const float* Mb = M + b * m * n;
  const float* yb = y + b * m;
  float acc[4] = {0.f, 0.f, 0.f, 0.f};
  if constexpr (VEC) {
    const int64_t c = c0 + lane * 4;
    if (c < n) {
      for (int64_t i = i0 + warp; i < i1; i += SR_NT / 32) {
        const float yi = yb[i];
        const float4 a = __ldg(reinterpret_cast<const float4*>(Mb + i * n + c));
        acc[0] = fmaf(a.x, yi, acc[0]);
        acc[1] = fmaf(a.y, yi, acc[1]);
        acc[2] = fmaf(a.z, yi, acc[2]);
        acc[3] = fmaf(a.w, yi, acc[3]);
      }
    }
#pragma unroll
    for (int e = 0; e < 4; ++e) red[warp][lane * 4 + e] = acc[e];
  } else {
    for (int64_t i = i0 + warp; i < i1; i += SR_NT / 32) {
      const float yi = yb[i];
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int64_t c = c0 + lane + 32 * e;
        if (c < n) acc[e] = fmaf(__ldg(Mb + i * n + c), yi, acc[e]);
      }
    }
#pragma unroll
    for (int e = 0; e < 4; ++e) red[warp][lane + 32 * e] = acc[e];
  }
  __syncthreads();
  if (threadIdx.x < MTV_COLS) {
    float t = 0.f;
#pragma unroll
    for (int w = 0; w < SR_NT / 32; ++w) t += red[w][threadIdx.x];
    const int64_t c = c0 + threadIdx.x;
    if (c < n) parts[s * ps + b * n + c] = t;
  }
}

// part[b, block] = Σ A∘B (or Σ A² with SAME) over the block's 16 rows of [m, n].
template <bool SAME>
__global__ void __launch_bounds__(SR_NT) rowdot_kernel(const float* __restrict__ A, const float* __restrict__ Bm,
                                                       int64_t m, int64_t n, float* __restrict__ part, int64_t np) {
  __shared__ float red[SR_NT / 32];
  const int64_t b = blockIdx.y;
  const int64_t r0 = static_cast<int64_t>(blockIdx.x) * SR_ROWS, r1 = min(m, r0 + SR_ROWS);
  const float* Ab = A + b * m * n;
  const float* Bb = Bm + b * m * n;
  float acc = 0.f;
  for (int64_t i = r0; i < r1; ++i)
    for (int64_t j = threadIdx.x; j < n; j += SR_NT) {
      const float a = Ab[i * n + j];
      acc = fmaf(a, SAME ? a : Bb[i * n + j], acc);
    }
  acc = block_sum<SR_NT>(acc, red);
  if (threadIdx.x == 0) part[b * np + blockIdx.x] = acc;
}

// The value and gradient with respect to M, in one pass over the block's 16 rows.
//  stable:  σ² = Σ y² (y = M v, v the unit top right vector), value = ‖M‖²/σ²,
//           grad = 2M/σ² − 2·value/σ² · y vᵀ   (= 2M/σ² − 2‖M‖²/σ³ · u vᵀ with u = y/σ)
//  nuclear: nuc = ⟨P, M⟩ = ‖M‖_*, value = nuc²/‖M‖², grad = 2·nuc/‖M‖² · P − 2·value/‖M‖² · M
// (1/x taken as 0 where x = 0, like the reference's _safe_inverse.) The scalars are reduced from the
// partials by every block, identically; block 0 writes the value.
template <bool NUCLEAR>
__global__ void __launch_bounds__(SR_NT) sr_epilogue_kernel(const float* __restrict__ M, const float* __restrict__ P,
                                                            const float* __restrict__ y, const float* __restrict__ v,
                                                            const float* __restrict__ fpart, int64_t nfp,
                                                            const float* __restrict__ npart, int64_t nnp,
                                                            float* __restrict__ value, float* __restrict__ G, int64_t m,
                                                            int64_t n) {
  __shared__ float red[SR_NT / 32];
  const int64_t b = blockIdx.y;
  float f2 = 0.f;
  for (int64_t p = threadIdx.x; p < nfp; p += SR_NT) f2 += fpart[b * nfp + p];
  f2 = block_sum<SR_NT>(f2, red);
  float val, c1, c2;
  if constexpr (NUCLEAR) {
    float nuc = 0.f;
    for (int64_t p = threadIdx.x; p < nnp; p += SR_NT) nuc += npart[b * nnp + p];
    nuc = block_sum<SR_NT>(nuc, red);
    const float inv_f2 = safe_inv(f2);
    val = nuc * nuc * inv_f2;
    c1 = 2.f * nuc * inv_f2;  // · P
    c2 = 2.f * val * inv_f2;  // · M
  } else {
    float s2 = 0.f;
    for (int64_t i = threadIdx.x; i < m; i += SR_NT) s2 = fmaf(y[b * m + i], y[b * m + i], s2);
    s2 = block_sum<SR_NT>(s2, red);
    const float inv_s = safe_inv(__fsqrt_rn(s2));
    val = f2 * inv_s * inv_s;
    c1 = 2.f * inv_s * inv_s;        // · M
    c2 = 2.f * val * inv_s * inv_s;  // · y_i v_j
  }
  if (blockIdx.x == 0 && threadIdx.x == 0) value[b] = val;
  const int64_t r0 = static_cast<int64_t>(blockIdx.x) * SR_ROWS, r1 = min(m, r0 + SR_ROWS);
  const int64_t base = b * m * n;
  for (int64_t i = r0; i < r1; ++i) {
    const float yi = NUCLEAR ? 0.f : y[b * m + i];
    for (int64_t j = threadIdx.x; j < n; j += SR_NT) {
      const int64_t idx = base + i * n + j;
      if constexpr (NUCLEAR) {
        G[idx] = c1 * P[idx] - c2 * M[idx];
      } else {
        G[idx] = c1 * M[idx] - c2 * yi * v[b * n + j];
      }
    }
  }
}

}  // namespace kern

// ==================================================================================================
// host side
// ==================================================================================================

std::tuple<at::Tensor, at::Tensor, at::Tensor> stable_rank(const at::Tensor& W, const std::optional<at::Tensor>& L_opt,
                                                           const std::optional<at::Tensor>& v0_opt, bool nuclear,
                                                           int64_t iters) {
  check_cuda(W, "W");
  TORCH_CHECK(W.dim() == 3, "stable_rank: W must be [B, m, n], got ", W.sizes());
  TORCH_CHECK(W.scalar_type() == at::kFloat || is16(W.scalar_type()), "stable_rank: W must be float32/16-bit, got ",
              W.scalar_type());
  TORCH_CHECK(iters >= 0, "stable_rank: iters must be >= 0");
  const int64_t B = W.size(0), m = W.size(1), n = W.size(2);
  TORCH_CHECK(B > 0 && m > 0 && n > 0, "stable_rank: W must not be empty");
  TORCH_CHECK(B <= 65535, "stable_rank: at most 65535 matrices per call, got ", B);
  const bool has_l = L_opt.has_value() && L_opt->defined();
  const c10::cuda::CUDAGuard guard(W.device());
  const auto f32 = W.options().dtype(at::kFloat);
  const auto stream = at::cuda::getCurrentCUDAStream();

  // M = W L in fp32 (cuBLAS). 16-bit W and L: tensor cores, exact products, fp32 accumulation and
  // output (the reference's W.float() @ L.float() up to summation order).
  at::Tensor M, Lf;
  if (has_l) {
    const at::Tensor& L = *L_opt;
    check_cuda(L, "L");
    TORCH_CHECK((L.dim() == 2 && L.size(0) == n && L.size(1) == n) || (L.dim() == 3 && L.size(0) == B && L.size(1) == n && L.size(2) == n),
                "stable_rank: L must be [n, n] or [B, n, n], got ", L.sizes());
    Lf = L.to(at::kFloat);
#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 8)
    if (is16(W.scalar_type()) && L.scalar_type() == W.scalar_type()) {
      M = L.dim() == 2 ? at::mm(W.reshape({B * m, n}), L, at::kFloat).view({B, m, n}) : at::bmm(W, L, at::kFloat);
    } else {
      M = at::matmul(W.to(at::kFloat), Lf);
    }
#else
    M = at::matmul(W.to(at::kFloat), Lf);
#endif
  } else {
    M = W.to(at::kFloat);
  }
  M = M.contiguous();
  check_arch();

  const at::Tensor value = workspace({B}, f32);
  at::Tensor grad = workspace({B, m, n}, f32);
  at::Tensor state;
  const int64_t sms = num_sms();
  const dim3 red_grid(static_cast<unsigned>(cdiv(m, SR_ROWS)), static_cast<unsigned>(B));
  const int64_t nred = cdiv(m, SR_ROWS);

  if (!nuclear) {
    TORCH_CHECK(v0_opt.has_value() && v0_opt->defined(), "stable_rank: kind 'stable' needs a start vector v0");
    const at::Tensor v0 = v0_opt->to(at::kFloat).contiguous();
    TORCH_CHECK(v0.dim() == 2 && v0.size(0) == B && v0.size(1) == n, "stable_rank: v0 must be [B, n]");
    // float4 loads of M's rows and of the start vector / partials: 16-byte aligned rows only
    const bool vec = n % 4 == 0 && aligned16(M.data_ptr()) && aligned16(v0.data_ptr());
    const int64_t nfp = cdiv(m, MV_ROWS);
    const dim3 mv_grid(static_cast<unsigned>(nfp), static_cast<unsigned>(B));
    // w = Mᵀy: split the rows so that the blocks fill the SMs about twice (at most 8 partials)
    const int64_t col_blocks = cdiv(n, MTV_COLS) * B;
    int64_t S = 1;
    if (col_blocks < 2 * sms) S = std::max<int64_t>(1, std::min<int64_t>({cdiv(2 * sms, col_blocks), 8, cdiv(m, 64)}));
    const int64_t rps = cdiv(m, S);
    S = cdiv(m, rps);
    const dim3 mtv_grid(static_cast<unsigned>(cdiv(n, MTV_COLS)), static_cast<unsigned>(S), static_cast<unsigned>(B));
    at::Tensor y = workspace({B, m}, f32);
    at::Tensor fpart = workspace({B, nfp}, f32);
    at::Tensor parts = workspace({S, B, n}, f32);
    state = workspace({B, n}, f32);
    const float* cur = v0.data_ptr<float>();
    int cur_s = 1;
    bool first = true;
    auto mv = [&](bool write_v) {
      if (vec) {
        mv_kernel<true><<<mv_grid, SR_NT, 0, stream>>>(M.data_ptr<float>(), m, n, cur, cur_s, B * n, y.data_ptr<float>(),
                                                       fpart.data_ptr<float>(), nfp, state.data_ptr<float>(), first, write_v);
      } else {
        mv_kernel<false><<<mv_grid, SR_NT, 0, stream>>>(M.data_ptr<float>(), m, n, cur, cur_s, B * n, y.data_ptr<float>(),
                                                        fpart.data_ptr<float>(), nfp, state.data_ptr<float>(), first, write_v);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      first = false;
    };
    for (int64_t it = 0; it < iters; ++it) {
      mv(false);
      if (vec) {
        mtv_kernel<true><<<mtv_grid, SR_NT, 0, stream>>>(M.data_ptr<float>(), m, n, y.data_ptr<float>(), rps,
                                                         parts.data_ptr<float>(), B * n);
      } else {
        mtv_kernel<false><<<mtv_grid, SR_NT, 0, stream>>>(M.data_ptr<float>(), m, n, y.data_ptr<float>(), rps,
                                                          parts.data_ptr<float>(), B * n);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      cur = parts.data_ptr<float>();
      cur_s = static_cast<int>(S);
    }
    mv(true);  // v = w/‖w‖ (the new state), y = M v = σ u
    sr_epilogue_kernel<false><<<red_grid, SR_NT, 0, stream>>>(M.data_ptr<float>(), nullptr, y.data_ptr<float>(),
                                                              state.data_ptr<float>(), fpart.data_ptr<float>(), nfp,
                                                              nullptr, 0, value.data_ptr<float>(),
                                                              grad.data_ptr<float>(), m, n);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  } else {
    at::Tensor fpart = workspace({B, nred}, f32);
    rowdot_kernel<true><<<red_grid, SR_NT, 0, stream>>>(M.data_ptr<float>(), M.data_ptr<float>(), m, n,
                                                        fpart.data_ptr<float>(), nred);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    // Newton–Schulz exactly as reference.polar_newton_schulz, on cuBLAS (the iterate stays fp32).
    // Precision (a documented choice): these fp32 bmm/baddbmm calls follow torch's global TF32 switch
    // (torch.backends.cuda.matmul.allow_tf32 / set_float32_matmul_precision), exactly as the
    // reference's torch.bmm does on the same GPU: SGEMM by default, TF32 tensor cores when the caller
    // allows them. Forcing TF32 (or bf16 operands) here would break the match with the torch backend
    // (tests: 1e-5) and, per prehab_svd/kernels/stable_rank.py's measurement, move the nuclear value ~1.6e-3 off
    // the float64 one (tests: 1e-4) unless every product's output is re-rounded to TF32, which
    // cuBLAS cannot do; the Triton backend is the tensor-core Newton–Schulz.
    const at::Tensor fro = fpart.sum(1).sqrt_();
    const at::Tensor inv_f = at::where(fro > 0, fro.reciprocal(), at::zeros_like(fro));
    at::Tensor X = M * inv_f.view({B, 1, 1});
    if (m > n) X = X.mT();
    const int64_t n_cubic = std::min<int64_t>(6, iters / 2);
    constexpr double qa = 3.4445, qb = -4.7750, qc = 2.0315;  // reference.NS_QUINTIC
    for (int64_t it = 0; it < iters - n_cubic; ++it) {
      const at::Tensor A = at::bmm(X, X.mT());
      const at::Tensor poly = at::baddbmm(A, A, A, qb, qc);
      X = at::baddbmm(X, poly, X, qa, 1.0);
    }
    for (int64_t it = 0; it < n_cubic; ++it) {
      const at::Tensor A = at::bmm(X, X.mT());
      X = at::baddbmm(X, A, X, 1.5, -0.5);
    }
    const at::Tensor P = (m > n ? X.mT() : X).contiguous();
    at::Tensor npart = workspace({B, nred}, f32);
    rowdot_kernel<false><<<red_grid, SR_NT, 0, stream>>>(P.data_ptr<float>(), M.data_ptr<float>(), m, n,
                                                         npart.data_ptr<float>(), nred);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    sr_epilogue_kernel<true><<<red_grid, SR_NT, 0, stream>>>(M.data_ptr<float>(), P.data_ptr<float>(), nullptr, nullptr,
                                                             fpart.data_ptr<float>(), nred, npart.data_ptr<float>(), nred,
                                                             value.data_ptr<float>(), grad.data_ptr<float>(), m, n);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    state = at::empty({B, 0}, f32);
  }
  if (has_l) grad = at::matmul(grad, Lf.mT()).contiguous();  // grad_W = grad_M Lᵀ (cuBLAS)
  return {value, grad, state};
}

}  // namespace prehab_svd
