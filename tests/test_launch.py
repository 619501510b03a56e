"""`_core/launch`: the launch's rank and size read at call time, a barrier only under a process group, no torch."""

import subprocess
import sys
from pathlib import Path

from hf_cachehooks._core.launch import World, barrier, current_world, world_from_env


def test_without_a_process_group_the_world_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("RANK", "2")
    assert current_world() == world_from_env() == World(2, 3)
    assert barrier(World(2, 3)) is False  # ranks started by hand: the caller waits on the disk instead
    monkeypatch.setenv("RANK", "3")  # outside 0..2: not a launch this process belongs to
    assert current_world() == World()
    monkeypatch.delenv("WORLD_SIZE")
    assert current_world() == World() and World().is_main and barrier(World()) is False


def test_a_running_process_group_gives_the_rank_and_size(monkeypatch, tmp_path):
    import torch.distributed as dist

    monkeypatch.setenv("WORLD_SIZE", "4")  # the group wins over the environment
    monkeypatch.setenv("RANK", "1")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        assert current_world() == World(0, 1)
        assert barrier(World(0, 1)) is False  # one process: nothing to wait for
    finally:
        dist.destroy_process_group()


def test_importing_launch_does_not_import_torch():
    code = "import sys, hf_cachehooks._core.launch; print('torch' in sys.modules)"
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
