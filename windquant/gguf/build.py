"""``windquant gguf``: a GGUF model re-quantized with one type per block linear, chosen for a
bits-per-weight target by the knapsack of :mod:`.recipe`.

Steps (each kept in the work folder, so a second run with the same source and calibration reuses
them): the source as an F16 reference GGUF; calibration statistics of the loaded model (input
second moments, output Fisher) -> llama.cpp's importance matrix (by default gradient-weighted:
:data:`IMPORTANCE`); every candidate type's real round
trip and its cost per tensor; the recipe; the final file, written by ``llama-quantize --imatrix
--tensor-type-file`` (or by gguf-py alone when llama.cpp is absent: then only the types gguf-py
quantizes are candidates) and checked against the recipe, type by type and byte by byte. When the
recipe leans on coarse types, a second recipe without them is written too and the one with the
lower perplexity on held-out calibration text is kept (:func:`check_recipes`).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import gguf
import numpy as np
from gguf import GGMLQuantizationType, GGUFReader
from tqdm.auto import tqdm

from windquant.config import FitConfig
from windquant.errors import WindquantError
from windquant.files import atomic_write_json, atomic_write_text, temp_path_for
from windquant.gguf import llamacpp
from windquant.gguf.files import (
    GGUF_LINEAR,
    dequantized,
    gguf_linear_name,
    open_gguf,
    quantized_bytes,
    write_gguf,
    write_imatrix,
    write_reference,
)
from windquant.gguf.recipe import Recipe, TensorOptions, candidate_recipes, trace_cost, without_source_grids
from windquant.gguf.types import LLAMACPP_TYPES, PYTHON_TYPES, fits, tensor_bytes
from windquant.model.loading import EMBEDDED

F16 = GGMLQuantizationType.F16
CHECK_WINDOWS = 32  # held-out calibration windows that score the candidate recipes
# What the importance matrix (llama.cpp's per-column weights of its quantizers' squared error) holds:
# "gradient": E_t[‖g_t‖² x_tj²] / E_t[‖g_t‖²], each token's input weighted by the squared norm of the
# loss's gradient at the linear's output (column sums of the loss's Fisher in the weights; it comes
# from the Fisher pass the costs already run); "moments": E[x_j²], what llama-imatrix computes.
# On SmolLM2 the same llama.cpp presets score lower with "gradient" (benchmarks/results/importance).
IMPORTANCE = ("gradient", "moments")
_LINEAR = re.compile(rf"blk\.\d+\.({'|'.join(GGUF_LINEAR.values())})\.weight")


@dataclass
class GGUFConfig:
    target_bpw: float  # block linears' bits per weight, scales included
    types: tuple[GGMLQuantizationType, ...] | None = None  # candidate types (None: all the writer can make)
    embedding_type: GGMLQuantizationType = GGMLQuantizationType.Q8_0  # token_embd.weight
    output_type: GGMLQuantizationType | None = None  # output.weight when untied (None: as the embedding)
    llamacpp: bool = True  # use llama.cpp when built (False: gguf-py only)
    # Types under this many bits per weight are coarse: a recipe using them is checked against the
    # recipe without them on held-out text (0: no check; 3.0 makes the 2-bit k- and i-quants coarse).
    coarse_bpw: float = 3.0
    # False: drop the types that reproduce a quantized source file's own grid (recipe.without_source_grids),
    # so that the recipe is the one a 16-bit source would get (a fair comparison with llama.cpp's presets).
    source_grids: bool = True
    importance: str = "gradient"  # the importance matrix: one of IMPORTANCE

    def __post_init__(self) -> None:
        if self.importance not in IMPORTANCE:
            raise WindquantError(f"--importance must be one of {', '.join(IMPORTANCE)}, got {self.importance!r}")


def source_gguf(spec: str) -> Path:
    """The GGUF file behind a model spec; GGUF writing starts from one (its metadata and tokenizer
    are copied as they are)."""
    if spec in EMBEDDED:
        return EMBEDDED[spec]()
    path = Path(spec).expanduser()
    if path.suffix == ".gguf" and path.is_file():
        return path
    raise WindquantError(
        f"windquant gguf needs a GGUF model, got {spec!r}; convert a Hugging Face folder with "
        "llama.cpp's convert_hf_to_gguf.py first, or give smollm2-135m / gemma3-270m / a .gguf file"
    )


def _digest(payload: dict) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


class Workspace:
    """The work folder: the F16 reference, the imatrix, and each candidate type's costs (which
    depend on the imatrix through llama.cpp's quantizers)."""

    def __init__(self, folder: Path, source: Path, fit: FitConfig, importance: str = GGUFConfig.importance):
        stat = source.stat()
        calib = {k: getattr(fit, k) for k in ("calib", "calib_samples", "calib_len", "seed")}
        stamp = {"source": str(source.resolve()), "size": stat.st_size, "mtime": stat.st_mtime, **calib}
        self.key = _digest(stamp | {"importance": importance})
        self.folder = folder / self.key
        self.folder.mkdir(parents=True, exist_ok=True)
        self.source = source
        self.reference = self.folder / "reference-f16.gguf"
        self.imatrix = self.folder / "imatrix.dat"

    def ensure_reference(self, progress: bool) -> GGUFReader:
        """The F16 reference (written on first use)."""
        if not self.reference.is_file():
            write_reference(open_gguf(self.source), self.reference, progress)
        return open_gguf(self.reference)

    def costs_path(self, qtype: GGMLQuantizationType, writer: str) -> Path:
        return self.folder / f"costs-{writer}-{qtype.name}.json"


