"""A short fine-tune of SmolLM2 with the Trainer speed-ups, used by `main.py --experiment full`.

The fine-tuned checkpoint is saved under outputs/finetune/<key>/, keyed by the base model's files, the
training data and every training setting: re-running reuses it (the "model checkpoints were
reused"), while any change trains a new model whose weights, and so whose prediction-cache key, differ.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

from hf_cachehooks import SpeedupCallback, SpeedupConfig, load_rows, make_key, speedups
from hf_cachehooks._core.fingerprint import fingerprint_data, hash_files
from hf_cachehooks._models.sources import resolve_files

log = logging.getLogger("finetune")
TEMPLATE = "Question: {question}\nAnswer:"


def training_texts(rows: list[dict]) -> list[str]:
    """Prompt plus the first accepted answer, ended by the EOS the tokenizer adds later."""
    return [
        TEMPLATE.format(**r) + " " + (r["answer"][0] if isinstance(r["answer"], list) else r["answer"]) for r in rows
    ]


def finetune(
    folder: str,
    gguf_file: str,
    train_rows: list[dict],
    steps: int,
    learning_rate: float,
    config: SpeedupConfig,
    output_root: Path = Path("outputs/finetune"),
    seed: int = 0,
) -> Path:
    """Fine-tune (or reuse) and return the checkpoint folder."""
    loaded = resolve_files(folder, {"gguf_file": gguf_file}) or {}  # the files from_pretrained reads
    key = make_key(
        "finetune",
        {
            "base": {name: hash_files(files, base=base) for name, (base, files) in loaded.items()},
            "data": fingerprint_data(train_rows),
            "steps": steps,
            "learning_rate": learning_rate,
            "seed": seed,
            "template": TEMPLATE,
            "config": dataclasses.asdict(config),  # every field is a training setting
        },
    )
    checkpoint = output_root / f"SmolLM2-135M-qa_{key.short}"
    if (checkpoint / "DONE").exists():
        log.info("♻️  Reusing the fine-tuned checkpoint %s (same base model, data and settings).", checkpoint)
        return checkpoint

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
    texts = [t + tokenizer.eos_token for t in training_texts(train_rows)]
    dataset = Dataset.from_dict({"text": texts}).map(
        lambda b: tokenizer(b["text"], truncation=True, max_length=64), batched=True, remove_columns=["text"]
    )
    args = TrainingArguments(
        str(checkpoint) + ".run",
        max_steps=steps,
        learning_rate=learning_rate,
        seed=seed,
        logging_steps=max(1, steps // 5),
        save_strategy="no",
        report_to=[],
        lr_scheduler_type="constant",
        **plan.training_args_kwargs(),
    )
    callback = SpeedupCallback(plan, warmup_steps=min(3, steps - 1))
    trainer = Trainer(
        model=model, args=args, train_dataset=dataset, data_collator=plan.data_collator(tokenizer), callbacks=[callback]
    )
    trainer.train()
    model.save_pretrained(checkpoint)
    tokenizer.save_pretrained(checkpoint)
    (checkpoint / "DONE").write_text(key.digest)
    return checkpoint


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
