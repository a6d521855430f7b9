"""``python -m pyg_adaqp.train [overrides]`` (also installed as ``adaqp-train``).

Composes the Hydra config in ``conf/``, validates it, and hands it to the
launcher, which starts ``world_size`` local workers (or joins a ``torchrun``
job) and writes everything to Hydra's run directory.

An error the user can act on (a bad config value, a missing or failed
dataset, a partition or checkpoint that does not fit, a failed worker) is
printed as ``error: <message>`` alone, with exit code 1; set
``HYDRA_FULL_ERROR=1`` for the traceback.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from pyg_adaqp.data import DatasetDownloadError, DatasetError
from pyg_adaqp.partition import PartitionError
from pyg_adaqp.train.checkpoint import CheckpointError
from pyg_adaqp.train.config import Config, ConfigError, register_configs
from pyg_adaqp.train.launch import launch
from pyg_adaqp.train.workers import WorkerFailed

register_configs()

#: Errors whose message says what to do (FileNotFoundError: raw files missing
#: from dataset.root, or a resume or partition path that does not exist).
USER_ERRORS = (ConfigError, DatasetError, DatasetDownloadError, FileNotFoundError,
               PartitionError, CheckpointError, WorkerFailed)


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> None:
    try:
        config: Config = OmegaConf.to_object(cfg)  # runs every dataclass's checks
        launch(config, Path(HydraConfig.get().runtime.output_dir))
    except USER_ERRORS as err:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print(f"error: {err}", file=sys.stderr, flush=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
