"""`CachedEvalCallback`: a generation evaluation at each Trainer evaluation (or save), computed once per weights.

At each `on_evaluate` (or `on_save`) it runs `evaluate_model` on the live model, unwrapped from DDP,
DeepSpeed and `torch.compile`, with the Trainer's tokenizer. The key holds the parameters themselves
(`model_identity`), so the evaluation of weights already evaluated (a resumed run replaying the steps since
its last checkpoint, a second `trainer.evaluate()`) is a hit that costs the weights fingerprint. The step is
recorded in the run entry's metadata, never in its key (`ls` shows `model@step-N`).

Where the metrics go: merged into the `metrics` dict of `on_evaluate` (what `trainer.evaluate()` returns and
`metric_for_best_model`, `EarlyStoppingCallback` and hyperparameter search read), and logged as one more
log event (`eval_<name>_<metric>`) through `trainer.log`, the one path that reaches both
`state.log_history` and every callback's `on_log` (the `report_to` integrations). A callback is not given
the Trainer, so that event needs `trainer=`; without it the metrics are appended to `state.log_history`
only (the integrations have already heard that step's evaluation when `on_evaluate` runs), with a warning.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from .config import EvalConfig
from .runs import EvalResult, evaluate_model

log = logging.getLogger(__name__)

try:  # the callback base class; without transformers the module still imports (for docs and tests)
    from transformers import TrainerCallback
except ImportError:  # pragma: no cover
    TrainerCallback = object  # type: ignore[misc,assignment]

WHEN = ("evaluate", "save")


def unwrapped(model: Any) -> Any:
    """The model inside DDP / DataParallel / DeepSpeed / FSDP containers and `torch.compile`: the object whose
    parameters are named as the saved checkpoint names them (a compiled model's are prefixed `_orig_mod.`)."""
    try:
        from accelerate.utils import extract_model_from_parallel
    except ImportError:  # pragma: no cover - the Trainer itself needs accelerate
        while type(model).__name__ in ("DistributedDataParallel", "DataParallel", "DeepSpeedEngine"):
            model = model.module
        return getattr(model, "_orig_mod", model)
    # keep_fp32_wrapper=True: taking the mixed-precision wrapper off would change the live model
    return extract_model_from_parallel(model, keep_fp32_wrapper=True, keep_torch_compile=False)


def sharding(model: Any, args: Any = None) -> str | None:
    """The scheme that splits this model's parameters across ranks ("FSDP", "DeepSpeed ZeRO-3", "DTensor"),
    or None when every rank holds them whole (single process, DDP, ZeRO-1/2)."""
    if args is not None and getattr(args, "fsdp", None):
        return "FSDP"
    try:
        from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

        if is_deepspeed_zero3_enabled():
            return "DeepSpeed ZeRO-3"
    except ImportError:  # pragma: no cover
        pass
    if type(model).__name__ in ("FullyShardedDataParallel",) or type(model).__name__.startswith("FSDP"):
        return "FSDP"
    for parameter in model.parameters():
        if hasattr(parameter, "ds_shape") or hasattr(parameter, "ds_id"):  # a ZeRO-3 partitioned parameter
            return "DeepSpeed ZeRO-3"
        if type(parameter).__name__ == "FlatParameter":
            return "FSDP"
        if type(parameter).__name__ == "DTensor":  # FSDP2 (`fully_shard`) and tensor parallelism
            return "DTensor"
    return None


def _remember_checkpoint(model: Any, tokenizer: Any, folder: Path, config: EvalConfig) -> None:
    """Record which weights the just-saved `folder` holds, so `evaluate_model(folder)` (`eval-checkpoints`) is a
    hit on this run's entries without loading them (`_models.saved`: only where that is provably what loading
    the folder computes; otherwise nothing is remembered and the folder is loaded when evaluated)."""
    from .._models.saved import path_load_options, remember_saved_model

    remember_saved_model(model, tokenizer, folder, config.resolved_cache.resolve_root(), path_load_options(config))


class CachedEvalCallback(TrainerCallback):  # type: ignore[misc,valid-type]
    """Evaluate generations at each Trainer evaluation (or save), served from the prediction cache.

    Args:
        data: the rows, as for `evaluate_model` (a list of dicts, a `datasets.Dataset`, a .json/.jsonl path).
        config: an `EvalConfig` (prompt, metrics, generation settings, cache settings); `device` must stay None
            (the live model runs where the Trainer put it).
        name: the metrics are logged as `eval_<name>_<metric>`.
        on: "evaluate" (each `on_evaluate`: needs an `eval_strategy` and an eval dataset) or "save" (each
            checkpoint save).
        trainer: the Trainer, so the metrics are a log event every `report_to` integration sees
            (`trainer.log`); without it they reach `trainer.evaluate()`'s result and `state.log_history` only.
        tokenizer: the tokenizer to generate with; default the Trainer's `processing_class`.
        remember_checkpoints: at each save, record which weights the checkpoint folder holds, so evaluating it
            later by path (`hf-cachehooks eval-checkpoints`) hits without loading it.

    Raises:
        ConfigError: `on` is not "evaluate" or "save", `config.device` is set, the Trainer has no tokenizer,
            or the model's parameters are sharded across ranks (FSDP, DeepSpeed ZeRO-3): the message says
            how to evaluate the checkpoints instead.

    Attributes:
        results: {global step: `EvalResult`} of this process's evaluations.

    Example:
        >>> trainer = Trainer(model, args, train_dataset=ds, eval_dataset=dev, processing_class=tok)  # doctest: +SKIP
        >>> qa = CachedEvalCallback(rows, EvalConfig(max_new_tokens=16), name="qa", trainer=trainer)  # doctest: +SKIP
        >>> trainer.add_callback(qa)  # doctest: +SKIP
    """

    def __init__(
        self,
        data: Any,
        config: EvalConfig | None = None,
        *,
        name: str = "gen",
        on: str = "evaluate",
        trainer: Any = None,
        tokenizer: Any = None,
        remember_checkpoints: bool = True,
    ) -> None:
        if on not in WHEN:
            raise ConfigError(f"on={on!r} is not a Trainer event this callback evaluates at; use one of: {WHEN}.")
        config = config or EvalConfig()
        if config.device is not None:
            raise ConfigError(
                f"EvalConfig(device={config.device!r}) would move the model being trained; leave device=None "
                "(the callback evaluates the live model where the Trainer put it)."
            )
        self.data = data
        self.config = config
        self.name = name
        self.on = on
        self.trainer = trainer
        self.tokenizer = tokenizer
        self.remember_checkpoints = remember_checkpoints
        self.results: dict[int, EvalResult] = {}
        self._warned = False

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is not None:
            self._refuse_sharded(unwrapped(model), args)  # before any step is spent

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if self.on != "evaluate":
            return
        ours = self._evaluate(args, state, kwargs)
        if isinstance(metrics, dict):  # the dict `evaluate()` returns and the best-model check reads, on every rank
            metrics.update(ours)
        self._log(state, ours)

    def on_save(self, args, state, control, model=None, **kwargs):
        if self.remember_checkpoints and state.is_world_process_zero and model is not None:
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            tokenizer = self.tokenizer or kwargs.get("processing_class")
            inner = unwrapped(model)
            if folder.is_dir() and sharding(inner, args) is None:
                _remember_checkpoint(inner, tokenizer, folder, self.config)
        if self.on == "save":
            self._log(state, self._evaluate(args, state, {**kwargs, "model": model}))

    def _refuse_sharded(self, model: Any, args: Any) -> None:
        scheme = sharding(model, args)
        if scheme is not None:
            raise ConfigError(
                f"CachedEvalCallback cannot evaluate a model whose parameters are sharded across ranks ({scheme}): "
                "no rank holds the whole weights to generate with or to fingerprint. Evaluate the checkpoints "
                "after training instead, `hf-cachehooks eval-checkpoints OUTPUT_DIR --data rows.json` (save full "
                "weights: FSDP `fsdp_config={'state_dict_type': 'FULL_STATE_DICT'}`, DeepSpeed "
                "`stage3_gather_16bit_weights_on_model_save: true`), or train with DDP / ZeRO-2 to evaluate "
                "during training."
            )

    def _evaluate(self, args: Any, state: Any, kwargs: Mapping[str, Any]) -> dict[str, float]:
        """`evaluate_model` on the live weights (every rank: the rows are shared out under a launcher); the
        numeric metrics as `eval_<name>_<metric>`."""
        model = kwargs.get("model")
        if model is None:
            raise ConfigError("The Trainer passed no model to CachedEvalCallback; it needs one to evaluate.")
        model = unwrapped(model)
        self._refuse_sharded(model, args)
        tokenizer = self.tokenizer or kwargs.get("processing_class")
        if tokenizer is None or not callable(getattr(tokenizer, "batch_decode", None)):
            raise ConfigError(
                f"CachedEvalCallback needs a tokenizer to generate with (the Trainer's processing_class is "
                f"{type(tokenizer).__name__}): pass Trainer(processing_class=tokenizer) or "
                "CachedEvalCallback(..., tokenizer=tokenizer)."
            )
        result = evaluate_model(
            model, self.data, self.config, tokenizer=tokenizer, metadata={"step": state.global_step}
        )
        self.results[state.global_step] = result
        if state.is_world_process_zero:
            log.info(
                "Step %d, %s: %s (%s).",
                state.global_step,
                self.name,
                ", ".join(f"{k} {v}" for k, v in result.metrics.items()),
                result.cache_status,
            )
        return {
            f"eval_{self.name}_{k}": float(v)
            for k, v in result.metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)
        }

    def _log(self, state: Any, metrics: dict[str, float]) -> None:
        """One log event, from the main process: `trainer.log` (history and every `on_log`), else the history."""
        if not metrics or not state.is_world_process_zero:
            return
        if self.trainer is not None:
            self.trainer.log(dict(metrics))
            return
        state.log_history.append({**metrics, "epoch": state.epoch, "step": state.global_step})
        if not self._warned:
            self._warned = True
            log.warning(
                "CachedEvalCallback has no trainer: its metrics are in trainer.evaluate()'s result and "
                "state.log_history, but report_to integrations do not see them. Pass "
                "CachedEvalCallback(..., trainer=trainer) (e.g. trainer.add_callback(CachedEvalCallback(..., "
                "trainer=trainer)))."
            )
