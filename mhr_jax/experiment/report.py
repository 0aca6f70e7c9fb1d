r"""The experiment's tables and plots, computed from the stages' results files alone (no JAX).

  python -m mhr_jax.experiment.report --model_dir=runs/demo

Reads MODEL_DIR/plan.json (written by mhr_jax.experiment) and each stage's results.json / metrics.jsonl,
and writes, each atomically:
  results.json   {"summary": one row per method (method, kind, metric means and stds, trainable
                 parameters per task, stage wall time), "per_task", "stages", "source", "metric"}
  results.csv    the summary rows
  results.md     the summary, per held-out task, the stages (steps, wall time), and the figures
  methods.png    every method's main metric, mean ± std over seeds
  learning_curves.png  the training loss of every stage
Rows: few-shot methods ("mhr", "mhr-z", ...), the no-pre-training controls ("lora (no pre-training)") and
zero-shot evaluations ("base (zero-shot)", "mhr-mu (zero-shot)"). Metrics: SuperNI-format sources give
rougeL and exact_match (mean over held-out tasks, then mean ± std over seeds); T0 gives accuracy (median over
templates, mean over datasets, then mean ± std over seeds) and accuracy_mean_templates.
"""
from __future__ import annotations

import argparse
import csv
import io
import os
import sys

import numpy as np

from mhr_jax import storage
from mhr_jax.errors import RunError
from mhr_jax.storage import read_json, read_jsonl, write_bytes_atomic, write_json_atomic, write_text_atomic

GENERATION_METRICS = ("rougeL", "exact_match")


def _load(model_dir: str) -> tuple[dict, dict]:
  plan = read_json(os.path.join(model_dir, "plan.json"))
  if plan is None:
    raise FileNotFoundError(f"{model_dir}: no plan.json (run python -m mhr_jax.experiment first)")
  results = {s["name"]: read_json(os.path.join(s["dir"], "results.json")) for s in plan["stages"]}
  return plan, results


def _row(stage: dict, results: dict) -> dict:
  row = {"method": stage["row"], "kind": stage["row_kind"], "stage": stage["name"],
         "trainable_params": results.get("trainable_params_per_pair"), "steps": results.get("steps"),
         "seeds": sorted({p["seed"] for p in results["pairs"]}), "wall_time_s": results.get("wall_time_s")}
  table = results["table"]
  if "aggregate" in table:  # SuperNI-format
    for metric in GENERATION_METRICS:
      row[metric] = table["aggregate"][metric]["mean"]
      row[f"{metric}_std"] = table["aggregate"][metric]["std"]
    row["per_task"] = {t: {m: v[m]["mean"] for m in GENERATION_METRICS} for t, v in table["per_task"].items()}
  else:  # T0
    row["accuracy"] = table["average"]["median_over_templates"]["mean"]
    row["accuracy_std"] = table["average"]["median_over_templates"]["std"]
    row["accuracy_mean_templates"] = table["average"]["mean_over_templates"]["mean"]
    row["accuracy_mean_templates_std"] = table["average"]["mean_over_templates"]["std"]
    row["per_task"] = {d: {"accuracy": v["median_over_templates"]["mean"]} for d, v in table["per_dataset"].items()}
  return row


def summary(model_dir: str) -> dict:
  """The report as a dict (what results.json holds); stages not finished yet are listed as pending."""
  plan, results = _load(model_dir)
  rows, stages = [], []
  for stage in plan["stages"]:
    res = results[stage["name"]] if stage["kind"] != "analysis" else read_json(
        os.path.join(stage["dir"], "analysis.json"))
    status = "pending" if res is None else res.get("status", "done")
    info = {"stage": stage["name"], "kind": stage["kind"], "status": status, "steps": stage["steps"],
            "wall_time_s": None if res is None else res.get("wall_time_s"), "dir": stage["dir"]}
    if res is not None and stage["kind"] == "train":
      info["final_loss"] = res.get("final_metrics", {}).get("loss")
    stages.append(info)
    if stage["row"] and res is not None and res.get("status") == "done" and "table" in res:
      rows.append(_row(stage, res))
  metric = "rougeL" if not rows or "rougeL" in rows[0] else "accuracy"
  return {"summary": rows, "stages": stages, "metric": metric, "model_dir": plan["model_dir"],
          "command": plan.get("command"),
          "per_task": {r["method"]: r["per_task"] for r in rows}}


