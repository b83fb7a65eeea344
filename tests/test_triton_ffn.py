"""Numerics of the Triton sparse-FFN kernels (ppcompile.kernels.triton_ffn) against the torch
reference (ppcompile.kernels.reference), over shapes, activations, taus, biases, token counts and
launch plans (every kernel path: fused, sorted and pairwise selection, fused/separate down
projection, CUDA-core/tensor-core math, split-K, several token tiles).

Without CUDA (or with TRITON_INTERPRET=1 in the environment) the kernels run in the Triton
interpreter on CPU tensors. The interpreter must be on before triton is first imported (triton's
own jit functions, tl.sort among them, are built at import); when something imported triton
earlier (conftest imports torch._dynamo, which does), this module re-runs itself in a subprocess
with TRITON_INTERPRET=1 (test_in_interpreter_subprocess). With CUDA the kernels run compiled, and
bf16, torch.compile and CUDA-graph checks run as well. On a GPU machine run both:
    python -m pytest tests/test_triton_ffn.py -q                       # compiled kernels
    TRITON_INTERPRET=1 python -m pytest tests/test_triton_ffn.py -q    # interpreter
"""
import atexit
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1" or not torch.cuda.is_available()
if INTERPRET and "triton" not in sys.modules:
    os.environ["TRITON_INTERPRET"] = "1"

triton = pytest.importorskip("triton")
from ppcompile.kernels import triton_ffn  # noqa: E402
from ppcompile.kernels.reference import (ACTIVATIONS, ffn_hidden, router_logits,  # noqa: E402
                                         select_experts, select_top_fraction,
                                         sparse_ffn_reference)


def _interpreted(fn) -> bool:
    return type(fn).__name__ == "InterpretedFunction"


# interpreter wanted, but triton (or our kernels) were loaded compiled: run in a subprocess
RESPAWN = INTERPRET and not (_interpreted(triton.language.standard.sort)
                             and _interpreted(triton_ffn._router_kernel))
DEVICE = "cpu" if INTERPRET else "cuda"
BOUNDARY = 1e-5  # experts whose mass_before is this close to tau may be decided either way
TOL = {torch.float32: 2e-5, torch.float16: 2e-2, torch.bfloat16: 3e-2}
native_only = pytest.mark.skipif(INTERPRET, reason="needs CUDA and compiled kernels")


_interpreter_run = None  # (process, its output file), started by start_interpreter_run


def start_interpreter_run():
    """Start this file's interpreter run in a subprocess. conftest starts it when the session's
    tests are collected: it takes about as long as all the other tests together, and runs beside
    them (one thread of its own: the interpreter is mostly Python)."""
    global _interpreter_run
    if not RESPAWN or _interpreter_run is not None:
        return
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    out = tempfile.TemporaryFile(mode="w+")
    process = subprocess.Popen(
        [sys.executable, "-m", "pytest", __file__, "-q", "-p", "no:cacheprovider"], env=env,
        cwd=Path(__file__).resolve().parents[1], stdout=out, stderr=subprocess.STDOUT, text=True)
    atexit.register(process.kill)  # a session stopped early (-x, Ctrl-C) leaves no orphan
    _interpreter_run = process, out


@pytest.mark.skipif(not RESPAWN, reason="the interpreter runs in this process")
def test_in_interpreter_subprocess():
    start_interpreter_run()  # already running, unless this module was collected some other way
    process, out = _interpreter_run
    returncode = process.wait(timeout=1800)
    out.seek(0)
    log = out.read()
    assert returncode == 0, log[-9000:]
    assert " passed" in log.splitlines()[-1], log[-2000:]  # pytest's summary: tests ran


_REAL_EMPTY = triton_ffn._empty


@pytest.fixture(autouse=True)
def poisoned_buffers(monkeypatch, request):
    """Every buffer the launcher allocates starts as garbage (NaN, or a nonzero bit pattern), so
    anything read before it is written, or a workspace a kernel forgot to zero, shows up."""
    if RESPAWN and request.node.name != "test_in_interpreter_subprocess":
        pytest.skip("runs in the interpreter subprocess (test_in_interpreter_subprocess)")

    def empty(shape, dtype, device):
        t = torch.empty(shape, dtype=dtype, device=device)
        return t.fill_(float("nan")) if dtype.is_floating_point else t.fill_(0x5A5A5A5A)

    monkeypatch.setattr(triton_ffn, "_empty", empty)


def make_ffn(n_tokens, d, d_ff, s, *, gated, biases, dtype=torch.float32, seed=0,
             w_down_layout="col", spread=2.0):
    """Random FFN + router. spread: std of the router logits (how peaked the softmax is)."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(dtype).to(DEVICE)

    n_exp = d_ff // s
    x = rnd(n_tokens, d)
    w_down = rnd(d, d_ff, scale=d_ff ** -0.5)
    if w_down_layout == "col":  # what the core hands the kernels on CUDA: w_down.t() contiguous
        w_down = w_down.t().contiguous().t()
    return dict(
        x=x, w_up=rnd(d_ff, d, scale=d ** -0.5), b_up=rnd(d_ff) if biases else None,
        w_gate=rnd(d_ff, d, scale=d ** -0.5) if gated else None,
        b_gate=rnd(d_ff) if gated and biases else None,
        w_down=w_down, b_down=rnd(d) if biases else None,
        router_w=rnd(n_exp, d, scale=spread * d ** -0.5), router_b=rnd(n_exp),
    )


def tau_tensor(tau):
    return torch.tensor(tau, dtype=torch.float32, device=DEVICE)


def zero_stats(ffn):
    """A fresh statistics pair for the op to add into, on the FFN's device."""
    return torch.zeros(2, dtype=torch.float64, device=ffn["x"].device)


