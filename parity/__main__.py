"""python -m parity: run torch_ref and paddle_impl on identical weights and inputs and print the table.

Examples:
  python -m parity --arch all --dtype float64
  python -m parity --arch vit_small --dtype float32 --img-size 224 --batch 4
  python -m parity --arch resnet50 --steps 10 --optimizer lars
  python -m parity --paddle-ops --arch all        (Paddle's own ops only: what a GPU runs)
  python -m parity --device gpu --dtype both      (Paddle side on the GPU, TF32 off)
  python -m parity --arch vit_small --depth 2 --trace                 (first divergent module, see docs/trace.md)
  python -m parity --arch resnet50 --steps 10 --trace                 (first step and module that leave tolerance)
  python -m parity --reference official --official-src MOCO_V3_DIR --timm-src TIMM049_DIR
"""
import argparse
import os
import sys
import time

os.environ.setdefault('OMP_NUM_THREADS', str(os.cpu_count() or 1))
# torch and paddle in one process: idle OpenMP threads must sleep, not spin, or each slows the other
os.environ.setdefault('OMP_WAIT_POLICY', 'PASSIVE')
import paddle_impl  # noqa: E402,F401  (sets Paddle's CPU defaults before paddle is imported)
from torch_ref.models import ARCHS, VIT_ARCHS  # noqa: E402

# The paper's ViT-L/H are too large for a float64 MoCo pair on a small machine (ViT-H: 2 x 632M parameters
# per side); by default their parity runs use this many blocks at full width/heads/patch, and the full-depth
# encoders are checked for structure (parameter count, key map) separately.
REDUCED_DEPTH = {'vit_large': 4, 'vit_huge': 4}
# what the original facebookresearch code builds (its vits.py and torchvision's resnet50)
ORIGINAL_ARCHS = ('vit_small', 'vit_base', 'vit_conv_small', 'vit_conv_base', 'resnet50')


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog='python -m parity', description=__doc__.split('\n')[0])
    p.add_argument('--arch', default='all', help=f"one of {', '.join(ARCHS)}, or 'all' (default)")
    p.add_argument('--dtype', default='float64', choices=['float64', 'float32', 'both'])
    p.add_argument('--img-size', type=int, default=None,
                   help='default: 2 patches across (32 for /16 ViTs and resnet50, 28 for vit_huge /14)')
    p.add_argument('--batch', type=int, default=8)
    p.add_argument('--moco-dim', '--dim', dest='dim', type=int, default=256)
    p.add_argument('--moco-mlp-dim', '--mlp-dim', dest='mlp_dim', type=int, default=1024)
    p.add_argument('--moco-t', type=float, default=0.2)
    p.add_argument('--moco-m', type=float, default=0.99)
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--depth', type=int, default=None,
                   help='override the number of ViT blocks (default: the arch\'s own; 4 for vit_large/vit_huge)')
    p.add_argument('--full-depth', action='store_true', help='no reduced depth for vit_large/vit_huge')
    p.add_argument('--steps', type=int, default=0, help='run K complete training iterations instead')
    p.add_argument('--optimizer', default=None, choices=['lars', 'adamw'],
                   help='with --steps (default: lars for resnet50, adamw for ViTs)')
    p.add_argument('--no-init', action='store_true', help='skip the initialisation-distribution checks')
    p.add_argument('--json', default=None, help='also write the rows (with --trace: the traces) as JSON here')
    t = p.add_argument_group('trace (docs/trace.md)')
    t.add_argument('--trace', action='store_true',
                   help='compare every module\'s forward output and output gradient; name the first divergent module')
    t.add_argument('--trace-rows', type=int, default=40,
                   help='table rows to print up to and past the first divergence (0: all; default 40)')
    r = p.add_argument_group('reference')
    r.add_argument('--reference', default='torch_ref', choices=['torch_ref', 'official'],
                   help="torch side: this project's torch_ref (default) or the original facebookresearch code")
    r.add_argument('--official-src', default=None, help='with --reference official: a moco-v3 checkout')
    r.add_argument('--timm-src', default=None,
                   help='with --reference official: a folder made by `pip install --target DIR timm==0.4.9`')
    return p.parse_args(argv)


