"""The rule that picks the shipped default, applied as `bench/RESULTS.md` wrote it before the runs,
to two harmony studies (`bench.harmony` on the synthetic set, `bench.harmony --real` on photos),
and the headline picture: every config as a point, paired change in mean R@1 against paired change
in mean per-class box top-1, 95% interval bars, one panel per set, the chosen default marked.

Kept apart from the study so the choice is a function of the two harmony.json files alone: anyone
can re-apply it to the checkpoints' recorded results, or to their own pair of studies.

    .venv/bin/python -m bench.choose --synthetic outputs/harmony/harmony.json \
        --real outputs/real/harmony.json --figure docs/harmony.png
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from typing import Any

from matplotlib.figure import Figure

from bench.harmony import BASELINE, paired
from jobs.common import add_verbose_argument
from jobs.regime import mean_r1

# The rule's step 1: every trained preset, gc_anchor and the WiSE-FT blends of lrc_only.
CANDIDATES = ("harmoclip", "paper", "lrc_only", "l2sp", "consistency", "gc_anchor",
              "lrc_only_wise0.25", "lrc_only_wise0.5", "lrc_only_wise0.75")
REFERENCE = ("region_only",)  # measured as the trade-off, never chosen
ELIGIBLE_R1_CHANGE = -1.0  # step 3, points
TEACHER_TIE = 1.0  # step 5, points


@dataclass(frozen=True)
class Paired:
    """One config on one set: paired changes against gc_only (points) with 95% half-widths."""
    seeds: int
    r1: tuple[float, float]
    macc1: tuple[float, float]
    top1: tuple[float, float]

    @property
    def eligible(self) -> bool:
        return self.seeds >= 3 and self.r1[0] >= ELIGIBLE_R1_CHANGE


def eligible_everywhere(per_set: dict[str, Paired | None]) -> bool:
    """Rule steps 3 and 6: measured with 3 seeds and eligible on every set."""
    return all(p is not None and p.eligible for p in per_set.values())


def is_teacher(method: dict[str, Any]) -> bool:
    """A frozen model the loss compares with in every step: GR's anchor mode with a weight."""
    return method.get("gr_mode") == "anchor" and method.get("lambda_gr", 0) > 0


def paired_changes(study: dict[str, Any], name: str, split: str = "val") -> Paired | None:
    """The config's paired changes over the seeds it shares with gc_only, or None if it has none."""
    base = {r["seed"]: r[split] for r in study["configs"][BASELINE]["runs"] if split in r}
    runs = [r for r in study["configs"].get(name, {}).get("runs", []) if r["seed"] in base and split in r]
    if not runs:
        return None
    def change(metric) -> tuple[float, float]:
        return paired([100 * metric(r[split]) for r in runs], [100 * metric(base[r["seed"]]) for r in runs])
    return Paired(len(runs), change(mean_r1), change(lambda r: r["box"]["macc1"]),
                  change(lambda r: r["box"]["top1"]))


def teachers(sets: dict[str, dict[str, Any]]) -> set[str]:
    """The configs whose recorded method has a teacher in any of the studies."""
    return {name for study in sets.values() for name, config in study["configs"].items()
            if is_teacher(config.get("method", {}))}


def choose(sets: dict[str, dict[str, Any]]) -> tuple[str | None, dict[str, dict[str, Paired | None]], str]:
    """(the chosen config or None, every candidate's paired changes per set, why) by the rule."""
    changes = {name: {label: paired_changes(study, name) for label, study in sets.items()}
               for name in CANDIDATES + REFERENCE}
    eligible = [name for name in CANDIDATES if eligible_everywhere(changes[name])]
    if not eligible:
        return None, changes, "no candidate is eligible on every set: the shipped default stays"
    gain = {name: sum(p.macc1[0] for p in changes[name].values()) / len(sets) for name in eligible}
    best = max(eligible, key=lambda name: gain[name])
    with_teacher = teachers(sets)
    why = f"largest mean gain in box mean/class over eligible configs: {best} ({gain[best]:+.1f})"
    if best in with_teacher:
        close = [name for name in eligible if name not in with_teacher and all(
            changes[best][label].macc1[0] - changes[name][label].macc1[0] <= TEACHER_TIE for label in sets)]
        if close:
            winner = max(close, key=lambda name: gain[name])
            why = (f"{best} has the largest gain ({gain[best]:+.1f}) but a teacher; {winner} ({gain[winner]:+.1f}) "
                   f"has none and is within {TEACHER_TIE:g} point of it on every set")
            best = winner
    return best, changes, why


