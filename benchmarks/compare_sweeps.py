"""Two sweep folders (``windquant sweep`` / ``benchmarks/pareto.py`` outputs) row by row: the plan
digest of each (allocator, budget) and its PPL to 4 significant digits. A refactor that claims
"same behaviour" must print "all identical".

    python benchmarks/compare_sweeps.py benchmarks/results/pareto /tmp/pareto_after
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path


def plan_digest(path: Path) -> str:
    """sha256 of every unit's (requested, applied) action, or "-" when the row has no plan."""
    if not path.is_file():
        return "-"
    units = json.loads(path.read_text())["units"]
    return hashlib.sha256(json.dumps([[u["requested"], u["applied"]] for u in units]).encode()).hexdigest()[:12]


def rows(folder: Path) -> dict[tuple, dict]:
    return {(r["allocator"], r["budget"]): r for r in json.loads((folder / "results.json").read_text())["rows"]}


def fmt(ppl: float | None) -> str:
    return "-" if ppl is None else f"{ppl:.4g}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("old", type=Path)
    ap.add_argument("new", type=Path)
    args = ap.parse_args()
    new_rows = rows(args.new)
    print("| allocator | budget | plan digest (old) | plan digest (new) | PPL old | PPL new | same |")
    print("|---|---|---|---|---|---|---|")
    identical = True
    for (name, budget), old in rows(args.old).items():
        new = new_rows.get((name, budget), {})
        plan = f"plan_{name}_{budget:g}.json" if budget is not None else ""
        digests = (plan_digest(args.old / plan), plan_digest(args.new / plan)) if plan else ("-", "-")
        same = digests[0] == digests[1] and fmt(old.get("ppl")) == fmt(new.get("ppl"))
        identical &= same
        print(
            f"| {name} | {budget} | {digests[0]} | {digests[1]} | {fmt(old.get('ppl'))} | {fmt(new.get('ppl'))} | {'yes' if same else 'NO'} |"
        )
    print("all identical" if identical else "DIFFERENCES")


if __name__ == "__main__":
    main()
