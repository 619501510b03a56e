"""`cache_evaluation(trainer)`: `trainer.evaluate()` and `trainer.predict()` served from the cache while the
weights, the data and every setting the evaluation loop reads are unchanged.

Both call the instance's `evaluation_loop`; it is replaced by a `CachedLoop`, so everything around it still
happens (speed metrics, `self.log`, `on_evaluate` / `on_predict` callbacks). On a hit no forward runs: the
arrays come back from the cache (`loop_outputs.py`) and the metrics are rebuilt exactly as the loop builds
them; the result of `compute_metrics` is kept with a description of that function (`callables.py`) and
computed again, from the cached arrays, when the function changed or cannot be described.

Under several processes every rank computes the key; the ranks agree on it (or nothing is cached), and a
hit on every rank is served on every rank without running the loop; otherwise all run it and rank 0 writes.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from typing import Any, Literal

from .._core.cache_config import CacheConfig, settle
from .._core.fingerprint import fingerprint_data
from .._core.keys import Key, dumps, hash_bytes, make_key
from .._core.launch import World
from .._models.identity import model_identity
from .callables import Unknowable, describe
from .loop_outputs import KIND, LoopRecord, LoopStore, json_exact

log = logging.getLogger(__name__)

LoopStatusName = Literal["hit", "miss", "recomputed", "not-cached", "disabled"]
# Trainer methods the loop calls: replaced on the instance (not by a subclass, which the class's code covers),
# they are described too
_LOOP_METHODS = (
    "prediction_step",
    "compute_loss",
    "_prepare_inputs",
    "_prepare_input",
    "_wrap_model",
    "compute_loss_context_manager",
    "autocast_smart_context_manager",
    "_get_num_items_in_batch",
)


@dataclass(frozen=True)
class LoopStatus:
    """What the last evaluation loop did: `status`, why it was not a hit (`reason`), its key and entry."""

    status: LoopStatusName
    reason: str | None = None
    key: str | None = None
    path: str | None = None


def cache_evaluation(trainer: Any, cache: CacheConfig | None = None) -> Any:
    """Serve `trainer.evaluate()` and `trainer.predict()` from the cache when nothing they depend on changed.

    Args:
        trainer: a `transformers.Trainer` (or subclass); changed in place, and returned.
        cache: where and how long (`CacheConfig`); entries go to `<root>/trainer-eval/`, expire after
            `max_age` (left out: 30 days, as predictions), `force_recompute` and `enabled` as everywhere.

    Returns:
        `trainer`, whose `evaluation_loop` is now a `CachedLoop` (its `last` says what the last call did).

    Example:
        >>> trainer = cache_evaluation(Trainer(model, args, eval_dataset=data, compute_metrics=accuracy))
        >>> trainer.evaluate()  # a second call on the same weights runs no forward
    """
    caching = settle(cache, {}, {}, "EvalConfig")
    current = vars(trainer).get("evaluation_loop")
    if isinstance(current, CachedLoop):  # wrapped already: only the settings change
        current.cache, current.store = caching, LoopStore(caching)
        return trainer
    trainer.evaluation_loop = CachedLoop(trainer, trainer.evaluation_loop, caching)
    return trainer


class CachedLoop:
    """`Trainer.evaluation_loop` with a cache in front; called with the loop's own arguments."""

    def __init__(self, trainer: Any, original: Any, cache: CacheConfig) -> None:
        self.trainer = trainer
        self.original = original
        self.cache = cache
        self.store = LoopStore(cache)
        self.last: LoopStatus | None = None

    def __call__(
        self,
        dataloader: Any,
        description: str,
        prediction_loss_only: bool | None = None,
        ignore_keys: list[str] | None = None,
        metric_key_prefix: str = "eval",
    ) -> Any:
        args = self.trainer.args

        def run() -> Any:
            return self.original(dataloader, description, prediction_loss_only, ignore_keys, metric_key_prefix)

        if not self.cache.enabled:
            self.last = LoopStatus("disabled")
            return run()
        loss_only = args.prediction_loss_only if prediction_loss_only is None else prediction_loss_only
        key: Key | None = None
        try:
            key, model_name = loop_key(self.trainer, dataloader, loss_only, ignore_keys)
        except Unknowable as exc:
            why, model_name = str(exc), "-"
        world = World(args.process_index, args.world_size)
        if world.size > 1:
            return self._sharded(world, key, model_name, dataloader, run, metric_key_prefix)
        if key is None:
            return self._uncached(why, run)
        force = self.cache.force_recompute
        found = None if force else self.store.load(key)
        if found is not None:
            return self._hit(found, key, dataloader, metric_key_prefix, write=True)
        reason = "force_recompute is set" if force else self.store.explain_miss(key)
        log.info("🔄 Evaluation loop not cached (key %s): %s.", key.short, reason)
        output, record = self._recorded(run, model_name, metric_key_prefix)
        path = self.store.save(key, record) if record is not None else None
        self.last = LoopStatus("recomputed" if force else "miss", reason, key.digest, str(path) if path else None)
        return output

    def _uncached(self, why: str, run: Any) -> Any:
        log.info("Evaluation loop not cached: %s.", why)
        self.last = LoopStatus("not-cached", why)
        return run()

    def _sharded(self, world: World, key: Key | None, model_name: str, dataloader: Any, run: Any, prefix: str) -> Any:
        """Every rank decides alike: the same key on all ranks and an entry found on all, or all run the loop."""
        from .distributed import Collective

        comm = Collective(world)
        token = key.digest if key is not None else None
        first = comm.broadcast(token)
        if not comm.all_true(token is not None and token == first) or key is None:
            return self._uncached("the ranks computed different keys, or one could not compute its key", run)
        force = self.cache.force_recompute
        found = None if force else self.store.load(key)
        if comm.all_true(found is not None) and found is not None:
            return self._hit(found, key, dataloader, prefix, write=world.is_main)
        reason = "force_recompute is set" if force else (self.store.explain_miss(key) if world.is_main else None)
        output, record = self._recorded(run, model_name, prefix)
        path = self.store.save(key, record) if world.is_main and record is not None else None
        self.last = LoopStatus("recomputed" if force else "miss", reason, key.digest, str(path) if path else None)
        return output

    def _recorded(self, run: Any, model_name: str, prefix: str) -> tuple[Any, LoopRecord | None]:
        """Run the loop, seeing what `compute_metrics` got and gave; the record to store (None: not storable)."""
        from transformers.trainer_utils import denumpify_detensorize

        trainer = self.trainer
        user = trainer.compute_metrics
        seen: dict[str, Any] = {}

        def watch(prediction: Any, **kwargs: Any) -> Any:
            seen["prediction"] = prediction  # the loop calls it (or, when the user set none, this: it returns {})
            seen["metrics"] = user(prediction, **kwargs) if user is not None else {}
            return seen["metrics"]

        trainer.compute_metrics = watch
        try:
            output = run()
        finally:
            trainer.compute_metrics = user
        prediction = seen.get("prediction")
        raw = denumpify_detensorize(seen.get("metrics")) if user is not None and prediction is not None else {}
        if not isinstance(raw, dict) or "loss" in raw or f"{prefix}_loss" in raw:
            log.info("Not caching this evaluation loop: compute_metrics returns a loss, which hides the loop's own.")
            return output, None
        by = _metrics_by(user)
        record = LoopRecord(
            outputs={
                "predictions": output.predictions,
                "label_ids": output.label_ids,
                "inputs": getattr(prediction, "inputs", None),
                "losses": getattr(prediction, "losses", None),
            },
            num_samples=int(output.num_samples),
            loss=output.metrics.get(f"{prefix}_loss"),
            metrics_called=prediction is not None,
            metrics=raw if by is not None and json_exact(raw) else None,
            metrics_by=by,
            model=model_name,
        )
        return output, record

    def _hit(self, record: LoopRecord, key: Key, dataloader: Any, prefix: str, write: bool) -> Any:
        """The loop's output rebuilt from the record: its arrays, and its metrics as the loop builds them."""
        from transformers.trainer_utils import EvalLoopOutput, EvalPrediction, denumpify_detensorize

        trainer = self.trainer
        trainer.callback_handler.eval_dataloader = dataloader
        user, outputs = trainer.compute_metrics, record.outputs
        metrics: Any = {}
        if user is not None and record.metrics_called:
            by = _metrics_by(user)
            if by is not None and record.metrics is not None and by == record.metrics_by:
                metrics = copy.deepcopy(record.metrics)
            else:
                log.info("📏 compute_metrics changed: recomputing metrics from the cached predictions.")
                include = trainer.args.include_for_metrics
                metrics = user(
                    EvalPrediction(
                        predictions=outputs["predictions"],
                        label_ids=outputs["label_ids"],
                        losses=outputs["losses"] if "loss" in include else None,
                        inputs=outputs["inputs"] if "inputs" in include else None,
                    )
                )
                fresh = denumpify_detensorize(metrics)
                if write and by is not None and isinstance(fresh, dict) and json_exact(fresh):
                    self.store.update_metrics(key, fresh, by)
        metrics = denumpify_detensorize(metrics)  # from here on, as `Trainer.evaluation_loop` ends
        if record.loss is not None:
            metrics[f"{prefix}_loss"] = record.loss
        if hasattr(trainer, "model_preparation_time"):
            metrics[f"{prefix}_model_preparation_time"] = trainer.model_preparation_time
        for name in list(metrics.keys()):
            if not name.startswith(f"{prefix}_"):
                metrics[f"{prefix}_{name}"] = metrics.pop(name)
        log.info("✅ Evaluation loop served from the cache: %s (%d samples).", key.short, record.num_samples)
        self.last = LoopStatus("hit", None, key.digest, str(record.path) if record.path else None)
        return EvalLoopOutput(
            predictions=outputs["predictions"],
            label_ids=outputs["label_ids"],
            metrics=metrics,
            num_samples=record.num_samples,
        )


