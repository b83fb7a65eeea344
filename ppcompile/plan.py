"""Plans: what calibration produced (neuron order, routers, layer budgets as per-FFN tau tables,
router temperatures per tau, the options that made them), saved to one safetensors file with a
JSON header, and tied to the weights they were made for.

Tying a plan to weights must survive our own in-place permutation, so each FFN is identified by
its per-neuron weight sums ("columns": up row, gate row, down column and bias sums per neuron);
sorted, they are a signature invariant under neuron order. Loading a plan compares signatures with
a tolerance (sums differ in the last bits between devices), then finds the order the weights are
in from the unsorted columns (the original order, the plan's, e.g. weights saved after a compile,
or any other), so the plan's order is reached whatever order they were saved in. The cache is
keyed by a hash of the compiled graph (graph_fingerprint: its structure, the FFNs' signatures
whole, the other weights by their shapes and a strided sample of their values), then by the plan
options, the planning code's version and a hash of the calibration data (cache_path).
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .options import OptionError

# /2 added the per-FFN tau tables, /3 the router temperature tables, /4 stores each FFN's neuron
# columns in the plan's order (before: sorted, so the weights' order could not be checked)
FORMAT = "ppcompile-plan/4"
# a /1 plan has no tables: every FFN runs at the model's tau; /1 and /2 routers have temperature 1
READABLE = ("ppcompile-plan/1", "ppcompile-plan/2", "ppcompile-plan/3", FORMAT)
ORDERED = (FORMAT,)  # formats whose columns are in the plan's neuron order

# the code that makes a plan: an edit to any of it can change the plan for the same weights
PLANNER_SOURCES = ("ffn.py", "kernels/reference.py", "passes/calibrate.py", "passes/build_experts.py",
                   "passes/train_routers.py", "passes/distill_routers.py",
                   "passes/choose_temperature.py")


@functools.cache
def planner_version() -> str:
    """A hash of the planning code's source. The cache is keyed by it, so that a cached plan made
    by other calibration code (an upgrade, an edit) is not reused as if this code had made it."""
    h = hashlib.sha256()
    root = Path(__file__).parent
    for name in PLANNER_SOURCES:
        h.update(name.encode() + b"\0" + (root / name).read_bytes())
    return h.hexdigest()[:10]


def neuron_columns(weights: dict) -> torch.Tensor:
    """[d_ff, k] float64: per neuron, in the weights' current order, the sums of its up/gate rows,
    down column and biases."""
    cols = [weights["w_up"].sum(1)]
    if weights["w_gate"] is not None:
        cols.append(weights["w_gate"].sum(1))
    cols.append(weights["w_down"].sum(0))
    for key in ("b_up", "b_gate"):
        if weights[key] is not None:
            cols.append(weights[key])
    return torch.stack([c.detach().double().cpu() for c in cols], 1)


def neuron_signature(weights: dict) -> torch.Tensor:
    """The neuron columns, each sorted: the same FFN in any neuron order gives the same matrix."""
    return sorted_columns(neuron_columns(weights))


def sorted_columns(columns: torch.Tensor) -> torch.Tensor:
    return columns.sort(0).values


def same_signature(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Signatures of the same weights up to rounding (another device, dtype or summation order):
    every sorted column within 5% of its RMS. Different weights miss this by far."""
    return a.shape == b.shape and same_columns(a, b)


def same_columns(a: torch.Tensor, b: torch.Tensor) -> bool:
    rms = b.square().mean(0).sqrt().clamp_min(1e-12)
    return bool(((a - b).abs() <= 0.05 * rms).all())


def order_of(columns: torch.Tensor, planned: torch.Tensor, perm: torch.Tensor) -> torch.Tensor | None:
    """The neuron order of weights with these columns, relative to the original order (as `perm`
    is), given the columns of the same FFN in the plan's order `perm`: `perm` itself (the weights
    were saved after a compile), the identity (the original order), or any other order the
    columns match; None where no order matches (other weights)."""
    if columns.shape != planned.shape:
        return None
    if same_columns(columns, planned):
        return perm.clone()
    original = planned[torch.argsort(perm)]
    if same_columns(columns, original):
        return torch.arange(len(perm))
    # any other order: neurons paired by rank, lexicographically over the columns (ties in one
    # column, such as dead neurons' zero sums, are broken by the next)
    order = torch.empty_like(perm)
    order[_lexsort(columns)] = _lexsort(original)
    return order if same_columns(columns, original[order]) else None


