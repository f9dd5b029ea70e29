"""Layer-by-layer trace of a torch module against a Paddle layer: where does a port first diverge?

Hooks on every module of both sides record, for each call in execution order, the module's forward
output (and its input), the gradient that arrives at that output in the backward pass, and after the step
the gradients of the module's own parameters and its own state (parameters and buffers, e.g. BN running
statistics and the momentum encoder after its update). Modules are matched by their path in the module
tree (``blocks.1.attn``), calls by their index (a module called twice, e.g. a ReLU or an encoder applied to
two views, has calls #0 and #1).

The first divergent module is found in this order, and is named even when the error later spreads to
every module after it:
1. forward: the first call, in completion order (inner modules complete before their parents), whose output
   leaves tolerance. If that call's input already differed, the error came from code its parent runs
   between its children (e.g. an attention scale); the trace then names the innermost enclosing module
   whose input still agreed.
2. backward (only when every forward output agrees): in backward order (the reverse of the forward order),
   the first module whose own parameter gradients, or the gradient arriving at its output, leave tolerance.
3. state (only when forward and backward agree): the first module, in forward order, whose own
   parameters or buffers differ after the step (e.g. a biased BN running variance).

Errors are the relative L2 error ||p - t|| / ||t|| and the max abs error, the torch side being the
reference; the tolerances are the harness's (parity/compare.py: float64 1e-10; float32 1e-4 forward and
state, 1e-3 gradients). A NaN/inf on either side always leaves tolerance. ``atol`` rescues a tensor only
where the reference itself is at the noise floor (max |ref| <= atol), as in every comparison of the harness.
"""
import json
import math
from dataclasses import asdict, dataclass, field

import numpy as np

from .compare import ATOL, TOL, _json_float, max_abs, nonfinite, rel_l2


# ------------------------------------------------------------------------------------------ records
@dataclass
class Call:
    path: str
    index: int          # the module's call number (0 for its first call)
    type: str
    order: int          # completion order of the forward
    out: object = None  # numpy copy of the output (first tensor when the output is a tuple)
    inp: object = None  # numpy copy of the first tensor input
    grad: object = None  # numpy gradient arriving at the output (None: no gradient flowed there)


@dataclass
class TraceRow:
    path: str
    call: int
    type: str
    fwd_rel: float = math.nan
    fwd_abs: float = math.nan
    bwd_rel: float = None       # the gradient arriving at the output; None: no gradient flowed (no_grad)
    bwd_abs: float = None
    pgrad_rel: float = None     # the module's own parameter gradients (worst tensor); None: none
    pgrad_worst: str = ''
    state_rel: float = None     # the module's own parameters and buffers after the step; None: none
    state_worst: str = ''
    in_ok: bool = True          # the module's input agreed
    fwd_ok: bool = True
    bwd_ok: bool = True         # output gradient and own parameter gradients
    bwd_out_ok: bool = True     # output gradient alone
    state_ok: bool = True
    note: str = ''


@dataclass
class TraceResult:
    rows: list
    first: dict = None                                   # {'path', 'call', 'type', 'kind', 'detail'} or None
    only_torch: list = field(default_factory=list)       # module paths without a counterpart
    only_paddle: list = field(default_factory=list)
    ran_one_side: list = field(default_factory=list)     # 'path#call' executed on one side only
    dtype: str = 'float64'
    tol: dict = field(default_factory=dict)
    step: int = None                                     # with K steps: the first step that left tolerance

    @property
    def passed(self):
        return self.first is None

    def table(self, max_rows=None, context=4):
        return format_trace(self, max_rows=max_rows, context=context)

    def to_dict(self):
        def clean(d):
            return {k: _json_float(v) for k, v in d.items()}
        return {'passed': self.passed, 'first': self.first, 'step': self.step, 'dtype': self.dtype, 'tol': self.tol,
                'only_torch': self.only_torch, 'only_paddle': self.only_paddle, 'ran_one_side': self.ran_one_side,
                'rows': [clean(asdict(r)) for r in self.rows]}

    def to_json(self, path):
        with open(path, 'w') as f:
            json.dump(self.to_dict(), f, indent=1, allow_nan=False)


