"""prehab-svd: low-rank (SVD) compression of transformer models, with its own GPU kernels.

Public API::

    import prehab_svd
    report = prehab_svd.compress(model, "svd-llm", keep_ratio=0.6, calibration=batches)
    prehab_svd.save_compressed(model, "out/", report)
    model = prehab_svd.load_compressed("out/")
    model, tokenizer = prehab_svd.load_pretrained("smollm2")  # or "minilm", a .gguf file, a folder
    # a model larger than memory: one block at a time from its safetensors, resumable
    report = prehab_svd.compress_pretrained("llama-7b/", "out/", "svd-llm", 0.6, batches)
    # Prehab before compressing (fine-tune toward low rank), rehab after (LoRA on the factors)
    prehab_svd.prehab(model, calibration_batches, training_batches)
    prehab_svd.rehab(compressed_model, training_batches)

``keep_ratio`` is always the fraction of the targeted parameters that is KEPT.

Where each concern lives: ``compression`` (``compress``, the report, the one block driver) walks the
blocks with ``calibration`` (batches, masks, layer groups, their statistics) and asks a method of
``methods/`` (one file each, one protocol, a registry) for the factors; ``streaming`` runs the same
driver one block at a time from disk; ``distributed`` spreads statistics and factorizations over
ranks; ``training/`` holds Prehab and rehab; ``linalg`` the closed forms; ``ops`` dispatches the three
ops to ``ops/reference.py``, ``kernels/`` (Triton) or ``csrc/`` (CUDA); ``layers`` ``LowRankLinear``;
``io`` / ``pretrained`` saving, loading and models by name; ``cli`` the command line.
"""

from . import linalg, ops  # noqa: E402
from .compression import METHODS, CompressionReport, LayerReport, compress  # noqa: E402
from .errors import NonFiniteActivationError, PrehabError  # noqa: E402
from .io import load_compressed, save_compressed  # noqa: E402
from .streaming import compress_pretrained  # noqa: E402
from .layers import LowRankLinear  # noqa: E402
from .pretrained import load_pretrained  # noqa: E402
from .training.prehab import PrehabReport, prehab  # noqa: E402
from .training.rehab import RehabReport, rehab  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "LowRankLinear",
    "compress",
    "compress_pretrained",
    "save_compressed",
    "load_compressed",
    "load_pretrained",
    "prehab",
    "rehab",
    "CompressionReport",
    "PrehabReport",
    "RehabReport",
    "LayerReport",
    "METHODS",
    "PrehabError",
    "NonFiniteActivationError",
    "linalg",
    "ops",
    "__version__",
]
