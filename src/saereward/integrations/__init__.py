"""Adapters for the RL frameworks researchers already run."""
