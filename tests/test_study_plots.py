"""mhr_jax.experiment.study_plots: each figure is a readable PNG; bad input and a failed write leave nothing behind."""
import os

import matplotlib.image
import numpy as np
import pytest

from mhr_jax import storage
from mhr_jax.experiment import statistics, study_plots


def _rows(n=3):
  rng = np.random.default_rng(0)
  rows = []
  for i, verdict in zip(range(n), ["supported", "contradicted", "inconclusive"] * n):
    obs = [{"diff": float(d), "task": f"t{j % 4}", "seeds": [j // 4]} for j, d in
           enumerate(rng.normal(i - 1.0, 1.0, size=8))]
    result = statistics.paired_bootstrap(obs, n_resamples=200)
    rows.append({"id": f"H{i + 1}", "comparison": "mhr vs poly", **result._asdict(), "verdict": verdict,
                 "observations": obs})
  return rows


def _png(path):
  image = matplotlib.image.imread(path)
  assert image.ndim == 3 and image.shape[2] == 4 and image.dtype == np.float32, image.shape  # RGBA
  assert image[..., :3].std() > 0.05  # not a blank canvas
  return image


def _files(directory):
  return sorted(os.listdir(directory))


def test_forest_plot_writes_a_png_one_band_per_hypothesis(tmp_path):
  study_plots.forest_plot(_rows(1), str(tmp_path / "one.png"))
  study_plots.forest_plot(_rows(4), str(tmp_path / "four.png"))
  one, four = _png(tmp_path / "one.png"), _png(tmp_path / "four.png")
  assert four.shape[0] > one.shape[0] + 100  # 0.6 inch (66 pixels at 110 dpi) per row
  assert _files(tmp_path) == ["four.png", "one.png"]


def test_forest_plot_colours_follow_the_verdicts(tmp_path):
  def colour_pixels(rows):
    study_plots.forest_plot(rows, str(tmp_path / "f.png"))
    rgb = (_png(tmp_path / "f.png")[..., :3] * 255).round()
    return {name: int(np.all(np.abs(rgb - np.array(rgb_of)) < 8, axis=-1).sum())
            for name, rgb_of in (("green", (44, 160, 44)), ("red", (214, 39, 40)))}

  rows = _rows(2)  # H1 supported (green), H2 contradicted (red)
  both = colour_pixels(rows)
  assert both["green"] > 100 and both["red"] > 100
  only_green = colour_pixels([rows[0], {**rows[1], "verdict": "supported"}])
  assert only_green["red"] == 0 and only_green["green"] > both["green"]


def test_line_and_bar_plots_write_pngs(tmp_path):
  xs = [1, 4, 16, 64]
  series = {"mhr": ([0.1, 0.3, 0.5, 0.6], [0.0, 0.2, 0.4, 0.55], [0.2, 0.4, 0.6, 0.7]),
            "poly": (np.array([0.1, 0.2, 0.4, 0.5]), np.array([0.05, 0.1, 0.3, 0.45]),
                     np.array([0.15, 0.3, 0.5, 0.55]))}
  study_plots.line_plot(xs, series, str(tmp_path / "sweep.png"), "shots", "ROUGE-L difference", "a sweep",
                        xscale="log")
  # A percentile interval need not contain its mean (lora's below): drawn, not refused.
  bars = {"mhr": (0.4, 0.2, 0.6), "poly": (0.1, -0.1, 0.3), "lora": (-0.2, -0.15, 0.1)}
  study_plots.bar_plot(bars, str(tmp_path / "sub" / "bars.png"), "gradient cosine", "alignment")
  _png(tmp_path / "sweep.png")
  _png(tmp_path / "sub" / "bars.png")
  assert _files(tmp_path) == ["sub", "sweep.png"] and _files(tmp_path / "sub") == ["bars.png"]


@pytest.mark.parametrize("call, match", [
    (lambda p: study_plots.forest_plot([], p), "^forest_plot: no rows"),
    (lambda p: study_plots.forest_plot([{k: v for k, v in _rows(1)[0].items() if k != "ci_low"}], p),
     r"^forest_plot: row 0 \(H1\): missing key 'ci_low'"),
    (lambda p: study_plots.forest_plot([{**_rows(1)[0], "verdict": "maybe"}], p), "'verdict' must be one of"),
    (lambda p: study_plots.forest_plot([{**_rows(1)[0], "ci_high": float("nan")}], p), "must be a finite number"),
    (lambda p: study_plots.forest_plot([{**_rows(1)[0], "observations": [{"diff": None}]}], p),
     "observation 0 'diff': must be a finite number"),
    (lambda p: study_plots.line_plot([1, 2], {"a": ([1, 2], [0, 1], [2])}, p, "x", "y", "t"),
     "^line_plot: series 'a': ci_highs must hold 2 values"),
    (lambda p: study_plots.line_plot([1, 2], {"a": ([1, 2], [0, 3], [2, 2])}, p, "x", "y", "t"),
     "a ci_low exceeds its ci_high"),
    (lambda p: study_plots.bar_plot({"mhr": (0.1, 0.3, 0.2)}, p, "y", "t"), "^bar_plot: bar 'mhr': ci_low 0.3"),
    (lambda p: study_plots.bar_plot({"mhr": (0.1, 0.2)}, p, "y", "t"), r"expected \(mean, ci_low, ci_high\)"),
])
def test_bad_input_is_a_one_line_error_and_writes_nothing(tmp_path, call, match):
  with pytest.raises(ValueError, match=match) as error:
    call(str(tmp_path / "out" / "figure.png"))
  assert "\n" not in str(error.value)
  assert _files(tmp_path) == []


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path, monkeypatch):
  path = tmp_path / "forest.png"
  path.write_bytes(b"the previous figure")

  def replace_fails(src, dst):
    raise OSError("disk full")

  monkeypatch.setattr(storage.os, "replace", replace_fails)
  with pytest.raises(OSError, match="disk full"):
    study_plots.forest_plot(_rows(2), str(path))
  assert _files(tmp_path) == ["forest.png"] and path.read_bytes() == b"the previous figure"