def mass_before(logits):
    """Per expert, the softmax mass of the experts ranked above it (as the reference ranks)."""
    p = logits.float().softmax(-1)
    ranked, order = p.sort(-1, descending=True)
    return torch.zeros_like(p).scatter(-1, order, ranked.cumsum(-1) - ranked)


def run_and_check(ffn, tau, activation, s, config=None, method="prunepath"):
    """Runs the kernels and checks: selection vs reference (for prunepath, experts at the cut
    excepted), y vs the exact FFN of the experts the kernels kept, counts; returns
    (y, counts, keep). Token counts the op would hand to cuBLAS still run the kernels here."""
    y, counts, keep = triton_ffn.sparse_ffn_triton(
        **ffn, tau=tau_tensor(tau), activation=activation, expert_size=s, method=method,
        config={} if config is None else config, return_keep=True)
    x = ffn["x"]
    x2d = x.reshape(-1, x.shape[-1])
    n = x2d.shape[0]

    logits = router_logits(x2d, ffn["router_w"], ffn["router_b"])
    if method == "prunepath":
        keep_ref = select_experts(logits, tau)
        near_cut = ((mass_before(logits) - tau).abs() <= BOUNDARY) & (tau < 1.0)
    else:  # a count, not a mass: exact (random logits have no ties)
        keep_ref = select_top_fraction(logits, tau)
        near_cut = torch.zeros_like(keep_ref)
    assert keep.shape == keep_ref.shape
    assert ((keep == keep_ref) | near_cut).all(), "kept experts differ from the reference"
    if not near_cut.any():
        y_ref, counts_ref = sparse_ffn_reference(**ffn, tau=tau_tensor(tau),
                                                 activation=activation, expert_size=s,
                                                 method=method)
        assert torch.equal(counts.cpu(), counts_ref.cpu())

    assert counts.dtype == torch.float64 and counts.shape == (2,)
    assert counts.tolist() == [keep.sum().item() * s, float(n)]

    # y against the float64 FFN restricted to exactly the experts the kernels kept
    dbl = {k: (v.double() if v is not None else None) for k, v in ffn.items()}
    h = ffn_hidden(dbl["x"].reshape(n, -1), dbl["w_up"], dbl["b_up"], dbl["w_gate"],
                   dbl["b_gate"], activation)
    h = h * keep.repeat_interleave(s, dim=1).double()
    y_exp = F.linear(h, dbl["w_down"], dbl["b_down"]).reshape(*x.shape[:-1], -1)
    assert y.dtype == x.dtype and y.shape == y_exp.shape
    assert torch.isfinite(y).all(), "unwritten (poisoned) output elements"
    tol = TOL[x.dtype]
    scale = y_exp.abs().max().item() + 1.0
    err = (y.double() - y_exp).abs().max().item()
    assert err <= tol * scale, f"max |y - y_ref| = {err:.3g} > {tol * scale:.3g}"
    return y, counts, keep


# Each case: tokens, d, d_ff, expert_size, activation, gated, biases, tau. Token counts 1, 3, 8
# take the decode plans (1: fused selection + fused down, or on a GPU a program per expert;
# 3 and 8: selection kernel, tensor cores, split-K down), 40 the many-token plan.
CASES = []
_SHAPES = [(32, 64, 8), (64, 128, 16), (32, 128, 32), (64, 64, 16), (64, 128, 8)]
_TAUS = [0.3, 0.6, 0.9, 1.0, 0.75]
for i, (act, gated) in enumerate([(a, g) for a in ACTIVATIONS for g in (True, False)]):
    for j, n in enumerate((1, 3, 8, 40)):
        d, d_ff, s = _SHAPES[(i + j) % len(_SHAPES)]
        CASES.append((n, d, d_ff, s, act, gated, (i + j) % 3 != 0, _TAUS[(i + 2 * j) % 5]))


def _case_id(c):
    n, d, d_ff, s, act, gated, biases, tau = c
    return (f"n{n}-{d}x{d_ff}-s{s}-{act}-{'gated' if gated else 'plain'}"
            f"-{'bias' if biases else 'nobias'}-tau{tau}")


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_matches_reference_fp32(case):
    n, d, d_ff, s, act, gated, biases, tau = case
    ffn = make_ffn(n, d, d_ff, s, gated=gated, biases=biases, seed=hash(case) % 1000)
    run_and_check(ffn, tau, act, s)


@pytest.mark.parametrize("case", CASES[::3], ids=_case_id)
def test_matches_reference_fp16(case):
    n, d, d_ff, s, act, gated, biases, tau = case
    ffn = make_ffn(n, d, d_ff, s, gated=gated, biases=biases, dtype=torch.float16, seed=7)
    run_and_check(ffn, tau, act, s)


@native_only
@pytest.mark.parametrize("case", CASES[::2], ids=_case_id)
def test_matches_reference_bf16(case):
    n, d, d_ff, s, act, gated, biases, tau = case
    ffn = make_ffn(n, d, d_ff, s, gated=gated, biases=biases, dtype=torch.bfloat16, seed=11)
    run_and_check(ffn, tau, act, s)


