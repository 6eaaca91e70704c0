"""Run tracking (`--report-to`, Hugging Face Trainer's convention: none, or a comma-separated
list of tensorboard, wandb, mlflow): each tenant's step series (loss, learning rate, gradient
norm, tokens/s, memory) and evaluation metrics, written by the libraries themselves.

TensorBoard event files go under the run directory (`RUN/tensorboard/`); W&B runs offline
unless WANDB_MODE says otherwise (files under `RUN/wandb/`); MLflow writes to
`RUN/mlruns` unless MLFLOW_TRACKING_URI names a server. A joint run's tenants each have their
own run directory, hence their own series. Only rank 0 of a torchrun group writes.
"""

import importlib.util
import os
from pathlib import Path

from peftkit.errors import PeftkitError

TRACKERS = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}  # -> package


def trackers(report_to: str) -> list[str]:
    """The trackers a --report-to value names, each installed, or a one-line error (checked
    before any model loads)."""
    names = [n.strip() for n in report_to.split(",") if n.strip()]
    if names in ([], ["none"]):
        return []
    unknown = [n for n in names if n not in TRACKERS]
    if unknown or "none" in names:
        raise PeftkitError(f"--report-to {report_to}: choose none, or a comma-separated list of "
                           f"{', '.join(TRACKERS)}")
    missing = [n for n in names if importlib.util.find_spec(TRACKERS[n]) is None]
    if missing:
        raise PeftkitError(f"--report-to {missing[0]}: the {TRACKERS[missing[0]]} package is "
                           f"not installed (pip install {TRACKERS[missing[0]]})")
    return list(dict.fromkeys(names))


class Tracker:
    """One tenant's series in every tracker it asked for."""

    def __init__(self, names: list[str], out: Path, name: str, config: dict):
        self.writers = []
        for kind in names:
            self.writers.append(getattr(self, f"_open_{kind}")(Path(out), name, config))

    @staticmethod
    def _open_tensorboard(out: Path, name: str, config: dict):
        from torch.utils.tensorboard import SummaryWriter
        writer = SummaryWriter(log_dir=str(out / "tensorboard"))
        writer.add_text("config", "\n".join(f"    {k}: {v}" for k, v in config.items()))
        return ("tensorboard", writer)

    @staticmethod
    def _open_wandb(out: Path, name: str, config: dict):
        import wandb
        os.environ.setdefault("WANDB_MODE", "offline")  # no account, no network unless asked
        run = wandb.init(project=os.environ.get("WANDB_PROJECT", "peftkit"), name=name,
                         dir=str(out), config=config, reinit="create_new")
        return ("wandb", run)

    @staticmethod
    def _open_mlflow(out: Path, name: str, config: dict):
        from mlflow.tracking import MlflowClient  # a client, not the global active run: a
        uri = os.environ.get("MLFLOW_TRACKING_URI") or (out / "mlruns").resolve().as_uri()
        client = MlflowClient(tracking_uri=uri)  # joint run's tenants each have their own
        experiment = client.get_experiment_by_name("peftkit")
        run = client.create_run(experiment.experiment_id if experiment else
                                client.create_experiment("peftkit"), run_name=name)
        for key, value in config.items():
            client.log_param(run.info.run_id, key, str(value)[:250])
        return ("mlflow", (client, run.info.run_id))

    def log(self, step: int, values: dict) -> None:
        values = {k: float(v) for k, v in values.items()
                  if isinstance(v, (int, float)) and not isinstance(v, bool)}
        for kind, writer in self.writers:
            if kind == "tensorboard":
                for key, v in values.items():
                    writer.add_scalar(key, v, step)
            elif kind == "wandb":
                writer.log(values, step=step)
            else:
                client, run_id = writer
                for key, v in values.items():
                    client.log_metric(run_id, key, v, step=step)

    def close(self) -> None:
        for kind, writer in self.writers:
            if kind == "tensorboard":
                writer.close()
            elif kind == "wandb":
                writer.finish()
            else:
                client, run_id = writer
                client.set_terminated(run_id)
        self.writers = []
