"""Training: Hydra config, launcher, the worker loop and its reports."""
from pyg_adaqp.train.config import Config, ConfigError, register_configs
from pyg_adaqp.train.launch import launch
from pyg_adaqp.train.liveness import PeerLost
from pyg_adaqp.train.model import DistGNN
from pyg_adaqp.train.workers import WorkerFailed, run_workers

__all__ = ["Config", "ConfigError", "DistGNN", "PeerLost", "WorkerFailed", "launch", "register_configs",
           "run_workers"]
