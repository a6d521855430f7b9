"""Training: Hydra config, launcher, the worker loop and its reports."""
from pyg_adaqp.train.config import Config, register_configs
from pyg_adaqp.train.launch import WorkerFailed, launch
from pyg_adaqp.train.model import DistGNN

__all__ = ["Config", "DistGNN", "WorkerFailed", "launch", "register_configs"]
