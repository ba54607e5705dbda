"""DistributedDataParallel under ``torchrun``: the same Trainer, one process per rank.

What each rank does, and why:

- The process group comes from torchrun's environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_*``):
  nccl on GPUs, gloo on the CPU, with a short collective timeout (``WORKBENCH_DIST_TIMEOUT``, seconds, default
  60) so that a rank that hangs ends the run as failed instead of blocking it for torch's default 30 minutes.
  A rank that dies closes its sockets and its peers' next collective fails at once.
- Data: every rank walks the same seeded epoch permutation by position in samples and takes its own contiguous
  slice of each global batch (per-rank batch x world size), so the run sees the same data order as one process
  with the global batch, a live batch-size change stays exact, and resume needs only (epoch, position).
- Only rank 0 owns the run directory. Other ranks build their parts in a private temporary folder (removed
  when their run ends) with TensorBoard off; they keep their record in memory.
- Requests (controls, pause, stop, checkpoint, rollback, ...) are read by rank 0 from its queue and inbox and
  broadcast at each step boundary as plain JSON over a gloo group, so every rank applies them at the same step;
  other ranks refuse requests posted to them. Diagnosis reads all-reduced losses and identical weights, so its
  verdicts and policy actions fall on the same step on every rank.
- Checkpoints hold the unwrapped model (written by rank 0) and every rank's RNG state (gathered at save);
  resume with the same world size is exact, with another world size it starts at the next epoch boundary.
"""
from __future__ import annotations

import atexit
import datetime
import json
import os
import random
import shutil
import tempfile
import warnings
from typing import Any, Callable, Mapping

import torch
import torch.distributed as dist

from . import checkpoint as ck
from .loaders import MapSource, kind_of, make_source
from .sampler import epoch_permutation

DEFAULT_TIMEOUT_S = 60.0


class Distributed:
    """This process's place in a torchrun job, and the few collectives the engine uses."""

    def __init__(self) -> None:
        self.rank, self.world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.timeout_s = float(os.environ.get("WORKBENCH_DIST_TIMEOUT", DEFAULT_TIMEOUT_S))
        self.owns_group = not dist.is_initialized()
        if self.owns_group:
            self.backend = "nccl" if torch.cuda.is_available() else "gloo"
            if self.backend == "nccl":
                torch.cuda.set_device(self.local_rank)  # "cuda" means this rank's GPU from here on
            dist.init_process_group(self.backend, timeout=datetime.timedelta(seconds=self.timeout_s))
        else:
            self.backend = dist.get_backend()
        # requests and RNG states travel on the CPU: a GPU run's control traffic never waits on its stream
        self.ctrl = dist.new_group(backend="gloo") if self.backend != "gloo" else dist.group.WORLD
        self.active = True
        self._rng_last: list[Any] | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # ------------------------------------------------------------------ the run's parts
    def rank_config(self, cfg: Any) -> Any:
        """Rank 0 keeps the run directory; any other rank gets a private folder, removed when its run ends.
        Every rank takes rank 0's seed (an unseeded run draws one there): the data order is the seed's."""
        if cfg.seed is None:
            cfg = cfg.replace(seed=self.broadcast(random.SystemRandom().randrange(2**31) if self.is_main else None))
        if self.is_main:
            return cfg
        folder = tempfile.mkdtemp(prefix=f"workbench-rank{self.rank}-")
        atexit.register(shutil.rmtree, folder, True)
        return cfg.replace(run_dir=folder, tensorboard=False)

    def wrap(self, model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
        """The module the loop trains through: DDP around the run's model (which checkpoints keep unwrapped)."""
        from torch.nn.parallel import DistributedDataParallel

        ids = [device.index if device.index is not None else torch.cuda.current_device()] \
            if device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)

    def attach(self, tr: Any) -> None:
        """After assemble: the model wrapped, and what the run's record says of the job (rank 0)."""
        tr.train_model = self.wrap(tr.model, tr.device)
        if self.is_main:
            info = {"world_size": self.world, "backend": self.backend, "timeout_s": self.timeout_s}
            tr.db.set_meta(**info)
            tr.runlog.event("distributed", "trainer", info, 0)

    def end(self, run_dir: Any) -> None:
        """The run has ended on this rank: no more collectives; a rank's private folder goes."""
        self.active = False
        if not self.is_main:
            shutil.rmtree(run_dir, ignore_errors=True)

    # ------------------------------------------------------------------ collectives
    def share(self, requests: list[Any], refuse: Callable[[Any, str], None]) -> list[Any]:
        """At a step boundary on every rank: the requests rank 0 applies now, on every rank. Rank 0 sends its
        own (plain JSON: action, arguments, source); another rank refuses what was posted to it."""
        from .requests import Request

        if self.is_main:
            blob = json.dumps([{"action": r.action, "args": r.args, "source": r.source}
                               for r in requests]).encode() if requests else b""
            size = torch.tensor([len(blob)], dtype=torch.int64)
        else:
            for r in requests:
                refuse(r, f"rank {self.rank} of a distributed run takes no requests; post them to rank 0 (its run "
                          f"directory)")
            size = torch.zeros(1, dtype=torch.int64)
        dist.broadcast(size, 0, group=self.ctrl)
        n = int(size.item())
        if n == 0:
            return requests if self.is_main else []
        buf = torch.frombuffer(bytearray(blob), dtype=torch.uint8) if self.is_main \
            else torch.empty(n, dtype=torch.uint8)
        dist.broadcast(buf, 0, group=self.ctrl)
        if self.is_main:
            return requests
        return [Request(d["action"], dict(d["args"]), d["source"]) for d in json.loads(buf.numpy().tobytes())]

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        """The mean of a per-rank scalar over ranks (on the device: nccl queues it on the stream, no host sync)."""
        out = value.detach().clone()
        dist.all_reduce(out)
        return out / self.world

    def gather(self, obj: Any) -> list[Any]:
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj, group=self.ctrl)
        return out

    def source(self, data: Any, device: torch.device, *, seed: int, batch_size: int, collate_fn: Callable | None,
               max_epochs: int | None) -> Any:
        """The training data source of this rank: a map-style Dataset sharded by global batch; a DataLoader
        whose sampler is a DistributedSampler as it is (each rank reads its own shard)."""
        kind = kind_of(data)
        if kind == "map":
            return DistributedMapSource(data, device, seed, collate_fn, rank=self.rank, world=self.world,
                                        batch_size=batch_size)
        from torch.utils.data.distributed import DistributedSampler

        if kind == "loader" and isinstance(getattr(data, "sampler", None), DistributedSampler):
            return make_source(data, device, seed=seed, batch_size=batch_size, collate_fn=collate_fn,
                               max_epochs=max_epochs)
        raise ValueError(f"train_data: under torchrun ({self.world} processes) got {type(data).__name__}, which "
                         f"would give every rank the same batches; allowed: a map-style Dataset (the workbench "
                         f"shards it by global batch), or a DataLoader with a DistributedSampler")

    def broadcast(self, obj: Any) -> Any:
        box = [obj if self.is_main else None]
        dist.broadcast_object_list(box, 0, group=self.ctrl)
        return box[0]


