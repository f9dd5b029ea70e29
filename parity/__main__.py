"""python -m parity: run torch_ref and paddle_impl on identical weights and inputs and print the table.

Examples:
  python -m parity --arch all --dtype float64
  python -m parity --arch vit_small --dtype float32 --img-size 224 --batch 4
  python -m parity --arch resnet50 --steps 10 --optimizer lars
  python -m parity --paddle-ops --arch all        (Paddle's own ops only: what a GPU runs)
  python -m parity --device gpu --dtype both      (Paddle side on the GPU, TF32 off)
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
    p.add_argument('--json', default=None, help='also write the rows as JSON here')
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
    from parity import scenarios
    from parity.compare import format_table, to_json

    dtypes = ['float64', 'float32'] if args.dtype == 'both' else [args.dtype]
    all_rows, failed = [], 0
    for arch in archs:
        vit_kw = {}
        depth = args.depth if args.depth is not None else (None if args.full_depth else REDUCED_DEPTH.get(arch))
        if depth is not None and arch in VIT_ARCHS:
            vit_kw['depth'] = depth
        img = args.img_size or 2 * _patch(arch)
        for dtype in dtypes:
            t0 = time.time()
            if args.steps:
                from parity.steps import run_steps
                opt = args.optimizer or ('lars' if arch == 'resnet50' else 'adamw')
                rows = run_steps(arch, opt, steps=args.steps, dtype=dtype, img_size=img, batch=args.batch,
                                 dim=args.dim, mlp_dim=args.mlp_dim, seed=args.seed, **vit_kw)
                title = f'{arch} {dtype}: {args.steps} training steps, {opt}'
            else:
                rows = scenarios.run_forward_backward(arch, dtype, img, args.batch, args.dim, args.mlp_dim,
                                                      args.moco_t, args.moco_m, args.seed, **vit_kw)
                if arch in VIT_ARCHS and dtype == dtypes[0]:
                    rows += scenarios.pos_embed_rows(arch)
                if not args.no_init and dtype == dtypes[0]:
                    rows += scenarios.init_rows(arch, img, args.dim, args.mlp_dim, args.seed, **vit_kw)
                title = f'{arch} {dtype}: img {img}, batch {args.batch}, dim {args.dim}, mlp_dim {args.mlp_dim}'
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


if __name__ == '__main__':
    sys.exit(main())
