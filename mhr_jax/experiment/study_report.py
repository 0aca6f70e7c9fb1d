"""The study's report, from its cells' results files alone (NumPy and matplotlib, no JAX): each hypothesis'
paired observations, their crossed bootstrap interval and verdict, the dev-only tuning, the sweep, and the
tables and figures (mhr_jax/experiment/study.py runs the study; this module reads what it wrote)."""
from __future__ import annotations

import os
import re
from typing import Mapping, Sequence

import numpy as np

from mhr_jax.errors import RunError
from mhr_jax.experiment import statistics, study_plots
from mhr_jax.storage import read_json, write_json_atomic, write_text_atomic

PLAN_FILE = "study_plan.json"
ALIGNMENT = "mean_pairwise_gradient_cosine"     # the analysis' metric
_REDUCERS = r"\s*(max|min|mean)\((.*)\)\s*"


def stages_of(expression: str) -> list[str]:
  """The stage names of a quantity: "adapt/mhr" or "max(adapt/poly, adapt/lora)" (max, min, mean)."""
  match = re.fullmatch(_REDUCERS, expression)
  names = [n.strip() for n in match.group(2).split(",")] if match else [expression.strip()]
  if not all(re.fullmatch(r"[\w.-]+/[\w.@-]+", n) for n in names):
    raise ValueError(f"Study: quantity {expression!r}: expected a stage name (e.g. 'adapt/mhr') or "
                     "max(...), min(...), mean(...) of stage names")
  return names


def _cell_values(cell_dir: str, stage: str, metric: str) -> dict[tuple, float] | None:
  """{(task, seed): value} of a stage of a cell: per pair (few-shot and zero-shot: `metric`) or one value
  (analysis: gradient alignment, key (None, None)); None when the stage is missing."""
  if stage.split("/")[0] == "analysis":
    results = read_json(os.path.join(cell_dir, *stage.split("/"), "analysis.json"))
    return None if results is None else {(None, None): float(results[ALIGNMENT])}
  results = read_json(os.path.join(cell_dir, *stage.split("/"), "results.json"))
  if results is None or results.get("status") != "done":
    return None
  if any(metric not in p for p in results["pairs"]):
    raise RunError(f"study: {cell_dir}/{stage}: its pairs have no {metric!r} (Study.metric)")
  return {(p["task"], p["seed"]): float(p[metric]) for p in results["pairs"]}


def _dev_score(cell_dir: str, stage: str) -> list[float]:
  results = read_json(os.path.join(cell_dir, *stage.split("/"), "results.json"))
  if results is None:
    return []
  return [float(p["best_dev_score"]) for p in results["pairs"] if p.get("best_dev_score") is not None]


def tuned_stages(plan: Mapping) -> dict[str, dict]:
  """{stage: {"chosen": candidate, "dev": {candidate: mean dev score}}} of Study.tune (main cells only)."""
  out = {}
  main = [c for c in plan["cells"] if c["role"] == "main"]
  for stage, candidates in plan["tune"].items():
    dev = {}
    for candidate in candidates:
      scores = [x for c in main for x in _dev_score(c["dir"], candidate)]
      if not scores:
        raise RunError(f"Study.tune[{stage!r}]: {candidate} has no dev scores (set adapt/AdaptConfig.select_every)")
      dev[candidate] = float(np.mean(scores))
    out[stage] = {"chosen": max(candidates, key=lambda c: dev[c]), "dev": dev}
  return out


