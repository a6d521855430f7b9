#!/usr/bin/env bash
# A Hydra multirun sweep over {vanilla, adaqp} x {gcn, sage}, then one
# markdown table of the four runs: throughput and bytes per epoch as ratios to
# the vanilla run of the same model, and the test accuracy difference.
#
#   bash examples/sweep.sh       # 20 epochs, into multirun/sweep-<time>/ (~70 s on 2 CPU cores)
#   SWEEP_DIR=/tmp/sweep EPOCHS=2 bash examples/sweep.sh dataset.options.num_nodes=2000
#
# Arguments are further Hydra overrides for every run, e.g. world_size=4,
# assign.bits=4, or dataset=cora dataset.root=../shared/data.  The runs go one
# after another (Hydra's basic launcher), each in $SWEEP_DIR/<job>_<overrides>/,
# and share one partition (the first run makes it in the partition cache, the
# others reuse it), so every mode is measured on the same parts.
# The table is printed and kept in $SWEEP_DIR/table.md; re-tabulate any time:
#   python -m pyg_adaqp.train.tabulate "$SWEEP_DIR" --sort throughput --reverse
set -euo pipefail

SWEEP_DIR="${SWEEP_DIR:-multirun/sweep-$(date +%Y-%m-%d_%H-%M-%S)}"
EPOCHS="${EPOCHS:-20}"
PYTHON="${PYTHON:-python}"

"$PYTHON" -m pyg_adaqp.train -m mode=vanilla,adaqp model=gcn,sage "trainer.epochs=$EPOCHS" \
    "hydra.sweep.dir=$SWEEP_DIR" "$@"
"$PYTHON" -m pyg_adaqp.train.tabulate "$SWEEP_DIR" | tee "$SWEEP_DIR/table.md"
