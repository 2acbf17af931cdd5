"""Shared pieces of the scale benchmarks: model presets, random LLaMA-shaped models, timing, the
environment record, peak memory, and atomic JSON output.

The benchmarks run with torch's own OpenMP settings, as a user's process does. ``OMP_WAIT_POLICY=PASSIVE``
(set it yourself, before torch loads) protects a shared, oversubscribed CPU from spinning threads (a
small matrix product 25x slower under load on the 2-core dev machine), but on an idle one it costs
every parallel region a thread wake-up: SmolLM2-135M decoded at batch 1 in 60 ms/step instead of 34,
and its svd-llm compression took 88 s instead of 66 (measured 2026-12-02). The policy in force is
recorded with every result.
"""

from __future__ import annotations

import os

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import datetime  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import resource  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from dataclasses import asdict, dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

SCHEMA = 1


@dataclass(frozen=True)
class Preset:
    """A LLaMA-shaped model and the default sizes of the runs on it."""

    name: str
    hidden: int
    intermediate: int
    layers: int  # blocks of the full model
    heads: int
    kv_heads: int
    vocab: int
    # compression benchmark
    sequences: int
    seq_len: int
    batch_size: int
    blocks: int  # blocks built and compressed by default (the measured fraction is blocks/layers)
    # inference benchmark
    prefill_len: int
    prompt_len: int
    new_tokens: int


PRESETS = {
    # LLaMA-7B: 32 blocks of hidden 4096, MLP 11008, 32 heads; calibration 256 x 2048 tokens
    "7b": Preset("7b", 4096, 11008, 32, 32, 32, 32000, 256, 2048, 8, 2, 2048, 128, 64),
    "7b-gqa": Preset("7b-gqa", 4096, 11008, 32, 32, 8, 32000, 256, 2048, 8, 2, 2048, 128, 64),
    # the same benchmark scaled down for a 2-core CPU (a few minutes)
    "cpu-small": Preset("cpu-small", 512, 1376, 4, 8, 8, 2048, 32, 256, 8, 4, 256, 32, 32),
    "cpu-small-gqa": Preset("cpu-small-gqa", 512, 1376, 4, 8, 2, 2048, 32, 256, 8, 4, 256, 32, 32),
    # bigger than cpu-small so that CPU decode is bound by reading weights, not by Python overhead
    "cpu-medium": Preset("cpu-medium", 1024, 2752, 8, 16, 16, 4096, 32, 256, 8, 8, 256, 32, 32),
    # SmolLM2-135M (the causal default, `prehab-svd ... smollm2`): 30 blocks of hidden 576, MLP 1536,
    # 9 query / 3 key-value heads
    "smollm2": Preset("smollm2", 576, 1536, 30, 9, 3, 49152, 64, 256, 8, 30, 256, 32, 32),
    # seconds: the smoke tests
    "tiny": Preset("tiny", 64, 160, 2, 4, 2, 128, 4, 32, 2, 2, 32, 8, 12),
}


def preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise SystemExit(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}") from None


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def default_dtype(device: str) -> torch.dtype:
    """bf16 on the GPU (how 7B models run), fp32 on the CPU (bf16 matmuls are slow there)."""
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_dtype(name: str | None, device: str) -> torch.dtype:
    if name is None:
        return default_dtype(device)
    try:
        return DTYPES[name]
    except KeyError:
        raise SystemExit(f"unknown dtype {name!r}; choose one of {', '.join(DTYPES)}") from None


def llama_config(p: Preset, layers: int | None = None):
    import transformers

    cfg = transformers.LlamaConfig(
        vocab_size=p.vocab, hidden_size=p.hidden, intermediate_size=p.intermediate,
        num_hidden_layers=p.layers if layers is None else layers, num_attention_heads=p.heads,
        num_key_value_heads=p.kv_heads, max_position_embeddings=max(4096, p.seq_len, p.prefill_len + 8),
        tie_word_embeddings=False)
    cfg.architectures = ["LlamaForCausalLM"]
    return cfg


def build_llama(p: Preset, device: str, dtype: torch.dtype, layers: int | None = None, seed: int = 0):
    """A ``LlamaForCausalLM`` of preset ``p`` (``layers`` blocks) with random weights, created directly on
    ``device`` in ``dtype`` (no fp32 copy on the CPU first)."""
    import transformers

    torch.manual_seed(seed)
    with torch.device(device):
        model = transformers.LlamaForCausalLM._from_config(llama_config(p, layers), dtype=dtype)
    return model.eval()


def token_batches(vocab: int, sequences: int, seq_len: int, batch_size: int, device: str, seed: int = 0):
    """Random token ids as a list of LongTensors [batch, seq_len] (the last batch may be smaller)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for start in range(0, sequences, batch_size):
        b = min(batch_size, sequences - start)
        out.append(torch.randint(0, vocab, (b, seq_len), generator=g).to(device))
    return out


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_call(fn, device, *, reps: int = 5, warmup: int = 1, min_sample_s: float = 0.0) -> dict:
    """Median seconds per call of ``fn`` over ``reps`` samples (each sample repeats the call enough
    times to last ``min_sample_s``), after ``warmup`` calls; the device is synchronized around each
    sample so the time covers the work, not just its launch."""
    for _ in range(warmup):
        fn()
    sync(device)
    inner = 1
    if min_sample_s > 0:
        t0 = time.perf_counter()
        fn()
        sync(device)
        one = time.perf_counter() - t0
        inner = max(1, min(10_000, math.ceil(min_sample_s / max(one, 1e-7))))
    samples = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        sync(device)
        samples.append((time.perf_counter() - t0) / inner)
    return {"median_s": statistics.median(samples), "min_s": min(samples), "samples_s": samples,
            "inner": inner}


def peak_rss_gb() -> float:
    """This process's peak resident set size so far (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9


def _pkg_version(name: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def environment(device: str) -> dict:
    """Where and with what a result was measured."""
    dev = torch.device(device)
    env = {
        "date": datetime.date.today().isoformat(),
        "time_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"CPU: {cpu_model()}",
        "device_type": dev.type,
        "cpu": cpu_model(),
        "cpu_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "transformers": _pkg_version("transformers"),
        "triton": _pkg_version("triton"),
        "prehab_svd": _pkg_version("prehab-svd"),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "prehab_svd_backend": os.environ.get("PREHAB_SVD_BACKEND"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
    if dev.type == "cuda":
        props = torch.cuda.get_device_properties(dev)
        env["gpu_memory_gb"] = props.total_memory / 1e9
        env["sms"] = props.multi_processor_count
    return env


def write_json(path, obj) -> Path:
    """Write JSON to a temporary file next to ``path``, then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=1, default=_json_default)
        os.chmod(tmp, 0o644)  # mkstemp makes it private; results are for reading
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_text(path, text: str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _json_default(o):
    if isinstance(o, torch.dtype):
        return str(o).replace("torch.", "")
    if isinstance(o, Path):
        return str(o)
    if hasattr(o, "__dataclass_fields__"):
        return asdict(o)
    raise TypeError(f"not JSON serializable: {type(o).__name__}")


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


class Deadline:
    """Wall-clock budget of a script: ``left()`` seconds remain; ``allows(s)`` says whether a step
    expected to take ``s`` seconds still fits."""

    def __init__(self, seconds: float | None):
        self.end = None if seconds is None else time.monotonic() + float(seconds)

    def left(self) -> float:
        return float("inf") if self.end is None else self.end - time.monotonic()

    def allows(self, seconds: float) -> bool:
        return self.left() >= seconds


def free_device_memory() -> None:
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
