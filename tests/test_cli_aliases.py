"""CLI conventions, read from the parser alone (nothing is loaded or fitted): every old flag
spelling still parses to the setting its new name sets, choices and defaults are in the help,
the essential flags come first, and eval and sweep share one default corpus."""

import argparse
from dataclasses import fields

import pytest

from windquant.cli import build_parser, main
from windquant.cliflags import allocator_configs, flag_of

# (sub-command and the arguments it needs, old spelling, new spelling, where the value lands)
ALIASES = [
    (["quantize"], ["--chunk", "64"], ["--group-size", "64"], "fit.chunk"),
    (["sweep", "--out", "o"], ["--chunk", "64"], ["--group-size", "64"], "fit.chunk"),
    (["sweep", "--out", "o"], ["--budgets", "2,3"], ["--target-bits", "2,3"], "budgets"),
    (["gguf"], ["--target-bpw", "4.5"], ["--target-bits", "4.5"], "target_bits"),
    (["quantize"], ["--episodes", "7"], ["--ppo-episodes", "7"], "ppo.episodes"),
    (["quantize"], ["--proxy-samples", "3"], ["--ppo-proxy-samples", "3"], "ppo.proxy_samples"),
    (["quantize"], ["--proxy-len", "33"], ["--ppo-proxy-len", "33"], "ppo.proxy_len"),
    (["quantize"], ["--resume"], ["--ppo-resume"], "ppo.resume"),
    (["quantize"], ["--no-resume"], ["--no-ppo-resume"], "ppo.resume"),
    (["quantize"], ["--policy", "p.safetensors"], ["--ppo-policy", "p.safetensors"], "ppo.policy"),
    (["quantize"], ["--time-limit", "5"], ["--ilp-time-limit", "5"], "ilp.time_limit"),
]


def parse(argv: list[str]) -> argparse.Namespace:
    parser, _ = build_parser()
    return parser.parse_args(argv)


def subparser(name: str) -> argparse.ArgumentParser:
    parser, _ = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[name]


def help_text(name: str, monkeypatch) -> str:
    monkeypatch.setenv("COLUMNS", "1000")  # one line per flag
    return subparser(name).format_help()


def flag_line(text: str, flag: str) -> str:
    """A flag's entry in the help: its line, and the help on the next line when the flag is long."""
    lines = text.splitlines()
    i = next(i for i, line in enumerate(lines) if line.strip().startswith(flag))
    more = lines[i + 1] if i + 1 < len(lines) and lines[i + 1].startswith(" " * 8) else ""
    return " ".join((lines[i] + " " + more).split())


@pytest.mark.parametrize("command, old, new, dest", ALIASES, ids=[" ".join(a[1][:1]) for a in ALIASES])
def test_old_flag_spelling_parses_to_the_same_setting(command, old, new, dest):
    was, now = parse([*command, *old]), parse([*command, *new])
    assert getattr(was, dest) == getattr(now, dest) is not None
    assert vars(was) == vars(now)


@pytest.mark.parametrize("flag, value", [("--episodes", "7"), ("--policy", "p.safetensors"), ("--resume", None)])
def test_old_ppo_spellings_reach_the_same_ppo_config(flag, value):
    new = "--ppo-" + flag[2:]
    tail = [] if value is None else [value]
    was = allocator_configs(parse(["quantize", flag, *tail]), ["ppo"])["ppo"]
    assert was == allocator_configs(parse(["quantize", new, *tail]), ["ppo"])["ppo"]


@pytest.mark.parametrize("value", ["true", "stored"])
def test_accounting_true_is_the_old_name_of_stored(value):
    from windquant.commands import plan_config_from_args

    assert plan_config_from_args(parse(["quantize", "--accounting", value])).accounting == "stored"
    assert plan_config_from_args(parse(["quantize", "--accounting", "paper"])).accounting == "paper"


def test_old_accounting_values_in_json_still_load():
    from windquant.config import PlanConfig
    from windquant.plan import PLAN_VERSION, Plan
    from windquant.quant.accounting import unit_bits

    assert PlanConfig.from_dict({"target_bits": 2.5, "accounting": "true", "allocator": "ilp"}).accounting == "stored"
    old = {
        "version": PLAN_VERSION,
        "allocator": "ilp",
        "accounting": "true",
        "target_bits": 2.5,
        "chunk": 256,
        "salient_rate": 0.03,
        "fallback_threshold": 0.5,
        "units": [],
    }
    plan = Plan.from_dict(old)
    assert plan.accounting == "stored" and plan.to_dict()["accounting"] == "stored"
    assert unit_bits(2.0, 8, 64, 0.03, "true") == unit_bits(2.0, 8, 64, 0.03, "stored")


