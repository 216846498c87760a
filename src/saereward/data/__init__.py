"""Data a run collects: labelled rollouts and residual-stream activation shards."""
