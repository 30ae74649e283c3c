"""Push the trainer's weights into running SGLang servers after every training step.

Input: any iterable of ``(hf_name, tensor)`` — from the Megatron exporter or a plain HF model —
streamed, so the whole model never has to sit in one place. Modes (``WeightSyncConfig.mode``):

- ``"distributed"``: the sender is rank 0 of a weight-update group shared with every engine rank
  (server i joins at ``rank_offset = 1 + sum(engine ranks of
  servers before i)``), NCCL on GPU and gloo on CPU. Tensors are packed into ``flattened_bucket``
  buckets of at most ``bucket_bytes`` (one oversized tensor travels alone) and broadcast while
  ``/update_weights_from_distributed`` calls for the same bucket are in flight on other threads.
- ``"disk"``: each sender writes an HF safetensors shard into ``<disk_dir>/weights_v<version>``,
  then ``/update_weights_from_disk``. Once every server has loaded (and verified) a version, the
  older ``weights_v*`` directories are deleted: one model copy stays on disk (two after a failed
  sync, until the next one succeeds).
- ``"colocated"``: the servers share the sender's GPU (node). Each bucket is flattened on the
  sender's GPU and handed over as a CUDA-IPC handle (``/update_weights_from_tensor``,
  ``load_format="flattened_bucket"``, one serialized entry per engine rank, payload as SGLang's
  ``MultiprocessingSerializer`` writes it: see protocol.py); the server copies from the mapped
  memory, so no bytes cross a network and the bucket is freed as soon as the server answered.
  ``release_memory(tags)`` / ``resume_memory(tags)`` free the servers' GPU memory around
  training (``/release_memory_occupation``; SGLang needs ``--enable-memory-saver``). Order per
  step: rollout → ``release_memory()`` → train → ``resume_memory(["weights"])`` → ``sync`` →
  ``resume_memory(["kv_cache", "cuda_graph"])`` → rollout, so the KV cache is not back on the
  GPU while the trainer still holds its buckets. Needs CUDA.

Every sync: pause generation (mode "abort"; the rollout client re-sends aborted samples), open
the engine's update session where its transport needs one (SGLang: ``/begin_weight_update`` …
``/end_weight_update`` around distributed and CUDA-IPC updates), send, close the session, set the
weight version, flush the cache and continue generation. Whether the servers now compute what
the trainer computes is proven by the caller (``weight_publisher.WeightProof``: log-probs of a
fixed probe, trainer vs every server). ``readback_tensors > 0`` adds an opt-in diagnostic that
reads the first ``readback_rows`` rows of a few randomly chosen tensors back from each server and
compares them exactly with what was sent (slow on real servers: SGLang turns the whole tensor into
a list before truncating). On failure the servers stay paused, the sync raises
:class:`WeightSyncError`, and a later ``sync`` resends everything.

The wire format of each call is the backend's (``rollout/backend.py``; SGLang in ``rollout/sglang``).

Several senders (pipeline stages; expert-parallel ranks of MoE models): each sender (a rank
that holds full HF-named tensors of its share: its stage, its experts) makes its own
``WeightSyncer`` with its ``sender_index`` among ``num_senders`` and a gloo ``sender_group`` of
all senders (group rank = sender index), and its own weight-update group
(``<group_name>_s<index>_<random>``) in which it is rank 0 — SGLang receivers always broadcast
from rank 0. No sender ever holds another stage's layers or another rank's experts.

Why the senders interleave bucket by bucket instead of broadcasting at the same time: an SGLang
0.5.23 server keeps any number of weight-update groups (a dict by name) but receives on one at a
time. Every ``/update_weights_from_distributed`` names one group; the tokenizer manager's
communicator is "queueing" (one request in flight, FIFO) and, while generation is paused, holds
``is_pause_cond`` for the whole call; the scheduler thread receives the bucket and loads it into
the model synchronously before it reads the next request. Two senders broadcasting at once into
one server therefore cannot both progress, and two senders reaching several servers in different
orders would deadlock their broadcasts. So the senders pass a token round a ring (sender order):
the holder sends one bucket to every server and passes the token on once every server answered
(so all servers see the calls in the same order); a sender without buckets left passes it
straight on. Meanwhile every sender prepares its next bucket (the exporter's TP all-gathers,
flattening) on its main thread, so the servers are fed back to back and no stage waits for the
whole previous stage: the sync costs the servers' receive-and-load time plus one HTTP round trip
per bucket, not the sum of every stage's export and send. At most two buckets per sender exist
at a time (one on the wire, one being prepared). With NCCL the broadcast (trainer + servers) and
the next bucket's TP all-gathers (trainer ranks only) then run at once on separate
communicators; the servers never wait on the all-gathers, so their order on a device cannot
deadlock. The token travels on gloo (its group's timeout bounds a sender that died).

Timeouts bound every step: HTTP calls (``http_timeout_s``, per bucket ``timeout_s``) and the
collectives (group timeout), so a server that dies during a sync gives an error naming it within
``timeout_s`` instead of a hang. After such an error the group may be unusable: ``close()`` and
``connect()`` again once the server is back.
"""

