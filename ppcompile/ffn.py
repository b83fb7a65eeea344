"""What the passes know about one FFN: where it is in the graph (FFNMatch) and its runtime state
once sparsified (SparseFFN), kept per set of weights so that nothing leaks between layers."""
from __future__ import annotations

import bisect
import weakref
from dataclasses import dataclass, field

import torch
import torch.fx as fx

from .graph import Projection

GATED_KIND = {"silu": "swiglu", "gelu": "geglu", "gelu_tanh": "geglu", "relu": "reglu",
              "quick_gelu": "geglu"}


@dataclass(eq=False)
class FFNMatch:
    """An FFN found in the graph: x -> up (and gate) projection -> activation -> down projection.

    `region` holds the nodes strictly between the projections (activation, gating, reshapes);
    the rewrite removes them with the projections. `fused` is "gate_first" or "up_first" when
    gate and up are the two halves of one projection (Phi-3's gate_up_proj)."""

    name: str
    activation: str
    x: fx.Node
    up: Projection
    gate: Projection | None
    down: Projection
    region: list
    fused: str | None
    d_model: int
    d_ff: int
    state: SparseFFN | None = None  # set once the FFN has a plan (attach_plans, train_routers)
    sample: dict | None = None  # calibration sample {"x": [n, d], "h": [n, d_ff]} (calibrate)
    perm: torch.Tensor | None = None  # neuron order of the weights w.r.t. the original (build_experts)
    planned_now: bool = False  # its plan was made by this compile (train_routers)

    @property
    def gated(self) -> bool:
        return self.gate is not None or self.fused is not None

    @property
    def kind(self) -> str:
        return GATED_KIND[self.activation] if self.gated else self.activation

    def weights(self, values) -> dict:
        """The FFN's tensors in nn.Linear layout ([out, in]); views of the model's parameters,
        so writing into them writes the model."""
        up_w, up_b = self.up.weight_view(values), self.up.bias_tensor(values)
        if self.fused is not None:
            halves = (slice(0, self.d_ff), slice(self.d_ff, 2 * self.d_ff))
            g, u = halves if self.fused == "gate_first" else halves[::-1]
            gate_w, gate_b = up_w[g], None if up_b is None else up_b[g]
            up_w, up_b = up_w[u], None if up_b is None else up_b[u]
        elif self.gate is not None:
            gate_w, gate_b = self.gate.weight_view(values), self.gate.bias_tensor(values)
        else:
            gate_w = gate_b = None
        return dict(w_up=up_w, b_up=up_b, w_gate=gate_w, b_gate=gate_b,
                    w_down=self.down.weight_view(values), b_down=self.down.bias_tensor(values))

    def key_params(self, values) -> tuple:
        """The parameters that identify this FFN (its up and down weights)."""
        return values[self.up.weight], values[self.down.weight]