# Launch plans the default table does not pick for these small shapes, so every kernel path
# runs: (tokens, config)
PLANS = [
    (1, dict(fuse_down=False, down_ks=1)),                       # down kernel, direct epilogue
    (1, dict(fuse_down=False, down_ks=3, down_block_d=16)),      # split-K down, column tiles
    (1, dict(select="sorted", sel_warps=8)),                     # one token, sorted selection
    (2, dict(select="pairwise", sel_e=4)),                       # pairwise selection, 2 tokens
    (8, dict(select="pairwise", sel_e=2)),                       # ... a token tile of 8
    (2, dict(up_sub=2, up_programs=5)),                          # many small programs
    (3, dict(dot=False, select="fused")),                        # fused selection, 3 tokens
    (3, dict(dot=False, fuse_down=False, down_ks=2, down_block_q=2)),  # CUDA-core down, split-K
    (3, dict()),                                                 # tensor cores from 3 tokens
    (8, dict(up_dot=False, down_dot=False, router_dot=False, tile_m=8, fuse_down=True)),
    (8, dict(up_block_k=16, down_block_q=16, down_block_d=16)),  # tensor cores, small blocks
    (8, dict(router_block_k=16, router_split=3)),                # router split over d (uneven)
    # ... read by the fused selection (of the up kernel: a GPU would pick the expert kernel)
    (1, dict(router_block_k=16, router_split=2, up_by_expert=False)),
    (16, dict(sel_n=4, down_ks=1)),
    (12, dict(sel_n=16)),                                        # one selection program a tile
    (12, dict(select="pairwise", sel_e=1)),                      # one expert per program
    (40, dict(tile_m=16, down_ks=2)),                            # 3 token tiles, split-K
    (40, dict(tile_m=8, sel_n=8, up_dot=False, down_dot=False, router_dot=False, up_sub=8,
              down_block_q=4, down_block_d=32)),                 # many tokens on CUDA cores
    (40, dict(tile_m=32, up_sub=16, up_unit=1, up_programs=7)),  # unaligned neuron slices
    (40, dict(kind="decode")),                                   # the other plan of each size
    (8, dict(kind="prefill")),
    # the up kernel reads the kept experts from the list the selection kernel wrote (up_list,
    # the default only past LIST_ABOVE experts), also in several tiles and in the prefill plan
    (2, dict(select="pairwise", sel_e=4, up_list=True)),
    (1, dict(select="pairwise", up_list=True)),
    (8, dict(up_list=True)),
    (40, dict(kind="decode", tile_m=16, sel_n=4, up_list=True)),
    (40, dict(kind="decode", tile_m=16, select="pairwise", sel_e=2, up_list=True)),
    (8, dict(kind="prefill", up_list=True)),
    # steps left in a pool that programs done early claim one at a time (up_pool), also from the
    # list, with tensor cores (h to memory) and in several tiles
    (1, dict(up_pool=2, up_programs=3, up_sub=2)),
    (1, dict(up_pool=4, up_programs=2, up_sub=1)),
    (1, dict(up_pool=2, up_programs=40)),                        # every step claimed
    (2, dict(select="pairwise", sel_e=4, up_list=True, up_pool=2, up_programs=3)),
    (8, dict(up_pool=2, up_programs=3)),
    (40, dict(kind="decode", tile_m=16, up_pool=3, up_programs=2)),
    # a program per expert (the default for launch-bound FFNs), also after a split router
    (1, dict(up_by_expert=True)),
    (2, dict(up_by_expert=True, router_block_k=16, router_split=2)),
]


@pytest.mark.parametrize("n,config", PLANS, ids=[f"n{n}-{'-'.join(c)}" for n, c in PLANS])
@pytest.mark.parametrize("gated", [True, False], ids=["gated", "plain"])
def test_launch_plans(n, config, gated):
    ffn = make_ffn(n, 64, 128, 16, gated=gated, biases=True, seed=n)
    run_and_check(ffn, 0.7, "gelu", 16, config=config)


@pytest.mark.parametrize("tau", [1.0, 0.05])
def test_claimed_steps_at_extreme_tau(tau):
    # tau = 1: the pool's steps are neurons directly (nothing staged); 0.05: one expert a token
    ffn = make_ffn(1, 64, 128, 16, gated=True, biases=True, seed=5)
    run_and_check(ffn, tau, "silu", 16, config=dict(up_pool=2, up_programs=3, up_sub=2))


@native_only
@pytest.mark.parametrize("shape", [(256, 4352, 8), (256, 8448, 8), (512, 8192, 16),
                                   (256, 2048, 16)],
                         ids=["pairwise+pool", "pairwise+list+pool", "fused+pool", "by-expert"])
@pytest.mark.parametrize("n", [1, 2, 8])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_default_plans_at_the_real_sm_count(shape, n, dtype):
    """The plans the table picks on this GPU for widths past 32 x SMs (2 x SMs up programs with
    the step pool; pairwise selection past 512 experts, its list past 1024; a program per expert
    below), which the interpreter's small shapes never reach by default."""
    d, d_ff, s = shape
    ffn = make_ffn(n, d, d_ff, s, gated=True, biases=False, dtype=dtype, seed=n)
    for tau in (0.3, 0.8):
        run_and_check(ffn, tau, "silu", s)


