"""bench.choose applies the rule bench/RESULTS.md wrote before the runs: eligibility by the paired
mean R@1 change on every set, gain by the paired change in box mean/class, a teacher-free config
preferred over a teacher within one point, and nothing chosen when nothing holds on both sets."""

from __future__ import annotations

from bench import choose

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


GC = (FREE, [(50, 10), (52, 12), (48, 11)])


def test_the_largest_gain_among_configs_eligible_on_both_sets_is_chosen():
    sets = {"a": study({"gc_only": GC, "lrc_only": (FREE, [(50, 14), (52, 16), (48, 15)]),
                        "l2sp": (FREE, [(47, 30), (49, 32), (45, 31)])}),  # -3 R@1: not eligible
            "b": study({"gc_only": GC, "lrc_only": (FREE, [(50, 12), (52, 14), (48, 13)]),
                        "l2sp": (FREE, [(50, 30), (52, 32), (48, 31)])})}
    chosen, changes, _ = choose.choose(sets)
    assert chosen == "lrc_only"
    assert round(changes["lrc_only"]["a"].macc1[0], 9) == 4.0 and round(changes["lrc_only"]["b"].macc1[0], 9) == 2.0
    assert not changes["l2sp"]["a"].eligible and changes["l2sp"]["b"].eligible


def test_a_teacher_free_config_within_one_point_on_every_set_beats_a_teacher():
    teacher = (ANCHOR, [(50, 15), (52, 17), (48, 16)])  # +5 on both sets
    close = (FREE, [(50, 14.5), (52, 16.5), (48, 15.5)])  # +4.5: within one point
    far = (FREE, [(50, 13), (52, 15), (48, 14)])  # +3: not
    assert choose.choose({s: study({"gc_only": GC, "harmoclip": teacher, "consistency": close})
                          for s in "ab"})[0] == "consistency"
    assert choose.choose({s: study({"gc_only": GC, "harmoclip": teacher, "consistency": far})
                          for s in "ab"})[0] == "harmoclip"


def test_nothing_is_chosen_when_no_config_holds_on_both_sets_or_has_three_seeds(tmp_path):
    drops = (FREE, [(45, 20), (47, 22), (43, 21)])
    sets = {"a": study({"gc_only": GC, "paper": drops}),
            "b": study({"gc_only": GC, "paper": (FREE, [(50, 20), (52, 22)])})}  # two seeds only
    chosen, changes, why = choose.choose(sets)
    assert chosen is None and "stays" in why
    assert changes["lrc_only"]["a"] is None
    choose.draw(changes, chosen, str(tmp_path / "harmony.png"))
    assert (tmp_path / "harmony.png").read_bytes()[:4] == b"\x89PNG"
