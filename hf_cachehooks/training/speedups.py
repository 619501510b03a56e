"""The pre-construction helper: decide the speed-ups once, before the model and the Trainer exist.

A `TrainerCallback` cannot turn on bf16, `torch.compile` or change the batch size after
`Trainer.__init__` (transformers silently ignores them there), so `plan()` produces the kwargs for
`from_pretrained` and `TrainingArguments`, and `SpeedupCallback` checks later what really took effect.

    plan = speedups.plan(SpeedupConfig(torch_compile=True))
    model = speedups.load_model("path/or/name", plan)             # FA2 -> SDPA -> eager, reasons logged
    args = TrainingArguments("out", **plan.training_args_kwargs())
    trainer = Trainer(model, args, ..., callbacks=[SpeedupCallback(plan)])
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from .._models.loading import attention_ladder, load_weights
from .capabilities import Availability, Decision, decide, decisions_table, probe_availability
from .config import SpeedupConfig
from .devices import Device, detect_device

log = logging.getLogger(__name__)


@dataclass
class SpeedupPlan:
    """What will be turned on, and why the rest is not. `attention_used` is filled by `load_model`."""

    config: SpeedupConfig
    device: Device
    available: Availability
    decisions: list[Decision]
    attention_used: str | None = None
    notes: list[str] = field(default_factory=list)

    def decision(self, setting: str) -> Decision:
        """The decision for one `SpeedupConfig` field, e.g. "torch_compile"."""
        return next(d for d in self.decisions if d.setting == setting)

    def chosen(self, setting: str) -> Any:
        return self.decision(setting).chosen

    def model_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for `from_pretrained` (weights stay fp32; mixed precision does the rest)."""
        return {"attn_implementation": self.chosen("attn_implementation")}

    def training_args_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for `TrainingArguments(output_dir, **kwargs)`."""
        precision = self.chosen("precision")
        kwargs: dict[str, Any] = {
            "bf16": precision == "bf16",
            "fp16": precision == "fp16",
            "optim": self.chosen("optimizer"),
            "dataloader_num_workers": self.chosen("dataloader_num_workers"),
            "per_device_train_batch_size": self.config.per_device_train_batch_size,
            "per_device_eval_batch_size": self.config.per_device_eval_batch_size,
            "gradient_accumulation_steps": self.config.gradient_accumulation_steps,
            "include_num_input_tokens_seen": "non_padding",  # so throughput can be counted in tokens
        }
        if self.chosen("tf32"):
            kwargs["tf32"] = True
        if self.chosen("torch_compile"):
            kwargs.update(torch_compile=True, torch_compile_backend=self.config.torch_compile_backend)
            if self.config.torch_compile_mode:
                kwargs["torch_compile_mode"] = self.config.torch_compile_mode
        if self.chosen("gradient_checkpointing"):
            kwargs["activation_checkpointing"] = True
        if self.device.kind == "cpu":
            kwargs["use_cpu"] = True
        return kwargs

    def data_collator(self, tokenizer: Any, mlm: bool = False) -> Any:
        """A language-modelling collator that pads to `pad_to_multiple_of` (fixed shapes: no recompiles)."""
        from transformers import DataCollatorForLanguageModeling

        return DataCollatorForLanguageModeling(tokenizer, mlm=mlm, pad_to_multiple_of=self.chosen("pad_to_multiple_of"))

    def table(self) -> str:
        return decisions_table(self.decisions)


def plan(
    config: SpeedupConfig | None = None,
    device: Device | None = None,
    available: Availability | None = None,
    announce: bool = True,
) -> SpeedupPlan:
    """Decide every speed-up for this machine (or a described one) and log the table once.

    Args:
        config: what to turn on; defaults to everything the hardware allows.
        device, available: override detection (tests, docs); by default the real machine is probed,
            flash-attention included (a real kernel call, not just an import).
        announce: log the table at INFO (False: DEBUG, for `SpeedupCallback`, which logs its own table).
    """
    config = config or SpeedupConfig()
    device = device or detect_device()
    available = available or probe_availability(device)
    result = SpeedupPlan(config, device, available, decide(config, device, available))
    log.log(logging.INFO if announce else logging.DEBUG, "Speed-up plan for %s:\n%s", device.name, result.table())
    return result


def load_model(name_or_path: str, speedup: SpeedupPlan, head: str = "causal", **kwargs: Any) -> Any:
    """The model alone, with the planned attention, stepping down FA2 -> SDPA -> eager on failure.

    A thin call into the package's one loader (`attn_implementation` is the planned rung and every rung
    below it). Each failed rung is logged and noted in `speedup.notes` with its reason;
    `speedup.attention_used` records the one that loaded. Weights load in float32 unless `dtype=` says
    otherwise (mixed precision does the rest).
    """

    def failed(rung: str, reason: str) -> None:
        speedup.notes.append(f"{rung} failed: {reason}")

    model = load_weights(
        name_or_path,
        head=head,
        attn_implementation=attention_ladder(speedup.chosen("attn_implementation")),
        on_fallback=failed,
        **kwargs,
    )
    speedup.attention_used = getattr(model.config, "_attn_implementation", None)
    return model
