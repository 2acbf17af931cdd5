"""``LowRankLinear``: the drop-in replacement for a compressed ``nn.Linear``."""

from __future__ import annotations

import math

import torch
from torch import nn

from . import ops
from .errors import PrehabError
from .ops import _registry
from .ops import reference as _reference

__all__ = ["LowRankLinear", "FactorPair", "ALIGN", "padded_empty", "unpad"]

# Row strides of the stored factors are multiples of ALIGN elements. Triton marks an integer argument
# (a stride, a size) as aligned only when it is divisible by 16, and its vector loads and cp.async
# pipelines need that; the CUDA kernels need 16-byte row starts (8 bf16). A rank such as 819 would
# otherwise misalign every row of U [out, r].
ALIGN = 16


def _row_len(cols: int) -> int:
    return -(-cols // ALIGN) * ALIGN


def padded_empty(rows: int, cols: int, *, device=None, dtype=None) -> torch.Tensor:
    """A [rows, cols] tensor whose row stride is ``cols`` rounded up to a multiple of 16: the view
    ``[:, :cols]`` of a zero-initialised [rows, cols16] buffer (a plain contiguous tensor when
    ``cols`` is already a multiple of 16)."""
    ld = _row_len(cols)
    if ld == cols:
        return torch.empty(rows, cols, device=device, dtype=dtype)
    return torch.zeros(rows, ld, device=device, dtype=dtype)[:, :cols]


def _is_padded(t: torch.Tensor) -> bool:
    return (t.dim() == 2 and t.stride(1) == 1 and t.stride(0) == _row_len(t.shape[1])
            and (t.storage_offset() * t.element_size()) % 16 == 0)


def _padded_copy(t: torch.Tensor) -> torch.Tensor:
    out = padded_empty(t.shape[0], t.shape[1], device=t.device, dtype=t.dtype)
    out.copy_(t)
    return out


def _autocast_enabled(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except (TypeError, RuntimeError):  # a device type without autocast
        return False


def _needs_grad(*ts) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in ts)


def _lowrank_padded_z(x, U, V, bias) -> torch.Tensor:
    """The torch backend's two GEMMs with the bottleneck z = x Vᵀ written into a [T, r16] buffer, so
    that the second GEMM reads z at a 16-aligned leading dimension (cuBLASLt's fast Hopper kernels
    need 16-byte aligned leading dimensions; a ragged rank's [T, r] z has none). Inference only
    (``out=`` has no autograd); the same products and accumulation as ``F.linear`` twice."""
    x2 = x.reshape(-1, x.shape[-1])
    r = V.shape[0]
    z = torch.empty(x2.shape[0], _row_len(r), device=x.device, dtype=x.dtype)[:, :r]
    torch.mm(x2, V.t(), out=z)
    y = torch.mm(z, U.t()) if bias is None else torch.addmm(bias, z, U.t())
    return y.reshape(*x.shape[:-1], U.shape[0])


class LowRankLinear(nn.Module):
    """``y = (x Vᵀ) Uᵀ + b`` with ``U`` [out, rank] and ``V`` [rank, in].

    Holds ``rank·(in + out)`` weights instead of ``in·out``: ``U``, ``V`` and ``num_params`` have exactly
    ``rank`` columns / rows, and so does every saved checkpoint.

    Storage: each factor's row stride is padded to a multiple of 16 elements (:data:`ALIGN`):
    ``U`` is the view ``[:, :rank]`` of an [out, rank16] buffer and ``V`` the view ``[:, :in]`` of an
    [rank, in16] buffer (``n16`` = n rounded up to a multiple of 16; the padding is zero and never
    read). The keep rule's ranks are rarely multiples of 16 (LLaMA-7B: 819, 1228, 1638, 1791), and
    without this every row of U starts misaligned: Triton then drops from 16-byte cp.async pipelines
    to scalar loads and the CUDA kernels miss their vector path. Memory cost: ``out·(rank16 − rank) +
    rank·(in16 − in)`` extra elements per layer (at most 15·(out + rank); ``padding_elements``), e.g.
    13·4096 = 53 248 bf16 elements (104 KiB, 0.8 % of the layer) for a 4096² layer at rank 819; for
    all of LLaMA-7B (ranks 819 / 1194 at keep 0.4, 1228 / 1791 at 0.6, 1638 / 2388 at 0.8) 11.8 M,
    2.9 M and 15.3 M elements: 23.7, 5.9 and 30.5 MB in bf16, 0.46 %, 0.08 % and 0.29 % of the kept
    weights.
    The layout survives ``.to()``/``.cuda()``/``.half()``, ``load_state_dict`` (also ``assign=True``),
    ``copy.deepcopy`` and pickling (each re-pads); ``state_dict()`` returns contiguous copies of
    padded factors (safetensors stores only contiguous tensors: a transient copy of U per layer while
    a state dict is alive), so checkpoints hold exactly ``rank`` columns and load as before.
    FSDP2's ``fully_shard`` refuses non-contiguous parameters: call :func:`unpad` (or
    ``layer.unpad_()``) on the model first; the layers then stay contiguous (``pad_storage`` False)
    until ``repad_()``.

    The forward goes through
    :func:`prehab_svd.ops.lowrank_linear`, which picks the fastest backend for the device (the caller
    can force one with ``backend=`` or the ``PREHAB_SVD_BACKEND`` environment variable).

    When that choice is the plain-torch backend (and outside ``torch.compile`` and autocast), the
    forward calls its two GEMMs directly instead of through the ``torch.library`` custom op: the same
    arithmetic (on CUDA, without autograd and at a rank that is not a multiple of 16, with z in a
    [T, rank16] buffer so the second GEMM sees an aligned leading dimension), without the op's
    per-call host cost (about 20 µs on the CPU, paid by every layer at
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
        self.pad_storage = True  # keep U, V in the padded layout (unpad_() for FSDP2)
        self.U = nn.Parameter(padded_empty(out_features, rank, **kw))
        self.V = nn.Parameter(padded_empty(rank, in_features, **kw))
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

    # -- the padded layout: restored wherever torch would hand back a contiguous copy ---------------

    def _repad(self) -> None:
        """Give U and V their padded layout again where a conversion made them contiguous (a
        non-dense view comes back contiguous from ``.to()``, ``clone`` and ``deepcopy``)."""
        if not getattr(self, "pad_storage", True):
            return
        with torch.no_grad():
            for name in ("U", "V"):
                p = self._parameters.get(name)
                if p is None or type(p.data) is not torch.Tensor or p.dim() != 2 or _is_padded(p):
                    continue  # absent, a tensor subclass (FSDP / DTensor shards), or already padded
                p.data = _padded_copy(p.data)

    def _apply(self, fn, recurse=True):
        out = super()._apply(fn, recurse)
        self._repad()
        return out

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)  # copies into the padded views (or assigns)
        self._repad()

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if not keep_vars:  # exactly `rank` columns, contiguous (safetensors refuses strided views)
            for name in ("U", "V"):
                t = destination.get(prefix + name)
                if t is not None and not t.is_contiguous():
                    destination[prefix + name] = t.contiguous()

    def __setstate__(self, state):
        super().__setstate__(state)
        self._repad()

    def unpad_(self) -> "LowRankLinear":
        """Store U and V contiguously (the same Parameter objects), e.g. before FSDP2's
        ``fully_shard``, which refuses strided parameters; conversions and loads keep them so."""
        self.pad_storage = False
        with torch.no_grad():
            for name in ("U", "V"):
                p = self._parameters.get(name)
                if p is not None and type(p.data) is torch.Tensor and not p.is_contiguous():
                    p.data = p.data.contiguous()
        return self

    def repad_(self) -> "LowRankLinear":
        """Back to the padded layout (the default) after :meth:`unpad_`."""
        self.pad_storage = True
        self._repad()
        return self

    @property
    def padding_elements(self) -> int:
        """Elements allocated beyond the parameters by the 16-element row padding of U and V."""
        return sum(p.shape[0] * (p.stride(0) - p.shape[1]) for p in (self.U, self.V) if p.shape[0] > 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        U, V, bias = self.U, self.V, self.bias
        if (x.dtype == U.dtype and x.device == U.device and x.dim() >= 1 and x.shape[-1] == self.in_features
                and not torch.compiler.is_compiling()
                and _registry.resolve("lowrank_linear", self.backend, x.device, x.dtype) == "torch"
                and not _autocast_enabled(x.device.type)):
            if x.is_cuda and self.rank % ALIGN and not _needs_grad(x, U, V, bias):
                return _lowrank_padded_z(x, U, V, bias)
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
        # Copies in the padded layout: the forward's GEMMs then see the same memory layout as after
        # a save/load round trip (so outputs are bit-identical), and the kernels' aligned paths.
        layer.U = nn.Parameter(_padded_copy(U.detach()))
        layer.V = nn.Parameter(_padded_copy(V.detach()))
        if bias is not None:
            layer.bias = nn.Parameter(bias.detach().to(U.device, U.dtype).clone(memory_format=torch.contiguous_format))
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


class FactorPair(nn.Module):
    """A :class:`LowRankLinear` in its training form: ``up(down(x))``, two ``nn.Linear`` layers with
    ``down.weight`` = V [r, in] and ``up.weight`` = U [out, r] (and ``up.bias`` the bias): the very
    same parameter tensors, shared, not copied. :func:`prehab_svd.rehab` swaps each adapted layer for
    one so that ``peft`` can attach a LoRA adapter to each factor, and :meth:`to_lowrank` turns it
    back; under FSDP2 the pairs stay (:func:`prehab_svd.fsdp.full_state_dict` renames their
    parameters to the ``LowRankLinear`` names)."""

    def __init__(self, layer: LowRankLinear):
        super().__init__()
        r, n = layer.V.shape
        m = layer.U.shape[0]
        dev, dt = layer.V.device, layer.V.dtype
        self.down = nn.Linear(n, r, bias=False, device="meta")
        self.up = nn.Linear(r, m, bias=layer.bias is not None, device="meta")
        self.down.weight = layer.V
        self.up.weight = layer.U
        if layer.bias is not None:
            self.up.bias = layer.bias
        self._device, self._dtype = dev, dt

    def forward(self, x):
        return self.up(self.down(x))

    def to_lowrank(self) -> LowRankLinear:
        return LowRankLinear.from_factors(self.up.weight.detach(), self.down.weight.detach(),
                                          None if self.up.bias is None else self.up.bias.detach())


def unpad(model: nn.Module) -> int:
    """Make every strided parameter of ``model`` contiguous, in place (the same Parameter objects),
    and keep its LowRankLinear layers so (:meth:`LowRankLinear.unpad_`): FSDP2's ``fully_shard``
    refuses non-contiguous parameters. Also reaches factors shared into other modules (rehab's
    adapters hold U and V as ``nn.Linear`` weights). Returns how many parameters it changed."""
    for m in model.modules():
        if isinstance(m, LowRankLinear):
            m.pad_storage = False
    n = 0
    with torch.no_grad():
        for p in model.parameters():
            if type(p.data) is torch.Tensor and not p.is_contiguous():
                p.data = p.data.contiguous()
                n += 1
    return n
