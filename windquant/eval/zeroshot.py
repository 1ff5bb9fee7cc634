"""Zero-shot accuracy through lm-evaluation-harness, on the model object already in memory.

Scoring is lm-eval's own (``HFLM`` + ``simple_evaluate``), so the figures are comparable with
published lm-eval numbers; the log-likelihoods come from ``HFLM`` with each shared context run
once (:mod:`windquant.eval.shared_context`); we only choose where the documents come from: the Hugging Face Hub
(lm-eval's built-in tasks) or, with ``data_dir``, the benchmarks' original release files read by
the task configs in ``windquant/eval/tasks`` (same prompts and metrics). Wrapping the loaded
object, not a path, is what lets a freshly quantized model be scored before it is saved.
lm_eval is imported inside the functions: it takes seconds and ``windquant --help`` must not.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Iterator
from pathlib import Path

from torch import nn

from windquant.errors import WindquantError
from windquant.eval.tasks.local import FILES, missing_files

TASKS: tuple[str, ...] = ("arc_easy", "arc_challenge", "boolq", "piqa", "hellaswag", "winogrande")
TASKS_DIR = Path(__file__).with_name("tasks")


def parse_tasks(spec: str) -> list[str]:
    """``"arc_easy, piqa"`` -> ``["arc_easy", "piqa"]``, checked against :data:`TASKS`."""
    tasks = [t.strip() for t in spec.split(",") if t.strip()]
    if not tasks:
        raise WindquantError(f"--tasks is empty; choose from {','.join(TASKS)}")
    for t in tasks:
        if t not in TASKS:
            raise WindquantError(f"unknown zero-shot task {t!r}; choose from {','.join(TASKS)}")
    if len(set(tasks)) != len(tasks):
        raise WindquantError(f"--tasks names a task twice: {spec}")
    return tasks


def resolve_data_dir(data_dir: str | Path, tasks: list[str]) -> Path:
    """The folder holding ``piqa/``, ``arc_easy/``, ...; its parent (holding ``zeroshot/``) works too.

    Accepting the parent lets one ``--data-dir`` serve both WikiText-2 and the zero-shot tasks.
    """
    root = Path(data_dir).expanduser()
    if not root.is_dir():
        raise WindquantError(f"--data-dir {root} is not a folder")
    nested = root / "zeroshot"
    if nested.is_dir() and not any((root / t).is_dir() for t in tasks):
        root = nested
    for t in tasks:
        missing = missing_files(t, root)
        if missing:
            expected = " + ".join(FILES[t][1])
            raise WindquantError(f"zero-shot task {t}: missing {missing[0]} (expected {expected} under {root})")
    return root


@contextlib.contextmanager
def _quiet_lm_eval(progress: bool) -> Iterator[None]:
    """lm-eval logs every step at INFO/WARNING (e.g. that `pretrained` is not a str): keep errors only."""
    loggers = [logging.getLogger(n) for n in ("lm_eval", "lm-eval")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    datasets_bars = None
    if not progress:
        import datasets
        import lm_eval.api.task as lm_task
        from tqdm.auto import tqdm

        datasets_bars = datasets.utils.is_progress_bar_enabled()
        datasets.disable_progress_bars()
        # lm-eval's "building contexts" bar has no switch; swap the module's tqdm for a silent one.
        task_tqdm, lm_task.tqdm = lm_task.tqdm, functools.partial(tqdm, disable=True)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
        if not progress:
            lm_task.tqdm = task_tqdm
        if datasets_bars:
            datasets.enable_progress_bars()


def _load_tasks(tasks: list[str], data_dir: str | None):
    """lm-eval Task objects (their documents loaded), or one clear WindquantError."""
    from lm_eval.tasks import TaskManager

    if data_dir is None:
        manager = TaskManager()
        where = "from the Hugging Face Hub"
        hint = "; pass --data-dir DIR with the original files (see README: Zero-shot evaluation)"
    else:
        root = resolve_data_dir(data_dir, tasks)
        # Only our configs: the built-in ones of the same names would read the Hub.
        manager = TaskManager(include_path=str(TASKS_DIR), include_defaults=False, metadata={"data_dir": str(root)})
        where, hint = f"from {root}", ""
    loaded = {}
    for t in tasks:
        try:
            loaded.update(manager.load([t])["tasks"])
        except Exception as exc:  # lm-eval/datasets raise many types (ConnectionError, HfHubHTTPError, ...)
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise WindquantError(f"could not load zero-shot task {t} {where}: {first}{hint}") from exc
    return manager, [loaded[t] for t in tasks]


def evaluate_zeroshot(
    model: nn.Module,
    tokenizer,
    tasks: list[str],
    data_dir: str | None = None,
    limit: int | None = None,
    batch_size: int = 8,
    progress: bool = True,
    shared_context: bool = True,
    per_document: bool = False,
) -> dict[str, dict]:
    """task -> {"acc": float, "acc_norm": float | None, "n": int} (lm-eval's own metrics).

    ``limit`` scores the first N documents of each task (lm-eval's ``--limit``); ``acc_norm``
    is None for tasks whose lm-eval config has no length-normalised accuracy (boolq, winogrande).
    ``shared_context=False`` runs lm-eval's ``HFLM`` unchanged (every request a full sequence, in
    batches of ``batch_size``); the default runs each document's context once. ``per_document``
    adds ``"correct"``: one ``0``/``1`` character per document in lm-eval's order (``acc`` of
    each), what :func:`paired_difference` compares two models on.
    """
    for t in tasks:
        if t not in TASKS:
            raise WindquantError(f"unknown zero-shot task {t!r}; choose from {','.join(TASKS)}")
    if limit is not None and limit < 1:
        raise WindquantError(f"--limit must be a positive number of examples, got {limit}")
    if batch_size < 1:
        raise WindquantError(f"zero-shot batch size must be positive, got {batch_size}")
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    from windquant.eval.shared_context import SharedContextLM

    with _quiet_lm_eval(progress):
        manager, task_objs = _load_tasks(list(tasks), data_dir)
        lm = (SharedContextLM if shared_context else HFLM)(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        if not progress:
            # HFLM's request loop draws its own tqdm bar; this is its documented switch.
            lm.loglikelihood = _no_tqdm(lm.loglikelihood)
        out = simple_evaluate(
            model=lm,
            tasks=task_objs,
            task_manager=manager,
            limit=limit,
            num_fewshot=0,
            bootstrap_iters=0,
            log_samples=per_document,
        )
    results = {}
    for t in tasks:
        r = out["results"][t]
        n = out.get("n-samples", {}).get(t, {}).get("effective")
        results[t] = {"acc": float(r["acc,none"]), "acc_norm": _opt(r.get("acc_norm,none")), "n": int(n)}
        if per_document:
            docs = sorted(out["samples"][t], key=lambda d: d["doc_id"])
            results[t]["correct"] = "".join("1" if d["acc"] else "0" for d in docs)
    return results


def _no_tqdm(fn):
    def call(requests, disable_tqdm: bool = True):
        return fn(requests, disable_tqdm=True)

    return call


def _opt(x) -> float | None:
    return None if x is None or x == "N/A" else float(x)


def macro_average(results: dict[str, dict]) -> float:
    """Mean of ``acc`` over tasks, each task weighted equally (how the WINDQuant paper averages)."""
    if not results:
        raise WindquantError("no zero-shot results to average")
    return sum(r["acc"] for r in results.values()) / len(results)


def paired_difference(a: dict[str, dict], b: dict[str, dict]) -> tuple[float, float] | None:
    """``b``'s macro-average accuracy minus ``a``'s, and its standard error, from the per-document
    results of the same documents (``"correct"``, see :func:`evaluate_zeroshot`): the error of
    a paired comparison, much smaller than two independent accuracies' errors, because both
    models get most documents equally right or wrong. None unless every task of ``a`` has
    per-document results in both, over the same number of documents."""
    diffs, variances = [], []
    for task, ra in a.items():
        rb = b.get(task) or {}
        ca, cb = ra.get("correct"), rb.get("correct")
        if not ca or not cb or len(ca) != len(cb):
            return None
        d = [int(y) - int(x) for x, y in zip(ca, cb)]
        n = len(d)
        mean = sum(d) / n
        diffs.append(mean)
        variances.append(sum((v - mean) ** 2 for v in d) / (n - 1) / n if n > 1 else 0.0)
    if not diffs:
        return None
    k = len(diffs)
    return sum(diffs) / k, sum(variances) ** 0.5 / k


def result_line(task: str, r: dict) -> str:
    """``piqa: acc=0.6230 acc_norm=0.6300 n=1838`` (acc_norm left out where the task has none)."""
    norm = "" if r.get("acc_norm") is None else f" acc_norm={r['acc_norm']:.4f}"
    return f"{task}: acc={r['acc']:.4f}{norm} n={r['n']}"
