"""Beyond one process: data-parallel SVI and parallel SG-MCMC chains on ``torch.distributed``.

Launch with ``torchrun`` (any number of processes, GPUs or nodes; see docs/DISTRIBUTED.md)::

    torchrun --nproc_per_node 4 -m pyrobnn.cli fit run.toml --out runs/a      # the CLI detects torchrun
    torchrun --nproc_per_node 4 my_script.py                                   # or in Python:

    dp = DataParallel.from_env(seed=0)             # init_process_group: gloo on CPU, nccl on GPU
    fit_distributed(bnn, (x, y), epochs=10, distributed=dp, batch_size=128)    # 128 per process
    post = sample_chains(bnn, (x, y), num_samples=100, warmup_steps=1000)           # one chain per rank
    if dp.is_main: idata = pyrobnn.to_inference_data(post, test=x_test)      # chains gathered on rank 0

Data-parallel SVI. Each of the K processes holds the whole dataset and draws its local minibatches of
M from its shard of every epoch's permutation (:class:`pyrobnn.data.ArrayLoader` with ``rank`` and
``world_size``, the ``DistributedSampler`` scheme). The BNN's ``pyro.plate("data", N)`` scales a
minibatch log-likelihood by N/M, so each rank's loss is an unbiased estimate of the *full-data* negative
ELBO; the gradients are averaged over ranks (an all-reduce of every BNN parameter's gradient, issued
from post-accumulate-grad hooks during ``backward``), which is the gradient estimate of one global
minibatch of K·M. Initial parameters are broadcast from rank 0; every rank then takes identical optimizer
steps. Checkpoints, progress bars and outputs come from rank 0 only; every rank *reads* the newest
checkpoint on resume (so ``checkpoint_dir`` must be on storage all ranks see), and the ranks check that
they resume at the same (epoch, step).

Randomness and exact resume. Before every step, each rank re-seeds torch's generator from
``(seed, rank, epoch, step)``. The Monte-Carlo noise of a step (weight draws or local-reparameterisation
noise) therefore depends on nothing but its position, so a run resumed from a checkpoint on any number
of ranks takes exactly the steps of the uninterrupted run, without storing every rank's generator.
``noise="independent"`` (default) gives each rank its own noise (with local reparameterisation this is
the single-process estimator of a K·M batch, in distribution); ``noise="shared"`` gives all ranks the
same stream — with weight sampling (``local_reparameterization=False``) the ranks then compute exactly
the single-process gradient on the union of their batches, which is how the test checks the maths.

Parallel chains. :func:`sample_chains` runs :func:`pyrobnn.inference.sample` on every rank (full
data, a different seed per rank, ``chains_per_rank`` chains each) and gathers the draws, sampler
statistics and held-out outputs to rank 0 as one :class:`SamplePosterior` whose chain dimension is
``world_size · chains_per_rank``; ``pyrobnn.to_inference_data`` turns it into an ``InferenceData`` and
ArviZ computes R-hat across the chains. Tensors travel as raw bytes through ``dist.gather`` — no
``*_object`` collective, so nothing is pickled.
"""
from __future__ import annotations

import os
from datetime import timedelta
from typing import Any, Dict, List, Optional

import numpy as np
import torch
import torch.distributed as dist

from pyrobnn.bnn import BNN
from pyrobnn.data import ArrayLoader
from pyrobnn.validation import non_negative_int, positive_int

__all__ = ["DataParallel", "fit_distributed", "sample_chains", "chain_seed", "launched_by_torchrun"]

_NOISE = ("independent", "shared")


def launched_by_torchrun() -> bool:
    """True in a process started by ``torchrun`` (or any launcher that sets the ``env://`` variables)."""
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))