def test_an_unknown_accounting_is_a_one_line_error(tmp_path, capsys):
    assert main(["quantize", "--accounting", "bogus", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "stored, paper or true (old name of stored)" in err and "--accounting" in err


def test_every_allocator_flag_carries_its_allocator_prefix():
    from windquant.alloc import ALLOCATORS

    for spec in ALLOCATORS.values():
        for f in fields(spec.config):
            if f.metadata.get("help"):
                assert flag_of(f).startswith(f"--{spec.name}-"), f"{spec.name}.{f.name}: {flag_of(f)}"


def test_quantize_help_lists_the_choices(monkeypatch):
    from windquant.alloc import ALLOCATORS

    text = help_text("quantize", monkeypatch)
    assert "--allocator {" + ",".join(ALLOCATORS) + "}" in text
    for choices in ("--accounting {stored,paper}", "--scores {auto,fisher,block}", "--ppo-mode {construct,refine}",
                    "--sac-projection {costs,policy}", "--dense-candidates {ram,disk}", "--embedding-bits {16,8,4,mixed,auto}"):
        assert choices in text, choices


@pytest.mark.parametrize("switch", ["--rotate", "--feedback", "--carry"])
def test_on_by_default_switches_say_so(switch, monkeypatch):
    line = flag_line(help_text("quantize", monkeypatch), f"{switch}, --no-{switch[2:]}")
    assert line.endswith("(default: on)")


@pytest.mark.parametrize("command", ["quantize", "sweep", "gguf", "eval", "generate", "export-gguf", "inspect"])
def test_every_flag_shows_its_default_or_says_it_is_required(command):
    for action in subparser(command)._actions:
        switch = action.nargs == 0 and not isinstance(action, argparse.BooleanOptionalAction)  # -h, store_true: off
        if switch or not action.option_strings:
            continue
        assert "(default: " in action.help or "required" in action.help, action.option_strings


@pytest.mark.parametrize("command", ["eval", "generate"])
def test_positionals_are_documented(command):
    positionals = [a for a in subparser(command)._actions if not a.option_strings]
    assert positionals and all(a.help for a in positionals)


def test_generate_documents_every_argument(monkeypatch):
    text = help_text("generate", monkeypatch)
    assert "(required)" in flag_line(text, "--prompt PROMPT")
    assert "(default: 64)" in flag_line(text, "--max-new-tokens")
    assert "checkpoint folder" in flag_line(text, "model ")


def test_out_and_target_bits_say_what_omitting_them_does(monkeypatch):
    text = help_text("quantize", monkeypatch)
    assert "required (except with --dry-run)" in flag_line(text, "--out OUT")
    target = flag_line(text, "--target-bits BITS")
    assert "none: no budget" not in target and "(default: 2.5)" in target and "--uniform-action" in target
    assert "required (except with --dry-run)" in flag_line(help_text("gguf", monkeypatch), "--out OUT")


ESSENTIAL = {
    "quantize": ["--model", "--target-bits", "--out", "--allocator", "--calib", "--embedding-bits"],
    "sweep": ["--model", "--target-bits", "--allocators", "--out", "--calib", "--corpus"],
    "gguf": ["--model", "--target-bits", "--out", "--calib", "--dry-run"],
}


@pytest.mark.parametrize("command", list(ESSENTIAL))
def test_the_essential_flags_come_first(command, monkeypatch):
    text = help_text(command, monkeypatch)
    titles = [line for line in text.splitlines() if line and not line.startswith(" ") and line.endswith(":")]
    assert titles[0] == "essential:" and titles[-1] == "options:"  # -h last
    block = text.split("essential:\n", 1)[1].split("\n\n", 1)[0]
    assert [line.split()[0] for line in block.splitlines() if line.startswith("  -")] == ESSENTIAL[command]


def test_allocator_flags_follow_the_fitting_flags(monkeypatch):
    text = help_text("quantize", monkeypatch)
    assert text.index("essential:") < text.index("fitting") < text.index("budget:") < text.index("ppo allocator")


def test_eval_and_sweep_share_one_default_corpus():
    assert parse(["eval", "m"]).corpus is None and parse(["sweep", "--out", "o"]).corpus is None  # both: wikitext2
    from windquant.commands import DEFAULT_EVAL_CORPUS

    assert DEFAULT_EVAL_CORPUS == "wikitext2"


@pytest.mark.parametrize("argv", [["eval", "smollm2-135m"], ["sweep", "--out", "OUT"]], ids=["eval", "sweep"])
def test_a_missing_default_corpus_is_one_line_naming_the_ways_out(argv, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WINDQUANT_DATA", str(tmp_path / "empty"))
    argv = [str(tmp_path / "o") if a == "OUT" else a for a in argv]
    assert main(argv) == 2  # before any model is loaded or fitted
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "no wiki.test.raw under" in err and "--data-dir" in err and "--corpus mix" in err
    assert not (tmp_path / "o").exists()


def test_the_default_corpus_is_found_under_the_data_folder(tmp_path):
    from windquant.calib.corpus import check_eval_corpus

    (tmp_path / "wikitext-2-raw").mkdir()
    (tmp_path / "wikitext-2-raw" / "wiki.test.raw").write_text(" = A = \n text \n")
    check_eval_corpus("wikitext2", str(tmp_path))
