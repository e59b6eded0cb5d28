"""bench.choose applies the rule bench/RESULTS.md wrote before the runs: eligibility by the paired
mean R@1 change on every set, gain by the paired change in box mean/class, a teacher-free config
preferred over a teacher within one point, and nothing chosen when nothing holds on both sets; and
it reads the same numbers back from a summary file, such as the shipped real-photo transcription."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest

from bench import choose

SHIPPED_REAL = Path(__file__).resolve().parents[1] / "bench" / "results" / "real-2026-12-02.paired.json"

ANCHOR = {"gr_mode": "anchor", "lambda_gr": 10.0}
FREE = {"gr_mode": "anchor", "lambda_gr": 0.0}


def result(r1: float, macc1: float) -> dict:
    """jobs.evaluate's keys that the rule reads, in fractions as the job writes them."""
    return {"retrieval": {"i2t": {"r1": r1 / 100}, "t2i": {"r1": r1 / 100}},
            "box": {"top1": macc1 / 100, "macc1": macc1 / 100}}


def study(configs: dict[str, tuple[dict, list[tuple[float, float]]]]) -> dict:
    """A harmony.json: per config its method and per seed (mean R@1, box mean/class), in points."""
    return {"baseline": "gc_only", "configs": {
        name: {"method": method, "runs": [{"seed": seed, "val": result(*point)} for seed, point in enumerate(points)]}
        for name, (method, points) in configs.items()}}


def measured(studies: dict[str, dict]) -> dict[str, choose.Measured]:
    """Per set label, what the rule reads of that harmony.json."""
    return {label: choose.from_study(one, label) for label, one in studies.items()}


GC = (FREE, [(50, 10), (52, 12), (48, 11)])


def test_the_largest_gain_among_configs_eligible_on_both_sets_is_chosen():
    sets = {"a": study({"gc_only": GC, "lrc_only": (FREE, [(50, 14), (52, 16), (48, 15)]),
                        "l2sp": (FREE, [(47, 30), (49, 32), (45, 31)])}),  # -3 R@1: not eligible
            "b": study({"gc_only": GC, "lrc_only": (FREE, [(50, 12), (52, 14), (48, 13)]),
                        "l2sp": (FREE, [(50, 30), (52, 32), (48, 31)])})}
    chosen, changes, _ = choose.choose(measured(sets))
    assert chosen == "lrc_only"
    assert round(changes["lrc_only"]["a"].macc1[0], 9) == 4.0 and round(changes["lrc_only"]["b"].macc1[0], 9) == 2.0
    assert not changes["l2sp"]["a"].eligible and changes["l2sp"]["b"].eligible


def test_a_teacher_free_config_within_one_point_on_every_set_beats_a_teacher():
    teacher = (ANCHOR, [(50, 15), (52, 17), (48, 16)])  # +5 on both sets
    close = (FREE, [(50, 14.5), (52, 16.5), (48, 15.5)])  # +4.5: within one point
    far = (FREE, [(50, 13), (52, 15), (48, 14)])  # +3: not
    assert choose.choose(measured({s: study({"gc_only": GC, "harmoclip": teacher, "consistency": close})
                                   for s in "ab"}))[0] == "consistency"
    assert choose.choose(measured({s: study({"gc_only": GC, "harmoclip": teacher, "consistency": far})
                                   for s in "ab"}))[0] == "harmoclip"


def test_nothing_is_chosen_when_no_config_holds_on_both_sets_or_has_three_seeds(tmp_path):
    drops = (FREE, [(45, 20), (47, 22), (43, 21)])
    sets = {"a": study({"gc_only": GC, "paper": drops}),
            "b": study({"gc_only": GC, "paper": (FREE, [(50, 20), (52, 22)])})}  # two seeds only
    chosen, changes, why = choose.choose(measured(sets))
    assert chosen is None and "stays" in why
    assert changes["lrc_only"]["a"] is None
    choose.draw(changes, chosen, str(tmp_path / "harmony.png"))
    assert (tmp_path / "harmony.png").read_bytes()[:4] == b"\x89PNG"


