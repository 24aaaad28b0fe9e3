"""What `megavla data inspect` shows of a shard set: its totals per embodiment, checked against disk.

Shared by the data commands (inspect, synth) and the importers (`megavla data import`), which all
end by printing the table of the sets they made.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from megavla.data_shards.manifest import load_manifest, shard_file_problem
from megavla.data_shards.stats import NORM_STATS_FILE


def _combo_shape(combos: list[str]) -> str:
    scenes = {c.split(":")[0] for c in combos}
    tasks = {c.split(":")[1] for c in combos}
    return f"{len(combos)} ({len(scenes)} scenes x {len(tasks)} tasks)"


def summarize(set_dir: Path) -> dict[str, Any]:
    """One shard set's totals from its manifest, plus shards missing or resized on disk."""
    m = load_manifest(set_dir)
    t = m["totals"]
    missing = [r["path"] for r in m["shards"] if shard_file_problem(set_dir / r["path"])]
    resized = [r["path"] for r in m["shards"] if (set_dir / r["path"]).is_file()
               and (set_dir / r["path"]).stat().st_size != r["bytes"]]
    return {"set": str(set_dir), "shards": t["shards"], "bytes": t["bytes"], "episodes": t["episodes"],
            "steps": t["steps"], "valid_steps": t.get("valid_steps", t["steps"]),
            "embodiments": {emb: {"episodes": n, "steps": t["steps_per_embodiment"].get(emb, 0),
                                  "combos": len(t["combos"].get(emb, [])),
                                  "combo_shape": _combo_shape(t["combos"].get(emb, []))}
                            for emb, n in t["embodiments"].items()},
            "norm_stats": (set_dir / NORM_STATS_FILE).is_file(), "missing_shards": missing,
            "size_mismatch": resized, "generator": m.get("generator", {})}


def print_set_table(sets: list[Path], incomplete: list[Path]) -> list[dict[str, Any]]:
    """The `megavla data inspect` table of ``sets`` (also printed after synth and import), with a
    line for each missing or resized shard, missing norm stats and incomplete set; -> the rows."""
    rows = [summarize(s) for s in sets]
    header = f"{'shard set':<28} {'embodiment':<15} {'episodes':>8} {'steps':>9}  " \
             f"{'scene x task combos':<30} {'shards':>6} {'MB':>9}"
    print(header)
    print("-" * len(header))
    by_emb: dict[str, list[int]] = {}
    for r in rows:
        for i, (emb, e) in enumerate(sorted(r["embodiments"].items())):
            tail = f"{r['shards']:>6} {r['bytes'] / 1e6:>9.1f}" if i == 0 else ""
            print(f"{r['set'] if i == 0 else '':<28} {emb:<15} {e['episodes']:>8} {e['steps']:>9}  "
                  f"{e['combo_shape']:<30} {tail}")
            acc = by_emb.setdefault(emb, [0, 0])
            acc[0] += e["episodes"]
            acc[1] += e["steps"]
        for name in r["missing_shards"]:
            print(f"  ! {r['set']}/{name}: {shard_file_problem(Path(r['set']) / name)}")
        for name in r["size_mismatch"]:
            print(f"  ! {r['set']}/{name}: size differs from the manifest (run `megavla data verify`)")
        if not r["norm_stats"]:
            print(f"  ! {r['set']}: no {NORM_STATS_FILE} (run `megavla data stats {r['set']} --write`)")
    print("-" * len(header))
    robot = sum(v[0] for k, v in by_emb.items() if k.startswith("robot/"))
    human = sum(v[0] for k, v in by_emb.items() if k.startswith("human/"))
    print(f"{'total':<28} {'robot / human':<15} {f'{robot} / {human}':>8} "
          f"{sum(r['steps'] for r in rows):>9}  {'':<30} {sum(r['shards'] for r in rows):>6} "
          f"{sum(r['bytes'] for r in rows) / 1e6:>9.1f}")
    for d in incomplete:
        print(f"  ! {d}: incomplete (no manifest.json)")
    return rows
