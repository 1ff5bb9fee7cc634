"""Text corpora for calibration and evaluation, and deterministic window sampling.

* ``builtin``: every ``pydoc_data.topics`` entry (ships with CPython), joined by blank lines.
  The last :data:`HOLDOUT` of its tokens is the evaluation span; calibration never sees it.
* ``mix``: the bundled general-purpose corpus (package data ``windquant/calib/data``, built by
  ``benchmarks/build_mix_corpus.py``; sources and licences in its ``NOTICE``): Wikipedia
  articles, public-domain books and windquant's own README and code, their documents
  interleaved (:func:`mix_text`). Same hold-out split as ``builtin``.
* ``self``: text the model writes itself (``calib.selfgen``); calibration only, and built where
  the model is at hand (``pipeline.calibration_windows``).
* ``A+B`` (e.g. ``mix+self``): windows drawn from each part in equal shares.
* ``wikitext2``: WikiText-2 raw from a data folder (``--data-dir`` or ``$WINDQUANT_DATA``),
  else the ``datasets`` library when online. Evaluation uses ``wiki.test.raw`` joined as
  in the GPTQ/AWQ protocol; calibration draws from train, or valid when train is absent.
* any other value: a path to a plain-text file, or a ``.jsonl`` file with a ``text`` field
  (same hold-out split as ``builtin``).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import OrderedDict
from importlib.resources import files
from pathlib import Path

import torch

from windquant.errors import WindquantError

HOLDOUT = 0.2  # fraction of a single-text corpus reserved for evaluation
_WIKI_DIRS = ("", "wikitext-2-raw", "wikitext-2", "wikitext-2-raw-v1")
MIX_FILES = ("wikitext.txt", "books.txt", "windquant.txt")  # one file per licence (see data/NOTICE)
MIX_SEPARATOR = "\n\f\n"  # between two documents of a mix file
NAMED = ("builtin", "mix", "self", "wikitext2")
CALIB_CHOICES = "builtin | mix | self | wikitext2 | PATH to .txt/.jsonl, or parts joined by + (e.g. mix+self)"


def calib_parts(spec: str) -> list[str]:
    """The parts of a ``--calib`` value (``mix+self`` -> ["mix", "self"]), checked: each a named
    corpus or an existing file, none twice."""
    parts = [p.strip() for p in spec.split("+")] if spec not in NAMED and not Path(spec).expanduser().is_file() else [spec]
    for p in parts:
        if not p or (p not in NAMED and not Path(p).expanduser().is_file()):
            raise WindquantError(f"--calib {spec!r}: {p!r} is neither a corpus name nor a file; give {CALIB_CHOICES}")
    if len(set(parts)) < len(parts):
        raise WindquantError(f"--calib {spec!r} names a part twice; give each of {CALIB_CHOICES} at most once")
    return parts


def split_evenly(n: int, parts: int) -> list[int]:
    """``n`` as ``parts`` shares that differ by at most one, the larger first (7, 2 -> [4, 3])."""
    return [n // parts + (i < n % parts) for i in range(parts)]


def mix_text() -> str:
    """The bundled corpus, read through ``importlib.resources`` (so from an installed wheel
    too). Each file's documents are interleaved with the others' by how far through their own
    file they stand: every stretch of the result, and so the evaluation hold-out at its end,
    mixes encyclopedic prose, books and code in the files' proportions."""
    keyed = []
    for rank, name in enumerate(MIX_FILES):
        resource = files("windquant.calib").joinpath("data", name)
        if not resource.is_file():
            raise WindquantError(f"the bundled corpus file {name} is missing from the windquant package; reinstall windquant")
        docs = [d.strip("\n") for d in resource.read_text(encoding="utf-8").split(MIX_SEPARATOR)]
        total, done = sum(len(d) for d in docs), 0
        for d in docs:
            keyed.append(((done + len(d) / 2) / total, rank, d))
            done += len(d)
    return "\n\n".join(d for _, _, d in sorted(keyed))


def builtin_text() -> str:
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


