"""Multi-node stages: from the environment Kubeflow sets to the one ms-swift's launcher reads.

PyTorchJob gives every pod WORLD_SIZE (pods) and RANK (this pod), plus MASTER_ADDR/MASTER_PORT; Kubeflow
Trainer's TrainJob (torch runtime) gives PET_NNODES, PET_NODE_RANK, PET_MASTER_ADDR, PET_MASTER_PORT and
PET_NPROC_PER_NODE. ms-swift starts torchrun itself when it sees NNODES / NODE_RANK / MASTER_ADDR /
MASTER_PORT / NPROC_PER_NODE, and torchrun then sets RANK and WORLD_SIZE per process, so the pod-level
RANK/WORLD_SIZE must not reach it.
"""

from __future__ import annotations

from collections.abc import Mapping

from teleguard.loopback import free_port


class DistributedEnvError(ValueError):
    """Launcher variables that contradict each other or are not numbers."""


def _nnodes(value: str) -> str:
    # torch elastic allows "MIN:MAX": a stage runs on the maximum it was given.
    return value.split(":")[-1]


def _int(name: str, value: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise DistributedEnvError(f"{name}={value!r} is not a whole number") from None


def swift_launch_env(environ: Mapping[str, str], gpus_per_node: int | None = None) -> dict[str, str]:
    """The environment for an ms-swift command: launcher variables mapped, pod-level ranks removed.

    Returns a full environment (a copy of `environ` with changes). On a single node without any launcher
    variables it only adds NPROC_PER_NODE when `gpus_per_node` > 1, and a free MASTER_PORT.
    """
    env = dict(environ)
    nnodes = environ.get("PET_NNODES") or environ.get("WORLD_SIZE")
    node_rank = environ.get("PET_NODE_RANK") or environ.get("RANK")
    master_addr = environ.get("PET_MASTER_ADDR") or environ.get("MASTER_ADDR")
    master_port = environ.get("PET_MASTER_PORT") or environ.get("MASTER_PORT")
    nproc = environ.get("PET_NPROC_PER_NODE") or environ.get("NPROC_PER_NODE")
    if nproc in (None, "", "auto", "gpu") and gpus_per_node:
        nproc = str(gpus_per_node)

    env.pop("WORLD_SIZE", None)
    env.pop("RANK", None)
    if nnodes is not None:
        n = _int("NNODES", _nnodes(nnodes))
        rank = _int("NODE_RANK", node_rank or "0")
        if not 0 <= rank < n:
            raise DistributedEnvError(f"node rank {rank} is outside 0..{n - 1} for {n} nodes")
        if n > 1 and not master_addr:
            raise DistributedEnvError(f"{n} nodes but no MASTER_ADDR / PET_MASTER_ADDR")
        env.update(NNODES=str(n), NODE_RANK=str(rank))
    if master_addr:
        env["MASTER_ADDR"] = master_addr
    if master_port:
        env["MASTER_PORT"] = str(_int("MASTER_PORT", master_port))
    if (
        nproc
        and _int("NPROC_PER_NODE", nproc) > 0
        and (nnodes is not None or _int("NPROC_PER_NODE", nproc) > 1)
    ):
        env["NPROC_PER_NODE"] = nproc
    if not {"NNODES", "MASTER_PORT"} & env.keys():
        # one node: its process group (torchrun's, or the one-process group ms-swift opens for colocated vLLM)
        # would listen on port 29500, and a second stage on the machine (another job, a test suite) would fail
        # to bind it
        env["MASTER_PORT"] = str(free_port())
    return env


def node_rank(environ: Mapping[str, str]) -> int:
    """This pod's node rank in a multi-node stage (0 on a single node)."""
    value = environ.get("PET_NODE_RANK") or environ.get("NODE_RANK") or environ.get("RANK") or "0"
    return _int("NODE_RANK", value)
