"""Coarse-to-fine search: the search space (parse, sample, narrow, edges) against closed forms, and the sweep binary
end to end: every member equals the trainer's run, stages resume, divergence is ranked last, bad input is refused."""

import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from dlcore import data, population, search
from experiments import common, config_lib, sweep, train_lib
from experiments.configs import schema

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BOUNDS = sweep.BOUNDS


# --------------------------------------------------------------------------- the search space


def test_parse_reads_every_kind_and_writes_it_back():
  space = search.parse("learning_rate=log:1e-3:1, momentum = uniform:0.5:0.99,label_smoothing=choice:0:0.1", BOUNDS)
  assert space == {"learning_rate": search.Dimension("log", 1e-3, 1.0),
                   "momentum": search.Dimension("uniform", 0.5, 0.99),
                   "label_smoothing": search.Dimension("choice", choices=(0.0, 0.1))}
  assert search.parse(search.to_text(space), BOUNDS) == space


@pytest.mark.parametrize("text, message", [
    ("", "names no hyperparameter"),
    ("learning_rate", "must be NAME=log:LOW:HIGH"),
    ("dropout=uniform:0.1:0.5", "unknown hyperparameter 'dropout'; searchable: learning_rate, momentum"),
    ("learning_rate=log:1e-3:1, learning_rate=log:1e-2:1", "names learning_rate twice"),
    ("learning_rate=logx:1e-3:1", "kind 'logx' is not one of log, uniform, choice"),
    ("learning_rate=log:a:1", "are not all numbers"),
    ("learning_rate=log:1e-3:1:3", "takes LOW:HIGH, got 3"),
    ("learning_rate=log:1:1", r"range \[1, 1\] is empty"),
    ("learning_rate=log:1:0.1", r"range \[1, 0.1\] is inverted"),
    ("weight_decay=log:0:1e-2", "a log range must lie above 0"),
    ("learning_rate=log:0:1", r"learning_rate value 0 is outside \(0, inf\)"),
    ("momentum=uniform:0.5:1", r"momentum value 1 is outside \[0, 1\)"),
    ("label_smoothing=choice:0:0", "lists a value twice"),
    ("learning_rate=log:1e-3:inf", "must be finite"),
])
def test_parse_refuses_bad_spaces_naming_the_flag(text, message):
  with pytest.raises(ValueError, match=f"study.space.*{message}|{message}") as error:
    search.parse(text, BOUNDS, arg="study.space")
  assert str(error.value).startswith("study.space") and "\n" not in str(error.value)


def test_samples_are_log_uniform_uniform_and_choices_and_seeded():
  space = search.parse("learning_rate=log:1e-4:1, momentum=uniform:0.2:0.6, label_smoothing=choice:0:0.1", BOUNDS)
  draws = search.sample(space, 8000, np.random.default_rng(0))
  assert draws == search.sample(space, 8000, np.random.default_rng(0))
  lr = np.array([d["learning_rate"] for d in draws])
  assert lr.min() >= 1e-4 and lr.max() <= 1
  per_decade = np.histogram(np.log10(lr), bins=[-4, -3, -2, -1, 0])[0] / len(lr)
  np.testing.assert_allclose(per_decade, 0.25, atol=0.02)  # log-uniform: a quarter per decade
  momentum = np.array([d["momentum"] for d in draws])
  assert 0.2 <= momentum.min() and momentum.max() < 0.6 and abs(momentum.mean() - 0.4) < 0.005
  assert abs(np.mean([d["label_smoothing"] == 0.1 for d in draws]) - 0.5) < 0.02


def test_narrow_follows_the_closed_form_and_widens_only_at_a_crowded_end():
  space = search.parse("learning_rate=log:1e-3:1, momentum=uniform:0.5:0.98, label_smoothing=choice:0:0.05:0.1",
                       BOUNDS)
  best = [{"learning_rate": 0.01, "momentum": 0.96, "label_smoothing": 0.1},
          {"learning_rate": 0.1, "momentum": 0.975, "label_smoothing": 0.0}]
  new, widened = search.narrow(space, best, BOUNDS, edge_fraction=0.1)
  pad = 0.25 * max(1.0, 0.2 * 3)  # log10 span of the best rates is 1 decade, the old range 3
  np.testing.assert_allclose([new["learning_rate"].low, new["learning_rate"].high],
                             [10 ** (-2 - pad), 10 ** (-1 + pad)])
  # momentum: 0.975 sits in the top 10% of [0.5, 0.98], so the top end moves past 0.98; the bottom end does not
  m_pad = 0.25 * max(0.015, 0.2 * 0.48)
  assert new["momentum"].low == pytest.approx(0.96 - m_pad) and new["momentum"].high == pytest.approx(0.975 + m_pad)
  assert widened == [{"name": "momentum", "side": "high", "old": 0.98, "new": new["momentum"].high}]
  assert new["label_smoothing"].choices == (0.0, 0.1)
  # at the bound itself: momentum may not reach 1, and a range never leaves its old ends where nobody crowds them
  new, _ = search.narrow(space, [{"learning_rate": 0.0011, "momentum": 0.989, "label_smoothing": 0.0}], BOUNDS)
  assert new["momentum"].high < 1.0 and new["momentum"].low >= 0.5 - 1e-12
  assert new["learning_rate"].low < 1e-3 and new["learning_rate"].high < 1


