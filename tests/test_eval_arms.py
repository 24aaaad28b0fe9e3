"""The diversity experiment's arms without training: positive-control data disjoint from evaluation
start states, seeds that change the runs, the arm of a run, and the progress report on scored traces."""
import json
from pathlib import Path

import numpy as np
import pytest

from megavla.config import ConfigError
from megavla.config.data import DataConfig
from megavla.data.pipeline import build_loader
from megavla.data_shards.format import sample_to_episode
from megavla.data_shards.verify import iter_tar_samples
from megavla.eval import arms, closed_loop as cl, experiments as ex, progress_report
from megavla.eval.offline import heldout_episodes
from megavla.eval.traces import save_traces


def episodes_of(set_dir):
    out = []
    for shard in sorted(Path(set_dir).glob("*.tar")):
        out += [sample_to_episode(s, str(shard)) for s in iter_tar_samples(shard, [])]
    return out


def test_control_demos_are_the_targets_and_never_an_evaluation_start_state(tmp_path, monkeypatch):
    spec = ex.load_spec("mini", ["world.image_size=16", "world.human_episodes_per_combo=6",
                                 "eval.offline_episodes_per_combo=2"])
    assert arms.control_episodes_per_combo(spec.world) == spec.world.human_episodes_per_combo  # as many
    episodes = episodes_of(arms.write_control_set(spec, tmp_path / "control"))
    assert len(episodes) == 6 * len(spec.world.targets)
    assert {f"{e.scene}:{e.task}" for e in episodes} == set(spec.world.targets)
    assert {e.embodiment for e in episodes} == {"robot/arm"} and all(e.extra["success"] for e in episodes)
    demo_seeds = {e.extra["world_seed"] for e in episodes}
    eval_seeds = {d["seed"] for d in cl.evaluate(cl.HoldPolicy(), spec.world.targets, spec.eval.episodes_per_combo,
                                                  image_size=16, max_steps=1, progress=False)["episodes_detail"]}
    assert eval_seeds == cl.eval_seeds(spec.eval.episodes_per_combo)
    heldout = {e.extra["world_seed"] for e in heldout_episodes(spec.world.targets, 2, image_size=16, cameras=("head",))}
    assert heldout <= arms.forbidden_start_seeds(spec) and eval_seeds <= arms.forbidden_start_seeds(spec)
    assert not demo_seeds & (eval_seeds | heldout)
    # Start states differ too (a world seed fixes one): the demos' first states are none of evaluation's.
    starts = {tuple(np.round(cl.MiniWorld(0, 0, seed=s, image_size=16).ee_state(), 5)) for s in eval_seeds}
    assert not any(tuple(np.round(e.state[0], 5)) in starts for e in episodes if (e.scene, e.task) == (0, 0))
    # A demo that would start where an evaluation does is refused before it is written.
    monkeypatch.setattr(arms, "forbidden_start_seeds", lambda s: set(demo_seeds))
    with pytest.raises(ConfigError, match="evaluation start state"):
        arms.write_control_set(spec, tmp_path / "control2")


def test_arm_sweeps_and_seeds_give_different_runs(tmp_path):
    spec = ex.load_spec("mini")
    data = {"robot": "/r", "human": "/h", "control": "/c", "tokenizers": "/t"}
    assert [arms.seeds_at(spec, lv) for lv in spec.diversity_levels] == [2, 1, 1, 1, 2]
    names = [s["name"] for s in arms.arm_sweeps(spec, 1.0, 1, data)]
    assert names == ["div-1_seed-1", "div-1_grip_seed-1", "div-1_control_seed-1"]
    assert [s["name"] for s in arms.arm_sweeps(spec, 0.5, 0, data)] == ["div-0.5"]  # one seed, two arms
    from megavla.launch.sweep import expand
    cfgs = {}
    for seed in (0, 1):
        for sweep in arms.arm_sweeps(spec, 1.0, seed, data):
            base = ex.finetune_config(spec, data, sweep["extra"], sweep["sources"])
            path = ex.write_sweep(tmp_path / f"{sweep['name']}.yaml", base, tmp_path / "runs" / sweep["name"],
                                  sweep["grid"], [])
            for run in expand(path)[1]:
                cfgs.setdefault(arms.arm_of(run.cfg), []).append(run.cfg)
    assert sorted(cfgs) == sorted(arms.ARMS) and all(len(v) == 2 for v in cfgs.values())
    for arm, (c0, c1) in cfgs.items():
        assert (c0.train.seed, c0.data.seed) == (0, 0) and (c1.train.seed, c1.data.seed) == (1, 1), arm
        assert c0.train.run_dir != c1.train.run_dir
    control = cfgs["control"][0]
    assert control.data.mixture["human"] == 0.0 and control.data.mixture["control"] == spec.human_weight
    assert control.data.sources["control"] == "/c" and cfgs["robot+human+grip"][0].data.human_gripper == "closure"
    assert "control" not in cfgs["robot"][0].data.sources  # only the control arm reads the demos
    with pytest.raises(ConfigError, match="not among diversity_levels"):
        ex.load_spec("mini", ["control_levels=[0.3]"])


