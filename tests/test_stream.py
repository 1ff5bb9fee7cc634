"""Block-streamed preparation: same candidates and tables as fitting from whole-model statistics,
half-precision models computed in float32 block by block, truncated shards refitted."""

import torch
from conftest import full_model_statistics, make_model
from safetensors.torch import load_file

from windquant.actions import ACTIONS, SKIP
from windquant.calib.statistics import calibrate, layer_fisher
from windquant.pipeline import calibration_windows, fit_settings, prepare
from windquant.quant.cache import output_trace, shard_is_complete
from windquant.quant.unit import dequantize_unit, quantize_unit


def test_streamed_candidates_equal_fits_on_whole_model_statistics(tiny_model, tokenizer, tiny_fit):
    prepared = prepare(tiny_model, tokenizer, tiny_fit, progress=False)
    stats = calibrate(tiny_model, prepared.stats.windows, moments=True, progress=False)
    _scales, reference_moments = full_model_statistics(tiny_model, prepared.stats.windows)
    settings = fit_settings(tiny_fit)
    for u in prepared.units:
        w = tiny_model.get_submodule(u.module).weight.detach()[:, u.col0 : u.col1].float()
        s = stats.act_scales[u.module][u.col0 : u.col1]
        h = stats.moments[u.module][u.col0 : u.col1, u.col0 : u.col1]
        h_ref = reference_moments[u.module][u.col0 : u.col1, u.col0 : u.col1].float()
        for j, a in enumerate(ACTIONS):
            expected = quantize_unit(w, s, a, settings) if a == SKIP else quantize_unit(w, s, a, settings, h, seed=u.index)
            got = prepared.cache.packed_of(u.index, a)
            assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in got), (u, a)
            w_hat = dequantize_unit(got, a, *u.shape).half().float()
            trace = output_trace(w, w_hat, h_ref)
            assert abs(prepared.cache.traces[u.index][j] - trace) <= 1e-4 * abs(trace) + 1e-9, (u, a)


def test_half_precision_model_streams_in_float32_and_is_left_as_it_was(tokenizer, tiny_fit):
    half = make_model().half()
    exact = make_model()
    exact.load_state_dict({k: v.float() for k, v in half.state_dict().items()})  # the same fp16 values, in fp32
    windows = calibration_windows(tokenizer, tiny_fit)
    before = {k: v.clone() for k, v in half.state_dict().items()}
    got = calibrate(half, windows, moments=True, progress=False)
    want = calibrate(exact, windows, moments=True, progress=False)
    fisher, fisher_exact = layer_fisher(half, windows[:2], progress=False), layer_fisher(exact, windows[:2], progress=False)
    assert all(abs(fisher[n] - f) <= 1e-2 * f for n, f in fisher_exact.items())
    after = half.state_dict()
    assert all(after[k].dtype == torch.float16 and torch.equal(after[k], v) for k, v in before.items())
    for name, s in want.act_scales.items():
        assert got.act_scales[name].dtype == torch.float32
        # only the rotary tables differ: the model computes them in its own dtype
        assert torch.allclose(got.act_scales[name], s, rtol=2e-3, atol=1e-5), name
        assert torch.allclose(got.moments[name], want.moments[name], rtol=5e-3, atol=1e-5), name


def test_truncated_shard_is_detected_and_refitted(tiny_model, tokenizer, tiny_fit):
    first = prepare(tiny_model, tokenizer, tiny_fit, progress=False)
    shard = first.cache.shard(1)
    whole = shard.read_bytes()
    tensors = {k: t.clone() for k, t in load_file(str(shard)).items()}  # not views of the file we truncate
    assert shard_is_complete(shard)
    shard.write_bytes(whole[: len(whole) - 100])
    assert not shard_is_complete(shard)
    again = prepare(tiny_model, tokenizer, tiny_fit, progress=False)
    assert shard_is_complete(shard)  # refitted (deterministically), never read truncated
    refitted = load_file(str(shard))
    assert refitted.keys() == tensors.keys() and all(torch.equal(refitted[k], t) for k, t in tensors.items())
    assert again.cache.errors == first.cache.errors and again.cache.traces == first.cache.traces
    shard.write_bytes(b"\x10\x00")  # not even a header
    assert not shard_is_complete(shard)


