"""The bench's settings, shared by all its parts, and its log line."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

TTL = 1.0
COLD_WAIT = TTL + 0.2
TOOL_TIMEOUT = 900
ENV = dict(os.environ, LC_ALL="C")
N_OPS = 1000
N_PAR = 8
ROUNDS = 3  # cold runs of short workloads (cat, stat, and tools under SHORT_RUN)
SHORT_RUN = 2.0  # seconds

WORKLOADS = [
    "ls -R",
    "ls -lR",
    "find -type f",
    "find -type l",
    "grep -r .",
    "cat x1000",
    "stat x1000",
    "8x grep -r .",
]
TREE_WORKLOADS = ["ls -R", "ls -lR", "find -type f", "find -type l"]
SHORT = {"qom-list": "list", "qom-get": "get", "qom-list-get": "list-get"}


def log(msg: str) -> None:
    print(f"bench: {msg}", file=sys.stderr, flush=True)


@dataclass
class Config:
    name: str  # "7.2", "11.1", "11.1 no-batch"
    qemu: str  # "7.2" or "11.1"
    batch: bool


def fmt_cmds(cmds: dict[str, int]) -> str:
    if not cmds:
        return "-"
    return " ".join(f"{SHORT.get(k, k)} {v}" for k, v in sorted(cmds.items()))
