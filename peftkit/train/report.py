"""What a run measured: report.json (machine-readable) and report.md (for people)."""

import json
import resource
import sys
import time
from pathlib import Path

import psutil
import torch

from peftkit.device import peak_device_bytes
from peftkit.quant import logical_numel, model_bytes


class Meter:
    def __init__(self):
        self.t0 = 0.0
        self.tokens = 0
        self.state_bytes: dict[str, int] = {}
        self.feature_seconds = 0.0  # probe: the one backbone pass over every example
        self.loop_seconds = 0.0  # the optimisation loop (evaluations included)
        self.runtime_rss = 0  # RSS before the model loads: interpreter + libraries
        self.largest_batch = (0, 0)  # (rows, padded length) of the most tokens seen at once

    def start(self) -> None:
        self.t0 = time.perf_counter()
        self.runtime_rss = current_rss_bytes()

    def see_batch(self, rows: int, length: int) -> None:
        if rows * length > self.largest_batch[0] * self.largest_batch[1]:
            self.largest_batch = (rows, length)

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def tokens_per_second(self) -> float:
        return self.tokens / max(self.elapsed(), 1e-9)

    def measure_state(self, trainee, optimizer) -> None:
        extra = [trainee.head] if trainee.head is not None and \
            trainee.head not in list(trainee.module.modules()) else []  # causal-LM probe head
        self.state_bytes = state_bytes([trainee.module, *extra], trainee.params, optimizer)


def state_bytes(modules: list, params: list, optimizer) -> dict[str, int]:
    """Bytes of weights + gradients + optimizer states, counted from the live tensors."""
    weights = sum(model_bytes(m) for m in modules)
    grads = sum(p.grad.numel() * p.grad.element_size() for p in params if p.grad is not None)
    optim = sum(v.numel() * v.element_size() for st in optimizer.state.values()
                for v in st.values() if torch.is_tensor(v))
    return {"weights": weights, "gradients": grads, "optimizer": optim,
            "total": weights + grads + optim}


def current_rss_bytes() -> int:
    return psutil.Process().memory_info().rss


def memory_mib(device) -> dict[str, float]:
    """Memory now, for run tracking: this process's RSS and, on CUDA, the device's peak."""
    out = {"rss_mib": current_rss_bytes() / 2 ** 20}
    peak = peak_device_bytes(device)
    if peak is not None:
        out["device_peak_mib"] = peak / 2 ** 20
    return out


def peak_rss_bytes() -> int:
    """This process's peak RSS. On Linux, VmHWM: getrusage's ru_maxrss survives exec, so a
    process started from a larger one (pytest, a notebook) would report its parent's peak."""
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    scale = 1 if sys.platform == "darwin" else 1024  # macOS reports bytes, Linux KiB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def planner_predictions(t, meter: Meter) -> dict:
    """The planner's figures for this very run (trainee `t`), from the model's config and the
    largest batch `meter` saw."""
    from peftkit.plan.cpu import CpuRun, predict_peak_rss, predict_state_bytes
    from peftkit.plan.shapes import shape_from_config
    cfg = t.config
    shape = shape_from_config(cfg.model, t.base.model.config)
    run = CpuRun.from_train(cfg, t.task, shape, len(t.label_names), meter.largest_batch)
    peak = predict_peak_rss(shape, run, meter.runtime_rss)
    out = {"predicted_model_state_bytes": predict_state_bytes(shape, cfg.method, run.s),
           "predicted_peak_rss": {k: int(v) for k, v in peak.items()}}
    if t.device.type == "cuda":  # the GPU plan's figure for this very run
        from peftkit.plan.memory import device_bytes
        gpu = device_bytes(shape, cfg.method, run.s, base_bytes=t.dtype.itemsize)
        out["predicted_peak_device_bytes"] = {k: int(v) for k, v in gpu.items()}
    return out


def write_report(out: Path, t, meter: Meter, history: list[dict], losses: list[float],
                 paths: dict, data: dict) -> dict:
    """report.json and report.md of trainee `t`'s run into `out`; `data` holds the run's data
    facts (train/val/truncated example counts, a probe's backbone passes)."""
    cfg = t.config
    trainable = sum(p.numel() for p in t.params)
    total = sum(logical_numel(p) for p in {id(p): p for p in list(t.base.model.parameters())
                                           + list(t.params)}.values())
    report = {
        "method": cfg.method, "task": t.task, "model": cfg.model, "data": cfg.data,
        "trainable_params": trainable, "total_params": total,
        "trainable_percent": 100 * trainable / total,
        "not_adapted": t.not_adapted,
        "peak_rss_bytes": peak_rss_bytes(),
        "device": str(t.device), "dtype": str(t.dtype).removeprefix("torch."),
        "peak_device_bytes": peak_device_bytes(t.device),  # None off CUDA
        "runtime_rss_bytes": meter.runtime_rss,
        "largest_batch": list(meter.largest_batch),
        **planner_predictions(t, meter),
        "model_state_bytes": meter.state_bytes.get("total", 0),
        "model_state_breakdown": meter.state_bytes,
        "wall_seconds": meter.elapsed(),
        "feature_seconds": meter.feature_seconds,
        "train_loop_seconds": meter.loop_seconds,
        "tokens_per_second": meter.tokens_per_second(),
        "trained_tokens": meter.tokens,  # real (unpadded) tokens through the training steps
        **{k: v for k, v in data.items() if k != "kept_metrics"},
        # what the saved outputs score: the kept (best) evaluation, else the last one
        "metrics": data.get("kept_metrics") or {k: v for k, v in (history[-1] if history
                                                                  else {}).items() if k != "step"},
        "history": history, "train_losses": losses,
        "paths": {**paths, "report": str(out / "report.json")},
    }
    (out / "report.json").write_text(json.dumps(report, indent=2))
    (out / "report.md").write_text(report_markdown(report))
    return report


def report_markdown(r: dict) -> str:
    mib = 2 ** 20
    lines = [f"# {r['method']} on {r['model']} ({r['task']})", "",
             "| measure | value |", "| --- | --- |",
             f"| trainable params | {r['trainable_params']:,d} of {r['total_params']:,d} "
             f"({r['trainable_percent']:.4f}%) |",
             f"| model state (weights + grads + optimizer) | {r['model_state_bytes'] / mib:.1f} MiB |",
             f"| peak RSS | {r['peak_rss_bytes'] / mib:.1f} MiB (planner predicted "
             f"{r['predicted_peak_rss']['total'] / mib:.1f} MiB) |",
             f"| wall time | {r['wall_seconds']:.1f} s |",
             f"| tokens/s | {r['tokens_per_second']:.0f} |"]
    if r.get("best"):
        b = r["best"]
        lines.append(f"| best {b['metric']} | {b['value']:.4g} at step {b['step']} "
                     f"(saved: {r['kept']}, step {r['kept_step']}) |")
    if r.get("stopped"):
        lines.append(f"| stopped | {r['stopped']} |")
    if r.get("not_adapted"):
        lines.append(f"| not adapted | {r['not_adapted'].removeprefix('not adapted: ')} |")
    shown = {"train_loss": "last training batch's loss"}  # not a validation figure
    lines += [f"| {shown.get(k, 'val ' + k)} | {v:.4g} |" for k, v in r["metrics"].items()
              if isinstance(v, float)]
    return "\n".join(lines) + "\n"
