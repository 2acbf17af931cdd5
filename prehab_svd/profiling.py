"""Profile one stage of the library under ``torch.profiler``: a Chrome trace and a table of the top ops.

Stages (:data:`STAGES`):

``calibration``
    covariance accumulation of every targeted layer input over one calibration batch of a small
    LLaMA-shaped model (:func:`prehab_svd.training.whitening.layer_input_grams`: hooks, token selection and
    ``ops.covariance_update``), what ``compress`` does for each block.
``lowrank``
    one :class:`~prehab_svd.layers.LowRankLinear` forward at a given shape, rank, token count, dtype.
``decode``
    one decode step (a single new token per sequence, with the KV cache of a prompt) of a compressed
    LLaMA-shaped model (random factors of the ranks ``keep_ratio`` gives: the shapes matter, not the
    weights), or of a model folder given by the caller (compressed as loaded, or as above if dense).

:func:`profile_stage` runs the stage ``warmup`` times, then ``steps`` times under the profiler (CPU
activity, plus CUDA on a GPU), writes the Chrome trace atomically, and aggregates the ops by name and
input shapes. Each row's time is the op's *self* time on the device that did the work: the kernels it
launched itself on CUDA, its own CPU time on the CPU, so rows add up without double counting.
Achieved rates are given where the work is known: FLOPs from the profiler (``with_flops``: matrix
products) or from the shapes of this library's custom ops; bytes from the recorded input shapes and
dtypes (products: inputs + output; element-wise ops: inputs + one output of the first input's size).
They are compared with the device's measured peaks (:func:`measure_peaks`: a large matrix product
and a large copy, once per process), not with datasheet numbers.

:func:`forward_floor` times what no post-training compression can do without: the forward passes of
the block driver over the calibration tokens (the first block's inputs captured, then every block up
to the last targeted one, once per stream), with nothing else (no hooks, no statistics). A
compression's ``report.seconds`` over it is how far the method is from the speed of its forwards.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .errors import PrehabError
from .utils import check_keep_ratio, write_atomic

__all__ = ["STAGES", "OpStat", "ProfileResult", "measure_peaks", "profile_stage", "small_llama",
           "format_table", "forward_floor"]

STAGES = ("calibration", "lowrank", "decode")

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# element size by the profiler's dtype names (c10 ScalarType names)
_ELT = {"float": 4, "double": 8, "c10::half": 2, "c10::bfloat16": 2, "half": 2, "bfloat16": 2,
        "long int": 8, "int": 4, "short int": 2, "signed char": 1, "unsigned char": 1, "bool": 1,
        "c10::complex<float>": 8, "c10::complex<double>": 16}

# ops whose memory traffic is "read every input, write one tensor the size of the first"
_ELEMENTWISE = {
    "aten::add", "aten::add_", "aten::sub", "aten::sub_", "aten::mul", "aten::mul_", "aten::div",
    "aten::div_", "aten::copy_", "aten::neg", "aten::silu", "aten::silu_", "aten::gelu", "aten::relu",
    "aten::sigmoid", "aten::tanh", "aten::exp", "aten::rsqrt", "aten::pow", "aten::where",
    "aten::clone", "aten::_to_copy", "aten::cat", "aten::index", "aten::masked_fill", "aten::fill_",
    "aten::zero_", "aten::abs", "aten::cos", "aten::sin", "aten::_softmax", "aten::softmax",
}


# --------------------------------------------------------------------------------------------------
# device peaks


_PEAKS: dict = {}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _best_time(fn, device: torch.device, reps: int) -> float:
    fn()
    _sync(device)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return best


def _time_matmul(n: int, device, dtype, reps: int) -> float:
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    return _best_time(lambda: torch.mm(a, b), device, reps)


def _time_copy(nbytes: int, device, reps: int) -> float:
    src = torch.empty(nbytes // 4, device=device, dtype=torch.float32)
    dst = torch.empty_like(src)
    return _best_time(lambda: dst.copy_(src), device, reps)


def measure_peaks(device="cpu", dtype: torch.dtype | None = None) -> dict:
    """Achievable matmul FLOP/s (in ``dtype``; bf16 on CUDA, fp32 on CPU by default) and copy
    bandwidth (bytes read + written per second) on ``device``, best of a few runs, cached per process.

    Sizes: CUDA 8192³ products and a 1 GiB copy (~3 TB/s and ~800 TFLOP/s bf16 on an H100); CPU
    1024³ and 64 MiB (a small, quick estimate: the CPU has no single peak worth more effort).
    """
    device = torch.device(device)
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    key = (str(device), dtype)
    if key in _PEAKS:
        return _PEAKS[key]
    if device.type == "cuda":
        n, nbytes, reps = 8192, 1 << 30, 5
    else:
        n, nbytes, reps = 1024, 1 << 26, 3
    t_mm = _time_matmul(n, device, dtype, reps)
    t_copy = _time_copy(nbytes, device, reps)
    peaks = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "matmul_dtype": str(dtype).replace("torch.", ""),
        "matmul_tflops": 2 * n**3 / t_mm / 1e12,
        "copy_gbps": 2 * nbytes / t_copy / 1e9,
        "matmul_size": n,
        "copy_bytes": nbytes,
    }
    _PEAKS[key] = peaks
    return peaks


# --------------------------------------------------------------------------------------------------
# aggregation


@dataclass
class OpStat:
    """One op (name + input shapes) aggregated over the profiled steps."""

    name: str
    shapes: str
    calls: int
    self_us: float  # self time on the device that ran it (CUDA kernels, or CPU), all calls
    flops: float | None = None  # all calls
    bytes: float | None = None  # all calls, estimated from shapes and dtypes

    @property
    def tflops(self) -> float | None:
        return None if not self.flops or self.self_us <= 0 else self.flops / (self.self_us * 1e-6) / 1e12

    @property
    def gbps(self) -> float | None:
        return None if not self.bytes or self.self_us <= 0 else self.bytes / (self.self_us * 1e-6) / 1e9


@dataclass
class ProfileResult:
    """What :func:`profile_stage` measured; ``table()`` formats it."""

    stage: str
    description: str
    device: str
    dtype: str
    steps: int
    trace: str
    peaks: dict
    ops: list = field(default_factory=list)  # OpStat, by self time, descending
    kernels: list = field(default_factory=list)  # CUDA only: (kernel name, calls, total us)
    total_us: float = 0.0  # sum of self times of all ops
    wall_s: float = 0.0  # wall time of the profiled steps (profiler overhead included)

    def table(self, top: int = 15) -> str:
        return format_table(self, top)

    def to_dict(self) -> dict:
        d = asdict(self)
        for row, op in zip(d["ops"], self.ops):
            row["tflops"], row["gbps"] = op.tflops, op.gbps
        return d


def _elt_size(dtype_name: str | None, default: int) -> int | None:
    if not dtype_name:
        return None
    if dtype_name in ("Scalar", "ScalarList", "TensorList", "None", "GenericList"):
        return None
    return _ELT.get(dtype_name, default)


def _tensor_inputs(evt, default_elt: int) -> list:
    """[(shape, element size)] of the tensor inputs of a profiler event (scalars dropped)."""
    shapes = list(getattr(evt, "input_shapes", None) or [])
    dtypes = list(getattr(evt, "input_dtypes", None) or [])
    out = []
    for i, s in enumerate(shapes):
        if not isinstance(s, (list, tuple)) or not s or not all(isinstance(v, int) for v in s):
            continue  # scalars and 0-d tensors carry no traffic worth counting; lists are skipped
        elt = _elt_size(dtypes[i], default_elt) if i < len(dtypes) else default_elt
        if elt is None:
            continue
        out.append((tuple(s), elt))
    return out


def _numel(shape) -> int:
    return math.prod(shape)


def _work(name: str, inputs: list, profiler_flops: int) -> tuple[float | None, float | None]:
    """(FLOPs, bytes) of one call, where known."""
    flops = float(profiler_flops) if profiler_flops else None
    if not inputs:
        return flops, None
    nbytes = float(sum(_numel(s) * e for s, e in inputs))
    if name in ("aten::mm", "aten::bmm", "aten::addmm", "aten::baddbmm", "aten::addmm_", "aten::baddbmm_"):
        k = 0 if name in ("aten::mm", "aten::bmm") else 1
        if len(inputs) < k + 2:
            return flops, None
        (a, ea), (b, _) = inputs[k], inputs[k + 1]
        out = a[:-1] + (b[-1],)
        flops = flops or float(2 * _numel(out) * a[-1])
        if name.endswith("_"):  # in place: the first input is read and written
            return flops, nbytes + _numel(inputs[0][0]) * inputs[0][1]
        return flops, nbytes + _numel(out) * ea
    if name.startswith("aten::_scaled_dot_product") and len(inputs) >= 3:
        (q, eq), (k_, _) = inputs[0], inputs[1]
        if len(q) == 4 and len(k_) == 4:  # [B, H, Lq, D] x [B, Hkv, Lk, D]: QKᵀ and PV (causal masking ignored)
            B, H, Lq, D = q
            return float(4 * B * H * Lq * k_[2] * D), nbytes + _numel(q) * eq
        return flops, None
    if name == "prehab_svd::lowrank_linear" and len(inputs) >= 3:
        (x, ex), (u, _), (v, _) = inputs[:3]
        T = _numel(x[:-1])
        r, n_in, n_out = v[0], v[1], u[0]
        return float(2 * T * r * (n_in + n_out)), nbytes + T * n_out * ex
    if name == "prehab_svd::covariance_update" and len(inputs) >= 2:
        (g, eg), (x, _) = inputs[0], inputs[1]
        streams = 2 if len(inputs) >= 4 else 1
        T, d = x[0], x[1]
        return float(2 * T * d * d * streams), nbytes + streams * _numel(g) * eg
    if name in _ELEMENTWISE:
        return flops, nbytes + _numel(inputs[0][0]) * inputs[0][1]
    return flops, None


_CUSTOM = ("prehab_svd::lowrank_linear", "prehab_svd::covariance_update")
_PRODUCTS = ("aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm", "aten::baddbmm", "aten::matmul",
             "aten::linear")


def _delegates(evt) -> bool:
    """True when one of the op's descendants is an aten matrix product (the torch backend), so the
    op's own self time is only dispatch overhead; False when it runs its own kernels (Triton, CUDA)."""
    stack = list(getattr(evt, "cpu_children", None) or [])
    while stack:
        child = stack.pop()
        if child.name in _PRODUCTS:
            return True
        stack.extend(getattr(child, "cpu_children", None) or [])
    return False