def test_pooled_slices_longer_than_an_even_share():
    # 48 neurons in steps of 32 (tensor cores, fp32) on 2 programs: a pooled program's slice is
    # a whole step, longer than an even share of 24; its scratch row must hold the 8 experts
    # it touches (it was sized for the even share: wrong expert ids, or a crash)
    ffn = make_ffn(8, 32, 48, 4, gated=True, biases=True, seed=4)
    run_and_check(ffn, 0.9, "silu", 4, config=dict(up_programs=2, up_pool=8))


@pytest.mark.parametrize("layout", ["row", "col"])
@pytest.mark.parametrize("n", [1, 8, 40])
def test_w_down_any_strides(layout, n):
    ffn = make_ffn(n, 32, 64, 8, gated=True, biases=False, w_down_layout=layout, seed=3)
    run_and_check(ffn, 0.8, "silu", 8)


@pytest.mark.parametrize("n", [1, 8])
def test_strided_biases(n):
    """Biases that are views with a stride (every other element of a wider vector)."""
    ffn = make_ffn(n, 32, 64, 8, gated=True, biases=True, seed=6)
    for key in ("b_up", "b_gate", "b_down", "router_b"):
        wide = torch.zeros(2 * ffn[key].numel(), dtype=ffn[key].dtype, device=ffn[key].device)
        wide[::2] = ffn[key]
        ffn[key] = wide[::2]
        assert not ffn[key].is_contiguous()
    run_and_check(ffn, 0.7, "silu", 8)


@native_only
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
@pytest.mark.parametrize("n", [1, 8])
def test_runs_on_its_inputs_device_not_the_current_one(n):
    """Called eagerly on cuda:1 while cuda:0 is current, the kernels run on cuda:1."""
    ffn = make_ffn(n, 32, 64, 8, gated=True, biases=True, seed=4)
    on_1 = {k: None if v is None else v.to("cuda:1") for k, v in ffn.items()}
    expected, _ = triton_ffn.sparse_ffn_triton(**ffn, tau=tau_tensor(0.7), activation="silu",
                                               expert_size=8)
    with torch.cuda.device(0):
        y, stats = triton_ffn.sparse_ffn_triton(**on_1, tau=tau_tensor(0.7).to("cuda:1"),
                                                activation="silu", expert_size=8)
    assert y.device == stats.device == torch.device("cuda:1")
    torch.testing.assert_close(y.cpu(), expected.cpu())  # atomics: summation order varies


def test_strided_and_batched_input():
    ffn = make_ffn(6, 32, 64, 16, gated=True, biases=True, seed=5)
    ffn["x"] = ffn["x"].t().contiguous().t().reshape(2, 3, 32)  # column-major rows, batch dims
    y, _, _ = run_and_check(ffn, 0.6, "silu", 16)
    assert y.shape == (2, 3, 32)


@pytest.mark.parametrize("tau", [1e-6, 1.0, 1.5])
@pytest.mark.parametrize("n", [1, 8, 40])
def test_extreme_tau(tau, n):
    """tau -> 0 keeps exactly the top expert of each token; tau >= 1 is the dense FFN."""
    ffn = make_ffn(n, 32, 128, 16, gated=True, biases=True, seed=9)
    _, _, keep = run_and_check(ffn, tau, "silu", 16)
    assert (keep.sum(1) == (1 if tau < 1 else 8)).all()


@pytest.mark.parametrize("n", [1, 8])
def test_tau_one_skips_the_router(n, monkeypatch):
    """tau >= 1 keeps every expert without the router: its logits workspace is never written
    (it stays poisoned), yet y is the dense FFN; below 1 the logits are written."""
    buffers = []
    poisoned = triton_ffn._empty

    def recording(shape, dtype, device):
        buffers.append(poisoned(shape, dtype, device))
        return buffers[-1]

    monkeypatch.setattr(triton_ffn, "_empty", recording)
    ffn = make_ffn(n, 32, 128, 16, gated=True, biases=True, seed=4)
    for tau, written in [(1.0, False), (0.6, True)]:
        buffers.clear()
        _, _, keep = run_and_check(ffn, tau, "silu", 16)
        logits = [b for b in buffers
                  if b.dtype == torch.float32 and tuple(b.shape) == (1, n, 8)]
        assert len(logits) == 1
        assert bool(logits[0].isnan().all()) != written
        assert bool(keep.all()) == (not written)


@pytest.mark.parametrize("n", [1, 8, 40])
def test_ties_go_to_lower_index(n):
    """Equal logits: the kept count follows tau, and ties are taken lowest expert index first."""
    ffn = make_ffn(n, 32, 128, 8, gated=False, biases=False, seed=1)
    ffn["router_w"].zero_()
    ffn["router_b"].zero_()
    tau = 0.3  # 16 experts of p = 1/16: ranks 0..4 have mass_before < 0.3
    _, _, keep = run_and_check(ffn, tau, "relu", 8)
    assert (keep[:, :5].all()) and not keep[:, 5:].any()


@pytest.mark.parametrize("n, config", [(1, {"select": "fused"}), (1, {"select": "pairwise"}),
                                       (8, {"select": "sorted"}), (8, {"select": "pairwise"})])
