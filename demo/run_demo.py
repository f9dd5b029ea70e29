"""MoCo v3 on the CPU in a few minutes: pre-train a small ViT on scikit-learn's digits, then compare the
frozen features of the pre-trained encoder with those of the same encoder at its random initialisation.

    python demo/run_demo.py [--out demo_out] [--epochs N]

Steps: write the digits as an ImageFolder of 32x32 RGB PNGs (1438 train / 359 val, stratified); pre-train
with paddle_impl.main_moco.train (a ViT with patch 4, width 192, depth 4, 3 heads; MLP dim 1024, T 0.2,
batch 128, AdamW, 2 warm-up epochs, cosine MoCo momentum from 0.99, views: random resized crop with scale
0.3-1 plus Gaussian blur) with main_moco's kNN monitor after every epoch (--knn-every 1; where main_moco has
no such flag, the same paddle_impl.knn.knn_monitor runs on each epoch's checkpoint after training); then
classify the val digits by 20-NN of the frozen features (paddle_impl.knn: class token after the final norm,
cosine, temperature-weighted votes with T=0.07) before and after (--probe: also a logistic-regression
probe; --lincls-epochs: main_lincls on each). The random-init baseline is the encoder built from the same
seed, i.e. exactly the weights training started from. Raw pixels reach ~97% kNN on digits, so the fair
comparison is before vs after.

Measured here before the kNN monitor existed, with a plain MAJORITY vote (2 shared cores, seed 0; 20-NN on
359 val digits): random init 73.8%; 10 epochs (the default) 89.7% with 580 s of process CPU time, 44 s per
epoch when the cores were nearly free (about 8 minutes in all); 12 epochs 91.6%. The full BYOL views
(--aug byol) reached 86.4% at 10 epochs: crop + blur is the default. A logistic-regression probe (--probe)
is ~95% already at random init on digits, so it does not show what pre-training adds; kNN does.
With the weighted vote, a one-block ViT of width 48 after 2 epochs (the suite's test, tests/test_demo.py):
random init 52.4% -> 67.7% (seed 0), 59.6% -> 72.4% (seed 1).

Output: the results table on stdout and in OUT/results.json (with the kNN curve and the monitor's cost as a
fraction of the pre-training time); OUT/knn_curve.png; the run (checkpoints, metrics.jsonl, curves.png,
log.txt) in OUT/pretrain.
"""
import os
import sys

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

import paddle_impl  # noqa: E402,F401  (CPU math defaults before paddle)
from paddle_impl import main_moco  # noqa: E402  (imports paddle quietly)

import argparse  # noqa: E402
import glob  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402

import paddle  # noqa: E402

from demo.knn import extract_features, knn_monitor, linear_probe_accuracy  # noqa: E402
from paddle_impl import data, models  # noqa: E402
from paddle_impl import io as pio  # noqa: E402

# the demo's model and recipe (see ../shared/FACTS.md, "What a demo on the digits can show")
VIT = dict(arch='vit_small', patch_size=4, embed_dim=192, depth=4, num_heads=3)
IMG_SIZE = 32
KNN_MAX_TRAIN = 500  # the per-epoch kNN curve: 50 train digits per class (stratified): <= 10% of pre-training (measured)


def pretrain_argv(data_dir, out_dir, vit, epochs, batch_size, lr, seed, workers, aug, crop_min, max_steps=0):
    argv = [data_dir, '-a', vit['arch'],
            '--vit-patch-size', str(vit['patch_size']), '--vit-embed-dim', str(vit['embed_dim']),
            '--vit-depth', str(vit['depth']), '--vit-num-heads', str(vit['num_heads']),
            '--moco-dim', '256', '--moco-mlp-dim', '1024', '--moco-t', '0.2', '--moco-m', '0.99', '--moco-m-cos',
            '--img-size', str(IMG_SIZE), '-b', str(batch_size), '--epochs', str(epochs), '--warmup-epochs', '2',
            '--optimizer', 'adamw', '--lr', str(lr), '--wd', '0.1', '--aug', aug, '--crop-min', str(crop_min),
            '-j', str(workers), '-p', '5', '--seed', str(seed), '--device', 'cpu', '--output-dir', out_dir]
    if max_steps:
        argv += ['--max-steps', str(max_steps)]
    return argv