from __future__ import annotations

import functools
import itertools
import logging
import os
import queue
import random
import shutil
import threading
import time
import uuid
import zlib
from concurrent.futures import FIRST_EXCEPTION, Future, wait
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Callable, Iterable, Iterator, Sequence

import torch
import torch.distributed as dist

from maspo_megatron.rollout.backend import BucketMeta, RolloutBackend, WeightSyncError, get_backend
from maspo_megatron.rollout.servers import free_port
from maspo_megatron.tensors import bucket_named_tensors

logger = logging.getLogger(__name__)

MODES = ("distributed", "disk", "colocated")


@dataclass
class ProofConfig:
    """The per-sync log-prob check (see :class:`WeightProof`)."""

    enabled: bool = True
    sequences: int = 4
    """Probe sequences (at least one per data-parallel rank is used)."""
    length: int = 32
    """Tokens per probe sequence."""
    atol: float | None = None
    """Largest allowed |trainer - server| log-prob over the probe; None: by dtype, 1e-4 for fp32
    (measured gaps ~1e-6 on CPU) and 0.25 for bf16 (an estimate, not yet measured: bf16 GEMMs in
    two engines round differently; a bf16 proof catches layout bugs and gross staleness, not one
    small optimizer step)."""
    seed: int = 1234

    def __post_init__(self):
        if self.sequences < 1 or self.length < 2:
            raise ValueError("weight_sync.proof.sequences must be >= 1 and proof.length >= 2")
        if self.atol is not None and not self.atol > 0:
            raise ValueError(f"weight_sync.proof.atol must be > 0 or None, got {self.atol}")

    def tolerance(self, dtype: str) -> float:
        return self.atol if self.atol is not None else (1e-4 if dtype == "fp32" else 0.25)


@dataclass
class WeightSyncConfig:
    """How weights reach the servers (see the module docstring for each mode)."""

    mode: str = "distributed"
    """``distributed``: broadcast in a weight-update group (servers anywhere; NCCL or gloo);
    ``disk``: safetensors files the servers load; ``colocated``: CUDA-IPC handles (servers on the
    trainer's GPUs; needs CUDA)."""
    bucket_bytes: int = 512 << 20
    """Flattened bucket size limit; in colocated mode also the extra GPU memory the sync needs."""
    backend: str | None = None
    """Collective backend of the weight-update group; None: ``nccl`` with CUDA, else ``gloo``."""
    master_address: str = "127.0.0.1"
    """This sender's address as the servers reach it."""
    master_port: int = 0
    """Rendezvous port of the first sender (stage i uses +i); 0: a free port per sender."""
    group_name: str = "maspo_weight_update"
    init_timeout_s: float = 300.0
    """Group rendezvous limit."""
    timeout_s: float = 600.0
    """Limit of one bucket (HTTP + collective); also the group's timeout."""
    http_timeout_s: float = 60.0
    """Limit of each control call (pause, session, version, continue)."""
    disk_dir: str | None = None
    """Disk mode: where the HF safetensors of each version are written."""
    readback_tensors: int = 0
    """Diagnostic (off by default): tensors read back per sender and server after each sync."""
    readback_rows: int = 2
    """Leading rows compared by the read-back diagnostic."""
    readback_atol: float = 0.0
    flush_cache: bool = True
    """Flush the prefix cache after new weights land."""
    pause_mode: str = "abort"
    """SGLang /pause_generation mode: ``abort``, ``retract`` or ``in_place``."""
    proof: ProofConfig = field(default_factory=ProofConfig)
    """The log-prob check after every sync (``weight_publisher.WeightProof``)."""

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"weight_sync.mode must be one of {list(MODES)}, got {self.mode!r}")
        if self.bucket_bytes <= 0:
            raise ValueError(f"weight_sync.bucket_bytes must be positive, got {self.bucket_bytes}")
        if self.backend not in (None, "nccl", "gloo"):
            raise ValueError(f"weight_sync.backend must be None, 'nccl' or 'gloo', got {self.backend!r}")
        if self.readback_rows < 1 or self.readback_tensors < 0:
            raise ValueError("weight_sync.readback_rows must be >= 1 and readback_tensors >= 0")
        if self.pause_mode not in ("abort", "retract", "in_place"):
            raise ValueError(f"weight_sync.pause_mode must be abort, retract or in_place, got {self.pause_mode!r}")

    def validate(self) -> None:
        self.__post_init__()
        if self.mode == "disk" and not self.disk_dir:
            raise ValueError("weight_sync.disk_dir is required when weight_sync.mode=disk")


