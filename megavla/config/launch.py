"""Launcher settings (owned by launch/)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass
class LaunchConfig:
    executor: Literal["local", "slurm"] = "local"
    nodes: int = 1
    tasks_per_node: int = 1
