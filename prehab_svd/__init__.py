"""prehab-svd: low-rank (SVD) compression of transformer models, with its own GPU kernels.

Public API::

    import prehab_svd
    report = prehab_svd.compress(model, "svd-llm", keep_ratio=0.6, calibration=batches)
    prehab_svd.save_compressed(model, "out/", report)
    model = prehab_svd.load_compressed("out/")
    # a model larger than memory: one block at a time from its safetensors, resumable
    report = prehab_svd.compress_pretrained("llama-7b/", "out/", "svd-llm", 0.6, batches)

``keep_ratio`` is always the fraction of the targeted parameters that is KEPT.
"""

from . import linalg, ops
from .compression import METHODS, CompressionReport, LayerReport, compress
from .errors import NonFiniteActivationError, PrehabError
from .io import load_compressed, save_compressed
from .streaming import compress_pretrained
from .layers import LowRankLinear

__version__ = "0.1.0"

__all__ = [
    "LowRankLinear",
    "compress",
    "compress_pretrained",
    "save_compressed",
    "load_compressed",
    "CompressionReport",
    "LayerReport",
    "METHODS",
    "PrehabError",
    "NonFiniteActivationError",
    "linalg",
    "ops",
    "__version__",
]
