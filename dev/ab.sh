#!/usr/bin/env bash
# A/B of two source trees on one machine: each installed on its own (pip --target, never editable), then a command
# run from each tree in turn, ABBA order, so drift between the first and the second run of a pair cancels.
#
#   dev/ab.sh A B ROUNDS COMMAND...      A, B: a git revision (where git works), a .tar from `git archive`, or a
#                                        directory holding a source tree
#   e.g. dev/ab.sh base.tar . 2 python3 bench/bench_train.py --batch-sizes 64 --recompute 0 --steps 20 --skip-torch
#
# Why not an editable install for one side: its import hook comes before PYTHONPATH, so every process would import
# that tree (docs/perf.md, ninth session). Each side runs in its own copy with PYTHONSAFEPATH=1, so the copy's
# source package (which has no compiled extension) stays off sys.path, in subprocesses too. Lines of output are
# prefixed with the side. GPT2CU_CUDA_ARCHS is passed to the builds; AB_DIR (default a new temporary directory)
# holds the copies and their installs.
set -euo pipefail
if [ $# -lt 4 ]; then
  echo "usage: dev/ab.sh A B ROUNDS COMMAND..." >&2
  exit 2
fi
a=$1 b=$2 rounds=$3
shift 3
if python3 -m pip show gpt2cu 2>/dev/null | grep -q "^Editable project location"; then
  echo "dev/ab.sh: gpt2cu is installed editable here; its import hook would shadow both sides (pip uninstall gpt2cu)" >&2
  exit 2
fi
root=${AB_DIR:-$(mktemp -d)}
unpack() {  # unpack SOURCE DIR: the source tree SOURCE into DIR
  local src=$1 dir=$2
  mkdir -p "$dir"
  if [ -d "$src" ]; then
    (cd "$src" && tar cf - --exclude=.git --exclude=build --exclude=_skbuild .) | tar xf - -C "$dir"
  elif [ -f "$src" ]; then
    tar xf "$src" -C "$dir"
  else
    git archive "$src" | tar xf - -C "$dir"
  fi
}
pids=()
for side in A B; do
  src=$a; [ $side = B ] && src=$b
  unpack "$src" "$root/$side"
  (cd "$root/$side" && python3 -m pip install -q --no-deps --no-build-isolation --target "$root/$side.site" . \
     > "$root/$side.build.log" 2>&1) &
  pids+=($!)
done
for i in 0 1; do
  side=$([ $i = 0 ] && echo A || echo B)
  wait "${pids[$i]}" || { echo "dev/ab.sh: building side $side failed: $root/$side.build.log" >&2; exit 1; }
done
run() {  # run SIDE: the command from that side's copy, with its install first on the path
  local side=$1
  shift
  (cd "$root/$side" && PYTHONSAFEPATH=1 PYTHONPATH="$root/$side.site${PYTHONPATH:+:$PYTHONPATH}" "$@" 2>&1 |
     sed "s/^/$side: /")
}
for ((r = 0; r < rounds; r++)); do
  if ((r % 2 == 0)); then order="A B"; else order="B A"; fi
  for side in $order; do run "$side" "$@"; done
done