def _self_device_us(evt) -> float:
    for attr in ("self_device_time_total", "self_cuda_time_total"):
        v = getattr(evt, attr, None)
        if v is not None:
            return float(v)
    return 0.0


def _aggregate(events, on_cuda: bool, default_elt: int) -> tuple[list, list]:
    ops: dict = {}
    kernels: dict = {}
    for evt in events:
        if getattr(evt, "device_type", None) is not None and str(evt.device_type).endswith("CUDA"):
            continue  # device-side rows are read through their launching op's .kernels below
        t = _self_device_us(evt) if on_cuda else float(evt.self_cpu_time_total)
        if on_cuda:
            for k in getattr(evt, "kernels", None) or []:
                row = kernels.setdefault(k.name, [0, 0.0])
                row[0] += 1
                row[1] += float(k.duration)
        inputs = _tensor_inputs(evt, default_elt)
        shapes = ", ".join("x".join(str(v) for v in s) for s, _ in inputs)
        key = (evt.name, shapes)
        st = ops.get(key)
        if st is None:
            st = ops[key] = OpStat(evt.name, shapes, 0, 0.0, 0.0, 0.0)
        st.calls += 1
        st.self_us += t
        if evt.name in _CUSTOM and _delegates(evt):
            f, b = None, None  # the work is done (and counted) by the aten products it calls
        else:
            f, b = _work(evt.name, inputs, getattr(evt, "flops", 0) or 0)
        st.flops = None if (f is None or st.flops is None) else st.flops + f
        st.bytes = None if (b is None or st.bytes is None) else st.bytes + b
    rows = [op for op in ops.values() if op.self_us > 0]
    for op in rows:
        op.flops = op.flops or None
        op.bytes = op.bytes or None
    rows.sort(key=lambda op: -op.self_us)
    krows = sorted(((n, c, us) for n, (c, us) in kernels.items()), key=lambda r: -r[2])
    return rows, krows