def _quantity(plan: Mapping, expression: str, tuned: Mapping, cells_of: Sequence[Mapping]) -> dict[tuple, float]:
  """{(task, pretrain seed, adapt seed): value} of a quantity over the given cells."""
  match = re.fullmatch(r"\s*(max|min|mean)\((.*)\)\s*", expression)
  reduce = {"max": np.max, "min": np.min, "mean": np.mean}[match.group(1)] if match else None
  per_stage = []
  base = [c for c in plan["cells"] if c["role"] == "base"]
  for stage in stages_of(expression):
    stage = tuned.get(stage, {}).get("chosen", stage)
    values = {}
    for c in cells_of:
      # A shared stage ran once, in the base cell: its values stand for every pre-training seed.
      where = base[0]["dir"] if stage in plan.get("shared", ()) else c["dir"]
      found = _cell_values(where, stage, plan["metric"])
      if found is None:
        raise RunError(f"study: {os.path.basename(where)}/{stage} has no results (run the study first)")
      kind = stage.split("/")[0]
      for (task, seed), value in found.items():
        values[(task, c["seed"], seed if kind == "adapt" else None)] = value
    per_stage.append(values)
  keys = set(per_stage[0]).intersection(*per_stage[1:])
  if reduce is None:
    return per_stage[0]
  return {k: float(reduce([v[k] for v in per_stage])) for k in keys}


def _observations(a: Mapping[tuple, float], b: Mapping[tuple, float]) -> list[dict]:
  out = []
  for key in sorted(set(a) & set(b), key=lambda k: tuple("" if x is None else str(x) for x in k)):
    task, pseed, aseed = key
    out.append({"diff": a[key] - b[key], "task": task, "seeds": [pseed] if aseed is None else [pseed, aseed]})
  return out


def _interval(plan: Mapping, observations: list[dict]) -> statistics.BootstrapResult:
  s = plan["statistics"]
  return statistics.paired_bootstrap(observations, n_resamples=s["n_resamples"], confidence=s["confidence"],
                                     seed=s["seed"])


def hypothesis_rows(plan: Mapping, tuned: Mapping) -> list[dict]:
  main = [c for c in plan["cells"] if c["role"] == "main"]
  rows = []
  for h in plan["hypotheses"]:
    a, b = _quantity(plan, h["a"], tuned, main), _quantity(plan, h["b"], tuned, main)
    observations = _observations(a, b)
    if not observations:
      raise RunError(f"study: hypothesis {h['id']}: {h['a']} and {h['b']} have no observation in common (a "
                     "few-shot quantity has one per adaptation seed, a zero-shot one per pre-training seed)")
    result = _interval(plan, observations)
    margin = float(h.get("margin", 0.0))
    rows.append({"id": h["id"], "claim": h["claim"], "comparison": f"{h['a']} - {h['b']}",
                 "a": h["a"], "b": h["b"], "test": h["test"], "margin": margin,
                 "metric": ALIGNMENT if stages_of(h["a"])[0].startswith("analysis/") else plan["metric"],
                 "mean_diff": result.mean_diff, "ci_low": result.ci_low, "ci_high": result.ci_high, "n": result.n,
                 "verdict": statistics.verdict(result.ci_low, result.ci_high, margin=margin, kind=h["test"]),
                 "observations": observations})
  return rows


def _level(plan: Mapping, expression: str, tuned: Mapping, cells_of: Sequence[Mapping]) -> dict:
  """Mean of a quantity and its crossed bootstrap interval (the 'difference' against nothing)."""
  values = _quantity(plan, expression, tuned, cells_of)
  observations = _observations(values, {k: 0.0 for k in values})
  result = _interval(plan, observations)
  return {"mean": result.mean_diff, "ci_low": result.ci_low, "ci_high": result.ci_high, "n": result.n}


