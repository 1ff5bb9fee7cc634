import pytest
import torch
from conftest import make_tokenizer

from windquant.calib.corpus import (
    builtin_text,
    corpus_tokens,
    disjoint_windows,
    sample_windows,
    token_ids,
    wikitext2,
    window_bos,
    window_starts,
)
from windquant.errors import WindquantError


def test_builtin_corpus_ships_with_python():
    assert len(builtin_text()) > 100_000


def test_calibration_and_evaluation_spans_are_disjoint(tokenizer, tmp_path):
    text = " ".join(f"w{i}" for i in range(3000))
    f = tmp_path / "c.txt"
    f.write_text(text)
    calib = corpus_tokens(tokenizer, str(f), "calib")
    ev = corpus_tokens(tokenizer, str(f), "eval")
    full = torch.tensor(tokenizer(text)["input_ids"])
    assert torch.equal(torch.cat([calib, ev]), full)
    assert len(ev) == len(full) - int(len(full) * 0.8)


def test_memoised_token_ids_equal_a_fresh_tokenization_and_follow_the_tokenizer(tokenizer):
    text = "the same text, tokenized twice " * 50
    first = token_ids(tokenizer, text)
    first[0] = -1  # a caller writing into its ids must not change what the next caller gets
    again = token_ids(tokenizer, text)
    assert torch.equal(again, torch.tensor(tokenizer(text)["input_ids"]))
    # Another tokenizer (one added token) must tokenize afresh, not reuse the first one's ids.
    other = make_tokenizer()
    other.add_tokens(["the same"])
    ids = token_ids(other, text)
    assert torch.equal(ids, torch.tensor(other(text)["input_ids"]))
    assert len(ids) < len(again)


def test_windows_are_seeded_and_deterministic():
    tokens = torch.arange(1000)
    a, b = sample_windows(tokens, 8, 32, seed=1), sample_windows(tokens, 8, 32, seed=1)
    assert torch.equal(a, b) and a.shape == (8, 32)
    assert not torch.equal(a, sample_windows(tokens, 8, 32, seed=2))
    assert ((a[:, 1:] - a[:, :-1]) == 1).all()  # contiguous spans of the corpus


def test_bos_opens_every_window_only_when_the_tokenizer_adds_one():
    tokens = torch.arange(1000)
    plain = sample_windows(tokens, 4, 16, seed=3)
    with_bos = sample_windows(tokens, 4, 16, seed=3, bos_id=-7)
    assert (with_bos[:, 0] == -7).all() and torch.equal(with_bos[:, 1:], plain[:, 1:])

    class Tok:  # what it does decides, whatever its add_bos_token says
        bos_token_id = 5
        add_bos_token = True
        adds = False

        def __call__(self, text):
            return {"input_ids": ([self.bos_token_id] if self.adds else []) + [ord(c) for c in text]}

    assert window_bos(Tok()) is None
    Tok.adds, Tok.add_bos_token = True, False  # Gemma's tokenizer read back from a saved folder
    assert window_bos(Tok()) == 5
    Tok.bos_token_id = None
    assert window_bos(Tok()) is None


def test_jsonl_and_bad_files(tokenizer, tmp_path):
    j = tmp_path / "d.jsonl"
    j.write_text('{"text": "hello"}\n{"text": "world"}\n')
    assert len(corpus_tokens(tokenizer, str(j), "calib")) > 0
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    with pytest.raises(WindquantError, match="empty"):
        corpus_tokens(tokenizer, str(empty), "calib")
    with pytest.raises(WindquantError, match="not found"):
        corpus_tokens(tokenizer, str(tmp_path / "missing.txt"), "calib")
    with pytest.raises(WindquantError, match="fewer than one window"):
        sample_windows(torch.arange(10), 2, 32, 0)


def test_wikitext_from_data_dir(tmp_path):
    d = tmp_path / "wikitext-2-raw"
    d.mkdir()
    (d / "wiki.test.raw").write_text(" = A = \n text one \n")
    assert wikitext2("test", str(tmp_path)) == " = A = \n\n text one "
    with pytest.raises(WindquantError, match="wiki.train.raw"):
        wikitext2("calib", str(tmp_path))


