r"""The rule that picks the shipped default, applied as `bench/RESULTS.md` wrote it before the runs,
to two harmony studies (`bench.harmony` on the synthetic set, `bench.harmony --real` on photos),
and the headline picture: every config as a point, paired change in mean R@1 against paired change
in mean per-class box top-1, 95% interval bars, one panel per set, the chosen default marked.

Kept apart from the study so the choice is a function of the two studies' paired changes alone:
anyone can re-apply it to the checkpoints' recorded results, or to their own pair of studies.

    .venv/bin/python -m bench.choose --synthetic outputs/harmony/harmony.json \
        --real outputs/real/harmony.json --figure docs/harmony.png

--synthetic and --real each take a harmony.json, or a summary of what the rule reads (format
harmoclip.paired/1, written by --write-summary FILE): per set label ("synthetic val", "real eval")
and config the seeds, the paired changes r1 / macc1 / top1 as [mean, 95% half-width] in points
(null for a half-width of fewer than 2 seeds) and whether the config has a teacher. From a summary
the option takes the set with its own label, so one file written from both studies serves both
options, and a file for the other set is refused. A summary keeps a study's numbers when its
harmony.json is gone (bench/results/real-2026-12-02.paired.json, transcribed from RESULTS.md).
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass
from typing import Any

from matplotlib.figure import Figure

from bench.harmony import BASELINE, paired
from harmoclip.presets import DEFAULT_METHOD
from jobs.common import add_verbose_argument
from jobs.regime import mean_r1

# The rule's step 1: every trained preset, gc_anchor and the WiSE-FT blends of lrc_only.
CANDIDATES = ("harmoclip", "paper", "lrc_only", "l2sp", "consistency", "gc_anchor",
              "lrc_only_wise0.25", "lrc_only_wise0.5", "lrc_only_wise0.75")
REFERENCE = ("region_only",)  # measured as the trade-off, never chosen
ELIGIBLE_R1_CHANGE = -1.0  # step 3, points
TEACHER_TIE = 1.0  # step 5, points
SUMMARY_FORMAT = "harmoclip.paired/1"
SETS = {"synthetic": "synthetic val", "real": "real eval"}  # option -> the set label it reads


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


@dataclass(frozen=True)
class Measured:
    """One set as the rule reads it, whether from a harmony.json or a summary: the rule needs no more."""
    changes: dict[str, Paired]  # config -> paired changes vs gc_only; configs not measured are absent
    teachers: frozenset[str]  # the measured configs whose method has a teacher
    source: str  # where the numbers come from, carried into a summary written from them


def from_study(study: dict[str, Any], source: str) -> Measured:
    """The rule's configs that a harmony.json measured, with their paired changes on its val split."""
    changes = {name: p for name in CANDIDATES + REFERENCE if (p := paired_changes(study, name)) is not None}
    return Measured(changes, frozenset(name for name in changes
                                       if is_teacher(study["configs"][name].get("method", {}))), source)


def teachers(sets: dict[str, Measured]) -> set[str]:
    """The configs with a teacher in any of the sets."""
    return set().union(*(measured.teachers for measured in sets.values()))


