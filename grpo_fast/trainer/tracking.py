"""Experiment tracking: metrics, config and sample completions in TensorBoard, Weights & Biases, trackio or
MLflow (TRL's ``report_to``).

    with start_tracking(("tensorboard",), RunInfo("demo", "runs/demo/runs", config=cfg.to_dict())) as tracker:
        tracker.log_metrics({"reward": 0.5}, step=1)
        tracker.log_completions([{"prompt": "1+1=", "completion": "2", "reward": 1.0}], step=1)

One ``Tracker`` class per backend; a backend's package is imported only when that backend is asked for.
Where the run lives:
- tensorboard: event files in ``logging_dir`` (``tensorboard --logdir``);
- wandb: ``logging_dir/wandb`` (W&B's own settings apply: ``WANDB_MODE=offline``, ``WANDB_ENTITY``, ...);
- trackio: trackio's local store (``TRACKIO_DIR``, default ``~/.cache/huggingface/trackio``; ``trackio show``);
- mlflow: ``MLFLOW_TRACKING_URI`` when set, else the SQLite store ``mlflow.db`` in ``store_dir`` (default
  logging_dir) with artifacts in ``mlartifacts`` beside it (``mlflow ui --backend-store-uri sqlite:///...``;
  needs the full ``mlflow`` package, or ``mlflow-skinny`` with SQLAlchemy and Alembic). Characters MLflow
  does not take in a metric name become "_".
The project (W&B / trackio project, MLflow experiment) is ``RunInfo.project``, by default "grpo-fast" or,
as in transformers' integrations, ``WANDB_PROJECT`` / ``TRACKIO_PROJECT`` / ``MLFLOW_EXPERIMENT_NAME``.

Resuming (``RunInfo.resume_step`` > 0) continues the same run: TensorBoard writes to the same directory and
hides what an earlier attempt logged after the checkpoint (``purge_step``); W&B and MLflow reopen the run
whose id ``logging_dir/tracking.json`` recorded; trackio reopens the run of the same name.
"""

from __future__ import annotations

import abc
import importlib.util
import json
import os
import re
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from . import configio

# backend -> (module imported, pip package)
BACKENDS = {
    "tensorboard": ("tensorboard", "tensorboard"),
    "wandb": ("wandb", "wandb"),
    "trackio": ("trackio", "trackio"),
    "mlflow": ("mlflow", "mlflow"),
}
REPORT_TO_CHOICES = (*BACKENDS, "all", "none")
DEFAULT_PROJECT = "grpo-fast"
IDS_FILE = "tracking.json"


def check_report_to(report_to) -> tuple[str, ...]:
    """``report_to`` (a name or a list of names) as a tuple of names; ValueError/TypeError naming it."""
    names = (report_to,) if isinstance(report_to, str) else report_to
    if not isinstance(names, (tuple, list)) or not all(isinstance(n, str) for n in names):
        raise TypeError(f"report_to must be a string or a list of strings, got {report_to!r}")
    for name in names:
        if name not in REPORT_TO_CHOICES:
            raise ValueError(f"report_to must name backends from {REPORT_TO_CHOICES}, got {name!r}")
    if len(names) > 1 and ("all" in names or "none" in names):
        raise ValueError(f"report_to 'all' and 'none' stand alone, got {list(names)}")
    return tuple(names)


def resolve_report_to(report_to) -> tuple[str, ...]:
    """The backends to start: "none" -> (), "all" -> every installed one, else the names given, each of
    which must be installed (a ConfigError naming the package and the pip command otherwise)."""
    names = check_report_to(report_to)
    if names == ("none",):
        return ()
    if names == ("all",):
        return tuple(b for b, (module, _) in BACKENDS.items() if importlib.util.find_spec(module) is not None)
    for name in names:
        module, package = BACKENDS[name]
        if importlib.util.find_spec(module) is None:
            raise configio.ConfigError(f"report_to={name!r} needs the {package} package: pip install {package}")
    return tuple(dict.fromkeys(names))