WORKER = """
import sys
sys.path.insert(0, {tests!r})
from conftest import make_model, make_tokenizer
from windquant.config import FitConfig
from windquant.pipeline import prepare
prepare(make_model(layers=3), make_tokenizer(), FitConfig(**{fit!r}), progress=False)
"""


def shard_contents(folder):
    """File name -> (tensors, metadata) of every shard: what a fit wrote, header order aside."""
    from safetensors import safe_open

    out = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), "pt") as f:
            out[path.name] = ({k: f.get_tensor(k) for k in f.keys()}, f.metadata())
    return out


def test_two_process_fit_equals_one_process(tokenizer, tiny_fit, tmp_path):
    """Two gloo processes (as torchrun starts them) split the blocks; the shards equal one process's."""
    import dataclasses
    import os
    import socket
    import subprocess
    import sys
    from pathlib import Path

    one = prepare(make_model(layers=3), tokenizer, tiny_fit, progress=False)
    fit = dataclasses.replace(tiny_fit, cache_dir=str(tmp_path / "two"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = WORKER.format(tests=str(Path(__file__).parent), fit=fit.to_dict())
    procs = []
    for rank in range(2):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        procs.append(subprocess.Popen([sys.executable, "-c", script], env=env, stderr=subprocess.PIPE, text=True))
    for p in procs:
        _out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-2000:]
    two = Path(fit.cache_dir) / "candidates" / one.folder.name
    want, got = shard_contents(one.folder), shard_contents(two)
    assert len(want) == 6 and got.keys() == want.keys()  # 3 candidate shards + 3 moment files
    for name, (tensors, meta) in want.items():
        assert got[name][1] == meta, name
        assert got[name][0].keys() == tensors.keys() and all(torch.equal(got[name][0][k], t) for k, t in tensors.items()), name


def test_last_block_outputs_give_the_models_logits_head_inputs_and_head_moment(tiny_model, tokenizer, tiny_fit):
    import torch.nn.functional as F

    from windquant.calib.statistics import head_input_moment
    from windquant.calib.stream import head_input, head_logits
    from windquant.pack.tune import reference_logprobs_after_blocks

    windows = calibration_windows(tokenizer, tiny_fit)
    last = calibrate(tiny_model, windows, progress=False).last_hidden
    assert last.shape == (*windows.shape, tiny_model.config.hidden_size)
    seen = []
    hook = tiny_model.get_output_embeddings().register_forward_pre_hook(lambda _m, inputs: seen.append(inputs[0]))
    with torch.no_grad():
        logits = tiny_model(windows).logits  # the reference: the whole model run
    hook.remove()
    with torch.no_grad():
        assert torch.allclose(head_logits(tiny_model, windows, last), logits, atol=1e-4)
        assert torch.allclose(head_input(tiny_model, windows, last), seen[0], atol=1e-5)
        assert torch.allclose(head_input(tiny_model, windows), seen[0], atol=1e-6)
    got = reference_logprobs_after_blocks(tiny_model, windows, last)
    assert torch.allclose(got, F.log_softmax(logits[:, :-1].float(), dim=-1), atol=1e-4)
    h = seen[0].reshape(-1, seen[0].shape[-1]).double()
    moment = (h.T @ h / len(h)).float()
    assert torch.allclose(head_input_moment(tiny_model, windows, last, batch_size=3), moment, rtol=1e-4, atol=1e-6)
    assert torch.allclose(head_input_moment(tiny_model, windows), moment, rtol=1e-5, atol=1e-7)
