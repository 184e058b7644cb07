"""What a run records about where it ran: versions, git commit, device."""
from __future__ import annotations

import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

from bench import __version__
from bench.execution.library_versions import installed_versions

__all__ = ["device_name", "environment", "git_commit"]


def git_commit(folder: Path) -> str | None:
    """The checked-out commit of `folder` (with '+dirty' when modified), or None outside git."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=folder, capture_output=True, text=True,
                                timeout=5, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=folder,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return commit + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def device_name(device: torch.device) -> str:
    """A human-readable name of the compute device (GPU model, or CPU model and core count)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:  # not Linux: keep the platform module's answer
        lines = []
    for line in lines:
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    return f"{cpu} ({torch.get_num_threads()} threads)"


def environment(device: torch.device) -> dict[str, Any]:
    """Everything needed to tell two runs' settings apart; `libraries` maps each recorded distribution
    (bench.execution.library_versions.RECORDED) to its installed version or "not installed"."""
    return {
        "package_version": __version__,
        "git_commit": git_commit(Path(__file__).resolve().parents[2]),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "cuda": torch.version.cuda if torch.cuda.is_available() else None,
        "device": str(device),
        "device_name": device_name(device),
        "platform": platform.platform(),
        "libraries": installed_versions(),
    }
