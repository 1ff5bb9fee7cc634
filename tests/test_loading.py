"""Loading a GGUF: the dequantized reference is kept in the cache and read back unchanged."""

import torch

from windquant.gguf.files import write_random_llama
from windquant.model.loading import READY, reference_dir
from windquant.quant.cache import parameters_digest
from windquant.runtime.loading import load_model


def test_gguf_reference_is_cached_and_reads_back_the_same(tmp_path, monkeypatch):
    monkeypatch.setenv("WINDQUANT_CACHE", str(tmp_path / "cache"))
    src = write_random_llama(tmp_path / "tiny.gguf")
    first, tok1 = load_model(str(src))
    assert (reference_dir(src) / READY).is_file()

    import windquant.model.loading as loading

    def no_gguf(_path):
        raise AssertionError("the GGUF was parsed again")

    monkeypatch.setattr(loading, "read_gguf", no_gguf)
    second, tok2 = load_model(str(src))
    assert parameters_digest(first) == parameters_digest(second)  # the candidate cache stays valid
    ids = torch.tensor([[5, 17, 42, 99, 3]])
    with torch.no_grad():
        assert torch.equal(first(ids).logits, second(ids).logits)
    assert tok1("hello world")["input_ids"] == tok2("hello world")["input_ids"]


def test_an_incomplete_reference_copy_is_rebuilt(tmp_path, monkeypatch):
    monkeypatch.setenv("WINDQUANT_CACHE", str(tmp_path / "cache"))
    src = write_random_llama(tmp_path / "tiny.gguf")
    partial = reference_dir(src)
    partial.mkdir(parents=True)
    (partial / "config.json").write_text("{")  # a copy cut short: no READY file
    model, _tok = load_model(str(src))
    assert (partial / READY).is_file() and model.config.num_hidden_layers > 0