class PeerSyncError(WeightSyncError):
    """This sender stopped because another one failed; that one raises the cause."""


@dataclass
class SyncStats:
    seconds: float
    bytes: int
    tensors: int
    buckets: int
    timeline: list = field(default_factory=list)
    """``(kind, index, start, end)`` monotonic seconds of each bucket's "prepare" (export and
    flatten) and "send" (broadcast and every server's answer) on this sender."""

    @property
    def gbps(self) -> float:
        return self.bytes / max(self.seconds, 1e-9) / 1e9


def _spawn(fn, *args, **kw) -> Future:
    """Runs fn on a daemon thread: a collective stuck on a dead peer must not block exit."""
    fut: Future = Future()

    def target():
        try:
            fut.set_result(fn(*args, **kw))
        except BaseException as e:  # noqa: BLE001 - handed to the waiting thread
            fut.set_exception(e)

    threading.Thread(target=target, daemon=True).start()
    return fut


class SenderRing:
    """The send token of one distributed sync, passed round the senders in sender order over
    their gloo group; ``agree(ok)`` is True iff every sender passed ``ok=True``.

    The token is ``num_senders + 1`` int64s: ``done[i]`` (sender i has sent all its buckets) and
    ``1 + index`` of the first sender that failed (0: none). It stops once all are done or one
    failed: the sender that made it so sends it once more round the ring and waits for it to come
    back, so every link carries exactly one last token and no send is left unmatched.
    """

    def __init__(self, group, index: int, size: int):
        if dist.get_rank(group) != index or dist.get_world_size(group) != size:
            raise ValueError(f"sender_group: rank {dist.get_rank(group)} of {dist.get_world_size(group)}, "
                             f"expected sender_index {index} of num_senders {size}")
        self.group, self.index, self.size = group, index, size

    def agree(self, ok: bool) -> bool:
        flag = torch.tensor([1 if ok else 0], dtype=torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=self.group)
        return bool(flag.item())

    def run(self, turn: Callable[[torch.Tensor], None]) -> torch.Tensor:
        """Calls ``turn(token)`` each time this sender holds a live token (it may mark itself done
        or failed in it); returns the last token."""
        n, nxt, prv = self.size, (self.index + 1) % self.size, (self.index - 1) % self.size
        token = torch.zeros(n + 1, dtype=torch.int64)
        last = lambda: bool(token[n]) or bool(token[:n].all())  # noqa: E731
        started = self.index == 0  # sender 0 holds the first token
        while True:
            if not started:
                dist.recv(token, group=self.group, group_src=prv)
            started = False
            if last():  # another sender ended it: pass it on, then stop
                dist.send(token, group=self.group, group_dst=nxt)
                return token
            turn(token)
            dist.send(token, group=self.group, group_dst=nxt)
            if last():  # this sender ended it: wait for it to come back round
                dist.recv(token, group=self.group, group_src=prv)
                return token