def _read_text_file(path: Path) -> str:
    if not path.is_file():
        raise WindquantError(f"corpus file not found: {path}; give 'builtin', 'mix', 'wikitext2' or a text/.jsonl file")
    raw = path.read_text(encoding="utf-8", errors="replace")
    if path.suffix == ".jsonl":
        texts = []
        for n, line in enumerate(raw.splitlines(), 1):
            if line.strip():
                try:
                    texts.append(str(json.loads(line)["text"]))
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise WindquantError(f"{path}:{n}: expected a JSON object with a 'text' field") from None
        raw = "\n\n".join(texts)
    if not raw.strip():
        raise WindquantError(f"corpus file {path} is empty; give a file with text in it")
    return raw


def _wiki_file(data_dir: str | None, names: tuple[str, ...]) -> Path | None:
    root = data_dir or os.environ.get("WINDQUANT_DATA")
    if not root:
        return None
    for sub in _WIKI_DIRS:
        for name in names:
            p = Path(root).expanduser() / sub / name
            if p.is_file():
                return p
    return None


WIKI_HINT = (
    "give --data-dir FOLDER (holding wikitext-2-raw/wiki.test.raw) or set $WINDQUANT_DATA, or pick another corpus (--corpus mix)"
)


def _wiki_from_datasets(split: str, raw: bool) -> str:
    try:
        import datasets
    except ImportError:
        raise WindquantError(f"WikiText-2 not found (no data folder, no datasets library); {WIKI_HINT}") from None
    try:
        ds = datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split=split)
    except Exception as exc:  # offline, no cached copy: one line, not the library's traceback
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise WindquantError(
            f"WikiText-2 not found (no data folder; the Hugging Face Hub copy failed: {reason}); {WIKI_HINT}"
        ) from None
    return "".join(ds["text"]) if raw else "\n\n".join(ds["text"])


def wikitext2(split: str, data_dir: str | None = None, raw: bool = False) -> str:
    """``split`` is ``test`` (evaluation) or ``calib`` (train, else valid); ``raw``: the file's
    text exactly (llama.cpp's protocol) instead of its lines joined by blank lines."""
    names = ("wiki.test.raw",) if split == "test" else ("wiki.train.raw", "wiki.valid.raw", "wiki.valid.tokens")
    path = _wiki_file(data_dir, names)
    if path is None:
        if data_dir or os.environ.get("WINDQUANT_DATA"):
            where = data_dir or os.environ["WINDQUANT_DATA"]
            raise WindquantError(f"no {' or '.join(names)} under {where} (nor its wikitext-2-raw/); {WIKI_HINT}")
        return _wiki_from_datasets("test" if split == "test" else "train", raw)
    if raw:
        return path.read_text(encoding="utf-8")
    lines = path.read_text(encoding="utf-8").splitlines()
    # GPTQ/AWQ protocol: the dataset's lines joined by blank lines.
    return "\n\n".join(lines)


def corpus_text(corpus: str, role: str, data_dir: str | None = None, raw: bool = False) -> tuple[str, bool]:
    """Text for ``role`` in {"calib", "eval"}; the bool says whether it must be split."""
    if corpus == "wikitext2":
        return wikitext2("test" if role == "eval" else "calib", data_dir, raw), False
    if corpus == "self" or "+" in corpus and not Path(corpus).expanduser().is_file():
        raise WindquantError(
            f"corpus {corpus!r} is for --calib only (self is written by the model being quantized); give one corpus here: builtin, mix, wikitext2 or a file"
        )
    named = {"builtin": builtin_text, "mix": mix_text}
    text = named[corpus]() if corpus in named else _read_text_file(Path(corpus).expanduser())
    return text, True


def check_eval_corpus(corpus: str, data_dir: str | None = None) -> None:
    """Fail now, before a model is loaded or fitted, when evaluation text cannot be read (it is read
    again where it is scored: a file read, or the ``datasets`` library's cached copy)."""
    corpus_text(corpus, "eval", data_dir)


def corpus_tokens(tokenizer, corpus: str, role: str, data_dir: str | None = None, raw: bool = False) -> torch.Tensor:
    """1-D token ids of the calibration or evaluation span of a corpus (``raw``: see :func:`wikitext2`)."""
    text, split = corpus_text(corpus, role, data_dir, raw)
    ids = token_ids(tokenizer, text)
    if split:
        cut = int(len(ids) * (1 - HOLDOUT))
        ids = ids[cut:] if role == "eval" else ids[:cut]
    if ids.numel() == 0:
        raise WindquantError(f"corpus {corpus!r} gave no tokens; give a file with text in it")
    return ids