def _patch(arch):
    return 14 if arch == 'vit_huge' else (16 if arch in VIT_ARCHS else 32)


def main(argv=None):
    # ---- begin gpu_mode block (issue 18 points 8-9; owner: the gpu helper; code in parity/gpu_mode.py) ----
    # --paddle-ops: every CPU-only path off (Paddle's own ops, as on a GPU); --device cpu|gpu: the GPU, TF32 off.
    # Both are taken out of argv and applied (and said, on stdout) before anything else runs.
    from parity import gpu_mode
    argv, rc = gpu_mode.setup(sys.argv[1:] if argv is None else list(argv))
    if rc is not None:
        return rc
    # ---- end gpu_mode block ----
    args = parse_args(argv)
    archs = ARCHS if args.arch == 'all' else [args.arch]
    for a in archs:
        if a not in ARCHS:
            print(f"error: unknown arch '{a}'; known: {', '.join(ARCHS)}", file=sys.stderr)
            return 2
        patch = _patch(a)
        if args.img_size is not None and (args.img_size <= 0 or args.img_size % patch):
            print(f'error: --img-size {args.img_size} is not a multiple of {a}\'s patch size {patch} '
                  f'(try --img-size {patch * 2})', file=sys.stderr)
            return 2
    if args.json and not os.path.isdir(os.path.dirname(os.path.abspath(args.json))):
        print(f'error: --json {args.json}: folder does not exist', file=sys.stderr)
        return 2
    official = None
    if args.reference == 'official' or args.official_src or args.timm_src:
        if args.reference != 'official':
            print('error: --official-src/--timm-src need --reference official', file=sys.stderr)
            return 2
        from parity.official import Official, OfficialError
        try:
            official = Official(args.official_src, args.timm_src)
            if any(a in VIT_ARCHS for a in archs):
                official.vits  # noqa: B018  (imports vits.py now, so that a bad --timm-src stops here)
        except OfficialError as e:
            print(f'error: {e}', file=sys.stderr)
            return 2
    if official is not None:
        missing = [a for a in archs if a not in ORIGINAL_ARCHS]
        if args.arch != 'all' and missing:
            print(f"error: --reference official: the original code has no {missing[0]} (it has "
                  f"{', '.join(ORIGINAL_ARCHS)})", file=sys.stderr)
            return 2
        archs = [a for a in archs if a in ORIGINAL_ARCHS]
    if args.trace:
        return run_trace(args, archs, official)
    from parity import scenarios
    from parity.compare import format_table, to_json

    all_rows, failed = [], 0
    ref = 'the original code' if official else 'torch_ref'
    for arch, dtype, first, vit_kw, img, opt in _cases(args, archs):
        t0 = time.time()
        if args.steps:
            from parity.steps import run_steps
            kw = dict(steps=args.steps, dtype=dtype, img_size=img, batch=args.batch, dim=args.dim,
                      mlp_dim=args.mlp_dim, seed=args.seed)
            if official:
                kw['pair'] = _pair(args, arch, dtype, img, official, vit_kw, T=1.0)
                kw['torch_optimizer'] = _official_opt(official)
            rows = run_steps(arch, opt, **kw, **vit_kw)
            title = f'{arch} {dtype}: {args.steps} training steps, {opt}, against {ref}'
        else:
            pair = _pair(args, arch, dtype, img, official, vit_kw)
            rows = scenarios.run_forward_backward(arch, dtype, img, args.batch, args.dim, args.mlp_dim,
                                                  args.moco_t, args.moco_m, args.seed, pair=pair, **vit_kw)
            rows += _dtype_rows(pair, ref)
            if arch in VIT_ARCHS and first and not official:
                rows += scenarios.pos_embed_rows(arch)
            if not args.no_init and first and not official:
                rows += scenarios.init_rows(arch, img, args.dim, args.mlp_dim, args.seed, **vit_kw)
            title = (f'{arch} {dtype}: img {img}, batch {args.batch}, dim {args.dim}, mlp_dim {args.mlp_dim}, '
                     f'against {ref}')
        if 'depth' in vit_kw:
            title += f', depth {vit_kw["depth"]} (reduced)'
        for r in rows:
            r.detail = {'arch': arch, 'dtype': dtype, 'title': title}
        print(format_table(rows, f'\n== {title}  ({time.time() - t0:.1f} s)'), flush=True)
        failed += sum(not r.passed for r in rows)
        all_rows += rows
    if args.json:
        to_json(all_rows, args.json, meta=vars(args))
    n = len(all_rows)
    print(f'\n{n - failed} passed, {failed} failed')
    return 1 if failed else 0


