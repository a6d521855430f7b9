"""Partitions a training run's dataset once, before a multi-machine ``torchrun`` job.

.. code-block:: bash

    python examples/partition.py OUT_DIR NUM_PARTS [overrides ...]
    python examples/partition.py /shared/parts 4 dataset=cora dataset.root=../shared/data

It takes the same Hydra overrides as ``python -m pyg_adaqp.train`` and
partitions the graph that the run would load (same dataset, options and
``seed``) with :func:`~pyg_adaqp.partition.partition_graph` into `OUT_DIR`.
Rank 0 of the job checks the manifest against exactly these (graph
fingerprint, number of parts, seed) and partitions anew only when one differs,
so pass the run the same overrides, ``partition_dir=OUT_DIR`` and a
``torchrun`` world of `NUM_PARTS` processes.  See ``torchrun_multi_machine.md``.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import pyg_adaqp
from pyg_adaqp.data import load_dataset
from pyg_adaqp.partition import partition_graph
from pyg_adaqp.train import Config, register_configs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", type=Path, help="where the parts and manifest go")
    parser.add_argument("num_parts", type=int, help="total number of workers of the job")
    parser.add_argument("overrides", nargs="*", help="the run's Hydra overrides")
    args = parser.parse_args()

    register_configs()
    conf = Path(pyg_adaqp.__file__).parent / "conf"
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        cfg: Config = OmegaConf.to_object(compose("config", overrides=args.overrides))
    d = cfg.dataset
    data = load_dataset(d.name, d.root, **d.options)
    parts = partition_graph(data, args.num_parts, seed=cfg.seed, out_dir=args.out_dir)
    for lg in parts:
        print(f"part {lg.rank}: {lg.num_owned} owned nodes, {lg.num_halo} halo rows")
    print(f"wrote {args.num_parts} parts of {d.name} to {args.out_dir}")


if __name__ == "__main__":
    main()