_TOKENIZED: OrderedDict[tuple[str, str], torch.Tensor] = OrderedDict()  # (tokenizer, text) digests -> ids
_TOKENIZED_KEEP = 4  # a run reads at most a few corpora; each entry is ~8 bytes per token


def token_ids(tokenizer, text: str) -> torch.Tensor:
    """1-D token ids of ``text``, memoised in this process for fast tokenizers: one run tokenizes
    its calibration corpus several times (calibration windows, held-out windows, score choice),
    and a megabyte of text takes about a second. Keyed by the tokenizer's full serialisation, so a
    tokenizer with other vocabulary, merges or special tokens never shares an entry."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    key = None
    if backend is not None:
        key = (hashlib.sha256(backend.to_str().encode()).hexdigest(), hashlib.sha256(text.encode()).hexdigest())
        if key in _TOKENIZED:
            _TOKENIZED.move_to_end(key)
            return _TOKENIZED[key].clone()  # callers may write into their copy
    ids = torch.tensor(tokenizer(text, return_tensors=None)["input_ids"], dtype=torch.long)
    if key is not None:
        _TOKENIZED[key] = ids.clone()
        while len(_TOKENIZED) > _TOKENIZED_KEEP:
            _TOKENIZED.popitem(last=False)
    return ids


def window_bos(tokenizer) -> int | None:
    """The BOS id every window should open with, or None when the tokenizer adds no BOS.

    A window cut from the middle of a token stream has no BOS; a model trained always to see one
    (Gemma) then scores far worse than it is (measured: Gemma-3-270M's proxy perplexity 80.9 without
    it, 17.1 with it, same windows), and sensitivities measured there mis-rank its units. llama.cpp
    puts the BOS in the same way; tokenizers that add none (SmolLM2) are untouched.

    Decided by what the tokenizer does, not by its ``add_bos_token`` attribute: Gemma's tokenizer
    saved by transformers and read back (the cached dequantized reference, a checkpoint folder)
    says ``add_bos_token=False`` and still adds the BOS.
    """
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return None
    ids = tokenizer("a")["input_ids"]
    return bos if len(ids) > 0 and ids[0] == bos else None


def sample_windows(tokens: torch.Tensor, n: int, length: int, seed: int, bos_id: int | None = None) -> torch.Tensor:
    """``n`` windows of ``length`` tokens at seeded random offsets: [n, length]; ``bos_id``
    replaces each window's first token (see :func:`window_bos`)."""
    if n <= 0 or length <= 1:
        raise WindquantError(f"need at least 1 calibration sample of 2+ tokens, got {n} × {length}")
    if tokens.numel() < length:
        raise WindquantError(
            f"calibration text has {tokens.numel()} tokens, fewer than one window of {length}; "
            "use a longer corpus or a smaller --calib-len"
        )
    return cut_windows(tokens, window_starts(tokens.numel(), n, length, seed), length, bos_id)


def window_starts(n_tokens: int, n: int, length: int, seed: int) -> list[int]:
    """The offsets :func:`sample_windows` cuts its windows at."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, n_tokens - length + 1, (n,), generator=gen).tolist()


def cut_windows(tokens: torch.Tensor, starts: list[int], length: int, bos_id: int | None = None) -> torch.Tensor:
    windows = torch.stack([tokens[s : s + length] for s in starts])
    if bos_id is not None:
        windows[:, 0] = bos_id
    return windows


def disjoint_windows(
    tokens: torch.Tensor, n: int, length: int, seed: int, avoid: list[tuple[int, int]], bos_id: int | None = None
) -> torch.Tensor:
    """``n`` windows of ``length`` tokens at seeded random offsets that overlap no [start, end)
    span of ``avoid`` and no other window: text the calibration never saw, for a held-out score."""
    gen = torch.Generator().manual_seed(seed)
    taken, starts = list(avoid), []
    for _ in range(100 * n):
        if len(starts) == n:
            break
        s = int(torch.randint(0, tokens.numel() - length + 1, (1,), generator=gen))
        if all(s + length <= a or s >= b for a, b in taken):
            starts.append(s)
            taken.append((s, s + length))
    if len(starts) < n:
        raise WindquantError(
            f"the calibration text has no room for {n} held-out windows of {length} tokens beside the calibration "
            "windows; use a longer --calib corpus or fewer proxy windows"
        )
    return cut_windows(tokens, starts, length, bos_id)
