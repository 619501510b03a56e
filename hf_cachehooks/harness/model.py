"""`hf-cachehooks`, an lm-eval model: lm-eval's own `hf` model (`HFLM`) behind a request cache keyed by the model.

Every answer is computed by lm-eval's `HFLM` exactly as `--model hf` computes it, so the numbers are the
same by construction; this class only decides which requests need computing. A request is served from
`harness/results.py` when the same model (weights hash, config, class, dtype, adapters, tokenizer with its
chat template, generation defaults), the same settings that change answers (`keyed_settings`) and the same
lm-eval version answered the same request before. A model given by path is loaded only when a request
misses: its identity is remembered against its files (`identity.files_state`), so a rerun of the same tasks
loads no weights, and a checkpoint retrained at the same path is a new key (lm-eval's own `--use_cache`
keys requests by their text alone and serves the stale answers).

Under `torchrun` / `accelerate launch` each rank answers its share of the requests (lm-eval's evaluator splits
them by `rank` and `world_size`) into the same cache, keyed by request and never by rank: a run made on 2
processes is a full hit on 1, and the reverse. A rank whose requests all hit never builds the model.

Registered with lm-eval as `hf-cachehooks` when this module is imported (`hf-cachehooks lm-eval ...` does).
"""

from __future__ import annotations

import inspect
import logging
import os
from datetime import timedelta
from pathlib import Path
from typing import Any

import lm_eval
from lm_eval.api.model import LM, CacheHook
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM
from lm_eval.models.utils import normalize_gen_kwargs

from .._core.keys import Key, make_key
from .._core.launch import World, current_world, gloo_group, start_group, world_from_env
from .._core.store import cache_root
from .._models.identity import (
    computed,
    files_state,
    generation_defaults,
    model_identity,
    remember_identity,
    remembered_identity,
    tokenizer_identity,
)
from ..errors import ConfigError
from .results import RequestStore, as_answer, is_answer, request_hash

log = logging.getLogger(__name__)

# HFLM arguments that say where files come from or how memory is laid out, never what a request's answer
# is: the files themselves are keyed through the model and tokenizer identity.
NOT_KEYED = {
    "self",
    "pretrained",
    "revision",
    "subfolder",
    "tokenizer",
    "trust_remote_code",
    "use_fast_tokenizer",
    "offload_folder",
    "max_memory_per_gpu",
    "max_cpu_memory",
}
# HFLM arguments that load files besides the model folder's: a path's identity is then never remembered.
_OUTSIDE_FILES = ("peft", "delta", "autogptq", "gptqmodel")
_HFLM_SIGNATURE = inspect.signature(HFLM.__init__)  # read once, at import: what `--model hf` takes
_HFLM_PARAMS = _HFLM_SIGNATURE.parameters


def keyed_settings(hf_args: dict[str, Any]) -> dict[str, Any]:
    """The HFLM settings in the key: every argument (HFLM's defaults filled in) but `NOT_KEYED`.

    Batch size is in: HFLM pads batches, which may move float noise and flip a greedy near-tie.
    `max_batch_size` counts only with `batch_size=auto`; `device` is in (CPU and GPU kernels differ).

    Example:
        >>> keyed_settings({"pretrained": "m", "batch_size": 1})["dtype"]
        'auto'
    """
    known = {k: v for k, v in hf_args.items() if k in _HFLM_PARAMS and k != "kwargs"}
    extra = {k: v for k, v in hf_args.items() if k not in _HFLM_PARAMS or k == "kwargs"}
    bound = _HFLM_SIGNATURE.bind_partial(None, **known)
    bound.apply_defaults()
    settings = {k: v for k, v in bound.arguments.items() if k not in NOT_KEYED and k != "kwargs"}
    settings.update({f"load.{k}": v for k, v in extra.items()})  # from_pretrained keywords HFLM passes on
    if not str(settings.get("batch_size")).startswith("auto"):
        settings.pop("max_batch_size", None)
    return {k: _plain(v) for k, v in settings.items()}


def _plain(value: Any) -> Any:
    """A setting as key data: a torch dtype as its name; anything else as it is (the key checks it)."""
    module = type(value).__module__
    return str(value).replace("torch.", "") if module.startswith("torch") else value