def evaluate(encoder, train_root, val_root, k, probe=True):
    """kNN top-1 of the frozen encoder (paddle_impl.knn.knn_monitor: cosine, temperature-weighted votes,
    T=0.07), and with probe=True a logistic-regression probe on the same features."""
    res = knn_monitor(encoder, train_root, val_root, img_size=IMG_SIZE, k=k, batch_size=256)
    out = {'knn': res['knn_top1'], 'n_train': res['n_train'], 'n_val': res['n_val'], 'knn_seconds': res['seconds']}
    if probe:
        tx, ty = extract_features(encoder, train_root, IMG_SIZE)
        vx, vy = extract_features(encoder, val_root, IMG_SIZE)
        out['probe'] = linear_probe_accuracy(tx, ty, vx, vy)
    return out


def monitor_in_main_moco():
    """Whether main_moco has the kNN monitor flag (--knn-every)."""
    return '--knn-every' in main_moco.get_parser()._option_string_actions


def knn_curve_from_metrics(run_dir):
    """[(epochs done, kNN top-1, seconds)] from the kNN records main_moco's monitor wrote, [] if none."""
    from paddle_impl import utils
    path = os.path.join(run_dir, 'metrics.jsonl')
    if not os.path.exists(path):
        return []
    curve = []
    for r in utils.read_metrics(path):
        if r.get('knn_top1') is not None and r.get('epoch') is not None:
            curve.append((int(r['epoch']) + 1, float(r['knn_top1']), float(r.get('knn_seconds', r.get('seconds', 0)))))
    return sorted(curve)


def knn_curve_from_checkpoints(run_dir, build_model, train_root, val_root, k, max_train):
    """[(epochs done, kNN top-1, seconds)]: knn_monitor on the base encoder of each epoch-end checkpoint."""
    curve = []
    model = build_model()
    for e in range(10 ** 6):
        path = os.path.join(run_dir, 'checkpoint_%04d.pdparams' % e)
        if not os.path.exists(path):
            break
        ckpt = pio.load_checkpoint(path)
        if int(ckpt['epoch']) != e + 1 or int(ckpt.get('iteration', 0)) != 0:
            continue  # saved in mid-epoch (--max-steps): not an epoch end
        main_moco.load_model_state(model, ckpt['state_dict'], path)
        res = knn_monitor(model.base_encoder, train_root, val_root, img_size=IMG_SIZE, k=k, max_train=max_train,
                          batch_size=256)
        curve.append((e + 1, res['knn_top1'], res['seconds']))
    return curve


def plot_knn_curve(curve, random_init, png_path, title):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5, 3.4))
    xs = [0] + [c[0] for c in curve]
    ax.plot(xs, [100 * random_init] + [100 * c[1] for c in curve], 'o-', ms=3, label='kNN top-1 (pre-training)')
    ax.axhline(100 * random_init, color='grey', ls='--', lw=1, label='random init (epoch 0)')
    ax.set_xlabel('epochs of pre-training')
    ax.set_ylabel('20-NN top-1 on val digits (%)')
    ax.set_title(title, fontsize=8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)


def clean_run_dir(path):
    """Remove what an earlier demo run wrote there (only our own file names), so the run starts fresh."""
    os.makedirs(path, exist_ok=True)
    for pattern in ('checkpoint_*.pdparams', 'metrics.jsonl', 'metrics.jsonl.old', 'curves.png', 'log.txt'):
        for f in glob.glob(os.path.join(path, pattern)):
            os.remove(f)


def get_parser():
    p = argparse.ArgumentParser(description='MoCo v3 digits demo on the CPU (pre-train, then kNN of frozen features)')
    p.add_argument('--out', default='demo_out', help='output folder (default: demo_out)')
    p.add_argument('--epochs', default=10, type=int, help='pre-training epochs (default: 10)')
    p.add_argument('-b', '--batch-size', default=128, type=int)
    p.add_argument('--lr', default=1.2e-3, type=float,
                   help='base lr, scaled by batch/256 as in main_moco (default 1.2e-3: 6e-4 at batch 128)')
    p.add_argument('--aug', default='crop-blur', choices=main_moco.AUGMENTATIONS)
    p.add_argument('--crop-min', default=0.3, type=float)
    p.add_argument('--seed', default=0, type=int)
    p.add_argument('-j', '--workers', default=0, type=int, help='data loading workers (default 0: in process)')
    p.add_argument('-k', default=20, type=int, help='neighbours of the kNN classifier (default: 20)')
    p.add_argument('--max-steps', default=0, type=int, help='stop pre-training after N steps (quick checks)')
    p.add_argument('--probe', action='store_true',
                   help='also fit a logistic-regression probe (on digits it is ~95%% even at random init)')
    p.add_argument('--lincls-epochs', default=10, type=int,
                   help='epochs of main_lincls linear classification on the frozen backbones (0: skip; default 10)')
    p.add_argument('--lincls-lr', default=0.3, type=float, help='main_lincls base lr (default 0.3)')
    p.add_argument('--no-knn-curve', dest='knn_curve', action='store_false',
                   help='skip the kNN curve over epochs (knn_curve.png)')
    p.add_argument('--knn-max-train', default=KNN_MAX_TRAIN, type=int,
                   help=f'train images (stratified) of the per-epoch kNN monitor (default {KNN_MAX_TRAIN}); the '
                        f'before/after table uses all 1438')
    p.add_argument('--width', default=VIT['embed_dim'], type=int, help='ViT width (default: 192)')
    p.add_argument('--depth', default=VIT['depth'], type=int, help='ViT depth (default: 4)')
    p.add_argument('--heads', default=VIT['num_heads'], type=int, help='ViT heads (default: 3)')
    return p


