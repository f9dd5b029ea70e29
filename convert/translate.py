"""Translation between the torch and Paddle layouts of what a checkpoint holds besides its names: the state
dict (through convert.keymap, the one map), torch's num_batches_tracked, the optimizer state and the AMP
scaler. The optimizer rules are described in convert/checkpoints.py's docstring."""
import json
import math

import numpy as np

from . import keymap
from .formats import _strip_prefixes
from .spec import is_buffer, torch_shapes_to_paddle


def paddle_state_dict(ck):
    """(Paddle-layout state dict, num_batches_tracked extras) of a Checkpoint."""
    return keymap.torch_to_paddle(ck.state_dict)


def _nbt_from_meta(meta, fmt):
    ex = meta.get('torch_extras') if meta else None
    if isinstance(ex, dict):
        return _strip_prefixes(dict(ex.get('num_batches_tracked', {})))
    if fmt == 'safetensors' and meta and 'num_batches_tracked' in meta:
        return {k: np.array(v, dtype=np.int64) for k, v in json.loads(meta['num_batches_tracked']).items()}
    return {}


# ------------------------------------------------------------------------------- optimizer and scaler

def _opt_param_names(ck, n):
    """Names of the ``n`` parameters an optimizer of ``ck`` was given, in order: model.parameters() order
    (= the official state_dict order without buffers), or the classifier alone (main_lincls)."""
    names = [k for k in ck.state_dict if not is_buffer(k)]
    if n == len(names):
        return names
    head = 'fc' if ck.arch == 'resnet50' else 'head'
    if ck.kind == 'linear' and n == 2:  # main_lincls optimises only the classifier
        return [f'{head}.weight', f'{head}.bias']
    return None


def _transposed_like(name, v, shape):
    """A state entry of Linear weight ``name`` shaped like it (shape given in the source layout) -> transposed."""
    if name.endswith('.weight') and len(shape) == 2 and isinstance(v, np.ndarray) and v.shape == tuple(shape):
        return np.ascontiguousarray(v.T)
    return v


def _optimizer_in(opt, framework, ck, args=None, global_step=None):
    """The file's optimizer state -> (torch form or None, note why it was dropped)."""
    if not isinstance(opt, dict):
        return None, f'optimizer entry is a {type(opt).__name__}; dropped'
    if framework == 'torch':
        groups, state = opt.get('param_groups'), opt.get('state')
        if not isinstance(groups, list) or not isinstance(state, dict):
            return None, 'optimizer state is not a torch optimizer state_dict; dropped'
        ids = [i for g in groups for i in g.get('params', [])]
        names = _opt_param_names(ck, len(ids))
        if len(groups) != 1 or names is None or sorted(ids) != list(range(len(ids))):
            return None, (f'optimizer with {len(groups)} param group(s) over {len(ids)} parameters: cannot tell '
                          f'which parameter each entry belongs to; dropped')
        shapes = {k: np.shape(ck.state_dict[k]) for k in names}
        for i, st in state.items():
            if not isinstance(st, dict) or not (isinstance(i, int) and 0 <= i < len(names)):
                return None, 'optimizer state entries are not per-parameter dicts; dropped'
            for v in st.values():
                if isinstance(v, np.ndarray) and v.ndim > 0 and v.shape != shapes[names[i]]:
                    return None, (f'optimizer state of parameter {i} has shape {v.shape}, not that of '
                                  f'{names[i]} {shapes[names[i]]}: its order is not the model order; dropped')
        return opt, None
    if 'accumulators' not in opt:
        return None, ("optimizer state is in Paddle's own form (keyed by run-time tensor names, which no other "
                      "process can map to parameters); dropped")
    try:
        return _optimizer_paddle_to_torch(opt, ck, args or {}, global_step), None
    except _Drop as e:
        return None, f'{e}; dropped'


class _Drop(Exception):
    pass


# torch optimizer -> the Paddle trainer's optimizer (paddle_impl.utils.optimizer_state):
# {'type', 'lr', 'accumulators': {accumulator: {parameter name: array}}}; Linear-weight states transposed.
_ACCS = {'AdamW': {'exp_avg': 'moment1', 'exp_avg_sq': 'moment2'}, 'LARS': {'mu': 'mu'},
         'Momentum': {'momentum_buffer': 'velocity'}}


def _torch_opt_type(group):
    if 'betas' in group:
        return 'AdamW' if group.get('decoupled_weight_decay', True) else None
    if 'trust_coefficient' in group:
        return 'LARS'
    if 'momentum' in group and 'nesterov' in group and not group.get('nesterov') and not group.get('dampening'):
        return 'Momentum'
    return None


def optimizer_to_paddle(ck):
    """ck.optimizer (torch form) in the Paddle trainer's form (paddle_impl.utils.load_optimizer_state reads
    it), plus a 'torch' entry that takes paddle2torch back to the original exactly."""
    opt = ck.optimizer
    group = opt['param_groups'][0]
    names = _opt_param_names(ck, len(group['params']))
    typ = _torch_opt_type(group)
    accmap = _ACCS.get(typ, {})
    shapes = {k: np.shape(ck.state_dict[k]) for k in names}
    accs, rest = {}, {}
    for i, st in opt['state'].items():
        name = names[i]
        kept = {}
        for key, v in st.items():
            if key in accmap and isinstance(v, np.ndarray):
                accs.setdefault(accmap[key], {})[name] = _transposed_like(name, v, shapes[name])
                kept[key] = '@' + accmap[key]
            else:
                kept[key] = v
        if typ == 'AdamW' and 'step' in st:  # Paddle keeps beta**(step + 1) instead of the step
            step = float(np.asarray(st['step']))
            for b, acc in zip(group['betas'], ('beta1_pow_acc', 'beta2_pow_acc')):
                accs.setdefault(acc, {})[name] = np.array([b ** (step + 1)], dtype=np.float32)
        rest[name] = kept
    out = {'type': typ or 'unknown', 'lr': float(group['lr']), 'accumulators': accs}
    out['torch'] = {'param_groups': [dict(g, params=[names[i] for i in g['params']]) for g in opt['param_groups']],
                    'state': rest}
    return out


