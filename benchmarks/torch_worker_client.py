"""The client side of the benchmarks' PyTorch workers (benchmarks/*_torch_worker.py,
benchmarks/vit_timm_worker.py), shared by the *_vs_torch / *_vs_timm benchmarks.

PyTorch runs in its own Python (a venv with torch; vqlc's venv has none), so each benchmark starts
a worker script there and talks to it in JSON lines: the worker first writes a hello line
({"torch": version, "threads": n, ...}), then answers each command line on stdin with one line on
stdout, and exits on {"cmd": "quit"}. Its stderr goes to a log file whose tail is raised with the
error if the worker dies.
"""
import json
import os
import subprocess
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class TorchWorker:
    """`script` (a path) run by `python` with `args` as its command line, in the repository root."""

    def __init__(self, python: str, script: str, *args):
        name = os.path.splitext(os.path.basename(script))[0]
        self.log = tempfile.NamedTemporaryFile("w", prefix=f"{name}_", suffix=".log",
                                               delete=False)
        self.log_path = self.log.name
        self.proc = subprocess.Popen([python, script, *(str(a) for a in args)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.log, text=True, cwd=ROOT)
        self.hello = self._read()

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait()
            with open(self.log_path) as f:
                tail = f.read()[-4000:]
            raise RuntimeError(f"torch worker failed (exit {self.proc.returncode}; log "
                               f"{self.log_path}):\n{tail}")
        return json.loads(line)

    def ask(self, **msg) -> dict:
        """Send one command (the keyword arguments as a JSON object); return the answer."""
        self.proc.stdin.write(json.dumps(msg) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        """Ask a running worker to quit and wait for it."""
        if self.proc.poll() is None:
            self.proc.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
            self.proc.stdin.flush()
            self.proc.wait()
        self.log.close()


def machine_line(worker, torch_extra: str = "", jax_dtype: str = "float32") -> str:
    """The table's header line: this CPU and its load, the torch worker's and JAX's versions."""
    import jax
    return (f"CPU: {os.cpu_count()} cores ({len(os.sched_getaffinity(0))} usable), load "
            f"{os.getloadavg()[0]:.2f}; torch {worker.hello['torch']}{torch_extra} with "
            f"{worker.hello['threads']} threads; jax {jax.__version__} on "
            f"{jax.devices()[0].platform} ({jax.device_count()} device), {jax_dtype}")