def _metrics_by(fn: Any) -> str | None:
    """A hash naming `compute_metrics` (its code, closure, globals read); None when it cannot be described."""
    if fn is None:
        return None
    try:
        return hash_bytes(dumps(describe(fn)))
    except Unknowable as exc:
        log.info("compute_metrics cannot be described (%s): metrics are recomputed on every hit.", exc)
        return None


def loop_key(trainer: Any, dataloader: Any, prediction_loss_only: bool, ignore_keys: list[str] | None) -> tuple:
    """(key, model name) of one evaluation loop: the weights and model, the data and collator, every setting
    the loop reads, the code it runs, and where it runs.

    Raises:
        Unknowable: something that changes the outputs cannot be named (the message says what).
    """
    import torch
    import transformers

    args = trainer.args
    _refuse(trainer, args)
    model = trainer.accelerator.unwrap_model(trainer.model)
    if any(p.device.type == "meta" for p in model.parameters()):
        raise Unknowable("some parameters are on the meta device (offloaded), so the weights cannot be hashed")
    sampling = getattr(args, "train_sampling_strategy", None)
    loop = {
        "prediction_loss_only": bool(prediction_loss_only),
        "ignore_keys": ignore_keys,
        "label_names": list(trainer.label_names),
        "can_return_loss": bool(getattr(trainer, "can_return_loss", False)),
        "model_accepts_loss_kwargs": bool(getattr(trainer, "model_accepts_loss_kwargs", False)),
        "include_for_metrics": sorted(args.include_for_metrics),
        "eval_do_concat_batches": args.eval_do_concat_batches,
        "eval_batch_size": args.eval_batch_size,
        "eval_accumulation_steps": args.eval_accumulation_steps,
        "logging_nan_inf_filter": args.logging_nan_inf_filter,
        "dataloader_drop_last": args.dataloader_drop_last,
        "remove_unused_columns": args.remove_unused_columns,
        "sampling": [sampling, args.length_column_name, args.data_seed, args.seed]
        if sampling == "group_by_length"
        else sampling,
        "world_size": args.world_size,
        "n_gpu": args.n_gpu,
        "full_eval": None if trainer.is_in_train else _full_eval(args),  # the loop casts the model outside training
        "mixed_precision": str(getattr(trainer.accelerator, "mixed_precision", None)),
        "torch_compile": [args.torch_compile_backend, args.torch_compile_mode] if args.torch_compile else False,
        "label_smoothing_factor": args.label_smoothing_factor,
        "use_liger_kernel": args.use_liger_kernel,
        "average_tokens_across_devices": args.average_tokens_across_devices,
    }
    code = {
        "trainer": describe(type(trainer)),
        "replaced": {name: describe(vars(trainer)[name]) for name in _LOOP_METHODS if name in vars(trainer)},
        "preprocess_logits_for_metrics": describe(trainer.preprocess_logits_for_metrics),
        "compute_loss_func": describe(getattr(trainer, "compute_loss_func", None)),
    }
    device = args.device
    runtime = {
        "device": device.type,
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "tf32": [torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32],
        "matmul_precision": torch.get_float32_matmul_precision(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }
    identity = model_identity(model)
    inputs = {
        "model": identity,
        "data": _data(getattr(dataloader, "dataset", None)),
        "collator": _collator(getattr(dataloader, "collate_fn", None)),
        "loop": loop,
        "code": code,
        "runtime": runtime,
    }
    return make_key(KIND, inputs), identity["name"]


def _full_eval(args: Any) -> str | None:
    return "fp16" if args.fp16_full_eval else "bf16" if args.bf16_full_eval else None


def _refuse(trainer: Any, args: Any) -> None:
    """Raise `Unknowable` for the set-ups whose loop output the key cannot name."""
    if args.batch_eval_metrics:
        raise Unknowable("batch_eval_metrics computes metrics batch by batch inside the loop")
    if getattr(args, "predict_with_generate", False):
        raise Unknowable("predict_with_generate generates with settings outside this key; use evaluate_model")
    if trainer.is_deepspeed_enabled or trainer.is_fsdp_enabled:
        raise Unknowable("DeepSpeed/FSDP may shard the parameters across ranks, so no rank can hash the weights")
    if getattr(trainer.accelerator, "parallelism_config", None) is not None:
        raise Unknowable("a parallelism_config (tensor/context/sequence parallel) splits the model across ranks")


def _data(dataset: Any) -> dict:
    """The evaluation data: a `datasets.Dataset`'s fingerprint, else a hash of every row."""
    if dataset is None:
        raise Unknowable("the dataloader has no dataset to fingerprint")
    if hasattr(dataset, "_fingerprint"):
        return {"fingerprint": fingerprint_data(dataset), "rows": len(dataset)}
    if not hasattr(dataset, "__len__") or not hasattr(dataset, "__getitem__"):
        raise Unknowable(f"the eval dataset ({type(dataset).__name__}) is iterable only: it cannot be fingerprinted")
    rows = dataset if isinstance(dataset, list) else [dataset[i] for i in range(len(dataset))]
    try:
        fingerprint = fingerprint_data(rows)
    except Exception:  # tensors or other objects in the rows: described one by one (arrays by their bytes)
        fingerprint = "described:" + hash_bytes(dumps(describe(rows)))
    return {"fingerprint": fingerprint, "rows": len(rows)}


def _collator(collate: Any) -> Any:
    """The data collator; the Trainer's column-removing wrapper as its columns and the collator it wraps
    (its own state also counts whether it logged yet, which changes nothing)."""
    if type(collate).__name__ == "RemoveColumnsCollator":
        return {"remove_columns": sorted(collate.signature_columns), "collator": describe(collate.data_collator)}
    return describe(collate)