def choose(sets: dict[str, Measured]) -> tuple[str | None, dict[str, dict[str, Paired | None]], str]:
    """(the chosen config or None, every candidate's paired changes per set, why) by the rule."""
    changes = {name: {label: measured.changes.get(name) for label, measured in sets.items()}
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


def summary(sets: dict[str, Measured]) -> str:
    """The summary file's text (format SUMMARY_FORMAT): what the rule reads of each set."""
    def entry(measured: Measured, name: str) -> dict[str, Any]:
        p = measured.changes[name]
        return {"seeds": p.seeds, **{key: [None if math.isnan(v) else float(v) for v in point] for key, point in
                                     (("r1", p.r1), ("macc1", p.macc1), ("top1", p.top1))},
                "teacher": name in measured.teachers}
    return json.dumps({"format": SUMMARY_FORMAT, "sets": {
        label: {"source": measured.source, "configs": {name: entry(measured, name) for name in measured.changes}}
        for label, measured in sets.items()}}, indent=2, allow_nan=False) + "\n"


def number(value: Any) -> float:
    """A summary's number; null stands for NaN (a half-width of fewer than 2 seeds)."""
    if value is None:
        return math.nan
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{value!r} is not a number")
    return float(value)


def from_summary(data: dict[str, Any], label: str) -> Measured:
    """The set `label` of a summary; KeyError, TypeError or ValueError if it is not as `summary` writes it."""
    sets = data["sets"]
    if label not in sets:
        raise ValueError(f"no set {label!r} in this summary; it holds {', '.join(map(repr, sets)) or 'none'}")
    changes, with_teacher = {}, set()
    for name, entry in sets[label]["configs"].items():
        points = [entry[key] for key in ("r1", "macc1", "top1")]
        if type(entry["seeds"]) is not int or type(entry["teacher"]) is not bool or \
                any(not isinstance(point, list) or len(point) != 2 for point in points):
            raise ValueError(f"{name}: needs seeds (int), r1, macc1, top1 ([mean, half_width]) and teacher (bool)")
        changes[name] = Paired(entry["seeds"], *(tuple(map(number, point)) for point in points))
        if entry["teacher"]:
            with_teacher.add(name)
    return Measured(changes, frozenset(with_teacher), str(sets[label]["source"]))


def read_set(path: str, label: str) -> Measured:
    """The set `label` from a harmony.json (all of it) or from a summary (its set of that label)."""
    try:
        with open(path) as handle:
            data = json.load(handle)
        if isinstance(data, dict) and "format" in data:
            if data["format"] != SUMMARY_FORMAT:
                raise ValueError(f"format {data['format']!r}, not {SUMMARY_FORMAT!r}")
            return from_summary(data, label)
        return from_study(data, path)
    except (OSError, KeyError, TypeError, ValueError) as error:
        reason = f"no key {error}" if isinstance(error, KeyError) else f"{type(error).__name__}: {error}"
        raise SystemExit(f"error: {path}: cannot read the set {label!r} from it as a harmony.json or a "
                         f"{SUMMARY_FORMAT} summary: {reason}") from None


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


def draw(changes: dict[str, dict[str, Paired | None]], marked: str | None, path: str, mark: str = "default") -> None:
    """One panel per set: x = paired change in mean R@1, y = paired change in box mean/class; the
    config `marked` (the default) as a red star, labelled with `mark`."""
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
            style = dict(color="#d62728", ms=11, marker="*") if name == marked else \
                dict(color="#7f7f7f" if name in REFERENCE else "#1f77b4", ms=6, marker="o")
            axes.errorbar(p.r1[0], p.macc1[0], xerr=p.r1[1], yerr=p.macc1[1], capsize=3, ls="none", **style)
            axes.annotate(name + (f" ({mark})" if name == marked else ""), (p.r1[0], p.macc1[0]),
                          textcoords="offset points", xytext=(5, 4), fontsize=8)
        points = [p for per_set in changes.values() if (p := per_set[label]) is not None]
        low = min([p.r1[0] - p.r1[1] for p in points] + [ELIGIBLE_R1_CHANGE]) - 0.5
        high = max(p.r1[0] + p.r1[1] for p in points) + 0.5
        axes.set_xlim(low, high)
        axes.set_title(f"{label}: paired vs gc_only, 3 seeds, 95% intervals\n(shaded: mean R@1 change < "
                       f"{ELIGIBLE_R1_CHANGE:g}, not eligible)", fontsize=9)
        axes.set_xlabel("change in mean R@1 (points)")
        axes.set_ylabel("change in box top-1, mean per class (points)")
    figure.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> str | None:
    parser = argparse.ArgumentParser(prog="python -m bench.choose", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--synthetic", required=True,
                        help="harmony.json of `bench.harmony`, or a summary holding the set 'synthetic val'")
    parser.add_argument("--real", required=True,
                        help="harmony.json of `bench.harmony --real` (photos' eval/), or a summary holding the "
                             "set 'real eval'")
    parser.add_argument("--figure", default=None, help="write the headline picture here (PNG)")
    parser.add_argument("--write-summary", default=None, metavar="FILE",
                        help=f"write what the rule reads of both sets here ({SUMMARY_FORMAT} JSON)")
    add_verbose_argument(parser)
    args = parser.parse_args(argv)
    sets = {label: read_set(getattr(args, option), label) for option, label in SETS.items()}
    if args.write_summary:
        with open(args.write_summary, "w") as handle:
            handle.write(summary(sets))
    chosen, changes, why = choose(sets)
    print(rule_table(changes, chosen, teachers(sets)) + "\n")
    print(f"chosen: {chosen or 'none (the shipped default stays)'}: {why}")
    if args.figure:
        # With nothing chosen the shipped default stays (rule step 5), and the picture marks it.
        draw(changes, chosen or DEFAULT_METHOD, args.figure, "chosen default" if chosen else "shipped default")
        print(args.figure)
    return chosen


if __name__ == "__main__":
    main()
