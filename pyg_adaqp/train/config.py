"""Structured configuration of a training run (validated Hydra dataclasses).

Every field is documented and checked in ``__post_init__``, so a bad value
fails at start-up with a message that names the field.  The YAML files under
``conf/`` select and override these defaults; :func:`register_configs` puts
the schemas into Hydra's ``ConfigStore`` so the YAML is validated against
them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore

MODES = ("vanilla", "adaqp", "adaqp_q", "adaqp_p")
SCHEMES = ("uniform", "random", "adaptive")
MODELS = ("gcn", "sage")
BITS = (2, 4, 8)


class ConfigError(ValueError):
    """A config value is out of range or does not fit the dataset; the message names the field."""


def _check(ok: bool, field_name: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"config field {field_name!r}: {message}")


@dataclass
class DatasetConfig:
    """Which graph to train on."""
    name: str = "synthetic"            #: dataset name for ``load_dataset``
    root: Optional[str] = None         #: folder with the raw files (offline loading)
    options: dict[str, Any] = field(default_factory=dict)  #: extra ``load_dataset`` options

    def __post_init__(self) -> None:
        from pyg_adaqp.data import DATASET_NAMES
        _check(self.name.lower() in DATASET_NAMES, "dataset.name",
               f"unknown dataset {self.name!r}; known: {', '.join(DATASET_NAMES)}")


@dataclass
class ModelConfig:
    """The GNN: a stack of distributed convolutions."""
    name: str = "gcn"                  #: ``gcn`` (DistGCNConv) or ``sage`` (DistSAGEConv)
    num_layers: int = 3                #: number of convolutions
    hidden_channels: int = 256         #: width of the hidden layers
    dropout: float = 0.5               #: dropout between layers
    layer_norm: bool = True            #: LayerNorm before each hidden ReLU

    def __post_init__(self) -> None:
        _check(self.name in MODELS, "model.name", f"must be one of {MODELS}, got {self.name!r}")
        _check(self.num_layers >= 1, "model.num_layers", f"must be >= 1, got {self.num_layers}")
        _check(self.hidden_channels >= 1, "model.hidden_channels",
               f"must be >= 1, got {self.hidden_channels}")
        _check(0.0 <= self.dropout < 1.0, "model.dropout", f"must be in [0, 1), got {self.dropout}")


@dataclass
class ModeConfig:
    """How messages travel (SPEC 7b): quantized or not, overlapped or not."""
    name: str = "adaqp"                #: ``vanilla``, ``adaqp``, ``adaqp_q`` or ``adaqp_p``
    quantize: bool = True              #: quantize training exchanges
    overlap: bool = True               #: aggregate owned rows while halo rows travel
    cache_input: bool = True           #: aggregate the input features once (layer 0), not every epoch

    def __post_init__(self) -> None:
        _check(self.name in MODES, "mode.name", f"must be one of {MODES}, got {self.name!r}")


@dataclass
class AssignConfig:
    """Bit widths of quantized messages."""
    scheme: str = "adaptive"           #: ``adaptive``, ``uniform`` (all at ``bits``) or ``random``
    bits: int = 8                      #: uniform: every row's width; adaptive: epoch 0's
    cycle: int = 10                    #: epochs between re-assignments (random: redraw)
    group_size: int = 100              #: adaptive: messages of one channel sharing a width
    #: adaptive: the fastest widths whose quantization noise stays within this
    #: fraction of the power of the layer's aggregated output, as the weight
    #: applied next, if any, sees it (dist_graph.signal_power), per forward
    #: exchange (0.03: about -15 dB); null uses the paper's weighted sum with
    #: ``coe_lambda`` for every exchange
    variance_budget: Optional[float] = 0.03
    #: adaptive: the same for the backward exchanges, as a fraction of the power
    #: of the layer's input gradient (0.1: -10 dB); null: ``variance_budget``
    gradient_budget: Optional[float] = 0.1
    coe_lambda: float = 0.5            #: adaptive, without a budget: weight of variance against time

    def __post_init__(self) -> None:
        _check(self.scheme in SCHEMES, "assign.scheme",
               f"must be one of {SCHEMES}, got {self.scheme!r}")
        _check(self.bits in BITS, "assign.bits", f"must be one of {BITS}, got {self.bits}")
        _check(self.cycle >= 1, "assign.cycle", f"must be >= 1, got {self.cycle}")
        _check(self.group_size >= 1, "assign.group_size", f"must be >= 1, got {self.group_size}")
        _check(0.0 <= self.coe_lambda <= 1.0, "assign.coe_lambda",
               f"must be in [0, 1], got {self.coe_lambda}")
        for name in ("variance_budget", "gradient_budget"):
            budget = getattr(self, name)
            _check(budget is None or budget >= 0.0, f"assign.{name}",
                   f"must be >= 0 or null, got {budget}")


@dataclass
class TrainerConfig:
    """The training loop."""
    epochs: int = 60                   #: training epochs
    lr: float = 0.01                   #: Adam learning rate
    weight_decay: float = 0.0          #: Adam weight decay
    eval_every: int = 5                #: evaluate (full precision) every this many epochs, and last
    target_val: Optional[float] = None  #: report the training time to reach this val metric
    checkpoint_every: int = 0          #: write a checkpoint every this many epochs (0: never)
    resume: Optional[str] = None       #: checkpoint file, or directory (newest valid one), to resume
    timeout_s: float = 120.0           #: bound on every collective and on joining the job
    startup_timeout_s: float = 3600.0  #: torchrun: how long ranks wait for rank 0's partition
    num_threads: Optional[int] = None  #: torch threads per worker (null: usable CPUs / local workers)
    progress: bool = True              #: progress bar on rank 0
    plots: bool = True                 #: write PNG plots at the end

    def __post_init__(self) -> None:
        _check(self.epochs >= 1, "trainer.epochs", f"must be >= 1, got {self.epochs}")
        _check(self.lr > 0, "trainer.lr", f"must be > 0, got {self.lr}")
        _check(self.weight_decay >= 0, "trainer.weight_decay",
               f"must be >= 0, got {self.weight_decay}")
        _check(self.eval_every >= 1, "trainer.eval_every", f"must be >= 1, got {self.eval_every}")
        _check(self.target_val is None or 0.0 <= self.target_val <= 1.0, "trainer.target_val",
               f"must be in [0, 1] (an accuracy or F1), got {self.target_val}")
        _check(self.timeout_s > 0, "trainer.timeout_s", f"must be > 0, got {self.timeout_s}")
        _check(self.startup_timeout_s > 0, "trainer.startup_timeout_s",
               f"must be > 0, got {self.startup_timeout_s}")
        _check(self.checkpoint_every >= 0, "trainer.checkpoint_every",
               f"must be >= 0, got {self.checkpoint_every}")
        _check(self.num_threads is None or self.num_threads >= 1, "trainer.num_threads",
               f"must be >= 1, got {self.num_threads}")


@dataclass
class Config:
    """A whole run."""
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    mode: ModeConfig = field(default_factory=ModeConfig)
    assign: AssignConfig = field(default_factory=AssignConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    world_size: int = 2                #: local workers to start (ignored under torchrun)
    device: str = "cpu"                #: ``cpu`` or ``cuda``
    seed: int = 0                      #: seeds the model, partitioning and quantization noise
    partition_dir: Optional[str] = None  #: where parts are written/read (default: a cache by dataset key)

    def __post_init__(self) -> None:
        _check(self.world_size >= 1, "world_size", f"must be >= 1, got {self.world_size}")
        _check(self.device in ("cpu", "cuda"), "device",
               f"must be 'cpu' or 'cuda', got {self.device!r}")


def register_configs() -> None:
    """Registers the schema with Hydra's ConfigStore.

    ``conf/config.yaml`` lists ``config_schema`` first in its defaults, so
    every YAML value and command-line override is type-checked against
    :class:`Config`; the range checks run in ``__post_init__`` when the
    trainer turns the composed config into these dataclasses.
    """
    ConfigStore.instance().store(name="config_schema", node=Config)
