"""``python -m pyg_adaqp.train [overrides]`` (also installed as ``adaqp-train``).

Composes the Hydra config in ``conf/``, validates it, and hands it to the
launcher, which starts ``world_size`` local workers (or joins a ``torchrun``
job) and writes everything to Hydra's run directory.
"""
from __future__ import annotations

from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from pyg_adaqp.train.config import Config, register_configs
from pyg_adaqp.train.launch import launch

register_configs()


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> None:
    config: Config = OmegaConf.to_object(cfg)  # runs every dataclass's checks
    launch(config, Path(HydraConfig.get().runtime.output_dir))


if __name__ == "__main__":
    main()
