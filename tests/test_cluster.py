"""The bandwidth-limited cluster of the benchmarks: shaping, failures, teardown.

Network namespaces and ``tc`` need root, which CI and the development
machines have; elsewhere these tests say why they cannot run.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

from cluster import Cluster, ClusterError, measure_rate  # noqa: E402

pytestmark = pytest.mark.skipif(os.geteuid() != 0,
                                reason="network namespaces and tc need root")


def netns_names() -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


@pytest.mark.timeout(60)
def test_links_are_rate_limited_and_everything_is_torn_down():
    with Cluster(2, "20mbit") as cluster:
        assert set(cluster.host_ns) | {cluster.bridge_ns} <= set(netns_names())
        # Each host has its own address, reachable from the other host only.
        res = cluster.run(["ip", "-o", "-4", "addr", "show", "dev", "eth0"], timeout=10)
        assert [cluster.addr(h.rank) in h.output for h in res] == [True, True]
        mbit = measure_rate(cluster, seconds=1.5)
    # Shaping can only slow a stream down: never above the rate (plus the
    # one bucket of burst), and the link still works.
    assert 5.0 < mbit < 20.0 * 1.1
    assert cluster.leftovers() == []
    assert not [ns for ns in netns_names() if ns.startswith(cluster.prefix)]


@pytest.mark.timeout(60)
def test_every_host_can_have_its_own_rate():
    with pytest.raises(ClusterError, match="3 rates given for 2 hosts"):
        Cluster(2, ["1gbit", "1gbit", "1gbit"])
    with Cluster(2, ["20mbit", "none"]) as cluster:
        res = cluster.run(["tc", "qdisc", "show", "dev", "eth0"], timeout=10)
        shown = {h.rank: h.output for h in res}
        assert "tbf" in shown[0] and "20Mbit" in shown[0]
        assert "tbf" not in shown[1]
    assert cluster.leftovers() == []


@pytest.mark.timeout(60)
def test_a_failing_host_stops_the_others():
    with Cluster(3, "none") as cluster:
        with pytest.raises(ClusterError, match="host 1 exited with code 3") as err:
            cluster.run(["sh", "-c", "if [ {rank} = 1 ]; then echo boom; exit 3; fi; sleep 60"],
                        timeout=50)
        # The others were killed by the run (exit None), not left to finish their sleep.
        assert "host 0 (exit None)" in str(err.value) and "host 2 (exit None)" in str(err.value)
    assert cluster.leftovers() == []


@pytest.mark.timeout(60)
def test_the_run_is_bounded_in_time():
    with Cluster(2, "none") as cluster:
        with pytest.raises(ClusterError, match="timed out after 2 s"):
            cluster.run(["sleep", "60"], timeout=2)
    assert cluster.leftovers() == []


def test_bad_rate_is_named():
    with pytest.raises(ClusterError, match="rate '1 gig' is not of the form"):
        Cluster(2, "1 gig")


@pytest.mark.timeout(60)
def test_sigterm_tears_the_cluster_down():
    proc = subprocess.Popen([sys.executable, str(BENCHMARKS / "cluster.py"), "--hosts", "2",
                             "--rate", "100mbit", "--", "sleep", "61.5"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    prefix = f"adaqp{proc.pid}"
    # Until the hosts' commands run (the test's time-out bounds the wait).
    while subprocess.run(["pgrep", "-f", "^sleep 61.5"], capture_output=True).stdout == b"":
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.1)
    assert any(ns.startswith(prefix) for ns in netns_names())
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 130 and "stopped by SIGTERM" in err
    assert not [ns for ns in netns_names() if ns.startswith(prefix)]
    assert subprocess.run(["pgrep", "-f", "sleep 61.5"], capture_output=True).stdout == b""


@pytest.mark.timeout(120)
def test_sigterm_tears_the_cost_model_checks_cluster_down():
    """`benchmarks/cost_model.py` stops on SIGTERM as `cluster.py` does: 130, nothing left."""
    proc = subprocess.Popen([sys.executable, str(BENCHMARKS / "cost_model.py"), "--hosts", "2",
                             "--rate", "100mbit", "--nodes", "2000", "--trials", "1",
                             "--repeats", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    prefix = f"adaqp{proc.pid}"
    while not any(ns.startswith(prefix) for ns in netns_names()):
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "stopped by SIGTERM" in err, err[-2000:]
    assert not [ns for ns in netns_names() if ns.startswith(prefix)]


@pytest.mark.timeout(180)
def test_the_cost_model_checks_raw_runs_replay_to_its_table(tmp_path):
    """`benchmarks/cost_model.py --raw`: each run's line holds what its table
    is made of; its model and checks give back the table's predicted and
    measured milliseconds."""
    from pyg_adaqp.assign import CostModel, assignment_seconds

    raw = tmp_path / "raw.jsonl"
    out = subprocess.run([sys.executable, str(BENCHMARKS / "cost_model.py"), "--hosts", "2",
                          "--rate", "1gbit", "--nodes", "2000", "--trials", "1",
                          "--repeats", "1", "--widths", "16", "64", "--runs", "2",
                          "--raw", str(raw)],
                         capture_output=True, text=True, timeout=170)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    runs = [json.loads(line) for line in raw.read_text().splitlines()]
    table = [line.split("|")[1:4] for line in out.stdout.splitlines()
             if line.startswith(("| 16 |", "| 64 |"))]
    assert len(runs) == 2 and len(table) == 4 and [len(r["checks"]) for r in runs] == [2, 2]
    for (width, predicted, measured), check, run in zip(
            table, [c for r in runs for c in r["checks"]], [r for r in runs for _ in (0, 1)]):
        rows = {tuple(map(int, ch.split(","))): {int(b): n for b, n in by_bits.items()}
                for ch, by_bits in check["rows"].items()}
        share = {int(i): s for i, s in check["encode_share"].items()}
        seconds, _ = assignment_seconds(CostModel.from_state_dict(run["model"]),
                                        check["width"], rows, encode_share=share)
        assert int(width) == check["width"]
        assert float(predicted) == pytest.approx(seconds * 1e3, abs=0.006)
        assert float(measured) == pytest.approx(max(w[0] for w in check["workers"]) * 1e3,
                                                abs=0.006)
        assert run["profile"]["loaded_exchange_s"] and run["profile"]["arrived"]


@pytest.mark.timeout(180)
def test_training_across_two_hosts(tmp_path):
    """A real two-node torchrun job over the namespaces' network."""
    repo = Path(__file__).resolve().parents[1]
    with Cluster(2, "1gbit") as cluster:
        cluster.run([sys.executable, "-m", "torch.distributed.run", "--nnodes={hosts}",
                     "--node-rank={rank}", "--nproc-per-node=1", "--master-addr={master}",
                     "--master-port=29500", "-m", "pyg_adaqp.train",
                     f"hydra.run.dir={tmp_path}", "trainer.epochs=3", "trainer.progress=false",
                     "trainer.plots=false", "dataset.options.num_nodes=600",
                     "model.hidden_channels=16", "assign=uniform"],
                    timeout=150, env={"PYTHONPATH": str(repo)})
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["epochs"] == 3
    assert summary["bytes_sent_per_epoch"] > 0
    assert cluster.leftovers() == []


