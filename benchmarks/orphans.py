"""How long workers outlive a launcher that is SIGKILLed mid-training.

    python benchmarks/orphans.py

For the local launcher (``python -m pyg_adaqp.train world_size=2``) and
``torchrun``'s agent (``--standalone --nproc-per-node=2``): start a long run
of the synthetic graph, wait for its first epoch, SIGKILL the launcher alone
(as an OOM killer or a batch scheduler does), and time until no process of
its tree is left, polling ``/proc`` every 10 ms.  Prints one table.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _workers import print_header  # noqa: E402

JOB = ["-m", "pyg_adaqp.train", "trainer.epochs=100000", "trainer.progress=false",
       "trainer.plots=false", "dataset.options.num_nodes=2000"]
LAUNCHERS = {
    "local launcher": [sys.executable, *JOB],
    "torchrun agent": [sys.executable, "-m", "torch.distributed.run", "--standalone",
                       "--nproc-per-node=2", *JOB],
}


def tree(pid: int) -> list[int]:
    """The processes below `pid`."""
    parent_of = {}
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            parent_of[int(proc.name)] = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
    found, frontier = [], [pid]
    while frontier:
        frontier = [c for c, p in parent_of.items() if p in frontier]
        found += frontier
    return found


def alive(pid: int) -> bool:
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def orphan_seconds(argv: list[str], run_dir: Path, limit_s: float = 120.0) -> tuple[int, float]:
    """(processes below the launcher, seconds until the last is gone) after the kill."""
    launcher = subprocess.Popen([*argv, f"hydra.run.dir={run_dir}"], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
    procs = []
    try:
        while not (run_dir / "metrics.jsonl").exists():
            if launcher.poll() is not None:
                raise RuntimeError(f"{argv} exited with {launcher.returncode} before epoch 0")
            time.sleep(0.1)
        procs = tree(launcher.pid)
        launcher.kill()
        t0 = time.monotonic()
        launcher.wait()
        while any(map(alive, procs)) and time.monotonic() - t0 < limit_s:
            time.sleep(0.01)
        return len(procs), time.monotonic() - t0
    finally:
        launcher.kill()
        launcher.wait()
        for pid in procs or tree(launcher.pid):
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


def main() -> int:
    print_header()
    print("| launcher | processes below it | gone after the kill |")
    print("|---|---:|---:|")
    with tempfile.TemporaryDirectory() as tmp:
        for name, argv in LAUNCHERS.items():
            count, seconds = orphan_seconds(argv, Path(tmp) / name.replace(" ", "_"))
            print(f"| {name} | {count} | {seconds:.2f} s |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