def _seed_from(*entropy: int) -> int:
    """A 63-bit torch seed from integers, well mixed (neighbouring inputs give unrelated streams)."""
    state = np.random.SeedSequence([int(v) for v in entropy]).generate_state(2, np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


def chain_seed(seed: int, rank: int) -> int:
    """The seed :func:`sample_chains` gives rank ``rank`` (so a chain can be re-run in one process)."""
    return _seed_from(seed, rank, 0x5C11D) % (2**31)


class DataParallel:
    """The process group seen by :func:`pyrobnn.inference.fit` (its ``distributed=`` argument).

    :param seed: base seed of the per-step generator (see the module docstring).
    :param noise: ``"independent"`` (each rank its own Monte-Carlo noise) or ``"shared"``.
    :param group: a ``torch.distributed`` process group; default the initialised default group, or a
        group of one (this process) when ``torch.distributed`` is not initialised.
    :param device: where the data and the BNN live (default ``cuda:LOCAL_RANK`` with the nccl backend,
        else CPU).

    What the training loop (:class:`pyrobnn.inference.loop.Loop`, under ``fit``) calls:
    :meth:`synchronize` once (broadcast from rank 0, resume-position check, gradient hooks),
    :meth:`begin_step` before every step (re-seed, arm the gradient all-reduce), :meth:`mean` of the
    logged sums (the epoch's loss) and :meth:`any` of the callbacks' stop votes; ``is_main`` decides who
    writes checkpoints and shows progress.
    """

    def __init__(self, seed: int = 0, noise: str = "independent", group=None, device=None):
        non_negative_int("seed", seed)
        if noise not in _NOISE:
            raise ValueError(f"noise must be one of {_NOISE}, got {noise!r}")
        self.seed, self.noise = seed, noise
        self.initialized = dist.is_available() and dist.is_initialized()
        if group is not None and not self.initialized:
            raise ValueError("a process group was given but torch.distributed is not initialised")
        self.group = group
        self.rank = dist.get_rank(group) if self.initialized else 0
        self.world_size = dist.get_world_size(group) if self.initialized else 1
        if device is None:
            nccl = self.initialized and dist.get_backend(group) == "nccl"
            device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
        self.device = torch.device(device)
        self._owns_group = False
        self._hooks: List[Any] = []
        self._armed: Dict[int, bool] = {}

    # -- construction from the launcher's environment -----------------------------------------------
    @classmethod
    def from_env(cls, seed: int = 0, noise: str = "independent", backend: Optional[str] = None,
                 timeout_s: float = 1800.0) -> "DataParallel":
        """Join the job ``torchrun`` started (``env://``: RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT).

        Backend: ``nccl`` when CUDA is available, else ``gloo`` (override with ``backend``). With nccl
        the process uses GPU ``LOCAL_RANK``. Outside a launcher this is a group of one process."""
        if not dist.is_available():
            raise RuntimeError("this torch build has no torch.distributed")
        owns = False
        if not dist.is_initialized():
            if not launched_by_torchrun():
                return cls(seed=seed, noise=noise)
            if backend is None:
                backend = "nccl" if torch.cuda.is_available() else "gloo"
            if backend not in ("gloo", "nccl", "mpi"):
                raise ValueError(f"backend must be 'gloo', 'nccl' or 'mpi', got {backend!r}")
            if backend == "nccl":
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            dist.init_process_group(backend=backend, init_method="env://", timeout=timedelta(seconds=timeout_s))
            owns = True
        dp = cls(seed=seed, noise=noise)
        dp._owns_group = owns
        return dp

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def _distributed(self) -> bool:
        return self.initialized and self.world_size > 1

    def __repr__(self):
        return (f"DataParallel(rank={self.rank}, world_size={self.world_size}, device={self.device}, "
                f"noise={self.noise!r}, seed={self.seed})")

    # -- data ---------------------------------------------------------------------------------------
    def loader(self, x, y, batch_size: int = 128, seed: Optional[int] = None, shuffle: bool = True,
               drop_last: bool = False) -> ArrayLoader:
        """This rank's shard of ``(x, y)`` as an :class:`ArrayLoader` of local batches of ``batch_size``
        (the global batch is ``world_size · batch_size``); tensors are moved to ``self.device``."""
        x, y = torch.as_tensor(x).to(self.device), torch.as_tensor(y).to(self.device)
        if len(x) < self.world_size:
            raise ValueError(f"{len(x)} examples cannot be shared by {self.world_size} processes")
        return ArrayLoader(x, y, batch_size=batch_size, shuffle=shuffle, seed=self.seed if seed is None else seed,
                           drop_last=drop_last, rank=self.rank, world_size=self.world_size)

    # -- what the loop calls -----------------------------------------------------------------------
    def synchronize(self, bnn: BNN, epoch: int = 0, step: int = 0) -> None:
        """Make every rank start from rank 0's parameters, check that all ranks resume at the same
        ``(epoch, step)``, and attach the gradient all-reduce to ``bnn``'s parameters."""
        if not isinstance(bnn, BNN):
            raise TypeError(f"synchronize() takes a pyrobnn BNN, got {type(bnn).__name__}")
        self.detach()
        if not self._distributed:
            return
        position = torch.tensor([int(epoch), int(step), -int(epoch), -int(step)], dtype=torch.long,
                                device=self.device)
        dist.all_reduce(position, op=dist.ReduceOp.MAX, group=self.group)
        if position[0].item() != -position[2].item() or position[1].item() != -position[3].item():
            raise RuntimeError(
                f"rank {self.rank} would resume at epoch {epoch}, step {step} but the ranks disagree (epochs "
                f"{-position[2].item()}..{position[0].item()}); the checkpoint directory must be one that every "
                "rank sees (a shared file system)")
        with torch.no_grad():
            for tensor in bnn.state_dict().values():
                if tensor.device != self.device:
                    raise ValueError(f"the BNN lives on {tensor.device} but this process uses {self.device}; "
                                     "move it with bnn.to(dp.device) (fit_distributed does)")
                dist.broadcast(tensor, src=self._global_rank(0), group=self.group)
        for p in bnn.parameters():
            if p.requires_grad:
                self._armed[id(p)] = False
                self._hooks.append(p.register_post_accumulate_grad_hook(self._reduce_hook))

    def begin_step(self, epoch: int, step: int) -> None:
        """Re-seed torch's generator from ``(seed, rank or 0, epoch, step)`` and arm the all-reduce of
        the gradients of the coming ``backward``."""
        stream = self.rank if self.noise == "independent" else 0
        torch.manual_seed(_seed_from(self.seed, stream, epoch, step))
        for k in self._armed:
            self._armed[k] = True

    def _reduce_hook(self, p: torch.Tensor) -> None:
        # once per armed step and parameter: a backward outside the loop never issues a collective
        if not self._armed.get(id(p)):
            return
        self._armed[id(p)] = False
        dist.all_reduce(p.grad, group=self.group)
        p.grad.div_(self.world_size)

    def mean(self, value: float) -> float:
        """The average of a number over ranks (the epoch's loss: one full-data estimate per rank)."""
        if not self._distributed:
            return float(value)
        t = torch.tensor([float(value)], dtype=torch.float64, device=self.device)
        dist.all_reduce(t, group=self.group)
        return t.item() / self.world_size

    def any(self, flag: bool) -> bool:
        """True on every rank when it is true on any (an early-stopping vote)."""
        if not self._distributed:
            return bool(flag)
        t = torch.tensor([1 if flag else 0], dtype=torch.long, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group)
        return bool(t.item())

    # -- utilities ----------------------------------------------------------------------------------
    def _global_rank(self, group_rank: int) -> int:
        if self.group is None:
            return group_rank
        return dist.get_global_rank(self.group, group_rank)

    def barrier(self) -> None:
        if self._distributed:
            dist.barrier(group=self.group)

    def detach(self) -> None:
        """Remove the gradient hooks (a BNN trained data-parallel is an ordinary BNN again)."""
        for h in self._hooks:
            h.remove()
        self._hooks, self._armed = [], {}

    def close(self) -> None:
        """Detach, and destroy the process group when :meth:`from_env` created it."""
        self.detach()
        if self._owns_group and dist.is_initialized():
            dist.destroy_process_group()
            self._owns_group = False

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# ----------------------------------------------------------------------------------------------------
# data-parallel SVI
# ----------------------------------------------------------------------------------------------------
def fit_distributed(bnn: BNN, train, epochs: int, *, distributed: Optional[DataParallel] = None,
                    batch_size: int = 128, seed: int = 0, noise: str = "independent", val=None, **fit_kwargs):
    """:func:`pyrobnn.inference.fit` on every rank of the process group, data-parallel.

    :param train: ``(x, y)`` — the full data on every rank, sharded here — or an :class:`ArrayLoader`
        already built with this rank's ``rank``/``world_size`` (e.g. by :meth:`DataParallel.loader`).
    :param distributed: the :class:`DataParallel` to use (default: ``DataParallel(seed, noise)`` on the
        initialised default group, or a single process).
    :param batch_size: the *per-process* batch; one optimizer step sees ``world_size · batch_size``.
    :param fit_kwargs: everything else :func:`fit` takes (``lr``, ``optimizer``, ``kl_warmup``,
        ``checkpoint_dir``, ``checkpoint_every``, ``resume``, ``callbacks``, ...).
    :returns: fit's :class:`History` (the same epoch losses on every rank: averaged over ranks).
    """
    from .fit import fit
    if not isinstance(bnn, BNN):
        raise TypeError(f"fit_distributed() trains a pyrobnn BNN, got {type(bnn).__name__}")
    dp = distributed if distributed is not None else DataParallel(seed=seed, noise=noise)
    if not isinstance(dp, DataParallel):
        raise TypeError(f"distributed must be a DataParallel, got {type(dp).__name__}")
    if isinstance(train, (tuple, list)) and len(train) == 2:
        bnn.initialize(torch.as_tensor(train[0])[:2])  # the guide's parameters exist before the move below
        train = dp.loader(train[0], train[1], batch_size=batch_size, seed=seed)
    elif isinstance(train, ArrayLoader):
        if (train.rank, train.world_size) != (dp.rank, dp.world_size):
            raise ValueError(f"the ArrayLoader is shard {train.rank} of {train.world_size} but this process is rank "
                             f"{dp.rank} of {dp.world_size}; build it with dp.loader(x, y, ...)")
        bnn.initialize(train.x[:2].cpu())
    else:
        raise TypeError("fit_distributed takes (x, y) tensors or an ArrayLoader sharded for this rank")
    if isinstance(val, (tuple, list)) and len(val) == 2:
        val = (torch.as_tensor(val[0]).to(dp.device), torch.as_tensor(val[1]).to(dp.device))
    bnn.to(dp.device)
    try:
        return fit(bnn, train, epochs, batch_size=batch_size, seed=seed, val=val, distributed=dp, **fit_kwargs)
    finally:
        dp.detach()


# ----------------------------------------------------------------------------------------------------
# parallel chains
# ----------------------------------------------------------------------------------------------------
def _gather(t: torch.Tensor, dp: DataParallel, dim: int = 0) -> Optional[torch.Tensor]:
    """Concatenate equal-shaped tensors of all ranks along ``dim`` on rank 0 (None elsewhere). Sent as
    bytes, so every dtype (bool, bfloat16) travels through every backend."""
    t = t.detach().contiguous().to(dp.device)
    if not dp._distributed:
        return t
    dtype, shape = t.dtype, t.shape
    payload = t.reshape(-1).view(torch.uint8) if t.numel() else t.reshape(-1).to(torch.uint8)
    bufs = [torch.empty_like(payload) for _ in range(dp.world_size)] if dp.is_main else None
    dist.gather(payload, bufs, dst=dp._global_rank(0), group=dp.group)
    if not dp.is_main:
        return None
    parts = [b.view(dtype).reshape(shape) if t.numel() else torch.empty(shape, dtype=dtype, device=b.device)
             for b in bufs]
    return torch.cat(parts, dim)


def _agree(dp: DataParallel, values: List[int], what: str) -> None:
    """All ranks must hold the same integers (shapes, site counts) before a gather."""
    if not dp._distributed:
        return
    t = torch.tensor(values + [-v for v in values], dtype=torch.long, device=dp.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=dp.group)
    n = len(values)
    if t[:n].tolist() != [-v for v in t[n:].tolist()]:
        raise RuntimeError(f"the ranks disagree on {what}: this rank has {values}")


def sample_chains(bnn: BNN, data, *, chains_per_rank: int = 1, seed: int = 0,
                  distributed: Optional[DataParallel] = None, **sample_kwargs):
    """Independent SGLD/pSGLD chains on every rank, gathered on rank 0.

    Every rank runs :func:`pyrobnn.inference.sample` on the full ``data`` with ``num_chains =
    chains_per_rank`` and seed :func:`chain_seed(seed, rank) <chain_seed>`. Draws are cut to the
    shortest chain's length and gathered in rank order.

    :param sample_kwargs: passed to ``sample`` (``kernel``, ``num_samples``, ``warmup_steps``, ``thin``,
        ``step_size``, ``batch_size``, ``eval_x``, ``store_dtype``, ...).
    :returns: on rank 0 a :class:`SamplePosterior` with ``world_size · chains_per_rank`` chains; ``None``
        on the other ranks.
    """
    from .sampling import SamplePosterior, sample
    if not isinstance(bnn, BNN):
        raise TypeError(f"sample_chains() needs a pyrobnn BNN, got {type(bnn).__name__}")
    positive_int("chains_per_rank", chains_per_rank)
    non_negative_int("seed", seed)
    for reserved in ("num_chains", "seed"):
        if reserved in sample_kwargs:
            raise ValueError(f"pass chains_per_rank/seed to sample_chains, not {reserved}")
    dp = distributed if distributed is not None else DataParallel(seed=seed)
    post = sample(bnn, data, num_chains=chains_per_rank, seed=chain_seed(seed, dp.rank), **sample_kwargs)
    sites = sorted(post.draws)
    _agree(dp, [len(sites), len(post.stats), int(post.eval_outputs is not None)], "sites, statistics and eval_x")
    shortest = torch.tensor([post.num_draws], dtype=torch.long, device=dp.device)
    if dp._distributed:
        dist.all_reduce(shortest, op=dist.ReduceOp.MIN, group=dp.group)
    S = int(shortest.item())
    draws, stats = {}, {}
    for name in sites:
        v = post.draws[name][:, :S]
        _agree(dp, list(v.shape), f"the shape of site {name!r}")
        draws[name] = _gather(v, dp)
    for key in sorted(post.stats):
        stats[key] = _gather(post.stats[key][:, :S], dp)
    eval_outputs = None
    if post.eval_outputs is not None:
        eval_outputs = _gather(post.eval_outputs[:, :S], dp)
    if not dp.is_main:
        return None
    config = {**post.config, "num_chains": dp.world_size * chains_per_rank, "chains_per_rank": chains_per_rank,
              "world_size": dp.world_size, "chain_seeds": [chain_seed(seed, r) for r in range(dp.world_size)]}
    return SamplePosterior(bnn, {k: v.cpu() for k, v in draws.items()}, {k: v.cpu() for k, v in stats.items()},
                           post.eval_x, None if eval_outputs is None else eval_outputs.cpu(), config)
