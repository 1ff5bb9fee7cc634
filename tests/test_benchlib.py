"""The command a benchmark records beside its figures, and how a table lists the commands."""

import shlex
import sys
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from benchlib import Evaluator, command_line, commands_lines  # noqa: E402


def test_command_line_retypes_the_invocation(monkeypatch):
    root = Path.cwd()
    argv = [str(root / "benchmarks" / "peers.py"), "--tasks", "", "--texts", "a b.txt", "--only-table"]
    monkeypatch.setattr(sys, "argv", argv)
    line = command_line(drop=("--only-table",))
    assert line == "python benchmarks/peers.py --tasks '' --texts 'a b.txt'"
    # What the shell reads back is the invocation, relative path and dropped flag aside.
    assert shlex.split(line) == ["python", "benchmarks/peers.py", "--tasks", "", "--texts", "a b.txt"]


def test_command_line_keeps_a_script_outside_the_project(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["/elsewhere/run.py", "-x"])
    assert command_line() == "python /elsewhere/run.py -x"


def test_commands_lines_one_and_many():
    assert commands_lines(["python a.py"], "Filled by") == ["Filled by: `python a.py`"]
    many = commands_lines(["python a.py", "python a.py --x"], "Filled by")
    assert many[0] == "<details>" and many[-1] == "</details>"
    assert "<summary>Filled by: 2 commands, in order</summary>" in many
    assert [ln for ln in many if ln[:1].isdigit()] == ["1. `python a.py`", "2. `python a.py --x`"]


def test_missing_parts_of_a_stored_row():
    def evaluator(**flags) -> Evaluator:
        ev = Evaluator.__new__(Evaluator)  # without a tokenizer: missing() reads only the settings
        ev.args = SimpleNamespace(ctx=2048, max_windows=148, llamacpp_windows=0, limit=None, **flags)
        ev.tasks = ["piqa", "arc_easy"]
        return ev

    wiki2 = {"ctx": 2048, "max_windows": 148, "ppl": 21.6}
    row = {"wiki2": wiki2, "zeroshot": {"piqa": {"acc": 0.6, "limit": None}, "arc_easy": {"acc": 0.5, "limit": 100}}}
    assert evaluator().missing(row) == ["arc_easy"]  # scored on another subset
    assert evaluator().missing(row, zeroshot=False) == []
    assert evaluator().missing({"wiki2": {**wiki2, "ctx": 512}}, zeroshot=False) == ["wiki2"]
    # --per-document: a task scored without per-document results is scored again
    row["zeroshot"]["arc_easy"] = {"acc": 0.5, "limit": None, "correct": "10"}
    assert evaluator(per_document=True).missing(row) == ["piqa"]
    assert evaluator().missing(row) == []
