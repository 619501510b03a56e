"""`SpeedupCallback`: at `on_train_begin`, turn on what can still be turned on, report the rest, measure.

Dropped into an existing Trainer (`callbacks=[SpeedupCallback()]`), it switches the live model and
optimizer to the fastest attention, fused AdamW, TF32 and (when asked) `torch.compile`, checks after the
first step that each really ran, and undoes any that did not, with a warning. What is fixed once
`Trainer.__init__` has run (precision, batch size, workers) is reported with the fix. On the main process
it logs a table at INFO and a short summary of what it switched, which reaches stderr even where the script
configured no logging (`announce`); throughput excludes warm-up steps (compilation happens there), unlike
the Trainer's own `train_samples_per_second`, and goes into the Trainer's log history and a JSON file at the end.
"""

from __future__ import annotations

import logging
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import orjson

from . import speedups
from .config import SpeedupConfig
from .speedups import SpeedupPlan
from .switches import (
    FusedStepWatch,
    Switch,
    attention_in_effect,
    graph_count,
    is_compiled,
    switch_attention,
    switch_compile,
    switch_fused_adamw,
    switch_tf32,
    tf32_in_effect,
)

log = logging.getLogger(__name__)

try:  # the callback base class; without transformers the module still imports (for docs and tests)
    from transformers import TrainerCallback
except ImportError:  # pragma: no cover
    TrainerCallback = object  # type: ignore[misc,assignment]

CHECK_STEPS = 5  # a switch no step has shown by then (fp16 loss scaling can skip optimizer steps) stays unverified


def _unwrap_optimizer(optimizer: Any) -> Any:
    return getattr(optimizer, "optimizer", optimizer)  # accelerate wraps it


def _optimizer_name(optimizer: Any) -> str | None:
    inner = _unwrap_optimizer(optimizer)
    if inner is None:
        return None
    groups = getattr(inner, "param_groups", [])  # the flag step() reads; `defaults` keeps the constructor's value
    return "adamw_torch_fused" if groups and all(g.get("fused") for g in groups) else type(inner).__name__


def _accelerator_state(args: Any) -> tuple[str, str]:
    try:
        from accelerate.state import AcceleratorState

        return str(AcceleratorState().mixed_precision), str(AcceleratorState().dynamo_plugin.backend)
    except (ImportError, ValueError, AttributeError):
        return ("bf16" if args.bf16 else "fp16" if args.fp16 else "no"), "unknown"


def observe(model: Any, optimizer: Any, args: Any, train_dataloader: Any) -> dict[str, Any]:
    """What is really in effect right now, read from the objects themselves."""
    precision, dynamo = _accelerator_state(args)
    checkpointing = getattr(model, "is_activation_checkpointing", None)  # transformers 5.x name
    if checkpointing is None:
        checkpointing = getattr(model, "is_gradient_checkpointing", False)
    attention = sorted(attention_in_effect(model)) if model is not None else []
    return {
        "precision": {"no": "fp32"}.get(precision, precision),
        "tf32": tf32_in_effect(),
        "attn_implementation": attention[0] if len(attention) == 1 else ",".join(attention) or None,
        "torch_compile": (model is not None and is_compiled(model))
        or dynamo not in ("NO", "DynamoBackend.NO", "unknown"),
        "optimizer": _optimizer_name(optimizer),
        "dataloader_num_workers": getattr(train_dataloader, "num_workers", None),
        "gradient_checkpointing": bool(checkpointing),
        "per_device_train_batch_size": args.per_device_train_batch_size,
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
    "per_device_train_batch_size": "pass plan.training_args_kwargs() to TrainingArguments (the Trainer keeps the "
    "batch size it was built with)",
}


def _direct_fix(setting: str, planned: Any) -> str:
    """The fix for a user who planned nothing: the TrainingArguments (or loading) setting itself."""
    if setting == "attn_implementation":
        return f"load the model with from_pretrained(..., attn_implementation={planned!r})"
    if setting == "precision":
        return f"set TrainingArguments({planned}=True)" if planned in ("bf16", "fp16") else _FIXES[setting]
    name = {"optimizer": "optim"}.get(setting, setting)
    return f"set TrainingArguments({name}={planned!r})"