# ------------------------------------------------------------------------------------------ hooks
def _first_tensor(x, kind):
    if kind == 'torch':
        import torch
        if isinstance(x, torch.Tensor):
            return x
    else:
        import paddle
        if isinstance(x, paddle.Tensor):
            return x
    if isinstance(x, (tuple, list)):
        for y in x:
            t = _first_tensor(y, kind)
            if t is not None:
                return t
    if isinstance(x, dict):
        for y in x.values():
            t = _first_tensor(y, kind)
            if t is not None:
                return t
    return None


def _np_copy(t, kind):
    if t is None:
        return None
    if kind == 'torch':
        return t.detach().cpu().numpy().copy()
    return np.array(t.numpy(), copy=True)


class _Side:
    """Hooks on every module of one side; ``calls`` in completion order."""

    def __init__(self, model, kind, path_map=None):
        self.model, self.kind = model, kind
        self.calls, self.count, self.handles = [], {}, []
        self.path_map = path_map or {}
        mods = model.named_modules() if kind == 'torch' else model.named_sublayers(include_self=True)
        self.paths = {}
        for path, mod in mods:
            path = self.path_map.get(path, path)
            if id(mod) in self.paths:  # a module registered under two names: keep the first
                continue
            self.paths[id(mod)] = path
            if kind == 'torch':
                self.handles.append(mod.register_forward_hook(self._hook))
            else:
                self.handles.append(mod.register_forward_post_hook(self._hook))

    def _hook(self, mod, inputs, output):
        path = self.paths[id(mod)]
        idx = self.count.get(path, 0)
        self.count[path] = idx + 1
        out = _first_tensor(output, self.kind)
        call = Call(path, idx, type(mod).__name__, len(self.calls), _np_copy(out, self.kind),
                    _np_copy(_first_tensor(inputs, self.kind), self.kind))
        self.calls.append(call)
        if out is not None and self._needs_grad(out):
            def grad_hook(g, call=call):
                g = _np_copy(g, self.kind)
                call.grad = g if call.grad is None else call.grad + g
            out.register_hook(grad_hook)
        return None

    def _needs_grad(self, t):
        return bool(t.requires_grad) if self.kind == 'torch' else not t.stop_gradient

    def reset(self):
        self.calls, self.count = [], {}

    def remove(self):
        for h in self.handles:
            h.remove()
        self.handles = []


# ------------------------------------------------------------------------------------------ comparison
def _cmp(a, b, tol, atol):
    """(rel, abs, ok) of Paddle ``a`` against torch reference ``b`` under the harness's rules."""
    if a is None or b is None:
        return (None, None, a is None and b is None)
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        if a.size == b.size:
            a = a.reshape(b.shape)
        else:
            return (math.inf, math.inf, False)
    if nonfinite(a) or nonfinite(b):
        return (math.nan, math.nan, False)
    r, m = rel_l2(a, b), max_abs(a, b)
    ok = r <= tol or (atol is not None and m <= atol and (float(np.max(np.abs(b))) if b.size else 0.0) <= atol)
    return (r, m, bool(ok))


def _owner(name, paths):
    """The module path owning tensor ``name`` ('blocks.0.norm1.weight' -> 'blocks.0.norm1'), '' for the root."""
    owner = name.rsplit('.', 1)[0] if '.' in name else ''
    while owner and owner not in paths:
        owner = owner.rsplit('.', 1)[0] if '.' in owner else ''
    return owner


def _per_module(p_named, t_named, paths, tol, atol):
    """{module path: (worst rel, worst tensor name, ok)} over tensors present on both sides; a failing
    tensor outranks a passing one, NaN outranks any number."""
    groups = {}
    for name in sorted(set(p_named) & set(t_named)):
        r, _, ok = _cmp(p_named[name], t_named[name], tol, atol)
        groups.setdefault(_owner(name, paths), []).append((r, name, ok))
    out = {}
    for mod, items in groups.items():
        r, name, _ = max(items, key=lambda x: (not x[2], math.isnan(x[0]), 0.0 if math.isnan(x[0]) else x[0]))
        out[mod] = (r, name, all(ok for _, _, ok in items))
    return out