@dataclass(eq=False)
class SparseFFN:
    """Runtime state of one sparsified FFN: its router, tau and statistics. Owned by the registry,
    keyed by the FFN's weights, and shared by every graph that computes this FFN.

    set_tau sets the model-wide tau; "prunepath" runs each FFN at its own threshold, read off
    `tau_table` (the layer budget train_routers fitted; None: the model-wide tau), the other
    methods at the model-wide one (for "topk"/"static" it is the fraction of experts kept).
    With a `temperature_table` (choose_temperature), set_tau also sets the router's softmax
    temperature for that tau: router_w and router_b are rewritten in place as the router at
    temperature 1 (kept on the CPU) divided by it; the ranking of experts is unchanged."""

    name: str
    kind: str
    activation: str
    d_model: int
    d_ff: int
    expert_size: int
    router_w: torch.Tensor
    router_b: torch.Tensor
    static_scores: torch.Tensor  # [E] log mean share of each expert: the "static" method's ranking
    tau: torch.Tensor  # 0-d float32: this FFN's own mass threshold (what "prunepath" reads)
    tau_table: torch.Tensor | None = None  # [2, K] float32: (model-wide tau, this FFN's tau)
    # [2, K] float32: (model-wide tau, router temperature), set_tau interpolates it; router_w and
    # router_b given with it are the router at temperature 1
    temperature_table: torch.Tensor | None = None
    model_tau: torch.Tensor = field(init=False)  # 0-d float32: as set_tau set it (other methods)
    stats: torch.Tensor = field(init=False)  # float64 [2]: active neurons summed, tokens
    perm: torch.Tensor | None = None  # neuron order applied to the weights, w.r.t. the original
    signature: torch.Tensor | None = field(default=None, repr=False)  # plan.neuron_columns, plan's order
    plan_key: tuple = ()
    calibration: str | None = None  # plan.data_hash of the calibration option it was made on
    plan_file: str | None = None  # the plan file it was loaded from, if any
    # ids of the options dicts whose torch.compile calls have set tau: each sets it once, at its
    # first compile, and its recompiles keep what set_tau chose since; a state read from a plan
    # file starts with none, so the compile that adopts it sets its tau (attach_plans._adopt)
    tau_set_by: set = field(default_factory=set, repr=False)
    methods: set = field(default_factory=set, repr=False)  # of the compiled graphs that run it
    # what backend.WeightWatch last saw of the down weight, for every graph of the model
    seen_down: dict | None = field(default=None, repr=False)

    def __post_init__(self):
        self._new_call_buffers()
        self.model_tau = self.tau.clone()
        self.set_temperature_table(self.temperature_table)

    def _new_call_buffers(self):
        """Zeroed statistics and the static method's zero router, beside router_w."""
        self.stats = torch.zeros(2, dtype=torch.float64, device=self.router_w.device)
        self._static_w = torch.zeros_like(self.router_w)

    def move_to_(self, device: torch.device, dtype: torch.dtype):
        """Put the router and the per-call tensors where the FFN's weights now are (a model
        planned on the CPU, then moved with .cuda() or cast with .to(dtype): its parameters are
        the same objects, so its plan is found, in the old place). Statistics restart."""
        with torch.no_grad():
            self.router_w = self.router_w.to(device, dtype)
            self.router_b = self.router_b.to(device, dtype)
        self.static_scores = self.static_scores.to(device)
        self.tau, self.model_tau = self.tau.to(device), self.model_tau.to(device)
        self._new_call_buffers()
        REGISTRY.generation += 1  # compiled graphs holding the old tensors look them up again

    def set_temperature_table(self, table: torch.Tensor | None):
        """Give the router a temperature per model-wide tau (None: the router as it is now,
        at temperature 1); router_w and router_b must hold the router at temperature 1."""
        self.temperature_table = table
        self._router_one = None if table is None else tuple(
            t.detach().float().cpu().clone() for t in (self.router_w, self.router_b))
        self.set_tau(float(self.model_tau))

    def router_at_one(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The router at temperature 1 (what a plan stores with its temperature table)."""
        return self._router_one if self._router_one is not None else (self.router_w, self.router_b)

    def temperature(self, tau: float) -> float:
        """The router's temperature at model-wide tau (1.0 without a table)."""
        return 1.0 if self.temperature_table is None else _interpolate(self.temperature_table, tau)

    @property
    def num_experts(self) -> int:
        return self.d_ff // self.expert_size

    @property
    def keeps_all(self) -> bool:
        """Every token keeps every expert (model-wide tau >= 1, whatever the method): the
        backend then runs the dense graph, which counts nothing."""
        return self._model_tau >= 1.0

    def active_fraction(self) -> float | None:
        if self.keeps_all:
            return 1.0
        active, tokens = self.stats.tolist()
        return None if tokens == 0 else active / (tokens * self.d_ff)

    def ffn_tau(self, tau: float) -> float:
        """This FFN's threshold at model-wide tau: the table interpolated (1.0 stays 1.0)."""
        if self.tau_table is None or tau >= 1.0:
            return tau
        return min(1.0, max(0.0, _interpolate(self.tau_table, tau)))

    def set_tau(self, tau: float):
        self._model_tau = tau  # read per call by the backend: no device round trip
        self.model_tau.fill_(tau)
        self.tau.fill_(self.ffn_tau(tau))
        if self._router_one is not None:
            t = self.temperature(tau)
            with torch.no_grad():
                self.router_w.copy_(self._router_one[0] / t)
                self.router_b.copy_(self._router_one[1] / t)
        self.stats.zero_()

    def router_inputs(self, method: str) -> tuple:
        if method == "static":
            return self._static_w, self.static_scores.to(self.router_b.dtype)
        return self.router_w, self.router_b

    def tau_input(self, method: str) -> torch.Tensor:
        return self.tau if method == "prunepath" else self.model_tau


def _interpolate(table: torch.Tensor, x: float) -> float:
    """table [2, K] (increasing grid, values) read at x, linearly, clamped to its ends."""
    grid, values = table.tolist()
    i = min(max(bisect.bisect_right(grid, x), 1), len(grid) - 1)
    t = (x - grid[i - 1]) / max(grid[i] - grid[i - 1], 1e-12)
    return values[i - 1] + min(max(t, 0.0), 1.0) * (values[i] - values[i - 1])


class Registry:
    """SparseFFN states keyed by the identity of the FFN's up and down weights. An entry dies
    with its weights; a graph reused for another layer finds that layer's own state (or none)."""

    def __init__(self):
        self._states: dict[tuple[int, int], SparseFFN] = {}
        # moves on whenever a state is put, dropped or given new tensors (move_to_): a compiled
        # graph that keeps its FFNs' inputs between calls re-reads them when it has moved
        self.generation = 0

    def get(self, up_weight, down_weight) -> SparseFFN | None:
        return self._states.get((id(up_weight), id(down_weight)))

    def put(self, up_weight, down_weight, state: SparseFFN):
        key = (id(up_weight), id(down_weight))
        if key not in self._states:
            weakref.finalize(up_weight, self._states.pop, key, None)
        self._states[key] = state
        self.generation += 1

    def drop(self, up_weight, down_weight):
        self._states.pop((id(up_weight), id(down_weight)), None)
        self.generation += 1

    def states_of(self, params) -> list[SparseFFN]:
        """States whose weights are among `params`, in the order of `params`."""
        return [state for _, _, state in self.entries_of(params)]

    def entries_of(self, params) -> list[tuple]:
        """(up weight, down weight, state) for the states whose weights are among `params`."""
        params = list(params)
        by_id = {id(p): p for p in params}
        by_up = {}
        for (up, down), state in self._states.items():
            by_up.setdefault(up, []).append((down, state))
        out = []
        for p in params:
            out += [(p, by_id[down], s) for down, s in by_up.get(id(p), []) if down in by_id]
        return out


REGISTRY = Registry()
