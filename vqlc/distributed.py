"""Multi-process start-up: whether and how to call ``jax.distributed.initialize()``.

Every task (codebook, tokenizer, evaluate) calls :func:`initialize` before anything touches a
JAX backend. The decision, first match wins:

1. ``flag`` (``--distributed`` / ``--nodistributed`` of ``vqlc.main``) when not None;
2. ``VQLC_DISTRIBUTED=1`` (or true/yes) forces it on, ``VQLC_DISTRIBUTED=0`` forces it off;
3. ``VQLC_COORDINATOR_ADDRESS`` set: an explicit cluster (``launch/local.sh``, or any launcher);
4. auto-detection of the clusters JAX itself knows how to join, when they hold more than one
   process: a SLURM job step (``srun``: ``SLURM_JOB_ID``, ``SLURM_STEP_NODELIST``,
   ``SLURM_PROCID``, ``SLURM_LOCALID`` and more than one task in ``SLURM_STEP_NUM_TASKS`` /
   ``SLURM_NTASKS``) and a Cloud TPU VM slice with several workers (``TPU_WORKER_HOSTNAMES`` /
   ``TPU_PROCESS_ADDRESSES`` with several hosts, ``MEGASCALE_NUM_SLICES > 1``, or the GCE
   metadata server's worker list, read the way JAX's own ``GceTpuCluster`` reads it).

With ``VQLC_COORDINATOR_ADDRESS=host:port`` the process count and this process's id come from
``VQLC_NUM_PROCESSES`` and ``VQLC_PROCESS_ID``; otherwise JAX fills in whatever is unset from the
detected cluster (``JAX_COORDINATOR_ADDRESS``, ``JAX_COORDINATOR_PORT`` and
``JAX_LOCAL_DEVICE_IDS`` are honoured by JAX itself).

CPU processes exchange collectives through gloo (``jax_cpu_collectives_implementation``), set
before the backend exists; ``JAX_CPU_COLLECTIVES_IMPLEMENTATION`` (e.g. ``mpi``) overrides it.
Every process then logs one line: process i/n, host, local/global devices, platform.
"""
from __future__ import annotations

import logging
import os
import socket

ENV_FLAG = "VQLC_DISTRIBUTED"
ENV_ADDRESS = "VQLC_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "VQLC_NUM_PROCESSES"
ENV_PROCESS_ID = "VQLC_PROCESS_ID"

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off", "")


def _env_flag(environ) -> bool | None:
    value = environ.get(ENV_FLAG)
    if value is None:
        return None
    value = value.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ValueError(f"{ENV_FLAG}={environ[ENV_FLAG]!r}: use 1 (on) or 0 (off).")


def _int_env(environ, name: str) -> int | None:
    value = environ.get(name)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{name}={value!r} is not an integer.") from None


def slurm_processes(environ=os.environ) -> int:
    """Tasks of the current SLURM job step; 0 outside a step JAX can join (e.g. a bare sbatch
    script, where SLURM_NTASKS is set but only one process runs)."""
    needed = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_PROCID", "SLURM_LOCALID")
    if not all(k in environ for k in needed):
        return 0
    for name in ("SLURM_STEP_NUM_TASKS", "SLURM_NTASKS"):
        count = _int_env(environ, name)
        if count is not None:
            return count
    return 0


def tpu_processes(environ=os.environ) -> int:
    """Workers of this Cloud TPU VM slice (times slices); 0 when not on a TPU VM."""
    hosts = environ.get("TPU_PROCESS_ADDRESSES") or environ.get("TPU_WORKER_HOSTNAMES")
    slices = _int_env(environ, "MEGASCALE_NUM_SLICES") or 1
    if hosts:
        return len([h for h in hosts.split(",") if h.strip()]) * slices
    if slices > 1:
        return slices
    if not on_tpu_vm():
        return 0
    # A TPU VM created with gcloud: the worker list lives in the GCE metadata server.
    endpoints = gce_metadata("instance/attributes/worker-network-endpoints")
    return len([e for e in (endpoints or "").split(",") if e.strip()])


# PCI vendor id of Google's TPU chips, as the kernel lists devices in sysfs.
_GOOGLE_PCI_VENDOR = "0x1ae0"
_METADATA_URL = "http://metadata.google.internal/computeMetadata/v1/"


def on_tpu_vm(pci_root: str = "/sys/bus/pci/devices") -> bool:
    """Whether a TPU chip is attached (read from sysfs: no JAX internals, no network)."""
    try:
        for device in os.listdir(pci_root):
            with open(os.path.join(pci_root, device, "vendor")) as f:
                if f.read().strip() == _GOOGLE_PCI_VENDOR:
                    return True
    except OSError:
        pass
    return False