@register_model("hf-cachehooks")
class CachedHFLM(LM):
    """lm-eval's `hf` model with every request cached under the model's identity (see the module docstring).

    Args:
        pretrained: a model folder, Hub name, or a loaded `PreTrainedModel` (then always loaded: its
            identity is hashed from the object).
        cache_dir: the cache root (default: $HF_CACHEHOOKS_HOME, else `outputs/cache`).
        save_every: answers per shard: a killed run loses at most this many.
        **hf_args: everything `--model hf` takes (`dtype`, `batch_size`, `max_length`, ...), passed to
            HFLM unchanged.

    Raises:
        ConfigError: `save_every` below 1, or `tp_plan` under a launcher (tensor parallelism needs every rank
            to run the same forward passes, which per-rank cache hits break).

    Example:
        >>> lm_eval.simple_evaluate(model="hf-cachehooks", model_args="pretrained=path/to/model", tasks=[...])
    """

    def __init__(
        self, pretrained: Any, cache_dir: str | os.PathLike | None = None, save_every: int = 64, **hf_args: Any
    ) -> None:
        super().__init__()
        if int(save_every) < 1:
            raise ConfigError(f"save_every={save_every!r}: give a positive number of answers per shard, e.g. 64.")
        self.save_every = int(save_every)
        self.root = Path(cache_root(cache_dir))
        self.hf_args = {"pretrained": pretrained, **hf_args}
        self.settings = keyed_settings(self.hf_args)
        self.tokenizer: Any = None
        self.chat_template_args = dict(hf_args.get("chat_template_args") or {})
        if hf_args.get("enable_thinking") is not None:
            self.chat_template_args["enable_thinking"] = hf_args["enable_thinking"]
        self._hflm: HFLM | None = None
        self._group: Any = None
        self.world = self._join_launch()
        self._rank, self._world_size = self.world.rank, self.world.size  # what lm-eval's `rank`/`world_size` read
        name = pretrained if isinstance(pretrained, str) else getattr(pretrained, "name_or_path", "model")
        self.store = RequestStore(self.root, str(name))
        self.loads = 0  # how many times this object built lm-eval's model (0 on a rerun that hits)
        self.key = self._key()

    # The launch, the model and its key ----------------------------------------------------------

    def _join_launch(self) -> World:
        """This process's place in a launch, with a gloo group over its processes (made on every rank).

        The launcher's process group is started here if the script has not started one (gloo for CPU tensors,
        NCCL for CUDA ones, as `init_process_group` does by default; HFLM's `Accelerator` later finds it
        running). Only small counts and Python objects travel between ranks, over a gloo group, so that a rank
        whose requests all hit takes part in lm-eval's gathers without building the model.
        A model object, as with `--model hf`, runs without the launch: every rank answers every request.
        """
        if world_from_env().size <= 1 or not isinstance(self.hf_args["pretrained"], str):
            return World()
        if self.hf_args.get("tp_plan") is not None:
            raise ConfigError(
                f"tp_plan={self.hf_args['tp_plan']!r} under a launcher: tensor parallelism needs every rank to run "
                "the same forward passes, which cache hits on one rank break. Use --model hf for tensor parallelism."
            )
        start_group(world_from_env(), None, timedelta(weeks=52))  # HFLM's timeout: a rank may load for long
        world = current_world()
        self._group = gloo_group()
        log.info("lm-eval hf-cachehooks: rank %d of %d answers its share of the requests.", world.rank, world.size)
        return world

    def _files_state(self) -> str | None:
        """The state of the files a path loads, or None when the identity must come from loading."""
        pretrained, tokenizer = self.hf_args["pretrained"], self.hf_args.get("tokenizer")
        if not isinstance(pretrained, str) or (tokenizer and tokenizer != pretrained):
            return None
        if any(self.hf_args.get(name) for name in _OUTSIDE_FILES):
            return None
        options = {
            "harness": "lm-eval hf",
            "gguf_file": self.hf_args.get("gguf_file"),
            "load_kwargs": {k: self.hf_args.get(k) for k in ("revision", "subfolder") if self.hf_args.get(k)},
            "settings": self.settings,
        }
        return files_state(pretrained, options, self.root)

    def _key(self) -> Key:
        state = self._files_state()
        identity = remembered_identity(state, self.root)
        if identity is None:
            hflm = self.model_lm()
            identity = {
                "model": model_identity(hflm.model),
                "tokenizer": tokenizer_identity(hflm.tokenizer),
                "generation_defaults": generation_defaults(hflm.model),
            }
            remember_identity(state, identity, self.root)
        self.identity = identity
        return make_key(
            "lm-eval",
            {
                "model": computed(identity["model"]),
                "tokenizer": identity["tokenizer"],
                "generation_defaults": identity["generation_defaults"],
                "settings": self.settings,
                "lm_eval": lm_eval.__version__,
            },
        )

    def model_lm(self) -> HFLM:
        """lm-eval's own `HFLM`, built on first use (a rerun whose requests all hit never builds it)."""
        if self._hflm is None:
            log.info("Loading %s with lm-eval's hf model.", self.store.model)
            self._hflm = HFLM(**self.hf_args)
            if self.world.size > 1:
                # The split across ranks is ours (lm-eval's evaluator, by our rank); HFLM answers this rank's
                # misses as one process does. Its own data-parallel mode gathers across ranks inside
                # `loglikelihood_rolling` and `batch_size=auto`, and would wait forever for a rank whose
                # requests all hit and which never built the model.
                self._hflm._world_size = 1
            self.tokenizer = self._hflm.tokenizer
            self.loads += 1
        return self._hflm

    def _tokenizer(self) -> Any:
        """The tokenizer as HFLM loads it (no weights): for chat templates on a run that loads no model."""
        if self.tokenizer is None:
            args = self.hf_args
            HFLM._create_tokenizer(
                self,  # type: ignore[arg-type]  # sets `self.tokenizer` only
                args["pretrained"],
                args.get("tokenizer"),
                revision=str(args.get("revision", "main")),
                trust_remote_code=args.get("trust_remote_code", False),
                use_fast_tokenizer=args.get("use_fast_tokenizer", True),
                gguf_file=args.get("gguf_file"),
                add_bos_token=args.get("add_bos_token"),
                subfolder=args.get("subfolder", ""),
            )
        return self.tokenizer

    # lm-eval's model interface --------------------------------------------------------------------

    def loglikelihood(self, requests: list, disable_tqdm: bool = False) -> list:
        return self._answer("loglikelihood", requests, disable_tqdm)

    def loglikelihood_rolling(self, requests: list, disable_tqdm: bool = False) -> list:
        return self._answer("loglikelihood_rolling", requests, disable_tqdm)

    def generate_until(self, requests: list, disable_tqdm: bool = False) -> list:
        return self._answer("generate_until", requests, disable_tqdm)

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        self._tokenizer()
        return HFLM.apply_chat_template(self, chat_history, add_generation_prompt)  # type: ignore[arg-type]

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        self._tokenizer()
        return HFLM.chat_template(self, chat_template)  # type: ignore[arg-type]

    @property
    def tokenizer_name(self) -> str:
        return self._tokenizer().name_or_path.replace("/", "__")

    @property
    def device(self) -> Any:
        """Where lm-eval puts the counts it gathers across ranks: the CPU (they travel over gloo)."""
        return "cpu" if self._hflm is None or self.world.size > 1 else self._hflm.device

    def all_gather(self, tensor: Any) -> Any:
        """Every rank's `tensor`, concatenated in rank order (lm-eval gathers request counts this way)."""
        if self.world.size <= 1:
            return tensor
        import torch
        import torch.distributed as dist

        mine = tensor.detach().cpu().reshape(-1)
        parts = [torch.empty_like(mine) for _ in range(self.world.size)]
        dist.all_gather(parts, mine, group=self._group)
        return torch.cat(parts)

    def gather_object(self, obj: Any, dst: int = 0) -> list | None:
        if self.world.size <= 1:
            return [obj]
        import torch.distributed as dist

        out: list | None = [None] * self.world.size if self.world.rank == dst else None
        dist.gather_object(obj, out, dst=dst, group=self._group)
        return out

    def barrier(self) -> None:
        """Wait for every rank (lm-eval's evaluator calls this after each request type). In between, rank 0
        merges the shards every rank sealed, while no rank reads them."""
        if self.world.size <= 1:
            return
        import torch.distributed as dist

        dist.barrier(group=self._group)
        if self.world.is_main:
            self.store.compact(self.key)
        dist.barrier(group=self._group)

    @property
    def batch_sizes(self) -> dict:
        return self._hflm.batch_sizes if self._hflm is not None else {}

    def get_model_info(self) -> dict:
        """What lm-eval records about the model, from the identity (no Hub lookup, no load)."""
        model = self.identity["model"]
        return {
            "model_dtype": model.get("dtype"),
            "model_revision": self.hf_args.get("revision", "main"),
            "model_weights_xxh3": model.get("weights"),
            "hf_cachehooks_key": self.key.digest,
        }

    # The cache ------------------------------------------------------------------------------------

    def _answer(self, method: str, requests: list, disable_tqdm: bool) -> list:
        """Answers for `requests` in order: stored ones served, the rest computed by HFLM and saved per batch."""
        hashes = [None if _sampled(method, r.args) else request_hash(method, r.args) for r in requests]
        stored = self.store.load(self.key)
        answers: list[Any] = [None] * len(requests)
        todo = []
        for i, digest in enumerate(hashes):
            value = stored.get(digest) if digest is not None else None
            if value is not None and is_answer(method, value):
                answers[i] = as_answer(method, value)
            else:
                todo.append(i)
        cached = len(requests) - len(todo)
        log.info("lm-eval %s: %d of %d requests cached, %d to compute.", method, cached, len(requests), len(todo))
        if not todo:
            return answers
        if not stored:
            log.info("No cached %s answers for this model key: %s", method, self.store.explain_miss(self.key))
        saver = _Saver(self, method, {h for i in todo if (h := hashes[i]) is not None})
        hflm = self.model_lm()
        hflm.set_cache_hook(saver)
        # HFLM reports rolling loglikelihoods only once a call ends: call it a batch at a time
        step = self.save_every if method == "loglikelihood_rolling" else len(todo)
        try:
            for start in range(0, len(todo), step):
                part = todo[start : start + step]
                computed = getattr(hflm, method)([requests[i] for i in part], disable_tqdm=disable_tqdm)
                for i, value in zip(part, computed, strict=True):
                    answers[i] = value
                    digest = hashes[i]
                    if digest is not None:
                        saver.keep(digest, value)
                saver.flush()
        finally:
            saver.flush()  # an interrupted call keeps what it computed
            hflm.set_cache_hook(CacheHook(None))
        if self.world.size == 1:
            self.store.compact(self.key)  # under a launcher rank 0 merges in `barrier`, once every rank has saved
        return answers


