"""bench/frontier.py: the rule, the Pareto front, the candidate rule, costs per step over whole periods, and
the committed table rendered again from its JSON. Numbers here are made up by hand; nothing is trained."""

import json
import re
from pathlib import Path

import pytest

from bench import common, frontier, report
from lab.methods import method_of

ROOT = Path(__file__).resolve().parent.parent


def test_verdict_is_the_issue_rule():
    assert frontier.verdict((-0.2, 0.5, 12)) == "keeps"  # CI contains 0, mean >= -0.3
    assert frontier.verdict((-0.3, 0.5, 12)) == "keeps"
    assert frontier.verdict((-0.31, 0.5, 12)) == "misses"  # CI contains 0, mean below -0.3
    assert frontier.verdict((0.6, 0.5, 12)) == "beats"
    assert frontier.verdict((-0.6, 0.5, 12)) == "loses"
    assert frontier.verdict((0.0, float("nan"), 1)) is None and frontier.verdict(None) is None


def test_front_keeps_the_points_nothing_dominates():
    pts = [(1.0, -1.0, "sgd"), (2.0, 0.0, "sam"), (1.2, -0.2, "a"), (1.3, -0.5, "b"), (1.2, -0.4, "c")]
    assert frontier.front(pts) == ["sgd", "a", "sam"]  # b: a is cheaper and better; c: a is as cheap, better


def bench_json(rows):
    """A pytest-benchmark JSON: rows (method key, flags, seconds per timed call, period, flops), 3 rounds."""
    return dict(
        benchmarks=[
            dict(
                stats=dict(min=t * (1 + 0.01 * r)),
                extra_info=dict(
                    dict(kind="step", model="resnet18", batch=32, method=m, flags=f, period=p, bench_round=r),
                    flops_x_sgd=fl,
                    param_bytes=4,
                    weights="fresh",
                    opt=f.split()[1],
                    sparsity=0.9 if "ssamf" in f else 0.0,
                ),
            )
            for m, f, t, p, fl in rows
            for r in range(3)
        ]
    )


def test_costs_are_per_step_over_whole_periods_and_bounds_follow_k():
    data = bench_json(
        [
            ("sgd", "--optimizer sgd", 1.0, 1, 1.0),
            ("sam", "--optimizer sam", 2.0, 1, 2.0),
            ("sam-k5", "--optimizer sam --ascent-every 5", 6.0, 5, 1.2),  # 5 steps a call: 1.2 a step
            ("sam-f0.5", "--optimizer sam --ascent-fraction 0.5", 1.5, 1, 1.5),
        ]
    )
    rows = {r["method"]: r for r in report.summarize(data)["steps"]}
    assert rows["sam-k5"]["x_sgd"][0] == pytest.approx(1.2) and rows["sam"]["x_sgd"][0] == pytest.approx(2.0)
    table = frontier.costs(data)
    assert frontier.cost_of("sam-k5", None, table) == (pytest.approx(1.2), 1.2, True)
    assert frontier.cost_of("sam-k10-a0.7", None, table) == (None, pytest.approx(1.1), False)  # from SAM's
    assert frontier.cost_of("sam-f0.5-k5-a0.7", None, table) == (None, pytest.approx(1.1), False)
    assert frontier.cost_of("ssamf", 0.5, table) == (None, None, False)  # no row, no -k: unknown


def test_candidates_follow_the_written_rule():
    table = frontier.costs(
        bench_json(
            [
                ("sgd", "--optimizer sgd", 1.0, 1, 1.0),
                ("sam", "--optimizer sam", 2.0, 1, 2.0),
                ("sam-f0.5", "--optimizer sam --ascent-fraction 0.5", 1.5, 1, 1.5),
                ("sam-f0.25", "--optimizer sam --ascent-fraction 0.25", 1.25, 1, 1.25),
                ("ssamf-s0.9-tensor-cost", "--optimizer ssamf --sparsity 0.9 --structure tensor "
                 "--mask-select cost", 1.4, 1, 1.4),
            ]
        )
    )  # fmt: skip
    screen = {  # mean paired Δ vs SAM on the screen seeds
        ("sgd", None): -1.9,
        ("sam", None): None,
        ("sam-k2", None): -0.8,  # bound 1.5
        ("sam-k5", None): -0.9,  # 1.2
        ("sam-k10", None): -1.5,  # 1.1, but below -1.0: dropped
        ("sam-k10-a0.7", None): -0.6,  # 1.1
        ("sam-k5-a0.7", None): -0.1,  # 1.2
        ("sam-f0.5-k5-a0.7", None): -0.5,  # 1.1
        ("sam-f0.25-k2-a0.7", None): -0.2,  # 1.125
        ("sam-f0.25", None): -0.7,  # 1.25
        ("sam-f0.5", None): -0.3,  # 1.5
        ("ssamf-tensor-cost", 0.9): -0.9,  # 1.4
    }
    rows = [
        dict(method=m, sparsity=sp, vs_sam=None if d is None else (d, 0.5, 3))
        for (m, sp), d in screen.items()
    ]
    assert frontier.candidates(rows, table) == [
        ("sam-f0.25-k2-a0.7", None),  # <= 1.15, best mean first
        ("sam-f0.5-k5-a0.7", None),
        ("sam-k10-a0.7", None),
        ("sam-k5-a0.7", None),  # the costlier front, cheapest first: k5-a0.7 (1.2, -0.1) dominates the rest
    ]