def _ancestors(path):
    parts = path.split('.') if path else []
    return ['.'.join(parts[:i]) for i in range(len(parts) - 1, -1, -1)]


def compare_calls(tside, pside, tol_f, tol_b, tol_s, atol, pgrads=None, states=None):
    """TraceRows in torch completion order, the first divergence, and the unmatched modules."""
    pcalls = {(c.path, c.index): c for c in pside.calls}
    tkeys = {(c.path, c.index) for c in tside.calls}
    paths = set(tside.paths.values()) | set(pside.paths.values())
    pg = pgrads or {}
    st = states or {}
    rows = []
    for c in tside.calls:
        pc = pcalls.get((c.path, c.index))
        if pc is None:
            continue
        row = TraceRow(c.path, c.index, c.type if c.type == pc.type else f'{c.type}/{pc.type}')
        row.fwd_rel, row.fwd_abs, row.fwd_ok = _cmp(pc.out, c.out, tol_f, atol)
        if c.inp is not None and pc.inp is not None:
            row.in_ok = _cmp(pc.inp, c.inp, tol_f, atol)[2]
        if c.grad is not None or pc.grad is not None:
            row.bwd_rel, row.bwd_abs, row.bwd_ok = _cmp(pc.grad, c.grad, tol_b, atol)
            row.bwd_out_ok = row.bwd_ok
            if c.grad is None or pc.grad is None:
                row.note = 'gradient on one side only'
        if c.index == 0 and c.path in pg:
            row.pgrad_rel, row.pgrad_worst, ok = pg[c.path]
            row.bwd_ok = row.bwd_ok and ok
        if c.index == 0 and c.path in st:
            row.state_rel, row.state_worst, row.state_ok = st[c.path]
        rows.append(row)
    first = _first_divergence(rows, paths, [c for c in tside.calls if (c.path, c.index) in pcalls])
    both = set(tside.paths.values()) & set(pside.paths.values())  # modules without counterpart are listed apart
    ran_one = sorted(f'{p}#{i}' for p, i in (tkeys ^ set(pcalls)) if p in both)
    return rows, first, ran_one


def _consumer(rows, tcalls, i):
    """The index of the module call that consumed row i's output: the next call (completion order) that
    is not an ancestor and whose recorded torch input equals row i's torch output."""
    out = tcalls[i].out
    if out is None:
        return None
    for j in range(i + 1, len(rows)):
        if rows[i].path.startswith(rows[j].path + '.') or rows[j].path == '':
            continue
        inp = tcalls[j].inp
        if inp is not None and inp.shape == out.shape and np.array_equal(inp, out):
            return j
    return None


