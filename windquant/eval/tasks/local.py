"""Load the zero-shot benchmarks from their ORIGINAL release files, shaped like lm-eval's Hub datasets.

lm-eval's task configs read Hub datasets; offline we read the files the benchmark authors
publish (``--data-dir``) with the ``json`` builder of ``datasets`` and rename fields so the
unchanged lm-eval prompt templates apply. lm-eval calls these as ``custom_dataset`` with the
task metadata, which carries ``data_dir`` (set by ``windquant.eval.zeroshot``).

Layout under ``data_dir`` (one folder per task; the file names are the original ones):

================ ======================================== =======================================
task             files                                    source
================ ======================================== =======================================
arc_easy         arc_easy/ARC-Easy-Test.jsonl             AI2 ARC-V1 release (test split)
arc_challenge    arc_challenge/ARC-Challenge-Test.jsonl   AI2 ARC-V1 release (test split)
boolq            boolq/dev.jsonl                          BoolQ release (validation)
piqa             piqa/valid.jsonl, piqa/valid-labels.lst  PIQA release (validation)
hellaswag        hellaswag/hellaswag_val.jsonl            HellaSwag release (validation)
winogrande       winogrande/dev.jsonl                     WinoGrande 1.1 release (dev = validation)
================ ======================================== =======================================
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

# task -> (split name lm-eval evaluates, files relative to data_dir); the first file is the jsonl.
FILES: dict[str, tuple[str, tuple[str, ...]]] = {
    "arc_easy": ("test", ("arc_easy/ARC-Easy-Test.jsonl",)),
    "arc_challenge": ("test", ("arc_challenge/ARC-Challenge-Test.jsonl",)),
    "boolq": ("validation", ("boolq/dev.jsonl",)),
    "piqa": ("validation", ("piqa/valid.jsonl", "piqa/valid-labels.lst")),
    "hellaswag": ("validation", ("hellaswag/hellaswag_val.jsonl",)),
    "winogrande": ("validation", ("winogrande/dev.jsonl",)),
}


def missing_files(task: str, data_dir: str | Path) -> list[Path]:
    return [Path(data_dir) / f for f in FILES[task][1] if not (Path(data_dir) / f).is_file()]


def _json(task: str, data_dir: str | Path, convert=None):
    """The task's jsonl through the ``json`` builder, optionally mapped, as {split: Dataset}."""
    import datasets

    split, files = FILES[task]
    missing = missing_files(task, data_dir)
    if missing:
        raise FileNotFoundError(f"zero-shot task {task}: missing {missing[0]}")
    ds = datasets.load_dataset("json", data_files={split: str(Path(data_dir) / files[0])}, split=split)
    if convert is not None:
        ds = ds.map(convert, remove_columns=ds.column_names)
    return datasets.DatasetDict({split: ds})


def _arc(task: str, data_dir: str, **_: Any):
    # AI2's release nests the question: {"question": {"stem", "choices": [{"text", "label"}]}, "answerKey"};
    # the Hub copy (allenai/ai2_arc) that lm-eval's arc yaml reads is flat.
    def convert(doc: dict) -> dict:
        choices = doc["question"]["choices"]
        return {
            "id": doc["id"],
            "question": doc["question"]["stem"],
            "choices": {"text": [c["text"] for c in choices], "label": [c["label"] for c in choices]},
            "answerKey": doc["answerKey"],
        }

    return _json(task, data_dir, convert)


def arc_easy(data_dir: str, **kw: Any):
    return _arc("arc_easy", data_dir)


def arc_challenge(data_dir: str, **kw: Any):
    return _arc("arc_challenge", data_dir)


def boolq(data_dir: str, **_: Any):
    # The BoolQ release has "answer": true/false; super_glue/boolq (lm-eval's source) has label 0 = no, 1 = yes.
    return _json("boolq", data_dir, lambda d: {"question": d["question"], "passage": d["passage"], "label": int(d["answer"])})


def piqa(data_dir: str, **_: Any):
    # PIQA ships the labels as one integer per line in a separate file, aligned with valid.jsonl.
    dd = _json("piqa", data_dir)
    labels_path = Path(data_dir) / FILES["piqa"][1][1]
    labels = [int(line) for line in labels_path.read_text().split()]
    ds = dd["validation"]
    if len(labels) != len(ds):
        raise ValueError(f"zero-shot task piqa: {labels_path} has {len(labels)} labels for {len(ds)} questions")
    dd["validation"] = ds.add_column("label", labels)
    return dd


def hellaswag(data_dir: str, **_: Any):
    # The release file has the same fields as Rowan/hellaswag; lm-eval's process_docs does the rest.
    return _json("hellaswag", data_dir)


def winogrande(data_dir: str, **_: Any):
    # WinoGrande 1.1 dev.jsonl has the Hub copy's fields (sentence, option1, option2, answer "1"/"2");
    # str() keeps "answer" a string even if a re-export wrote it as a number.
    return _json(
        "winogrande",
        data_dir,
        lambda d: {"sentence": d["sentence"], "option1": d["option1"], "option2": d["option2"], "answer": str(d["answer"])},
    )


# ---- copied from lm-eval's tasks/hellaswag/utils.py (0.4.x): the prompt must be identical ----
def _hellaswag_preprocess(text: str) -> str:
    text = text.strip()
    # NOTE: Brackets are artifacts of the WikiHow dataset portion of HellaSwag.
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    text = text.replace("  ", " ")
    return text


def hellaswag_process_docs(dataset):
    def _process_doc(doc: dict) -> dict:
        ctx = doc["ctx_a"] + " " + doc["ctx_b"].capitalize()
        return {
            "query": _hellaswag_preprocess(doc["activity_label"] + ": " + ctx),
            "choices": [_hellaswag_preprocess(ending) for ending in doc["endings"]],
            "gold": int(doc["label"]),
        }

    return dataset.map(_process_doc)


# ---- copied from lm-eval's tasks/winogrande/preprocess_winogrande.py (0.4.x) ----
def winogrande_doc_to_text(doc: dict) -> int:
    answer_to_num = {"1": 0, "2": 1}
    return answer_to_num[doc["answer"]]


def winogrande_doc_to_target(doc: dict) -> str:
    idx = doc["sentence"].index("_") + 1
    return doc["sentence"][idx:].strip()


def winogrande_doc_to_choice(doc: dict) -> list[str]:
    idx = doc["sentence"].index("_")
    options = [doc["option1"], doc["option2"]]
    return [doc["sentence"][:idx] + opt for opt in options]