def _prepare(opts):
    out = os.path.abspath(opts.out)
    os.makedirs(out, exist_ok=True)
    data_dir = os.path.join(out, 'digits')
    train_root, val_root = data.write_digits_imagefolder(data_dir, img_size=IMG_SIZE)
    run_dir = os.path.join(out, 'pretrain')
    clean_run_dir(run_dir)
    vit = dict(VIT, embed_dim=opts.width, depth=opts.depth, num_heads=opts.heads)
    argv = pretrain_argv(data_dir, run_dir, vit, opts.epochs, opts.batch_size, opts.lr, opts.seed, opts.workers,
                         opts.aug, opts.crop_min, opts.max_steps)
    in_loop = opts.knn_curve and monitor_in_main_moco()
    if in_loop:  # main_moco's own kNN monitor, each epoch, on DATA/val with DATA/train's features
        argv += ['--knn-every', '1', '--knn-max-train', str(opts.knn_max_train)]
    args = main_moco.get_parser().parse_args(argv)
    return out, data_dir, train_root, val_root, run_dir, vit, args, in_loop


def _lincls(opts, vit, data_dir, run_dir, random_init, pretrained):
    """The official linear-classification protocol (main_lincls) on the frozen backbones; the random baseline
    is a backbone built from the same seed with main_lincls's own initialisation."""
    from paddle_impl.main_lincls import linear_probe
    ckpt = main_moco.find_latest_checkpoint(run_dir)
    common = dict(arch=vit['arch'], epochs=opts.lincls_epochs, batch_size=opts.batch_size, lr=opts.lincls_lr,
                  img_size=IMG_SIZE, seed=opts.seed, workers=opts.workers)
    vkw = {k: vit[k] for k in ('patch_size', 'embed_dim', 'depth', 'num_heads')}
    random_init['lincls'] = linear_probe(data_dir, None, vit_kwargs=vkw, **common)['acc1'] / 100.0
    pretrained['lincls'] = linear_probe(data_dir, ckpt, **common)['acc1'] / 100.0


