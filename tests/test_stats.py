"""stats.py and the activation-statistics binary against numpy float64 and the lecture's published numbers."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from dlcore import models, stats
from experiments import activation_stats
from experiments.configs import schema

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NP_ACT = {"tanh": np.tanh, "relu": lambda x: np.maximum(x, 0.0)}


def numpy_forward(variables, x, nonlinearity):
  """Post-activations of a bias-free MLP recomputed in float64 from the same kernels."""
  h = np.asarray(x, np.float64)
  posts = []
  for i in range(len(variables["params"])):
    h = NP_ACT[nonlinearity](h @ np.asarray(variables["params"][f"layer{i}"]["linear"]["kernel"], np.float64))
    posts.append(h)
  return posts


@pytest.mark.parametrize("nonlinearity,init,scale", [("tanh", "normal", 0.01), ("tanh", "normal", 1.0),
                                                     ("relu", "he_normal", None), ("tanh", "lecun_normal", None)])
def test_run_case_matches_numpy_forward(nonlinearity, init, scale):
  x = jax.random.normal(jax.random.key(0), (200, 60))
  case = activation_stats.Case(nonlinearity, init, scale)
  result = activation_stats.run_case(case, x, hidden=(60,) * 4, seed=3, grads=False)
  model = models.MLP(hidden=(60,) * 4, num_classes=0, activation=nonlinearity, initializer=init,
                     init_scale=scale, use_bias=False)
  variables = models.init_variables(model, jax.random.key(3), x)
  expected = numpy_forward(variables, x, nonlinearity)
  assert len(result["layers"]) == 4
  for record, post in zip(result["layers"], expected):
    np.testing.assert_allclose(record["mean"], post.mean(), atol=1e-5)
    np.testing.assert_allclose(record["std"], post.std(), rtol=1e-4)
    np.testing.assert_allclose(record["p50"], np.percentile(post, 50), atol=1e-5)


def test_lecture_tanh_small_gaussian_stds_collapse_as_published():
  # cs231n: 1000 x 500 unit-Gaussian inputs, W = 0.01 * randn(500, 500), tanh: 0.213, 0.0476, 0.0106, 0.00238.
  x = jax.random.normal(jax.random.key(0), (1000, 500))
  result = activation_stats.run_case(activation_stats.Case("tanh", "normal", 0.01), x, (500,) * 4, 1, False)
  np.testing.assert_allclose([r["std"] for r in result["layers"]], [0.213, 0.0476, 0.0106, 0.00238], rtol=0.03)


def test_lecture_relu_he_keeps_mean_and_std_in_every_layer():
  # Closed form for relu(N(0, 2)): mean = sqrt(2) / sqrt(2 pi) = 0.564, std = sqrt(1 - 1/pi) = 0.826.
  x = jax.random.normal(jax.random.key(0), (1000, 500))
  result = activation_stats.run_case(activation_stats.Case("relu", "he_normal"), x, (500,) * 6, 1, False)
  for record in result["layers"]:
    assert abs(record["mean"] - 1 / np.sqrt(np.pi)) < 0.05
    assert abs(record["std"] - np.sqrt(1 - 1 / np.pi)) < 0.06


def test_lecture_relu_lecun_halves_variance_per_layer():
  x = jax.random.normal(jax.random.key(0), (1000, 500))
  layers = activation_stats.run_case(activation_stats.Case("relu", "lecun_normal"), x, (500,) * 6, 1, False)["layers"]
  second_moments = [r["std"] ** 2 + r["mean"] ** 2 for r in layers]
  np.testing.assert_allclose(np.array(second_moments[1:]) / second_moments[:-1], 0.5, rtol=0.1)


def test_tanh_unit_gaussian_saturates_and_batchnorm_rescues():
  x = jax.random.normal(jax.random.key(0), (500, 300))
  big = activation_stats.run_case(activation_stats.Case("tanh", "normal", 1.0), x, (300,) * 3, 1, False)
  assert all(r["saturated"] > 0.85 for r in big["layers"])
  bn = activation_stats.run_case(activation_stats.Case("tanh", "normal", 0.01, "before"), x, (300,) * 6, 1, False)
  # BatchNorm before tanh: pre-activations are unit Gaussian, so post std = std(tanh(N(0,1))) = 0.6278.
  tanh_std = np.tanh(np.random.default_rng(0).standard_normal(2_000_000)).std()
  for record in bn["layers"]:
    assert abs(record["pre"]["std"] - 1.0) < 1e-3
    assert abs(record["std"] - tanh_std) < 0.01


def test_gradients_match_numpy_backprop():
  x = jax.random.normal(jax.random.key(0), (30, 8))
  model = models.MLP(hidden=(8, 8, 8), num_classes=0, activation="tanh", initializer="lecun_normal",
                     use_bias=False)
  variables = models.init_variables(model, jax.random.key(1), x)
  grads = stats.gradients(model, variables, x, jax.random.key(2))
  upstream = np.asarray(jax.random.normal(jax.random.key(2), (30, 8)), np.float64)
  kernels = [np.asarray(variables["params"][f"layer{i}"]["linear"]["kernel"], np.float64) for i in range(3)]
  hs, posts = [np.asarray(x, np.float64)], []
  for w in kernels:
    posts.append(np.tanh(hs[-1] @ w))
    hs.append(posts[-1])
  d_post = upstream
  for i in reversed(range(3)):
    np.testing.assert_allclose(grads[i]["grad"], d_post, rtol=1e-4, atol=1e-6)
    d_pre = d_post * (1 - posts[i] ** 2)
    np.testing.assert_allclose(grads[i]["weight_grad"], hs[i].T @ d_pre, rtol=1e-4, atol=1e-5)
    d_post = d_pre @ kernels[i].T


def test_gradients_come_back_in_layer_order_beyond_ten_layers():
  # Sorted keys would put 'layer10' before 'layer2'; in call order the last layer's activation gradient is
  # exactly the upstream gradient.
  x = jax.random.normal(jax.random.key(0), (64, 16))
  model = models.MLP(hidden=(16,) * 12, num_classes=0, activation="tanh", initializer="normal", init_scale=1.0,
                     use_bias=False)
  variables = models.init_variables(model, jax.random.key(1), x)
  grads = stats.gradients(model, variables, x, jax.random.key(2))
  assert [g["name"] for g in grads] == [f"layer{i}" for i in range(12)]
  upstream = jax.random.normal(jax.random.key(2), (64, 16))
  np.testing.assert_allclose(grads[-1]["grad"], upstream)


def test_summarize_and_saturation_against_numpy():
  x = np.random.default_rng(0).standard_normal((100, 7))
  s = stats.summarize(x)
  assert s["mean"] == pytest.approx(x.mean()) and s["std"] == pytest.approx(x.std())
  assert s["p15"] == pytest.approx(np.percentile(x, 15)) and s["p85"] == pytest.approx(np.percentile(x, 85))
  t = np.tanh(3 * x)
  assert stats.saturation(t, "tanh") == pytest.approx(np.mean(np.abs(t) > 0.99))
  assert stats.saturation(np.maximum(x, 0), "relu") == pytest.approx(np.mean(x <= 0))


def test_case_parse_rejects_bad_names():
  assert activation_stats.Case.parse("relu:normal:0.5:before") == activation_stats.Case("relu", "normal", 0.5,
                                                                                        "before")
  with pytest.raises(ValueError, match="valid names"):
    activation_stats.Case.parse("relu:nope")
  with pytest.raises(ValueError, match="neither an init_scale"):
    activation_stats.Case.parse("relu:normal:bogus")


def test_binary_end_to_end(tmp_path):
  cmd = [sys.executable, "-m", "experiments.activation_stats", "--config.model.hidden=(40, 40, 40)",
         "--config.study.input_dim=40", "--config.study.num_inputs=100", f"--workdir={tmp_path}",
         "--config.study.cases=('tanh:normal:0.01', 'relu:he_normal', 'tanh:lsuv')"]
  out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True).stdout
  assert "std of each hidden layer" in out
  results = json.loads((tmp_path / "results.json").read_text())
  assert [c["case"] for c in results["cases"]] == ["tanh normal(0.01)", "relu he_normal", "tanh lsuv"]
  for case in results["cases"]:
    assert len(case["layers"]) == 3
    assert all({"mean", "std", "grad_std", "weight_grad_std"} <= set(layer) for layer in case["layers"])
  # LSUV makes every pre-activation unit-variance on the very batch the binary uses.
  assert all(abs(layer["pre"]["std"] - 1) < 0.01 for layer in results["cases"][2]["layers"])
  for name in ("config.json", "results.csv", "mean_std.png", "histograms_tanh_lsuv.png"):
    assert (tmp_path / name).stat().st_size > 0
  assert json.loads((tmp_path / "config.json").read_text())["binary"] == "activation_stats"
  bad = subprocess.run(cmd[:3] + ["--config.study.compare=False", "--config.model.activation=nope",
                                  f"--workdir={tmp_path / 'bad'}"], cwd=ROOT, capture_output=True, text=True)
  assert bad.returncode != 0 and "relu" in bad.stderr and not (tmp_path / "bad").exists()
  assert "gradients.png" in out
  assert (tmp_path / "gradients.png").stat().st_size > 0


# --- plots ---------------------------------------------------------------------------------------------------


LECTURE_CASES = [activation_stats.Case.parse(c).label for c in schema.activation_stats().study.cases]


def fake_results(depth=10, grads=True):
  """The lecture's eight case labels with per-layer records whose stds span ten orders of magnitude."""
  results = []
  for c, label in enumerate(LECTURE_CASES):
    layers = [{"mean": 0.05 * c, "std": 0.21 * (0.2 if c == 0 else 0.9) ** i} for i in range(depth)]
    if grads:
      for i, layer in enumerate(layers):
        layer.update(grad_std=0.1 ** (depth - 1 - i) if c == 0 else 1.0, weight_grad_std=0.02 * (c + 1))
    results.append({"case": label, "layers": layers})
  results[3]["layers"][-1]["std"] = 0.0  # a dead layer: left off the log axis, not clipped onto it
  return results


