"""The activation store (Arrow shards), its writer, probes, steering vectors, the probe workflow and its plots."""
