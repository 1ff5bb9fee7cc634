import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from windquant.errors import WindquantError
from windquant.eval.perplexity import perplexity


class UniformLM(nn.Module):
    """Every next token equally likely: perplexity is exactly the vocabulary size."""

    def __init__(self, vocab=50):
        super().__init__()
        self.vocab = vocab
        self.p = nn.Parameter(torch.zeros(1))
        self.config = SimpleNamespace(max_position_embeddings=64)
        self.seen = []

    def forward(self, input_ids, use_cache=False):
        self.seen.append(input_ids.clone())
        return SimpleNamespace(logits=torch.zeros(*input_ids.shape, self.vocab))


def test_uniform_model_has_ppl_equal_to_vocab_and_windows_do_not_overlap():
    lm = UniformLM(50)
    tokens = torch.arange(100) % 50
    res = perplexity(lm, tokens, ctx=16, batch_size=2, progress=False)
    assert res.ppl == pytest.approx(50.0)
    assert res.nll == pytest.approx(math.log(50))
    assert res.windows == 6 and res.tokens == 96
    seen = torch.cat([b.flatten() for b in lm.seen])
    assert torch.equal(seen, tokens[:96])  # consecutive, no overlap


def test_max_windows_and_context_limit():
    lm = UniformLM()
    assert perplexity(lm, torch.zeros(100, dtype=torch.long), ctx=16, max_windows=2, progress=False).windows == 2
    with pytest.raises(WindquantError, match="maximum context"):
        perplexity(lm, torch.zeros(1000, dtype=torch.long), ctx=128, progress=False)
    with pytest.raises(WindquantError, match="fewer than one window"):
        perplexity(lm, torch.zeros(10, dtype=torch.long), ctx=16, progress=False)


def test_real_model_ppl_matches_manual_loss(tiny_model):
    tokens = torch.randint(0, 256, (64,), generator=torch.Generator().manual_seed(0))
    res = perplexity(tiny_model, tokens, ctx=32, progress=False)
    with torch.no_grad():
        losses = [tiny_model(tokens[i : i + 32][None], labels=tokens[i : i + 32][None]).loss for i in (0, 32)]
    assert res.ppl == pytest.approx(math.exp(float(sum(losses) / 2)), rel=1e-5)


def test_llamacpp_protocol_scores_the_second_half_after_bos(tiny_model):
    """llama-perplexity: each chunk starts with BOS (when the tokenizer adds one) and only the
    predictions from position ctx/2 on count; checked against per-token losses by hand."""
    import torch.nn.functional as F

    tokens = torch.randint(0, 256, (70,), generator=torch.Generator().manual_seed(1))
    res = perplexity(tiny_model, tokens, ctx=32, progress=False, first=16, bos_id=7)
    nll = []
    with torch.no_grad():
        for i in (0, 32):
            chunk = tokens[i : i + 32].clone()
            chunk[0] = 7
            logits = tiny_model(chunk[None]).logits[0]
            nll += F.cross_entropy(logits[:-1], chunk[1:], reduction="none")[16:].tolist()
    assert len(nll) == 2 * 15 and res.first == 16 and "scored_from=16" in res.line()
    assert res.nll == pytest.approx(sum(nll) / len(nll), rel=1e-5)
    with pytest.raises(WindquantError, match="first scored position"):
        perplexity(tiny_model, tokens, ctx=32, progress=False, first=31)
