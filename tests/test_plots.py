import math
import sys

import numpy as np
import pytest

from hf_cachehooks.activations.plots import DPI, plot_auroc_by_layer, plot_score_distributions
from hf_cachehooks.errors import ConfigError, MissingDependencyError

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
ROWS = [
    {"layer": 6, "auroc": 0.81, "auroc_low": 0.78, "auroc_high": 0.84, "n": 400, "n_positive": 200},
    {"layer": 0, "auroc": 0.52, "auroc_low": 0.47, "auroc_high": 0.57, "n": 400, "n_positive": 200},
    {"layer": 3, "auroc": 0.66, "auroc_low": math.nan, "auroc_high": math.nan, "n": 400, "n_positive": 200},
]


def png_size(path):
    """(width, height) from the IHDR chunk."""
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def test_auroc_by_layer_writes_png(tmp_path):
    pytest.importorskip("matplotlib")
    path = plot_auroc_by_layer(ROWS, tmp_path / "plots" / "auroc.png", title="truthfulness")
    assert path == tmp_path / "plots" / "auroc.png"
    assert path.stat().st_size > 5000
    assert png_size(path) == (round(6.4 * DPI), round(4.0 * DPI))  # 120 dpi
    with pytest.raises(ConfigError, match="No rows"):
        plot_auroc_by_layer([], tmp_path / "empty.png")
    with pytest.raises(ConfigError, match="'auroc'"):
        plot_auroc_by_layer([{"layer": 1}], tmp_path / "bad.png")


def test_auroc_plot_draws_band_chance_line_and_unit_range(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    from matplotlib.figure import Figure

    drawn = {}
    real_savefig = Figure.savefig

    def capture(self, *args, **kwargs):
        axes = self.axes[0]
        drawn["ylim"] = axes.get_ylim()
        drawn["lines"] = [(list(line.get_xdata()), list(line.get_ydata()), line.get_linestyle()) for line in axes.lines]
        drawn["collections"] = len(axes.collections)
        return real_savefig(self, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", capture)
    plot_auroc_by_layer(ROWS, tmp_path / "auroc.png")
    assert drawn["ylim"] == (0.0, 1.0)
    assert ([0.0, 3.0, 6.0], [0.52, 0.66, 0.81], "-") in drawn["lines"]  # sorted by layer
    assert any(style == "--" and set(y) == {0.5} for _, y, style in drawn["lines"])
    assert drawn["collections"] >= 2  # the CI band and the error bars


def test_score_distributions_writes_png(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    from matplotlib.figure import Figure

    drawn = {}
    real_savefig = Figure.savefig

    def capture(self, *args, **kwargs):
        axes = self.axes[0]
        drawn["legend"] = [text.get_text() for text in axes.get_legend().get_texts()]
        drawn["alphas"] = {patch.get_alpha() for patch in axes.patches}
        return real_savefig(self, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", capture)
    rng = np.random.default_rng(0)
    scores = {"true": rng.normal(1, 1, 300), "false": list(rng.normal(0, 1, 200)) + [math.nan]}
    path = plot_score_distributions(scores, tmp_path / "scores.png")
    assert drawn == {"legend": ["true (n=300)", "false (n=200)"], "alphas": {0.5}}
    assert path.stat().st_size > 5000
    assert png_size(path)[0] == round(6.4 * DPI)
    with pytest.raises(ConfigError, match="No finite scores"):
        plot_score_distributions({"a": [math.nan]}, tmp_path / "none.png")


def test_plots_name_the_extra_without_matplotlib(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(MissingDependencyError, match=r"pip install 'hf_cachehooks\[plots\]'"):
        plot_auroc_by_layer(ROWS, tmp_path / "a.png")
    with pytest.raises(MissingDependencyError, match="Plots need matplotlib"):
        plot_score_distributions({"a": [1.0, 2.0]}, tmp_path / "b.png")
    assert not list(tmp_path.glob("*.png"))