def _fmt(row: dict, metric: str) -> str:
  return f"{row[metric]:.2f} ± {row[f'{metric}_std']:.2f}"


def console_table(model_dir: str) -> str:
  """The summary as a Markdown table (what the experiment prints at the end)."""
  report = summary(model_dir)
  return _summary_markdown(report)


def _metrics(report: dict) -> tuple[str, ...]:
  return GENERATION_METRICS if report["metric"] == "rougeL" else ("accuracy", "accuracy_mean_templates")


def _summary_markdown(report: dict) -> str:
  metrics = _metrics(report)
  lines = ["| method | kind | " + " | ".join(metrics) + " | trainable params / task | seeds | wall time (s) |",
           "|---|---|" + "---:|" * len(metrics) + "---:|---:|---:|"]
  for row in report["summary"]:
    cells = [_fmt(row, m) for m in metrics]
    lines.append(f"| {row['method']} | {row['kind']} | " + " | ".join(cells) +
                 f" | {row['trainable_params']:,} | {len(row['seeds'])} | {row['wall_time_s']:.0f} |")
  return "\n".join(lines)


def _markdown(report: dict, files: dict) -> str:
  metrics = _metrics(report)
  out = [f"# Experiment results: {report['model_dir']}", ""]
  if report.get("command"):
    out += ["```", report["command"], "```", ""]
  out += [f"Held-out mean ± std over seeds ({', '.join(metrics)}; SuperNI-format: the mean over held-out tasks "
          "of each seed; T0: accuracy is the median over templates, averaged over datasets).", "",
          _summary_markdown(report), ""]
  if report["summary"]:
    tasks = sorted({t for r in report["summary"] for t in r["per_task"]})
    main = report["metric"]
    out += [f"## Per held-out task ({main}, mean over seeds)", "",
            "| method | " + " | ".join(tasks) + " |", "|---|" + "---:|" * len(tasks)]
    for row in report["summary"]:
      out.append(f"| {row['method']} | " + " | ".join(
          f"{row['per_task'][t][main]:.2f}" if t in row["per_task"] else "" for t in tasks) + " |")
    out.append("")
  out += ["## Stages", "", "| stage | kind | status | steps | final loss | wall time (s) |", "|---|---|---|---:|---:|---:|"]
  for s in report["stages"]:
    loss, wall, steps = s.get("final_loss"), s["wall_time_s"], s["steps"]
    cells = ["" if steps is None else str(steps), "" if loss is None else f"{loss:.4f}",
             "" if wall is None else f"{wall:.0f}"]
    out.append(f"| {s['stage']} | {s['kind']} | {s['status']} | " + " | ".join(cells) + " |")
  out += ["", "## Figures", ""]
  for name, path in files.items():
    if path.endswith(".png"):
      out.append(f"- {name}: `{os.path.relpath(path, report['model_dir'])}`")
  return "\n".join(out) + "\n"


def _csv(report: dict) -> str:
  metrics = _metrics(report)
  columns = ["method", "kind", *[c for m in metrics for c in (m, f"{m}_std")], "trainable_params", "seeds",
             "steps", "wall_time_s", "stage"]
  buffer = io.StringIO()
  writer = csv.writer(buffer, lineterminator="\n")
  writer.writerow(columns)
  for row in report["summary"]:
    writer.writerow([len(row["seeds"]) if c == "seeds" else row.get(c) for c in columns])
  return buffer.getvalue()


def _save_figure(fig, path: str) -> None:
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  buffer = io.BytesIO()
  fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
  plt.close(fig)
  write_bytes_atomic(path, buffer.getvalue())