def calibration_statistics(spec: str, fit: FitConfig, progress: bool) -> tuple[dict, dict, dict]:
    """(gguf name -> input second moment [cols, cols]; importance kind (:data:`IMPORTANCE`) -> gguf
    name -> imatrix values [cols]; gguf name -> output Fisher) of every block linear of the model
    ``spec`` on ``fit``'s calibration windows."""
    from windquant.calib.statistics import calibrate, layer_fisher
    from windquant.model.units import block_linears
    from windquant.pipeline import calibration_windows
    from windquant.runtime.loading import load_model

    model, tok = load_model(spec)
    names = {name: gguf_linear_name(layer, proj) for layer, name, proj, _ in block_linears(model)}
    windows = calibration_windows(tok, fit, model=model)
    stats = calibrate(model, windows, moments=True, progress=progress)
    columns: dict = {}  # name -> [in] gradient-weighted input importance
    fisher = layer_fisher(model, windows, progress=progress, columns=columns)
    assert stats.moments is not None
    moments = {names[n]: stats.moments[n] for n in names}
    per_column = {"gradient": columns, "moments": {n: stats.act_scales[n] ** 2 for n in names}}
    imatrices = {kind: {names[n]: v[n].double().numpy() for n in names} for kind, v in per_column.items()}
    return moments, imatrices, {names[n]: fisher[n] for n in names}


