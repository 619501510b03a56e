"""lm-evaluation-harness on the caches: the lm-eval model `hf-cachehooks` (`model.py`) and its request store
(`results.py`). Importing `hf_cachehooks.harness.model` registers the model with lm-eval (extra `lm-eval`)."""
