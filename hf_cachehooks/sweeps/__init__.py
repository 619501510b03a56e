"""Sweeps that compose the features: best-of-K / pass@k from one cached sample set (`k_sweep`)."""