def gce_metadata(key: str, timeout_s: float = 5.0) -> str | None:
    """A value of the GCE metadata server, or None when unreachable (not on GCE)."""
    import urllib.request
    request = urllib.request.Request(_METADATA_URL + key, headers={"Metadata-Flavor": "Google"})
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            return response.read().decode()
    except Exception as e:  # no metadata server: not detected
        logging.debug("GCE metadata %s unavailable: %r", key, e)
        return None


def plan(flag: bool | None = None, environ=os.environ) -> dict | None:
    """What :func:`initialize` will do: None (single process) or the keyword arguments of
    ``jax.distributed.initialize`` plus a 'reason'. Pure: reads ``environ``, starts nothing
    (apart from the TPU metadata query on a TPU VM)."""
    address = environ.get(ENV_ADDRESS) or None
    num_processes = _int_env(environ, ENV_NUM_PROCESSES)
    process_id = _int_env(environ, ENV_PROCESS_ID)
    if address is None and (num_processes is not None or process_id is not None):
        raise ValueError(
            f"{ENV_NUM_PROCESSES}/{ENV_PROCESS_ID} are set but {ENV_ADDRESS} is not: set "
            f"{ENV_ADDRESS}=host:port (the address of process 0) as well, or unset them to let "
            "JAX detect the cluster.")
    if flag is None:
        flag = _env_flag(environ)
    if flag is False:
        return None
    reason = "requested" if flag else None
    if reason is None and address is not None:
        reason = f"{ENV_ADDRESS}={address}"
    if reason is None and (n := slurm_processes(environ)) > 1:
        reason = f"SLURM job {environ['SLURM_JOB_ID']} with {n} tasks"
    if reason is None and (n := tpu_processes(environ)) > 1:
        reason = f"Cloud TPU VM slice with {n} workers"
    if reason is None:
        return None

    kwargs = {}
    if address is not None:
        if ":" not in address or not address.rsplit(":", 1)[1].isdigit():
            raise ValueError(f"{ENV_ADDRESS}={address!r}: expected host:port, e.g. "
                             "localhost:12345.")
        if num_processes is None or process_id is None:
            if not (slurm_processes(environ) > 1 or tpu_processes(environ) > 1):
                raise ValueError(
                    f"{ENV_ADDRESS} is set, so {ENV_NUM_PROCESSES} (total processes) and "
                    f"{ENV_PROCESS_ID} (this process, 0..N-1) must be set too; no SLURM or TPU "
                    "cluster was detected to fill them in.")
        kwargs["coordinator_address"] = address
    if num_processes is not None:
        if num_processes < 1:
            raise ValueError(f"{ENV_NUM_PROCESSES}={num_processes} must be >= 1.")
        kwargs["num_processes"] = num_processes
    if process_id is not None:
        if num_processes is not None and not 0 <= process_id < num_processes:
            raise ValueError(f"{ENV_PROCESS_ID}={process_id} must lie in 0..{num_processes - 1} "
                             f"({ENV_NUM_PROCESSES}={num_processes}).")
        kwargs["process_id"] = process_id
    return {"reason": reason, "kwargs": kwargs}


def initialize(flag: bool | None = None) -> None:
    """Joins the multi-process runtime when asked to or when a cluster is detected (see the
    module docstring), then logs this process's place in it. Must run before any JAX
    computation; calling it again is a no-op apart from the log line."""
    import jax

    todo = plan(flag)
    if todo is not None and not jax.distributed.is_initialized():
        if not os.environ.get("JAX_CPU_COLLECTIVES_IMPLEMENTATION"):
            # Without cross-process CPU collectives, a CPU computation spanning several
            # processes fails at its first all-reduce; GPUs and TPUs ignore the setting.
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        logging.info("jax.distributed.initialize(%s): %s",
                     ", ".join(f"{k}={v!r}" for k, v in todo["kwargs"].items()), todo["reason"])
        try:
            jax.distributed.initialize(**todo["kwargs"])
        except Exception as e:
            raise RuntimeError(
                f"jax.distributed.initialize failed ({todo['reason']}): {e}. Check that every "
                "process uses the same coordinator address and process count, that process 0 "
                "is running and its port is reachable, or start with --nodistributed / "
                f"{ENV_FLAG}=0 for a single process.") from e
    logging.info("%s", describe())


def describe() -> str:
    """'process i/n on <host>: L local / G global devices (<platform>)'."""
    import jax
    return (f"process {jax.process_index()}/{jax.process_count()} on {socket.gethostname()}: "
            f"{jax.local_device_count()} local / {jax.device_count()} global devices "
            f"({jax.devices()[0].platform})")