@pytest.mark.parametrize("kind", ["peaked", "tied_groups", "wide"])
@pytest.mark.parametrize("method", ["prunepath", "topk"])
def test_selection_on_hard_logits(kind, method, n, config):
    """Every selection (fused and sorted sort, pairwise compares every pair of experts) on hard
    cases: most probabilities underflowing to 0 (peaked), groups of equal logits
    straddling the cut (tied_groups), and 1024 experts (wide)."""
    d_ff, s = (1024, 1) if kind == "wide" else (256, 8)
    taus = (0.05, 0.5, 0.9, 0.999999)
    if kind == "wide":
        # the selection is under test: the router's one-expert-per-program path (1024 programs,
        # minutes in the interpreter) is checked by the other kinds, and so is tau 0.9; the
        # multi-token plans run on 3 tokens (each token's 1024-wide sort takes seconds there)
        config, taus = {**config, "router_block_e": 64}, (0.05, 0.5, 0.999999)
        n = min(n, 3)
    ffn = make_ffn(n, 32, d_ff, s, gated=True, biases=False, seed=21,
                   spread=80.0 if kind == "peaked" else 2.0)
    n_exp = d_ff // s
    if kind == "tied_groups":
        ffn["router_w"].zero_()
        levels = torch.arange(n_exp) // 3  # groups of three equal logits
        ffn["router_b"].copy_(levels[torch.randperm(n_exp, generator=torch.Generator()
                                                    .manual_seed(3))].float() * 0.25)
    for tau in taus:
        if kind != "tied_groups":
            _, _, keep = run_and_check(ffn, tau, "silu", s, method=method, config=config)
            assert (keep.sum(1) >= 1).all()
            continue
        # the reference's torch.sort does not promise an order among equal values; the
        # kernels take ties lowest index first, i.e. a stable descending sort
        _, _, keep = triton_ffn.sparse_ffn_triton(**ffn, tau=tau_tensor(tau), activation="silu",
                                                  expert_size=s, method=method, config=config,
                                                  return_keep=True)
        logits = router_logits(ffn["x"], ffn["router_w"], ffn["router_b"])
        score = logits.float().softmax(-1) if method == "prunepath" else logits.float()
        ranked, order = score.sort(dim=-1, descending=True, stable=True)
        if method == "prunepath":
            kept_ranked = (ranked.cumsum(-1) - ranked) < tau
        else:
            kept_ranked = torch.arange(n_exp, device=logits.device) < max(1, round(tau * n_exp))
            kept_ranked = kept_ranked.expand_as(ranked)
        expected = torch.zeros_like(kept_ranked).scatter(-1, order, kept_ranked)
        near_cut = ((mass_before(logits) - tau).abs() <= BOUNDARY) & (method == "prunepath")
        assert ((keep.cpu() == expected.cpu()) | near_cut.cpu()).all()


@pytest.mark.parametrize("tau", [0.25, 0.3125, 0.4375, 1.0])  # E=8: 2, 2.5 -> 2, 3.5 -> 4, 8
@pytest.mark.parametrize("n", [1, 3, 8, 40])
@pytest.mark.parametrize("method", ["topk", "static"])
def test_top_fraction_methods(method, n, tau):
    """round(tau * E) highest logits per token, rounded like Python (half to even); "static"
    is the same rule on a router that is all bias (the same experts for every token)."""
    ffn = make_ffn(n, 32, 128, 16, gated=True, biases=True, seed=13)
    if method == "static":
        ffn["router_w"].zero_()
    _, _, keep = run_and_check(ffn, tau, "silu", 16, method=method)
    assert (keep.sum(1) == max(1, round(tau * 8))).all()
    if method == "static":
        assert (keep == keep[:1]).all()


@pytest.mark.parametrize("method", ["prunepath", "topk", "static"])
@pytest.mark.parametrize("n", [1, 2])
def test_program_per_expert_selects_as_the_reference(method, n):
    """The program-per-expert kernel (the GPU default for launch-bound FFNs, which the
    interpreter's small grids never pick) decides each expert by itself: every method, tau from
    one expert per token to all, odd widths and expert counts (d = 48, 24 experts)."""
    ffn = make_ffn(n, 48, 192, 8, gated=True, biases=True, seed=30 + n)
    if method == "static":
        ffn["router_w"].zero_()
    for tau in (1e-6, 0.5, 0.9, 1.0):
        _, _, keep = run_and_check(ffn, tau, "silu", 8, config=dict(up_by_expert=True),
                                   method=method)
        if method != "prunepath":
            assert (keep.sum(1) == max(1, round(tau * 24))).all()


def test_many_tokens_run_the_reference(monkeypatch):
    """Past DENSE_ABOVE tokens the op is the reference (dense GEMMs, dropped experts masked)."""
    ffn = make_ffn(triton_ffn.DENSE_ABOVE + 1, 64, 128, 16, gated=True, biases=False)
    launched = []
    monkeypatch.setattr(triton_ffn, "_launch", lambda *a: launched.append(a))
    y, counts = triton_ffn.sparse_ffn_triton(**ffn, tau=tau_tensor(0.6), activation="silu",
                                             expert_size=16)
    y_ref, counts_ref = sparse_ffn_reference(**ffn, tau=tau_tensor(0.6), activation="silu",
                                             expert_size=16)
    assert not launched and torch.equal(y, y_ref) and torch.equal(counts, counts_ref)
    assert counts[0] < counts[1] * 128


