"""One worker of ``distributed_gcn.ipynb``.

Spawned processes import their target function by module name, and a
function defined in a notebook has no importable module, so the worker lives
here, next to the notebook.  It is what a user writes around their own model:
load this worker's part, train with the loss over the
worker's training nodes divided by the *global* training count, all-reduce the
gradients (so every worker keeps the same model), and all-reduce the accuracy.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from pyg_adaqp.nn import DistGraph
from pyg_adaqp.partition import load_partition

SPLITS = ("train", "val", "test")


def train_worker(rank: int, world_size: int, part_dir: str, model_cls: type, model_args: dict,
                 state: dict, epochs: int, lr: float, quantize: bool, overlap: bool
                 ) -> list[dict] | None:
    """Trains `model_cls(**model_args)`, started from `state`, on part `rank`.

    Runs inside :func:`pyg_adaqp.train.run_workers`, which has joined the
    process group.  Returns the per-epoch history on rank 0.
    """
    history = _train(rank, part_dir, model_cls, model_args, state, epochs, lr, quantize, overlap)
    return history if rank == 0 else None


def _train(rank: int, part_dir: str, model_cls: type, model_args: dict, state: dict,
           epochs: int, lr: float, quantize: bool, overlap: bool) -> list[dict]:
    lg = load_partition(part_dir, rank, num_parts=dist.get_world_size())
    graph = DistGraph(lg, quantize=quantize, overlap=overlap,
                      generator=torch.Generator().manual_seed(rank))  # rounding noise
    model = model_cls(**model_args)
    model.load_state_dict(state)  # every worker starts from the same model
    torch.manual_seed(1 + rank)   # but draws its own dropout masks
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    num_train = _all_reduce(lg.train_mask.sum().float())

    history = []
    for epoch in range(epochs):
        model.train()
        optimizer.zero_grad()
        out = model(lg.x, graph)  # this worker's owned rows
        loss = F.cross_entropy(out[lg.train_mask], lg.y[lg.train_mask],
                               reduction="sum") / num_train
        loss.backward()
        for p in model.parameters():  # summed gradients = the whole graph's mean loss
            dist.all_reduce(p.grad)
        optimizer.step()
        history.append({"epoch": epoch, "loss": float(_all_reduce(loss.detach())),
                        **_accuracy(model, lg, graph)})
    return history


@torch.no_grad()
def _accuracy(model: torch.nn.Module, lg, graph: DistGraph) -> dict[str, float]:
    model.eval()
    with graph.full_precision():  # evaluate with fp32 messages
        pred = model(lg.x, graph).argmax(1)
    counts = torch.tensor([[float((pred[m] == lg.y[m]).sum()), float(m.sum())]
                           for m in (getattr(lg, f"{s}_mask") for s in SPLITS)])
    counts = _all_reduce(counts)
    return {s: float(c[0] / c[1].clamp(min=1)) for s, c in zip(SPLITS, counts)}


def _all_reduce(t: torch.Tensor) -> torch.Tensor:
    t = t.clone()
    dist.all_reduce(t)
    return t
