#!/usr/bin/env bash
# The two RL demonstrations of README "RL fine-tuning", end to end, into OUT (default rl_demos/):
# synthetic additions, a pretrained model, PPO and GRPO with an exact-match reward, a reward model on
# preference pairs and PPO with it, and one plot of the three RL runs. Each command's output goes to
# OUT/<name>.txt; the held-out numbers are printed at the end.
#
#   dev/rl_demos.sh [OUT] [BACKEND]                  # numpy: the sizes of tests/test_rl.py
#   HEADS=4 CHANNELS=256 dev/rl_demos.sh rl_cuda cuda  # CUDA's attention kernels need head size 64 or 128
#
# Sizes (environment): DEPTH (2), CHANNELS (64), HEADS (4), PRETRAIN_STEPS (1000), PRETRAIN_LR (3e-3),
# RL_STEPS (60), RL_LR (1e-3).
set -uo pipefail
OUT=${1:-rl_demos}
BACKEND=${2:-numpy}
DEPTH=${DEPTH:-2} CHANNELS=${CHANNELS:-64} HEADS=${HEADS:-4}
PRETRAIN_STEPS=${PRETRAIN_STEPS:-1000} PRETRAIN_LR=${PRETRAIN_LR:-3e-3} RL_STEPS=${RL_STEPS:-60} RL_LR=${RL_LR:-1e-3}
D=$OUT/data
mkdir -p "$OUT"

run() {  # run NAME COMMAND...: the command's output into OUT/NAME.txt, its time and status on stdout
    local name=$1 start=$SECONDS
    shift
    "$@" > "$OUT/$name.txt" 2>&1
    local status=$?
    echo "$name: exit $status, $((SECONDS - start)) s"
    return $status
}

run data python3 dev/data/arithmetic.py --output "$D" --depth "$DEPTH" --channels "$CHANNELS" --heads "$HEADS" \
    --train-docs 60000 || exit 1
run pretrain python3 -m gpt2cu.train -e "$D/init_model.bin" -i "$D/arithmetic_train_*.bin" \
    -j "$D/arithmetic_val_*.bin" -b 32 -t 18 -x "$PRETRAIN_STEPS" -l "$PRETRAIN_LR" -u 20 -s 0 -v 0 \
    -n "$PRETRAIN_STEPS" -o "$OUT/pretrain" --backend "$BACKEND" || exit 1
POLICY=$OUT/pretrain/model_$(printf %08d "$PRETRAIN_STEPS").bin
RL=(--policy "$POLICY" --prompts "$D/prompts_train.jsonl" --eval-prompts "$D/prompts_heldout.jsonl"
    --eval-every 20 --steps "$RL_STEPS" --minibatch 32 --max-new-tokens 3 --lr "$RL_LR" --backend "$BACKEND")
# 1. verifiable reward: exact match
run ppo python3 -m gpt2cu.ppo "${RL[@]}" --reward gpt2cu.rl.rewards:arithmetic_exact_match --prompts-per-step 64 \
    --kl-coef 0.02 -o "$OUT/ppo"
run grpo python3 -m gpt2cu.ppo "${RL[@]}" --reward gpt2cu.rl.rewards:arithmetic_exact_match --algo grpo \
    --prompts-per-step 32 --group-size 4 --kl-coef 0.02 -o "$OUT/grpo"
# 2. human-feedback style: pairs whose chosen answer ends with an even digit (the hidden rule)
run reward python3 -m gpt2cu.reward --init "$POLICY" --pairs "$D/pairs_train.jsonl" \
    --val-pairs "$D/pairs_heldout.jsonl" -o "$OUT/rm.bin" --steps 60 --lr "$RL_LR" --backend "$BACKEND"
run ppo_rm python3 -m gpt2cu.ppo "${RL[@]}" --reward-model "$OUT/rm.bin" --eval-reward gpt2cu.rl.rewards:even_last_digit \
    --prompts-per-step 64 --kl-coef 0.1 --kl-target 1 --kl-horizon 640 -o "$OUT/ppo_rm"
run plot python3 -m gpt2cu.plot "$OUT/ppo" "$OUT/grpo" "$OUT/ppo_rm" -o "$OUT/rl.png"

for name in ppo grpo reward ppo_rm; do
    echo "$name: $(grep -E 'held-out (mean reward|pairwise accuracy):' "$OUT/$name.txt" | tail -1)"
done
for name in ppo grpo ppo_rm; do  # the last step's line: KL, and the three phases' tokens/s
    echo "$name: $(grep -E '^step +[0-9]+/' "$OUT/$name.txt" | tail -1)"
done
