"""Device names (auto, cpu, cuda, cuda:N, mps) as torch devices: one parser for the CLI, the API and Ray workers."""
from __future__ import annotations

import os

import torch

from bench.core.errors import ConfigError

__all__ = ["parse_device", "pick_device", "ray_driver_device", "ray_worker_device"]

LOCAL_TYPES = ("cpu", "cuda", "mps")
RAY_TYPES = ("cpu", "cuda")  # Ray schedules GPUs as CUDA devices only


def parse_device(name: str, *, gpu: bool | None = None, ray: bool = False) -> torch.device:
    """`name` as a torch.device; "auto" is CUDA when `gpu` (None: when torch sees a GPU), else the CPU.

    A name torch does not know, or of a type this executor cannot use (mps with Ray), is a one-line
    ConfigError naming the accepted names.
    """
    if name == "auto":
        return torch.device("cuda" if (torch.cuda.is_available() if gpu is None else gpu) else "cpu")
    accepted = "auto, cpu or cuda" if ray else "auto, cpu, cuda or cuda:N"
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise ConfigError(f"unknown device {name!r}; use {accepted}") from exc
    if device.type not in (RAY_TYPES if ray else LOCAL_TYPES):
        raise ConfigError(f"device {name!r} is not supported{' with --executor ray' if ray else ''}; use {accepted}")
    return device


def pick_device(name: str) -> torch.device:
    """The device of an in-process run: `name` parsed, and a CUDA device asked for must be present."""
    device = parse_device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for but no CUDA device is available; use --device cpu")
    return device


def ray_driver_device(name: str) -> torch.device:
    """What a Ray driver records as its device: only the name is checked (each worker picks its own device, and
    a GPU-less head node still sends cells to GPU workers), so auto, or cuda without a local GPU, is the CPU."""
    device = parse_device(name, gpu=False, ray=True)
    return device if device.type == "cpu" or torch.cuda.is_available() else torch.device("cpu")


def ray_worker_device(name: str) -> torch.device:
    """A Ray worker's device: auto is CUDA only when Ray assigned this worker a GPU (CUDA_VISIBLE_DEVICES)."""
    return parse_device(name, gpu=torch.cuda.is_available() and bool(os.environ.get("CUDA_VISIBLE_DEVICES")),
                        ray=True)