def panels(fig):
  return [ax for ax in fig.axes if ax.axison]


def test_histograms_share_one_x_range_and_bins_so_the_tanh_collapse_shows():
  x = jax.random.normal(jax.random.key(0), (200, 40))
  result = activation_stats.run_case(activation_stats.Case("tanh", "normal", 0.01), x, (40,) * 4, 1, False)
  fig = activation_stats.histogram_figure(result, bins=20)
  axes = panels(fig)
  assert len(axes) == 4
  lo, hi = axes[0].get_xlim()
  assert lo <= -1 and hi >= 1 and hi - lo < 2.5
  edges = [[round(p.get_x(), 9) for p in ax.patches] for ax in axes]
  counts = [np.array([p.get_height() for p in ax.patches]) for ax in axes]
  for i, ax in enumerate(axes):
    assert ax.get_xlim() == (lo, hi) and axes[0].get_shared_x_axes().joined(axes[0], ax)
    assert edges[i] == edges[0] and len(edges[i]) == 20
    assert ax.get_yscale() == "log"
    assert ax.get_title().startswith(f"layer {i + 1}: std ")
    assert ax.get_xlabel() == "post-activation value" and "count" in ax.get_ylabel()
    assert min(t.get_fontsize() for t in ax.get_xticklabels() + ax.get_yticklabels()) >= 8
  # std 0.05 -> 0.003 -> ...: layer 1 spreads over several shared bins, the deeper layers sit in the central two.
  assert np.count_nonzero(counts[0]) > 3 and all(np.count_nonzero(c) <= 2 for c in counts[1:])
  activation_stats.common.plt.close(fig)


