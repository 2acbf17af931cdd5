// Python binding of the CUDA backend (module prehab_svd._C, or a just-in-time build of the same
// sources). Thin: argument conversion only; the ops' Python wrappers (prehab_svd/ops/_cuda.py)
// validate, pick defaults and register these functions as the "cuda" backend.
#include <torch/extension.h>

#include "prehab_svd.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "prehab-svd CUDA kernels: covariance update, stable rank (value and gradient), low-rank linear";
  m.def("covariance_update", &prehab_svd::covariance_update,
        "In place: G += x^T x and, with C and y, C += x^T y (x, y [T, d]; G, C float32 [d, d])", py::arg("G"),
        py::arg("x"), py::arg("C") = py::none(), py::arg("y") = py::none());
  m.def("stable_rank", &prehab_svd::stable_rank,
        "(value [B], grad [B, m, n], state) of the stable-rank (nuclear=False, power iteration from v0) or "
        "nuclear-rank (Newton-Schulz) surrogate of M = W L",
        py::arg("W"), py::arg("L"), py::arg("v0"), py::arg("nuclear"), py::arg("iters"));
  m.def("lowrank_linear", &prehab_svd::lowrank_linear,
        "y = (x V^T) U^T + bias for x [T, in]; path 0 auto, 1 GEMV, 2 tensor-core decode, 3 cuBLAS", py::arg("x"),
        py::arg("U"), py::arg("V"), py::arg("bias") = py::none(), py::arg("path") = 0, py::arg("out") = py::none());
  m.def("arch_list", &prehab_svd::arch_list, "compute capabilities compiled in (nvcc's __CUDA_ARCH_LIST__)");
  m.attr("GEMV_MAX_T") = prehab_svd::kGemvMaxT;
  m.attr("DECODE_MAX_T") = prehab_svd::kDecodeMaxT;
  m.attr("PATHS") = py::dict(py::arg("auto") = 0, py::arg("gemv") = 1, py::arg("tensor_core") = 2, py::arg("cublas") = 3);
}