def rule_table(changes: dict[str, dict[str, Paired | None]], chosen: str | None, with_teacher: set[str]) -> str:
    labels = list(next(iter(changes.values())))
    lines = ["| config | teacher-free | " + " | ".join(
        f"{label}: d mean R@1 | {label}: d box mean/class | {label}: d box top-1" for label in labels)
        + " | eligible on all |", "|---|---|" + "---|---|---|" * len(labels) + "---|"]
    for name, per_set in changes.items():
        cells = []
        for p in per_set.values():
            cells += ["not run"] * 3 if p is None else [f"{v:+.1f} ± {h:.1f}" for v, h in (p.r1, p.macc1, p.top1)]
        eligible = "reference" if name in REFERENCE else \
            ("yes" if eligible_everywhere(per_set) else "no")
        mark = " (chosen)" if name == chosen else ""
        lines.append(f"| {name}{mark} | {'no' if name in with_teacher else 'yes'} | "
                     + " | ".join(cells) + f" | {eligible} |")
    return "\n".join(lines)


def draw(changes: dict[str, dict[str, Paired | None]], chosen: str | None, path: str) -> None:
    """One panel per set: x = paired change in mean R@1, y = paired change in box mean/class."""
    labels = list(next(iter(changes.values())))
    figure = Figure(figsize=(6 * len(labels), 5), layout="constrained")
    for axes, label in zip(figure.subplots(1, len(labels), squeeze=False)[0], labels):
        axes.axvline(0, color="grey", lw=0.8)
        axes.axhline(0, color="grey", lw=0.8)
        axes.axvspan(ELIGIBLE_R1_CHANGE, ELIGIBLE_R1_CHANGE - 100, color="#f4cccc", alpha=0.5, lw=0)
        for name, per_set in changes.items():
            p = per_set[label]
            if p is None:
                continue
            style = dict(color="#d62728", ms=11, marker="*") if name == chosen else \
                dict(color="#7f7f7f" if name in REFERENCE else "#1f77b4", ms=6, marker="o")
            axes.errorbar(p.r1[0], p.macc1[0], xerr=p.r1[1], yerr=p.macc1[1], capsize=3, ls="none", **style)
            axes.annotate(name + (" (default)" if name == chosen else ""), (p.r1[0], p.macc1[0]),
                          textcoords="offset points", xytext=(5, 4), fontsize=8)
        points = [p for per_set in changes.values() if (p := per_set[label]) is not None]
        low = min([p.r1[0] - p.r1[1] for p in points] + [ELIGIBLE_R1_CHANGE]) - 0.5
        high = max(p.r1[0] + p.r1[1] for p in points) + 0.5
        axes.set_xlim(low, high)
        axes.set_title(f"{label}: paired vs gc_only, 3 seeds, 95% intervals (shaded: R@1 change < "
                       f"{ELIGIBLE_R1_CHANGE:g}, not eligible)", fontsize=9)
        axes.set_xlabel("change in mean R@1 (points)")
        axes.set_ylabel("change in box top-1, mean per class (points)")
    figure.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> str | None:
    parser = argparse.ArgumentParser(prog="python -m bench.choose", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--synthetic", required=True, help="harmony.json of `bench.harmony` (synthetic val)")
    parser.add_argument("--real", required=True, help="harmony.json of `bench.harmony --real` (photos' eval/)")
    parser.add_argument("--figure", default=None, help="write the headline picture here (PNG)")
    add_verbose_argument(parser)
    args = parser.parse_args(argv)
    sets = {}
    for label, path in (("synthetic val", args.synthetic), ("real eval", args.real)):
        with open(path) as handle:
            sets[label] = json.load(handle)
    chosen, changes, why = choose(sets)
    print(rule_table(changes, chosen, teachers(sets)) + "\n")
    print(f"chosen: {chosen or 'none (the shipped default stays)'}: {why}")
    if args.figure:
        draw(changes, chosen, args.figure)
        print(args.figure)
    return chosen


if __name__ == "__main__":
    main()