def _reaches_a_handler(logger: logging.Logger) -> bool:
    """True when a record of `logger` meets a handler on its way up (what `logging` checks before lastResort)."""
    current: logging.Logger | None = logger
    while current is not None:
        if current.handlers:
            return True
        current = current.parent if current.propagate else None
    return False


def announce(message: str) -> None:
    """Log `message` at INFO; where no handler is configured at all (a plain script), write it to stderr anyway.

    `logging` alone would drop it there (INFO is below its lastResort's WARNING). A configured logging setup
    decides as usual, so a script that asks for WARNING only does not get it. transformers' Trainer does the
    same through a handler of its own on its library logger.
    """
    if _reaches_a_handler(log):
        log.info(message)
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("[hf_cachehooks] %(message)s"))
        handler.handle(log.makeRecord(log.name, logging.INFO, __file__, 0, message, (), None))


def summary(switches: list[Switch], advice: list[str], report: Path) -> str:
    """One short paragraph: what the callback switched, what would be faster but it cannot change, the report."""
    done = [f"{s.setting} {s.before} → {s.after}" for s in switches if s.status == "switched"]
    lines = [f"SpeedupCallback switched {', '.join(done) if done else 'nothing (all it can change was in effect)'}."]
    lines += [f"  Not switchable now: {a}" for a in advice]
    return "\n".join(lines + [f"  Table at log level INFO; report at the end of training: {report}"])


