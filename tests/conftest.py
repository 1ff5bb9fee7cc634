"""Tiny randomly initialised LLaMA models and a byte-level tokenizer: no downloads."""

from __future__ import annotations

import logging
import os

import pytest
import torch

# Tiny tensors: one thread avoids OpenMP spin when anything else runs on the 2 cores.
torch.set_num_threads(1)
# Under pytest-xdist (a process per core) every process keeps one thread, also where the code
# under test sets its own count (``runinfo.set_threads`` reads $WINDQUANT_THREADS, and so do the
# subprocesses a test starts): more threads than cores, and OpenMP's spin-waits slow every process
# many times over. Alone, the real-model tests take both cores.
XDIST = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) > 1
if XDIST:
    os.environ["WINDQUANT_THREADS"] = "1"
REAL_MODEL_THREADS = 1 if XDIST else 2
# A library's log handler keeps the stream that was sys.stderr when the library set it up; under
# pytest's capture that may be an earlier test's stream, closed since, and logging would then
# print "--- Logging error ---" and a traceback into whichever test logs next (seen once under xdist:
# two tracebacks, one per transformers config warning, in the one-line-error check). Log records are
# not what the tests check; a failed write of one is no error of the code under test.
logging.raiseExceptions = False


def pytest_collection_modifyitems(items):
    """The real-model tests first. ``windquant generate`` (run in-process by CLI tests) fixes glibc's
    mmap threshold for the rest of the process (``runinfo.return_large_frees_to_os``), after which
    their large float32 temporaries are mapped and faulted in afresh each time: the default-model
    test took 307 s after the other tests and 157 s alone (2 cores). A ``windquant quantize``
    process loads nothing through the runtime first either. Under pytest-xdist (``make test``:
    ``--dist loadscope --no-loadscope-reorder``) the first modules go to the processes in turn, so
    each process starts with one of them."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


def real_model_fit(tmp_path, calib_samples: int, calib_len: int, steps: int):
    """Small settings for the real-model tests: the paper's candidates, quick to fit and sound with
    ~1k calibration tokens, and the Fisher table alone (no block passes). The rotated, fed-back and
    carried path is covered on tiny models (test_rotation.py, test_pipeline.py), and so are the
    block scores, on LLaMA and Gemma-3 blocks, and auto's choice between the tables
    (test_sensitivity.py)."""
    from windquant.config import FitConfig

    return FitConfig(
        calib_samples=calib_samples,
        calib_len=calib_len,
        steps=steps,
        cache_dir=str(tmp_path / "cache"),
        rotate=False,
        feedback=False,
        carry=False,
        scores="fisher",
    )


def make_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=alphabet[0])


def make_gemma3(sliding_window: int = 96):
    """A random two-layer Gemma-3 (one sliding-window layer of ``sliding_window`` tokens, one global):
    (1 + gain) norms with post-norms, scaled embeddings, the sliding mask."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    cfg = Gemma3TextConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        sliding_window=sliding_window,
        layer_types=["sliding_attention", "full_attention"],
        max_position_embeddings=256,
    )
    return Gemma3ForCausalLM(cfg).eval()


def make_model(layers: int = 2, hidden: int = 64, intermediate: int = 160, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=256,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture
def tokenizer():
    return make_tokenizer()


@pytest.fixture
def tiny_model():
    return make_model()


@pytest.fixture
def tiny_fit(tmp_path):
    from windquant.config import FitConfig

    return FitConfig(chunk=32, calib_samples=4, calib_len=32, steps=3, cache_dir=str(tmp_path / "cache"))


@pytest.fixture
def tiny_plan():
    from windquant.config import PlanConfig

    return PlanConfig(target_bits=3.0)


def run_allocator(name, problem, work_dir=".", **config):
    """Requested actions of allocator ``name`` on ``problem`` (its config from ``config``)."""
    from windquant.alloc import AllocationContext, get_allocator
    from windquant.config import PlanConfig

    resolved = PlanConfig(allocator=name, allocator_config=config).validate().allocator_config
    return get_allocator(name).allocate(problem, resolved, AllocationContext(work_dir)).requested


@pytest.fixture
def tiny_model_dir(tmp_path):
    """A tiny LLaMA saved as a local Hugging Face folder (a model spec for the CLI)."""
    path = tmp_path / "tiny-llama"
    make_model().save_pretrained(path)
    make_tokenizer().save_pretrained(path)
    return path


def full_model_statistics(model, windows):
    """Reference statistics (slow, obvious): one forward of the whole model over all ``windows``
    with a hook per block linear; per linear the RMS of each input channel and ``E[x xᵀ]``."""
    from windquant.model.units import block_linears

    seen: dict = {}
    hooks = [
        mod.register_forward_hook(lambda _m, i, _o, n=name: seen.setdefault(n, []).append(i[0].detach().reshape(-1, i[0].shape[-1])))
        for _layer, name, _proj, mod in block_linears(model)
    ]
    with torch.no_grad():
        model(input_ids=windows, use_cache=False)
    for h in hooks:
        h.remove()
    xs = {n: torch.cat(v).double() for n, v in seen.items()}
    return {n: (x * x).mean(0).sqrt() for n, x in xs.items()}, {n: x.T @ x / len(x) for n, x in xs.items()}


def block_outputs_and_gradients(model, windows):
    """Reference (whole model, plain autograd): each block's output and the gradient of the
    calibration loss summed over tokens at it."""
    from windquant.model.units import decoder_blocks

    _prefix, blocks = decoder_blocks(model)
    outs = []

    def keep(_m, _i, out):
        h = out[0] if isinstance(out, tuple) else out
        h.retain_grad()
        outs.append(h)

    hooks = [b.register_forward_hook(keep) for b in blocks]
    loss = model(input_ids=windows, labels=windows).loss * windows[:, 1:].numel()
    loss.backward()
    for h in hooks:
        h.remove()
    model.zero_grad()
    return [h.detach() for h in outs], [h.grad for h in outs]


def block_error(model, layer: int, windows, reference_out, fisher, units, weight) -> float:
    """Σ_c F_c (y_c − y_ref,c)² per token at block ``layer``'s output, the whole model run with
    ``units`` computing with ``weight(u)`` (plain forward, hooked)."""
    from windquant.model.units import decoder_blocks
    from windquant.pack.apply import plan_weights

    _prefix, blocks = decoder_blocks(model)
    seen = []
    hook = blocks[layer].register_forward_hook(lambda _m, _i, o: seen.append(o[0] if isinstance(o, tuple) else o))
    with torch.no_grad(), plan_weights(model, units, weight):
        model(input_ids=windows)
    hook.remove()
    return float(((seen[0] - reference_out) ** 2 * fisher).sum() / windows.numel())
