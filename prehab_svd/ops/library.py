"""``torch.library`` registrations of the three ops, and the torch backend's registration.

Each op is one custom op (``torch.ops.prehab_svd.*``), so ``torch.compile`` sees a single node with
a fake (meta) implementation for shape propagation, and autograd goes through ``register_autograd``.
The op's real implementation only looks up the backend in :mod:`._registry` at run time (so the
``PREHAB_SVD_BACKEND`` variable is read when the op runs, also inside a compiled graph) and calls it.
No math here: it lives in :mod:`.reference` (and, later, in the Triton/CUDA kernels).

Schemas::

    prehab_svd::covariance_update(Tensor(a!) G, Tensor x, Tensor(b!)? C, Tensor? y, str backend) -> ()
    prehab_svd::stable_rank(Tensor W, Tensor? L, str kind, Tensor? state, int? iters, str backend)
        -> (Tensor value, Tensor grad, Tensor state)
    prehab_svd::lowrank_linear(Tensor x, Tensor U, Tensor V, Tensor? bias, str backend) -> Tensor
"""

from __future__ import annotations

from typing import Optional

import torch

from . import _registry, reference

__all__ = ["covariance_update_op", "stable_rank_op", "lowrank_linear_op"]

# ---------------------------------------------------------------------------------------------
# the torch backend: supports every device and dtype, lowest priority
# ---------------------------------------------------------------------------------------------
_registry.register("covariance_update", "torch", reference.covariance_update, priority=0)
_registry.register("stable_rank", "torch", reference.stable_rank, priority=0)
_registry.register("lowrank_linear", "torch", reference.lowrank_linear, priority=0)


# ---------------------------------------------------------------------------------------------
# covariance_update
# ---------------------------------------------------------------------------------------------
@torch.library.custom_op("prehab_svd::covariance_update", mutates_args=("G", "C"))
def covariance_update_op(
    G: torch.Tensor, x: torch.Tensor, C: Optional[torch.Tensor], y: Optional[torch.Tensor], backend: str
) -> None:
    impl = _registry.get_impl("covariance_update", backend, x.device, x.dtype)
    impl(G, x, C, y)


@covariance_update_op.register_fake
def _covariance_update_fake(G, x, C, y, backend):
    return None


# ---------------------------------------------------------------------------------------------
# stable_rank
# ---------------------------------------------------------------------------------------------
@torch.library.custom_op("prehab_svd::stable_rank", mutates_args=())
def stable_rank_op(
    W: torch.Tensor,
    L: Optional[torch.Tensor],
    kind: str,
    state: Optional[torch.Tensor],
    iters: Optional[int],
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    impl = _registry.get_impl("stable_rank", backend, W.device, W.dtype)
    # Both surrogates are scale-invariant, their W-gradients homogeneous of degree -1: a W or L whose
    # largest entry is outside [2^-16, 2^16] is scaled by a power of two (exact) to max |entry| in
    # [0.5, 1) before any backend sees it, so no fp32 product of the kernels over- or underflows
    # (unscaled, the value silently came out 0 beyond about 1e±9), and the gradient is scaled back.
    # Weights of ordinary size are multiplied by 1. (The reference also normalizes M = W L itself.)
    W, w_scale = reference.pow2_normalized(W, keep_within=16)
    if L is not None:
        L, _ = reference.pow2_normalized(L, keep_within=16)
    value, grad, new_state = impl(W, L, kind, state, iters)
    grad = grad * w_scale.to(grad.dtype)
    # custom ops must not return views of their inputs
    if state is not None and new_state.untyped_storage().data_ptr() == state.untyped_storage().data_ptr():
        new_state = new_state.clone()
    # the fake impl promises contiguous outputs; a backend may hand back a transposed layout
    return value.contiguous(), grad.contiguous(), new_state.contiguous()


@stable_rank_op.register_fake
def _stable_rank_fake(W, L, kind, state, iters, backend):
    B, m, n = W.shape
    cd = reference.compute_dtype(W.dtype)
    k = n if kind == "stable" else 0
    return W.new_empty(B, dtype=cd), W.new_empty(B, m, n, dtype=cd), W.new_empty(B, k, dtype=cd)


def _stable_rank_setup(ctx, inputs, output):
    W = inputs[0]
    _, grad, state = output
    ctx.w_dtype = W.dtype
    # keep the gradient in W's dtype (what dW will be): halves what is held until backward for bf16 W
    ctx.save_for_backward(grad.to(W.dtype))
    # the gradient and the power-iteration state are results, not differentiable functions of W
    ctx.mark_non_differentiable(grad, state)


def _stable_rank_backward(ctx, grad_value, _grad_grad, _grad_state):
    (grad,) = ctx.saved_tensors
    dW = None
    if ctx.needs_input_grad[0]:
        scale = grad_value.to(torch.promote_types(grad.dtype, torch.float32))[:, None, None]
        dW = (scale * grad).to(ctx.w_dtype)
    return dW, None, None, None, None, None


stable_rank_op.register_autograd(_stable_rank_backward, setup_context=_stable_rank_setup)


# ---------------------------------------------------------------------------------------------
# lowrank_linear
# ---------------------------------------------------------------------------------------------
@torch.library.custom_op("prehab_svd::lowrank_linear", mutates_args=())
def lowrank_linear_op(
    x: torch.Tensor, U: torch.Tensor, V: torch.Tensor, bias: Optional[torch.Tensor], backend: str
) -> torch.Tensor:
    impl = _registry.get_impl("lowrank_linear", backend, x.device, x.dtype)
    return impl(x, U, V, bias)


@lowrank_linear_op.register_fake
def _lowrank_linear_fake(x, U, V, bias, backend):
    return x.new_empty(*x.shape[:-1], U.shape[0])


def _lowrank_linear_setup(ctx, inputs, output):
    x, U, V, bias, _backend = inputs
    ctx.save_for_backward(x, U, V)


def _lowrank_linear_backward(ctx, grad_y):
    x, U, V = ctx.saved_tensors
    dx, dU, dV, db = reference.lowrank_linear_backward(grad_y, x, U, V, tuple(ctx.needs_input_grad[:4]))
    return dx, dU, dV, db, None


lowrank_linear_op.register_autograd(_lowrank_linear_backward, setup_context=_lowrank_linear_setup)
