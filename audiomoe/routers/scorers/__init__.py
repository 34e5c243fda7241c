"""Scorers: what a router looks at (learned gates, data-independent tables, ablation baselines)."""
