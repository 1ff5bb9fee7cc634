"""The bit-width actions every part of windquant agrees on, and the one budget check.

Allocators and the engine both import this module (it imports nothing of either): the list
of actions, their labels, the fallback ladder and the budget tolerance live here only.
"""

from __future__ import annotations

from windquant.errors import WindquantError

SKIP = 16.0  # keep the unit in fp16
INT8 = 8.0  # INT8 and above never fall back: their error is negligible
ACTIONS: tuple[float, ...] = (16.0, 8.0, 4.0, 3.0, 2.0, 1.58, 1.0)  # high -> low precision
LOW_BIT_ACTIONS = tuple(a for a in ACTIONS if a != SKIP)  # the actions with a quantization operator
LADDER = tuple(sorted(ACTIONS))  # fallback order: a unit too damaged at an action moves up this ladder
# What a budget counts. stored: every bit the checkpoint stores for a block linear (codes, scales,
# indices, salient INT8 weights), reported as "true bits"; paper: the paper's Eq. 6 (codes and
# salient weights only). "true" is the name stored was given before it: accepted everywhere a
# value is read (flags, plan.json, configs), never written.
ACCOUNTINGS = ("stored", "paper")
ACCOUNTING_ALIASES = {"true": "stored"}
# The name each accounting's bits go by in reports, logs and file names (true_bits, paper_bits).
BITS_NAMES = {"stored": "true", "paper": "paper"}

# A plan fits when its total bits are within this tolerance of the budget (float sums of
# per-unit bit counts; never enough to buy a unit a higher action).
BUDGET_RTOL = 1e-12
BUDGET_ATOL = 1e-6


def canonical_action(action: float) -> float:
    for a in ACTIONS:
        if abs(a - float(action)) < 1e-6:
            return a
    raise ValueError(f"unknown action {action!r}; choose one of {', '.join(map(fmt_action, ACTIONS))}")


def canonical_accounting(accounting: str) -> str:
    """``accounting`` or the value its old name stands for ("true" -> "stored"); unknown names unchanged."""
    return ACCOUNTING_ALIASES.get(accounting, accounting)


def bits_name(accounting: str) -> str:
    """What an accounting's bits are called ("stored" -> "true", as in true_bits); stable on disk."""
    acc = canonical_accounting(accounting)
    return BITS_NAMES.get(acc, acc)


def fmt_action(action: float) -> str:
    return f"{action:g}"


def within_budget(total_bits: float, budget_bits: float) -> bool:
    """Whether ``total_bits`` meets ``budget_bits`` (both totals, not per weight)."""
    return total_bits <= budget_bits * (1 + BUDGET_RTOL) + BUDGET_ATOL


def below_floor_error(
    target_bits: float, floor_bits: float, accounting: str, what: str = "the cheapest possible plan"
) -> WindquantError:
    """The one message for a target no plan can meet (``floor_bits`` per weight)."""
    return WindquantError(
        f"target_bits {target_bits:g} is below {what} ({floor_bits:.3f} {bits_name(accounting)} bits per weight); "
        f"raise it to at least {floor_bits:.3f}",
        setting="target_bits",
    )
