"""Settings for the Trainer speed-ups: what `from_pretrained` and `TrainingArguments` need (frozen).

Only training settings live here; the prediction cache of the evaluation after training takes its own
`CacheConfig` (`EvalConfig(cache=...)`), so every field of this object changes the trained model.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ConfigError

ATTENTION = ("auto", "flash_attention_2", "sdpa", "eager")
PRECISIONS = ("auto", "bf16", "fp16", "fp32")


@dataclass(frozen=True)
class SpeedupConfig:
    """What to turn on; `speedups.plan()` decides what the hardware really allows, with reasons.

    Args:
        attn_implementation: "auto" (flash_attention_2, else sdpa, else eager), or one of them to insist on.
        torch_compile: compile the model through the Trainer (`torch_compile_backend`, `torch_compile_mode`).
        optimizer: a `TrainingArguments.optim` name; "adamw_torch_fused" falls back to "adamw_torch" where
            fused kernels are missing.
        precision: "auto" (bf16 where supported, else fp16 on older GPUs, else fp32), or insist on one.
        tf32: allow TF32 matmuls on Ampere or newer GPUs.
        per_device_train_batch_size, per_device_eval_batch_size, gradient_accumulation_steps: batch sizes.
        num_workers: dataloader workers; None picks min(4, CPUs - 1).
        pad_to_multiple_of: pad batches to a multiple of this (None: 64 with compile, 8 on GPU, else off).
        gradient_checkpointing: trade ~20% speed for activation memory.

    Example:
        >>> SpeedupConfig(torch_compile=True, precision="bf16").optimizer
        'adamw_torch_fused'
    """

    attn_implementation: str = "auto"
    torch_compile: bool = False
    torch_compile_backend: str = "inductor"
    torch_compile_mode: str | None = None
    optimizer: str = "adamw_torch_fused"
    precision: str = "auto"
    tf32: bool = True
    per_device_train_batch_size: int = 8
    per_device_eval_batch_size: int = 8
    gradient_accumulation_steps: int = 1
    num_workers: int | None = None
    pad_to_multiple_of: int | None = None
    gradient_checkpointing: bool = False

    def __post_init__(self) -> None:
        if self.attn_implementation not in ATTENTION:
            raise ConfigError(
                f"attn_implementation={self.attn_implementation!r} is not one of: {', '.join(ATTENTION)}."
            )
        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision={self.precision!r} is not one of: {', '.join(PRECISIONS)}.")
        for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)} must be at least 1.")