def test_relu_histograms_span_the_largest_value_over_layers():
  x = jax.random.normal(jax.random.key(0), (200, 40))
  result = activation_stats.run_case(activation_stats.Case("relu", "he_normal"), x, (40,) * 3, 1, False)
  top = max(float(p.max()) for p in result["_post"])
  assert activation_stats.histogram_range(result["_post"], "relu") == (0.0, top)
  assert activation_stats.histogram_range([np.zeros(5)], "relu") == (0.0, 1.0)
  assert activation_stats.histogram_range([np.full(5, 0.5)], "sigmoid") == (0.0, 1.0)
  fig = activation_stats.histogram_figure(result, bins=10)
  for ax in panels(fig):
    lo, hi = ax.get_xlim()
    assert lo <= 0 < top <= hi < 1.1 * top
  activation_stats.common.plt.close(fig)
  fig = activation_stats.histogram_figure(result, bins=10, x_range=(0.0, 3 * top))  # a range shared by cases
  for ax in panels(fig):
    lo, hi = ax.get_xlim()
    assert lo <= 0 and 3 * top <= hi < 3.3 * top
  activation_stats.common.plt.close(fig)


def test_every_histogram_panel_has_its_own_tick_labels_clear_of_its_neighbours():
  posts = [np.random.default_rng(i).standard_normal((30, 8)) for i in range(7)]
  fig = activation_stats.histogram_figure({"case": "elu x", "nonlinearity": "elu", "_post": posts}, bins=10)
  fig.canvas.draw()
  renderer = fig.canvas.get_renderer()
  axes = panels(fig)
  assert len(axes) == 7  # 2 x 5 grid, the last three slots empty
  for ax in axes:
    for labels in (ax.get_xticklabels(), ax.get_yticklabels()):
      assert any(t.get_visible() and t.get_text() for t in labels)
  boxes = [ax.get_tightbbox(renderer) for ax in axes]  # each panel with its labels
  assert not any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1:])
  activation_stats.common.plt.close(fig)


