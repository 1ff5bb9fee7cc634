"""Self-calibration: the model writes its own calibration text (``--calib self``).

Williams, Chrysostomou & Aletras, "Self-calibration for language model quantization and
pruning" (NAACL 2025): each sequence is sampled from the start-of-sequence token alone, with a
temperature schedule: hot for the first tokens, so sequences open on varied prefixes, then cooling
linearly to a steadier temperature so what follows stays coherent text of the model's own
distribution (their §3.2: ``t_i = t_init + (i/n)(t_final - t_init)`` for ``i <= n``, ``t_final``
after). The schedule's numbers below are ours (the paper's own values were not at hand), read
off SmolLM2-135M's samples: starting hotter than 1.2 or cooling over more than a few tokens
opens many sequences with junk the model then continues (1.5 over 64 tokens: mostly noise);
ending at 0.7 falls into loops more often. They are part of the cache key, so changing them
regenerates.

Sampling is batched with the KV cache and seeded by a ``torch.Generator`` (the same model, seed
and settings give the same tokens, whatever else used the global RNG). The tokens are kept as
safetensors under the cache root, keyed by the model's parameters digest and the settings, so a
model writes its text once; in a process, the model object also keeps its pool (a folded model
computes the same function with other parameters and must not regenerate).
"""

from __future__ import annotations

import hashlib
import inspect
import json
import weakref
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn
from tqdm.auto import tqdm

from windquant.errors import WindquantError

SELF_VERSION = 1
T_INITIAL, T_FINAL, T_STEPS = 1.2, 0.8, 16  # the temperature schedule (see the module docstring)
SPARE_SEQUENCES = 32  # written apart, only when held-out windows are asked for (proxy validation)
BATCH = 16  # sequences sampled together: their KV cache is ~190 MB for SmolLM2-135M at 256 tokens (64: 755 MB)

_pools: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> {key: [n, length] tokens}


def temperature(step: int) -> float:
    """The temperature of the ``step``-th sampled token (0 = the one after the start token)."""
    return T_INITIAL + min(step, T_STEPS) / T_STEPS * (T_FINAL - T_INITIAL)


def start_token(tokenizer) -> int:
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if start is None:
        raise WindquantError("--calib self needs a tokenizer with a BOS or EOS token to start from; use --calib mix")
    return int(start)


@torch.no_grad()
def generate(model: nn.Module, start: int, n: int, length: int, seed: int, progress: bool = False) -> torch.Tensor:
    """[n, length] token ids: ``n`` sequences that open with ``start`` and go on with
    ``length - 1`` tokens sampled from ``model`` under :func:`temperature` (no top-k/top-p:
    the model's whole distribution). The draws depend on :data:`BATCH` (rows share one
    generator), which is why the cache key holds it."""
    gen = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    # transformers 5 names the KV cache argument ``cache``; 4.x ``past_key_values``.
    cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    out = []
    bar = tqdm(total=n * (length - 1), desc="self-calibration text", unit="tok", disable=not progress)
    for b0 in range(0, n, BATCH):
        ids = torch.full((min(BATCH, n - b0), 1), start, dtype=torch.long, device=device)
        seq, past = [ids], None
        for step in range(length - 1):
            o = model(input_ids=ids, use_cache=True, **({cache_arg: past} if past is not None else {}))
            past = o[cache_arg]
            probs = torch.softmax(o.logits[:, -1].float() / temperature(step), dim=-1).cpu()
            ids = torch.multinomial(probs, 1, generator=gen).to(device)
            seq.append(ids)
            bar.update(len(ids))
        out.append(torch.cat(seq, 1).cpu())
    bar.close()
    return torch.cat(out)


def self_key(model_digest: str, start: int, n: int, length: int, seed: int) -> str:
    payload = {"v": SELF_VERSION, "model": model_digest, "start": start, "n": n, "length": length, "seed": seed}
    payload |= {"t_initial": T_INITIAL, "t_final": T_FINAL, "t_steps": T_STEPS, "batch": BATCH}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:20]


def self_tokens(
    model: nn.Module, tokenizer, n: int, length: int, seed: int, cache_root: Path, progress: bool = True
) -> torch.Tensor:
    """[n, length] self-written calibration sequences of ``model``: from this process's memory,
    else from the cache (``cache_root/selfcalib``), else generated once and stored there."""
    from windquant.quant.cache import atomic_save_tensors, parameters_digest, shard_is_complete

    start = start_token(tokenizer)
    held = _pools.setdefault(model, {})
    mem_key = (start, n, length, seed, T_INITIAL, T_FINAL, T_STEPS, BATCH)
    if mem_key not in held:
        key = self_key(parameters_digest(model), start, n, length, seed)
        path = Path(cache_root) / "selfcalib" / f"{key}.safetensors"
        if shard_is_complete(path):
            tokens = load_file(str(path))["tokens"]
        else:
            tokens = generate(model, start, n, length, seed, progress)
            atomic_save_tensors({"tokens": tokens}, path, {"settings": json.dumps(mem_key)})
        held[mem_key] = tokens
    return held[mem_key]


def pick(pool: torch.Tensor, n: int, length: int, seed: int) -> torch.Tensor:
    """[n, length]: ``n`` of the pool's sequences in a seeded order, cut to their first
    ``length`` tokens (each still opens with the start token)."""
    rows, have = pool.shape
    if length > have:
        raise WindquantError(
            f"self-calibration sequences have {have} tokens, fewer than a window of {length}; raise --calib-len to {length}"
        )
    if n > rows:
        raise WindquantError(
            f"self-calibration wrote {rows} sequences here, fewer than {n} windows; raise --calib-samples or use mix+self"
        )
    return pool[torch.randperm(rows, generator=torch.Generator().manual_seed(seed))[:n], :length]