def _round_trip(ws: Workspace, qtype: GGMLQuantizationType, writer: str, weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Each linear's weights after storing the reference (``weights``: gguf name -> float32) as
    ``qtype`` (only where it stays ``qtype``: llama.cpp silently falls back on rows its blocks do
    not divide)."""
    if writer == "gguf-py":
        return {
            name: gguf.quants.dequantize(quantized_bytes(w, qtype), qtype)
            for name, w in weights.items()
            if fits(qtype, w.shape[1])
        }
    tmp = temp_path_for(ws.folder / f"round-trip-{qtype.name}.gguf")
    try:
        # Only the linears are read back; the embedding stays out of the way (and out of the
        # IQ types' need for an importance matrix it has no entry in).
        llamacpp.quantize(
            ws.reference, tmp, qtype.name, imatrix=ws.imatrix, pure=True, token_embedding_type="Q8_0", output_tensor_type="Q8_0"
        )
        back = {t.name: t for t in open_gguf(tmp).tensors}
        return {n: dequantized(back[n]) for n in weights if back[n].tensor_type == qtype}
    finally:
        tmp.unlink(missing_ok=True)


def candidate_options(
    ws: Workspace, types: tuple[GGMLQuantizationType, ...], writer: str, linears: list[str], moments, fisher, progress: bool
) -> list[TensorOptions]:
    """Every block linear with the cost of each candidate type it can take (cached per type;
    ``moments`` and ``fisher`` are needed only for the types not cached yet)."""
    ref = {t.name: t for t in open_gguf(ws.reference).tensors}
    options = {n: TensorOptions(n, int(ref[n].shape[1]), int(ref[n].shape[0])) for n in linears}
    weights = None
    for qtype in tqdm(types, desc=f"candidate types ({writer})", disable=not progress, unit="type"):
        path = ws.costs_path(qtype, writer)
        if path.is_file():
            costs = json.loads(path.read_text())
        else:
            if weights is None:
                weights = {n: dequantized(ref[n]) for n in linears}
            approx = _round_trip(ws, qtype, writer, weights)
            costs = {n: fisher[n] * trace_cost(weights[n], a, moments[n]) for n, a in approx.items()}
            atomic_write_json(path, costs)
        for n, c in costs.items():
            options[n].costs[qtype] = c
    missing = [n for n, o in options.items() if not o.costs]
    if missing:
        raise WindquantError(
            f"no candidate type fits {missing[0]} ({options[missing[0]].cols}-wide rows); allow a 32-block type such as Q8_0"
        )
    return list(options.values())


def pick_writer(use_llamacpp: bool, embedding_types: set[GGMLQuantizationType]) -> str:
    """llama.cpp when asked for and built, else gguf-py (which refuses embedding or output types
    it cannot make)."""
    writer = "llama.cpp" if use_llamacpp and llamacpp.find_tool("llama-quantize") else "gguf-py"
    for emb in embedding_types:
        if writer == "gguf-py" and emb not in (*PYTHON_TYPES, F16):
            raise WindquantError(
                f"--embedding-type {emb.name} needs llama.cpp ({llamacpp.BUILD_HINT}); gguf-py writes {', '.join(t.name for t in PYTHON_TYPES)}, F16"
            )
    return writer


def write_recipe(
    ws: Workspace,
    recipe: Recipe,
    writer: str,
    out: Path,
    embedding_type: GGMLQuantizationType,
    output_type: GGMLQuantizationType,
    progress: bool,
    weights: dict[str, np.ndarray] | None = None,
    imatrix: Path | None = None,
) -> None:
    """Write ``recipe`` to ``out`` from the F16 reference, with ``weights`` (gguf name -> float32
    [rows, cols]) in place of its block linears when given; the file is checked against the recipe
    before it appears (atomic)."""
    ref = open_gguf(ws.reference)
    tmp = temp_path_for(out)
    staged = temp_path_for(ws.folder / "staged-f16.gguf")
    try:
        if writer == "llama.cpp":
            types_file = ws.folder / "tensor-types.txt"
            atomic_write_text(types_file, recipe.tensor_type_lines())
            if weights is not None:
                write_gguf(ref, staged, {n: (w.astype(np.float16), F16) for n, w in weights.items()}, progress=progress)
            llamacpp.quantize(
                staged if weights is not None else ws.reference, tmp, "Q8_0", imatrix=imatrix, tensor_types=types_file,
                token_embedding_type=embedding_type.name, output_tensor_type=output_type.name,
            )  # fmt: skip
        else:
            chosen = recipe.types | {"token_embd.weight": embedding_type, "output.weight": output_type}
            replace = {}
            for t in tqdm(ref.tensors, desc="quantize (gguf-py)", disable=not progress, unit="tensor"):
                if t.name in chosen:
                    w = weights[t.name] if weights is not None and t.name in weights else dequantized(t)
                    qtype = chosen[t.name]
                    replace[t.name] = (quantized_bytes(w, qtype) if qtype != F16 else w.astype(np.float16), qtype)
            write_gguf(ref, tmp, replace, file_type=int(gguf.LlamaFileType.GUESSED), progress=progress)
        check_written(tmp, recipe)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
        staged.unlink(missing_ok=True)


def check_written(path: Path, recipe: Recipe) -> None:
    """The written file holds the recipe's type for every block linear and its bytes add up to
    the recipe's accounting (the size table is the one the knapsack used)."""
    tensors = {t.name: t for t in open_gguf(path).tensors}
    total = 0
    for name, qtype in recipe.types.items():
        t = tensors[name]
        if t.tensor_type != qtype or t.n_bytes != tensor_bytes(qtype, int(t.shape[1]), int(t.shape[0])):
            raise WindquantError(f"{path}: {name} was written as {t.tensor_type.name}, not the recipe's {qtype.name}")
        total += t.n_bytes
    if total != recipe.linear_bytes:
        raise WindquantError(f"{path}: block linears take {total} bytes, the recipe counted {recipe.linear_bytes}")


def file_bpw(path: Path) -> float:
    """Bits per weight of a whole GGUF file's tensors (every tensor, metadata excluded)."""
    tensors = open_gguf(path).tensors
    return 8 * sum(t.n_bytes for t in tensors) / sum(t.n_elements for t in tensors)


def build_gguf(spec: str, out: Path | None, cfg: GGUFConfig, fit: FitConfig, work_dir: Path, progress: bool = True) -> dict:
    """Choose (and unless ``out`` is None, write) the GGUF; returns the report written beside it."""
    source = source_gguf(spec)
    ws = Workspace(work_dir, source, fit, cfg.importance)
    output_type = cfg.output_type or cfg.embedding_type
    writer = pick_writer(cfg.llamacpp, {cfg.embedding_type, output_type})
    available = LLAMACPP_TYPES if writer == "llama.cpp" else PYTHON_TYPES
    types = tuple(t for t in (cfg.types or available) if t in available)
    if not types:
        raise WindquantError(f"none of the --types can be written by {writer}; it writes {', '.join(t.name for t in available)}")
    linears = [t.name for t in ws.ensure_reference(progress).tensors if _LINEAR.fullmatch(t.name)]
    moments = fisher = None
    if not ws.imatrix.is_file() or any(not ws.costs_path(t, writer).is_file() for t in types):
        moments, imatrices, fisher = calibration_statistics(spec, fit, progress)
        if set(moments) != set(linears):
            odd = sorted(set(moments) ^ set(linears))[0]
            raise WindquantError(f"unsupported architecture for GGUF writing: the model and {source} disagree on {odd}")
        label = f"windquant {cfg.importance} {fit.calib} {fit.calib_samples}x{fit.calib_len}"
        write_imatrix(ws.imatrix, imatrices[cfg.importance], label, fit.calib_samples)
    options = candidate_options(ws, types, writer, linears, moments, fisher, progress)
    dropped = None
    if not cfg.source_grids:
        options, dropped = without_source_grids(options)
    recipes = candidate_recipes(options, cfg.target_bpw, cfg.coarse_bpw)
    write = dict(ws=ws, writer=writer, embedding_type=cfg.embedding_type, output_type=output_type, imatrix=ws.imatrix)
    check = check_recipes(spec, recipes, fit, write, out, progress) if len(recipes) > 1 else None
    recipe = recipes[check["chosen"]] if check else next(iter(recipes.values()))
    report = {
        "source": str(source),
        "writer": writer,
        "work_dir": str(ws.folder),
        "reference": str(ws.reference),
        **recipe.to_json(),
        "recipe_check": check,
        "source_grid_options_dropped": dropped,
    }
    report["config"] = {
        k: (v.name if isinstance(v, GGMLQuantizationType) else [t.name for t in v] if isinstance(v, tuple) else v)
        for k, v in asdict(cfg).items()
    }
    if out is not None:
        if check is None:
            write_recipe(recipe=recipe, out=out, progress=progress, **write)
        report |= {"out": str(out), "file_bytes": out.stat().st_size, "file_bpw": file_bpw(out)}
        atomic_write_json(out.with_name(out.name + ".json"), report)
    return report


def check_recipes(spec: str, recipes: dict[str, Recipe], fit: FitConfig, write: dict, out: Path | None, progress: bool) -> dict:
    """Write every candidate recipe, score each file on :data:`CHECK_WINDOWS` held-out windows of
    the calibration corpus (text no statistic or cost was computed on) and keep the one with the
    lower perplexity as ``out`` (when given). Returns the record the report keeps."""
    from windquant.eval.perplexity import perplexity
    from windquant.model.loading import read_gguf
    from windquant.pipeline import heldout_windows
    from windquant.runtime.loading import load_model

    model, tok = load_model(spec)
    windows = heldout_windows(tok, fit, CHECK_WINDOWS, fit.calib_len, model)
    del model
    # Beside ``out`` (the kept one becomes it by a rename on the same file system), else in the work folder.
    folder, stem = (out.parent, f".{out.name}") if out is not None else (write["ws"].folder, "recipe")
    files = {name: folder / f"{stem}.check-{i}.gguf" for i, name in enumerate(recipes)}
    heldout = {}
    try:
        for name, recipe in tqdm(recipes.items(), desc="recipe check", disable=not progress, unit="recipe"):
            write_recipe(recipe=recipe, out=files[name], progress=False, **write)
            candidate, _ = read_gguf(files[name])
            heldout[name] = perplexity(candidate, windows.reshape(-1), ctx=fit.calib_len, progress=False).ppl
            del candidate
        chosen = min(heldout, key=heldout.get)
        if out is not None:
            os.replace(files[chosen], out)
    finally:
        for f in files.values():
            f.unlink(missing_ok=True)
    return {
        "chosen": chosen,
        "heldout_ppl": heldout,
        "predicted_cost": {name: r.cost for name, r in recipes.items()},
        "type_counts": {name: r.type_counts() for name, r in recipes.items()},
        "windows": f"{CHECK_WINDOWS} x {fit.calib_len} held-out {fit.calib} tokens",
    }
