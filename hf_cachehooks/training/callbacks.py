"""`SpeedupCallback`: check at `on_train_begin` what really took effect, then measure steady-state speed.

It logs one table (main process only): each planned speed-up against what the Accelerator, the model,
the optimizer and torch report, with a warning naming the fix for anything asked for but not in effect.
Throughput excludes warm-up steps (compilation happens there), unlike the Trainer's own
`train_samples_per_second`; it goes into the Trainer's log history and a JSON file at the end.
"""

from __future__ import annotations

import logging
import statistics
import time
from pathlib import Path
from typing import Any

import orjson

from .speedups import SpeedupPlan

log = logging.getLogger(__name__)

try:  # the callback base class; without transformers the module still imports (for docs and tests)
    from transformers import TrainerCallback
except ImportError:  # pragma: no cover
    TrainerCallback = object  # type: ignore[misc,assignment]


def _unwrap_optimizer(optimizer: Any) -> Any:
    return getattr(optimizer, "optimizer", optimizer)  # accelerate wraps it


def _compiled(model: Any) -> bool:
    import torch

    if isinstance(model, torch._dynamo.eval_frame.OptimizedModule):
        return True
    return any(getattr(m, "_compiled_call_impl", None) is not None for m in model.modules())


def _graph_count() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def observe(model: Any, optimizer: Any, args: Any, train_dataloader: Any) -> dict[str, Any]:
    """What is really in effect right now, read from the objects themselves."""
    import torch

    try:
        from accelerate.state import AcceleratorState

        precision = AcceleratorState().mixed_precision
        dynamo = str(AcceleratorState().dynamo_plugin.backend)
    except (ImportError, ValueError, AttributeError):
        precision, dynamo = ("bf16" if args.bf16 else "fp16" if args.fp16 else "no"), "unknown"
    defaults = getattr(_unwrap_optimizer(optimizer), "defaults", {}) if optimizer is not None else {}
    checkpointing = getattr(model, "is_activation_checkpointing", None)  # transformers 5.x name
    if checkpointing is None:
        checkpointing = getattr(model, "is_gradient_checkpointing", False)
    return {
        "precision": {"no": "fp32"}.get(str(precision), str(precision)),
        "tf32": torch.backends.cuda.matmul.allow_tf32 if torch.cuda.is_available() else False,
        "attn_implementation": getattr(getattr(model, "config", None), "_attn_implementation", None),
        "torch_compile": _compiled(model) or dynamo not in ("NO", "DynamoBackend.NO", "unknown"),
        "optimizer": "adamw_torch_fused" if defaults.get("fused") else type(_unwrap_optimizer(optimizer)).__name__
        if optimizer is not None else None,
        "dataloader_num_workers": getattr(train_dataloader, "num_workers", None),
        "gradient_checkpointing": bool(checkpointing),
    }


_FIXES = {
    "precision": "pass plan.training_args_kwargs() to TrainingArguments (bf16/fp16 cannot change after "
                 "Trainer.__init__)",
    "torch_compile": "pass plan.training_args_kwargs() to TrainingArguments (torch_compile is read when the "
                     "Trainer builds its Accelerator)",
    "optimizer": "set TrainingArguments(optim=...) before the Trainer creates its optimizer",
    "attn_implementation": "load the model with speedups.load_model() or from_pretrained(**plan.model_kwargs())",
    "dataloader_num_workers": "set TrainingArguments(dataloader_num_workers=...) before training starts",
    "gradient_checkpointing": "set TrainingArguments(activation_checkpointing=True)",
    "tf32": "set TrainingArguments(tf32=True) on an Ampere or newer GPU",
}


