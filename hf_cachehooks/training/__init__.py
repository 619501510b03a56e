"""Trainer speed-ups: settings, device capabilities, the plan, and the verifying callback."""
