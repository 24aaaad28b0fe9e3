"""``megavla model summary CONFIG [dotted.overrides ...]``: parameters per part, FLOPs per sample, and
trainable parameters / optimizer-state bytes of a full finetune next to LoRA's (train.lora.rank > 0)."""
from __future__ import annotations

import argparse
import sys

from megavla.config import load_config

from .flops import flops_breakdown, meta_model, model_config_of, parameter_counts, token_counts
from .presets import resolve


def _human(n: float) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


def summary(config: str | None, overrides: list[str]) -> str:
    cfg = load_config(config, overrides)
    mcfg = resolve(model_config_of(cfg))  # cameras from data.cameras
    counts = parameter_counts(meta_model(mcfg))
    flops = flops_breakdown(mcfg)
    tok = token_counts(mcfg)
    lines = [f"model preset {mcfg.preset}: image {mcfg.image_size}/{mcfg.patch_size}, vision "
             f"{mcfg.vision_width}x{mcfg.vision_depth}, backbone {mcfg.width}x{mcfg.depth} "
             f"(mlp {mcfg.mlp_dim}, heads {mcfg.num_heads}/{mcfg.num_kv_heads}x{mcfg.head_dim}), expert "
             f"{mcfg.expert_width} (mlp {mcfg.expert_mlp_dim}), time={mcfg.time_conditioning}, "
             f"state={mcfg.state_mode}, KI={mcfg.knowledge_insulation}",
             "", f"{'part':<10} {'parameters':>14} {'':>9}"]
    counts["vlm"] = counts["vision"] + counts["backbone"]  # the PaliGemma part
    for part, label in (("vision", "vision"), ("backbone", "backbone"), ("vlm", "vision+bb"),
                        ("expert", "expert"), ("total", "total")):
        lines.append(f"{label:<10} {counts[part]:>14,d} {_human(counts[part]):>9}")
    lines += ["", f"tokens per sample: {tok['patches']} image patches ({mcfg.num_cameras} cameras), "
              f"backbone {tok['backbone']}, expert {tok['expert']}, LM targets {tok['lm_targets']}",
              f"{'forward FLOPs':<14} {'per sample':>12}"]
    for part in ("vision", "backbone", "expert", "attention", "lm_head"):
        lines.append(f"{part:<14} {_human(flops[part]):>12}")
    lines.append(f"training FLOPs per sample (3 x forward): {flops['train_total']:.4g} "
                 f"({_human(flops['train_total'])})")
    lines += training_memory_lines(cfg, counts["total"])
    return "\n".join(lines)


def _bytes(n: float) -> str:
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} B"


def training_memory_lines(cfg, total: int) -> list[str]:
    """Trainable parameters and AdamW state bytes of a full finetune, and of LoRA when train.lora is on."""
    from .lora import optimizer_state_bytes, trainable_parameter_counts
    train = cfg.train
    trainable = trainable_parameter_counts(meta_model(model_config_of(cfg)), train)
    master = ", fp32 master weights" if train.precision == "bf16" else ""
    lines = ["", f"training (train.precision={train.precision}; optimizer state = AdamW m+v fp32{master}; "
                 "ZeRO-1/2/3 divide it by the world size)",
             f"{'':<24} {'trainable':>14} {'':>9} {'% of all':>8} {'optimizer state':>16}"]
    rows = [("full finetune", trainable["full"])]
    if train.lora.enabled:
        lora = train.lora
        rows.append((f"LoRA r={lora.rank} a={lora.alpha_value:g}", trainable["lora"]))
    for label, n in rows:
        state = optimizer_state_bytes(n, train.precision)
        lines.append(f"{label:<24} {n:>14,d} {_human(n):>9} {100 * n / total:>7.2f}% {_bytes(state):>16}")
    if train.lora.enabled:
        lines.append(f"LoRA: {'/'.join(train.lora.targets)} layers of {'/'.join(train.lora.parts)}; trains "
                     f"the adapters{' + ' + ', '.join(train.trainable_parts) if train.trainable_parts else ''}")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="megavla model", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("summary", help="parameters per part and training FLOPs per sample")
    p.add_argument("config", help="YAML config file (e.g. configs/pi05-3b.yaml)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. model.width=1024")
    c = sub.add_parser("convert", help="a LeRobot / openpi pi0 or pi0.5 checkpoint -> a MegaVLA model directory")
    c.add_argument("src", help="LeRobot policy directory (config.json + model.safetensors) or openpi "
                               "PyTorch checkpoint directory; nothing is downloaded")
    c.add_argument("--out", required=True, help="directory for model.safetensors + model_config.yaml")
    c.add_argument("--overwrite", action="store_true", help="replace an existing model.safetensors in --out")
    c.add_argument("overrides", nargs="*", help="dotted overrides for what the checkpoint does not fix, "
                                                "e.g. model.fast_vocab_size=2048")
    # overrides may also follow --out (argparse stops a positional list at an option)
    args, extra = parser.parse_known_args(argv)
    if extra and (args.command != "convert" or any("=" not in a or a.startswith("-") for a in extra)):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.overrides += extra
    from megavla.config import ConfigError
    if args.command == "convert":
        return _convert(args)
    try:
        print(summary(args.config, args.overrides))
    except ConfigError as e:
        sys.stderr.write(f"megavla model summary: config error: {e}\n")
        return 2
    return 0


def _convert(args) -> int:
    from megavla.config import ConfigError

    from .pretrained import PretrainedLoadError
    from .pretrained_pi0 import convert_pi0
    try:
        out, report = convert_pi0(args.src, args.out, args.overrides, args.overwrite)
    except (ConfigError, PretrainedLoadError, FileNotFoundError, FileExistsError) as e:
        sys.stderr.write(f"megavla model convert: {e}\n")
        return 2
    print(f"wrote {out}: {report.summary()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
