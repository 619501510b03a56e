"""lm-eval tasks over local JSONL, written into a test's folder (no dataset download): the harness and serve tests."""

from __future__ import annotations

import json
from pathlib import Path

_DATA = "dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {}\ntest_split: test\n"
MULTIPLE_CHOICE = (
    'output_type: multiple_choice\ndoc_to_text: "{{question}}"\ndoc_to_choice: "{{choices}}"\n'
    'doc_to_target: "{{answer}}"\nmetric_list:\n  - metric: acc\n  - metric: acc_norm\n'
)


def generate_until(until: list[str], max_gen_toks: int) -> str:
    """A greedy `generate_until` task's YAML body, stopping at `until`, scored by exact match."""
    return (
        'output_type: generate_until\ndoc_to_text: "{{question}}"\ndoc_to_target: "{{answer}}"\n'
        f"generation_kwargs:\n  until: {json.dumps(until)}\n  max_gen_toks: {max_gen_toks}\n  do_sample: false\n"
        "metric_list:\n  - metric: exact_match\n"
    )


def write_task(folder: Path, name: str, task: str, rows: list[dict], body: str) -> None:
    """`<folder>/<name>.jsonl` holding `rows` and `<folder>/<name>.yaml` declaring `task` over it with `body`."""
    (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / f"{name}.yaml").write_text(f"task: {task}\n" + _DATA.format(folder / f"{name}.jsonl") + body)