def _cases(args, archs):
    """(arch, dtype, first dtype of the arch?, ViT kwargs, image size, optimizer) of every run asked for."""
    dtypes = ['float64', 'float32'] if args.dtype == 'both' else [args.dtype]
    for arch in archs:
        vit_kw = _vit_kw(args, arch)
        img = args.img_size or 2 * _patch(arch)
        opt = args.optimizer or ('lars' if arch == 'resnet50' else 'adamw')
        for dtype in dtypes:
            yield arch, dtype, dtype == dtypes[0], vit_kw, img, opt


def _vit_kw(args, arch):
    depth = args.depth if args.depth is not None else (None if args.full_depth else REDUCED_DEPTH.get(arch))
    return {'depth': depth} if depth is not None and arch in VIT_ARCHS else {}


def _pair(args, arch, dtype, img, official, vit_kw, T=None):
    """The (torch, paddle) model pair: torch_ref's or the original code's model, the Paddle twin with its weights."""
    from parity import scenarios
    T = args.moco_t if T is None else T
    sg = arch in VIT_ARCHS and 'conv' not in arch
    if official is None:
        return scenarios.build_pair(arch, dtype, img, args.dim, args.mlp_dim, T, args.seed, sg, **vit_kw)
    from parity.official import build_official_pair
    return build_official_pair(official, arch, dtype, img, args.dim, args.mlp_dim, T, args.seed, sg, **vit_kw)


def _official_opt(official):
    from parity.official import official_optimizer
    return official_optimizer(official)


def _dtype_rows(pair, ref):
    from parity.official import dtype_rows
    return dtype_rows(pair[0], pair[1], ref)


def run_trace(args, archs, official):
    """--trace: per arch and dtype, the layer-by-layer trace of one step (or of K steps: the first step that
    leaves tolerance); exit 1 when any trace names a divergent module."""
    import json

    from parity import tracing
    out, failed = [], 0
    ref = 'the original code' if official else 'torch_ref'
    for arch, dtype, _, vit_kw, img, opt in _cases(args, archs):
        t0 = time.time()
        if args.steps:
            pair = _pair(args, arch, dtype, img, official, vit_kw, T=1.0)
            res = tracing.trace_moco_steps(pair, arch, opt, args.steps, dtype, img, args.batch, args.seed,
                                           torch_optimizer=_official_opt(official) if official else None)
            title = f'{arch} {dtype}: trace of {args.steps} training steps ({opt}) against {ref}'
        else:
            pair = _pair(args, arch, dtype, img, official, vit_kw)
            res = tracing.trace_moco(pair, dtype, args.batch, img, args.seed, args.moco_m)
            title = f'{arch} {dtype}: trace of one MoCo forward/backward against {ref}, img {img}, batch {args.batch}'
        if vit_kw:
            title += f', depth {vit_kw["depth"]}'
        print(f'\n== {title}  ({time.time() - t0:.1f} s)')
        print(res.table(max_rows=args.trace_rows or None), flush=True)
        failed += not res.passed
        out.append({'arch': arch, 'dtype': dtype, 'title': title, **res.to_dict()})
    if args.json:
        with open(args.json, 'w') as f:
            json.dump({'meta': vars(args), 'traces': out}, f, indent=1, allow_nan=False)
    print(f'\n{len(out) - failed} traces within tolerance, {failed} with a divergent module')
    return 1 if failed else 0


if __name__ == '__main__':
    sys.exit(main())
