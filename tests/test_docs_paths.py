"""The docs cite commands and paths of the repo, never a directory of one machine: an absolute path
such as /work/..., /tmp/..., /home/... or /data/... in docs/*.md, README.md or benchmarks/RESULTS.md
fails here with file:line. Paths of the operating system itself (/usr/bin/time, /dev/shm, /proc/...)
are allowed; write OUT/..., DATA/... or a path relative to the repo for everything else."""
from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DOCS = sorted((REPO / "docs").glob("*.md")) + [REPO / "README.md", REPO / "benchmarks" / "RESULTS.md"]
SYSTEM_ROOTS = {"usr", "dev", "proc", "sys", "etc", "bin", "sbin", "lib", "lib64"}
# An absolute path of two or more components, at the start of a word (not inside a URL or a
# relative path such as runs/exp/mini).
ABSOLUTE_PATH = re.compile(r"(?:^|(?<=[\s(`'\"=\[<,;:]))/([A-Za-z~][\w.~-]*)/[^\s`)'\"\]>,;]*")


def machine_paths(path: Path) -> list[str]:
    found = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        for match in ABSOLUTE_PATH.finditer(line):
            if match.group(1) not in SYSTEM_ROOTS:
                found.append(f"{path.relative_to(REPO) if path.is_relative_to(REPO) else path}:{number}: "
                             f"{match.group(0)}")
    return found


def test_docs_cite_no_machine_paths():
    found = [hit for path in DOCS if path.is_file() for hit in machine_paths(path)]
    assert not found, "absolute machine paths in the docs (use repo-relative paths, OUT/ or DATA/):\n" + \
        "\n".join(found)


def test_the_check_flags_machine_paths_and_keeps_the_rest(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("see /work/main/runs/x and `/tmp/megavla-slurm` and (/home/me/data)\n"
                    "ok: runs/exp/mini/runs/y, /usr/bin/time -v, /dev/shm, https://host/a/b, 1/3 of a core\n"
                    "DATA=/data/pi05_base\n")
    assert [hit.split(": ", 1)[1] for hit in machine_paths(page)] == [
        "/work/main/runs/x", "/tmp/megavla-slurm", "/home/me/data", "/data/pi05_base"]
