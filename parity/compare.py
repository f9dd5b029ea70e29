"""The one comparison function of the parity harness and its report.

Each check compares named tensors (numpy) and records, over the tensors, the largest relative L2 error
‖a − b‖ / max(‖b‖, tiny) and the largest max-abs error. A check passes when every tensor's relative
error is within its tolerance. Failures name the worst tensor.

Rules that no tolerance can loosen:
- a NaN or ±inf in any tensor, on either side, fails the check (judged or reported), and the row names
  the tensor and what it holds;
- ``atol`` (an absolute bound) rescues only a tensor whose REFERENCE is itself at the noise floor,
  max |ref| <= atol: an exact zero reached by cancellation, whose relative error is meaningless. A tensor
  of any larger magnitude is judged on its relative error alone, however small its values are.
"""
import json
import math
from dataclasses import asdict, dataclass, field

import numpy as np

# Tolerances on the relative L2 error (issue: float64 1e-10; float32 1e-4 outputs, 1e-3 gradients).
# ATOL: a tensor whose exact value is zero or nearly so by cancellation (e.g. the gradient of the ViT's
# final-norm bias, which the batch-normalised projector makes exactly zero) has no meaningful relative
# error; it passes when its max abs error is at the dtype's rounding level.
ATOL = {'float64': 1e-12, 'float32': 1e-6}
TOL = {
    'float64': {'output': 1e-10, 'grad': 1e-10, 'state': 1e-10, 'steps': 1e-9},
    'float32': {'output': 1e-4, 'grad': 1e-3, 'state': 1e-4, 'steps': None},
}


def rel_l2(a, b):
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        return math.inf
    den = np.linalg.norm(b.ravel())
    num = np.linalg.norm((a - b).ravel())
    if den == 0.0:
        return 0.0 if num == 0.0 else math.inf
    return float(num / den)


def nonfinite(x):
    """'' when every value of ``x`` is finite, else e.g. '3 NaN, 1 +inf'."""
    x = np.asarray(x, dtype=np.float64)
    if x.size == 0 or np.isfinite(x).all():
        return ''
    parts = [(int(np.isnan(x).sum()), 'NaN'), (int(np.isposinf(x).sum()), '+inf'), (int(np.isneginf(x).sum()), '-inf')]
    return ', '.join(f'{n} {w}' for n, w in parts if n)


def max_abs(a, b):
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        return math.inf
    return float(np.max(np.abs(a - b))) if a.size else 0.0


@dataclass
class Row:
    check: str
    tensors: int
    rel_l2: float
    max_abs: float
    tol: float  # None: reported, not judged
    passed: bool
    worst: str = ''
    note: str = ''
    detail: dict = field(default_factory=dict)


def compare(check, a, b, tol, note='', atol=None):
    """Compare two name -> array dicts (a: Paddle, b: torch reference). Keys must match exactly.
    A tensor passes when its relative L2 error <= tol, or (if ``atol`` is given) when its reference is at
    the noise floor (max |ref| <= atol) and its max abs error <= atol; the reported rel L2 is the worst
    among tensors not rescued by ``atol``. Any non-finite value fails the row (``tol=None`` included)."""
    if set(a) != set(b):
        only_a, only_b = sorted(set(a) - set(b)), sorted(set(b) - set(a))
        return Row(check, len(b), math.inf, math.inf, tol, False,
                   worst=f'key mismatch: only paddle {only_a[:5]}, only torch {only_b[:5]}', note=note)
    bad = []
    for k in sorted(b):
        na, nb = nonfinite(a[k]), nonfinite(b[k])
        if na or nb:
            bad.append(f'{k} (' + '; '.join(f'{side}: {w}' for side, w in (('paddle', na), ('torch', nb)) if w) + ')')
    if bad:
        return Row(check, len(b), math.nan, math.nan, tol, False, note=note,
                   worst=f'NON-FINITE in {len(bad)} tensor(s): ' + ', '.join(bad[:3]))
    worst, worst_rel, worst_abs = '', 0.0, 0.0
    n_abs = 0
    for k in sorted(b):
        r, m = rel_l2(a[k], b[k]), max_abs(a[k], b[k])
        worst_abs = max(worst_abs, m)
        if atol is not None and r > (tol or 0) and m <= atol and _ref_max(b[k]) <= atol:
            n_abs += 1
            continue
        if r > worst_rel or (not worst and r >= worst_rel):
            worst, worst_rel = k, r
    if atol is not None:
        note = (note + '; ' if note else '') + (f'atol {atol:.0e} only where max|ref| <= {atol:.0e} (noise floor): '
                                                f'{n_abs} tensor(s)')
    passed = True if tol is None else bool(worst_rel <= tol)
    return Row(check, len(b), worst_rel, worst_abs, tol, passed, worst=worst, note=note)


def _ref_max(x):
    x = np.asarray(x, dtype=np.float64)
    return float(np.max(np.abs(x))) if x.size else 0.0


def flag(check, passed, note=''):
    """A yes/no check (e.g. 'the momentum encoder gets no gradient')."""
    return Row(check, 0, 0.0, 0.0, 0.0, bool(passed), note=note)


def result(r):
    """'PASS' / 'FAIL' for judged rows; 'report' for a reported (tol None) row, or 'FAIL' if it failed
    (a reported row fails only on a non-finite value or a key mismatch)."""
    if r.tol is None:
        return 'report' if r.passed else 'FAIL'
    return 'PASS' if r.passed else 'FAIL'


def format_table(rows, title=''):
    head = f"{'check':<52} {'tensors':>7} {'max rel L2':>11} {'max abs':>10} {'tol':>8}  result"
    lines = [title] if title else []
    lines += [head, '-' * len(head)]
    for r in rows:
        tol = '-' if r.tol is None else f'{r.tol:.0e}'
        extra = f'  [{r.note}]' if r.note else ''
        if not r.passed:
            extra += f'  worst: {r.worst}'
        lines.append(f'{r.check:<52} {r.tensors:>7} {r.rel_l2:>11.2e} {r.max_abs:>10.2e} {tol:>8}  {result(r)}{extra}')
    return '\n'.join(lines)


def _json_float(x):
    """JSON has no NaN/inf: they are written as the strings 'nan', 'inf', '-inf' (never dropped)."""
    if isinstance(x, float) and not math.isfinite(x):
        return 'nan' if math.isnan(x) else ('inf' if x > 0 else '-inf')
    return x


def json_float(x):
    """The inverse of _json_float for readers of the JSON report (None stays None)."""
    return float(x) if isinstance(x, str) else x


def to_json(rows, path, meta=None):
    data = {'meta': meta or {},
            'rows': [{k: _json_float(v) for k, v in asdict(r).items()} | {'result': result(r)} for r in rows]}
    with open(path, 'w') as f:
        json.dump(data, f, indent=1, allow_nan=False)
