"""python -m convert {torch2paddle, paddle2torch, extract, inspect, export} ... (see convert/checkpoints.py and
convert/export.py)."""
import argparse
import os
import sys


def _img_size(v):
    if v == 'auto':
        return v
    try:
        n = int(v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{v}' is not 'auto' or a number") from None
    if n <= 0:
        raise argparse.ArgumentTypeError(f'{n} is not a positive image size')
    return n


def _parser():
    p = argparse.ArgumentParser(prog='python -m convert',
                                description='Convert MoCo v3 checkpoints between PyTorch and Paddle, safely '
                                            '(no file is ever unpickled with code execution).')
    sub = p.add_subparsers(dest='cmd', required=True)

    def common(sp, kinds=('auto', 'pretrain', 'linear', 'deit', 'backbone')):
        sp.add_argument('--input', required=True, help='checkpoint to read')
        sp.add_argument('--output', required=True, help='file to write; its extension picks the format')
        sp.add_argument('--kind', default=kinds[0], choices=kinds,
                        help='what the input must be (default: detected from its keys)')
        sp.add_argument('--arch', default='auto', help='architecture the input must be (default: detected)')
        sp.add_argument('--img-size', default='auto', type=_img_size,
                        help='image size (default: from pos_embed; 224 for a ResNet)')

    t2p = sub.add_parser('torch2paddle', help='PyTorch .pth/.pth.tar -> .pdparams or .safetensors')
    common(t2p)
    t2p.add_argument('--verify', action='store_true',
                     help='run one random batch through both models; fail past 1e-4 relative difference')
    p2t = sub.add_parser('paddle2torch', help='Paddle .pdparams/.safetensors -> official .pth.tar layout')
    common(p2t)
    p2t.add_argument('--verify', action='store_true', help='as for torch2paddle')
    ex = sub.add_parser('extract', help='backbone of a pre-training checkpoint (base encoder minus projector)')
    common(ex, kinds=('deit', 'backbone'))
    ins = sub.add_parser('inspect', help='say what a checkpoint is, without converting it')
    ins.add_argument('input')
    exp = sub.add_parser('export', help='a model for inference: Paddle Inference (paddle.jit.save) and/or ONNX')
    exp.add_argument('--input', required=True, help='main_moco / main_lincls / main_finetune checkpoint, a '
                                                     'converted file or an official PyTorch file')
    exp.add_argument('--output', required=True, help='file prefix: writes PREFIX.json + PREFIX.pdiparams '
                                                      '(paddle) and/or PREFIX.onnx (onnx)')
    exp.add_argument('--kind', default='auto', choices=('auto', 'backbone', 'linear'),
                     help='backbone (features) or linear (the classifier; needs a classifier file); '
                          'default: linear for a classifier file, else backbone')
    exp.add_argument('--format', default='paddle', choices=('paddle', 'onnx', 'both'))
    exp.add_argument('--img-size', default='auto', type=_img_size,
                     help="input size (default: the checkpoint's; a ViT's must be its pos_embed's)")
    exp.add_argument('--verify', action='store_true',
                     help='run the written files (Paddle Inference predictor, onnxruntime) and the torch_ref '
                          'model on one batch against the eager Paddle model; fail past 1e-5 (1e-4 ONNX)')
    return p


def _quiet_paddle_import():
    """Paddle prints an OMP_NUM_THREADS notice and a ccache warning on import: keep stderr to our one line."""
    if 'paddle' in sys.modules:
        return
    import contextlib
    import io
    import warnings
    with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter('ignore')
        import paddle  # noqa: F401


def main(argv=None):
    args = _parser().parse_args(argv)
    _quiet_paddle_import()
    from paddle_impl.io import CheckpointError

    from . import checkpoints as C
    from .keymap import KeyMapError

    def log(msg):
        print(msg, flush=True)
    try:
        if args.cmd == 'inspect':
            ck = C.read_checkpoint(args.input)
            log(f"'{args.input}': {ck.describe()}; {len(ck.state_dict)} tensors"
                + (f'; optimizer: {ck.optimizer_note}' if ck.optimizer_note else ''))
        elif args.cmd == 'export':
            from .export import export
            export(args.input, args.output, args.kind, args.format, args.img_size, args.verify, log=log)
        elif args.cmd == 'extract':
            C.extract(args.input, args.output, args.kind, args.arch, args.img_size, log=log)
        else:
            fn = C.torch2paddle if args.cmd == 'torch2paddle' else C.paddle2torch
            fn(args.input, args.output, args.kind, args.arch, args.img_size, verify=args.verify, log=log)
    except C.VerifyError as e:
        print(f'error: {e}', file=sys.stderr)
        return 1
    except (CheckpointError, KeyMapError) as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    except MemoryError:
        print(f'error: out of memory reading {args.input}', file=sys.stderr)
        return 2
    return 0


if __name__ == '__main__':
    os.environ.setdefault('OMP_NUM_THREADS', '2')
    sys.exit(main())
