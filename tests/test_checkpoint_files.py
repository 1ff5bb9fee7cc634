"""The whole checkpoint file: the embedding per row, bytes on disk equal to what is reported,
a digest per tensor, non-finite results refused, and a full disk failing early in one line."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
from collections import namedtuple

import pytest
import torch

from windquant import load, quantize_, save
from windquant.cli import main
from windquant.errors import WindquantError
from windquant.quant.rows import dequantize_rows, gather_rows, quantize_rows

DiskUsage = namedtuple("DiskUsage", "total used free")


def tensor_spans(path):
    """name -> (absolute byte offset, byte length) of every tensor in a safetensors file."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return {k: (8 + n + v["data_offsets"][0], v["data_offsets"][1] - v["data_offsets"][0]) for k, v in header.items()}


@pytest.fixture
def plan(tiny_model, tokenizer, tiny_plan, tiny_fit):
    return quantize_(tiny_model, tokenizer, tiny_plan, tiny_fit, progress=False)[0]


def test_auto_embedding_is_8_bit_from_3_target_bits_and_mixed_below(tiny_model, tokenizer, tiny_fit, tmp_path):
    from dataclasses import replace

    from conftest import make_model

    from windquant.config import PlanConfig
    from windquant.pipeline import make_plan, prepare, write_checkpoint
    from windquant.quant.row_formats import resolve_row_format

    assert [resolve_row_format("auto", t) for t in (2.0, 2.99, 3.0, 4.0, None)] == ["mixed", "mixed", 8, 8, 8]
    assert resolve_row_format(4, 3.0) == 4 and resolve_row_format("mixed", 4.0) == "mixed"  # explicit formats stay
    prepared = prepare(tiny_model, tokenizer, replace(tiny_fit, tune_steps=0), progress=False)
    for target, stored in ((2.5, "mixed"), (3.0, 8)):
        plan = make_plan(prepared, PlanConfig(target_bits=target), progress=False)
        out, _ = write_checkpoint(prepared, plan, tmp_path / f"ckpt{target}", model=make_model(), progress=False)
        assert json.loads((out / "quant_config.json").read_text())["rows"] == {"model.embed_tokens": stored}


def test_rows_round_trip_within_half_a_step():
    w = torch.randn(48, 64)
    err = (dequantize_rows(quantize_rows(w, 8), 8) - w).abs()
    assert (err <= w.abs().amax(1, keepdim=True) / 254 * 1.01).all()  # half a step; 1% for the fp16 scale


def test_4_bit_rows_beat_plain_absmax_scales():
    """The clipping search never does worse than absmax / 7 per group (ratio 1.0 is a candidate)."""
    w = torch.randn(48, 64, generator=torch.Generator().manual_seed(0))
    groups = w.view(48, 2, 32)
    scale = (groups.abs().amax(-1) / 7).half().float()[..., None]
    plain = (((groups / scale).round().clamp(-7, 7) * scale - groups) ** 2).sum(-1)
    searched = ((dequantize_rows(quantize_rows(w, 4), 4).view(48, 2, 32) - groups) ** 2).sum(-1)
    assert (searched <= plain * (1 + 1e-6)).all() and searched.sum() < plain.sum()



@pytest.mark.parametrize("bits", [8, 4, "mixed"])
def test_gathered_rows_equal_the_dequantized_matrix(bits):
    packed = quantize_rows(torch.randn(48, 64), bits, torch.arange(48) % 7)
    ids = torch.tensor([[5, 2, 47], [0, 6, 13]])
    assert torch.equal(gather_rows(packed, bits, ids), dequantize_rows(packed, bits)[ids])


