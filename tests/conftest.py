import os

# Before torch loads OpenMP: on a small shared machine, spinning OpenMP threads that wait for a
# busy core turn a 0.1 s SVD into seconds. Passive waiting costs nothing measurable in tests.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

VOCAB = 96


def tiny_model(kind: str, layers: int = 2, hidden: int = 32, intermediate: int = 64, seed: int = 0, *,
               vocab: int = VOCAB, max_positions: int = 128):
    """Tiny random models of the supported families, built offline (``vocab``: e.g. a real
    tokenizer's size, for a model saved with that tokenizer)."""
    import transformers as tf

    torch.manual_seed(seed)
    common = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                  num_hidden_layers=layers, max_position_embeddings=max_positions)
    if kind == "llama":  # grouped-query attention: k/v narrower than q
        cfg = tf.LlamaConfig(num_attention_heads=4, num_key_value_heads=2, **common)
        model = tf.LlamaForCausalLM(cfg)
    elif kind == "mistral":
        cfg = tf.MistralConfig(num_attention_heads=4, num_key_value_heads=1, sliding_window=None, **common)
        model = tf.MistralForCausalLM(cfg)
    elif kind == "qwen2":  # q/k/v carry biases
        cfg = tf.Qwen2Config(num_attention_heads=4, num_key_value_heads=2, **common)
        model = tf.Qwen2ForCausalLM(cfg)
    elif kind == "bert":
        cfg = tf.BertConfig(num_attention_heads=4, **common)
        model = tf.BertModel(cfg)
    else:
        raise ValueError(kind)
    model.config.architectures = [type(model).__name__]
    return model.eval()


def token_batches(n=3, batch=2, tokens=24, seed=0, pad_last=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        ids = torch.randint(3, VOCAB, (batch, tokens), generator=g)
        mask = torch.ones(batch, tokens, dtype=torch.long)
        if pad_last and i == n - 1:
            mask[-1, tokens - pad_last:] = 0
            ids[-1, tokens - pad_last:] = 0
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


@pytest.fixture
def make_model():
    return tiny_model


@pytest.fixture
def make_batches():
    return token_batches
