"""Transports between two real processes over torch.distributed: gloo (TCP) and nccl (GPUs)."""

from __future__ import annotations

import logging
import os
import pickle
import select
import socket
import subprocess
import sys
import tempfile
import time
from datetime import timedelta

from kvprof.errors import KvprofError, VerificationError
from kvprof.microbench.engine import make_engine
from kvprof.microbench.layout import TransferLayout
from kvprof.microbench.paged import SourcePattern
from kvprof.microbench.sides import DecodeSide, PrefillSide, mismatch_error, pick_descriptors

log = logging.getLogger(__name__)

# Per-message sends cost tens of microseconds each over gloo, so per_descriptor times this
# many descriptors and scales to the full count (and says so in every output).
PER_DESCRIPTOR_SAMPLE = 2000
_TIMEOUT = timedelta(seconds=120)
_WORKER_READY_TIMEOUT_S = 300.0

CMD_STOP, CMD_TRANSFER, CMD_PER_DESCRIPTOR = 0, 1, 2
# Result vector the decode process sends back after each run.
_RESULT_LEN = 8  # recv_done, scatter_done, ok, rank, layer_kv, stream, block, byte


def free_port() -> int:
    """A TCP port on 127.0.0.1 nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _init_group(backend: str, port: int, rank: int) -> None:
    import torch.distributed as dist

    # Keep gloo's sockets on loopback whatever the host name resolves to.
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group(
        backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2, timeout=_TIMEOUT
    )


def decode_worker_main() -> int:
    """`python -m kvprof.microbench.twoproc`: the decode process; its arguments come pickled
    on stdin, "ready" goes to stdout, and a failure is one line on stderr."""
    args = pickle.load(sys.stdin.buffer)

    def ready() -> None:
        sys.stdout.write("ready\n")
        sys.stdout.flush()

    try:
        _decode_loop(ready=ready, **args)
    except Exception as exc:  # reported to the parent, which owns the user-facing error
        if os.environ.get("KVPROF_DEBUG"):
            raise
        sys.stderr.write(f"{type(exc).__name__}: {exc}\n")
        return 1
    return 0


def _decode_loop(layout, device, backend, seed, port, threads, ready) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(threads)
    engine = make_engine(device, threads)
    comm = device if backend == "nccl" else "cpu"
    staging_device = "cpu" if backend == "gloo" else device
    decode = DecodeSide(layout, engine, device, SourcePattern(layout, seed), staging_device)
    t0 = time.perf_counter()
    decode.build_descriptors()
    build_s = time.perf_counter() - t0
    ready()
    _init_group(backend, port, rank=1)
    dist.send(torch.tensor([build_s], dtype=torch.float64, device=comm), dst=0)
    ctrl = torch.zeros(4, dtype=torch.int64, device=comm)
    ack = torch.zeros(1, dtype=torch.int64, device=comm)
    try:
        while True:
            dist.recv(ctrl, src=0)
            cmd, run, corrupt, sample = ctrl.tolist()
            if cmd == CMD_STOP:
                break
            result = torch.zeros(_RESULT_LEN, dtype=torch.float64)
            result[2] = 1.0
            if cmd == CMD_TRANSFER:
                decode.poison()
                dist.send(ack, dst=0)
                for buf in decode.recv:
                    dist.recv(buf, src=0)
                engine.sync()
                result[0] = time.perf_counter()
                decode.scatter()
                result[1] = time.perf_counter()
                picks = None
            else:
                picks = pick_descriptors(layout, sample)
                rows = [decode.row(p.rank, p.layer_kv, p.stream, p.block) for p in picks]
                for r in rows:
                    r.zero_()
                engine.sync()
                dist.send(ack, dst=0)
                for r in rows:
                    dist.recv(r, src=0)
                engine.sync()
                result[0] = result[1] = time.perf_counter()
            if corrupt:
                decode.corrupt_one_byte()
            try:
                if picks is None:
                    decode.verify("total", run)
                else:
                    decode.verify_descriptors("per_descriptor", run, picks)
            except VerificationError as err:
                result[2] = 0.0
                result[3:8] = torch.tensor(err.location, dtype=torch.float64)
            dist.send(result.to(comm), dst=0)
    finally:
        dist.destroy_process_group()


class TwoProcessSession:
    """Prefill side here (rank 0), decode side in a spawned process (rank 1)."""

    def __init__(
        self,
        layout: TransferLayout,
        device: str,
        backend: str,
        threads: int,
        seed: int = 0,
    ) -> None:
        import torch

        self.layout = layout
        self.backend = backend
        self.name = backend
        self.methods = {
            "wire": f"torch.distributed {backend} send/recv of each decode rank's staging buffer",
            "per_descriptor": f"one {backend} send/recv per descriptor",
        }
        self.threads = threads
        if backend == "nccl":
            self.device, worker_device = "cuda:0", "cuda:1"
            staging = self.device
        else:
            self.device, worker_device = device, device
            # gloo moves host memory only: a CUDA run is host-staged on both sides.
            staging = "cpu"
        self.comm = self.device if backend == "nccl" else "cpu"
        self.engine = make_engine(self.device, threads)
        self._port = free_port()
        # A fresh interpreter (not multiprocessing's spawn, which re-imports the caller's
        # __main__): the decode side shares nothing with this process but the wire.
        self._stderr = tempfile.TemporaryFile()
        self._worker = subprocess.Popen(
            [sys.executable, "-m", "kvprof.microbench.twoproc"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
        )
        worker_args = dict(
            layout=layout, device=worker_device, backend=backend, seed=seed, port=self._port,
            threads=threads,
        )
        self._worker.stdin.write(pickle.dumps(worker_args))
        self._worker.stdin.close()
        self._group = False
        try:
            self.prefill = PrefillSide(
                layout, self.engine, self.device, SourcePattern(layout, seed), staging
            )
            self._raw_dst = torch.empty_like(max(self.prefill.staging, key=lambda t: t.numel()))
        except BaseException:
            self._stop_worker()
            raise
        self._raw_jobs = [
            job
            for src in self.prefill.staging
            for job in self.engine.copy_jobs(self._raw_dst.view(-1)[: src.numel()], src.view(-1))
        ]
        self.descriptors = layout.descriptors_total
        self.per_descriptor_note: dict | None = None

    def _worker_error(self) -> KvprofError:
        self._stop_worker()
        self._stderr.seek(0)
        lines = self._stderr.read().decode(errors="replace").strip().splitlines()
        msg = lines[-1] if lines else f"exit code {self._worker.returncode}"
        return KvprofError(
            f"the {self.backend} decode process failed: {msg}",
            hint="Rerun with KVPROF_DEBUG=1; check that 127.0.0.1 ports can be opened.",
        )

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + _WORKER_READY_TIMEOUT_S
        out = self._worker.stdout
        while time.monotonic() < deadline:
            readable, _, _ = select.select([out], [], [], 0.2)
            if readable:
                if out.readline().strip() == b"ready":
                    return
                raise self._worker_error()
            if self._worker.poll() is not None:
                raise self._worker_error()
        raise self._worker_error()

    def setup(self) -> dict[str, float]:
        """First contact: the process group rendezvous and pair connection, plus index lists."""
        import torch
        import torch.distributed as dist

        t0 = time.perf_counter()
        self.prefill.build_descriptors()
        build_s = time.perf_counter() - t0
        self._wait_ready()
        t1 = time.perf_counter()
        try:
            _init_group(self.backend, self._port, rank=0)
            self._group = True
            worker_build = torch.zeros(1, dtype=torch.float64, device=self.comm)
            dist.recv(worker_build, src=1)
        except Exception:
            self.close()
            raise self._worker_error() from None
        t2 = time.perf_counter()
        return {
            "index_build_s": build_s + float(worker_build.item()),
            "process_group_s": t2 - t1,
            "total_s": build_s + float(worker_build.item()) + t2 - t1,
        }

    def _command(self, cmd: int, run: int, corrupt: bool, sample: int = 0) -> None:
        import torch
        import torch.distributed as dist

        ctrl = torch.tensor([cmd, run, int(corrupt), sample], dtype=torch.int64, device=self.comm)
        dist.send(ctrl, dst=1)
        if cmd != CMD_STOP:
            ack = torch.zeros(1, dtype=torch.int64, device=self.comm)
            dist.recv(ack, src=1)

    def _result(self, step: str, run: int) -> list[float]:
        import torch
        import torch.distributed as dist

        result = torch.zeros(_RESULT_LEN, dtype=torch.float64, device=self.comm)
        dist.recv(result, src=1)
        values = result.cpu().tolist()
        if values[2] != 1.0:
            rank, lk, stream, block, byte = (int(v) for v in values[3:8])
            raise mismatch_error(self.layout, step, run, rank, lk, stream, (block, byte))
        return values

    def run_transfer(self, step: str, run: int, corrupt: bool) -> dict[str, float]:
        """gather here, send each decode rank's staging, the other process scatters."""
        import torch.distributed as dist

        try:
            self._command(CMD_TRANSFER, run, corrupt)
            t0 = time.perf_counter()
            self.prefill.gather()
            t1 = time.perf_counter()
            for buf in self.prefill.staging:
                dist.send(buf, dst=1)
            recv_done, scatter_done, *_ = self._result(step, run)
        except (RuntimeError, ValueError) as exc:
            raise self._transport_error(exc) from None
        # Both processes read the same CLOCK_MONOTONIC, so cross-process differences hold.
        return {
            "gather": t1 - t0,
            "wire": recv_done - t1,
            "scatter": scatter_done - recv_done,
            "total": scatter_done - t0,
        }

    def run_per_descriptor(self, step: str, run: int, corrupt: bool) -> float:
        """A labelled sample of descriptors, one send each, scaled to the full count."""
        import torch.distributed as dist

        picks = pick_descriptors(self.layout, PER_DESCRIPTOR_SAMPLE)
        rows = [self.prefill.row(p.rank, p.layer_kv, p.stream, p.block) for p in picks]
        try:
            self._command(CMD_PER_DESCRIPTOR, run, corrupt, PER_DESCRIPTOR_SAMPLE)
            t0 = time.perf_counter()
            for r in rows:
                dist.send(r, dst=1)
            recv_done, *_ = self._result(step, run)
        except (RuntimeError, ValueError) as exc:
            raise self._transport_error(exc) from None
        factor = self.descriptors / len(picks)
        if len(picks) < self.descriptors:
            self.per_descriptor_note = {
                "descriptors_timed": len(picks),
                "descriptors_total": self.descriptors,
                "scale_factor": factor,
            }
        return (recv_done - t0) * factor

    def _transport_error(self, exc: Exception) -> KvprofError:
        if self._worker.poll() is not None:
            return self._worker_error()
        return KvprofError(
            f"{self.backend} transfer failed: {exc}", hint="Rerun with KVPROF_DEBUG=1."
        )

    def raw_copy(self) -> float:
        t0 = time.perf_counter()
        self.engine.run(self._raw_jobs)
        return time.perf_counter() - t0

    def _stop_worker(self) -> None:
        try:
            self._worker.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._worker.terminate()
            try:
                self._worker.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._worker.kill()
                self._worker.wait()

    def close(self) -> None:
        import torch.distributed as dist

        if self._group:
            try:
                if self._worker.poll() is None:
                    self._command(CMD_STOP, 0, False)
            except RuntimeError as exc:
                log.debug("stop command not delivered: %s", exc)
            dist.destroy_process_group()
            self._group = False
        self._stop_worker()
        self._worker.stdout.close()
        self._stderr.close()
        self.engine.close()


if __name__ == "__main__":
    sys.exit(decode_worker_main())