def run(opts):
    t0 = time.time()
    out, data_dir, train_root, val_root, run_dir, vit, args, in_loop = _prepare(opts)

    # the random-init baseline: the encoder built exactly as main_moco builds it from the same seed
    def build_model():
        return models.build_moco(vit['arch'], dim=args.moco_dim, mlp_dim=args.moco_mlp_dim, T=args.moco_t,
                                 img_size=IMG_SIZE, **main_moco.vit_kwargs(args))
    paddle.seed(opts.seed)
    t = time.time()
    random_init = evaluate(build_model().base_encoder, train_root, val_root, opts.k, opts.probe)
    t_eval = time.time() - t

    t = time.time()
    summary = main_moco.train(args)
    t_train = time.time() - t

    t = time.time()
    pretrained = evaluate(summary['model'].base_encoder, train_root, val_root, opts.k, opts.probe)
    curve = []
    if opts.knn_curve:
        curve = knn_curve_from_metrics(run_dir) if in_loop else []
        if not curve:  # main_moco without the monitor: the same function on each epoch's checkpoint
            in_loop = False
            curve = knn_curve_from_checkpoints(run_dir, build_model, train_root, val_root, opts.k,
                                               opts.knn_max_train)
        plot_knn_curve(curve, random_init['knn'], os.path.join(out, 'knn_curve.png'),
                       f'MoCo v3 {vit["arch"]} width {vit["embed_dim"]} depth {vit["depth"]} on digits')
    if opts.lincls_epochs > 0:
        _lincls(opts, vit, data_dir, run_dir, random_init, pretrained)
    t_eval += time.time() - t

    knn_s = sum(c[2] for c in curve)
    pretrain_s = t_train - knn_s if in_loop else t_train  # pre-training alone
    total = time.time() - t0
    cpu = os.times()
    cpu_s = cpu.user + cpu.system  # the work done, whatever else shares the cores
    results = {
        'model': dict(vit, img_size=IMG_SIZE), 'epochs': opts.epochs, 'steps': summary['steps'],
        'batch_size': opts.batch_size, 'aug': opts.aug, 'crop_min': opts.crop_min, 'seed': opts.seed,
        'k': opts.k, 'knn_max_train': opts.knn_max_train, 'knn_vote': 'temperature-weighted, T=0.07', 'lincls_epochs': opts.lincls_epochs,
        'lincls_lr': opts.lincls_lr, 'random_init': random_init, 'pretrained': pretrained,
        'knn_curve': [{'epoch': e, 'knn_top1': v, 'seconds': round(sec, 2)} for e, v, sec in curve],
        'knn_curve_source': ('main_moco --knn-every 1' if in_loop else 'knn_monitor on each epoch checkpoint')
        if curve else None,
        'knn_monitor_cost': round(knn_s / max(pretrain_s, 1e-9), 4) if curve else None,
        'last_loss': summary['last_loss'], 'time_pretrain_s': round(pretrain_s, 1), 'time_eval_s': round(t_eval, 1),
        'time_total_s': round(total, 1), 'cpu_time_s': round(cpu_s, 1), 'run_dir': run_dir,
        'threads': os.environ.get('OMP_NUM_THREADS'),
    }
    with open(os.path.join(out, 'results.json'), 'w') as f:
        json.dump(results, f, indent=1)
    print_results(opts, vit, summary, results, out)
    return results


def print_results(opts, vit, summary, results, out):
    random_init, pretrained = results['random_init'], results['pretrained']

    def pct(v):
        return '  n/a' if v is None else f'{100 * v:5.1f}%'
    print()
    print(f'MoCo v3 digits demo: {vit["arch"]} patch {vit["patch_size"]} width {vit["embed_dim"]} '
          f'depth {vit["depth"]}, {opts.epochs} epochs ({summary["steps"]} steps), batch {opts.batch_size}, '
          f'aug {opts.aug}')
    probe_head = '   linear probe' if opts.probe else ''
    if opts.lincls_epochs > 0:
        probe_head += f'   main_lincls ({opts.lincls_epochs} ep)'
    print(f'  frozen features, {pretrained["n_val"]} val digits   {opts.k}-NN (cosine, weighted){probe_head}')
    for name, res in (('random init (same seed)', random_init), ('pre-trained', pretrained)):
        probe = f'          {pct(res.get("probe"))}' if opts.probe else ''
        if opts.lincls_epochs > 0:
            probe += f'          {pct(res.get("lincls"))}'
        print(f'  {name:<30s}   {pct(res["knn"])}{probe}')
    if results['knn_curve']:
        pts = ', '.join(f'{c["epoch"]}: {100 * c["knn_top1"]:.1f}%' for c in results['knn_curve'])
        print(f'  kNN by epoch (0: {100 * random_init["knn"]:.1f}%), {pts}; monitor cost '
              f'{100 * results["knn_monitor_cost"]:.1f}% of pre-training ({results["knn_curve_source"]})')
    print(f'  time: pre-training {results["time_pretrain_s"]:.0f} s, evaluation {results["time_eval_s"]:.0f} s, '
          f'total {results["time_total_s"]:.0f} s (process CPU time {results["cpu_time_s"]:.0f} s, '
          f'{os.environ.get("OMP_NUM_THREADS", "?")} threads)')
    curve_png = ', knn_curve.png' if results['knn_curve'] else ''
    print(f'  run: {results["run_dir"]} (curves.png, metrics.jsonl); results: {os.path.join(out, "results.json")}'
          f'{curve_png}')


def main(argv=None):
    opts = get_parser().parse_args(argv)
    try:
        run(opts)
    except (main_moco.RunError, main_moco.Diverged, data.DataError) as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    return 0


if __name__ == '__main__':
    sys.exit(main())
