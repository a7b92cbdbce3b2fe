"""Every CPU speed trick in pyrobnn.fastpath agrees with its plain-PyTorch reference path (values and gradients),
the switch selects the reference path, and a tensor off the CPU never takes the fast path."""
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from pyrobnn import fastpath


def _value_and_grads(fn, inputs, weights=None):
    inputs = [t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*inputs)
    outs = out if isinstance(out, tuple) else (out,)
    total = sum((o * (w if w is not None else 1.0)).sum() for o, w in zip(outs, weights or [None] * len(outs)))
    grads = torch.autograd.grad(total, inputs)
    return [o.detach() for o in outs], grads


def _agree(fn, inputs, rtol, weights=None):
    fast = _value_and_grads(fn, inputs, weights)
    with fastpath.disabled():
        assert not fastpath.enabled()
        ref = _value_and_grads(fn, inputs, weights)
    assert fastpath.enabled()
    for a, b in zip(fast[0] + list(fast[1]), ref[0] + list(ref[1])):
        assert a.shape == b.shape
        assert torch.allclose(a, b, rtol=rtol, atol=1e-6 * rtol), (a - b).abs().max()


@pytest.mark.parametrize("dtype,rtol", [(torch.float32, 2e-5), (torch.float64, 1e-10)])
def test_gaussian_sums_fast_and_reference_agree(dtype, rtol):
    torch.manual_seed(0)
    loc = torch.randn(300, 50, dtype=dtype)          # 15,000 scales: the grouped log-sum is used in float32
    scale = torch.rand(300, 50, dtype=dtype) * 0.1 + 1e-3
    w = torch.tensor([0.3, -1.2, 0.7, 2.0], dtype=dtype)  # a KL-like combination of the four sums
    _agree(fastpath.gaussian_sums, [loc, scale], rtol, weights=[w])
    _agree(fastpath.gaussian_variance_sums, [loc, scale], rtol, weights=[torch.randn(300, 50, dtype=dtype), w])


@pytest.mark.parametrize("dtype,rtol", [(torch.float32, 2e-5), (torch.float64, 1e-10)])
@pytest.mark.parametrize("uniform", [True, False])
@pytest.mark.parametrize("unused", [(), (1, 3)])
def test_site_gaussian_terms_agree_with_the_reference_and_with_one_node_per_site(dtype, rtol, uniform, unused):
    """The one-node-per-guide terms equal the reference path, and bit for bit the per-site nodes they replace,
    with one prior over every site (the vectorised backward) and with a weight per site (the per-site one),
    with every site's σ² read by a layer and with some sites' σ² unread (no gradient for them)."""
    torch.manual_seed(4)
    sizes = [6000, 30, 4001, 1]   # a grouped log-sum, small sites, an odd size, a single weight
    shapes = [torch.Size([60, 100]), torch.Size([30]), torch.Size([4001]), torch.Size([1, 1])]
    n = sum(sizes)
    loc, scale = torch.randn(n, dtype=dtype), torch.rand(n, dtype=dtype) * 0.1 + 1e-3
    w_var = torch.randn(n, dtype=dtype)
    for i in unused:  # a site whose σ² no layer reads
        offset = sum(sizes[:i])
        w_var[offset:offset + sizes[i]] = 0.0
    w = torch.tensor([0.3, -1.2, 0.7, 2.0], dtype=dtype)
    w_sums = w.expand(len(sizes), 4) if uniform else torch.randn(len(sizes), 4, dtype=dtype)

    def terms(l, s):
        variances, sums = fastpath.site_gaussian_terms(l, s, sizes, shapes)
        assert [v.shape for v in variances] == shapes
        read = [v.reshape(-1) if i not in unused else v.reshape(-1).detach() for i, v in enumerate(variances)]
        return torch.cat(read), sums
    _agree(terms, [loc, scale], rtol, weights=[w_var, w_sums])
    fused = _value_and_grads(terms, [loc, scale], [w_var, w_sums])

    def per_site(l, s):
        pairs = [fastpath.gaussian_variance_sums(a, b) for a, b in zip(l.split(sizes), s.split(sizes))]
        read = [v if i not in unused else v.detach() for i, (v, _) in enumerate(pairs)]
        return torch.cat(read), torch.stack([t for _, t in pairs])
    separate = _value_and_grads(per_site, [loc, scale], [w_var, w_sums])
    for a, b in zip(fused[0] + list(fused[1]), separate[0] + list(separate[1])):
        assert torch.equal(a, b)
    # a backward with only the sums (no layer read σ²), and with a zero weight on Σμ² at one site
    w_sums = w_sums.clone()
    w_sums[1, 0] = 0.0
    _agree(lambda l, s: fastpath.site_gaussian_terms(l, s, sizes, shapes)[1], [loc, scale], rtol, weights=[w_sums])


