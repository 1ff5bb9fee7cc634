"""benchmarks/gguf_texts.py: which files of a peers run's GGUF folder form pairs, and the file key."""

import hashlib
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import gguf_texts  # noqa: E402


def test_pairs_are_the_presets_with_both_files(tmp_path):
    for name in ("Q2_K", "windquant-Q2_K", "IQ2_M", "windquant-Q4_0", "F16"):
        (tmp_path / f"{name}.gguf").write_bytes(name.encode())
    (tmp_path / "windquant-IQ2_M.txt").write_bytes(b"not a gguf")
    found = gguf_texts.pairs(tmp_path)
    # IQ2_M has no windquant file, Q4_0 no preset file: only Q2_K pairs.
    assert found == {"Q2_K": (tmp_path / "Q2_K.gguf", tmp_path / "windquant-Q2_K.gguf")}


def test_a_file_is_keyed_by_its_contents(tmp_path):
    path = tmp_path / "a.gguf"
    data = bytes(range(256)) * 100_000  # more than one read block
    path.write_bytes(data)
    assert gguf_texts.sha256(path) == hashlib.sha256(data).hexdigest()[:16]
