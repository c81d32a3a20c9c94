"""What a benchmark ran on: the card or CPU, thread count, library versions, the git commit and the command."""

from __future__ import annotations

import os
import platform
import shlex
import subprocess
import sys
from importlib import metadata

import torch


def cpu_model() -> str:
    """The CPU's marketing name from /proc/cpuinfo (Linux), else whatever platform knows."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def package_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def git_state(path: str) -> dict:
    """Commit and dirtiness of the checkout holding `path`. $PHOTONINFER_GIT_COMMIT, when set, names the commit
    instead: a copy of the tree (as on a lent GPU machine) may carry no .git, or a stale one."""
    named = os.environ.get("PHOTONINFER_GIT_COMMIT")
    if named:
        return {"commit": named, "dirty": None, "source": "environment"}

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", "-C", path, *args], capture_output=True, text=True, timeout=20)
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    if commit is None:
        return {"commit": None, "dirty": None, "source": "environment"}
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": None if status is None else bool(status), "source": "git"}


def describe_environment(device: torch.device, argv: list[str] | None) -> dict:
    import photoninfer

    hardware = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model(),
        "device_type": device.type,
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        hardware["gpu_memory_gb"] = round(props.total_memory / 2**30, 1)
        hardware["cuda"] = torch.version.cuda
    versions = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": package_version("triton") or package_version("pytorch-triton"),
        "transformers": package_version("transformers"),
        "photoninfer": package_version("photoninfer"),
    }
    command = ["photoninfer", *argv] if argv is not None else [os.path.basename(sys.argv[0]), *sys.argv[1:]]
    return {
        **hardware,
        "versions": versions,
        "git": git_state(os.path.dirname(os.path.abspath(photoninfer.__file__))),
        "command": shlex.join(command),
        "platform": platform.platform(),
    }
