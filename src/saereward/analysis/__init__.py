"""What a trained policy does: task accuracy, capability suite, reward hacking, steering and SAE drift."""
