"""Reinforcement learning with mechanistic rewards: reward functions and the GRPO trainer."""