def _plot_methods(report: dict, path: str) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  rows, metric = report["summary"], report["metric"]
  colors = {"few-shot": "tab:blue", "control": "tab:orange", "zero-shot": "tab:gray"}
  fig, ax = plt.subplots(figsize=(7, 0.45 * len(rows) + 1.2))
  y = np.arange(len(rows))[::-1]
  ax.barh(y, [r[metric] for r in rows], xerr=[r[f"{metric}_std"] for r in rows], capsize=3,
          color=[colors.get(r["kind"], "tab:blue") for r in rows])
  ax.set_yticks(y, [r["method"] for r in rows])
  ax.set_xlabel(f"held-out {metric} (mean ± std over seeds)")
  ax.set_xlim(0, 100)
  handles = [matplotlib.patches.Patch(color=c, label=k) for k, c in colors.items()
             if any(r["kind"] == k for r in rows)]
  ax.legend(handles=handles, loc="lower right", fontsize=8)
  ax.grid(axis="x", alpha=0.3)
  _save_figure(fig, path)


def _plot_learning_curves(plan: dict, path: str) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  panels = {"train": [], "adapt": []}
  for stage in plan["stages"]:
    if stage["kind"] in panels and stage["steps"]:
      records = [r for r in read_jsonl(os.path.join(stage["dir"], "metrics.jsonl")) if "loss" in r]
      if records:
        panels[stage["kind"]].append((stage["name"], [r["step"] for r in records], [r["loss"] for r in records]))
  fig, axes = plt.subplots(1, 2, figsize=(12, 4))
  titles = {"train": "base and multi-task pre-training", "adapt": "few-shot adaptation (mean over pairs)"}
  for ax, (kind, curves) in zip(axes, panels.items()):
    for name, steps, values in curves:
      ax.plot(steps, values, label=name, lw=1.2)
    ax.set_title(titles[kind])
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.grid(alpha=0.3)
    if curves:
      ax.legend(fontsize=7)
  _save_figure(fig, path)


def write_report(model_dir: str) -> dict[str, str]:
  """Writes results.json, results.csv, results.md and the figures; returns their paths by name."""
  plan, _ = _load(model_dir)
  report = summary(model_dir)
  files = {"json": os.path.join(model_dir, "results.json"), "csv": os.path.join(model_dir, "results.csv"),
           "markdown": os.path.join(model_dir, "results.md")}
  if report["summary"]:
    files["methods"] = os.path.join(model_dir, "methods.png")
    _plot_methods(report, files["methods"])
  files["learning_curves"] = os.path.join(model_dir, "learning_curves.png")
  _plot_learning_curves(plan, files["learning_curves"])
  for stage in plan["stages"]:
    heatmap = os.path.join(stage["dir"], "routing_mean.png")
    if stage["kind"] == "analysis" and storage.isfile(heatmap):
      files[f"routing ({stage['name']})"] = heatmap
      alignment = os.path.join(stage["dir"], "gradient_alignment.png")
      if storage.isfile(alignment):
        files[f"gradient alignment ({stage['name']})"] = alignment
  write_text_atomic(files["csv"], _csv(report))
  write_text_atomic(files["markdown"], _markdown(report, files))
  write_json_atomic(files["json"], {**report, "files": files})  # last: the experiment's record
  return files


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m mhr_jax.experiment.report", description=__doc__.split("\n")[0])
  parser.add_argument("--model_dir", required=True, help="an experiment directory (with plan.json): a local path "
                      "or a URL, e.g. gs://BUCKET/run")
  args = parser.parse_args(sys.argv[1:] if argv is None else argv)
  try:
    storage.check_reachable(args.model_dir, "--model_dir")
    files = write_report(args.model_dir)
  except (FileNotFoundError, KeyError, ValueError, RunError) as e:
    print(f"error: {' '.join(str(e).split())}", file=sys.stderr, flush=True)
    return 2
  print(console_table(args.model_dir))
  print(f"results: {files['markdown']}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
