"""Stage gates: statistical checks with confidence intervals that a signal is worth the next stage."""
