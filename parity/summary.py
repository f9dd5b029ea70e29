"""Markdown summary of parity JSON reports: python -m parity.summary A.json [B.json ...]

One line per (arch, dtype, scenario): the worst relative L2 error per column and the pass count.
"""
import json
import sys

COLUMNS = [('forward', ('forward:',)), ('loss', ('loss:', 'loss at each')), ('grads', ('grad:',)),
           ('momentum enc + BN stats', ('momentum encoder', 'BN running', 'final BN')),
           ('params after K steps', ('final params',)), ('optimizer state', ('final optimizer state',))]


def summarize(paths):
    groups = {}
    for path in paths:
        with open(path) as f:
            data = json.load(f)
        for r in data['rows']:
            d = r.get('detail') or {}
            groups.setdefault((d.get('title', '?'), d.get('dtype', '?')), []).append(r)
    used = [c for c in COLUMNS if any(any(r['check'].startswith(p) for p in c[1]) for rs in groups.values() for r in rs)]
    head = '| run | ' + ' | '.join(c[0] for c in used) + ' | checks passed |'
    lines = [head, '|' + '---|' * (len(used) + 2)]
    for (title, _), rows in groups.items():
        cells = []
        for _, prefixes in used:
            vals = [r['rel_l2'] for r in rows if any(r['check'].startswith(p) for p in prefixes)]
            vals = [v for v in vals if v is not None]
            cells.append(f'{max(vals):.1e}' if vals else '')
        ok = sum(bool(r['passed']) for r in rows)
        lines.append(f'| {title} | ' + ' | '.join(cells) + f' | {ok}/{len(rows)} |')
    return '\n'.join(lines)


if __name__ == '__main__':
    print(summarize(sys.argv[1:]))
