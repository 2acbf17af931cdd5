"""Run in a subprocess by test_memory.py: memory while compressing a tiny Llama.

Two measures: ``live`` (deterministic) is the peak, over the moments a layer group's statistics are
finalized, of the bytes of every live tensor that is not a model parameter (each storage counted
once, found through the garbage collector); ``growth`` is the peak RSS growth, sampled every 1 ms
(informative only: allocator reuse makes it vary by several MiB from run to run).

Usage: python _memory_probe.py LAYERS METHOD -> prints one JSON line.
"""

import gc
import json
import os
import sys
import threading
import time

import torch


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def live_tensor_bytes() -> int:
    from torch import nn

    gc.collect()
    seen, total = set(), 0
    for obj in gc.get_objects():
        if isinstance(obj, torch.Tensor) and not isinstance(obj, nn.Parameter) and obj.device.type == "cpu":
            st = obj.untyped_storage()
            if st.data_ptr() not in seen:
                seen.add(st.data_ptr())
                total += st.nbytes()
    return total


def main():
    layers, method = int(sys.argv[1]), sys.argv[2]
    import transformers as tf

    import prehab_svd.calibration as calibration
    from prehab_svd import compress

    live = [0]
    finalize = calibration.GroupStats.finalize

    def measured_finalize(self, *args, **kwargs):
        out = finalize(self, *args, **kwargs)
        live[0] = max(live[0], live_tensor_bytes())
        return out

    calibration.GroupStats.finalize = measured_finalize

    torch.manual_seed(0)
    torch.set_num_threads(1)
    # Narrow hidden, wide MLP: the statistics (down_proj's 1536x1536 Gram matrix and its float64
    # factorization) dwarf a block's weights, so holding every block's statistics would show.
    cfg = tf.LlamaConfig(vocab_size=64, hidden_size=128, intermediate_size=1536, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    model = tf.LlamaForCausalLM(cfg).eval()
    g = torch.Generator().manual_seed(0)
    batches = [{"input_ids": torch.randint(0, 64, (2, 256), generator=g)} for _ in range(4)]
    with torch.no_grad():
        model(**batches[0])  # warm up allocator and kernels
    base = rss_bytes()
    peak = [base]
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], rss_bytes())
            time.sleep(0.001)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    compress(model, method, 0.5, batches)
    stop.set()
    t.join()
    peak[0] = max(peak[0], rss_bytes())
    print(json.dumps({"layers": layers, "method": method, "base": base, "growth": peak[0] - base,
                      "live": live[0]}))


if __name__ == "__main__":
    main()