def trained_in_place(columns: torch.Tensor, planned: torch.Tensor, perm: torch.Tensor) -> bool:
    """Whether weights that match their plan in no order (order_of is None) are its own weights
    moved by training in place: clearly closer to the plan's columns in the plan's order than in
    the original one, where load_state_dict would write a checkpoint's. Unrelated weights are as
    far from either (relative error ~1.4, to a few percent); a checkpoint of this model is closer
    in the original order. Training a tiny model at lr 1e-3 for 30 Adam steps moved the columns
    by ~0.95 of their norm, against ~1.7 in the original order."""
    if columns.shape != planned.shape:
        return False
    original = planned[torch.argsort(perm)]
    in_plan = (columns - planned).norm() / planned.norm().clamp_min(1e-12)
    in_original = (columns - original).norm() / original.norm().clamp_min(1e-12)
    return bool(in_plan < 0.75 * in_original)


def _lexsort(columns: torch.Tensor) -> torch.Tensor:
    idx = torch.arange(columns.shape[0])
    for c in reversed(range(columns.shape[1])):
        idx = idx[torch.argsort(columns[idx, c], stable=True)]
    return idx


def graph_fingerprint(tensors, signatures, structure: str = "") -> str:
    """Hash of a compiled graph's weights: FFN signatures plus the other parameters' shapes and
    a strided sample of 4096 of each one's values (enough to tell models apart: fine-tuning
    moves nearly every value; cheap for large ones, and on any device), and
    the graph's `structure` (its operations: the same weights in another architecture, such as a
    parallel residual, feed the FFNs other inputs and need their own plan)."""
    h = hashlib.sha256(structure.encode())
    for sig in signatures:
        h.update(sig.float().numpy().tobytes())
    for t in tensors:
        flat = t.detach().reshape(-1)
        step = max(1, flat.numel() // 4096)
        h.update(str((tuple(t.shape), str(t.dtype))).encode())
        h.update(flat[::step].float().cpu().numpy().tobytes())
    return h.hexdigest()[:24]


def save(path, states, fingerprint: str, options: dict, calibration: dict | None = None):
    """Write a plan. `states` are SparseFFN objects carrying `signature`."""
    tensors, ffns = {}, []
    for i, s in enumerate(states):
        router_w, router_b = s.router_at_one()
        tensors.update({f"{i}.perm": s.perm.cpu().contiguous(),
                        f"{i}.router_w": router_w.detach().float().cpu().contiguous(),
                        f"{i}.router_b": router_b.detach().float().cpu().contiguous(),
                        f"{i}.static_scores": s.static_scores.float().cpu().contiguous(),
                        f"{i}.signature": s.signature.contiguous()})
        for table in ("tau_table", "temperature_table"):
            if getattr(s, table) is not None:
                tensors[f"{i}.{table}"] = getattr(s, table).float().cpu().contiguous().clone()
        ffns.append(dict(name=s.name, kind=s.kind, activation=s.activation, d_model=s.d_model,
                         d_ff=s.d_ff, expert_size=s.expert_size))
    header = dict(format=FORMAT, planner=planner_version(), fingerprint=fingerprint,
                  options=options, ffns=ffns, calibration=calibration or {})
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"save_plan: {str(path)!r} is a directory; give a file path, "
                                "e.g. its 'plan.safetensors'")
    path.parent.mkdir(parents=True, exist_ok=True)
    # a temporary name of this writer's own (processes sharing a cache may write the same plan),
    # renamed into place: readers never see half a file
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={"ppcompile": json.dumps(header)})
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def load(path) -> tuple[dict, dict]:
    """(header, tensors) of a plan file; refuses files that are not ppcompile plans."""
    path = Path(path)
    if not path.is_file():
        raise OptionError(f"option 'plan': no plan file at {str(path)!r}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as err:
        raise OptionError(f"option 'plan': {str(path)!r} is not a readable plan file ({err})") from err
    try:
        header = json.loads(meta.get("ppcompile", "{}"))
    except json.JSONDecodeError as err:
        raise OptionError(f"option 'plan': {str(path)!r} has a plan header that is not JSON "
                          f"({err})") from err
    if not isinstance(header, dict) or header.get("format") not in READABLE:
        raise OptionError(f"option 'plan': {str(path)!r} is not a {FORMAT} file")
    missing = [key for key in ("ffns", "options") if key not in header]
    if missing:
        raise OptionError(f"option 'plan': {str(path)!r} is damaged: its header has no "
                          f"{' or '.join(map(repr, missing))}")
    problem = _damage(header, tensors)
    if problem:
        raise OptionError(f"option 'plan': {str(path)!r} is damaged: {problem}")
    return header, tensors


ENTRY_FIELDS = ("name", "kind", "activation", "d_model", "d_ff", "expert_size")


def _damage(header, tensors) -> str | None:
    """What makes a plan's header and tensors disagree (a hand-edited or truncated file), or
    None: every FFN entry complete, its tensors present and of the shapes its sizes imply."""
    if not isinstance(header["options"], dict) or not isinstance(header["ffns"], list):
        return "its header's 'options' is not a mapping or its 'ffns' not a list"
    for i, entry in enumerate(header["ffns"]):
        if not isinstance(entry, dict) or any(k not in entry for k in ENTRY_FIELDS):
            return f"FFN entry {i} lacks one of {', '.join(ENTRY_FIELDS)}"
        d, d_ff, size = entry["d_model"], entry["d_ff"], entry["expert_size"]
        if not all(isinstance(v, int) and v > 0 for v in (d, d_ff, size)) or d_ff % size:
            return f"FFN entry {i} ({entry['name']!r}) has sizes d_model={d}, d_ff={d_ff}, " \
                   f"expert_size={size}"
        experts = d_ff // size
        shapes = {"perm": (d_ff,), "router_w": (experts, d), "router_b": (experts,),
                  "static_scores": (experts,), "signature": None}
        for name, shape in shapes.items():
            tensor = tensors.get(f"{i}.{name}")
            if tensor is None:
                return f"tensor '{i}.{name}' of FFN {entry['name']!r} is missing"
            if shape is not None and tuple(tensor.shape) != shape:
                return (f"tensor '{i}.{name}' of FFN {entry['name']!r} has shape "
                        f"{tuple(tensor.shape)}, not {shape}")
    return None


def cache_dir() -> Path:
    # an empty value is unset; "~" is the user's home, as in a shell
    return Path(os.environ.get("PPCOMPILE_CACHE_DIR")
                or Path.home() / ".cache" / "ppcompile" / "plans").expanduser()


def _key(plan_key: tuple) -> str:
    # format and planner versions lead the name, so that plans made by other code are not reused
    return "-".join(map(str, ("v" + FORMAT.rsplit("/", 1)[1], "p" + planner_version(), *plan_key)))


def cache_path(fingerprint: str, plan_key: tuple, calibration_hash: str) -> Path:
    key = _key(plan_key)
    return cache_dir() / fingerprint / f"{key}-{calibration_hash}.safetensors"


def cached_plan(fingerprint: str, plan_key: tuple, calibration_hash: str | None) -> Path | None:
    """The cached plan for this graph and plan options: made from this calibration data, or,
    when none is given, the newest one made from any."""
    if calibration_hash is not None:
        path = cache_path(fingerprint, plan_key, calibration_hash)
        return path if path.is_file() else None
    folder = cache_dir() / fingerprint
    key = _key(plan_key)
    found = sorted(folder.glob(f"{key}-*.safetensors"), key=lambda p: p.stat().st_mtime)
    return found[-1] if found else None


def data_hash(data: torch.Tensor | None) -> str | None:
    if data is None:
        return None
    t = data.detach().contiguous().cpu().reshape(-1)
    return hashlib.sha256(str((tuple(data.shape), str(t.dtype))).encode()
                          + t.view(torch.uint8).numpy().tobytes()).hexdigest()[:16]
