"""``python -m pyg_adaqp.partition [overrides]``: partition a run's graph once.

Takes the training command's Hydra overrides (``dataset=...``,
``dataset.options...``, ``world_size=N`` parts, ``seed``, and optionally
``partition_dir=...``) and writes the partition where ``python -m
pyg_adaqp.train`` and every ``torchrun`` rank with the same overrides look
for it: by default the cache ``$PYG_ADAQP_CACHE/partitions/`` (see
:func:`~pyg_adaqp.train.launch.prepare_partitions`).  A partition already
there is reused, not redone.  It can run on a bigger machine than the
workers: copy the directory to the same path on theirs.

It prints the partition's directory, its time, and the process's peak
memory above the loaded graph, per directed edge (Linux; the peak is the
kernel's ``VmHWM``, reset once the graph is loaded).  The last line is the
same as JSON, for scripts.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import pyg_adaqp
from pyg_adaqp.partition.peak_memory import reset_peak, status_gib
from pyg_adaqp.partition.storage import PartitionError, read_manifest


def main(argv: list[str]) -> int:
    from pyg_adaqp.train.__main__ import USER_ERRORS
    from pyg_adaqp.train.config import Config, register_configs
    from pyg_adaqp.train.launch import prepare_partitions

    register_configs()
    conf = Path(pyg_adaqp.__file__).parent / "conf"
    stats: dict = {}

    def loaded(data) -> None:
        stats.update(nodes=int(data.num_nodes), edges=int(data.edge_index.size(1)),
                     load_s=time.perf_counter() - t0, loaded_rss_gib=status_gib("VmRSS"))
        stats["peak_measured"] = reset_peak()
        stats["partition_start"] = time.perf_counter()

    try:
        with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
            cfg: Config = OmegaConf.to_object(compose("config", overrides=argv))
        t0 = time.perf_counter()
        part_dir = prepare_partitions(cfg, cfg.world_size, on_loaded=loaded)
    except USER_ERRORS as err:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 1
    manifest = read_manifest(part_dir)
    out = {"dir": str(part_dir), "dataset_key": manifest["dataset_key"],
           "parts": manifest["num_parts"], "seed": manifest["seed"],
           "reused": "partition_start" not in stats}
    if not out["reused"]:
        out["partition_s"] = time.perf_counter() - stats.pop("partition_start")
        measured = stats.pop("peak_measured")
        out.update(stats)
        peak = status_gib("VmHWM")
        if measured and peak is not None and stats["loaded_rss_gib"] is not None:
            out["peak_rss_gib"] = peak
            out["bytes_per_edge"] = (peak - stats["loaded_rss_gib"]) * 2**30 / max(1, stats["edges"])
        print(f"partitioned {out['nodes']:,} nodes and {out['edges']:,} directed edges into "
              f"{out['parts']} parts in {out['partition_s']:.1f} s (loading took "
              f"{out['load_s']:.1f} s)")
        if "bytes_per_edge" in out:
            print(f"peak memory {out['peak_rss_gib']:.2f} GiB, "
                  f"{out['peak_rss_gib'] - out['loaded_rss_gib']:.2f} GiB above the loaded graph: "
                  f"{out['bytes_per_edge']:.1f} bytes per edge")
    else:
        print("a matching partition is already there (dataset key, parts and seed): reused")
    print(f"partition: {part_dir}")
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except PartitionError as err:  # a damaged manifest read after partitioning
        print(f"error: {err}", file=sys.stderr, flush=True)
        sys.exit(1)