def test_data_seed_changes_the_data_order(tmp_path):
    from megavla.data_shards.synth import generate_episode
    from megavla.data_shards.writer import ShardSetWriter
    with ShardSetWriter(tmp_path / "robot", target_shard_bytes=2**16, generator={"t": 1}) as writer:
        for t in range(3):
            for e in range(3):
                writer.write(generate_episode("robot/arm", 0, t, e, image_size=16, cameras=("head",)))

    def keys(seed):
        cfg = DataConfig(sources={"robot": str(tmp_path / "robot")}, image_size=16, cameras=["head"], batch_size=4,
                         num_workers=0, shuffle_buffer=8, samples_per_episode=2, seed=seed)
        batch = next(iter(build_loader(cfg)))
        return list(zip(batch.meta["key"], batch.meta["timestep"]))

    assert keys(0) == keys(0) and keys(0) != keys(1)


def _eval_with_traces(run_dir: Path, policy, combos, n) -> dict:
    traces: list = []
    res = cl.evaluate(policy, combos, n, image_size=16, progress=False, traces=traces)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_traces(traces, run_dir / "traces_targets.npz")
    return {"run_dir": str(run_dir), "traces": "traces_targets.npz", "closed_loop": res,
            "offline": {"action_mse": 0.1, "baselines": {"zero": 0.5}}}


def test_progress_report_on_scored_traces(tmp_path):
    targets, seen = ["0:0", "0:1", "0:2"], ["0:3", "0:4", "0:5"]
    hold = [_eval_with_traces(tmp_path / f"hold{i}", cl.HoldPolicy(), targets, 4) for i in range(2)]
    expert = [_eval_with_traces(tmp_path / f"expert{i}", cl.ScriptedPolicy(seed=i), targets, 4) for i in range(2)]
    rows = progress_report.progress_rows({0.0: {"robot": hold, "robot+human": expert, "control": expert},
                                          1.0: {"robot": hold, "robot+human": hold, "control": hold}}, seen)
    low, high = rows
    assert low["arms"]["robot+human"]["progress"]["mean"] == 1.0 and low["arms"]["robot"]["progress"]["mean"] == 0.0
    assert low["arms"]["robot"]["progress"]["seeds"] == 2 and low["arms"]["robot"]["progress"]["episodes"] == 24
    assert low["tests"]["robot+human"]["progress"]["p_value"] < 0.01
    assert low["efficiency"]["robot+human"]["success"]["efficiency"] == 1.0
    assert not high["efficiency"]["robot+human"]["progress"]["detectable"]  # the control failed there
    assert all("p_holm" in r["tests"]["robot+human"]["success"] for r in rows)
    verdict = progress_report.progress_verdict(rows)
    assert verdict[0].startswith("- 0%, robot+human vs robot only: Δ progress +1.00 (significant")
    assert "positive control does **not** beat robot-only" in verdict[-1]
    lines = progress_report.efficiency_lines(rows)
    assert any("cannot detect transfer" in line for line in lines)
    md = progress_report.progress_markdown(rows)
    assert "| 0% | robot+human | 2 | 24 | 1.00 [1.00, 1.00]" in md
    assert progress_report.plot_progress_gap(rows, tmp_path / "gap.png").read_bytes()[:4] == b"\x89PNG"
    pooled = arms.pool_evals(expert)
    assert pooled["closed_loop"]["episodes"] == 24 and pooled["closed_loop"]["successes"] == 24
    assert {e["run_seed"] for e in pooled["closed_loop"]["episodes_detail"]} == {0, 1}
    json.dumps(rows)  # the rows go into results_diversity.json as they are
