#!/usr/bin/env bash
# GPT-2 124M on FineWeb 10B: llm.c's recipe (d12, 0.5M-token batches, 18865 steps = 10B tokens, lr 6e-4
# with 700 warmup steps decaying to 0, weight decay 0.1, ZeRO-1), on every GPU of this host.
#   prepare data:  python dev/data/fineweb.py -v 10B          (writes dev/data/fineweb10B/)
#   run:           scripts/run_gpt2_124M.sh                    (NGPU=N to choose how many GPUs)
# Without the FineWeb shards it trains one epoch of the embedded default corpus with the same model and
# batch, so the script can be tried anywhere.
set -euo pipefail
cd "$(dirname "$0")/.."

NGPU=${NGPU:-$(nvidia-smi -L 2>/dev/null | wc -l)}
NGPU=$(( NGPU > 0 ? NGPU : 1 ))
OUT=${OUT:-log124M}
DATA=${DATA:-dev/data/fineweb10B}
# per-GPU micro-batch: 64 x 1024 fits an 80 GB GPU with GeLU recompute; smaller GPUs: B=16 or 32
B=${B:-64}

if compgen -G "$DATA/fineweb_train_*.bin" >/dev/null && compgen -G "$DATA/fineweb_val_*.bin" >/dev/null; then
    data_flags=(-i "$DATA/fineweb_train_*.bin" -j "$DATA/fineweb_val_*.bin" -x 18865 -u 700 -v 250 -n 5000)
else
    echo "note: no FineWeb shards under $DATA (python dev/data/fineweb.py -v 10B makes them);" \
         "training one epoch of the embedded default corpus instead" >&2
    data_flags=(-x -1 -u 10 -v 20 -n 0)
fi
hellaswag=0
[ -f dev/data/hellaswag/hellaswag_val.bin ] && hellaswag=1

launch=()
if [ "$NGPU" -gt 1 ]; then
    launch=(mpirun -np "$NGPU" --bind-to none -x NCCL_NVLS_ENABLE=0)
    [ "$(id -u)" = 0 ] && launch+=(--allow-run-as-root)
    # one host: Open MPI needs no remote shell, but refuses to start when none is installed
    command -v ssh >/dev/null || command -v rsh >/dev/null || export OMPI_MCA_plm_rsh_agent=false
fi
export NCCL_NVLS_ENABLE=0  # NVLink multicast stays off

exec "${launch[@]}" python3 -m gpt2cu.train --backend cuda \
    "${data_flags[@]}" -o "$OUT" -e d12 -b "$B" -t 1024 -d 524288 \
    -r 1 -z 1 -c 0.1 -l 0.0006 -q 0.0 -s 20000 -h "$hellaswag" -y 1 -nk 2 "$@"
