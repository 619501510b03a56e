"""A type checker sees the real classes behind the root's lazy names (not `Any`), as a user's editor would."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

USER_FILE = """\
import hf_cachehooks
from hf_cachehooks import GenerationCache, SpeedupCallback, evaluate_model, speedups

reveal_type(hf_cachehooks.ActivationStore)
reveal_type(GenerationCache)
reveal_type(SpeedupCallback)
reveal_type(hf_cachehooks.TokenCache)
reveal_type(hf_cachehooks.Sampling)
reveal_type(speedups.plan)
reveal_type(evaluate_model("model", "data.json").miss_reason)
from hf_cachehooks import evaluate_modle  # a typo: an error, never a silent Any
"""

EXPECTED = [
    "hf_cachehooks.activations.store.ActivationStore",
    "hf_cachehooks.generation.cache.GenerationCache",
    "hf_cachehooks.training.callbacks.SpeedupCallback",
    "hf_cachehooks.conversation.cache.TokenCache",
    "hf_cachehooks.generation.backends.Sampling",
    "hf_cachehooks.training.speedups.SpeedupPlan",
    "str | None",
]

# Heavy third-party packages are skipped (their types become Any): the check is about our names, and fast.
CONFIG = """\
[mypy]
ignore_missing_imports = True
follow_imports = silent
[mypy-torch.*,transformers.*,datasets.*,evaluate.*,accelerate.*,peft.*,pyarrow.*,safetensors.*,matplotlib.*]
follow_imports = skip
[mypy-fastapi.*,uvicorn.*,httpx.*,tqdm.*,numpy.*]
follow_imports = skip
"""


def test_py_typed_ships():
    assert (ROOT / "hf_cachehooks" / "py.typed").exists()
    assert '"hf_cachehooks" = ["py.typed"]' in (ROOT / "pyproject.toml").read_text()


@pytest.mark.slow  # about 5 s: mypy reads the package cold
def test_mypy_sees_the_real_types_of_lazy_names_and_a_misspelt_one_is_an_error(tmp_path):
    pytest.importorskip("mypy")
    (tmp_path / "user.py").write_text(USER_FILE)
    (tmp_path / "mypy.ini").write_text(CONFIG)
    # The editable install is an import hook mypy cannot follow: point it at the source tree instead.
    env = {**os.environ, "MYPYPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-m", "mypy", "--config-file", "mypy.ini", "--cache-dir", str(tmp_path / "cache"), "user.py"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
    )
    revealed = re.findall(r'Revealed type is "(.*)"', done.stdout)
    errors = [line for line in done.stdout.splitlines() if ": error:" in line]
    assert done.returncode == 1 and len(errors) == 1, done.stdout + done.stderr
    assert "user.py:11" in errors[0] and "evaluate_modle" in errors[0], errors
    assert len(revealed) == len(EXPECTED), done.stdout
    for shown, expected in zip(revealed, EXPECTED):
        assert shown != "Any" and expected in shown, (shown, expected)
