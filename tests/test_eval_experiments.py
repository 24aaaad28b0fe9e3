"""End-to-end smoke tests of `megavla experiment diversity | objectives | probe` at toy size.

Each experiment runs its real training runs through the launcher (local executor, one process per
run) on a 2 x 2 mini-world; the tests check the report's structure and recompute numbers from the
runs' own outputs (eval caches, checkpoints, embeddings). The objectives experiment reuses the
diversity experiment's report dir, so its pretrain run is skipped as finished (the resume path).
"""
import json

import numpy as np
import pytest
import yaml

from megavla.config import load_config
from megavla.eval import cli, experiments as ex
from megavla.eval.offline import evaluate_offline, heldout_episodes
from megavla.eval.policy import load_checkpoint

pytestmark = pytest.mark.timeout(900)


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    return tmp_path_factory.mktemp("experiments")


@pytest.fixture(scope="module")
def diversity(out):
    assert cli.main(["diversity", "--preset", "toy", "--out", str(out)]) == 0
    return json.loads((out / "results_diversity.json").read_text())


def test_diversity_report_structure(out, diversity):
    md = (out / "report_diversity.md").read_text()
    assert "| pretrain diversity | seen combos, robot only [95% CI] | gate | robot only: success [95% CI] |" in md
    assert "| 0% |" in md and "| 100% |" in md
    # Power and baselines: the test, the gate and the blind baselines are in the report.
    assert "## Verdict" in md and "p (Fisher)" in md and "baseline: repeat previous" in md
    for row in diversity["rows"]:
        assert set(row["baselines"]) == {"zero", "repeat_previous", "mean_action", "mean_action_train"}
        assert row["gate"] in ("pass", "fail") and 0.0 <= row["comparison"]["p_value"] <= 1.0
        assert row["paired"] is not None  # both conditions ran the same start states
        seen = diversity["evaluations"][str(row["diversity"])]["seen"]["closed_loop"]
        assert row["seen_success"] == seen["success_rate"] and seen["per_combo"].keys() == {"0:1"}
        if row["gate"] == "fail":  # a toy policy is not competent: no verdict for that level
            assert row["diversity"] in diversity["verdict"]["refused_levels"]
    assert (out / "transfer_gap.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [r["diversity"] for r in diversity["rows"]] == [0.0, 1.0]
    configs = sorted(p.name for p in (out / "configs").glob("*.yaml"))
    assert configs == ["finetune_div-0_robot+human.yaml", "finetune_div-0_robot.yaml",
                       "finetune_div-1_control.yaml", "finetune_div-1_robot+human+grip.yaml",
                       "finetune_div-1_robot+human.yaml", "finetune_div-1_robot.yaml", "pretrain_div-1.yaml"]
    # The goal-directed section: every arm's target episodes scored from the traces beside its evaluation.
    assert "## Goal-directed progress on the targets" in md and (out / "progress_gap.png").is_file()
    for name, run_dir in diversity["runs"].items():
        if name.startswith("finetune_"):
            assert (ex.Path(run_dir) / "traces_targets.npz").is_file(), name
    high = diversity["progress"][1]
    assert set(high["arms"]) == {"robot", "robot+human", "robot+human+grip", "control"}
    assert set(high["efficiency"]) == {"robot+human", "robot+human+grip"}
    assert set(diversity["progress"][0]["arms"]) == {"robot", "robot+human"}
    assert (out / "sweeps" / "pretrain.yaml").is_file() and (out / "spec.yaml").is_file()
    for name in ("div-0_robot+human", "div-1_robot+human"):
        assert (out / "probe" / f"tsne_{name}.png").is_file()


def test_diversity_runs_are_what_the_table_says(out, diversity):
    spec = ex.load_spec("toy")
    runs = diversity["runs"]
    pre = load_config(out / "configs" / "pretrain_div-1.yaml")
    assert pre.data.diversity_fraction == 1.0 and pre.data.mixture["human"] == 0.0
    for level in ("0", "1"):
        robot = load_config(out / "configs" / f"finetune_div-{level}_robot.yaml")
        mixed = load_config(out / "configs" / f"finetune_div-{level}_robot+human.yaml")
        assert robot.data.mixture["human"] == 0.0 and mixed.data.mixture["human"] == spec.human_weight
        assert "0:0" in mixed.data.include_combos and mixed.launch.entry == "megavla.train.entry:run"
        # a finetune is an ordinary run that starts from the level's pretraining checkpoint (level 0: none)
        assert (robot.train.init_from == "") == (level == "0") and mixed.train.init_from == robot.train.init_from
        if level == "1":
            init = ex.Path(robot.train.init_from)
            assert init.name == f"step_{spec.pretrain_steps:06d}" and init.parents[2].name == "pretrain"
    # The robot shard set holds no target combo; the human one only targets.
    manifest = json.loads((out / "data" / "robot" / "manifest.json").read_text())
    # world.finetune_episodes_per_combo: the finetune combo has more robot episodes than the rest
    assert manifest["totals"]["episodes"] == 2 + (spec.world.scenes * spec.world.tasks - 2)
    assert "0:0" not in json.dumps(manifest["shards"]) or all("0:0" not in s["combos"] for s in manifest["shards"])
    # Recompute every table number from the runs' own evaluation files.
    for row in diversity["rows"]:
        level = f"{row['diversity']:g}"
        evals = {k: json.loads((ex.Path(runs[f"finetune_div-{level}_{k}"]) / "eval_targets.json").read_text())
                 for k in ("robot", "robot+human")}
        for k, ev in evals.items():
            detail = ev["closed_loop"]["episodes_detail"]
            assert ev["closed_loop"]["success_rate"] == sum(e["success"] for e in detail) / len(detail)
            assert len(detail) == spec.eval.episodes_per_combo * len(spec.world.targets)
            assert ev["step"] == spec.finetune_steps
        assert row["delta_success"] == pytest.approx(
            evals["robot+human"]["closed_loop"]["success_rate"] - evals["robot"]["closed_loop"]["success_rate"])
        assert row["delta_mse"] == pytest.approx(
            evals["robot"]["offline"]["action_mse"] - evals["robot+human"]["offline"]["action_mse"])
    # ... and one offline error from the checkpoint itself (fixed noise: deterministic).
    run_dir = ex.Path(runs["finetune_div-1_robot+human"])
    loaded = load_checkpoint(run_dir)
    eps = heldout_episodes(spec.world.targets, spec.eval.offline_episodes_per_combo, image_size=32)
    again = evaluate_offline(loaded, eps, spec.eval.offline_steps_per_episode, spec.eval.flow_steps,
                             subtask=False, progress=False)
    saved = json.loads((run_dir / "eval_targets.json").read_text())["offline"]["action_mse"]
    assert again["action_mse"] == pytest.approx(saved, rel=1e-5)


def test_objectives_reuses_pretrain_and_reports_breakdown(out, diversity, capsys):
    pre_dir = ex.Path(diversity["runs"]["pretrain_div-1"])
    before = json.loads((pre_dir / "launch.json").read_text())["events"]
    assert cli.main(["objectives", "--preset", "toy", "--out", str(out)]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]  # the command ends with time and path
    assert last.startswith("wall time: ") and last.endswith(f"report: {out / 'report_objectives.md'}")
    assert json.loads((pre_dir / "launch.json").read_text())["events"] == before  # skipped, not re-run
    res = json.loads((out / "results_objectives.json").read_text())
    assert list(res["evaluations"]) == ["high-level only", "low-level only", "both"]
    md = (out / "report_objectives.md").read_text()
    assert (out / "report_diversity.md").is_file()  # the shared report dir keeps both reports
    for variant in res["evaluations"]:
        assert f"| {variant} |" in md
    high = load_config(out / "configs" / "finetune_obj-high.yaml")
    low = load_config(out / "configs" / "finetune_obj-low.yaml")
    assert high.model.flow_weight == 0.0 and low.model.subtask_weight == 0.0 and low.model.fast_weight == 0.0
    for ev in res["evaluations"].values():
        off = ev["offline"]
        assert sum(off["breakdown_counts"].values()) == off["samples"] > 0
        assert off["subtask_accuracy"] is not None
        assert off["breakdown"]["wrong_subtask"] == pytest.approx(1 - off["subtask_accuracy"])
    # goal-directed progress per objective, scored from each evaluation's traces with the rubric
    assert "progress [95% CI]" in md and md.count("- progress, both - ") == 2
    for variant, cell in res["progress"].items():
        assert cell["episodes"] == res["evaluations"][variant]["closed_loop"]["episodes"] > 0
        assert 0.0 <= cell["mean_progress"] <= 1.0
    assert set(res["progress_tests"]) == {"both - high-level only", "both - low-level only"}


def test_probe_silhouette_recomputes_from_saved_embeddings(out, diversity, tmp_path):
    from sklearn.metrics import silhouette_score
    ckpts = [diversity["runs"]["finetune_div-0_robot"], diversity["runs"]["finetune_div-1_robot+human"]]
    assert cli.main(["probe", *ckpts, "--out", str(tmp_path), "--combos", "0:0,1:1",
                     "--episodes-per-combo", "1", "--steps-per-episode", "2"]) == 0
    res = json.loads((tmp_path / "results_probe.json").read_text())["probe"]
    assert len(res) == 2
    for name, entry in res.items():
        safe = name.replace("/", "_")
        emb = np.load(tmp_path / f"embeddings_{safe}.npy")
        labels = json.loads((tmp_path / f"labels_{safe}.json").read_text())
        assert emb.shape[0] == entry["samples"] == 8  # 2 combos x 2 embodiments x 2 steps
        assert {lab["embodiment"] for lab in labels} == {"robot/arm", "human/ego"}
        y = [lab["embodiment"] for lab in labels]
        assert entry["silhouette"] == pytest.approx(silhouette_score(emb, y, metric="cosine"))
        assert (tmp_path / entry["plot"]).is_file()


def test_knobs_reach_every_run_config(tmp_path):
    args = cli.build_parser().parse_args(["diversity", "--preset", "toy", "--cameras", "head",
                                          "--chunk-length", "4", "--human-weight", "0.5"])
    spec = cli._load(args)
    assert spec.human_weight == 0.5
    data = {"robot": "/r", "human": "/h", "tokenizers": "/t"}
    mapping = ex.run_config(spec, data, ["train.steps=7"])
    assert mapping["data"]["cameras"] == ["head"] and mapping["data"]["chunk_length"] == 4
    assert mapping["model"]["chunk_length"] == 4 and mapping["train"]["steps"] == 7
    sweep = ex.write_sweep(tmp_path / "s.yaml", mapping, tmp_path / "runs", {"data.mixture.human": [0.0, 0.5]}, [])
    from megavla.launch.sweep import expand
    _, runs = expand(sweep)
    assert [r.cfg.data.mixture["human"] for r in runs] == [0.0, 0.5]
    assert all(r.cfg.data.cameras == ["head"] and r.cfg.model.chunk_length == 4 for r in runs)
    assert yaml.safe_load(sweep.read_text())["grid"] == {"data.mixture.human": [0.0, 0.5]}


def test_bad_preset_and_spec_errors(tmp_path, capsys):
    assert cli.main(["diversity", "--preset", "nope", "--out", str(tmp_path)]) == 2
    assert "presets are" in capsys.readouterr().err
    assert cli.main(["diversity", "--preset", "toy", "--out", str(tmp_path), "--set", "diversity_levels=[2.0]"]) == 2
    assert cli.main(["diversity", "--preset", "toy", "--out", str(tmp_path), "--human-weight", "0"]) == 2
    # Too few closed-loop episodes per cell is refused before any work starts.
    assert cli.main(["diversity", "--preset", "mini", "--out", str(tmp_path), "--set", "eval.episodes_per_combo=4"]) == 2
    assert "eval.min_episodes_per_cell=20" in capsys.readouterr().err
    assert cli.main(["diversity", "--preset", "toy", "--out", str(tmp_path),
                     "--set", "eval.competence_threshold=1.5"]) == 2
    assert "competence_threshold" in capsys.readouterr().err
    assert cli.main(["probe", str(tmp_path / "missing"), "--out", str(tmp_path)]) == 2
    assert "not a directory" in capsys.readouterr().err
    assert cli.main(["probe", str(tmp_path), "--out", str(tmp_path)]) == 2
    assert "holds no loadable checkpoint" in capsys.readouterr().err   # the rule resume.checkpoint_for states


def test_default_and_mini_evaluations_have_20_episodes_per_cell():
    assert ex.EvalSpec().episodes_per_combo >= 20 and ex.EvalSpec().competence_threshold == 0.6
    spec = ex.load_spec("mini")
    for combos in (spec.world.targets, ex.seen_combos(spec)):
        assert spec.eval.episodes_per_combo * len(combos) >= 20


def test_changed_world_in_an_existing_report_dir_is_refused(out, diversity):
    spec = ex.load_spec("toy", ["world.robot_episodes_per_combo=2"])
    with pytest.raises(ex.ConfigError, match="other world settings"):
        ex.prepare_data(spec, out / "data")


def test_sweep_report_on_runs_the_real_trainer_wrote(out, diversity, capsys):
    from megavla.launch import sweep
    from megavla.launch.sweep_report import collect
    sweep_dir = out / "runs" / "finetune" / "div-1"
    sweep_file = out / "sweeps" / "finetune_div-1.yaml"
    assert sweep.main(["report", str(sweep_dir), "--sweep", str(sweep_file)]) == 0
    assert "2 runs, 2 finished" in capsys.readouterr().out
    entries = {e.name: e for e in collect(sweep_dir, sweep_file)}
    assert set(entries) == {"human-0.0", "human-1.0"}
    robot = entries["human-0.0"]
    losses = [json.loads(line)["loss/total"] for line in (robot.path / "metrics.jsonl").read_text().splitlines()
              if "loss/total" in line]
    assert robot.metrics["final_loss"] == pytest.approx(np.mean(losses[-5:]))
    saved = json.loads((robot.path / "eval_targets.json").read_text())
    assert robot.evals["targets"]["success_rate"] == saved["closed_loop"]["success_rate"]
    assert robot.evals["targets"]["best_baseline"] == min(saved["offline"]["baselines"].values())
    assert "seen" in robot.evals  # the competence-gate evaluation of the robot-only run
    md = (sweep_dir / "sweep_report.md").read_text()
    assert "Swept axes: `data.mixture.human`." in md and "| human-1.0 | finished |" in md
    assert (sweep_dir / "sweep_data.mixture.human.png").is_file()


def test_a_new_gate_threshold_reuses_the_evaluations(out, diversity):
    """The gate and alpha shape the report, not the numbers: changing them re-runs no episode."""
    evals = sorted((out / "runs").rglob("eval_*.json"))
    before = {p: p.stat().st_mtime_ns for p in evals}
    assert cli.main(["diversity", "--preset", "toy", "--out", str(out), "--set", "eval.competence_threshold=0.0"]) == 0
    assert {p: p.stat().st_mtime_ns for p in evals} == before
    res = json.loads((out / "results_diversity.json").read_text())
    assert [row["gate"] for row in res["rows"]] == ["pass", "pass"]
    assert res["verdict"]["gated_levels"] == [0.0, 1.0] and res["verdict"]["refused_levels"] == []
    assert all("p_holm" in row for row in res["rows"])


def test_competence_runs_on_a_run_of_the_experiment(out, diversity, capsys, tmp_path):
    run = diversity["runs"]["finetune_div-1_robot+human"]
    assert cli.main(["competence", run, "--combos", "0:0", "--episodes-per-combo", "2", "--swap-episodes", "1",
                     "--max-steps", "6", "--out", str(tmp_path / "c.json")]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[1].startswith("combo  kind") and printed[2].startswith("0:0    pick_place")
    res = json.loads((tmp_path / "c.json").read_text())["combos"]["0:0"]
    assert res["episodes"] == 2 and set(res["swap_sensitivity"]) == {"colour", "verb"}
    assert res["swap_sensitivity"]["verb"] > 0.0  # a trained model's actions read its instruction
    assert cli.main(["competence", run, "--combos", "0-0"]) == 2


def _diversity_evals(diversity) -> list:
    return sorted(p for d in diversity["runs"].values() for p in ex.Path(d).glob("eval_*.json"))


def test_html_report_has_the_tables_figures_and_each_cells_videos(out, diversity):
    """report_diversity.html: the Markdown's tables and figures, per cell its rollout videos (k successes +
    k failures where the cell had them), every link relative and resolving, nothing from the network."""
    import os
    import re

    from megavla.eval.html_report import local_links
    page = (out / "report_diversity.html").read_text()
    md = (out / "report_diversity.md").read_text()
    links = local_links(page)
    assert links and [link for link in links if not (out / link).is_file()] == []
    assert not re.search(r'(src|href)="(https?:|//|/)', page)
    assert page.count("<table>") == len(re.findall(r"^\|---", md, flags=re.M)) >= 4
    assert set(re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)) <= set(links)
    expected, total = [], 0
    for path in _diversity_evals(diversity):
        ev = json.loads(path.read_text())
        k = ev["videos_per_outcome"]
        assert k == ex.EvalSpec().videos_per_outcome == 2
        outcomes = [e["success"] for e in ev["closed_loop"]["episodes_detail"]]
        for success in (True, False):
            assert sum(v["success"] == success for v in ev["videos"]) == min(k, outcomes.count(success))
        expected += [os.path.relpath(path.parent / v["file"], out) for v in ev["videos"]]
        total += sum(v["bytes"] for v in ev["videos"])
    assert sorted(link for link in links if link.endswith(".mp4")) == sorted(expected)
    assert page.count("<video controls muted") == len(expected) > 0
    assert 0 < total < 100_000 * len(expected)   # small enough to keep (~20 KB per toy episode)


def test_html_report_plays_in_chromium(out, diversity, browser, tmp_path):
    """Every video of the report loads and plays in headless Chromium, every image decodes."""
    report = browser.check_page(out / "report_diversity.html")
    assert not report.problems(), report.problems()
    assert not report.external_links
    n_videos = sum(len(json.loads(p.read_text())["videos"]) for p in _diversity_evals(diversity))
    assert len(report.videos) == n_videos > 0 and all(v["played"] and v["duration"] > 0 for v in report.videos)
    assert len(report.images) >= 4 and all(i["loaded"] for i in report.images)
    shot = browser.screenshot(out / "report_diversity.html", tmp_path / "report.png", width=1000, height=700)
    assert shot.stat().st_size > 10_000
