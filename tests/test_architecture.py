"""The shape of the house: import boundaries, lazy imports, and one allocator protocol.

Proof of the protocol: a toy allocator registered at runtime goes end to end through
``quantize`` and ``sweep`` without any change to the pipeline or the CLI.
"""

import ast
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

import windquant

PACKAGE = Path(windquant.__file__).parent
ENGINE = ("pack", "quant", "model", "eval", "calib")
HOOKS = ("register_forward_hook", "register_full_backward_hook", "register_forward_pre_hook", "register_backward_hook")


def modules_under(*folders: str) -> list[Path]:
    return sorted(p for f in folders for p in (PACKAGE / f).rglob("*.py"))


def imported_modules(path: Path) -> set[str]:
    """Every module a file imports (top level or inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}
    return found


def test_engine_never_imports_allocators():
    offenders = [
        str(p.relative_to(PACKAGE))
        for p in modules_under(*ENGINE)
        if any(m == "windquant.alloc" or m.startswith("windquant.alloc.") for m in imported_modules(p))
    ]
    assert offenders == []


def test_allocators_never_run_or_load_the_model():
    for path in modules_under("alloc"):
        text = path.read_text()
        assert not any(h in text for h in HOOKS), f"{path} registers hooks"
        assert "windquant.model.loading" not in imported_modules(path), f"{path} loads models"


def test_pipeline_never_names_an_allocator():
    from windquant.alloc import ALLOCATORS

    for name in ("pipeline.py", "sweep.py", "commands.py", "cli.py", "reports.py"):
        strings = {
            n.value for n in ast.walk(ast.parse((PACKAGE / name).read_text())) if isinstance(n, ast.Constant) and isinstance(n.value, str)
        }
        assert not strings & set(ALLOCATORS), f"{name} names an allocator"


def python(code: str) -> str:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout


def test_cli_import_is_light():
    out = python(
        "import sys, windquant.cli; p, _ = windquant.cli.build_parser(); "
        "print(sorted(m for m in ('torch', 'scipy', 'gymnasium', 'transformers') if m in sys.modules))"
    )
    assert out.strip() == "[]"


def test_loading_a_checkpoint_imports_no_allocator_stack(tiny_model, tokenizer, tiny_fit, tmp_path):
    from windquant import PlanConfig, quantize_, save

    plan, _ = quantize_(tiny_model, tokenizer, PlanConfig(target_bits=4.0, allocator="heuristic"), tiny_fit, progress=False)
    out = save(tiny_model, tokenizer, plan, tmp_path / "ckpt")
    code = (
        "import sys, windquant; from windquant.runtime.loading import load_model; "
        "print(sorted(k for k in ('scipy.optimize', 'gymnasium', 'windquant.alloc') if k in sys.modules)); "
        f"m, t = load_model({str(out)!r}); "
        "print(sorted(k for k in ('gymnasium', 'windquant.alloc') if k in sys.modules))"
    )
    # windquant's loading code imports none of the allocator stack; building the model then runs
    # transformers, which imports scipy.optimize itself (transformers.loss), but still no allocator.
    assert python(code).split() == ["[]", "[]"]


@dataclass
class AllFourConfig:
    """A toy allocator: one setting, no flag of its own (set with --all4-set)."""

    action: float = 4.0


@pytest.fixture
def all4(monkeypatch):
    """Register the toy allocator for one test; the registry is restored afterwards."""
    from windquant.alloc import Allocation, base, register_allocator

    monkeypatch.setattr(base, "ALLOCATORS", dict(base.ALLOCATORS))
    monkeypatch.setattr("windquant.alloc.ALLOCATORS", base.ALLOCATORS)
    calls = []

    @register_allocator("all4", AllFourConfig, needs=("features",), help="every unit at one action")
    def allocate(problem, config, ctx):
        calls.append((problem.features is not None, config.action, ctx.work_dir))
        return Allocation([config.action] * len(problem.units), {"summary": f"all units at {config.action:g} bit"})

    return calls


def test_a_runtime_allocator_runs_through_quantize_and_sweep(all4, tiny_model_dir, tmp_path, capsys):
    from test_cli import quantize_args

    from windquant.cli import main

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("The quick brown fox jumps over the lazy dog. " * 200)
    out = tmp_path / "ckpt"
    assert main(quantize_args(tiny_model_dir, out, corpus, tmp_path / "c", "--target-bits", "9", "--allocator", "all4")) == 0
    plan = json.loads((out / "plan.json").read_text())
    assert plan["allocator"] == "all4" and {u["requested"] for u in plan["units"]} == {4.0}
    assert plan["info"]["all4"]["summary"] == "all units at 4 bit"
    assert all4[-1][:2] == (True, 4.0)  # its declared need ("features") was provided
    assert main(["inspect", str(out)]) == 0
    assert "all4: all units at 4 bit" in capsys.readouterr().out

    args = quantize_args(tiny_model_dir, tmp_path / "unused", corpus, tmp_path / "c")[1:]
    args = [a for a in args if a not in ("--out", str(tmp_path / "unused"), "--target-bits", "3.2")]
    sweep = ["sweep", *args, "--budgets", "9,4", "--allocators", "all4,uniform", "--all4-set", "action=8"]
    assert main([*sweep, "--corpus", str(corpus), "--ctx", "64", "--out", str(tmp_path / "sweep")]) == 0
    rows = json.loads((tmp_path / "sweep" / "results.json").read_text())["rows"]
    toy = {r["budget"]: r for r in rows if r["allocator"] == "all4"}
    assert toy[9.0]["action_distribution"] == {"8": 1.0} and "ppl" in toy[9.0]
    assert "error" in toy[4.0]  # 8 bit everywhere does not fit 4 bits: a row error, not a crash


def test_unsupported_model_is_a_one_line_cli_error(tmp_path, tokenizer, capsys):
    from test_cli import expect_error
    from transformers import GPT2Config, GPT2LMHeadModel

    folder = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=256, n_positions=64)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    expect_error(["quantize", "--model", str(folder), "--out", str(tmp_path / "o"), "--quiet"], capsys, "no nn.Linear")