@pytest.mark.parametrize("method", ["prunepath", "topk", "static"])
def test_many_tokens_stay_symbolic(method):
    """Traced with a symbolic token count past DENSE_ABOVE, the op guards only on that bound, so
    one dynamic prefill graph serves every prompt length (and reads tau on the device only: the
    top-k count too)."""
    from torch.fx.experimental.proxy_tensor import make_fx

    # a token count no other size shares (make_fx gives equal sizes one symbol)
    ffn = make_ffn(2 * triton_ffn.DENSE_ABOVE + 5, 32, 64, 8, gated=True, biases=False, seed=5)
    keys = ["x", "w_up", "w_gate", "w_down", "router_w", "router_b"]

    def op(*tensors, tau):
        return triton_ffn.sparse_ffn_triton(**dict(zip(keys, tensors)), b_up=None, b_gate=None,
                                            b_down=None, tau=tau, activation="silu",
                                            expert_size=8, method=method)

    tau = tau_tensor(0.7)
    gm = make_fx(lambda *t: op(*t[:-1], tau=t[-1]), tracing_mode="symbolic")(
        *[ffn[k] for k in keys], tau)
    placeholders = [n.meta["val"] for n in gm.graph.nodes if n.op == "placeholder"]
    for n in (triton_ffn.DENSE_ABOVE + 1, 3 * triton_ffn.DENSE_ABOVE):
        other = make_ffn(n, 32, 64, 8, gated=True, biases=False, seed=5)
        args = [other[k] for k in keys] + [tau]
        assert gm.shape_env.evaluate_guards_for_args(placeholders, args), f"{n} tokens: recompile"
        y, counts = gm(*args)
        y_ref, counts_ref = sparse_ffn_reference(**other, tau=tau, activation="silu",
                                                 expert_size=8, method=method)
        assert torch.allclose(y, y_ref, atol=1e-5) and torch.equal(counts, counts_ref)
    few = [ffn[k] for k in keys][1:]
    assert not gm.shape_env.evaluate_guards_for_args(
        placeholders, [make_ffn(4, 32, 64, 8, gated=True, biases=False)["x"], *few, tau])


def test_oracle_and_unknown_methods():
    ffn = make_ffn(3, 32, 64, 8, gated=True, biases=True, seed=14)
    args = dict(**ffn, tau=tau_tensor(0.6), activation="silu", expert_size=8)
    y, counts = triton_ffn.sparse_ffn_triton(**args, method="oracle")
    y_ref, counts_ref = sparse_ffn_reference(**args, method="oracle")
    assert torch.equal(y, y_ref) and torch.equal(counts, counts_ref)
    with pytest.raises(ValueError, match="unknown method"):
        triton_ffn.sparse_ffn_triton(**args, method="nope")


def test_zero_tokens_and_arguments_that_describe_no_sparse_ffn():
    ffn = make_ffn(3, 32, 64, 8, gated=True, biases=True, seed=14)
    args = dict(**ffn, tau=tau_tensor(0.6), activation="silu", expert_size=8)
    for shape in [(0, 32), (2, 0, 32)]:
        y, counts = triton_ffn.sparse_ffn_triton(**{**args, "x": ffn["x"].new_zeros(shape)})
        assert y.shape == shape and counts.tolist() == [0.0, 0.0]
    for change, words in [(dict(activation="swish"), "unknown activation 'swish'; allowed"),
                          (dict(expert_size=5), "expert_size=5 must be >= 1 and divide d_ff=64"),
                          (dict(expert_size=16), "router_w has 8 rows.*makes 4 experts"),
                          # shapes the kernels would index past (they read by these shapes)
                          (dict(router_b=ffn["router_b"][:3]), r"router_b has shape \(3,\)"),
                          (dict(w_down=ffn["w_down"][:, :48]), r"w_down has shape \(32, 48\)"),
                          (dict(w_up=ffn["w_up"][:, :24]), r"w_up has shape \(64, 24\)"),
                          (dict(stats=zero_stats(ffn).float()), "stats must be a float64 pair")]:
        with pytest.raises(ValueError, match=words):
            triton_ffn.sparse_ffn_triton(**{**args, **change})


@pytest.mark.parametrize("n, config", [(1, {"select": "fused"}), (1, {"select": "pairwise"}),
                                       (8, {"select": "sorted"}), (8, {"select": "pairwise"})])
@pytest.mark.parametrize("method", ["prunepath", "topk"])
def test_nan_tau_keeps_no_expert(method, n, config):
    """A NaN tau keeps no expert on every path, as the reference's comparisons with NaN do: the
    router runs (NaN is not >= 1), the selection keeps nothing, y is the down bias."""
    ffn = make_ffn(n, 32, 128, 8, gated=True, biases=True, seed=21)
    y, counts, keep = triton_ffn.sparse_ffn_triton(
        **ffn, tau=tau_tensor(float("nan")), activation="silu", expert_size=8, method=method,
        config=config, return_keep=True)
    y_ref, counts_ref = sparse_ffn_reference(**ffn, tau=tau_tensor(float("nan")),
                                             activation="silu", expert_size=8, method=method)
    assert not keep.any() and counts.tolist() == counts_ref.tolist() == [0.0, float(n)]
    assert torch.equal(y, ffn["b_down"].expand_as(y)) and torch.equal(y_ref, y)


