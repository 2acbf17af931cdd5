"""``LowRankLinear``: the drop-in replacement for a compressed ``nn.Linear``."""

from __future__ import annotations

import math

import torch
from torch import nn

from . import ops
from .errors import PrehabError
from .ops import _registry
from .ops import reference as _reference

__all__ = ["LowRankLinear"]


def _autocast_enabled(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except (TypeError, RuntimeError):  # a device type without autocast
        return False


class LowRankLinear(nn.Module):
    """``y = (x Vᵀ) Uᵀ + b`` with ``U`` [out, rank] and ``V`` [rank, in].

    Holds ``rank·(in + out)`` weights instead of ``in·out``. The forward goes through
    :func:`prehab_svd.ops.lowrank_linear`, which picks the fastest backend for the device (the caller
    can force one with ``backend=`` or the ``PREHAB_SVD_BACKEND`` environment variable).

    When that choice is the plain-torch backend (and outside ``torch.compile`` and autocast), the
    forward calls its two GEMMs directly instead of through the ``torch.library`` custom op: the same
    arithmetic, without the op's per-call host cost (about 20 µs on the CPU, paid by every layer at
    every decode step), with autograd through the GEMMs themselves.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        bias: bool = True,
        device=None,
        dtype=None,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        for name, value in (("in_features", in_features), ("out_features", out_features), ("rank", rank)):
            if not isinstance(value, int) or value < 1:
                raise PrehabError(f"LowRankLinear: {name} must be a positive integer, got {value!r}")
        kw = {"device": device, "dtype": dtype}
        self.in_features = in_features
        self.out_features = out_features
        self.rank = rank
        self.backend = backend
        self.U = nn.Parameter(torch.empty(out_features, rank, **kw))
        self.V = nn.Parameter(torch.empty(rank, in_features, **kw))
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, **kw))
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Match nn.Linear's output scale: its weight is U(±1/√in), variance 1/(3·in). With
        # V ~ U(±1/√in) and U ~ U(±√(3/rank)), each entry of U V sums `rank` products of variance
        # (1/rank)·(1/(3·in)): the same 1/(3·in).
        bound_v = 1.0 / math.sqrt(self.in_features)
        nn.init.uniform_(self.V, -bound_v, bound_v)
        bound_u = math.sqrt(3.0 / self.rank)
        nn.init.uniform_(self.U, -bound_u, bound_u)
        if self.bias is not None:
            nn.init.uniform_(self.bias, -bound_v, bound_v)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        U, V, bias = self.U, self.V, self.bias
        if (x.dtype == U.dtype and x.device == U.device and x.dim() >= 1 and x.shape[-1] == self.in_features
                and not torch.compiler.is_compiling()
                and _registry.resolve("lowrank_linear", self.backend, x.device, x.dtype) == "torch"
                and not _autocast_enabled(x.device.type)):
            return _reference.lowrank_linear(x, U, V, bias)
        # Anything else (another backend, autocast, compile, a bad input with its clear error).
        return ops.lowrank_linear(x, U, V, bias, backend=self.backend)

    @property
    def weight(self) -> torch.Tensor:
        """The dense ``U V`` (computed on each access; for inspection, not for the forward)."""
        return self.U @ self.V

    @property
    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    @classmethod
    def from_factors(cls, U: torch.Tensor, V: torch.Tensor, bias: torch.Tensor | None = None):
        """Wrap given factors (copied). ``U`` [out, rank], ``V`` [rank, in], ``bias`` [out] or None."""
        if U.dim() != 2 or V.dim() != 2 or U.shape[1] != V.shape[0]:
            raise PrehabError(
                f"from_factors needs U [out, rank] and V [rank, in] with the same rank, got "
                f"U {tuple(U.shape)} and V {tuple(V.shape)}"
            )
        if bias is not None and (bias.dim() != 1 or bias.shape[0] != U.shape[0]):
            raise PrehabError(f"bias must have shape [{U.shape[0]}], got {tuple(bias.shape)}")
        if U.dtype != V.dtype or U.device != V.device:
            raise PrehabError("U and V must share dtype and device")
        layer = cls(V.shape[1], U.shape[0], U.shape[1], bias=bias is not None, device="meta", dtype=U.dtype)
        # Contiguous copies: the forward's GEMMs then see the same memory layout as after a
        # save/load round trip (so outputs are bit-identical), and the fast path.
        fmt = torch.contiguous_format
        layer.U = nn.Parameter(U.detach().clone(memory_format=fmt))
        layer.V = nn.Parameter(V.detach().clone(memory_format=fmt))
        if bias is not None:
            layer.bias = nn.Parameter(bias.detach().to(U.device, U.dtype).clone(memory_format=fmt))
        return layer

    @classmethod
    def from_linear(cls, linear: nn.Linear, rank: int):
        """Plain truncated SVD of ``linear.weight`` (computed in float64), balanced factors."""
        from .linalg import balanced_factors, check_rank, truncated_svd

        if not isinstance(linear, nn.Linear):
            raise PrehabError(f"from_linear expects an nn.Linear, got {type(linear).__name__}")
        rank = check_rank(rank)
        W = linear.weight.detach()
        U, S, Vh = truncated_svd(W.to(torch.float64), rank)
        A, B = balanced_factors(U, S, Vh, rank, W.dtype, W.device)
        bias = linear.bias.detach() if linear.bias is not None else None
        return cls.from_factors(A, B, bias)

    def to_dense(self) -> nn.Linear:
        """An ``nn.Linear`` with weight ``U V`` (product in float64, cast back)."""
        lin = nn.Linear(
            self.in_features, self.out_features, bias=self.bias is not None,
            device=self.U.device, dtype=self.U.dtype,
        )
        with torch.no_grad():
            W = self.U.detach().to(torch.float64) @ self.V.detach().to(torch.float64)
            lin.weight.copy_(W.to(self.U.dtype))
            if self.bias is not None:
                lin.bias.copy_(self.bias.detach())
        return lin

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
            f"bias={self.bias is not None}"
        )
