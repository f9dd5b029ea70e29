"""Markdown summary of parity JSON reports: python -m parity.summary A.json [B.json ...]

One line per (arch, dtype, scenario): the worst relative L2 error per column, then the judged rows
passed out of judged rows, and apart from them the number of rows that are only reported (no tolerance:
never counted as passed checks). A NaN/inf anywhere shows as 'nan'/'inf' in its column and the line's
verdict says FAIL with the failing row named. Exit status 1 when any row failed.
"""
import json
import math
import sys

from parity.compare import json_float

COLUMNS = [('forward', ('forward:',)), ('loss', ('loss:', 'loss at each')), ('grads', ('grad:',)),
           ('momentum enc + BN stats', ('momentum encoder', 'BN running', 'final BN')),
           ('params after K steps', ('final params',)), ('optimizer state', ('final optimizer state',))]


def _fmt(v):
    return 'nan' if math.isnan(v) else f'{v:.1e}'


def _worst(vals):
    vals = [json_float(v) for v in vals if v is not None]
    if any(math.isnan(v) for v in vals):
        return math.nan
    return max(vals) if vals else None


def load_groups(paths):
    groups = {}
    for path in paths:
        with open(path) as f:
            data = json.load(f)
        for r in data['rows']:
            d = r.get('detail') or {}
            groups.setdefault((d.get('title', '?'), d.get('dtype', '?')), []).append(r)
    return groups


def summarize(paths):
    """(markdown text, number of failed rows)."""
    groups = load_groups(paths)
    used = [c for c in COLUMNS if any(any(r['check'].startswith(p) for p in c[1]) for rs in groups.values() for r in rs)]
    head = '| run | ' + ' | '.join(c[0] for c in used) + ' | judged checks passed | reported only | verdict |'
    lines = [head, '|' + '---|' * (len(used) + 4)]
    n_failed = 0
    for (title, _), rows in groups.items():
        cells = []
        for _, prefixes in used:
            v = _worst(r['rel_l2'] for r in rows if any(r['check'].startswith(p) for p in prefixes))
            cells.append('' if v is None else _fmt(v))
        judged = [r for r in rows if r['tol'] is not None]
        reported = [r for r in rows if r['tol'] is None]
        failed = [r for r in rows if not r['passed']]  # a reported row fails on NaN/inf or a key mismatch
        n_failed += len(failed)
        ok = sum(bool(r['passed']) for r in judged)
        verdict = 'PASS' if not failed else f"FAIL: {failed[0]['check']} ({failed[0].get('worst', '')})"
        lines.append(f'| {title} | ' + ' | '.join(cells) + f' | {ok}/{len(judged)} | {len(reported)} | {verdict} |')
    return '\n'.join(lines), n_failed


def main(argv=None):
    text, failed = summarize(sys.argv[1:] if argv is None else argv)
    print(text)
    return 1 if failed else 0


if __name__ == '__main__':
    sys.exit(main())
