"""What the bench measures with, besides clocks: GPU utilisation sampled while a phase runs,
the CPU time other processes take meanwhile, and the machine it runs on."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import threading
import time
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from ..core.version import __version__

# How often GPU utilisation is sampled.
GPU_SAMPLE_S = 0.1


class GpuSampler:
    """Samples the GPU's utilisation in a background thread while a phase runs.

    ``torch.cuda.utilization()`` where it works (it needs pynvml), else ``nvidia-smi``'s
    ``utilization.gpu`` streamed every 100 ms; elsewhere the result says why there is none.
    """

    def __init__(self, device: Any):
        self.device = device
        self.samples: list[float] = []
        self.source: str | None = None
        self.reason = "not a CUDA device"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._proc: subprocess.Popen | None = None

    def __enter__(self) -> "GpuSampler":
        import torch

        if getattr(self.device, "type", str(self.device)) != "cuda":
            return self
        try:
            torch.cuda.utilization(self.device)
            self.source = "torch.cuda.utilization"
            self._thread = threading.Thread(target=self._poll_torch, daemon=True)
        except Exception as exc:  # no pynvml, or NVML refuses
            smi = shutil.which("nvidia-smi")
            if smi is None:
                self.reason = f"torch.cuda.utilization failed ({type(exc).__name__}) and no nvidia-smi"
                return self
            index = self._physical_index()
            self._proc = subprocess.Popen(
                [smi, f"--id={index}", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits",
                 f"-lms={int(GPU_SAMPLE_S * 1000)}"],
                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
            )
            self.source = "nvidia-smi"
            self._thread = threading.Thread(target=self._read_smi, daemon=True)
        self._thread.start()
        return self

    def _physical_index(self) -> str:
        import torch

        index = self.device.index if self.device.index is not None else torch.cuda.current_device()
        visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
        return visible[index] if index < len(visible) else str(index)

    def _poll_torch(self) -> None:
        import torch

        while not self._stop.wait(GPU_SAMPLE_S):
            try:
                self.samples.append(float(torch.cuda.utilization(self.device)))
            except Exception:
                return

    def _read_smi(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        for line in self._proc.stdout:
            if self._stop.is_set():
                return
            try:
                self.samples.append(float(line.strip()))
            except ValueError:
                continue

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self._proc is not None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def result(self) -> dict[str, Any]:
        if self.source is None:
            return {"available": False, "reason": self.reason}
        if not self.samples:
            return {"available": False, "source": self.source, "reason": "no samples (phase too short)"}
        return {
            "available": True,
            "source": self.source,
            "mean_pct": round(float(np.mean(self.samples)), 1),
            "max_pct": round(float(np.max(self.samples)), 1),
            "samples": len(self.samples),
        }


class CpuShare:
    """How much of the machine's CPU time other processes took while a phase ran (Linux):
    all CPUs' busy time from /proc/stat, less this process's own, over wall time x CPUs."""

    def __enter__(self) -> "CpuShare":
        self.start = self._sample()
        return self

    @staticmethod
    def _sample() -> tuple[float, float, float] | None:
        try:
            fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
        except (OSError, ValueError, IndexError):
            return None
        tick = os.sysconf("SC_CLK_TCK")
        busy = (sum(fields[:8]) - fields[3] - (fields[4] if len(fields) > 4 else 0)) / tick
        own = sum(os.times()[:2])
        return time.monotonic(), busy, own

    def __exit__(self, *exc: Any) -> None:
        self.end = self._sample()

    def others(self) -> float | None:
        if not self.start or not self.end:
            return None
        wall = self.end[0] - self.start[0]
        if wall <= 0:
            return None
        others = (self.end[1] - self.start[1]) - (self.end[2] - self.start[2])
        return round(max(0.0, others) / (wall * (os.cpu_count() or 1)), 3)


def sync(device: Any) -> None:
    import torch

    if getattr(device, "type", None) == "cuda":
        torch.cuda.synchronize(device)


def rate(n: int, seconds: float) -> float | None:
    return n / seconds if seconds > 0 and n > 0 else None


def ms_per_image(stages: Mapping[str, float], n: int) -> dict[str, float]:
    return {k: round(1000.0 * v / n, 3) for k, v in stages.items()} if n else {}


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


def free(device: Any) -> None:
    import gc

    import torch

    gc.collect()
    if getattr(device, "type", None) == "cuda":
        torch.cuda.empty_cache()


def torch_device(name: str | None) -> Any:
    import torch

    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def environment(device: Any) -> dict[str, Any]:
    import torch
    import transformers

    env: dict[str, Any] = {
        "seglabel": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "device": str(device),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "machine": platform.machine(),
    }
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        env["device_name"] = torch.cuda.get_device_name(index)
        env["cuda"] = torch.version.cuda
        env["gpu_memory_gib"] = round(torch.cuda.get_device_properties(index).total_memory / 2**30, 1)
    else:
        env["device_name"] = cpu_name()
    try:
        import ray

        env["ray"] = ray.__version__
    except ImportError:
        env["ray"] = None
    return env


def load_average() -> float | None:
    """The 1-minute load average: other work on the machine makes CPU figures meaningless."""
    try:
        return round(os.getloadavg()[0], 2)
    except (OSError, AttributeError):
        return None


def cpu_busy(seconds: float = 1.0) -> float | None:
    """The share of all CPUs busy over ``seconds`` (Linux /proc/stat), measured while this
    process sleeps: what other work takes from the bench."""
    def sample() -> tuple[int, int]:
        fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
        return sum(fields[:8]), idle

    try:
        total0, idle0 = sample()
        time.sleep(seconds)
        total1, idle1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    return round(1.0 - (idle1 - idle0) / max(1, total1 - total0), 3)


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


__all__ = [
    "CpuShare", "GpuSampler", "cpu_busy", "cpu_name", "environment", "free", "load_average", "ms_per_image",
    "rate", "ratio", "sync", "torch_device",
]
