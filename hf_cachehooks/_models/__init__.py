"""Model access: identity, architecture layouts, loading and batches, hooks and pooling.

The only code that knows how models are built; imports only the core."""