def _sampled(method: str, args: Any) -> bool:
    """True for a sampled generation: never cached (each repeat must be a new draw), as lm-eval's cache does."""
    if method != "generate_until" or len(args) < 2 or not isinstance(args[1], dict):
        return False
    return bool(normalize_gen_kwargs(args[1]).get("do_sample"))


class _Saver(CacheHook):
    """Collects answers as HFLM reports them (`cache_hook.add_partial`) and seals a shard every `save_every`.

    Only answers to the requests asked for are kept (a report whose hash matches none is ignored), and
    each is passed on to the hook lm-eval's `--use_cache` set on our model, if any.
    """

    def __init__(self, owner: CachedHFLM, method: str, expected: set[str]) -> None:
        super().__init__(None)
        self.owner, self.method, self.expected = owner, method, expected
        self.pending: dict[str, Any] = {}

    def add_partial(self, attr: str, req: Any, res: Any) -> None:
        self.owner.cache_hook.add_partial(attr, req, res)
        if attr == self.method:
            digest = request_hash(attr, req)
            if digest is not None and digest in self.expected:
                self.keep(digest, res)

    def keep(self, digest: str, value: Any) -> None:
        if digest not in self.expected:
            return
        self.expected.discard(digest)
        self.pending[digest] = list(value) if isinstance(value, tuple) else value
        if len(self.pending) >= self.owner.save_every:
            self.flush()

    def flush(self) -> None:
        if self.pending:
            self.owner.store.save(self.owner.key, self.pending)
            self.pending = {}
