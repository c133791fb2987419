"""RL fine-tuning on gpt2cu's models and ops: rollouts (rollout.py), rewards (rewards.py), a reward model
trained on preference pairs (reward_model.py), and PPO / GRPO (ppo.py). The command lines are
`python -m gpt2cu.reward` and `python -m gpt2cu.ppo`."""