def report(model_dir: str) -> dict[str, str]:
  """results.json, results.md and the figures of a finished study, from its files alone; returns the paths."""
  plan = read_json(os.path.join(model_dir, PLAN_FILE))
  if plan is None:
    raise RunError(f"{model_dir}: no {PLAN_FILE} (run python -m mhr_jax.experiment.study first)")
  tuned = tuned_stages(plan)
  rows = hypothesis_rows(plan, tuned)
  main = [c for c in plan["cells"] if c["role"] == "main"]
  quantities = sorted({s for h in plan["hypotheses"] for side in ("a", "b") for s in stages_of(h[side])})
  levels = {q: _level(plan, q, tuned, main) for q in quantities}
  sweep = {}
  if plan["sweep"]:
    key, values = plan["sweep"]
    main_value = plan["sweep_main_value"]
    for stage in plan["sweep_stages"]:
      points = []
      for value in sorted(set(values) | {main_value}):
        chosen = main if value == main_value else [c for c in plan["cells"] if c["role"] == "sweep"
                                                   and c["value"] == value]
        points.append({"value": value, **_level(plan, stage, tuned, chosen)})
      sweep[stage] = points
  results = {"hypotheses": rows, "levels": levels, "tuning": tuned, "sweep": {"key": plan["sweep"][0] if plan[
      "sweep"] else None, "curves": sweep}, "cells": plan["cells"], "statistics": plan["statistics"]}
  files = {"json": os.path.join(model_dir, "results.json"), "markdown": os.path.join(model_dir, "results.md"),
           "forest": os.path.join(model_dir, "forest.png")}
  study_plots.forest_plot(rows, files["forest"])
  if sweep:
    files["sweep"] = os.path.join(model_dir, "sweep.png")
    study_plots.line_plot([p["value"] for p in next(iter(sweep.values()))],
                          {s: ([p["mean"] for p in pts], [p["ci_low"] for p in pts], [p["ci_high"] for p in pts])
                           for s, pts in sweep.items()},
                          files["sweep"], xlabel=plan["sweep"][0], ylabel=f"held-out {plan['metric']}",
                          title="the sweep: mean over tasks and seeds, 95% crossed bootstrap interval")
  alignment = {q: v for q, v in levels.items() if q.startswith("analysis/")}
  if alignment:
    files["alignment"] = os.path.join(model_dir, "alignment.png")
    study_plots.bar_plot({q.split("/", 1)[1]: (v["mean"], v["ci_low"], v["ci_high"]) for q, v in alignment.items()},
                         files["alignment"], ylabel="mean pairwise gradient cosine",
                         title="gradient alignment between training tasks (interval over pre-training seeds)")
  write_json_atomic(files["json"], results)
  write_text_atomic(files["markdown"], markdown(results, files))
  return files


def _fmt(x: float) -> str:
  return f"{x:+.2f}" if abs(x) >= 0.01 or x == 0 else f"{x:+.4f}"


def markdown(results: Mapping, files: Mapping[str, str]) -> str:
  lines = ["# The study", "", "| id | claim | comparison | test | mean diff | 95% interval | n | verdict |",
           "|---|---|---|---|---:|---|---:|---|"]
  for r in results["hypotheses"]:
    test = r["test"] + (f" (margin {r['margin']:g})" if r["margin"] else "")
    lines.append(f"| {r['id']} | {r['claim']} | {r['comparison']} | {test} | {_fmt(r['mean_diff'])} | "
                 f"[{_fmt(r['ci_low'])}, {_fmt(r['ci_high'])}] | {r['n']} | **{r['verdict']}** |")
  lines += ["", "Every quantity (mean and 95% crossed bootstrap interval):", "", "| quantity | mean | 95% interval | n |",
            "|---|---:|---|---:|"]
  for q, v in results["levels"].items():
    lines.append(f"| {q} | {v['mean']:.4g} | [{v['ci_low']:.4g}, {v['ci_high']:.4g}] | {v['n']} |")
  if results["tuning"]:
    lines += ["", "Chosen on dev splits (mean best-on-dev ROUGE-L over every pair of the main cells):", ""]
    for stage, t in results["tuning"].items():
      scores = ", ".join(f"{c}: {s:.2f}" for c, s in t["dev"].items())
      lines.append(f"- {stage}: **{t['chosen']}** ({scores})")
  for stage, points in results["sweep"]["curves"].items():
    lines += ["", f"Sweep of {results['sweep']['key']}, {stage}:", "", "| value | mean | 95% interval |",
              "|---:|---:|---|"]
    lines += [f"| {p['value']} | {p['mean']:.2f} | [{p['ci_low']:.2f}, {p['ci_high']:.2f}] |" for p in points]
  lines += [""] + [f"![{name}]({os.path.basename(path)})" for name, path in files.items()
                   if path.endswith(".png")]
  return "\n".join(lines) + "\n"
