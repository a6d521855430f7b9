"""How long workers outlive a launcher that is SIGKILLed mid-training.

    python benchmarks/orphans.py

For the local launcher (``python -m pyg_adaqp.train world_size=2``) and
``torchrun``'s agent (``--standalone --nproc-per-node=2``): start a long run
of the synthetic graph, wait for its first epoch, SIGKILL the launcher alone
(as an OOM killer or a batch scheduler does), and time until no process of
its tree is left, polling ``/proc`` every 10 ms: the workers, and
multiprocessing's helpers (the fork server the local workers fork from, the
resource tracker), which exit once no worker is left.  Prints one table.
The tests of ``tests/test_reliability.py`` use the same helpers, without
timing.
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


def parent(pid: int) -> int | None:
    """The parent of `pid` from ``/proc`` (None if it has exited meanwhile)."""
    try:
        return int((Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def process_tree(pid: int) -> list[int]:
    """Every process below `pid` (children, their children, ...), from ``/proc``."""
    parent_of = {int(proc.name): parent(int(proc.name)) for proc in Path("/proc").glob("[0-9]*")}
    found, frontier = [], [pid]
    while frontier:
        frontier = [c for c, p in parent_of.items() if p in frontier]
        found += frontier
    return found


def alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie, dead but not yet reaped, does not)."""
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def kill_launcher(argv: list[str], started: Path, workers: int, log: Path,
                  env: dict | None = None) -> list[int]:
    """Starts `argv` (its output to `log`), waits until `started` exists and
    `workers` processes run below it, then SIGKILLs the launcher alone, as an
    OOM killer or a batch scheduler would.  Returns the processes that were
    below it.

    Raises:
        RuntimeError: If the launcher exits before that.
    """
    with open(log, "w") as out:  # a pipe nobody reads could fill up
        launcher = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT,
                                    env={**os.environ, **(env or {})})
        try:
            while not (started.exists() and len(process_tree(launcher.pid)) >= workers):
                if launcher.poll() is not None:
                    raise RuntimeError(f"{' '.join(argv)} exited with {launcher.returncode} "
                                       f"before it started:\n{log.read_text()[-3000:]}")
                time.sleep(0.05)
            return process_tree(launcher.pid)
        finally:
            launcher.kill()
            launcher.wait()


def multiprocessing_helpers(pids: list[int]) -> set[int]:
    """Of `pids` (one process tree), multiprocessing's fork server and resource
    tracker: their command line names the module, and (unlike the workers the
    server forks, which inherit it) their parent is not in `pids`."""
    helpers = set()
    for pid in pids:
        try:
            cmdline = (Path("/proc") / str(pid) / "cmdline").read_bytes()
        except OSError:  # exited meanwhile
            continue
        if b"from multiprocessing." in cmdline and parent(pid) not in pids:
            helpers.add(pid)
    return helpers


def wait_gone(pids: list[int]) -> None:
    """Returns once none of `pids` runs (callers bound it: a test time-out)."""
    while any(map(alive, pids)):
        time.sleep(0.01)


def kill_all(pids: list[int]) -> None:
    """SIGKILLs whatever of `pids` still runs."""
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def orphan_seconds(argv: list[str], run_dir: Path) -> tuple[int, float, float]:
    """(processes below the launcher, seconds until the last worker is gone, seconds
    until the last process is gone) after the kill."""
    run_dir.mkdir(parents=True)
    procs = kill_launcher([*argv, f"hydra.run.dir={run_dir}"], run_dir / "metrics.jsonl",
                          workers=2, log=run_dir / "launcher.log")
    t0 = time.monotonic()
    try:
        helpers = multiprocessing_helpers(procs)
        wait_gone([p for p in procs if p not in helpers])
        workers = time.monotonic() - t0
        wait_gone(procs)
        return len(procs), workers, time.monotonic() - t0
    finally:
        kill_all(procs)


def main() -> int:
    print_header()
    print("| launcher | processes below it | workers gone after the kill | all gone after |")
    print("|---|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as tmp:
        for name, argv in LAUNCHERS.items():
            count, workers, everything = orphan_seconds(argv, Path(tmp) / name.replace(" ", "_"))
            print(f"| {name} | {count} | {workers:.3f} s | {everything:.2f} s |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