@pytest.mark.parametrize("n", [3, 8, 16])
def test_models_narrower_than_a_tensor_core_block(n):
    """d = 8 at 3-16 tokens: the tensor-core plans' blocks stay >= 16 wide (masked), so a narrow
    model runs on the kernels instead of being refused by the plan's check."""
    run_and_check(make_ffn(n, 8, 64, 8, gated=True, biases=True, seed=22), 0.6, "silu", 8)


def test_tau_changes_selection():
    ffn = make_ffn(3, 64, 128, 16, gated=True, biases=True, seed=4)
    kept = [run_and_check(ffn, tau, "silu", 16)[2].sum().item() for tau in (0.2, 0.95)]
    assert kept[0] < kept[1]


@pytest.mark.parametrize("limit", ["MAX_EXPERTS", "MAX_OFFSET"])
def test_out_of_range_shapes_fall_back_to_reference(monkeypatch, limit):
    monkeypatch.setattr(triton_ffn, limit, 2)
    ffn = make_ffn(3, 32, 64, 8, gated=True, biases=True, seed=2)
    y, counts = triton_ffn.sparse_ffn_triton(**ffn, tau=tau_tensor(0.5), activation="silu",
                                             expert_size=8)
    y_ref, counts_ref = sparse_ffn_reference(**ffn, tau=tau_tensor(0.5), activation="silu",
                                             expert_size=8)
    assert torch.equal(y, y_ref) and torch.equal(counts, counts_ref)