def test_disjoint_windows_overlap_no_avoided_span_nor_each_other():
    tokens = torch.arange(1000)  # token id = its position: a window shows where it was cut
    calib = [(s, s + 50) for s in window_starts(1000, 8, 50, seed=0)]
    assert torch.equal(sample_windows(tokens, 8, 50, seed=0)[:, 0], torch.tensor([a for a, _ in calib]))
    held = disjoint_windows(tokens, 6, 40, seed=1, avoid=calib, bos_id=7)
    assert torch.equal(held, disjoint_windows(tokens, 6, 40, seed=1, avoid=calib, bos_id=7))  # seeded
    assert (held[:, 0] == 7).all()
    cut = [int(w[1]) - 1 for w in held]  # the offset each window was cut at
    seen = set().union(*(range(a, b) for a, b in calib))  # calibration windows may overlap each other
    for s in cut:  # brute force: no held-out token position was seen before
        assert not seen & set(range(s, s + 40))
        seen |= set(range(s, s + 40))
    with pytest.raises(WindquantError, match="no room"):
        disjoint_windows(tokens, 30, 40, seed=1, avoid=calib)


def test_mix_corpus_loads_through_importlib_resources(tokenizer):
    from importlib.resources import files

    from windquant.calib.corpus import MIX_FILES, MIX_SEPARATOR, mix_text

    text = mix_text()
    docs = {name: files("windquant.calib").joinpath("data", name).read_text(encoding="utf-8").split(MIX_SEPARATOR) for name in MIX_FILES}
    assert 500_000 < len(text.encode()) < 1_500_000  # "at most ~1.5 MB"
    assert "\f" not in text
    # Every document of every file is there once, and each fifth of the corpus (so the
    # evaluation hold-out at its end too) holds documents of all three files.
    for name, ds in docs.items():
        assert all(text.count(d.strip("\n")[:200]) >= 1 for d in ds), name
    fifth = len(text) // 5
    for k in range(5):
        part = text[k * fifth : (k + 1) * fifth]
        assert sum(any(d.strip("\n")[:200] in part for d in ds) for ds in docs.values()) == 3, k
    calib, ev = corpus_tokens(tokenizer, "mix", "calib"), corpus_tokens(tokenizer, "mix", "eval")
    assert len(calib) > 4 * len(ev) * 0.99 and len(ev) > 50_000


def test_mix_corpus_loads_from_an_installed_wheel(tmp_path):
    """Package data, not the source tree: build the wheel, install it into a bare folder, and read
    the corpus from there in a process that cannot see the source tree."""
    import shutil
    import subprocess
    import sys
    import zipfile
    from pathlib import Path

    from windquant.calib.corpus import mix_text

    root, src = Path(__file__).resolve().parent.parent, tmp_path / "src"
    # Built from a copy: no build/ folder of an earlier build can slip stale files in.
    shutil.copytree(root / "windquant", src / "windquant", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(root / name, src / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path / "w"), str(src)], check=True, capture_output=True)
    (wheel,) = (tmp_path / "w").glob("windquant-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {"windquant/calib/data/wikitext.txt", "windquant/calib/data/books.txt", "windquant/calib/data/NOTICE"} <= set(names)
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(tmp_path / "site"), str(wheel)], check=True, capture_output=True)
    probe = "import windquant.calib.corpus as c; print(c.__file__); print(len(c.mix_text()))"
    out = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env={"PYTHONPATH": str(tmp_path / "site"), "PATH": ""}, check=True, capture_output=True, text=True).stdout.split()
    assert out[0].startswith(str(tmp_path / "site")) and int(out[1]) == len(mix_text())


def test_calib_values_are_checked_with_one_line_naming_the_choices():
    from windquant.calib.corpus import calib_parts, split_evenly
    from windquant.config import FitConfig

    assert calib_parts("mix+self") == ["mix", "self"] and calib_parts("self") == ["self"]
    for bad, what in (("mixx", "neither"), ("mix+", "neither"), ("self+self", "twice"), ("mix+nofile.txt", "neither")):
        with pytest.raises(WindquantError, match=what) as err:
            FitConfig(calib=bad).validate()
        assert "\n" not in str(err.value) and "mix | self" in str(err.value)
    with pytest.raises(WindquantError, match="--calib only"):
        corpus_tokens(None, "self", "eval")
    assert split_evenly(7, 2) == [4, 3] and split_evenly(64, 1) == [64] and split_evenly(1, 2) == [1, 0]