@dataclass
class RunInfo:
    """One tracked run.

    name: the run's name. logging_dir: where local files go (see the module docstring). config: the
    hyper-parameters (a flat mapping). project / group: W&B and trackio project and group, MLflow experiment
    and "group" tag; project None = the backend's environment variable, else "grpo-fast". resume_step: the
    step a resumed run continues from (0 = a fresh run). store_dir: where MLflow's default SQLite store
    lives, so that several runs (the R1 pipeline's stages) share one; None = logging_dir.
    """

    name: str
    logging_dir: str | Path
    config: dict = field(default_factory=dict)
    project: str | None = None
    group: str | None = None
    resume_step: int = 0
    store_dir: str | Path | None = None

    def project_for(self, env_var: str) -> str:
        return self.project or os.environ.get(env_var) or DEFAULT_PROJECT

    def run_id(self, backend: str, new_id) -> tuple[str, bool]:
        """(run id, whether it is new): the id this backend's run had before when resuming, else a fresh
        ``new_id()``, recorded in logging_dir/tracking.json."""
        path = Path(self.logging_dir) / IDS_FILE
        ids = json.loads(path.read_text()) if path.exists() else {}
        if self.resume_step > 0 and backend in ids:
            return ids[backend], False
        ids[backend] = new_id()
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(ids, indent=2) + "\n")
        return ids[backend], True


