"""Online RL inside the Ray Train worker group: PPO (fmray.rl.ppo) and GRPO (fmray.rl.grpo),
and what they share: prompts, rollouts from the policy's own weights, rewards, losses."""