@pytest.mark.parametrize("kind", [None, "decode", "prefill"])
@pytest.mark.parametrize("n", [1, 2, 3, 8, 16, 17, 64, 256, 1024])
@pytest.mark.parametrize("shape", [(576, 1536), (2048, 8192), (4096, 11008), (4096, 14336)])
@pytest.mark.parametrize("s", [8, 16])
def test_plan_table_is_valid_for_benchmark_shapes(shape, n, kind, s):
    d, d_ff = shape
    p = triton_ffn.plan(n, d, d, d_ff, s, n_sm=132, kind=kind)
    if n == 1 and kind != "prefill":  # router + up (or expert) kernel, + selection past 512
        assert p.fuse_down and p.select == ("fused" if d_ff // s <= 512 else "pairwise")
    if n > 2:
        assert p.select == "sorted"
    # the pairwise selection lists the kept experts for the up kernel past LIST_ABOVE experts
    decode = kind == "decode" or (kind is None and n <= triton_ffn.DECODE_MAX_N)
    assert p.up_list == (decode and p.select == "pairwise"
                         and triton.next_power_of_2(d_ff // s) > triton_ffn.LIST_ABOVE)
    # a pool of claimed steps only on the CUDA-core plans with 2 x SMs programs (it lost on
    # tensor cores; 1 x SMs plans are launch bound)
    assert p.up_pool == (8 if decode and not p.up_dot and p.up_programs == 2 * 132 else 0)
    # a program per expert only for the launch-bound FFN
    assert p.up_by_expert == (decode and n <= 2 and shape == (576, 1536))


def test_plan_refuses_a_pool_of_one():
    with pytest.raises(ValueError, match="up_pool=1 must be 0"):
        triton_ffn.plan(1, 64, 64, 128, 16, n_sm=132, up_pool=1)


def test_plan_refuses_a_program_per_expert_where_it_cannot_run():
    with pytest.raises(ValueError, match="up_by_expert needs one or two tokens"):
        triton_ffn.plan(1, 64, 64, 128, 16, n_sm=132, up_by_expert=True, select="pairwise")
    with pytest.raises(ValueError, match="up_by_expert needs one or two tokens"):
        triton_ffn.plan(3, 64, 64, 128, 16, n_sm=132, up_by_expert=True, dot=False,
                        select="fused")


def test_plan_refuses_a_list_without_a_selection_kernel():
    with pytest.raises(ValueError, match="up_list needs a selection kernel"):
        triton_ffn.plan(1, 64, 64, 128, 16, n_sm=132, select="fused", up_list=True)


def test_plan_refuses_the_wide_cuda_core_down_kernel():
    """The CUDA-core down kernel with 16-token tiles computed wrong sums on an H100 (GPU_RUNS.md,
    run 15): plans that would launch it are refused by name; 8-token tiles are allowed."""
    with pytest.raises(ValueError, match="tile_m <= 8"):
        triton_ffn.plan(40, 64, 64, 128, 16, n_sm=132, tile_m=16, down_dot=False)
    triton_ffn.plan(40, 64, 64, 128, 16, n_sm=132, tile_m=8, sel_n=8, up_dot=False,
                    down_dot=False, router_dot=False)


def test_gpu_op_registration():
    from ppcompile.kernels import gpu_op, ops  # noqa: F401

    ours = torch.ops.ppcompile.sparse_ffn_triton.default._schema
    theirs = torch.ops.ppcompile.sparse_ffn.default._schema
    args = [(a.name, str(a.type)) for a in theirs.arguments]
    assert [(a.name, str(a.type)) for a in ours.arguments] == \
        args[:10] + [("stats", "Tensor")] + args[10:]
    assert [str(r.type) for r in ours.returns] == [str(theirs.returns[0].type)]  # y; counts added
    assert [a.name for a in ours.arguments if a.alias_info and a.alias_info.is_write] == ["stats"]

    ffn = make_ffn(3, 32, 64, 16, gated=True, biases=True, seed=6)
    stats = torch.tensor([5.0, 1.0], dtype=torch.float64, device=ffn["x"].device)
    for _ in range(2):
        y = torch.ops.ppcompile.sparse_ffn_triton(*ffn.values(), tau_tensor(0.7), stats, "silu",
                                                  16, "prunepath")
    y_ref, counts_ref = sparse_ffn_reference(**ffn, tau=tau_tensor(0.7), activation="silu",
                                             expert_size=16)
    assert torch.allclose(y, y_ref, atol=1e-4)
    assert stats.tolist() == [5.0 + 2 * counts_ref[0].item(), 1.0 + 2 * 3]  # added, twice


@native_only
@pytest.mark.parametrize("n", [1, 8, 40])
def test_torch_compile_sees_the_kernels(n, monkeypatch):
    """Inductor traces the triton_op body (no graph break) and gives the eager result."""
    from ppcompile.kernels import gpu_op  # noqa: F401

    monkeypatch.setattr(triton_ffn, "_empty", _REAL_EMPTY)  # poisoning would be traced too

    ffn = make_ffn(n, 64, 128, 16, gated=True, biases=True, dtype=torch.bfloat16, seed=8)
    tau = tau_tensor(0.7)

    def f(*args, stats):
        return torch.ops.ppcompile.sparse_ffn_triton(*args, tau, stats, "silu", 16, "prunepath")

    eager_stats, compiled_stats = (zero_stats(ffn) for _ in range(2))
    eager = f(*ffn.values(), stats=eager_stats)
    compiled = torch.compile(f, fullgraph=True)(*ffn.values(), stats=compiled_stats)
    assert torch.equal(compiled_stats, eager_stats) and eager_stats[1] == n
    assert torch.allclose(compiled.float(), eager.float(), atol=1e-2, rtol=1e-2)


@native_only
@pytest.mark.parametrize("listed", [False, True], ids=["default", "listed"])
@pytest.mark.parametrize("n", [1, 8, 16])  # past DENSE_ABOVE the op is the reference's torch ops
def test_inductor_adds_no_kernels(n, listed, monkeypatch):
    """Inductor's mutation analysis must see that the kernels write only their own buffers and
    the statistics: otherwise it clones inputs (tau, weights) before every call, in kernels of
    its own, or copies the statistics back after it. With the residual add a decoder block puts
    after an FFN, Inductor adds exactly that add. "listed": the selection kernels' list of kept
    experts (past LIST_ABOVE experts by default; forced here on a small FFN)."""
    import re

    from torch._inductor.utils import run_and_get_code

    from ppcompile.kernels import gpu_op  # noqa: F401

    monkeypatch.setattr(triton_ffn, "_empty", _REAL_EMPTY)  # poisoning would add fill kernels
    if listed:
        default_plan = triton_ffn.plan

        def listing_plan(n_tokens, *args, **kwargs):
            select = "pairwise" if n_tokens <= 2 else "sorted"
            return default_plan(n_tokens, *args, **{**kwargs, "select": select, "up_list": True})
        monkeypatch.setattr(triton_ffn, "plan", listing_plan)

    ffn = make_ffn(n, 64, 128, 16, gated=True, biases=True, dtype=torch.bfloat16, seed=12)
    tau = tau_tensor(0.7)

    stats = zero_stats(ffn)

    def f(x, *rest):
        y = torch.ops.ppcompile.sparse_ffn_triton(x, *rest, tau, stats, "silu", 16, "prunepath")
        return x + y

    out, codes = run_and_get_code(torch.compile(f, fullgraph=True), *ffn.values())
    code = "\n".join(codes)
    assert "extern_kernels." not in code and ".copy_(" not in code
    own = set(re.findall(r"def (triton_(?:poi|per|red)_\w+)\(", code))
    assert len(own) == 1 and "add" in own.pop(), f"Inductor's kernels around the op: {own}"
    assert stats[1] == n, "the statistics were not added in place"
    y = torch.ops.ppcompile.sparse_ffn_triton(*ffn.values(), tau, stats, "silu", 16, "prunepath")
    assert torch.allclose(out.float(), (ffn["x"] + y).float(), atol=1e-2, rtol=1e-2)


@native_only
@pytest.mark.parametrize("n, method", [(1, "prunepath"), (8, "prunepath"), (40, "prunepath"),
                                       (1, "topk"), (40, "topk"), (40, "static")])
def test_cuda_graph_replay_follows_tau(n, method):
    """tau is read on the device only: a captured graph follows in-place changes of it."""
    from ppcompile.kernels import gpu_op  # noqa: F401

    ffn = make_ffn(n, 64, 128, 16, gated=True, biases=True, dtype=torch.bfloat16, seed=10)
    tau = tau_tensor(0.9)
    op = torch.ops.ppcompile.sparse_ffn_triton
    stats, stats_eager = zero_stats(ffn), zero_stats(ffn)
    op(*ffn.values(), tau, stats, "silu", 16, method)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = op(*ffn.values(), tau, stats, "silu", 16, method)
    for value in (0.9, 0.2, 1.0):
        tau.fill_(value)
        stats.zero_()
        stats_eager.zero_()
        graph.replay()
        y_eager = op(*ffn.values(), tau, stats_eager, "silu", 16, method)
        assert torch.equal(stats, stats_eager)
        assert torch.allclose(y.float(), y_eager.float(), atol=1e-2, rtol=1e-2)
