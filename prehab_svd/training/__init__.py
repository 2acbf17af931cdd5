"""Training around compression: Prehab before it, rehab after it.

* :mod:`.prehab`: :func:`prehab_svd.prehab`, fine-tuning a dense model toward low rank (the driver,
  its options, report, step log and λ schedule);
* :mod:`.whitening`: the calibration covariances of the targeted layers' inputs and their whitening
  factors;
* :mod:`.targets`: :class:`~.targets.WhitenedTargets`, the targeted weights whitened (``W·L``),
  grouped by shape: the surrogates' values, the tail's proximal step, svd-llm's truncation, spectra;
* :mod:`.surrogates`: the rank surrogates (stable, nuclear, tail, compressed) as small objects;
* :mod:`.runners`: one step runner per parallel mode (local, DDP, FSDP);
* :mod:`.rehab`: :func:`prehab_svd.rehab`, LoRA recovery fine-tuning of a compressed model's factors.

The functions are exported at the top level (``prehab_svd.prehab``, ``prehab_svd.rehab``); this
package deliberately does not re-export them, so that ``prehab_svd.training.prehab`` stays the module.
"""