@pytest.mark.parametrize("dtype,rtol", [(torch.float32, 2e-6), (torch.float64, 1e-12)])
def test_softplus_and_its_fused_path_agree_with_torch(dtype, rtol):
    torch.manual_seed(1)
    rho = torch.cat([torch.linspace(-20, 30, 501), torch.randn(5000) * 3 - 4.6]).to(dtype)
    _agree(fastpath.softplus, [rho], rtol)
    # the fused path itself (taken where log1p is slow), against F.softplus, on ρ ≤ 20
    small = rho[rho <= 20]
    a = _value_and_grads(fastpath._Softplus.apply, [small])
    b = _value_and_grads(F.softplus, [small])
    assert torch.allclose(a[0][0], b[0][0], rtol=rtol) and torch.allclose(a[1][0], b[1][0], rtol=rtol, atol=1e-30)


def test_log_sum_fast_and_reference_agree():
    torch.manual_seed(2)
    x = torch.exp(torch.empty(20001).uniform_(math.log(1e-6), math.log(5.0)))
    _agree(fastpath.log_sum, [x], 1e-6)


@pytest.mark.parametrize("dtype,rtol", [(torch.float32, 2e-5), (torch.float64, 1e-10)])
def test_sum_scaled_squared_norms_fast_and_reference_agree(dtype, rtol):
    torch.manual_seed(3)
    zs = [torch.randn(40, 30, dtype=dtype), torch.randn(30, dtype=dtype), torch.randn(10, 40, dtype=dtype)]
    coefs, constant = [-0.5, -2.0, -0.125], -17.25
    _agree(lambda *z: fastpath.sum_scaled_squared_norms(coefs, constant, list(z)), zs, rtol)
    ref = sum(c * (z.double() ** 2).sum() for c, z in zip(coefs, zs)) + constant
    assert fastpath.sum_scaled_squared_norms(coefs, constant, zs).item() == pytest.approx(ref.item(), rel=rtol)


def test_tensors_off_the_cpu_take_the_reference_path():
    meta = torch.empty(8, device="meta")
    assert fastpath.enabled() and not fastpath.enabled(meta)
    var, sums = fastpath.gaussian_variance_sums(meta, meta)  # the fast path would need host values (fails on meta)
    assert var.device.type == "meta" and sums.shape == (4,)
    assert fastpath.softplus(meta).device.type == "meta"
    assert fastpath.sum_scaled_squared_norms([1.0], 0.0, [meta]).device.type == "meta"


def test_environment_switch():
    code = "import pyrobnn.fastpath as f; import torch; print(f.enabled(), f.enabled(torch.zeros(1)))"
    for value, expected in (("0", ["False", "False"]), ("1", ["True", "True"])):
        env = dict(os.environ, PYROBNN_FASTPATH=value)
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        assert out.stdout.split() == expected


def test_softplus_in_range_says_when_the_grouped_log_sum_needs_no_check():
    rho = torch.linspace(-15.0, 15.0, 8001)
    sigma, in_range = fastpath.softplus_in_range(rho)
    assert in_range and torch.allclose(sigma, F.softplus(rho), rtol=2e-6)
    assert torch.equal(fastpath.log_sum(sigma, in_range=True), fastpath.log_sum(sigma))
    # σ below the grouped product's safe range (softplus(−30) ≈ 1e-13), ρ above softplus's threshold, NaN
    for bad in (torch.tensor([-30.0, 0.0]), torch.tensor([0.0, 25.0]), torch.tensor([0.0, math.nan])):
        sigma, in_range = fastpath.softplus_in_range(bad)
        assert not in_range
        assert torch.allclose(sigma, F.softplus(bad), rtol=2e-6, equal_nan=True)


_KERNEL_SET_PROBE = """
import hashlib, torch
from pyrobnn import fastpath
g = torch.Generator().manual_seed(0)
rho = torch.randn(1 << 16, generator=g) * 6
print(torch.backends.cpu.get_cpu_capability(),
      hashlib.sha1(fastpath.softplus(rho).numpy().tobytes()).hexdigest())
"""


def test_softplus_is_the_same_bit_for_bit_under_torchs_avx2_and_avx512_kernels():
    """torch picks its vectorised CPU kernels by CPU at start-up (``ATEN_CPU_CAPABILITY`` overrides it); the
    one-log softplus gives the same bits under each, so recorded results reproduce on both kinds of host."""
    digests = {}
    for cap in ("avx2", "avx512"):
        env = dict(os.environ, ATEN_CPU_CAPABILITY=cap)
        out = subprocess.run([sys.executable, "-c", _KERNEL_SET_PROBE], env=env, capture_output=True, text=True,
                             check=True).stdout.split()
        if out[0].lower() == cap:
            digests[cap] = out[1]
    if len(digests) < 2:
        pytest.skip(f"this CPU runs only {sorted(digests) or 'neither'} of torch's AVX2 and AVX-512 kernel sets")
    assert digests["avx2"] == digests["avx512"]
