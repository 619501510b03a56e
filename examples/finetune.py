"""A short fine-tune of SmolLM2 with the Trainer speed-ups, used by `main.py --experiment full`.

The fine-tuned checkpoint is a `cached_folder` under outputs/finetune/, keyed by the base model's file, the
training and held-out rows and every setting: re-running reuses it (its manifest lists every file with its
hash), while any change trains a new model whose weights, and so whose prediction-cache key, differ.
While it trains, `CachedEvalCallback` evaluates generations on the held-out rows every few steps
(`eval_qa_exact_match`, ... in the Trainer's log) and, at each save, remembers which weights the checkpoint
holds: evaluating the final checkpoint by path afterwards is a cache hit that loads no weights.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from pathlib import Path

from hf_cachehooks import (
    CacheConfig,
    CachedEvalCallback,
    EvalConfig,
    SpeedupCallback,
    SpeedupConfig,
    cached_folder,
    hash_files,
    load_rows,
    make_key,
    speedups,
)

log = logging.getLogger("finetune")
TEMPLATE = "Question: {question}\nAnswer:"
EVAL = {"max_new_tokens": 12, "metrics": ("exact_match", "contains_answer"), "batch_size": 8}  # keyed below


def training_texts(rows: list[dict]) -> list[str]:
    """Prompt plus the first accepted answer, ended by the EOS the tokenizer adds later."""
    return [
        TEMPLATE.format(**r) + " " + (r["answer"][0] if isinstance(r["answer"], list) else r["answer"]) for r in rows
    ]


def eval_config(cache: CacheConfig | None = None) -> EvalConfig:
    """The generation evaluation on the held-out rows: the same during training and after, so they share entries."""
    return EvalConfig(
        prompt_template=TEMPLATE,
        max_new_tokens=EVAL["max_new_tokens"],
        metrics=EVAL["metrics"],
        batch_size=EVAL["batch_size"],
        cache=cache or CacheConfig(),
    )


def finetune(
    folder: str,
    gguf_file: str,
    train_rows: list[dict],
    eval_rows: list[dict],
    steps: int,
    learning_rate: float,
    config: SpeedupConfig,
    cache: CacheConfig | None = None,
    output_root: Path = Path("outputs/finetune"),
    seed: int = 0,
) -> Path:
    """Fine-tune (or reuse) and return the checkpoint folder; held-out generations are evaluated every
    `eval_every(steps)` steps and at the end."""
    key = make_key(
        "finetune",
        {
            "base": hash_files([Path(folder) / gguf_file]),  # from_pretrained(folder, gguf_file=...) reads only it
            "data": train_rows,
            "held_out": eval_rows,  # the checkpoint's trainer_state.json holds their metrics
            "steps": steps,
            "learning_rate": learning_rate,
            "seed": seed,
            "template": TEMPLATE,
            "eval": {"every": eval_every(steps), **EVAL},
            "config": dataclasses.asdict(config),  # every field is a training setting
        },
    )

    def train(into: Path) -> None:
        _train(folder, gguf_file, train_rows, eval_rows, steps, learning_rate, config, cache, seed, into)

    return cached_folder(output_root / f"SmolLM2-135M-qa_{key.short}", key, train)


def eval_every(steps: int) -> int:
    """Four evaluations (and checkpoints) per run, the last at the final step."""
    return -(-steps // 4)


def _train(folder, gguf_file, train_rows, eval_rows, steps, learning_rate, config, cache, seed, into: Path) -> None:
    """Train, then move the final checkpoint's files (weights, tokenizer, trainer_state.json) into `into`."""
    import torch
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments, set_seed

    from hf_cachehooks import load_tokenizer

    set_seed(seed)
    plan = speedups.plan(config)
    model = trainable(speedups.load_model(folder, plan, gguf_file=gguf_file, dtype=torch.float32))
    tokenizer = load_tokenizer(folder, gguf_file=gguf_file)  # its own copy: the pad token is set below
    if tokenizer.pad_token is None or tokenizer.pad_token == tokenizer.eos_token:
        # The LM collator masks pad positions out of the loss: with pad == EOS the model would never
        # learn to stop. SmolLM2 has a spare <|endoftext|> token for padding.
        tokenizer.pad_token = "<|endoftext|>" if "<|endoftext|>" in tokenizer.get_vocab() else tokenizer.unk_token

    def dataset(rows: list[dict]) -> Dataset:
        texts = [t + tokenizer.eos_token for t in training_texts(rows)]
        return Dataset.from_dict({"text": texts}).map(
            lambda b: tokenizer(b["text"], truncation=True, max_length=64), batched=True, remove_columns=["text"]
        )

    every = eval_every(steps)
    run = into.with_name(into.name + ".run")  # the Trainer's output_dir: checkpoint-<step>/ folders
    args = TrainingArguments(
        str(run),
        max_steps=steps,
        learning_rate=learning_rate,
        seed=seed,
        logging_steps=every,
        eval_strategy="steps",  # eval_loss, and CachedEvalCallback's generations, every `every` steps and at the end
        eval_steps=every,
        prediction_loss_only=True,
        save_strategy="steps",  # same steps: each evaluated checkpoint is remembered, so it is known by path
        save_steps=every,
        save_only_model=True,  # no optimizer state: the checkpoint is the model
        save_total_limit=1,
        report_to=[],
        lr_scheduler_type="constant",
        **plan.training_args_kwargs(),
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=dataset(train_rows),
        eval_dataset=dataset(eval_rows),
        data_collator=plan.data_collator(tokenizer),
        processing_class=tokenizer,  # saved with each checkpoint, and what the callback generates with
        callbacks=[SpeedupCallback(plan, warmup_steps=min(3, steps - 1))],
    )
    trainer.add_callback(CachedEvalCallback(eval_rows, eval_config(cache), name="qa", trainer=trainer))
    try:
        trainer.train()
        final = run / f"checkpoint-{steps}"
        for file in final.iterdir():  # as saved, so the identity remembered for its files still applies
            file.rename(into / file.name)
    finally:
        shutil.rmtree(run, ignore_errors=True)


def logged_evaluations(checkpoint: Path) -> dict[int, dict[str, float]]:
    """{step: {loss, eval_loss, eval_qa_exact_match, ...}} from the checkpoint's trainer_state.json."""
    history = json.loads((checkpoint / "trainer_state.json").read_text())["log_history"]
    steps: dict[int, dict[str, float]] = {}
    for record in history:
        numbers = {k: v for k, v in record.items() if (k == "loss" or k.startswith("eval_")) and isinstance(v, float)}
        if numbers:
            steps.setdefault(record["step"], {}).update(numbers)
    return steps


def trainable(model):
    """GGUF weights are dequantized to plain fp32 on load, but transformers still flags the model as
    quantized, which blocks training and saving. The tensors are ordinary fp32, so the flag is dropped."""
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model


def split(data: str, train_fraction: float = 0.75) -> tuple[list[dict], list[dict]]:
    rows = load_rows(data)
    cut = int(len(rows) * train_fraction)
    return rows[:cut], rows[cut:]