def format_table(res: ProfileResult, top: int = 15) -> str:
    """The top ``top`` ops by self time, with achieved TFLOP/s and GB/s against the measured peaks."""
    pk = res.peaks
    lines = [
        f"stage {res.stage}: {res.description}",
        f"device {res.device} ({res.dtype}), {res.steps} profiled step(s); measured peaks "
        f"{pk['matmul_tflops']:.2f} TFLOP/s ({pk['matmul_dtype']} matmul {pk['matmul_size']}^3), "
        f"{pk['copy_gbps']:.1f} GB/s (copy)",
        f"self time of all ops: {res.total_us / 1e3:.3f} ms ({res.total_us / max(res.steps, 1) / 1e3:.3f} "
        f"ms per step); trace: {res.trace}",
    ]
    head = ("op", "calls", "self ms", "%", "TFLOP/s", "%pk", "GB/s", "%pk", "input shapes")
    rows = [head]
    for op in res.ops[:top]:
        tf, gb = op.tflops, op.gbps
        rows.append((
            op.name, str(op.calls), f"{op.self_us / 1e3:.3f}",
            f"{100 * op.self_us / max(res.total_us, 1e-9):.1f}",
            "-" if tf is None else f"{tf:.3g}", "-" if tf is None else f"{100 * tf / pk['matmul_tflops']:.0f}",
            "-" if gb is None else f"{gb:.3g}", "-" if gb is None else f"{100 * gb / pk['copy_gbps']:.0f}",
            op.shapes[:60],
        ))
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    fmt = ["  ".join(c.ljust(w) if i in (0, 8) else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
           for r in rows]
    fmt.insert(1, "-" * len(fmt[0]))
    lines += [""] + fmt
    if res.kernels:
        lines += ["", "top CUDA kernels by time:"]
        for name, calls, us in res.kernels[:top]:
            lines.append(f"  {us / 1e3:10.3f} ms  {calls:5d}x  {name[:110]}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# stages


def small_llama(*, hidden=256, intermediate=688, layers=2, heads=4, kv_heads=2, vocab=1024,
                device="cpu", dtype=torch.float32, seed=0):
    """A LLaMA-shaped ``LlamaForCausalLM`` with random weights, built from a config (no download)."""
    import transformers

    if hidden % heads or heads % kv_heads:
        raise PrehabError(f"hidden ({hidden}) must be a multiple of heads ({heads}), and heads of kv heads "
                          f"({kv_heads})")
    cfg = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=8192)
    torch.manual_seed(seed)
    with torch.device(device):
        model = transformers.LlamaForCausalLM._from_config(cfg, dtype=dtype)
    model.config.architectures = ["LlamaForCausalLM"]
    return model.eval()


def _check_positive(**values):
    for name, v in values.items():
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise PrehabError(f"{name} must be a positive integer, got {v!r}")


def _stage_lowrank(device, dtype, opts):
    from .layers import LowRankLinear
    from .models import rank_for

    n_in, n_out, tokens = opts.get("in_features", 4096), opts.get("out_features", 4096), opts.get("tokens", 16)
    _check_positive(in_features=n_in, out_features=n_out, tokens=tokens)
    rank = opts.get("rank")
    if rank is None:
        rank = rank_for(n_out, n_in, opts.get("keep_ratio", 0.6))
        if rank is None:
            raise PrehabError(f"keep_ratio {opts.get('keep_ratio')} reaches the break-even rank of a "
                              f"{n_out}x{n_in} layer; pass a smaller keep ratio or --rank")
    _check_positive(rank=rank)
    layer = LowRankLinear(n_in, n_out, rank, bias=opts.get("bias", False), device=device, dtype=dtype,
                          backend=opts.get("backend", "auto"))
    x = torch.randn(tokens, n_in, device=device, dtype=dtype)

    def step():
        with torch.inference_mode():
            layer(x)

    desc = (f"LowRankLinear forward, in {n_in}, out {n_out}, rank {rank}, {tokens} tokens, "
            f"backend {layer.backend}")
    return step, desc


def _model_opts(opts) -> dict:
    keys = ("hidden", "intermediate", "layers", "heads", "kv_heads", "vocab")
    return {k: opts[k] for k in keys if opts.get(k) is not None}


def _load_or_build(device, dtype, opts):
    path = opts.get("model")
    if path is None:
        return small_llama(device=device, dtype=dtype, **_model_opts(opts))
    from .io import load_model
    from .pretrained import resolve_model_path

    model, _causal = load_model(resolve_model_path(str(path)))
    return model.to(device=device, dtype=dtype).eval()


def _stage_calibration(device, dtype, opts):
    from .models import plan_targets
    from .training.whitening import layer_input_grams

    batch, seq = opts.get("batch_size", 4), opts.get("seq_len", 256)
    _check_positive(batch_size=batch, seq_len=seq)
    model = _load_or_build(device, dtype, opts)
    try:
        names = plan_targets(model).targets
    except PrehabError as e:
        raise PrehabError(f"the calibration stage needs a model with dense linear layers (is it already "
                          f"compressed?): {e}") from None
    vocab = model.get_input_embeddings().num_embeddings
    ids = torch.randint(0, vocab, (batch, seq), device=device)
    batches = [{"input_ids": ids}]
    stats_dtype = torch.float64 if opts.get("fp64_stats") else torch.float32

    def step():
        layer_input_grams(model, names, batches, dtype=stats_dtype)

    desc = (f"covariances of {len(names)} layer inputs over one batch of {batch}x{seq} tokens "
            f"({type(model).__name__}, {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters)")
    return step, desc


def _stage_decode(device, dtype, opts):
    from .io import apply_ranks
    from .layers import LowRankLinear
    from .models import plan_targets, rank_for

    batch, prompt = opts.get("batch_size", 1), opts.get("seq_len", 128)
    _check_positive(batch_size=batch, seq_len=prompt)
    keep = opts.get("keep_ratio", 0.6)
    model = _load_or_build(device, dtype, opts)
    how = "as loaded"
    if not any(isinstance(m, LowRankLinear) for m in model.modules()):
        # random factors of the ranks keep_ratio gives: the speed depends on the shapes, not the
        # weights, and this skips an SVD per layer (minutes at 7B scale)
        check_keep_ratio(keep)
        ranks = {}
        for name in plan_targets(model).targets:
            lin = model.get_submodule(name)
            r = rank_for(lin.out_features, lin.in_features, keep)
            if r is not None:
                ranks[name] = max(r, 1)
        apply_ranks(model, ranks)
        how = f"keep_ratio {keep}, random factors"
    lowrank = sum(isinstance(m, LowRankLinear) for m in model.modules())
    vocab = model.get_input_embeddings().num_embeddings
    g = torch.Generator(device="cpu").manual_seed(0)
    ids = torch.randint(0, vocab, (batch, prompt), generator=g).to(device)
    with torch.inference_mode():
        out = model(input_ids=ids, use_cache=True)
    state = {"cache": out.past_key_values, "next": out.logits[:, -1:].argmax(-1)}

    def step():
        with torch.inference_mode():
            o = model(input_ids=state["next"], past_key_values=state["cache"], use_cache=True)
        state["cache"] = o.past_key_values
        state["next"] = o.logits[:, -1:].argmax(-1)

    desc = (f"one decode step, batch {batch}, after a {prompt}-token prompt ({type(model).__name__}, "
            f"{lowrank} LowRankLinear layers, {how})")
    return step, desc


_BUILDERS = {"calibration": _stage_calibration, "lowrank": _stage_lowrank, "decode": _stage_decode}


def _write_trace(prof, path: Path) -> None:
    """export_chrome_trace to a temporary file next to ``path``, then rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, prof.export_chrome_trace)


def profile_stage(stage: str, trace, *, device="cpu", dtype=None, steps: int = 3, warmup: int = 2,
                  overwrite: bool = False, **opts) -> ProfileResult:
    """Profile ``stage`` (one of :data:`STAGES`) and write its Chrome trace to ``trace``.

    ``dtype``: a torch dtype or its name; default bf16 on CUDA, fp32 on CPU. Stage options (``opts``):

    * ``lowrank``: in_features, out_features, rank (or keep_ratio), tokens, bias, backend;
    * ``calibration``: batch_size, seq_len, fp64_stats, and the model (below);
    * ``decode``: batch_size, seq_len (the prompt), keep_ratio, and the model (below).

    The model: ``model`` (a local Hugging Face folder, or one saved by prehab-svd), else a random
    LLaMA-shaped one from hidden, intermediate, layers, heads, kv_heads, vocab
    (:func:`small_llama`'s defaults).
    """
    from torch.profiler import ProfilerActivity, profile, record_function

    if stage not in STAGES:
        raise PrehabError(f"unknown stage {stage!r}; choose one of {', '.join(STAGES)}")
    _check_positive(steps=steps)
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise PrehabError(f"warmup must be a non-negative integer, got {warmup!r}")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise PrehabError("device 'cuda' was asked for but torch sees no GPU; use --device cpu")
    if isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise PrehabError(f"unknown dtype {dtype!r}; choose one of {', '.join(_DTYPES)}")
        dtype = _DTYPES[dtype]
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    trace = Path(trace)
    if trace.exists() and not overwrite:
        raise PrehabError(f"trace file '{trace}' already exists; choose another path or pass overwrite")
    if trace.is_dir():
        raise PrehabError(f"trace path '{trace}' is a folder; give a file name such as trace.json")

    step, desc = _BUILDERS[stage](device, dtype, opts)
    for _ in range(warmup):
        step()
    _sync(device)
    on_cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_cuda else [])
    t0 = time.perf_counter()
    with profile(activities=activities, record_shapes=True, with_flops=True) as prof:
        for i in range(steps):
            with record_function(f"prehab_svd.profile.{stage}.step{i}"):
                step()
            _sync(device)
    wall = time.perf_counter() - t0
    _write_trace(prof, trace)
    elt = torch.empty((), dtype=dtype).element_size()
    ops, kernels = _aggregate(prof.events(), on_cuda, elt)
    # user annotations (our step ranges) are not ops: they would double count their children
    ops = [op for op in ops if not op.name.startswith("prehab_svd.profile.")]
    return ProfileResult(
        stage=stage, description=desc, device=str(device) if not on_cuda else torch.cuda.get_device_name(device),
        dtype=str(dtype).replace("torch.", ""), steps=steps, trace=str(trace),
        peaks=measure_peaks(device, dtype if dtype != torch.float64 else torch.float32), ops=ops,
        kernels=kernels, total_us=sum(op.self_us for op in ops), wall_s=wall)


# --------------------------------------------------------------------------------------------------
# forward floor


def forward_floor(model, calibration, *, streams: int = 1, targets=None, exclude=None,
                  check: bool = True) -> float:
    """Seconds of the forward passes that block-by-block compression of ``model`` must make over
    ``calibration``, timed alone: the floor of a post-training method's time.

    What :func:`prehab_svd.compress` runs for its forwards, and nothing else: the model up to its
    first block on every batch (``capture``), then each block on every batch, from the first block to
    the last one with targets (``targets`` / ``exclude`` as in ``compress``; blocks after it are not
    run), ``streams`` times: 1 for the methods that use the original model's activations (svd, asvd,
    svd-llm, zs-svd's factor pass), 2 for aa-svd (the original and the compressed model on the same
    tokens; the second stream runs the same dense blocks on its own list of hidden states, the cost
    is the same). When the targets are not all inside the blocks, or the blocks do not feed each other,
    the stage is the whole model, run ``streams`` times per batch, as ``compress`` does.

    No hooks, no statistics; eval mode, no autograd, the KV cache off (``eval_context``). Moving the
    batches to the model's device and, with ``check``, the one forward that verifies that the blocks
    chain (``compress``'s ``check`` phase, which decides between blocks and whole model) happen before
    the clock starts. On CUDA the device is synchronized at both ends. The model is left unchanged;
    time it before compressing (``compress`` modifies the model in place).
    """
    from .calibration import Timings, as_batch, capture_block_inputs, check_chain, eval_context, run_stage
    from .models import plan_targets

    if isinstance(streams, bool) or streams not in (1, 2):
        raise PrehabError(f"streams must be 1 (the original model's activations: svd, asvd, svd-llm, zs-svd) "
                          f"or 2 (aa-svd: the original and the compressed model), got {streams!r}")
    plan = plan_targets(model, targets, exclude)
    device = next(model.parameters()).device
    batches = [as_batch(item, device) for item in calibration]
    if not batches:
        raise PrehabError("the calibration data is empty; pass at least one batch")
    timer = Timings(device)
    with eval_context(model):
        whole = plan.blocks_name is None
        if not whole and check:
            whole = not check_chain(model, [s[1] for s in plan.stages], batches[0])  # compress's own check
        last = max(i for i, (_, _, names) in enumerate(plan.stages) if names)
        t0 = timer.now()
        if whole:
            for batch in batches:
                for _ in range(streams):
                    model(**batch)
        else:
            inputs = capture_block_inputs(model, plan.stages[0][1], batches, device, False)
            hidden = [[inp.hidden for inp in inputs] for _ in range(streams)]
            for _, block, _ in plan.stages[:last + 1]:
                for h in hidden:
                    for j, inp in enumerate(inputs):
                        h[j] = run_stage(block, inp, h[j])
        return timer.now() - t0