def test_edges_in_the_ranges_own_scale():
  lr = search.Dimension("log", 1e-4, 1.0)
  assert search.edge(lr, 1.5e-4, 0.1) == "low" and search.edge(lr, 0.5, 0.1) == "high"
  assert search.edge(lr, 0.01, 0.1) is None and search.edge(lr, 3.0, 0.1) == "high"
  assert search.edge(search.Dimension("uniform", 0.0, 1.0), 0.05, 0.1) == "low"
  assert search.edge(search.Dimension("choice", choices=(0.0, 0.1)), 0.1, 0.1) is None


# --------------------------------------------------------------------------- the binary


def _config(**study):
  config = schema.sweep()
  config.data.dataset = "synthetic"
  config.model.hidden = (16,)
  config.loop.update(batch_size=60, log_every=10)
  config.study.update(stage_sizes=(4, 2), stage_epochs=(1.0, 1.0), top_k=2, final_top=1, final_seeds=2,
                      final_epochs=1.0,
                      space="learning_rate=log:1e-3:1, weight_decay=log:1e-6:1e-2")
  config.study.update(**study)
  return config


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("sweep"))
  lines = []
  results = sweep.run_sweep(_config(), workdir, log=lines.append)
  return workdir, results, lines


def test_sweep_writes_every_member_and_ranks_them(finished):
  workdir, results, lines = finished
  for name in ("members.csv", "results.json", "best_config.json", "scatter.png", "curves.png", "stages/stage_1.json",
               "stages/stage_2.json", "stages/final.json"):
    assert os.path.exists(os.path.join(workdir, name)), name
  with open(os.path.join(workdir, "members.csv")) as f:
    rows = list(csv.DictReader(f))
  assert [r["stage"] for r in rows] == ["1"] * 4 + ["2"] * 2 + ["final"] * 2
  stage1 = [r for r in rows if r["stage"] == "1"]
  assert [float(r["learning_rate"]) for r in stage1] == [
      s["learning_rate"] for s in search.sample(search.parse(_config().study.space, sweep.BOUNDS), 4,
                                                np.random.default_rng([0, 1]))]
  top = sorted(stage1, key=lambda r: -float(r["val_accuracy"]))[:2]
  assert sorted(results["stages"][0]["top"]) == sorted(int(r["member"]) for r in top)
  space2 = search.parse(results["stages"][1]["space"], sweep.BOUNDS)
  for r in rows[4:6]:
    assert space2["learning_rate"].low <= float(r["learning_rate"]) <= space2["learning_rate"].high
  final = rows[6:]
  assert {int(r["seed"]) for r in final} == {0, 1} and len({r["learning_rate"] for r in final}) == 1
  assert final[0]["learning_rate"] == max(rows[4:6], key=lambda r: float(r["val_accuracy"]))["learning_rate"]
  best = results["best"]
  assert best["test_accuracy_mean"] == pytest.approx(np.mean([float(r["test_accuracy"]) for r in final]))
  assert best["test_accuracy_std"] == pytest.approx(np.std([float(r["test_accuracy"]) for r in final], ddof=1))
  assert any("ETA" in line for line in lines)
  with open(os.path.join(workdir, "results.json")) as f:
    assert json.load(f)["verdict"] == results["verdict"]


def test_a_final_member_equals_the_trainers_run_of_best_config(finished, tmp_path):
  workdir, results, _ = finished
  config = config_lib.load(os.path.join(workdir, "best_config.json"), "train")
  trainer = train_lib.train_and_evaluate(config, str(tmp_path / "trainer"), log=lambda m: None)
  member = next(m for m in results["final"]["members"] if m["seed"] == config.seed)
  assert trainer["test_loss"] == pytest.approx(member["test_loss"], rel=1e-4)
  assert trainer["test_accuracy"] == pytest.approx(member["test_accuracy"], abs=1 / 500 + 1e-9)