class SpeedupCallback(TrainerCallback):  # type: ignore[misc,valid-type]
    """Turn on the speed-ups a built Trainer can still take, verify them, report warm-up-free throughput.

    Args:
        plan: nothing (plan for this machine with `SpeedupConfig()` at train start), a `SpeedupConfig`
            (e.g. `torch_compile=True`), or the `SpeedupPlan` the model and TrainingArguments were built from.
        warmup_steps: steps left out of the throughput figures (compilation, allocator warm-up).
        report_path: JSON report (default `<output_dir>/speedups_report.json`).
        switch: False only reports (the callback changes nothing).

    Example:
        >>> trainer = Trainer(model, args, train_dataset=ds, callbacks=[SpeedupCallback()])  # doctest: +SKIP
    """

    def __init__(
        self,
        plan: SpeedupPlan | SpeedupConfig | None = None,
        warmup_steps: int = 3,
        report_path: str | Path | None = None,
        switch: bool = True,
    ) -> None:
        self.plan = plan if isinstance(plan, SpeedupPlan) else None
        self._built_from_plan = self.plan is not None  # the Trainer was built from it: its batch size counts
        self.config = self.plan.config if self.plan else plan if isinstance(plan, SpeedupConfig) else SpeedupConfig()
        self.warmup_steps = warmup_steps
        self.report_path = report_path
        self.switch = switch
        self.switches: list[Switch] = []
        self.observed: dict[str, Any] = {}
        self.mismatches: list[str] = []
        self.step_times: list[float] = []
        self.step_tokens: list[int] = []
        self._t0 = 0.0
        self._tokens0 = 0
        self._graphs0 = 0
        self._steps_checked = 0
        self._users_optimizer: Any = None
        self._watch: FusedStepWatch | None = None
        self.recompiles = 0

    def on_init_end(self, args, state, control, optimizer=None, **kwargs):
        self._users_optimizer = optimizer  # set here only when passed to the Trainer; it builds its own later

    def _apply(self, plan: SpeedupPlan, model: Any, optimizer: Any, args: Any) -> None:
        precision, dynamo = _accelerator_state(args)
        dynamo = "TrainingArguments.torch_compile" if getattr(args, "torch_compile", False) else dynamo
        half = precision in ("bf16", "fp16") or str(getattr(model, "dtype", "")) in ("torch.bfloat16", "torch.float16")
        inner = _unwrap_optimizer(optimizer)
        users_own = inner is not None and (
            inner is _unwrap_optimizer(self._users_optimizer) or not _trainer_builds(args, inner)
        )
        fused, self._watch = switch_fused_adamw(optimizer, users_own)
        self.switches = [
            switch_tf32(plan),
            switch_attention(model, plan, half),
            switch_compile(model, plan, dynamo),
            fused,
        ]

    def on_train_begin(self, args, state, control, model=None, optimizer=None, train_dataloader=None, **kwargs):
        if self.plan is None:
            self.plan = speedups.plan(self.config, announce=False)
        plan = self.plan
        self.mismatches, self.step_times, self.step_tokens, self._steps_checked = [], [], [], 0  # a new train()
        if self.switch and model is not None:
            self._apply(plan, model, optimizer, args)
        self.observed = observe(model, optimizer, args, train_dataloader)
        self._graphs0 = graph_count()
        by_setting = {s.setting: s for s in self.switches}
        rows = []
        for decision in plan.decisions:
            actual = self.observed.get(decision.setting, "n/a")
            planned = decision.chosen
            switched = by_setting.get(decision.setting)
            ok = _matches(decision.setting, planned, actual)
            how = decision.reason
            if switched is not None and switched.status == "switched":
                how = "switched by the callback"
            elif not ok:
                fix = _FIXES.get(decision.setting, "see the plan table")
                if not self._built_from_plan:  # the user planned nothing: name the setting itself, not a plan
                    fix = _direct_fix(decision.setting, planned)
                if switched is not None and switched.reason:
                    fix = f"{switched.reason}; {fix}" if switched.status != "left alone" else switched.reason
                self.mismatches.append(
                    f"{decision.setting}: planned {planned!r} but {actual!r} is in effect; fix: {fix}"
                    if self._built_from_plan
                    else f"{decision.setting}: {actual!r} stays ({planned!r} would be faster here; a built "
                    f"Trainer keeps it); fix: {fix}"
                )
            rows.append((decision.setting, str(planned), str(actual), "✓" if ok else "✗", how))
        size = self.config.per_device_train_batch_size
        if self._built_from_plan and args.per_device_train_batch_size != size:
            self.mismatches.append(
                f"per_device_train_batch_size: planned {size} but "
                f"{args.per_device_train_batch_size} is in effect; fix: "
                f"{_FIXES['per_device_train_batch_size']}"
            )
        if (
            self.observed["gradient_checkpointing"]
            and self.observed["torch_compile"]
            and getattr(model, "peft_config", None)
        ):
            self.mismatches.append(
                "PEFT + gradient checkpointing + torch.compile: expect graph breaks from "
                "requires_grad_() (3 graphs / 5 breaks measured on CPU); consider compile off"
            )
        if state.is_world_process_zero:
            width = max(len(r[0]) for r in rows)
            lines = [f"{'setting':<{width}}  {'planned':<18} {'in effect':<18}    how"]
            lines += [f"{s:<{width}}  {p:<18} {a:<18} {m}  {why}" for s, p, a, m, why in rows]
            log.info("Speed-ups in effect:\n%s", "\n".join(lines))
            report = Path(self.report_path or Path(args.output_dir) / "speedups_report.json")
            # a user who planned nothing gets what it cannot switch as advice in the summary, not as warnings
            advice = [] if self._built_from_plan else [m for m in self.mismatches if not m.startswith("PEFT")]
            announce(summary(self.switches, advice, report))
            for message in self.mismatches:
                if message not in advice:
                    log.warning(message)

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if self._watch is not None:
            self._watch.start()

    def on_optimizer_step(self, args, state, control, **kwargs):
        if self._watch is not None:
            self._watch.stop()

    def _check_switches(self, args: Any) -> None:
        self._steps_checked += 1
        for switch in self.switches:
            if switch.status != "switched" or switch.check is None:
                continue
            problem = switch.check()
            if problem is None:
                switch.status = "verified"
            elif problem:
                if switch.undo is not None:
                    switch.undo()
                log.warning(
                    "%s: switched to %r at train start but %s; put back to %r (process %d)",
                    switch.setting,
                    switch.after,
                    problem,
                    switch.before,
                    args.process_index,
                )
                switch.status, switch.reason, switch.after = "undone", problem, switch.before
            elif self._steps_checked >= CHECK_STEPS:
                switch.status, switch.reason = "unverified", f"no step showed it in {CHECK_STEPS} steps"
        if self._watch is not None and all(s.status != "switched" for s in self.switches if s.setting == "optimizer"):
            self._watch.close()
            self._watch = None

    def on_step_begin(self, args, state, control, **kwargs):
        self._t0 = time.perf_counter()
        self._tokens0 = state.num_input_tokens_seen

    def on_step_end(self, args, state, control, **kwargs):
        _synchronize()
        self.step_times.append(time.perf_counter() - self._t0)
        self.step_tokens.append(state.num_input_tokens_seen - self._tokens0)
        if any(s.status == "switched" for s in self.switches):
            self._check_switches(args)
        self.recompiles = max(0, graph_count() - self._graphs0 - 1) if self.observed.get("torch_compile") else 0

    def throughput(self, args: Any) -> dict[str, Any]:
        """Steady-state figures: median step time and rates over the steps after warm-up."""
        steady = self.step_times[self.warmup_steps :]
        tokens = self.step_tokens[self.warmup_steps :]
        if not steady:
            return {"steady_steps": 0, "note": f"fewer than {self.warmup_steps + 1} steps; no steady state"}
        seconds = sum(steady)
        samples = args.per_device_train_batch_size * args.gradient_accumulation_steps * max(1, args.world_size)
        return {
            "steady_steps": len(steady),
            "warmup_steps_excluded": self.warmup_steps,
            "median_step_seconds": statistics.median(steady),
            "samples_per_second": samples * len(steady) / seconds,
            "tokens_per_second": sum(tokens) / seconds if sum(tokens) else None,
            "recompiles": self.recompiles,
        }

    def on_train_end(self, args, state, control, **kwargs):
        if self._watch is not None:
            self._watch.close()
            self._watch = None
        for switch in self.switches:  # a process-wide flag goes back to what it was before training
            if switch.setting == "tf32" and switch.status in ("switched", "verified", "unverified") and switch.undo:
                switch.undo()
        plan = self.plan
        if plan is None:  # train() never began
            return
        report = {
            "device": plan.device.name,
            "throughput": self.throughput(args),
            "planned": [d.__dict__ for d in plan.decisions],
            "observed": self.observed,
            "switches": [
                {"setting": s.setting, "before": s.before, "after": s.after, "status": s.status, "reason": s.reason}
                for s in self.switches
            ],
            "mismatches": self.mismatches,
            "attention_used": plan.attention_used,
            "notes": plan.notes,
        }
        entry = {f"speedups/{k}": v for k, v in report["throughput"].items()}
        state.log_history.append({**entry, "step": state.global_step})
        if state.is_world_process_zero:
            path = Path(self.report_path or Path(args.output_dir) / "speedups_report.json")
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2, default=str))
            t = report["throughput"]
            if t.get("steady_steps"):
                log.info(
                    "Steady-state (after %d warm-up steps): %.3f s/step, %.1f samples/s, %s tokens/s, "
                    "%d recompiles -> %s",
                    self.warmup_steps,
                    t["median_step_seconds"],
                    t["samples_per_second"],
                    f"{t['tokens_per_second']:.0f}" if t["tokens_per_second"] else "n/a",
                    t["recompiles"],
                    path,
                )


def _trainer_builds(args: Any, optimizer: Any) -> bool:
    """The optimizer is of the class `TrainingArguments.optim` makes (else the user passed their own)."""
    try:
        from transformers import Trainer

        cls, _ = Trainer.get_optimizer_cls_and_kwargs(args)
    except Exception:  # an optim name that needs a missing package: the Trainer could not have built it
        return False
    return type(optimizer) is cls


def _matches(setting: str, planned: Any, actual: Any) -> bool:
    if actual == "n/a":
        return True
    if setting == "gradient_checkpointing":  # the user's memory trade-off; only an asked-for one can be missing
        return bool(actual) or not planned
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
