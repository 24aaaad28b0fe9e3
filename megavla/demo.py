"""`megavla demo [--out runs/demo]`: the README's main job, end to end on a laptop-class CPU.

1. generate a small synthetic shard set (robot arm + human ego video, 32 px, mini-world);
2. train the text + FAST tokenizers on it;
3. train the tiny preset with 2 local processes, DeepSpeed ZeRO-2, for half the steps, checkpoint;
4. resume from that checkpoint (`--resume auto`, a second invocation) and finish;
5. print the flow-matching loss curve and where the tensorboard logs and checkpoints are.

Steps 1-2 are skipped when their outputs exist; the training run directory (OUT/run) is started
afresh on every invocation. OUT is the demo's own: it holds a marker file (megavla-demo.json), the
demo refuses an OUT that holds anything else (another command's output), and `megavla train`
refuses a train.run_dir inside it, so neither can clobber the other.
Exit code 0 when training finished and the flow loss fell, 1 otherwise, 2 for an OUT it does not own.
"""
from __future__ import annotations

import argparse
import logging
import shutil
import sys
import time
from pathlib import Path

from megavla.demo_output import NotDemoOutput, claim_output_dir

log = logging.getLogger(__name__)


def demo_config_path() -> Path:
    """configs/demo.yaml as installed with the package (megavla.configs): any install runs the demo."""
    from megavla.config.shipped import shipped_config
    return shipped_config("demo.yaml")


def make_shards(out: Path, image_size: int) -> Path:
    shards = out / "shards"
    if (shards / "robot" / "manifest.json").is_file() and (shards / "human" / "manifest.json").is_file():
        log.info("shards exist in %s: reusing them", shards)
        return shards
    from megavla.data.cli import main as data_main
    code = data_main(["synth", "--out", str(shards), "--scenes", "2", "--tasks", "3",
                      "--episodes-per-combo", "4", "--image-size", str(image_size),
                      "--embodiments", "robot/arm,human/ego", "--shard-size-mb", "1", "--overwrite"])
    if code:
        raise RuntimeError(f"megavla data synth failed with exit code {code}")
    return shards


def make_tokenizers(out: Path, shards: Path) -> Path:
    tok = out / "tokenizers"
    if (tok / "text.model").is_file() and (tok / "fast.json").is_file():
        log.info("tokenizers exist in %s: reusing them", tok)
        return tok
    from megavla.tokenizers.pair import train_tokenizers
    train_tokenizers([shards / "robot", shards / "human"], tok)
    return tok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="megavla demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/demo", help="output directory (default runs/demo)")
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps in total (default 300)")
    parser.add_argument("--nproc", type=int, default=2, help="local processes (default 2)")
    parser.add_argument("overrides", nargs="*", help="extra dotted config overrides (e.g. train.zero_stage=3)")
    args = parser.parse_args(argv)
    from megavla.train.cli import main as train_main
    from megavla.train.metrics import run_summary

    t0 = time.perf_counter()
    out = Path(args.out)
    try:
        claim_output_dir(out)
    except NotDemoOutput as e:
        sys.stderr.write(f"megavla demo: {e}\n")
        return 2
    shards = make_shards(out, image_size=32)
    tokenizers = make_tokenizers(out, shards)
    run_dir = out / "run"
    if run_dir.exists():
        log.info("removing the previous demo run %s", run_dir)
        shutil.rmtree(run_dir)
    first = args.steps // 2
    common = [str(demo_config_path()), f"data.sources.robot={shards / 'robot'}",
              f"data.sources.human={shards / 'human'}", f"train.tokenizer_dir={tokenizers}",
              f"train.run_dir={run_dir}", f"train.steps={args.steps}", *args.overrides,
              "--nproc", str(args.nproc)]
    t_train = time.perf_counter()
    log.info("segment 1: steps 0 -> %d on %d processes (ZeRO-2)", first, args.nproc)
    code = train_main(common + [f"train.max_steps_per_run={first}"], demo_run=True)
    if code:
        log.error("segment 1 failed with exit code %d", code)
        return code
    log.info("segment 2: resume from the newest checkpoint -> step %d", args.steps)
    code = train_main(common + ["--resume", "auto"], demo_run=True)
    if code:
        log.error("segment 2 failed with exit code %d", code)
        return code
    t_end = time.perf_counter()

    summary = run_summary(run_dir)
    if summary is None:
        log.error("%s: no loss was logged", run_dir)
        return 1
    print(f"\n{summary.label} (mean over ranks and the steps since the previous line):")
    for step, loss in summary.curve:
        marker = "   <- checkpoint; segment 2 resumed from here" if step == first else ""
        print(f"  step {step:5d}  {summary.label} {loss:.4f}{marker}")
    print()
    for line in summary.lines:
        print(line)
    fell = summary.fell
    print(f"export:          megavla export {run_dir / 'checkpoints'} --out {out / 'export'}")
    print(f"time: {t_end - t0:.0f} s in all ({t_end - t_train:.0f} s training, 2 segments)")
    return 0 if fell else 1


if __name__ == "__main__":
    raise SystemExit(main())