def _first_divergence(rows, paths, tcalls):
    by_key = {(r.path, r.call): r for r in rows}
    for r in rows:  # 1. forward, completion order
        if r.fwd_ok:
            continue
        origin, why = r, 'its output leaves tolerance while its input agrees'
        if not r.in_ok:  # the error entered before this call: in the parent's own code between its children
            for anc in _ancestors(r.path):
                a = by_key.get((anc, r.call)) or by_key.get((anc, 0))
                if a is not None and a.in_ok and not a.fwd_ok:
                    origin, why = a, (f'its input agrees; the first divergent output inside it is '
                                      f'{r.path}#{r.call}, whose input already differed (code of {anc or "(model)"})')
                    break
            else:
                why = 'its input already differed (no enclosing module with an agreeing input)'
        return {'path': origin.path, 'call': origin.call, 'type': origin.type, 'kind': 'forward',
                'rel': origin.fwd_rel, 'detail': why}
    for i in range(len(rows) - 1, -1, -1):  # 2. backward, backward order
        r = rows[i]
        if r.bwd_ok:
            continue
        if r.bwd_out_ok:  # the gradient arriving here agrees: this module's own backward is wrong
            return {'path': r.path, 'call': r.call, 'type': r.type, 'kind': 'backward', 'rel': r.pgrad_rel,
                    'detail': f'gradient of its parameter {r.pgrad_worst}; the gradient arriving at its output agrees'}
        c = _consumer(rows, tcalls, i)
        if c is not None and rows[c].bwd_rel is not None and rows[c].bwd_out_ok:
            rc = rows[c]
            return {'path': rc.path, 'call': rc.call, 'type': rc.type, 'kind': 'backward', 'rel': r.bwd_rel,
                    'detail': f'the gradient it passes back to its input ({r.path or "(model)"} output) leaves '
                              f'tolerance while the gradient arriving at its own output agrees'}
        return {'path': r.path, 'call': r.call, 'type': r.type, 'kind': 'backward', 'rel': r.bwd_rel,
                'detail': 'gradient arriving at its output (the module consuming it not identified)'}
    for r in rows:  # 3. state after the step
        if not r.state_ok:
            return {'path': r.path, 'call': r.call, 'type': r.type, 'kind': 'state', 'rel': r.state_rel,
                    'detail': f'{r.state_worst} differs after the step'}
    return None


# ------------------------------------------------------------------------------------------ table
def _f(x):
    if x is None:
        return '-'
    return 'nan' if isinstance(x, float) and math.isnan(x) else f'{x:.2e}'