def legend_clear_of_axes(fig):
  fig.canvas.draw()
  renderer = fig.canvas.get_renderer()
  (legend,) = fig.legends
  box = legend.get_window_extent(renderer)
  return [t.get_text() for t in legend.get_texts()], all(
      ax.get_legend() is None and not box.overlaps(ax.get_tightbbox(renderer)) for ax in fig.axes)


def test_mean_std_has_a_log_std_axis_labels_and_a_legend_off_the_lines():
  fig = activation_stats.mean_std_figure(fake_results())
  ax_mean, ax_std = fig.axes
  assert ax_mean.get_yscale() == "linear" and ax_std.get_yscale() == "log"
  for ax in (ax_mean, ax_std):
    assert ax.get_xlabel() == "hidden layer index" and ax.get_ylabel()
    assert list(ax.get_xticks()) == list(range(1, 11))
  assert "std" in ax_std.get_ylabel() and "mean" in ax_mean.get_ylabel()
  assert 0 < ax_std.get_ylim()[0] < 0.21 * 0.2 ** 9  # the deepest tanh 0.01 std is on the axis
  assert np.isnan(ax_std.lines[3].get_ydata()[-1])  # the dead layer's std 0
  labels, clear = legend_clear_of_axes(fig)
  assert labels == LECTURE_CASES and clear
  activation_stats.common.plt.close(fig)


def test_gradients_figure_plots_both_gradient_stds_on_log_axes():
  assert activation_stats.gradients_figure(fake_results(grads=False)) is None
  fig = activation_stats.gradients_figure(fake_results())
  ax_act, ax_weight = fig.axes
  for ax, key in ((ax_act, "grad_std"), (ax_weight, "weight_grad_std")):
    assert ax.get_yscale() == "log" and ax.get_xlabel() == "hidden layer index" and ax.get_ylabel()
    assert len(ax.lines) == 8
    np.testing.assert_allclose(ax.lines[0].get_ydata(), [r[key] for r in fake_results()[0]["layers"]])
  labels, clear = legend_clear_of_axes(fig)
  assert labels == LECTURE_CASES and clear
  activation_stats.common.plt.close(fig)


def test_gradients_png_written_only_when_grads_are_computed(tmp_path):
  x = jax.random.normal(jax.random.key(0), (50, 10))
  case = activation_stats.Case("tanh", "lecun_normal")
  without = [activation_stats.run_case(case, x, (10, 10), 1, grads=False)]
  assert not activation_stats.plot_gradients(without, str(tmp_path / "a.png"))
  assert not (tmp_path / "a.png").exists()
  with_grads = [activation_stats.run_case(case, x, (10, 10), 1, grads=True)]
  assert activation_stats.plot_gradients(with_grads, str(tmp_path / "b.png"))
  assert (tmp_path / "b.png").stat().st_size > 0


def test_a_std_axis_within_one_decade_is_labelled_in_plain_numbers():
  results = [{"case": "relu he_normal", "layers": [{"mean": 0.6, "std": s} for s in (0.82, 0.86, 0.9, 0.98)]}]
  fig = activation_stats.mean_std_figure(results)
  fig.canvas.draw()
  ax_std = fig.axes[1]
  labels = [t.get_text() for t in ax_std.get_yticklabels(minor=True) if t.get_text()]
  assert len(labels) >= 3 and all(0.7 < float(t) < 1.1 for t in labels)  # '0.9', not '$9 \times 10^{-1}$'
  assert min(t.get_fontsize() for t in ax_std.get_yticklabels(minor=True)) >= 8
  activation_stats.common.plt.close(fig)