def test_mixed_rows_keep_the_most_frequent_tokens_at_8_bits():
    """Rows ranked by count (ties by id): the top share is stored exactly as the 8-bit format
    stores it, every other row as the 4-bit format; the 4-bit rest is a multiple of 16 rows."""
    w = torch.randn(100, 64, generator=torch.Generator().manual_seed(0))
    counts = torch.zeros(100, dtype=torch.long)
    counts[[90, 3, 57, 12]] = torch.tensor([5, 9, 2, 9])  # ranks: 3, 12 (tie: id), 90, 57, then ids 0, 1, 2, ...
    packed = quantize_rows(w, "mixed", counts)
    k = 100 - 16 * ((100 - 20) // 16)  # 20 % of the rows, the rest rounded down to 16s
    assert len(packed["idx8"]) == k == 20
    assert packed["idx8"].tolist() == sorted([3, 12, 90, 57] + [i for i in range(100) if i not in (3, 12, 90, 57)][: k - 4])
    full = dequantize_rows(packed, "mixed")
    is8 = torch.zeros(100, dtype=torch.bool)
    is8[packed["idx8"].long()] = True
    assert torch.equal(full[is8], dequantize_rows(quantize_rows(w, 8), 8)[is8])
    assert torch.equal(full[~is8], dequantize_rows(quantize_rows(w, 4), 4)[~is8])


@pytest.mark.parametrize("bits", [16, 8, 4, "mixed"])
def test_bytes_on_disk_equal_the_reported_whole_file(tiny_model, tokenizer, plan, tmp_path, bits, capsys):
    out = save(tiny_model, tokenizer, plan, tmp_path / "ckpt", embedding_bits=bits)
    sizes = json.loads((out / "quant_config.json").read_text())["sizes"]
    spans = tensor_spans(out / "model.safetensors")
    assert sum(n for _o, n in spans.values()) == sizes["tensor_bytes"]
    rows = sum(n for k, (_o, n) in spans.items() if k.startswith("model.embed_tokens."))
    per_row = {16: 2 * 64, 8: 64 + 2, 4: 32 + 2 * 2}  # codes and fp16 scales (4 bits: one per 32 columns)
    # mixed: 64 rows at 8 bits with their int32 ids (20 % of 256, the 4-bit rest in 16s), 192 at 4
    expected = 64 * (per_row[8] + 4) + 192 * per_row[4] if bits == "mixed" else 256 * per_row[bits]
    assert rows == sizes["embedding_bytes"] == expected
    assert sizes["parameters"] == sum(p.numel() for p in tiny_model.parameters()) + sum(
        m.in_features * m.out_features for m in tiny_model.modules() if hasattr(m, "chunks")
    )
    assert json.loads((out / "plan.json").read_text())["info"]["file"] == sizes
    assert main(["inspect", str(out), "--png", str(tmp_path / "b.png")]) == 0
    assert f"whole file: {sizes['file_bits_per_param']:.3f} bits per parameter" in capsys.readouterr().out
    x = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # the model was rounded in place: it computes exactly what is stored
        assert torch.equal(tiny_model(x).logits, load(out, runtime=False)(x).logits)


def flip_bytes(path, name, count=64):
    """Overwrite ``count`` bytes in the middle of tensor ``name``'s data."""
    offset, length = tensor_spans(path)[name]
    with open(path, "r+b") as f:
        f.seek(offset + max(0, length // 2 - count // 2))
        f.write(b"\xff" * min(count, length))


def test_a_damaged_tensor_is_a_one_line_error_naming_the_file(tiny_model, tokenizer, plan, tmp_path, capsys):
    out = save(tiny_model, tokenizer, plan, tmp_path / "ckpt", embedding_bits=8)
    weights = out / "model.safetensors"
    codes = next(k for k in tensor_spans(weights) if k.endswith("c0_codes"))
    flip_bytes(weights, codes)
    with pytest.raises(WindquantError, match=f"{weights} is corrupt: tensor {codes} does not match its digest"):
        load(out)
    assert main(["eval", str(out), "--corpus", "builtin", "--ctx", "32", "--max-windows", "1", "--quiet"]) != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(weights) in err
    load(out, verify=False)  # the opt-out for trusted folders skips the check


def test_a_truncated_file_is_a_one_line_error(tiny_model, tokenizer, plan, tmp_path):
    out = save(tiny_model, tokenizer, plan, tmp_path / "ckpt")
    weights = out / "model.safetensors"
    os.truncate(weights, weights.stat().st_size // 2)
    with pytest.raises(WindquantError, match=f"cannot read {weights}"):
        load(out)


def test_non_finite_logits_are_an_error_not_a_nan_perplexity(tiny_model, tokenizer, plan, tmp_path):
    from windquant.eval.perplexity import perplexity

    out = save(tiny_model, tokenizer, plan, tmp_path / "ckpt", embedding_bits=16)
    weights = out / "model.safetensors"
    flip_bytes(weights, "model.embed_tokens.weight", count=4096)  # 0xFFFF is an fp16 nan
    model = load(out, verify=False)
    with pytest.raises(WindquantError, match="non-finite logits.*corrupt weights"):
        perplexity(model, torch.arange(64) % 256, ctx=32, progress=False)


def test_full_disk_fails_before_the_fit_in_one_line(tiny_model_dir, tmp_path, monkeypatch, capsys):
    from test_cli import quantize_args

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("The quick brown fox jumps over the lazy dog. " * 200)
    monkeypatch.setattr(shutil, "disk_usage", lambda _p: DiskUsage(10**9, 10**9 - 4096, 4096))
    args = quantize_args(tiny_model_dir, tmp_path / "out" / "ckpt", corpus, tmp_path / "cache")
    assert main(args) != 0
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after the model-loading progress bar
    assert "not enough disk space for the checkpoint" in err and "MiB free" in err
    assert not (tmp_path / "cache").exists() and not (tmp_path / "out").exists()  # no work done, nothing written


def test_a_write_failure_is_one_line_and_leaves_nothing(tiny_model, tokenizer, plan, tmp_path, monkeypatch):
    import windquant.pack.checkpoint as checkpoint

    def disk_full(*_a, **_k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint, "save_file", disk_full)
    with pytest.raises(WindquantError, match=rf"could not write the checkpoint {tmp_path / 'ckpt'} \(No space left on device\); it needs about"):
        save(tiny_model, tokenizer, plan, tmp_path / "ckpt")
    assert not (tmp_path / "ckpt").exists() and [p.name for p in tmp_path.iterdir()] == ["cache"]  # the fixture's cache only


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("mount") is None, reason="mounting a tmpfs needs root")
def test_a_real_full_tmpfs_is_one_line_and_leaves_nothing(tiny_model, tokenizer, plan, tmp_path):
    """A 64 KiB tmpfs: the free-space check passes the small files' slack only if disabled, so the
    write itself fails (the real ENOSPC path)."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        with pytest.raises(WindquantError, match="not enough disk space for the checkpoint"):
            save(tiny_model, tokenizer, plan, mnt / "ckpt")
        import windquant.pack.checkpoint as checkpoint

        mp = pytest.MonkeyPatch()
        mp.setattr(checkpoint, "check_free_space", lambda *_a: None)
        try:
            with pytest.raises(WindquantError, match="could not write the checkpoint .*No space left on device"):
                save(tiny_model, tokenizer, plan, mnt / "ckpt")
        finally:
            mp.undo()
        assert list(mnt.iterdir()) == []
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def test_4_bit_rows_with_head_feedback():
    """With uncorrelated head inputs (h = I) error feedback has nothing to push, so the rows equal
    the plain 4-bit rows exactly; with correlated inputs the head's output error shrinks."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 64, generator=g)
    plain = quantize_rows(w, 4)
    same = quantize_rows(w, 4, head_moment=torch.eye(64))
    assert all(torch.equal(plain[k], same[k]) for k in plain)
    x = torch.randn(500, 64, generator=g) @ torch.randn(64, 64, generator=g)
    h = x.T @ x / len(x)
    fed = dequantize_rows(quantize_rows(w, 4, head_moment=h), 4)
    assert ((x @ (fed - w).T) ** 2).mean() < 0.8 * ((x @ (dequantize_rows(plain, 4) - w).T) ** 2).mean()
