"""What every benchmark shares: the machine it ran on, timing, peak memory, JSON output and the docs table.

A number without the machine, the library versions, the settings and the exact command is not reproducible,
so every result file and every docs table carries all four.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import gc
import os
import platform
import re
import shlex
import sys
import threading
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from derm_accel.core.fileio import atomic_write_text

REPO_ROOT = Path(__file__).resolve().parents[1]


def default_docs_path() -> Path:
    """``docs/benchmarks.md`` of the source checkout, else of the current directory."""
    root = REPO_ROOT if (REPO_ROOT / "pyproject.toml").exists() else Path.cwd()
    return root / "docs" / "benchmarks.md"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: str | None = None) -> dict[str, Any]:
    """CPU model and usable cores, GPU name, library versions and the load at the start (shared machines)."""
    import PIL
    import torch
    import torchvision

    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        usable = os.cpu_count() or 1
    info: dict[str, Any] = {
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "usable_cores": usable,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "pillow": PIL.__version__,
        "platform": platform.platform(),
    }
    try:
        import timm

        info["timm"] = timm.__version__
    except ImportError:  # pragma: no cover - timm is a dependency
        pass
    from derm_accel.data.transforms import jpeg_decoder

    if jpeg_decoder() is not None:  # the training input's JPEG decoder
        import torchcodec

        info["torchcodec"] = torchcodec.__version__
    if hasattr(os, "getloadavg"):
        info["loadavg_1m"] = round(os.getloadavg()[0], 2)
    if torch.cuda.is_available() and (device is None or str(device).startswith("cuda")):
        props = torch.cuda.get_device_properties(0)
        info["gpu"] = props.name
        info["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
        info["cuda"] = torch.version.cuda
        info["gpu_count"] = torch.cuda.device_count()
    return info


def machine_label(info: dict[str, Any]) -> str:
    """One line naming the machine for a docs table."""
    if "gpu" in info:
        where = f"{info['gpu']} (CUDA {info.get('cuda')}), host {info['cpu']}"
    else:
        where = f"{info['cpu']}, {info['usable_cores']} usable cores"
    load = f", load avg {info['loadavg_1m']} at start" if "loadavg_1m" in info else ""
    codec = f", torchcodec {info['torchcodec']}" if "torchcodec" in info else ""
    return f"{where}; torch {info['torch']}, torchvision {info['torchvision']}{codec}, Pillow {info['pillow']}{load}"


def resolve_device(device: str | None) -> str:
    """``auto`` (or None) means the GPU when there is one."""
    import torch

    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} but torch sees no CUDA GPU; use device='cpu' or 'auto'.")
    return str(device)


def synchronize(device: str) -> None:
    import torch

    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def as_list(value: Any, cast: type = str) -> list[Any]:
    """Accept ``"a,b"``, ``["a", "b"]`` or a scalar for list options (the CLI passes strings)."""
    if value is None:
        return []
    if isinstance(value, str):
        return [cast(v.strip()) for v in value.split(",") if v.strip()]
    if isinstance(value, Iterable):
        return [cast(v) if not isinstance(v, cast) else v for v in value]
    return [cast(value)]


def parse_bool(value: str | bool) -> bool:
    """``on/off``, ``true/false``, ``yes/no``, ``1/0``."""
    if isinstance(value, bool):
        return value
    s = str(value).strip().lower()
    if s in ("1", "true", "on", "yes"):
        return True
    if s in ("0", "false", "off", "no"):
        return False
    raise ValueError(f"Expected on/off, got {value!r}")


def as_bools(value: Any) -> list[bool]:
    """``"off,on"`` / ``[False, True]`` / ``True`` -> list of bools, for on/off sweeps."""
    values = [value] if isinstance(value, bool) else as_list(value, str)
    return [parse_bool(v) for v in values]


def parse_size(value: str | Sequence[int]) -> tuple[int, int]:
    """``"640x480"`` -> (640, 480) as (width, height)."""
    if isinstance(value, str):
        match = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", value)
        if not match:
            raise ValueError(f"Image size {value!r} must look like WIDTHxHEIGHT, e.g. 640x480")
        return int(match.group(1)), int(match.group(2))
    w, h = value
    return int(w), int(h)


class PeakMemory:
    """Peak memory of a block: ``torch.cuda.max_memory_allocated`` on a GPU, sampled process RSS on the CPU.

    tracemalloc does not see torch's allocations, and ``ru_maxrss`` never goes down within a process, so on
    the CPU a thread samples RSS every few milliseconds; ``peak_mb`` is the highest RSS seen, ``delta_mb``
    its rise over the RSS when the block started.
    """

    def __init__(self, device: str, interval_s: float = 0.005):
        self.device = str(device)
        self.interval_s = interval_s
        self.peak_mb = 0.0
        self.delta_mb = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> PeakMemory:
        gc.collect()
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._start = torch.cuda.memory_allocated() / 2**20
            return self
        import psutil

        proc = psutil.Process()
        self._start = proc.memory_info().rss / 2**20
        self.peak_mb = self._start

        def sample() -> None:
            while not self._stop.is_set():
                self.peak_mb = max(self.peak_mb, proc.memory_info().rss / 2**20)
                self._stop.wait(self.interval_s)

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.synchronize()
            self.peak_mb = torch.cuda.max_memory_allocated() / 2**20
        else:
            self._stop.set()
            if self._thread is not None:
                self._thread.join()
        self.delta_mb = self.peak_mb - self._start

    @property
    def kind(self) -> str:
        return "cuda_max_allocated" if self.device.startswith("cuda") else "sampled_peak_rss"


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


def current_command() -> str:
    """The command line of this process, as a user would retype it."""
    argv = list(sys.argv) or ["python"]
    prog = Path(argv[0]).name
    if prog in ("derm-accel", "__main__.py") or argv[0].endswith("/bin/derm-accel"):
        argv[0] = "derm-accel"
    elif argv[0].endswith(".py"):
        with contextlib.suppress(ValueError):  # a script outside the checkout keeps its path
            argv[0] = str(Path(argv[0]).resolve().relative_to(REPO_ROOT))
        argv = ["python", *argv]
    return shlex.join(argv)


def markers(kind: str) -> tuple[str, str]:
    return f"<!-- bench:{kind}:start -->", f"<!-- bench:{kind}:end -->"


def update_docs_section(docs: str | os.PathLike, kind: str, body: str) -> Path:
    """Rewrite the ``kind`` section of the docs file in place, between its HTML comment markers.

    A missing file is created; a file without the markers gets the section appended, so hand-written text
    around the markers is never touched.
    """
    docs = Path(docs)
    start, end = markers(kind)
    block = f"{start}\n{body.rstrip()}\n{end}"
    text = docs.read_text() if docs.exists() else "# Benchmarks\n"
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.DOTALL)
    if pattern.search(text):
        text = pattern.sub(lambda _: block, text, count=1)
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    docs.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write_text(docs, text)


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:,.1f}" if abs(v) >= 10 else f"{v:.2f}"
        return str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def provenance_lines(results: dict[str, Any]) -> str:
    """The machine / settings / command lines that head every docs section."""
    settings = ", ".join(f"{k}={v}" for k, v in results["settings"].items())
    return (
        f"Measured {results['created']} on {machine_label(results['machine'])}.\n\n"
        f"Settings: {settings}.\n\n"
        f"Command: `{results['command']}`\n"
    )


class Stopwatch:
    """Wall-clock seconds of a block, synchronising the GPU first and last so queued kernels count."""

    def __init__(self, device: str = "cpu"):
        self.device = device
        self.seconds = 0.0

    def __enter__(self) -> Stopwatch:
        synchronize(self.device)
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        synchronize(self.device)
        self.seconds = time.perf_counter() - self._t0