def test_finished_stages_are_reused_and_the_rest_retrained_identically(finished, tmp_path):
  workdir, results, _ = finished
  copy = str(tmp_path / "copy")
  os.makedirs(os.path.join(copy, "stages"))
  for name in ("stage_1.json", "stage_2.json"):  # as if killed during the final stage
    with open(os.path.join(workdir, "stages", name)) as src, open(os.path.join(copy, "stages", name), "w") as dst:
      dst.write(src.read())
  lines = []
  again = sweep.run_sweep(_config(), copy, log=lines.append)
  assert sum("finished before: reusing" in line for line in lines) == 2
  assert not any(line.startswith("[stage") and "members x" in line for line in lines)
  assert again["final"]["members"] == results["final"]["members"]
  assert again["verdict"] == results["verdict"]


def test_a_diverging_member_is_frozen_reported_and_ranked_last():
  config = _config()
  config.schedule.name = "constant"
  dataset = data.load("synthetic")
  settings = [{"learning_rate": 1e30}, {"learning_rate": 0.5}]
  stage = sweep.train_stage(config, dataset, population.make_mesh(1), settings, [0, 0], 0.5, label="t",
                            per_member_data=False, test=False, progress=sweep.Progress(30), log=lambda m: None)
  blown, fine = stage["members"]
  assert blown["diverged_at"] is not None and 0 <= blown["diverged_at"] < stage["steps"]
  assert fine["diverged_at"] is None and fine["val_accuracy"] > 0.3  # chance: 0.1
  assert [m["member"] for m in sweep.ranked(stage["members"])] == [1, 0]


def test_bad_settings_are_refused_naming_the_key(monkeypatch):
  cases = [
      (dict(stage_sizes=(4,), stage_epochs=(1.0, 2.0)), "one entry per stage"),
      (dict(stage_sizes=(4, 0), stage_epochs=(1.0, 1.0)), r"study.stage_sizes\[1\] must be a positive integer"),
      (dict(stage_epochs=(1.0, 0.0)), r"study.stage_epochs\[1\] must be > 0"),
      (dict(top_k=5), "study.top_k 5 is more than the 4 members of stage 1"),
      (dict(final_top=3), "study.final_top 3 is more than the 2 members of the last stage"),
      (dict(edge=0.5), r"study.edge must be in \(0, 0.5\)"),
      (dict(space="penalty_strength=log:1e-4:1"), "searches penalty_strength, but loss.penalty_strength.*no effect"),
  ]
  for study, message in cases:
    with pytest.raises(ValueError, match=message):
      sweep.validate(_config(**study))
  adam = _config(space="momentum=uniform:0.5:0.9")
  adam.optimizer.name = "adam"
  with pytest.raises(ValueError, match="searches momentum, but optimizer.momentum.*no effect"):
    sweep.validate(adam)
  monkeypatch.setattr(sweep.jax, "device_count", lambda: 4)
  with pytest.raises(ValueError, match=r"study.stage_sizes\[1\] = 2 members do not divide over the 4 devices"):
    sweep.validate(_config(stage_sizes=(4, 2)))


def test_the_binary_refuses_bad_input_in_one_line_and_writes_nothing(tmp_path):
  workdir = tmp_path / "never"
  proc = subprocess.run([sys.executable, "-m", "experiments.sweep", "--config.data.dataset=synthetic",
                         "--config.study.space=weight_decay=log:0:1e-2", f"--workdir={workdir}"],
                        cwd=ROOT, capture_output=True, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"},
                        timeout=120)
  assert proc.returncode != 0
  assert proc.stderr.strip().splitlines()[-1] == (
      "error: study.space: weight_decay: a log range must lie above 0, got [0, 0.01] (use uniform to include 0)")
  assert not workdir.exists()


def test_a_changed_config_is_refused_unless_overwrite(tmp_path):
  common.write_json(str(tmp_path / "config.json"), config_lib.to_json_dict(_config(), "sweep"))
  (tmp_path / "stages").mkdir()
  check = lambda config, overwrite: common.check_study_workdir(
      str(tmp_path), config, binary="sweep", resumable_keys=sweep.RESUMABLE_KEYS, overwrite=overwrite, what="sweep")
  check(_config(), False)  # the same sweep: resumed
  changed = _config(top_k=1)
  changed.loop.log_every = 3  # may change on resume
  with pytest.raises(ValueError, match=r"different config \(study.top_k: 2 -> 1\); pass --overwrite"):
    check(changed, False)
  check(changed, True)
  assert os.listdir(tmp_path) == []