# --- faults on two hosts (short forms of benchmarks/faults.py) ---------------------------------

FAULT_JOB = ["trainer.progress=false", "trainer.plots=false", "dataset.options.num_nodes=2000",
             "model.hidden_channels=16", "assign=uniform", "trainer.num_threads=1"]
UNBOUNDED = float("inf")  # no clock in the run: the test's time-out stops a hung job


def fault_job(cluster, tmp_path, port, *overrides):
    from faults import Job

    return Job(cluster, list(overrides), tmp_path, port, job=FAULT_JOB)


@pytest.mark.timeout(200)
def test_a_link_down_for_a_few_seconds_is_survived(tmp_path):
    with Cluster(2, "1gbit") as cluster:
        job = fault_job(cluster, tmp_path, 29611, "trainer.epochs=8", "trainer.timeout_s=30")
        back = []

        def link_up_after(seconds):
            if not back and seconds >= 3:
                cluster.set_link(1, True)
                back.append(seconds)

        results = job.run(UNBOUNDED, at_epoch=2, fault=lambda: cluster.set_link(1, False),
                          then=link_up_after, check=False)
        assert back, "the link was never taken down and up while the job ran"
        assert [h.returncode for h in results] == [0, 0], results
        assert [r["epoch"] for r in job.rows()] == list(range(8))


@pytest.mark.timeout(200)
def test_a_link_down_past_the_timeout_stops_every_host_naming_the_lost_rank(tmp_path):
    with Cluster(2, "1gbit") as cluster:
        # (the time-out also bounds start-up, while rank 0 partitions: not too small)
        job = fault_job(cluster, tmp_path, 29612, "trainer.epochs=100000", "trainer.timeout_s=10")
        try:
            results = job.run(UNBOUNDED, at_epoch=2, fault=lambda: cluster.set_link(1, False),
                              check=False)
        finally:
            cluster.set_link(1, True)
        host0, host1 = results
        assert host0.returncode not in (0, None) and host1.returncode not in (0, None), results
        assert "PeerLost: lost rank 1: no heartbeat" in host0.output
        # The cut-off host cannot tell which side lost the network: it names
        # the store's host, rank 0.
        assert "PeerLost: lost rank 0: the rendezvous store at 10.213.0.1:29612" in host1.output


@pytest.mark.timeout(200)
def test_a_killed_host_stops_the_others_naming_it(tmp_path):
    with Cluster(2, "1gbit") as cluster:
        job = fault_job(cluster, tmp_path, 29613, "trainer.epochs=100000",
                        "trainer.timeout_s=10")
        host0, host1 = job.run(UNBOUNDED, at_epoch=2, fault=lambda: cluster.kill_host(1),
                               check=False)
        assert host0.returncode not in (0, None), host0.output[-3000:]
        assert "PeerLost: lost rank 1: no heartbeat" in host0.output
