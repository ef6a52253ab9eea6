"""Where train.py's metrics rows go: metrics.jsonl, TensorBoard, Weights & Biases (train.loggers), rank 0 only.

A row is a flat dict with "step" (the optimizer step) and scalar values: one per optimizer step (loss, grad_norm,
policy/..., data/..., perf/...) and one per validation (val/epoch, val/avg@n, ...). Every chosen sink gets the
same rows:
    jsonl        <output_dir>/metrics.jsonl, one JSON object per line (what eval.plot and the tests read)
    tensorboard  <output_dir>/tb/ event files, one scalar per key (tag = the key) at global_step = step, through
                 torch.utils.tensorboard. On resume from step s, purge_step = s + 1 makes TensorBoard drop the
                 events the killed run wrote after its checkpoint, as train.py drops those metrics.jsonl rows.
    wandb        wandb.init(project, name, mode, dir=<output_dir>); the run id is kept in <output_dir>/wandb_id,
                 so a resumed run continues the same W&B run (resume="allow"). mode "offline" needs no network
                 (wandb sync <output_dir>/wandb/offline-run-* uploads it later).
tensorboard and wandb are imported only when chosen; check() names the package to install when one is missing.
"""
from __future__ import annotations

import importlib.util
import json
import os
import uuid

LOGGERS = ("jsonl", "tensorboard", "wandb")
WANDB_MODES = ("online", "offline", "disabled")
PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}  # logger -> the package it imports


def check(loggers, wandb_mode: str) -> str | None:
    """None, or what is wrong with train.loggers / train.wandb_mode (unknown name, package not installed)."""
    if not isinstance(loggers, (list, tuple)) or not loggers:
        return f"train.loggers must be a non-empty list of {', '.join(LOGGERS)}"
    unknown = [x for x in loggers if x not in LOGGERS]
    if unknown:
        return f"train.loggers: unknown {unknown[0]!r}; valid: {', '.join(LOGGERS)}"
    for name in loggers:
        if name in PACKAGES and importlib.util.find_spec(PACKAGES[name]) is None:
            return f"train.loggers: {name} needs the {PACKAGES[name]} package (pip install {PACKAGES[name]})"
    if wandb_mode not in WANDB_MODES:
        return f"train.wandb_mode must be one of {', '.join(WANDB_MODES)}, got {wandb_mode!r}"
    return None


def scalars(row: dict) -> dict:
    """The row's numeric values but the step (booleans as 0/1): what TensorBoard and W&B take."""
    return {k: float(v) for k, v in row.items() if k != "step" and isinstance(v, (int, float))}


class MetricsLog:
    """log(row) sends a row to every sink of train.loggers; close() flushes them. Construct on rank 0 only."""

    def __init__(self, output_dir: str, loggers, *, resume_step: int, wandb_project: str, wandb_name: str | None,
                 wandb_mode: str, run_config: dict):
        self.jsonl = os.path.join(output_dir, "metrics.jsonl") if "jsonl" in loggers else None
        self.tb = self.wandb = None
        if "tensorboard" in loggers:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(os.path.join(output_dir, "tb"), purge_step=resume_step + 1 if resume_step else None)
        if "wandb" in loggers:
            self.wandb = _wandb_run(output_dir, wandb_project, wandb_name, wandb_mode, run_config)

    def log(self, row: dict) -> None:
        if self.jsonl:
            with open(self.jsonl, "a") as f:
                f.write(json.dumps(row) + "\n")
        values = scalars(row)
        if self.tb is not None:
            for key, value in values.items():
                self.tb.add_scalar(key, value, global_step=row["step"])
            self.tb.flush()
        if self.wandb is not None:
            self.wandb.log(values, step=row["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def _wandb_run(output_dir: str, project: str, name: str | None, mode: str, run_config: dict):
    """A W&B run under output_dir; the id in output_dir/wandb_id (written to a temporary name, then renamed) makes
    a resumed run the same W&B run."""
    import wandb

    id_path = os.path.join(output_dir, "wandb_id")
    if os.path.exists(id_path):
        with open(id_path) as f:
            run_id = f.read().strip()
    else:
        run_id = uuid.uuid4().hex[:12]
        with open(id_path + ".tmp", "w") as f:
            f.write(run_id + "\n")
        os.replace(id_path + ".tmp", id_path)
    return wandb.init(project=project, name=name or os.path.basename(os.path.abspath(output_dir)), mode=mode,
                      dir=output_dir, id=run_id, resume="allow", config=run_config)


def write_run_summary(output_dir: str) -> dict:
    """run_summary.json: a run's cost from its own metrics.jsonl (so a resumed run counts each step once: the
    rows of re-run steps were dropped at resume). train_seconds = Σ step seconds (rollouts included) + Σ
    validation seconds (sampling, grading, the epoch export); tokens_trained = Σ response tokens of the steps;
    tokens_generated_rollout = Σ perf/rollout_tokens (on-policy); tokens_generated_validation = Σ
    val/tokens_generated. Written to a temporary name and renamed."""
    steps = vals = []
    path = os.path.join(output_dir, "metrics.jsonl")
    if os.path.exists(path):
        with open(path) as f:
            rows = [json.loads(line) for line in f if line.strip()]
        steps = [r for r in rows if "val/epoch" not in r]
        vals = [r for r in rows if "val/epoch" in r]
    summary = {"steps": len(steps),
               "train_seconds": sum(r.get("seconds", 0.0) for r in steps) + sum(r.get("val/seconds", 0.0) for r in vals),
               "validation_seconds": sum(r.get("val/seconds", 0.0) for r in vals),
               "tokens_trained": int(sum(r.get("tokens", 0) for r in steps)),
               "tokens_generated_rollout": int(sum(r.get("perf/rollout_tokens", 0) for r in steps)),
               "tokens_generated_validation": int(sum(r.get("val/tokens_generated", 0) for r in vals))}
    tmp = os.path.join(output_dir, "run_summary.json.tmp")
    with open(tmp, "w") as f:
        json.dump(summary, f, indent=1)
    os.replace(tmp, os.path.join(output_dir, "run_summary.json"))
    return summary