def test_a_summary_written_from_two_studies_reads_back_the_same_changes_and_choice(tmp_path, capsys):
    # The teacher-free config wins only if the summary keeps which config has a teacher.
    synthetic = study({"gc_only": GC, "harmoclip": (ANCHOR, [(50, 15), (52, 17), (48, 16)]),
                       "consistency": (FREE, [(50, 14.5), (52, 16.5), (48, 15.5)]),
                       "paper": (FREE, [(50, 20)])})  # one seed: no half-width
    real = study({"gc_only": GC, "harmoclip": (ANCHOR, [(51, 13), (52, 14), (49, 13)]),
                  "consistency": (FREE, [(51, 12.5), (53, 13.5), (48, 12.5)])})
    paths = {label: tmp_path / f"{label}.json" for label in ("synthetic", "real")}
    for label, one in (("synthetic", synthetic), ("real", real)):
        paths[label].write_text(json.dumps(one))
    written = tmp_path / "both.paired.json"
    assert choose.main(["--synthetic", str(paths["synthetic"]), "--real", str(paths["real"]),
                        "--write-summary", str(written)]) == "consistency"
    assert choose.main(["--synthetic", str(written), "--real", str(written)]) == "consistency"
    assert capsys.readouterr().out.count("chosen: consistency") == 2

    for option, one in (("synthetic", synthetic), ("real", real)):
        label = choose.SETS[option]
        direct, read = choose.from_study(one, str(paths[option])), choose.read_set(str(written), label)
        assert read.teachers == direct.teachers == {"harmoclip"}
        assert read.source == str(paths[option])
        assert {name: p for name, p in read.changes.items() if name != "paper"} == \
            {name: p for name, p in direct.changes.items() if name != "paper"}
    paper = choose.read_set(str(written), "synthetic val").changes["paper"]
    assert paper.seeds == 1 and paper.macc1[0] == 10.0 and math.isnan(paper.macc1[1])
    assert json.loads(written.read_text())["sets"]["synthetic val"]["configs"]["paper"]["r1"][1] is None


def test_a_summary_for_the_other_set_or_a_malformed_file_stops_with_a_message_naming_it(tmp_path):
    with pytest.raises(SystemExit, match=re.escape(str(SHIPPED_REAL)) + ".*no set 'synthetic val'.*'real eval'"):
        choose.main(["--synthetic", str(SHIPPED_REAL), "--real", str(SHIPPED_REAL)])
    good = json.loads(SHIPPED_REAL.read_text())
    no_r1 = json.loads(SHIPPED_REAL.read_text())
    del no_r1["sets"]["real eval"]["configs"]["paper"]["r1"]
    short = json.loads(SHIPPED_REAL.read_text())
    short["sets"]["real eval"]["configs"]["paper"]["top1"] = [0.7]
    for name, text in (("not-json", "{not json"), ("no-r1", json.dumps(no_r1)), ("short", json.dumps(short)),
                       ("format-2", json.dumps({**good, "format": "harmoclip.paired/2"})),
                       ("neither", json.dumps([1, 2]))):
        path = tmp_path / f"{name}.json"
        path.write_text(text)
        with pytest.raises(SystemExit, match=re.escape(str(path))):
            choose.read_set(str(path), "real eval")


def test_the_shipped_real_photo_transcription_loads_with_every_candidate_eligible():
    real = choose.read_set(str(SHIPPED_REAL), "real eval")
    assert set(real.changes) == set(choose.CANDIDATES + choose.REFERENCE)
    assert all(real.changes[name].seeds == 3 and real.changes[name].eligible for name in choose.CANDIDATES)
    assert real.changes["paper"].macc1 == (2.2, 0.0) and real.changes["region_only"].r1 == (-0.4, 1.2)
    assert real.teachers == {"harmoclip", "gc_anchor"}
    assert "recycled" in real.source and "2026-12-02" in real.source
