"""Training around compression: Prehab before it, rehab after it.

* :mod:`.prehab`: :func:`prehab_svd.prehab`, fine-tuning a dense model toward low rank (its report,
  step log and λ schedule);
* :mod:`.rehab`: :func:`prehab_svd.rehab`, LoRA recovery fine-tuning of a compressed model's factors.

The functions are exported at the top level (``prehab_svd.prehab``, ``prehab_svd.rehab``); this
package deliberately does not re-export them, so that ``prehab_svd.training.prehab`` stays the module.
"""