def test_frontier_throughput_target_times_every_screened_configuration():
    """make bench-frontier-throughput's --bench-methods name exactly the configurations of SCREEN, LookSAM at
    alpha 0.7 only: at another alpha a configuration uses alpha 0.7's timing (the same operations)."""
    make = (ROOT / "Makefile").read_text()
    keys = ",".join(re.findall(r"FRONTIER_BENCH := (?:\$\(FRONTIER_BENCH\),)?(\S+)", make)).split(",")
    named = {method_of(common.config(common.METHODS[k][0])) for k in keys}
    rows = {f"{m}|{sp}": {} for m, sp in named}
    timed = {(frontier.timed_as(m, sp, rows), sp) for m, sp in frontier.SCREEN}
    assert named == timed and len(keys) == len(timed) < len(frontier.SCREEN)
    assert frontier.timed_as("sam-k5-a0.1", None, rows) == "sam-k5-a0.7"  # not timed: alpha 0.7's row
    assert frontier.timed_as("sam-k10", None, {}) == "sam-k10"


def test_heldout_picks_what_meets_the_goal_else_the_cheapest_keeper_and_the_best_cheap_one():
    def row(m, x, y, verdict):
        return dict(method=m, sparsity=None, x=x, y=y, verdict=verdict)

    rows = [row("sgd", 1.0, -2.0, "loses"), row("sam", 1.98, 0.0, None)]
    rows += [row("sam-k10", 1.12, -1.0, "loses"), row("sam-k10-a0.1", 1.12, -0.5, "misses")]
    rows += [row("sam-f0.5", 1.58, -0.1, "keeps"), row("sam-f0.25", 1.31, -0.2, "keeps")]
    assert frontier.heldout_picks(rows) == [("sam-f0.25", None), ("sam-k10-a0.1", None)]
    rows.append(row("sam-k5-a0.1", 1.14, 0.1, "keeps"))
    assert frontier.heldout_picks(rows) == [("sam-k5-a0.1", None)]


def test_render_from_runs(tmp_path):
    """A frontier JSON of made-up runs renders its table (rows, paired Δ, verdicts) and its figure."""
    accs = {
        ("sgd", None): [23.0, 23.5, 24.0],
        ("sam", None): [25.0, 25.0, 26.0],
        ("sam-k5-a0.7", None): [24.9, 25.1, 25.8],
    }
    runs = [
        dict(method=m, sparsity=sp, seed=s, test_acc=a / 100, step_ms=None, name="x")
        for (m, sp), aa in accs.items()
        for s, a in zip(range(3, 6), aa)
    ]  # fmt: skip
    table = frontier.costs(
        bench_json([("sgd", "--optimizer sgd", 1.0, 1, 1.0), ("sam", "--optimizer sam", 2.0, 1, 2.0)])
    )
    result = dict(
        settings=dict(setting=["--epochs", "1"], jobs=1),
        machine=dict(cpu="cpu", cores=2),
        throughput=dict(source="t.json"),
        costs=table,
        seed_sets={"confirm": [3, 4, 5]},
        runs=runs,
        missing=[],
        candidates=[["sam-k5-a0.7", None]],
    )
    (tmp_path / "f.json").write_text(json.dumps(result))
    no_timing = str(tmp_path / "no-throughput.json")  # the JSON's own costs, not the repository's timing
    frontier.main(["render", "--out", str(tmp_path / "f"), "--throughput", no_timing])
    md = (tmp_path / "f.md").read_text()
    assert "| LookSAM k=5 α=0.7 | not measured (bound 1.20) |" in md
    assert "| -0.07 ± 0.38 | 1.77 ± 0.38 | keeps | yes |" in md  # Δ vs SAM, vs SGD (by hand), on the front
    assert "Candidates picked by the rule from the screen: LookSAM k=5 α=0.7." in md
    assert (tmp_path / "f.png").stat().st_size > 1000
    with pytest.raises(SystemExit, match="the confirmation has not finished"):  # 3 of its 12 seeds
        frontier.main(["heldout", "--report", "--out", str(tmp_path / "f"), "--throughput", no_timing])


def test_committed_frontier_renders_byte_identical_from_its_json():
    out = ROOT / "bench" / "results" / "frontier"
    result = json.loads(out.with_suffix(".json").read_text())
    assert frontier.render(result) == out.with_suffix(".md").read_text()