def format_trace(res, max_rows=None, context=4):
    """A compact table: module path (#call), type, forward rel/abs, backward rel/abs, param-grad and state
    rel; '<<' marks the first divergent module, '!' any other row out of tolerance. ``max_rows``: show only
    the rows up to the first divergence plus ``context`` after it (all when None or when it passes)."""
    lines = []
    head = (f"{'module (#call)':<44} {'type':<22} {'fwd rel':>9} {'fwd abs':>9} {'bwd rel':>9} {'bwd abs':>9} "
            f"{'pgrad rel':>9} {'state rel':>9}")
    lines += [head, '-' * len(head)]
    rows = res.rows
    fk = (res.first['path'], res.first['call']) if res.first else None
    stop, shown = len(rows), list(range(len(rows)))
    if max_rows is not None and fk is not None:
        idx = next((i for i, r in enumerate(rows) if (r.path, r.call) == fk), len(rows) - 1)
        stop = min(len(rows), max(idx + 1 + context, max_rows))
        shown = list(range(stop))
        if stop > max_rows:  # the head of the table, then the rows leading to the first divergence
            head_n = max(max_rows // 4, 1)
            shown = list(range(head_n)) + [None] + list(range(max(head_n, stop - (max_rows - head_n)), stop))
    for i in shown:
        if i is None:
            lines.append('...')
            continue
        r = rows[i]
        bad = not (r.fwd_ok and r.bwd_ok and r.state_ok)
        mark = '  << FIRST DIVERGENCE' if (r.path, r.call) == fk else ('  !' if bad else '')
        name = (r.path or '(model)') + (f' #{r.call}' if r.call else '')
        lines.append(f'{name[-44:]:<44} {r.type[:22]:<22} {_f(r.fwd_rel):>9} {_f(r.fwd_abs):>9} {_f(r.bwd_rel):>9} '
                     f'{_f(r.bwd_abs):>9} {_f(r.pgrad_rel):>9} {_f(r.state_rel):>9}{mark}')
    if stop < len(rows):
        more = sum(not (r.fwd_ok and r.bwd_ok and r.state_ok) for r in rows[stop:])
        lines.append(f'... {len(rows) - stop} more module calls ({more} of them out of tolerance); --json has all')
    lines.append(summary_line(res))
    if res.only_torch or res.only_paddle:
        lines.append(f'modules without counterpart ({len(res.only_torch)} torch, {len(res.only_paddle)} paddle; all '
                     f'in --json): torch only {", ".join(compress_paths(res.only_torch)) or "-"}; paddle only '
                     f'{", ".join(compress_paths(res.only_paddle)) or "-"}')
    if res.ran_one_side:
        lines.append(f'module calls made on one side only: {", ".join(compress_paths(res.ran_one_side))}')
    return '\n'.join(lines)


def summary_line(res):
    tol = ', '.join(f'{k} {v:.0e}' for k, v in res.tol.items())
    if res.first is None:
        return f'trace: every matched module within tolerance ({len(res.rows)} module calls; {tol})'
    f = res.first
    step = f' at step {res.step}' if res.step is not None else ''
    return (f"FIRST DIVERGENCE{step}: {f['path'] or '(model)'}" + (f" #{f['call']}" if f['call'] else '')
            + f" ({f['type']}), {f['kind']}, rel {_f(f['rel'])}: {f['detail']} ({tol})")


# ------------------------------------------------------------------------------------------ entry points
def tolerances(dtype):
    t = TOL[dtype]
    return {'forward': t['output'], 'backward': t['grad'], 'state': t['state']}


class Tracer:
    """Hooks on both sides for as long as it lives (``close()`` removes them). Between ``reset()`` and
    ``result()`` run one step on each side (forward and backward)."""

    def __init__(self, torch_module, paddle_layer, dtype='float64', module_map=None, state_map=None):
        self.tside = _Side(torch_module, 'torch')
        self.pside = _Side(paddle_layer, 'paddle', module_map)
        self.tmod, self.pmod = torch_module, paddle_layer
        self.dtype = dtype
        self.state_map = state_map or _auto_names
        self.tol = tolerances(dtype)
        self.atol = ATOL[dtype]

    def reset(self):
        self.tside.reset()
        self.pside.reset()

    def param_grads(self):
        t = self.state_map({k: p.grad.detach().cpu().numpy() for k, p in self.tmod.named_parameters()
                            if p.grad is not None})
        p = {k: np.asarray(v.grad.numpy()) for k, v in self.pmod.named_parameters() if v.grad is not None}
        return p, t

    def states(self):
        t = {k: v.detach().cpu().numpy() for k, v in self.tmod.state_dict().items()}
        t = self.state_map({k: v for k, v in t.items() if v.dtype.kind == 'f'})
        p = {k: np.asarray(v.numpy()) for k, v in self.pmod.state_dict().items()}
        return p, t

    def result(self, param_grads=None, states=None):
        """Compare the recorded calls; ``param_grads``/``states``: (paddle, torch) name -> array dicts
        (default: read now from the models)."""
        paths = set(self.tside.paths.values()) | set(self.pside.paths.values())
        pg_p, pg_t = param_grads if param_grads is not None else self.param_grads()
        st_p, st_t = states if states is not None else self.states()
        pg = _per_module(pg_p, pg_t, paths, self.tol['backward'], self.atol)
        st = _per_module(st_p, st_t, paths, self.tol['state'], self.atol)
        rows, first, ran_one = compare_calls(self.tside, self.pside, self.tol['forward'], self.tol['backward'],
                                             self.tol['state'], self.atol, pg, st)
        tp, pp = set(self.tside.paths.values()), set(self.pside.paths.values())
        return TraceResult(rows, first, sorted(tp - pp), sorted(pp - tp), ran_one, self.dtype, dict(self.tol))

    def close(self):
        self.tside.remove()
        self.pside.remove()


def _auto_names(torch_named):
    """torch names/layouts -> Paddle's (convert.keymap: BN buffer names, Linear weights transposed)."""
    from convert.keymap import torch_to_paddle
    return torch_to_paddle(dict(torch_named))[0]


def move_weights(torch_module, paddle_layer, key_map):
    """Copy the torch weights into the Paddle layer. key_map: 'auto' (convert.keymap's renaming: BN buffers,
    Linear weights transposed), a dict torch name -> Paddle name (a 2-D array is transposed where the Paddle
    tensor has the transposed shape), or a callable taking the torch name -> array dict and returning the
    Paddle one. Every Paddle tensor must receive a value (KeyError naming the missing ones)."""
    import paddle
    tsd = {k: v.detach().cpu().numpy() for k, v in torch_module.state_dict().items()}
    target = paddle_layer.state_dict()
    if key_map == 'auto':
        psd = _auto_names(tsd)
    elif callable(key_map):
        psd = key_map(tsd)
    else:
        layers = dict(paddle_layer.named_sublayers())
        psd = {}
        for tk, pk in key_map.items():
            v = tsd[tk]
            owner = layers.get(pk.rsplit('.', 1)[0]) if '.' in pk else None
            if v.ndim == 2 and isinstance(owner, paddle.nn.Linear):
                v = v.T  # torch Linear weight [out, in] -> Paddle [in, out]
            psd[pk] = v
    missing = sorted(set(target) - set(psd))
    if missing:
        raise KeyError(f'key_map gives no value for {len(missing)} Paddle tensor(s): {missing[:8]}')
    for k, t in target.items():
        v = np.asarray(psd[k])
        if tuple(v.shape) != tuple(t.shape):
            raise ValueError(f'key_map: {k} has shape {tuple(v.shape)} for a Paddle tensor of shape {tuple(t.shape)}')
        t.set_value(paddle.to_tensor(v).astype(t.dtype))


def _default_loss(out, kind, seed=0):
    """A fixed random projection of the output, so that every output element gets a distinct gradient."""
    shape = tuple(out.shape)
    if len(shape) == 0 or int(np.prod(shape)) == 1:
        return out.sum()
    r = np.random.default_rng(seed).standard_normal(shape)
    if kind == 'torch':
        import torch
        return (out * torch.from_numpy(r).to(out.dtype)).sum()
    import paddle
    return (out * paddle.to_tensor(r).astype(out.dtype)).sum()


def _to_side(x, kind):
    if isinstance(x, np.ndarray):
        if kind == 'torch':
            import torch
            return torch.from_numpy(x.copy())
        import paddle
        return paddle.to_tensor(x)
    return x


def trace(torch_module, paddle_layer, inputs, key_map=None, loss_fn=None, module_map=None, dtype=None,
          state_map=None):
    """Trace one forward + backward of ``torch_module`` against ``paddle_layer`` (any model pair).

    inputs: a numpy array or a tuple of arguments (numpy arrays become tensors on each side; other values
    pass as they are). key_map: None (the weights are already equal), 'auto', a dict torch name -> Paddle
    name, or a callable (see ``move_weights``). loss_fn: None (the output itself when it is a scalar, else a
    fixed random projection of it), a callable used on both sides, or a pair (torch_fn, paddle_fn).
    module_map: Paddle module path -> torch module path, where names differ. dtype: 'float64' or 'float32'
    tolerances (default: the dtype of the first array input). state_map: torch name -> Paddle name for
    the parameter gradients and states (default: 'auto' renaming). Returns a TraceResult: ``.first`` the
    first divergent module (None: none), ``.table()``, ``.to_json(path)``, ``.only_torch``/``.only_paddle``
    the modules without a counterpart."""
    if not isinstance(inputs, (tuple, list)):
        inputs = (inputs,)
    if dtype is None:
        arr = next((x for x in inputs if isinstance(x, np.ndarray)), None)
        dtype = 'float64' if arr is None or arr.dtype == np.float64 else 'float32'
    if key_map is not None:
        move_weights(torch_module, paddle_layer, key_map)
    if isinstance(loss_fn, (tuple, list)):
        tloss, ploss = loss_fn
    else:
        tloss = ploss = loss_fn
    for p in torch_module.parameters():  # every trace starts without gradients
        p.grad = None
    paddle_layer.clear_gradients(set_to_zero=False)
    tr = Tracer(torch_module, paddle_layer, dtype, _invert(module_map), state_map)
    try:
        tr.reset()
        out = torch_module(*[_to_side(x, 'torch') for x in inputs])
        loss = tloss(out) if tloss else _default_loss(_first_tensor(out, 'torch'), 'torch')
        if loss.requires_grad:
            loss.backward()
        out = paddle_layer(*[_to_side(x, 'paddle') for x in inputs])
        loss = ploss(out) if ploss else _default_loss(_first_tensor(out, 'paddle'), 'paddle')
        if not loss.stop_gradient:
            loss.backward()
        return tr.result()
    finally:
        tr.close()


def _invert(module_map):
    """Paddle path -> torch path (given) is applied to the Paddle side's names."""
    return dict(module_map) if module_map else None


# ------------------------------------------------------------------------------------------ MoCo scenarios
def trace_moco(pair, dtype='float64', batch=8, img_size=32, seed=0, m=0.99):
    """Trace one MoCo training forward/backward (momentum update inside forward) of a model pair."""
    import paddle
    import torch

    from .scenarios import inputs
    tmod, pmod = pair
    tmod.train()
    pmod.train()
    x1, x2 = inputs(dtype, batch, img_size, seed)
    tr = Tracer(tmod, pmod, dtype)
    try:
        tr.reset()
        tmod(torch.from_numpy(x1), torch.from_numpy(x2), m).backward()
        pmod(paddle.to_tensor(x1), paddle.to_tensor(x2), m).backward()
        return tr.result()
    finally:
        tr.close()


def trace_moco_steps(pair, arch, optimizer, steps, dtype='float64', img_size=32, batch=8, seed=0, lr=None, wd=None,
                     epochs=4, warmup_epochs=1, iters_per_epoch=4, momentum=0.9, moco_m=0.99, torch_optimizer=None):
    """K training iterations as parity/steps.py runs them (the Paddle side is the product's
    engine.moco_step), traced step by step; returns the trace of the first step that leaves tolerance
    (``.step``), or of the last step when none does."""
    import paddle
    import torch

    from paddle_impl import engine
    from torch_ref import optimizer as toptim
    from torch_ref import schedules as tsched
    from .steps import DEFAULTS, batches
    tmod, pmod = pair
    tmod.train()
    pmod.train()
    dlr, dwd = DEFAULTS[optimizer]
    lr = dlr if lr is None else lr
    wd = dwd if wd is None else wd
    base_lr = lr * 256 / batch
    lr_t = tsched.scaled_lr(base_lr, batch)
    topt = (torch_optimizer or toptim.build_optimizer)(optimizer, tmod.parameters(), lr_t, wd, momentum)
    popt, scaler, lr_p = engine.moco_training_setup(pmod, optimizer, base_lr, batch, wd, momentum)
    tr = Tracer(tmod, pmod, dtype)
    res = None
    try:
        for i, (x1, x2) in enumerate(batches(steps, batch, img_size, dtype, seed)):
            e = i / iters_per_epoch
            tr.reset()
            tsched.adjust_learning_rate(topt, e, lr_t, warmup_epochs, epochs)
            loss = tmod(torch.from_numpy(x1), torch.from_numpy(x2), tsched.adjust_moco_momentum(e, moco_m, epochs))
            topt.zero_grad()
            loss.backward()
            topt.step()
            grads = {}

            def before_update(_opt):  # the product's step releases the gradients after the update
                grads['both'] = tr.param_grads()  # torch's: its step is done, they stay on its parameters
            engine.moco_step(pmod, paddle.to_tensor(x1), paddle.to_tensor(x2), popt, scaler, e=e, lr=lr_p,
                             epochs=epochs, warmup_epochs=warmup_epochs, moco_m=moco_m, moco_m_cos=True,
                             before_update=before_update)
            res = tr.result(param_grads=grads['both'])  # states: after the step on both sides
            res.step = i
            if not res.passed:
                break
        return res
    finally:
        tr.close()


def compress_paths(paths):
    """['blocks.0.ls1', 'blocks.1.ls1', ...] -> ['blocks.*.ls1 (x2)', ...] for a short listing."""
    import re
    groups = {}
    for p in paths:
        groups.setdefault(re.sub(r'\.\d+(?=\.|$)', '.*', p), []).append(p)
    return [k + (f' (x{len(v)})' if len(v) > 1 else '') for k, v in groups.items()]
