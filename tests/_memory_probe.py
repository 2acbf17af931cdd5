"""Run in a subprocess by test_memory.py: peak RSS growth while compressing a tiny Llama.

Usage: python _memory_probe.py LAYERS METHOD -> prints one JSON line.
"""

import json
import os
import sys
import threading
import time

import torch


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def main():
    layers, method = int(sys.argv[1]), sys.argv[2]
    import transformers as tf

    from prehab_svd import compress

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
    print(json.dumps({"layers": layers, "method": method, "base": base, "growth": peak[0] - base}))


if __name__ == "__main__":
    main()
