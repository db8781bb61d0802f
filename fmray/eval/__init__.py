"""Metrics on held-out data: task accuracy by greedy generation, masked eval loss."""