class DistributedRNG:
    """Every rank's RNG state in one checkpoint entry (``{"ranks": [...]}``), gathered at each save; each rank
    restores its own. Once the run has ended (no peers left to gather from), a save keeps the last gathered
    states with this rank's current one."""

    def __init__(self, d: Distributed) -> None:
        self.d, self.local = d, ck.RNGState()

    def state_dict(self) -> dict[str, Any]:
        mine = self.local.state_dict()
        if self.d.active:
            self.d._rng_last = self.d.gather(mine)
        ranks = list(self.d._rng_last or [mine] * self.d.world)
        ranks[self.d.rank] = mine
        return {"ranks": ranks}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        ranks = state.get("ranks")
        if ranks is None:          # a single-process checkpoint: every rank continues its stream
            self.local.load_state_dict(state)
            return
        if len(ranks) != self.d.world:
            warnings.warn(f"rng: the checkpoint holds {len(ranks)} ranks' RNG states, this run has {self.d.world}; "
                          f"each rank takes rank {self.d.rank % len(ranks)}'s", stacklevel=3)
        self.local.load_state_dict(ranks[self.d.rank % len(ranks)])
        self.d._rng_last = None


class DistributedMapSource(MapSource):
    """A map-style Dataset sharded by global batch: the sampler hands out ``batch_size x world`` indices of the
    epoch's permutation and this rank takes its contiguous slice. The tail of an epoch shorter than the world
    size is padded with the epoch's first samples, so that every rank steps."""

    def __init__(self, data: Any, device: torch.device, seed: int, collate_fn: Callable | None, *,
                 rank: int, world: int, batch_size: int) -> None:
        super().__init__(data, device, seed, collate_fn)
        self.rank, self.world, self.batch_size = rank, world, batch_size

    @property
    def batches_per_epoch(self) -> int:
        return -(-self.n // (self.batch_size * self.world))

    def next(self, batch_size: int) -> tuple[Any, torch.Tensor]:
        idx = self.sampler.next_indices(batch_size * self.world)
        if len(idx) < self.world:
            s = self.sampler
            idx = torch.cat([idx, epoch_permutation(s.n, s.seed, s.epoch, s.shuffle)[:self.world - len(idx)]])
        mine = torch.tensor_split(idx, self.world)[self.rank]
        return self.fetcher.fetch(mine), mine

    def state_dict(self) -> dict[str, Any]:
        return {**self.sampler.state_dict(), "world": self.world}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.sampler.load_state_dict(state)
        saved = int(state.get("world", 1))
        if saved != self.world and 0 < self.sampler.position < self.n:
            warnings.warn(f"sampler: the checkpoint was saved by {saved} process(es), this run has {self.world}; "
                          f"a global batch is split differently, so the run resumes at the start of epoch "
                          f"{self.sampler.epoch + 1} (the rest of epoch {self.sampler.epoch} is skipped)",
                          stacklevel=3)
            self.sampler.position = self.n


_CURRENT: Distributed | None = None


def current() -> Distributed | None:
    """This process's Distributed when it was launched by torchrun with more than one process (the process
    group is made on the first call), else None."""
    global _CURRENT
    if _CURRENT is None and int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ:
        _CURRENT = Distributed()
    return _CURRENT


def rank() -> int:
    """This process's rank (0 outside torchrun)."""
    return int(os.environ.get("RANK", "0")) if int(os.environ.get("WORLD_SIZE", "1")) > 1 else 0
