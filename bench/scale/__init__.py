"""Benchmarks at LLaMA-7B scale (GPU) and their scaled-down CPU configuration.

Scripts (each ``python -m bench.scale.<name> --help``; each writes one JSON file):

* :mod:`bench.scale.compress`  -- ``prehab_svd.compress`` end to end on a random LLaMA-shaped model:
  total time, breakdown, peak GPU memory, peak CPU RSS, writing the output; a measured fraction of
  the blocks extrapolated to the whole model.
* :mod:`bench.scale.factorize` -- Cholesky + SVD of the 7B shapes: fp64 (the library's choice) against
  alternatives, with each one's accuracy against fp64.
* :mod:`bench.scale.inference` -- prefill and decode throughput through ``generate`` of the dense and
  compressed models, eager and compiled.
* :mod:`bench.scale.layers`    -- throughput against tokens of dense, two-matmul and fused low-rank
  layers (and the plot).
* :mod:`bench.scale.run`       -- runs the parts of a configuration (``cpu`` or ``gpu``) in
  subprocesses within a time budget and writes ``<prefix>.json``, ``<prefix>.md`` and the plot.
* :mod:`bench.scale.report`    -- renders (and merges) result JSON files into Markdown.

``bash bench/scale/run_gpu.sh PART`` is the command for the lent H100 (outputs under ``$OUT``). The first
check of the kernels on a GPU (tests, compute-sanitizer, the ops' ratios to plain torch) is
``bash bench/gpu_first.sh`` (its op ratios: ``bench/ratios.py``).
"""
