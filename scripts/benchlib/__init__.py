"""scripts/bench in parts: common (settings), tree (the raw client's walk), floors
(raw QMP and FUSE floors), workloads (tools on a mount), runs (one VM, each
config's mount), report (tables and checks)."""
