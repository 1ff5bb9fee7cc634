import pytest

from windquant.model.units import UnsupportedModelError, enumerate_units


def test_units_cover_every_block_linear_with_ragged_chunks(tiny_model):
    units = enumerate_units(tiny_model, chunk=64)
    # per layer: q,k,v,o,gate,up have 64 inputs -> 1 chunk; down has 160 -> 64+64+32
    assert len(units) == 2 * (6 + 3)
    down = [u for u in units if u.layer == 0 and u.proj == "mlp.down_proj"]
    assert [(u.col0, u.col1) for u in down] == [(0, 64), (64, 128), (128, 160)]
    assert {u.kind for u in units if "attn" in u.proj} == {"attention"}
    assert {u.kind for u in units if "mlp" in u.proj} == {"mlp"}
    assert [u.index for u in units] == list(range(len(units)))
    total = sum(p.numel() for n, p in tiny_model.named_parameters() if "layers" in n and n.endswith("proj.weight"))
    assert sum(u.n_weights for u in units) == total


def test_embeddings_and_head_are_not_units(tiny_model):
    names = {u.module for u in enumerate_units(tiny_model)}
    assert not any("embed" in n or "lm_head" in n for n in names)


def test_chunk_zero_is_an_error(tiny_model):
    with pytest.raises(ValueError, match="positive"):
        enumerate_units(tiny_model, chunk=0)


def test_gpt2_conv1d_is_unsupported():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=32))
    with pytest.raises(UnsupportedModelError, match="no nn.Linear"):
        enumerate_units(model)
