"""Data-parallel SVI and gathered SGLD chains with 2 real processes (torchrun, gloo, 127.0.0.1).

One torchrun launch (module fixture) runs every distributed scenario; the tests check its outputs
against single-process runs done here. Cost: one launch of 2 interpreters (~10-25 s on 2 shared cores).
"""
import json
import os
import socket
import subprocess
import sys
import textwrap

import pytest
import torch

import pyrobnn
from pyrobnn import models
from pyrobnn.inference import DataParallel, chain_seed, fit_distributed, sample
from pyrobnn.inference.distributed import launched_by_torchrun
from pyrobnn.inference.sampling import SamplePosterior
from pyrobnn.io import read_state

N = 64          # examples; each of the 2 ranks holds a shard of 32
EPOCHS = 6
LR = 0.05
SEED = 3

WORKER = textwrap.dedent(r'''
    import json, os, sys
    import torch, pyro, pyrobnn
    from pyrobnn import models
    from pyrobnn.inference import DataParallel, fit_distributed, sample, sample_chains, chain_seed
    from pyrobnn.io import write_state

    fit_module = sys.modules["pyrobnn.inference.checkpoint"]   # where the loop writes checkpoints
    out = sys.argv[1]
    N, EPOCHS, LR, SEED = {N}, {EPOCHS}, {LR}, {SEED}
    dp = DataParallel.from_env(seed=SEED, noise="shared")
    result = {{"rank": dp.rank, "world_size": dp.world_size, "backend": torch.distributed.get_backend()}}

    def data():
        g = torch.Generator().manual_seed(0)
        x = torch.randn(N, 5, generator=g)
        return x, (x[:, 0] + 0.5 * x[:, 1] > 0).long()

    def bnn(lrt):
        torch.manual_seed(0)
        net = models.build("mlp", in_features=5, out_features=2, hidden=[8])
        return pyrobnn.bayesian(net, likelihood="categorical", local_reparameterization=lrt)

    x, y = data()
    # 1. full batch, shared noise, weight sampling: the ranks compute the single-process gradient
    b = bnn(lrt=False)
    h = fit_distributed(b, (x, y), EPOCHS, distributed=dp, batch_size=N // 2, seed=SEED, lr=LR, progress=False)
    write_state(f"{{out}}/svi-rank{{dp.rank}}.safetensors", b.state_dict(), {{"kind": "test"}})
    result["svi_loss"] = h.column("loss")

    # 2. default noise (independent per rank, local reparameterisation), checkpoints and resume
    saves = []
    real_save = fit_module._save_checkpoint
    fit_module._save_checkpoint = lambda *a, **k: saves.append(a[5:7]) or real_save(*a, **k)
    dpi = DataParallel(seed=SEED)
    kw = dict(distributed=dpi, batch_size=8, seed=SEED, lr=LR, progress=False, checkpoint_every=1)
    full = bnn(lrt=True)
    fit_distributed(full, (x, y), 3, checkpoint_dir=f"{{out}}/ck-full", **kw)
    part = bnn(lrt=True)
    fit_distributed(part, (x, y), 2, checkpoint_dir=f"{{out}}/ck-part", **kw)
    resumed = bnn(lrt=True)
    torch.manual_seed(1234 + dp.rank)   # a different RNG state from the interrupted run's
    fit_distributed(resumed, (x, y), 3, checkpoint_dir=f"{{out}}/ck-part", resume=True, **kw)
    fit_module._save_checkpoint = real_save
    write_state(f"{{out}}/lrt-full-rank{{dp.rank}}.safetensors", full.state_dict(), {{"kind": "test"}})
    write_state(f"{{out}}/lrt-resumed-rank{{dp.rank}}.safetensors", resumed.state_dict(), {{"kind": "test"}})
    result["checkpoints_written"] = len(saves)

    # 3. one SGLD chain per rank, gathered on rank 0
    s = bnn(lrt=True)
    s.dataset_size = N
    skw = dict(num_samples=12, warmup_steps=20, thin=2, batch_size=16, step_size=1e-3, eval_x=x[:8])
    post = sample_chains(s, (x, y), seed=SEED, **skw)
    result["posterior_on_this_rank"] = post is not None
    if dp.is_main:
        post.save(f"{{out}}/chains.safetensors")
        same = []
        for r in range(dp.world_size):   # re-run every rank's chain here: the gather must be exact
            ref = sample(s, (x, y), seed=chain_seed(SEED, r), **skw)
            same.append(all(torch.equal(ref.draws[k][0], post.draws[k][r]) for k in ref.draws)
                        and torch.equal(ref.eval_outputs[0], post.eval_outputs[r]))
        result["chains_equal_single_process"] = same
    with open(f"{{out}}/rank{{dp.rank}}.json", "w") as f:
        json.dump(result, f)
    dp.close()
''').format(N=N, EPOCHS=EPOCHS, LR=LR, SEED=SEED)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, 5, generator=g)
    return x, (x[:, 0] + 0.5 * x[:, 1] > 0).long()


def _bnn(lrt):
    torch.manual_seed(0)
    net = models.build("mlp", in_features=5, out_features=2, hidden=[8])
    return pyrobnn.bayesian(net, likelihood="categorical", local_reparameterization=lrt)


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    script = out / "worker.py"
    script.write_text(WORKER)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--nnodes", "1",
           "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), str(script), str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    return out, ranks


