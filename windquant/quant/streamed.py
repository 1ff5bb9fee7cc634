"""Calibrate, fold and fit candidates one decoder block at a time (block-streamed preparation).

Per block: its linears' statistics from the captured inputs (``calib.stream``), Scale Folding
of its groups when asked, then every candidate cache fits the block's units and writes its
shard. Only that block's second moments and candidates exist at once; what stays afterwards is
each linear's activation scales (one vector per linear) and the caches' small tables. A block
whose shards are already complete is only run forward (its scales are still needed, and folding
is replayed with the α stored beside its shard).
"""

from __future__ import annotations

import os

import torch
from torch import nn
from tqdm.auto import tqdm

from windquant.actions import LOW_BIT_ACTIONS
from windquant.calib.statistics import CalibrationStats, layer_statistics
from windquant.calib.stream import BlockStream
from windquant.errors import WindquantError
from windquant.quant.cache import CandidateCache
from windquant.quant.fold_search import fold_layer
from windquant.runinfo import Timings, release_freed_memory

CALIB_BATCH = 8  # calibration windows per block forward


def process_group() -> tuple[int, int]:
    """(rank, world size) of this process: (0, 1) unless launched as several processes by
    ``torchrun`` (``WORLD_SIZE`` > 1), whose gloo process group is joined on first call."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo")
    return dist.get_rank(), world


def fit_streamed(
    model: nn.Module,
    windows: torch.Tensor,
    caches: list[CandidateCache],
    chunk: int,
    fold: bool = False,
    timings: Timings | None = None,
    progress: bool = True,
) -> tuple[CalibrationStats, dict[str, float]]:
    """Fill ``caches`` (each with its own fit settings) block by block. Returns the activation
    scales of every linear (after folding) and the fold α per producer (empty without ``fold``).

    Launched as several processes (``torchrun``), block ``l`` is fitted by process
    ``l mod world``; every process still runs every block forward (the scales are needed
    everywhere), and after a barrier reads the shards the others wrote."""
    timings = timings if timings is not None else Timings()
    rank, world = process_group()
    with timings.stage("calibrate"):
        stream = BlockStream(model, windows, CALIB_BATCH)
    units = caches[0].units
    scales: dict[str, torch.Tensor] = {}
    folded: dict[str, float] = {}
    others = []  # blocks another process fits
    bar = tqdm(total=len(units) * len(LOW_BIT_ACTIONS) * len(caches), desc="fit candidates", disable=not progress, unit="fit")
    for layer in range(len(stream)):
        warm = all([c.load_layer(layer) for c in caches])
        mine = layer % world == rank
        with timings.stage("calibrate"):
            stats = layer_statistics(stream, layer, moments=not warm and (mine or fold))
        alphas = {}
        if fold:
            with timings.stage("fold"):
                stored = caches[0].metadata[layer].get("fold") if warm else None
                alphas = fold_layer(model, layer, stats.act_scales, stats.moments, chunk, caches[0].settings, stored)
            folded |= alphas
        scales |= stats.act_scales
        n_fits = sum(1 for u in units if u.layer == layer) * len(LOW_BIT_ACTIONS)
        if warm or not mine:
            if warm:  # only the block's forward runs (its activation scales are still needed)
                bar.set_description("fit candidates (cached)", refresh=False)
            bar.update(n_fits * len(caches))
            others += [] if warm else [layer]
            continue
        bar.set_description("fit candidates", refresh=False)
        with timings.stage("fit"):
            for cache in caches:
                cache.fit_layer(model, layer, stats.act_scales, stats.moments, {"fold": alphas} if fold else None, bar)
        del stats
        release_freed_memory()  # this block's moments and candidates: back to the OS, not kept in glibc's arenas
    bar.close()
    if world > 1:
        import torch.distributed as dist

        dist.barrier()
        for layer in others:
            if not all([c.load_layer(layer) for c in caches]):
                raise WindquantError(f"block {layer} was to be fitted by process {layer % world}, but its shard is not there")
    return CalibrationStats(windows, scales, last_hidden=stream.last_hidden()), folded
