"""Speed-ups a running Trainer can still take, switched on the live objects at `on_train_begin`.

Four can change after `Trainer.__init__`: the attention implementation (`set_attn_implementation` on the
model), fused AdamW (the `fused` flag of every param group, read by each `step()`), `torch.compile`
in place (`nn.Module.compile`, so the Trainer's wrapped model runs the compiled forward) and TF32 (a
global flag). Each `Switch` remembers how to check that the next step really ran it and how to undo it.
Precision, batch size and dataloader workers are fixed by then; `SpeedupCallback` reports those.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .speedups import SpeedupPlan

log = logging.getLogger(__name__)

RUNGS = ("eager", "sdpa", "flash_attention_2")  # the ladder, slowest first; anything else is left alone
FUSED_DTYPES = ("float64", "float32", "float16", "bfloat16")


@dataclass
class Switch:
    """One speed-up the callback tried to turn on.

    Args:
        setting: the `SpeedupConfig` field, e.g. "optimizer".
        before, after: what was in effect before and after the switch.
        status: "switched", "already on", "not switched" (with the reason), "left alone" (the user's own
            choice), then after the first steps "verified" or "undone".
        reason: in words for the log: why not, or what the check found.
        check: returns None when the last step ran it, a reason when it did not, or "" when no step has
            shown it yet (asked again after the next step).
        undo: puts `before` back.
    """

    setting: str
    before: Any
    after: Any
    status: str
    reason: str = ""
    check: Callable[[], str | None] | None = field(default=None, repr=False)
    undo: Callable[[], None] | None = field(default=None, repr=False)


def _first_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0]}"


def base_model(model: Any) -> Any:
    """The transformers model under a PEFT wrapper (the model itself otherwise)."""
    get = getattr(model, "get_base_model", None)
    return get() if callable(get) else model


def attention_in_effect(model: Any) -> set[str]:
    """The implementations the attention modules will read at their next forward (one per config)."""
    configs = {id(c): c for c in (getattr(m, "config", None) for m in base_model(model).modules()) if c is not None}
    return {
        str(getattr(c, "_attn_implementation", None)) for c in configs.values() if hasattr(c, "_attn_implementation")
    }


def switch_attention(model: Any, plan: SpeedupPlan, half_precision: bool) -> Switch:
    """Climb the ladder eager -> sdpa -> flash_attention_2 on the live model, as far as the plan allows.

    flash_attention_2 is tried only where the plan chose it (its kernel smoke test passed) and the step
    runs in bf16/fp16; a failed rung leaves the model as it was and the next one down is tried.
    """
    target = base_model(model)
    before = getattr(getattr(target, "config", None), "_attn_implementation", None)
    asked = plan.config.attn_implementation
    if before not in RUNGS and before is not None:
        return Switch("attn_implementation", before, before, "left alone", f"{before} is the model's own choice")
    top = "flash_attention_2" if plan.chosen("attn_implementation") == "flash_attention_2" else "sdpa"
    notes = []
    if asked in ("sdpa", "eager"):
        top = asked
    elif top == "flash_attention_2" and not half_precision:
        top = "sdpa"
        notes.append("flash_attention_2 needs bf16/fp16 and this run is fp32")
    low = RUNGS.index(before or "eager")
    ladder = [rung for rung in RUNGS if low < RUNGS.index(rung) <= RUNGS.index(top)]
    if not ladder:
        why = "; ".join(notes) or ("as requested" if asked == before else plan.decision("attn_implementation").reason)
        return Switch("attn_implementation", before, before, "already on" if before == top else "not switched", why)
    setter = getattr(target, "set_attn_implementation", None)
    if setter is None:
        return Switch(
            "attn_implementation",
            before,
            before,
            "not switched",
            f"{type(target).__name__} has no set_attn_implementation",
        )
    for rung in reversed(ladder):
        try:
            setter(rung)
        except (ImportError, ValueError, RuntimeError, KeyError) as exc:  # FA2 absent or no kernel; model lacks sdpa
            notes.append(f"{rung} failed: {_first_line(exc)}")
            continue
        if attention_in_effect(target) != {rung}:
            setter(before)
            notes.append(f"{rung} did not reach every attention module")
            continue

        def check(rung: str = rung) -> str | None:
            found = attention_in_effect(target)
            return None if found == {rung} else f"attention modules read {sorted(found)}, not {rung}"

        return Switch("attn_implementation", before, rung, "switched", "; ".join(notes), check, lambda: setter(before))
    return Switch("attn_implementation", before, before, "not switched", "; ".join(notes))


def _fused_problem(optimizer: Any) -> str | None:
    import torch

    try:
        from torch.optim.optimizer import _get_fused_kernels_supported_devices

        devices = set(_get_fused_kernels_supported_devices())
    except ImportError:  # pragma: no cover - older torch
        devices = {"cuda"}
    if not isinstance(optimizer, torch.optim.Adam | torch.optim.AdamW):
        return f"{type(optimizer).__name__} has no fused kernel to switch to"
    for group in optimizer.param_groups:
        if group.get("foreach"):
            return "a param group asks for foreach=True, which excludes fused"
        if group.get("differentiable"):
            return "a param group is differentiable, which fused does not support"
        for p in group["params"]:
            if p.device.type not in devices or str(p.dtype).removeprefix("torch.") not in FUSED_DTYPES or p.is_sparse:
                return (
                    f"a parameter is {p.dtype} on {p.device}{' (sparse)' if p.is_sparse else ''}; fused AdamW "
                    f"needs dense {'/'.join(FUSED_DTYPES)} on {'/'.join(sorted(devices))}"
                )
    return None


class FusedStepWatch:
    """Sees which Adam kernel the next `optimizer.step()` runs (a torch function mode over that one step)."""

    def __init__(self, optimizer: Any) -> None:
        from torch.overrides import TorchFunctionMode

        watch = self

        class _Mode(TorchFunctionMode):
            def __torch_function__(self, func, types, args=(), kwargs=None):
                if getattr(func, "__name__", "") in ("_fused_adamw_", "_fused_adam_"):
                    watch.fused_ran = True
                return func(*args, **(kwargs or {}))

        self.fused_ran = False
        self.steps = 0
        self._mode: Any = _Mode()
        self._active = False
        self._hook = optimizer.register_step_post_hook(lambda *_: setattr(self, "steps", self.steps + 1))

    def start(self) -> None:
        if not self._active:
            self._mode.__enter__()
            self._active = True

    def stop(self) -> None:
        if self._active:
            self._mode.__exit__(None, None, None)
            self._active = False

    def close(self) -> None:
        self.stop()
        self._hook.remove()

    def check(self) -> str | None:
        if self.fused_ran:
            return None
        return "the optimizer step ran another AdamW kernel" if self.steps else ""  # "": no step yet (fp16 skip)


def switch_fused_adamw(optimizer: Any, users_own: bool) -> tuple[Switch, FusedStepWatch | None]:
    """Set `fused=True` on every param group when every parameter qualifies (device, dtype, dense)."""
    import torch

    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate wraps it
    if inner is None:
        return Switch("optimizer", None, None, "not switched", "no optimizer yet"), None
    name = type(inner).__name__
    if inner.param_groups and all(g.get("fused") for g in inner.param_groups):
        return Switch("optimizer", "adamw_torch_fused", "adamw_torch_fused", "already on"), None
    if users_own:
        why = "your own optimizer, passed to the Trainer; build it with fused=True to get the fused kernel"
        return Switch("optimizer", name, name, "left alone", why), None
    problem = _fused_problem(inner)
    if problem:
        return Switch("optimizer", name, name, "not switched", problem), None
    previous = [g.get("fused") for g in inner.param_groups]
    for group in inner.param_groups:
        group["fused"] = True
        for p in group["params"]:  # a resumed state: fused wants its step counter on the parameter's device
            state = inner.state.get(p, {})
            if "step" in state:
                state["step"] = state["step"].to(device=p.device, dtype=torch.float32)

    def undo() -> None:
        for group, fused in zip(inner.param_groups, previous):
            group["fused"] = fused

    watch = FusedStepWatch(inner)
    return Switch("optimizer", name, "adamw_torch_fused", "switched", "", watch.check, undo), watch


def is_compiled(model: Any) -> bool:
    """The model, or a module in it, runs a compiled forward (`torch.compile` or `Module.compile`)."""
    import torch

    if isinstance(model, torch._dynamo.eval_frame.OptimizedModule):
        return True
    return any(getattr(m, "_compiled_call_impl", None) is not None for m in model.modules())


def graph_count() -> int:
    """Graphs Dynamo has compiled in this process so far."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def _guarded_backend(name: str, mode: str | None, failures: list[str]) -> Callable[..., Any]:
    """The named compiler, but a failure to compile a graph runs that graph eagerly and is recorded."""
    import torch

    real = (
        torch._TorchCompileInductorWrapper(mode, None, None)
        if name == "inductor"
        else torch._TorchCompileWrapper(name, mode, None, None)
    )

    def backend(gm: Any, example_inputs: Any) -> Any:
        try:
            return real(gm, example_inputs)
        except Exception as exc:  # no C++ compiler, Triton without this GPU, an unsupported op
            failures.append(_first_line(exc))
            return gm.forward

    backend.__name__ = f"guarded_{name}"
    return backend