class Tracker(abc.ABC):
    """One run in one backend. Metrics are {name: number}; completions are rows {column: value}."""

    @abc.abstractmethod
    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Log every metric at ``step``."""

    @abc.abstractmethod
    def log_completions(self, rows: list[dict], step: int) -> None:
        """Log the rows as one table at ``step``."""

    @abc.abstractmethod
    def finish(self, failed: bool = False) -> None:
        """End the run; ``failed``: it ended with an exception (W&B and MLflow mark it so)."""


class TensorBoardTracker(Tracker):
    """Scalars, the config as text and hyper-parameters (HPARAMS tab), completions as a markdown table."""

    def __init__(self, run: RunInfo):
        from torch.utils.tensorboard import SummaryWriter
        from torch.utils.tensorboard.summary import hparams

        # purge_step hides events an earlier attempt logged at or after this step
        self.writer = SummaryWriter(str(run.logging_dir), purge_step=run.resume_step + 1)
        if run.resume_step == 0:
            self.writer.add_text("config", _markdown_table([{"key": k, "value": v} for k, v in run.config.items()]))
            for summary in hparams(_scalar_config(run.config), {}):
                self.writer.file_writer.add_summary(summary)

    def log_metrics(self, metrics, step):
        for name, value in metrics.items():
            self.writer.add_scalar(name, value, step)

    def log_completions(self, rows, step):
        self.writer.add_text("completions", _markdown_table(rows), step)

    def finish(self, failed=False):
        self.writer.close()


class WandbTracker(Tracker):
    """A W&B run under logging_dir/wandb; completions as a ``wandb.Table``."""

    def __init__(self, run: RunInfo):
        import wandb

        self.wandb = wandb
        run_id, _ = run.run_id("wandb", lambda: uuid.uuid4().hex[:12])  # (also creates logging_dir)
        self.run = wandb.init(project=run.project_for("WANDB_PROJECT"), name=run.name, group=run.group,
                              dir=str(run.logging_dir), config=run.config, id=run_id, resume="allow",
                              reinit="create_new")  # fmt: skip

    def log_metrics(self, metrics, step):
        self.run.log(metrics, step=step)

    def log_completions(self, rows, step):
        columns = list(rows[0])
        table = self.wandb.Table(columns=columns, data=[list(r.values()) for r in rows])
        self.run.log({"completions": table}, step=step)

    def finish(self, failed=False):
        self.run.finish(exit_code=1 if failed else 0)


class TrackioTracker(Tracker):
    """A trackio run (local store); completions as a ``trackio.Table``."""

    def __init__(self, run: RunInfo):
        import trackio

        self.trackio = trackio
        self.run = trackio.init(project=run.project_for("TRACKIO_PROJECT"), name=run.name, group=run.group,
                                config=run.config, resume="allow" if run.resume_step else "never",
                                embed=False)  # fmt: skip

    def log_metrics(self, metrics, step):
        self.run.log(metrics, step=step)

    def log_completions(self, rows, step):
        columns = list(rows[0])
        table = self.trackio.Table(columns=columns, data=[list(r.values()) for r in rows])
        self.run.log({"completions": table}, step=step)

    def finish(self, failed=False):
        self.run.finish()


class MLflowTracker(Tracker):
    """An MLflow run (explicit client, no global active run): params, metrics, completions as a table artifact
    completions/step_<N>.json."""

    def __init__(self, run: RunInfo):
        from mlflow.tracking import MlflowClient

        here = Path(run.store_dir or run.logging_dir).resolve()
        if "MLFLOW_TRACKING_URI" not in os.environ and importlib.util.find_spec("sqlalchemy") is None:
            raise configio.ConfigError(
                "report_to='mlflow' stores runs in SQLite, which needs SQLAlchemy (mlflow-skinny lacks it): "
                "pip install mlflow, or set MLFLOW_TRACKING_URI"
            )
        here.mkdir(parents=True, exist_ok=True)
        uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{here / 'mlflow.db'}"
        self.client = client = MlflowClient(uri)
        name = run.project_for("MLFLOW_EXPERIMENT_NAME")
        experiment = client.get_experiment_by_name(name)
        # artifacts beside the database, not in the working directory (MLflow's default for sqlite)
        artifacts = None if "MLFLOW_TRACKING_URI" in os.environ else (here / "mlartifacts").as_uri()
        experiment_id = experiment.experiment_id if experiment else client.create_experiment(name, artifacts)
        tags = {"group": run.group} if run.group else {}
        self.run_id, new = run.run_id(
            "mlflow", lambda: client.create_run(experiment_id, run_name=run.name, tags=tags).info.run_id
        )
        if new:
            self._log_params(run.config)
        else:
            client.update_run(self.run_id, status="RUNNING")

    def _log_params(self, config: dict) -> None:
        from mlflow.entities import Param

        params = [Param(k, str(v)) for k, v in config.items()]
        for i in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(self.run_id, params=params[i : i + 100])

    def log_metrics(self, metrics, step):
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(_MLFLOW_INVALID.sub("_", k), float(v), now, step) for k, v in metrics.items()]
        self.client.log_batch(self.run_id, metrics=metrics)

    def log_completions(self, rows, step):
        columns = {k: [r[k] for r in rows] for k in rows[0]}
        self.client.log_table(self.run_id, columns, f"completions/step_{step:06d}.json")

    def finish(self, failed=False):
        self.client.set_terminated(self.run_id, status="FAILED" if failed else "FINISHED")


_MLFLOW_INVALID = re.compile(r"[^\w/.\- :]")  # MLflow's metric names: word characters and / . - space :

TRACKERS = {
    "tensorboard": TensorBoardTracker,
    "wandb": WandbTracker,
    "trackio": TrackioTracker,
    "mlflow": MLflowTracker,
}


class Trackers(Tracker):
    """Several trackers as one (none: every call does nothing); a context manager that finishes them."""

    def __init__(self, trackers: list[Tracker]):
        self.trackers = trackers

    def __bool__(self) -> bool:
        return bool(self.trackers)

    def log_metrics(self, metrics, step):
        metrics = {k: v for k, v in metrics.items() if k != "step"}  # the step is the axis, not a metric
        for tracker in self.trackers:
            tracker.log_metrics(metrics, step)

    def log_completions(self, rows, step):
        if not rows:  # e.g. a rank with no rows in a dynamic-sampling round
            return
        for tracker in self.trackers:
            tracker.log_completions(rows, step)

    def finish(self, failed=False):
        for tracker in self.trackers:
            tracker.finish(failed)

    def __enter__(self) -> Trackers:
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        self.finish(failed=exc_type is not None)


def start_tracking(report_to, run: RunInfo) -> Trackers:
    """Start one run per backend of ``report_to`` (see ``resolve_report_to``)."""
    trackers: list[Tracker] = []
    try:
        for name in resolve_report_to(report_to):
            trackers.append(TRACKERS[name](run))
    except BaseException:
        Trackers(trackers).finish(failed=True)  # the ones already started
        raise
    return Trackers(trackers)


def _scalar_config(config: dict) -> dict:
    """The config with values TensorBoard's hparams accept (numbers, strings, bools)."""
    return {k: v if isinstance(v, (bool, int, float, str)) else str(v) for k, v in config.items()}


def _markdown_table(rows: list[dict]) -> str:
    """Rows as a markdown table (TensorBoard's text plugin renders it); cells on one line, pipes escaped."""
    if not rows:
        return "(none)"
    columns = list(rows[0])

    def cell(value) -> str:
        text = f"{value:.4g}" if isinstance(value, float) else str(value)
        text = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")  # shown, not taken as HTML
        return text.replace("\\", "\\\\").replace("|", "\\|").replace("\n", "<br>")

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)
