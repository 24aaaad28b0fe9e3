"""The diversity report's coverage table: what each level's pretraining combos share with the targets."""
from megavla.eval.coverage import PARTS, coverage_markdown, coverage_rows, shared_parts, task_parts

TARGETS = ["0:0", "0:1", "0:2"]
UNIVERSE = [f"{s}:{t}" for s in range(8) for t in range(6) if f"{s}:{t}" not in TARGETS]


def test_a_task_shares_every_part_with_itself_and_pick_has_no_goal():
    place = task_parts("0:3")
    assert place.motion == "pick_place" and place.goal and place.colour in place.instruction
    assert shared_parts(place, ["0:3"]) == {p: 1 for p in PARTS}
    pick = task_parts("0:2")
    assert pick.motion == "pick" and pick.goal == ""
    counts = shared_parts(pick, ["0:2"])
    assert counts["goal"] == counts["motion + goal"] == 0 and counts["instruction"] == 1


def test_levels_are_nested_so_counts_never_fall_and_zero_means_no_pretraining():
    rows = coverage_rows(TARGETS, UNIVERSE, [0.0, 0.25, 0.5, 0.75, 1.0], {})
    assert [r["pretrain_combos"] for r in rows[::3]] == [0, 11, 22, 34, 45]
    assert all(r[p] == 0 for r in rows[:3] for p in PARTS)
    for t in range(3):
        per_level = rows[t::3]
        for p in PARTS:
            assert [r[p] for r in per_level] == sorted(r[p] for r in per_level), (TARGETS[t], p)
    # each count is bounded by the combos kept, and the motion is shared by some combo at 100 %
    assert all(r[p] <= r["pretrain_combos"] for r in rows for p in PARTS)
    assert all(r["motion"] > 0 for r in rows[-3:])
    table = coverage_markdown(rows)
    assert table.count("\n") == len(rows) + 1 and "n/a" in table  # pick has no goal


def test_another_diversity_seed_draws_other_combos():
    a = coverage_rows(TARGETS, UNIVERSE, [0.25], {})
    b = coverage_rows(TARGETS, UNIVERSE, [0.25], {"diversity_seed": 1})
    assert [r["pretrain_combos"] for r in a] == [r["pretrain_combos"] for r in b]
    assert [[r[p] for p in PARTS] for r in a] != [[r[p] for p in PARTS] for r in b]
