"""The one console script: ``megavla <command> ...``.

Each command lives in the module of the area that owns it and exposes ``main(argv)``; modules are
imported only when their command runs, so ``megavla data inspect`` does not pay for torch imports
of the trainer. Add a command by adding a row here.
"""
from __future__ import annotations

import importlib
import logging
import sys

# command -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "data": ("megavla.data.cli", "synth | import | inspect | stats | verify | convert | view shard sets"),
    "tokenizer": ("megavla.tokenizers.cli", "train the text tokenizer / FAST tokenizer on a shard set"),
    "model": ("megavla.model.cli", "summary: parameters per part and FLOPs per sample; convert: a LeRobot / openpi pi0(.5) checkpoint -> MegaVLA"),
    "train": ("megavla.train.cli", "train (1 or N local processes, DeepSpeed ZeRO)"),
    "export": ("megavla.train.export", "consolidate a checkpoint into one safetensors file"),
    "launch": ("megavla.launch.cli", "launch a training run locally or on SLURM (submitit)"),
    "sweep": ("megavla.launch.sweep", "expand a sweep grid into runs; `sweep status DIR`, `sweep report DIR`"),
    "serve": ("megavla.serving.cli", "serve a trained policy to openpi clients (websocket, batched)"),
    "experiment": ("megavla.eval.cli", "the paper's experiments: diversity | probe | objectives; closed-loop (one policy, local or served)"),
    "demo": ("megavla.demo", "the README's main job: synth -> train (2 procs) -> resume"),
}


def setup_logging(level: int = logging.INFO) -> None:
    logging.basicConfig(
        level=level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )


def _usage() -> str:
    width = max(map(len, COMMANDS))
    rows = "\n".join(f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items())
    return f"usage: megavla <command> [args] | megavla --version\n\ncommands:\n{rows}\n"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        sys.stdout.write(_usage())
        return 0
    if argv[0] in ("-V", "--version"):
        from megavla import __version__
        sys.stdout.write(f"megavla {__version__}\n")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        sys.stderr.write(f"megavla: unknown command {name!r}\n\n{_usage()}")
        return 2
    setup_logging()
    module = importlib.import_module(COMMANDS[name][0])
    code = module.main(rest)
    return int(code or 0)


if __name__ == "__main__":
    sys.exit(main())