# ------------------------------------------------------------------------- flattened buckets
def order_for_alignment(named: Iterable[tuple[str, torch.Tensor]]) -> list[tuple[str, torch.Tensor]]:
    """Stable sort by element size, largest first, so every byte offset in a bucket is aligned
    (``Tensor.view(dtype)`` on the receiving side needs offsets divisible by the element size)."""
    return sorted(named, key=lambda nt: -nt[1].element_size())


def iter_buckets(named: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int
                 ) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Groups a stream of tensors into buckets of at most ``bucket_bytes`` (an oversized tensor
    forms a bucket of its own), each ordered for alignment."""
    for bucket in bucket_named_tensors(named, bucket_bytes):
        yield order_for_alignment(bucket)


def flatten_bucket(named: Sequence[tuple[str, torch.Tensor]]) -> tuple[torch.Tensor, list[BucketMeta]]:
    """Concatenates the tensors' bytes, in order, into one uint8 tensor (SGLang's
    ``flattened_bucket``: no padding; tensor i occupies bytes ``[start_i, end_i)``)."""
    if not named:
        raise ValueError("cannot flatten an empty bucket")
    metas, offset = [], 0
    for name, t in named:
        if offset % t.element_size():
            raise ValueError(f"flattened bucket: {name!r} would start at byte {offset}, not aligned "
                             f"for {t.dtype}; order tensors with order_for_alignment")
        nbytes = t.numel() * t.element_size()
        metas.append(BucketMeta(name, tuple(t.shape), t.dtype, offset, offset + nbytes))
        offset += nbytes
    flat = torch.cat([t.detach().contiguous().reshape(-1).view(torch.uint8) for _, t in named])
    return flat, metas


# ------------------------------------------------------------------------- process group
def init_weight_update_group(*, backend: str, master_address: str, master_port: int, rank: int,
                             world_size: int, group_name: str, timeout_s: float):
    """Creates the trainer<->engines weight-update group, separate from the default group.

    Mirrors SGLang's ``init_custom_process_group`` (TCP rendezvous, ``PrefixStore(group_name)``,
    ``_new_process_group_helper``) so the trainer joins real SGLang servers. Rank 0 hosts the
    TCP store. Works whether or not the calling process has a default group.
    """
    from torch.distributed.distributed_c10d import (
        Backend, PrefixStore, _new_process_group_helper, _world, rendezvous,
    )

    timeout = timedelta(seconds=timeout_s)
    store, rank, world_size = next(rendezvous(
        f"tcp://{master_address}:{master_port}", rank, world_size, timeout=timeout))
    store.set_timeout(timeout)
    store = PrefixStore(group_name, store)
    pg, _ = _new_process_group_helper(
        world_size, rank, [], Backend(backend), store, group_name=group_name, timeout=timeout)
    _world.pg_group_ranks[pg] = {i: i for i in range(world_size)}
    return pg


class _Sampler:
    """Reservoir sample of k tensors from a stream; keeps only their leading rows."""

    def __init__(self, k: int, rows: int, seed: int):
        self.k, self.rows, self.rng = k, rows, random.Random(seed)
        self.seen, self.kept = 0, []

    def offer(self, name: str, t: torch.Tensor) -> None:
        if t.dim() == 0 or self.k == 0:
            return
        self.seen += 1
        item = (name, t[: self.rows].detach().float().cpu().clone())
        if len(self.kept) < self.k:
            self.kept.append(item)
        else:
            j = self.rng.randrange(self.seen)
            if j < self.k:
                self.kept[j] = item


class WeightSyncer:
    """One sender's side of the weight sync (see the module docstring for the protocol)."""

    def __init__(self, server_urls: Sequence[str], config: WeightSyncConfig | None = None, *,
                 backend: RolloutBackend | str = "sglang",
                 engine_ranks_per_server: int | Sequence[int] = 1, api_key: str | None = None,
                 sender_index: int = 0, num_senders: int = 1, sender_group=None):
        self.config = config or WeightSyncConfig()
        self.config.validate()
        if self.config.mode == "colocated" and not torch.cuda.is_available():
            raise RuntimeError(
                "weight_sync.mode=colocated needs CUDA tensors (CUDA-IPC) and this process sees no "
                "CUDA device; use weight_sync.mode=distributed or disk")
        if not server_urls:
            raise ValueError("WeightSyncer needs at least one server URL (not the router's: "
                             "weight-update endpoints answer 404 through sglang-router)")
        if not 0 <= sender_index < num_senders:
            raise ValueError(f"sender_index {sender_index} not in [0, {num_senders})")
        if num_senders > 1 and sender_group is None:
            raise ValueError("num_senders > 1 needs a sender_group (a gloo group of all senders, "
                             "group rank = sender_index)")
        self.backend_impl = get_backend(backend) if isinstance(backend, str) else backend
        self.urls = [u.rstrip("/") for u in server_urls]
        self.apis = [self.backend_impl.updater(u, api_key, self.config.http_timeout_s) for u in self.urls]
        ranks = ([engine_ranks_per_server] * len(self.urls) if isinstance(engine_ranks_per_server, int)
                 else list(engine_ranks_per_server))
        if len(ranks) != len(self.urls) or min(ranks) < 1:
            raise ValueError(f"engine_ranks_per_server must give a positive count per server, got {ranks}")
        self.engine_ranks = ranks
        self.sender_index, self.num_senders = sender_index, num_senders
        self.ring = SenderRing(sender_group, sender_index, num_senders) if num_senders > 1 else None
        self.backend = self.config.backend or ("nccl" if torch.cuda.is_available() else "gloo")
        on_gpu = self.backend == "nccl" or self.config.mode == "colocated"
        self.device = torch.device("cuda", torch.cuda.current_device()) if on_gpu \
            else torch.device("cpu")
        self.group = None
        self.group_name = ""  # set by connect()
        self.last_stats: SyncStats | None = None  # of the last successful sync

    # ------------------------------------------------------------------ helpers
    def _all(self, what: str, fn: Callable, timeout_s: float | None = None) -> list:
        """``fn(api)`` on every server at once; results in server order."""
        futs = [_spawn(fn, api) for api in self.apis]
        return self._wait(futs, self.urls, (timeout_s or self.config.http_timeout_s) + 5.0, what)

    def _wait(self, futs: list[Future], labels: list[str], timeout_s: float, what: str) -> list:
        """Results in order; on the first failure raises, preferring a server's own message over
        the collective error it causes on the trainer side."""
        done, pending = wait(futs, timeout=timeout_s, return_when=FIRST_EXCEPTION)
        failed = [(f, lab) for f, lab in zip(futs, labels) if f in done and f.exception() is not None]
        failed.sort(key=lambda fl: not isinstance(fl[0].exception(), WeightSyncError))
        if failed:
            fut, label = failed[0]
            e = fut.exception()
            if isinstance(e, WeightSyncError):
                raise e
            raise WeightSyncError(f"{what}: {label}: {type(e).__name__}: {e}") from e
        if pending:
            waiting = [lab for f, lab in zip(futs, labels) if f in pending]
            raise WeightSyncError(f"{what}: no answer within {timeout_s:.0f}s from {waiting} "
                                  "(a server died or hangs?)")
        return [f.result() for f in futs]

    def _step(self, ok: bool, fn: Callable[[], None] | None, errors: list) -> bool:
        """Runs fn if everything so far is ok, then agrees with the other senders."""
        if ok and fn is not None:
            try:
                fn()
            except Exception as e:  # noqa: BLE001 - re-raised after the barrier
                errors.append(e)
                ok = False
        return self.ring.agree(ok) if self.ring else ok

    def _in_turns(self, fn: Callable[[], None], ok: bool, errors: list) -> bool:
        for turn in range(self.num_senders):
            ok = self._step(ok, fn if turn == self.sender_index else None, errors)
        return ok

    # ------------------------------------------------------------------ group
    def connect(self) -> None:
        """Creates the weight-update group with every server (distributed mode; else no-op)."""
        if self.config.mode != "distributed" or self.group is not None:
            return
        errors: list = []
        ok = self._in_turns(self._connect, True, errors)
        self._raise_if(ok, errors, "connect")

    def _connect(self) -> None:
        cfg = self.config
        port = cfg.master_port + self.sender_index if cfg.master_port else free_port()
        # Group names must be unique per process on both ends; a fresh one per connection also
        # keeps a reconnect after a failed sync clear of the broken group.
        self.group_name = f"{cfg.group_name}_s{self.sender_index}_{uuid.uuid4().hex[:8]}"
        world = 1 + sum(self.engine_ranks)
        offsets = [1 + sum(self.engine_ranks[:i]) for i in range(len(self.urls))]
        futs = [_spawn(api.init_group, master_address=cfg.master_address, master_port=port,
                       rank_offset=off, world_size=world, group_name=self.group_name,
                       backend=self.backend, timeout_s=cfg.init_timeout_s)
                for api, off in zip(self.apis, offsets)]
        group = _spawn(functools.partial(
            init_weight_update_group, backend=self.backend, master_address=cfg.master_address,
            master_port=port, rank=0, world_size=world, group_name=self.group_name,
            timeout_s=cfg.timeout_s))
        self.group = self._wait([group] + futs, ["trainer rank 0"] + self.urls,
                                cfg.init_timeout_s + 5.0,
                                f"creating weight-update group {self.group_name!r}")[0]
        logger.info("weight-update group %s: world %d, port %d", self.group_name, world, port)

    def close(self) -> None:
        if self.group is None:
            return
        try:
            self._all("destroy_weights_update_group", lambda api: api.destroy_group(self.group_name))
        finally:
            dist.destroy_process_group(self.group)
            self.group = None

    # ------------------------------------------------------------------ memory
    def release_memory(self, tags: Sequence[str] | None = None) -> None:
        """Frees the servers' GPU memory so the colocated trainer can use it; ``tags`` from the
        backend's ``memory_tags`` (None: all). Pause generation first: SGLang refuses unless idle.
        Call from one sender only."""
        self._check_tags(tags)
        self._all("release_memory_occupation", lambda api: api.release_memory(tags))

    def resume_memory(self, tags: Sequence[str] | None = None) -> None:
        """Re-allocates what ``release_memory`` freed. Resumed weights hold stale or undefined
        values until the next ``sync``."""
        self._check_tags(tags)
        self._all("resume_memory_occupation", lambda api: api.resume_memory(tags))

    def _check_tags(self, tags: Sequence[str] | None) -> None:
        allowed = self.backend_impl.memory_tags
        if tags is not None and (not tags or any(t not in allowed for t in tags)):
            raise ValueError(f"memory tags must be drawn from {list(allowed)} (or None for all), "
                             f"got {list(tags)}")

    # ------------------------------------------------------------------ sync
    def sync(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int | str) -> SyncStats:
        """Sends this sender's tensors to every server; ``version`` becomes their weight version.

        Every sender calls this collectively (same ``version``)."""
        cfg = self.config
        if cfg.mode == "distributed" and self.group is None:
            self.connect()
        t0 = time.monotonic()
        stats = SyncStats(0.0, 0, 0, 0)
        sampler = _Sampler(cfg.readback_tensors, cfg.readback_rows,
                           seed=zlib.crc32(f"{version}/{self.sender_index}".encode()))
        lead = self.sender_index == 0
        session = cfg.mode != "disk"  # SGLang: disk loads need no session, the others do
        errors: list = []

        def lead_only(what, fn):
            return (lambda: self._all(what, fn)) if lead else None

        ok = self._step(True, lead_only("pause_generation", lambda api: api.pause(cfg.pause_mode)), errors)
        if session:
            ok = self._step(ok, lead_only("begin_weight_update", lambda api: api.begin_update()), errors)
        if cfg.mode == "distributed":
            ok = self._step(ok, lambda: self._send_distributed(named_tensors, sampler, stats), errors)
        elif cfg.mode == "colocated":
            ok = self._in_turns(lambda: self._send_colocated(named_tensors, sampler, stats), ok, errors)
        else:
            path = os.path.join(cfg.disk_dir, f"weights_v{version}")
            ok = self._step(ok, lambda: self._write_shard(named_tensors, sampler, stats, path), errors)
            ok = self._step(ok, lead_only("update_weights_from_disk",
                                          lambda api: api.update_from_disk(path, cfg.timeout_s)), errors)
        if session:
            # Closed whatever happened before, so the next sync can open one.
            self._step(True, lead_only("end_weight_update", lambda api: api.end_update()), errors)
        if cfg.readback_tensors:
            ok = self._step(ok, lambda: self._read_back(sampler.kept, version), errors)
        ok = self._step(ok, (lambda: self._finish(version)) if lead else None, errors)
        self._raise_if(ok, errors, f"weight sync to version {version}")
        if cfg.mode == "disk" and lead:
            self._prune_disk(path)
        stats.seconds = time.monotonic() - t0
        self.last_stats = stats
        logger.info("weight sync v%s: %.2f GB in %d buckets, %.2fs (%.2f GB/s)", version,
                    stats.bytes / 1e9, stats.buckets, stats.seconds, stats.gbps)
        return stats

    def _raise_if(self, ok: bool, errors: list, what: str) -> None:
        if errors:
            raise errors[0] if isinstance(errors[0], WeightSyncError) else \
                WeightSyncError(f"{what} failed: {errors[0]}") from errors[0]
        if not ok:
            raise PeerSyncError(f"{what} failed on another sender (see its error); servers stay "
                                "paused with partially updated weights")

    def _finish(self, version) -> None:
        self._all("update_weight_version", lambda api: api.set_version(str(version)))
        if self.config.flush_cache:
            self._all("flush_cache", lambda api: api.flush_cache())
        self._all("continue_generation", lambda api: api.resume())

    def _send_distributed(self, named, sampler: _Sampler, stats: SyncStats) -> None:
        """Prepares buckets on this thread while a sender thread broadcasts them in its turns
        (module docstring); raises if this sender or another one failed."""
        cfg = self.config
        ready: queue.Queue = queue.Queue()  # flattened buckets, then None (or the export's error)
        slots = threading.Semaphore(2)  # buckets held: one on the wire, one being prepared
        stop = threading.Event()  # set by the sender thread when the sync ended early
        sender = _spawn(self._send_turns, ready, slots, stop, stats)
        buckets = iter_buckets(named, cfg.bucket_bytes)
        try:
            for i in itertools.count():
                # A slot before the next bucket's export: its all-gathers allocate it.
                while not slots.acquire(timeout=0.05):
                    if stop.is_set():
                        break
                t0 = time.monotonic()
                bucket = None if stop.is_set() else next(buckets, None)
                if bucket is None:
                    break
                for name, t in bucket:
                    sampler.offer(name, t)
                flat, metas = flatten_bucket([(n, t.to(self.device)) for n, t in bucket])
                stats.timeline.append(("prepare", i, t0, time.monotonic()))
                ready.put((flat, metas))
                del bucket, flat
            ready.put(None)
        except BaseException as e:  # noqa: BLE001 - the sender thread ends the ring with it
            ready.put(e)
        sender.result()

    def _send_turns(self, ready: queue.Queue, slots: threading.Semaphore, stop: threading.Event,
                    stats: SyncStats) -> None:
        """Sender thread: one bucket per turn of the token, until this sender is done or failed."""
        end: list = []  # [None] once done, [error] once failed

        def turn() -> None:
            item = ready.get()
            if item is None or isinstance(item, BaseException):
                end.append(item)
                return
            try:
                self._send_bucket(*item, stats)
            except BaseException as e:  # noqa: BLE001 - raised below, once the ring has ended
                end.append(e)
            finally:
                del item
                slots.release()

        def ring_turn(token: torch.Tensor) -> None:
            if not end:
                turn()
            if end and end[0] is not None:
                token[self.num_senders] = 1 + self.sender_index
            elif end:
                token[self.sender_index] = 1

        try:
            if self.ring is None:
                while not end:
                    turn()
            else:
                token = self.ring.run(ring_turn)
        finally:
            stop.set()
        if end and end[0] is not None:
            raise end[0]
        if self.ring is not None and token[self.num_senders]:
            raise PeerSyncError(f"weight sync: sender {int(token[self.num_senders]) - 1} failed "
                                "(see its error); the other senders stopped sending")

    def _send_bucket(self, flat: torch.Tensor, metas: list[BucketMeta], stats: SyncStats) -> None:
        cfg = self.config
        t0 = time.monotonic()
        what = f"bucket {stats.buckets} ({len(metas)} tensors, {flat.numel() / 1e6:.1f} MB)"
        # The HTTP calls block until the servers have received and loaded the broadcast: run them
        # concurrently with it.
        futs = [_spawn(api.update_from_distributed, metas, self.group_name, cfg.timeout_s,
                       f"update_weights_from_distributed, {what}") for api in self.apis]
        futs.append(_spawn(dist.broadcast, flat, 0, self.group))
        self._wait(futs, self.urls + ["broadcast"], cfg.timeout_s + 5.0,
                   f"update_weights_from_distributed, {what}")
        stats.timeline.append(("send", stats.buckets, t0, time.monotonic()))
        stats.bytes += flat.numel()
        stats.tensors += len(metas)
        stats.buckets += 1

    def _send_colocated(self, named, sampler: _Sampler, stats: SyncStats) -> None:
        cfg = self.config
        try:
            for bucket in iter_buckets(named, cfg.bucket_bytes):
                for name, t in bucket:
                    sampler.offer(name, t)
                flat, metas = flatten_bucket([(n, t.to(self.device)) for n, t in bucket])
                # The server reads the buffer on its own stream: the copies into it must be done.
                torch.cuda.synchronize(self.device)
                what = f"bucket {stats.buckets} ({len(metas)} tensors, {flat.numel() / 1e6:.1f} MB)"
                futs = [_spawn(api.update_from_ipc, flat, metas, ranks, cfg.timeout_s,
                               f"update_weights_from_tensor, {what}")
                        for api, ranks in zip(self.apis, self.engine_ranks)]
                # flat stays referenced until every server has answered (or failed): they map
                # its memory, they do not get a copy.
                self._wait(futs, self.urls, cfg.timeout_s + 5.0, f"update_weights_from_tensor, {what}")
                stats.bytes += flat.numel()
                stats.tensors += len(metas)
                stats.buckets += 1
                del flat
        finally:
            # Free the shared blocks the servers have let go of (torch keeps IPC-shared
            # memory until every consumer dropped it).
            torch.cuda.ipc_collect()

    def _prune_disk(self, keep: str) -> None:
        """Deletes the ``weights_v*`` directories other than ``keep``, the version every server
        has just loaded: nothing else is needed to serve or re-send. Called only after a fully
        successful sync, so a failed one leaves the last complete version (and the partly loaded
        new one) in place. A failure to delete is logged, not raised."""
        root, name = os.path.split(os.path.normpath(keep))
        for entry in os.listdir(root):
            old = os.path.join(root, entry)
            if entry.startswith("weights_v") and entry != name and os.path.isdir(old):
                try:
                    shutil.rmtree(old)
                except OSError as e:
                    logger.warning("disk weight sync: could not delete %s: %s", old, e)

    def _write_shard(self, named, sampler: _Sampler, stats: SyncStats, path: str) -> None:
        from safetensors.torch import save_file

        os.makedirs(path, exist_ok=True)
        tensors = {}
        for name, t in named:
            sampler.offer(name, t)
            tensors[name] = t.detach().contiguous().cpu()
            stats.bytes += t.numel() * t.element_size()
        stats.tensors += len(tensors)
        stats.buckets += 1
        shard = f"model-{self.sender_index + 1:05d}-of-{self.num_senders:05d}.safetensors"
        save_file(tensors, os.path.join(path, shard), metadata={"format": "pt"})

    def _read_back(self, kept: list[tuple[str, torch.Tensor]], version) -> None:
        cfg = self.config
        for name, rows in kept:
            answers = self._all(f"reading back {name}", lambda api: api.read_weight_rows(name, cfg.readback_rows))
            for url, got in zip(self.urls, answers):
                try:
                    served = torch.tensor(got, dtype=torch.float32)
                except (TypeError, ValueError) as e:
                    raise WeightSyncError(f"read-back of v{version}: {url} returned a non-numeric "
                                          f"value for {name}: {str(got)[:200]}") from e
                if served.shape != rows.shape:
                    raise WeightSyncError(
                        f"read-back of v{version}: {url} returned shape {list(served.shape)} for "
                        f"the first {cfg.readback_rows} rows of {name}, the trainer has {list(rows.shape)}")
                diff = (served - rows).abs().max().item() if rows.numel() else 0.0
                if not diff <= cfg.readback_atol:
                    raise WeightSyncError(
                        f"read-back of v{version} failed: {name} on {url} differs from the "
                        f"trainer's by up to {diff:.3g} (atol {cfg.readback_atol}); trainer "
                        f"{rows.flatten()[:4].tolist()} vs server {served.flatten()[:4].tolist()}")
