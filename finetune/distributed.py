"""One job on several devices: the same trainer in N processes, data parallel (PyTorch DDP).

The caller (a Celery task, a notebook) calls `train_distributed`, which launches the ranks with
`torchrun` (`python -m torch.distributed.run --standalone`) and stays with them until they end:
it relays rank 0's events to its own `Hooks`, asks its hooks whether to stop (which renews a
job's lease) and, if so, tells the ranks through a file. Each rank runs `finetune.trainer.train`
on its shard of every global batch; gloo on CPUs, NCCL on GPUs (one per rank, `LOCAL_RANK`).

Files, all under `<output_dir>/ranks/`: `spec.json` (the config and the data, removed when the
ranks end), `events.jsonl` (rank 0's events, a JSON object a line), `stop` (present: stop at
the next step), `result-<rank>.json` (each rank's outcome) and `torchrun.log` (the ranks'
output).

A rank that dies (killed, out of memory) makes torchrun stop the others and start the whole
group again, up to `restarts` times; the new ranks resume from the newest checkpoint, as a
single process does.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from datetime import timedelta
from pathlib import Path
from typing import Any

from finetune.config import TrainConfig
from finetune.dataset import PreferenceExample
from finetune.preference import Preference
from finetune.trainer import Cancelled, Hooks, Objective, Supervised, TrainResult, train

__all__ = ["RankGroup", "main", "torchrun_command", "train_distributed"]

POLL_S = 0.2  # how often the launcher relays events and asks whether to stop
# A group restarted on torchrun's shared rendezvous store can read its predecessor's
# addresses and fail to connect (pytorch#135712): each attempt gets a store of its own.
RANK_ENV = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}


class RankGroup:
    """This process's place in the group (`finetune.trainer.Ranks`), from torchrun's
    environment: gloo on CPUs, NCCL on GPUs with one device per rank."""

    def __init__(self, timeout_s: float) -> None:
        import torch
        import torch.distributed as dist

        self.rank, self.world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if torch.cuda.is_available():
            torch.cuda.set_device(self.local_rank)  # "cuda" in the trainer is now this GPU
            self.device = torch.device("cuda", self.local_rank)
            backend = "nccl"
        else:
            self.device, backend = torch.device("cpu"), "gloo"
        # Bounds both joining the group and every collective after it.
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))

    def shard(self, batch: list[int]) -> list[int]:
        # The global batch is sorted by length: strided shards get similar lengths.
        return batch[self.rank:: self.world]

    def wrap(self, model: Any, loss: Callable[[], Any]) -> Callable[[], Any]:
        from torch.nn.parallel import DistributedDataParallel

        ddp = DistributedDataParallel(
            _as_module(model, loss),
            device_ids=[self.local_rank] if self.device.type == "cuda" else None)
        return ddp

    def sum(self, values: list[float]) -> list[float]:
        import torch
        import torch.distributed as dist

        tensor = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(tensor)
        return [float(v) for v in tensor.tolist()]

    def close(self) -> None:
        import torch.distributed as dist

        dist.destroy_process_group()


def _as_module(model: Any, loss: Callable[[], Any]) -> Any:
    """The trainer's loss as a module's forward, so that DDP sees (and syncs) the parameters
    it reaches and hooks the backward pass."""
    import torch

    class Objective(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self) -> Any:
            return loss()

    return Objective()


class _RankHooks:
    """Rank 0 appends events to the relay file; every rank stops when any sees the stop file
    or finds its launcher gone, and all agree on it (a sum over ranks) at the same step."""

    def __init__(self, folder: Path, group: RankGroup, launcher_pid: int) -> None:
        self.events = folder / "events.jsonl"
        self.stop_file = folder / "stop"
        self.group, self.launcher_pid = group, launcher_pid

    def event(self, level: str, message: str, data: dict[str, Any] | None = None) -> None:
        if self.group.rank == 0:
            line = json.dumps({"level": level, "message": message, "data": data})
            with self.events.open("a") as f:
                f.write(line + "\n")

    def _launcher_gone(self) -> bool:
        try:
            os.kill(self.launcher_pid, 0)
        except ProcessLookupError:
            return True  # nobody would relay events or keep the lease: stop
        except PermissionError:
            pass
        return False

    def should_stop(self) -> bool:
        mine = self.stop_file.exists() or self._launcher_gone()
        return self.group.sum([float(mine)])[0] > 0


def _spec(config: TrainConfig, objective: Objective, train_set: Sequence[Any],
          val_set: Sequence[Any], timeout_s: float) -> dict[str, Any]:
    fields = {k: str(v) if isinstance(v, Path) else v for k, v in asdict(config).items()}
    dpo = isinstance(objective, Preference)
    method = ({"type": "dpo", "beta": objective.beta} if isinstance(objective, Preference)
              else {"type": "supervised"})
    train_rows, val_rows = ([asdict(e) if dpo else list(e) for e in rows]
                            for rows in (train_set, val_set))
    return {"config": fields, "method": method, "train": train_rows, "valid": val_rows,
            "timeout_s": timeout_s, "launcher_pid": os.getpid()}


def _examples(spec: dict[str, Any]) -> tuple[Objective, list[Any], list[Any]]:
    """The objective and the examples `_spec` wrote."""
    if spec["method"]["type"] == "dpo":
        pairs = [[PreferenceExample(**e) for e in spec[k]] for k in ("train", "valid")]
        return Preference(float(spec["method"]["beta"])), pairs[0], pairs[1]
    return Supervised(), spec["train"], spec["valid"]


def _config(fields: dict[str, Any]) -> TrainConfig:
    return TrainConfig(**{**fields, "base_model": Path(fields["base_model"]),
                          "output_dir": Path(fields["output_dir"]),
                          "target_modules": tuple(fields["target_modules"])})


def main(argv: Sequence[str] | None = None) -> None:
    """A rank: `torchrun ... -m finetune.distributed <spec.json>`."""
    spec_path = Path((argv or sys.argv[1:])[0])
    spec = json.loads(spec_path.read_text())
    folder = spec_path.parent
    group = RankGroup(float(spec["timeout_s"]))
    outcome: dict[str, Any]
    try:
        hooks = _RankHooks(folder, group, int(spec["launcher_pid"]))
        try:
            objective, train_set, val_set = _examples(spec)
            result = train(_config(spec["config"]), train_set, val_set, hooks, objective,
                           ranks=group)
            outcome = {**asdict(result), "adapter_dir": str(result.adapter_dir)}
        except Cancelled as exc:
            outcome = {"cancelled": str(exc)}
    finally:
        group.close()
    tmp = folder / f"result-{group.rank}.json.tmp"
    tmp.write_text(json.dumps(outcome))
    os.replace(tmp, folder / f"result-{group.rank}.json")


def torchrun_command(spec: Path, devices: int, restarts: int, timeout_s: float) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc-per-node={devices}", f"--max-restarts={restarts}",
            f"--rdzv-conf=join_timeout={int(timeout_s)}",
            "-m", "finetune.distributed", str(spec)]


class _Relay:
    """Reads the complete lines rank 0 appended since the last call."""

    def __init__(self, path: Path, hooks: Hooks) -> None:
        self.path, self.hooks, self.offset = path, hooks, 0

    def __call__(self) -> None:
        try:
            with self.path.open("rb") as f:
                f.seek(self.offset)
                chunk = f.read()
        except FileNotFoundError:
            return
        complete = chunk[: chunk.rfind(b"\n") + 1]
        self.offset += len(complete)
        for line in complete.splitlines():
            record = json.loads(line)
            self.hooks.event(record["level"], record["message"], record["data"])


def train_distributed(config: TrainConfig, train_set: Sequence[Any],
                      val_set: Sequence[Any] = (), hooks: Hooks | None = None, *,
                      devices: int, restarts: int = 3, timeout_s: float = 1800.0,
                      objective: Objective | None = None) -> TrainResult:
    """`finetune.trainer.train` on `devices` processes, with the same result, events, resume
    and cancellation. `timeout_s` bounds joining the group and each collective (so also the
    longest checkpoint with its evaluation, which the other ranks wait for)."""
    if devices < 2:
        raise ValueError(f"invalid devices: {devices!r} (use finetune.trainer.train for one)")
    import torch

    if torch.cuda.is_available() and torch.cuda.device_count() < devices:
        raise ValueError(f"invalid devices: {devices} asked, "
                         f"{torch.cuda.device_count()} GPUs visible")
    folder = config.output_dir / "ranks"
    with contextlib.suppress(FileNotFoundError):
        for stale in folder.iterdir():  # a previous attempt's stop flag, events and results
            stale.unlink()
    folder.mkdir(parents=True, exist_ok=True)
    spec = folder / "spec.json"
    spec.write_text(json.dumps(_spec(config, objective or Supervised(), train_set, val_set,
                                     timeout_s)))
    relay = _Relay(folder / "events.jsonl", hooks) if hooks else None
    with (folder / "torchrun.log").open("wb") as log:
        proc = subprocess.Popen(torchrun_command(spec, devices, restarts, timeout_s),
                                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                env={**os.environ, **RANK_ENV}, start_new_session=True)
    stop_asked: float | None = None
    try:
        while True:
            try:
                rc = proc.wait(timeout=POLL_S)
                break
            except subprocess.TimeoutExpired:
                pass
            if relay:
                relay()
            if stop_asked is None and hooks is not None and hooks.should_stop():
                (folder / "stop").touch()
                stop_asked = time.monotonic()
            if stop_asked is not None and time.monotonic() - stop_asked > timeout_s:
                raise TimeoutError("the ranks did not stop in time")
    finally:
        if proc.poll() is None:  # an error here, or ranks that would not stop
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        spec.unlink()  # a copy of the tenant's data, needed only while the ranks run
    if relay:
        relay()
    results = [folder / f"result-{rank}.json" for rank in range(devices)]
    if rc != 0 or not all(p.exists() for p in results):
        tail = (folder / "torchrun.log").read_text(errors="replace")[-2000:]
        raise RuntimeError(f"distributed training failed (torchrun exit {rc}): {tail}")
    outcomes = [json.loads(p.read_text()) for p in results]
    if "cancelled" in outcomes[0]:
        raise Cancelled(outcomes[0]["cancelled"])
    first = outcomes[0]
    return TrainResult(**{**first, "adapter_dir": Path(first["adapter_dir"])})


if __name__ == "__main__":
    main()