class SpeedupCallback(TrainerCallback):  # type: ignore[misc,valid-type]
    """Verify the plan at train start, count recompiles, report warm-up-free throughput.

    Args:
        plan: the `SpeedupPlan` the model and TrainingArguments were built from.
        warmup_steps: steps left out of the throughput figures (compilation, allocator warm-up).
        report_path: JSON report (default `<output_dir>/speedups_report.json`).
    """

    def __init__(self, plan: SpeedupPlan, warmup_steps: int = 3, report_path: str | Path | None = None) -> None:
        self.plan = plan
        self.warmup_steps = warmup_steps
        self.report_path = report_path
        self.observed: dict[str, Any] = {}
        self.mismatches: list[str] = []
        self.step_times: list[float] = []
        self.step_tokens: list[int] = []
        self._t0 = 0.0
        self._tokens0 = 0
        self._graphs0 = 0
        self.recompiles = 0

    def on_train_begin(self, args, state, control, model=None, optimizer=None, train_dataloader=None, **kwargs):
        self.observed = observe(model, optimizer, args, train_dataloader)
        self._graphs0 = _graph_count()
        rows = []
        for decision in self.plan.decisions:
            actual = self.observed.get(decision.setting, "n/a")
            planned = decision.chosen
            ok = _matches(decision.setting, planned, actual)
            if not ok:
                message = (f"{decision.setting}: planned {planned!r} but {actual!r} is in effect; fix: "
                           f"{_FIXES.get(decision.setting, 'see the plan table')}")
                self.mismatches.append(message)
            rows.append((decision.setting, str(planned), str(actual), "✓" if ok else "✗", decision.reason))
        if self.plan.config.gradient_checkpointing and self.observed["torch_compile"] and getattr(model, "peft_config",
                                                                                                   None):
            self.mismatches.append("PEFT + gradient checkpointing + torch.compile: expect graph breaks from "
                                   "requires_grad_() (3 graphs / 5 breaks measured on CPU); consider compile off")
        if state.is_world_process_zero:
            width = max(len(r[0]) for r in rows)
            lines = [f"{'setting':<{width}}  {'planned':<18} {'in effect':<18}    why"]
            lines += [f"{s:<{width}}  {p:<18} {a:<18} {m}  {why}" for s, p, a, m, why in rows]
            log.info("Speed-ups in effect:\n%s", "\n".join(lines))
            for message in self.mismatches:
                log.warning(message)

    def on_step_begin(self, args, state, control, **kwargs):
        self._t0 = time.perf_counter()
        self._tokens0 = state.num_input_tokens_seen

    def on_step_end(self, args, state, control, **kwargs):
        _synchronize()
        self.step_times.append(time.perf_counter() - self._t0)
        self.step_tokens.append(state.num_input_tokens_seen - self._tokens0)
        self.recompiles = max(0, _graph_count() - self._graphs0 - 1) if self.observed.get("torch_compile") else 0

    def throughput(self, args: Any) -> dict[str, Any]:
        """Steady-state figures: median step time and rates over the steps after warm-up."""
        steady = self.step_times[self.warmup_steps :]
        tokens = self.step_tokens[self.warmup_steps :]
        if not steady:
            return {"steady_steps": 0, "note": f"fewer than {self.warmup_steps + 1} steps; no steady state"}
        seconds = sum(steady)
        samples = args.per_device_train_batch_size * args.gradient_accumulation_steps * max(1, args.world_size)
        return {
            "steady_steps": len(steady), "warmup_steps_excluded": self.warmup_steps,
            "median_step_seconds": statistics.median(steady),
            "samples_per_second": samples * len(steady) / seconds,
            "tokens_per_second": sum(tokens) / seconds if sum(tokens) else None,
            "recompiles": self.recompiles,
        }

    def on_train_end(self, args, state, control, **kwargs):
        report = {"device": self.plan.device.name, "throughput": self.throughput(args),
                  "planned": [d.__dict__ for d in self.plan.decisions], "observed": self.observed,
                  "mismatches": self.mismatches, "attention_used": self.plan.attention_used, "notes": self.plan.notes}
        entry = {f"speedups/{k}": v for k, v in report["throughput"].items()}
        state.log_history.append({**entry, "step": state.global_step})
        if state.is_world_process_zero:
            path = Path(self.report_path or Path(args.output_dir) / "speedups_report.json")
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2, default=str))
            t = report["throughput"]
            if t.get("steady_steps"):
                log.info("Steady-state (after %d warm-up steps): %.3f s/step, %.1f samples/s, %s tokens/s, "
                         "%d recompiles -> %s", self.warmup_steps, t["median_step_seconds"], t["samples_per_second"],
                         f"{t['tokens_per_second']:.0f}" if t["tokens_per_second"] else "n/a", t["recompiles"], path)


def _matches(setting: str, planned: Any, actual: Any) -> bool:
    if actual == "n/a":
        return True
    if setting == "optimizer":
        return (planned == "adamw_torch_fused") == (actual == "adamw_torch_fused")
    return planned == actual


def _synchronize() -> None:
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.synchronize()
    except ImportError:
        pass