def switch_compile(model: Any, plan: SpeedupPlan, dynamo_backend: str) -> Switch:
    """`model.compile(...)` in place where the plan asks for compile and nothing compiled the model yet."""
    decision = plan.decision("torch_compile")
    if dynamo_backend not in ("NO", "DynamoBackend.NO", "unknown") or is_compiled(model):
        return Switch("torch_compile", True, True, "already on")
    if not decision.chosen:
        return Switch("torch_compile", False, False, "not switched", decision.reason)
    failures: list[str] = []
    graphs0 = graph_count()
    config = plan.config
    model.compile(backend=_guarded_backend(config.torch_compile_backend, config.torch_compile_mode, failures))

    def check() -> str | None:
        if failures:
            return f"{config.torch_compile_backend} failed ({failures[0]}); those graphs ran eagerly"
        return None if graph_count() > graphs0 else "the step compiled no graph"

    def undo() -> None:
        model._compiled_call_impl = None  # what nn.Module.compile set

    return Switch("torch_compile", False, True, "switched", decision.reason, check, undo)


def tf32_in_effect() -> bool:
    """TF32 matmuls are allowed now (the torch >= 2.9 flag when present: reading the old one raises then)."""
    import torch

    precision = getattr(torch.backends.cuda.matmul, "fp32_precision", None)
    return precision == "tf32" if precision is not None else bool(torch.backends.cuda.matmul.allow_tf32)


def switch_tf32(plan: SpeedupPlan) -> Switch:
    """Allow TF32 matmuls and convolutions on Ampere or newer (global flags, put back at train end)."""
    import torch

    decision = plan.decision("tf32")
    if not decision.chosen:
        return Switch("tf32", False, False, "not switched", decision.reason)
    if tf32_in_effect():
        return Switch("tf32", True, True, "already on")
    if hasattr(torch.backends, "fp32_precision"):  # torch >= 2.9; transformers' tf32=True sets the same flag
        previous = torch.backends.fp32_precision
        torch.backends.fp32_precision = "tf32"  # type: ignore[attr-defined]

        def undo() -> None:
            torch.backends.fp32_precision = previous  # type: ignore[attr-defined]
    else:  # pragma: no cover - older torch
        old = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True

        def undo() -> None:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old

    return Switch(
        "tf32",
        False,
        True,
        "switched",
        decision.reason,
        lambda: None if tf32_in_effect() else "the TF32 flag was reset",
        undo,
    )