def _optimizer_paddle_to_torch(opt, ck, args, global_step):
    accs = opt['accumulators']
    names_all = [k for k in ck.state_dict if not is_buffer(k)]
    pshapes = torch_shapes_to_paddle({k: np.shape(ck.state_dict[k]) for k in names_all})

    def acc_value(acc, name):
        try:
            return _transposed_like(name, np.asarray(accs[acc][name]), pshapes[name])
        except KeyError:
            raise _Drop(f"optimizer state lacks '{acc}' of {name}") from None

    if 'torch' in opt:  # written by torch2paddle: the exact way back
        groups = opt['torch']['param_groups']
        order = [n for g in groups for n in g['params']]
        if _opt_param_names(ck, len(order)) != order:
            raise _Drop('optimizer parameter names do not match the model')
        index = {n: i for i, n in enumerate(order)}
        state = {}
        for name, st in opt['torch']['state'].items():
            if name not in index:
                raise _Drop(f'optimizer state for unknown parameter {name}')
            state[index[name]] = {k: acc_value(v[1:], name) if isinstance(v, str) and v.startswith('@') else v
                                  for k, v in st.items()}
        return {'state': dict(sorted(state.items())),
                'param_groups': [dict(g, params=[index[n] for n in g['params']]) for g in groups]}

    # written by the Paddle trainer: rebuild what torch's optimizer would hold
    typ = opt.get('type')
    if typ not in _ACCS:
        raise _Drop(f'a Paddle {typ} optimizer has no torch counterpart in MoCo v3')
    wd = args.get('weight_decay') if isinstance(args, dict) else None
    momentum = args.get('momentum', 0.9) if isinstance(args, dict) else 0.9
    if wd is None:
        raise _Drop("its weight decay is unknown (no 'args' in the checkpoint)")
    lr = float(opt.get('lr', 0.0))
    if typ == 'AdamW':
        group = {'lr': lr, 'betas': (0.9, 0.999), 'eps': 1e-08, 'weight_decay': float(wd), 'amsgrad': False,
                 'maximize': False, 'foreach': None, 'capturable': False, 'differentiable': False, 'fused': None,
                 'decoupled_weight_decay': True}
    elif typ == 'LARS':
        group = {'lr': lr, 'weight_decay': float(wd), 'momentum': float(momentum), 'trust_coefficient': 0.001}
    else:
        group = {'lr': lr, 'momentum': float(momentum), 'dampening': 0, 'weight_decay': float(wd),
                 'nesterov': False, 'maximize': False, 'foreach': None, 'differentiable': False, 'fused': None}
    inv = {v: k for k, v in _ACCS[typ].items()}
    first = inv[next(iter(inv))]
    with_state = [n for n in names_all if n in accs.get(_ACCS[typ][first], {})]
    unknown = set(n for per in accs.values() for n in per) - set(names_all)
    if unknown:
        raise _Drop(f'optimizer state for unknown parameter {sorted(unknown)[0]}')
    index = {n: i for i, n in enumerate(names_all)}
    state = {}
    for name in with_state:
        st = {}
        if typ == 'AdamW':
            b1pow = float(np.asarray(acc_value('beta1_pow_acc', name)).reshape(-1)[0])
            if b1pow > 1e-30:
                step = round(math.log(b1pow) / math.log(0.9)) - 1
            elif global_step is not None:
                step = int(global_step)
            else:
                raise _Drop('the AdamW step count is lost (beta powers underflowed, no global_step)')
            st['step'] = np.array(float(step), dtype=np.float32)
        for tkey, acc in _ACCS[typ].items():
            st[tkey] = acc_value(acc, name)
        state[index[name]] = st
    group['params'] = list(range(len(names_all)))
    return {'state': state, 'param_groups': [group]}


_SCALER_T2P = {'growth_factor': 'incr_ratio', 'backoff_factor': 'decr_ratio', 'growth_interval': 'incr_every_n_steps',
               '_growth_tracker': 'incr_count'}


def _scaler_torch_to_paddle(s):
    """torch.amp.GradScaler.state_dict() -> paddle.amp.GradScaler.state_dict() (same dynamic loss scaling:
    torch backs off on every overflow, so decr_every_n_nan_or_inf is 1)."""
    if not s:
        return {}
    if set(s) != {'scale', *_SCALER_T2P}:
        return dict(s)  # unknown form: carried as it is
    out = {'scale': np.array([s['scale']], dtype=np.float64)}
    out.update({p: s[t] for t, p in _SCALER_T2P.items()})
    out.update(decr_every_n_nan_or_inf=1, decr_count=0, use_dynamic_loss_scaling=True)
    return out


TORCH_SCALER_DEFAULT = {'scale': 65536.0, 'growth_factor': 2.0, 'backoff_factor': 0.5, 'growth_interval': 2000,
                        '_growth_tracker': 0}


def _scaler_paddle_to_torch(s):
    if isinstance(s, dict) and not s:  # a disabled Paddle GradScaler (CPU, bfloat16): a fresh torch one
        return dict(TORCH_SCALER_DEFAULT)
    if not isinstance(s, dict) or 'incr_ratio' not in s:
        return s
    out = {'scale': float(np.asarray(s['scale']).reshape(-1)[0])}
    out.update({t: s[p] for t, p in _SCALER_T2P.items()})
    return out
