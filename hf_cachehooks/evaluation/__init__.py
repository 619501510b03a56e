"""`evaluate_model` and the prediction cache: settings, metrics, run entries and per-example shards."""