def test_data_parallel_svi_identical_on_ranks_and_matches_single_process(job):
    out, ranks = job
    assert [r["world_size"] for r in ranks] == [2, 2] and ranks[0]["backend"] == "gloo"
    s0, _ = read_state(out / "svi-rank0.safetensors")
    s1, _ = read_state(out / "svi-rank1.safetensors")
    for k in s0:
        assert torch.equal(s0[k], s1[k]), k          # bitwise identical guide parameters on both ranks
    assert ranks[0]["svi_loss"] == ranks[1]["svi_loss"]

    # single process, the full batch of N, the same per-step noise stream
    x, y = _data()
    ref = _bnn(lrt=False)
    h = fit_distributed(ref, (x, y), EPOCHS, distributed=DataParallel(seed=SEED, noise="shared"), batch_size=N,
                        seed=SEED, lr=LR, progress=False)
    ref_state = ref.state_dict()
    # stated tolerance: 1e-5 absolute after 6 Adam steps (only float summation order differs; measured ≈5e-7)
    for k in s0:
        torch.testing.assert_close(s0[k], ref_state[k], rtol=0, atol=1e-5)
    torch.testing.assert_close(torch.tensor(ranks[0]["svi_loss"]), torch.tensor(h.column("loss")), rtol=1e-5, atol=0)
    moved = max((s0[k] - _init_state()[k]).abs().max().item() for k in s0)
    assert moved > 0.1                                # training did change the parameters

    # the check has teeth: a single process seeing one shard (what a missing all-reduce would train on)
    # ends far from the data-parallel result
    half = _bnn(lrt=False)
    half.dataset_size = N
    fit_distributed(half, (x[:N // 2], y[:N // 2]), EPOCHS, distributed=DataParallel(seed=SEED, noise="shared"),
                    batch_size=N // 2, seed=SEED, lr=LR, progress=False)
    assert max((half.state_dict()[k] - s0[k]).abs().max().item() for k in s0) > 1e-3


def _init_state():
    b = _bnn(lrt=False)
    x, _ = _data()
    b.initialize(x)
    return b.state_dict()


def test_data_parallel_resume_is_exact_and_only_rank0_writes(job):
    out, ranks = job
    full0, _ = read_state(out / "lrt-full-rank0.safetensors")
    full1, _ = read_state(out / "lrt-full-rank1.safetensors")
    res0, _ = read_state(out / "lrt-resumed-rank0.safetensors")
    for k in full0:
        assert torch.equal(full0[k], full1[k]), k     # independent noise per rank, still identical parameters
        assert torch.equal(full0[k], res0[k]), k      # 2 epochs + resume to 3 == 3 uninterrupted epochs
    # 32 examples per rank / batch 8 = 4 steps per epoch, a checkpoint after every step:
    # 3 + 2 + 1 epochs, each 3 mid-epoch + 1 epoch-end checkpoints, all on rank 0
    assert ranks[0]["checkpoints_written"] == 4 * (3 + 2 + 1)
    assert ranks[1]["checkpoints_written"] == 0


def test_sgld_chains_gathered_into_one_inference_data(job):
    import arviz as az
    out, ranks = job
    assert ranks[0]["posterior_on_this_rank"] and not ranks[1]["posterior_on_this_rank"]
    assert ranks[0]["chains_equal_single_process"] == [True, True]
    post = SamplePosterior.load(out / "chains.safetensors", net=models.build("mlp", in_features=5, out_features=2,
                                                                               hidden=[8]))
    assert post.num_chains == 2 and post.num_draws == 12 and post.config["world_size"] == 2
    assert not torch.equal(post.draws["1.weight"][0], post.draws["1.weight"][1])   # different seeds per rank
    idata = pyrobnn.to_inference_data(post, log_likelihood=False, posterior_predictive=False)
    assert idata.posterior.sizes["chain"] == 2 and idata.posterior.sizes["draw"] == 12
    rhat = torch.as_tensor(az.rhat(idata)["3.bias"].values)     # R-hat across the two ranks' chains
    assert rhat.shape == (2,) and torch.isfinite(rhat).all() and (rhat > 0.9).all()
    # the predictions group holds the held-out outputs recorded on each rank; R-hat over them too
    assert idata.predictions.sizes["chain"] == 2
    fs = pyrobnn.diagnostics.function_space_diagnostics(idata)
    assert fs["num_quantities"] > 0 and 0.9 < fs["rhat_max"] < float("inf")


def test_single_process_fallback_and_validation():
    assert not launched_by_torchrun() or "RANK" in os.environ
    dp = DataParallel(seed=1)
    assert (dp.rank, dp.world_size, dp.is_main) == (0, 1, True)
    assert dp.mean(2.5) == 2.5 and dp.any(True) and not dp.any(False)
    with pytest.raises(ValueError, match="noise"):
        DataParallel(noise="correlated")
    x, y = _data()
    loader = dp.loader(x, y, batch_size=8)
    assert loader.world_size == 1 and len(loader) == N // 8
    from pyrobnn.data import ArrayLoader
    with pytest.raises(ValueError, match="shard 1 of 2"):
        fit_distributed(_bnn(True), ArrayLoader(x, y, 8, rank=1, world_size=2), 1, distributed=dp, progress=False)
    with pytest.raises(TypeError):
        fit_distributed(_bnn(True), [x], 1, distributed=dp)
    # the per-step seed depends on (seed, stream, epoch, step) only
    dp.begin_step(2, 5)
    a = torch.randn(3)
    DataParallel(seed=1).begin_step(2, 5)
    assert torch.equal(a, torch.randn(3))
    assert chain_seed(0, 0) != chain_seed(0, 1)
