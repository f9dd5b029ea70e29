"""Linear classification (paddle_impl/main_lincls.py): float64 parity of the official training step against
torch_ref/lincls.py, and the CLI end to end on a tiny image folder (train, resume, evaluate, bad inputs)."""
import os
import pickle
import subprocess
import sys

import numpy as np
import paddle
import pytest
import torch

from convert import bridge
from parity.compare import rel_l2
from parity.scenarios import paddle_dtype
from paddle_impl import io as pio
from paddle_impl import main_lincls as ml
from paddle_impl import models as pm
from torch_ref import lincls as tl
from torch_ref import models as tm

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_VIT = dict(patch_size=8, embed_dim=48, depth=2, num_heads=3)
TINY_FLAGS = ['--vit-patch-size', '8', '--vit-embed-dim', '48', '--vit-depth', '2', '--vit-num-heads', '3']
TOL = 1e-9


# --------------------------------------------------------------------------------------------- helpers

def make_data(root, classes=3, n_train=8, n_val=4, size=36, extra_val_class=False, seed=0):
    """root/train/<c>/*.png and root/val/<c>/*.png: colour blobs, one hue per class."""
    from PIL import Image
    rng = np.random.default_rng(seed)
    for split, n in (('train', n_train), ('val', n_val)):
        names = [f'c{c}' for c in range(classes)] + (['zz'] if extra_val_class and split == 'val' else [])
        for c, name in enumerate(names):
            d = os.path.join(root, split, name)
            os.makedirs(d, exist_ok=True)
            base = np.array([(c * 97) % 256, 60, 255 - (c * 97) % 256])
            for i in range(n):
                a = (rng.random((size, size, 3)) * 90 + base - 45).clip(0, 255).astype(np.uint8)
                Image.fromarray(a).save(os.path.join(d, f'{i}.png'))
    return str(root)


def make_pretrain(path, arch='vit_small', img_size=32, vit=TINY_VIT, seed=0):
    """A checkpoint in main_moco's format (format, epoch, arch, state_dict with base_encoder./momentum_encoder./
    predictor. Paddle names, args with the --vit-* overrides). Returns the base encoder's backbone state."""
    paddle.seed(seed)
    model = pm.build_moco(arch, dim=16, mlp_dim=32, T=0.2, img_size=img_size, **(vit or {}))
    args = {'arch': arch, 'img_size': img_size, 'vit_patch_size': None, 'vit_embed_dim': None, 'vit_depth': None,
            'vit_num_heads': None}
    for flag, key in ml.VIT_FLAGS:
        if vit and key in vit:
            args[flag] = vit[key]
    sd = {k: v.numpy() for k, v in model.state_dict().items()}
    pio.save_checkpoint({'format': ml.CHECKPOINT_FORMAT, 'kind': 'pretrain', 'img_size': img_size, 'epoch': 1, 'iteration': 0, 'arch': arch, 'state_dict': sd,
                         'optimizer': {}, 'scaler': {}, 'args': args}, str(path))
    kw = ml.linear_keyword(arch)
    return {k[len('base_encoder.'):]: v for k, v in sd.items()
            if k.startswith('base_encoder.') and not k.startswith(f'base_encoder.{kw}.')}


def run_cli(module, args, timeout=240):
    env = dict(os.environ, OMP_NUM_THREADS='2')
    return subprocess.run([sys.executable, '-m', module] + [str(a) for a in args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def call_main(main, argv, capsys):
    """Run a CLI's main() in this process; returns (exit code, stderr lines)."""
    capsys.readouterr()
    rc = main([str(a) for a in argv])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    return rc, err


@pytest.fixture(scope='module')
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp('lincls')
    data = make_data(root / 'data')
    pre_path = root / 'pretrain.pdparams'
    backbone = make_pretrain(pre_path)
    return {'root': root, 'data': data, 'pretrain': str(pre_path), 'backbone': backbone}


# ------------------------------------------------------------------------------------------- parity

def _pair(arch, vit_kwargs, num_classes=10, seed=0):
    torch.manual_seed(seed)
    tmodel = tm.encoder_factory(arch, img_size=32, **vit_kwargs)(num_classes=num_classes).double()
    tl.prepare_linear_classifier(tmodel, arch)  # freeze + head N(0, 0.01), bias 0
    with paddle_dtype('float64'):
        pmodel = pm.encoder_factory(arch, img_size=32, **vit_kwargs)(num_classes=num_classes)
    bridge.torch_to_paddle_model(tmodel, pmodel)  # the same weights, the head included
    ml.freeze_all_but_head(pmodel, arch)
    return tmodel, pmodel


def _head_state_paddle(pmodel, arch):
    kw = ml.linear_keyword(arch)
    layer = getattr(pmodel, kw)
    return {'weight': layer.weight.numpy().T, 'bias': layer.bias.numpy()}  # Paddle [in, out] -> torch [out, in]


@pytest.mark.parametrize('arch,vit_kwargs,wd,n', [('vit_small', TINY_VIT, 0.0, 16), ('resnet50', {}, 1e-3, 8)])
def test_training_step_parity_float64(arch, vit_kwargs, wd, n):
    """Two epochs over n fixed inputs (batch 4, no augmentation) on identical weights: per-iteration losses,
    classifier weights and momentum buffers agree with the official step to rel L2 <= 1e-9."""
    epochs, batch, base_lr = 2, 4, 3.0
    tmodel, pmodel = _pair(arch, vit_kwargs)
    pre_t = {k: v.clone() for k, v in tmodel.state_dict().items()}
    pre_p = {k: v.numpy().copy() for k, v in pmodel.state_dict().items()}
    rng = np.random.default_rng(1)
    x = rng.standard_normal((n, 3, 32, 32))
    y = rng.integers(0, 10, n)
    batches_t = [(torch.from_numpy(x[i:i + batch]), torch.from_numpy(y[i:i + batch])) for i in range(0, n, batch)]
    batches_p = [(paddle.to_tensor(x[i:i + batch]), paddle.to_tensor(y[i:i + batch])) for i in range(0, n, batch)]

    losses_t, lrs_t, opt_t = tl.run_epochs(tmodel, arch, batches_t, epochs, base_lr, batch, 0.9, wd)

    init_lr = base_lr * batch / 256
    head = [(n, p) for n, p in pmodel.named_parameters() if not p.stop_gradient]
    assert sorted(n for n, _ in head) == sorted(ml.head_keys(arch))
    opt_p = ml.SGD(head, init_lr, momentum=0.9, weight_decay=wd)
    crit = paddle.nn.CrossEntropyLoss()
    losses_p, lrs_p = [], []
    for epoch in range(epochs):
        lrs_p.append(ml.adjust_learning_rate(opt_p, init_lr, epoch, epochs))
        losses_p += ml.train_one_epoch(batches_p, pmodel, crit, opt_p, epoch)['losses']

    assert lrs_p == lrs_t
    errs = {'losses': rel_l2(losses_p, losses_t)}
    kw = ml.linear_keyword(arch)
    head_t = {'weight': getattr(tmodel, kw).weight.detach().numpy(), 'bias': getattr(tmodel, kw).bias.detach().numpy()}
    head_p = _head_state_paddle(pmodel, arch)
    for k in head_t:
        errs[f'{kw}.{k}'] = rel_l2(head_p[k], head_t[k])
        assert not np.allclose(head_t[k], pre_t[f'{kw}.{k}'].numpy()), f'{kw}.{k} did not move'
    bufs_t = [opt_t.state[p]['momentum_buffer'].numpy() for p in (getattr(tmodel, kw).weight, getattr(tmodel, kw).bias)]
    errs['momentum buffer weight'] = rel_l2(opt_p.buffers[f'{kw}.weight'].numpy().T, bufs_t[0])
    errs['momentum buffer bias'] = rel_l2(opt_p.buffers[f'{kw}.bias'].numpy(), bufs_t[1])
    print(f'\n{arch} float64 rel L2:', {k: f'{v:.2e}' for k, v in errs.items()})
    assert max(errs.values()) <= TOL, errs

    # the official sanity check, on both sides: the backbone (BN running statistics included) is untouched
    tl.sanity_check(tmodel.state_dict(), {'module.base_encoder.' + k: v for k, v in pre_t.items()}, arch)
    ml.sanity_check(pmodel, pre_p, arch, set(pre_p) - ml.head_keys(arch))


def test_sanity_check_catches_a_changed_backbone():
    _, pmodel = _pair('vit_small', TINY_VIT)
    pre = {k: v.numpy().copy() for k, v in pmodel.state_dict().items()}
    w = pmodel.blocks[0].attn.qkv.weight
    w.set_value(w + 1e-3)
    with pytest.raises(ml.RunError, match='blocks.0.attn.qkv.weight changed'):
        ml.sanity_check(pmodel, pre, 'vit_small', set(pre) - ml.head_keys('vit_small'))


def test_freeze_and_head_init():
    paddle.seed(0)
    model = ml.build_classifier('resnet50', 100, 32)
    trainable = [n for n, p in model.named_parameters() if not p.stop_gradient]
    assert sorted(trainable) == ['fc.bias', 'fc.weight']
    w = model.fc.weight.numpy()
    assert abs(w.std() - 0.01) < 0.001 and abs(w.mean()) < 0.001
    assert not model.fc.bias.numpy().any()


def test_accuracy_matches_reference():
    rng = np.random.default_rng(0)
    out = rng.standard_normal((64, 10))
    tgt = rng.integers(0, 10, 64)
    ref = [v.item() for v in tl.accuracy(torch.from_numpy(out), torch.from_numpy(tgt), topk=(1, 5))]
    got = ml.accuracy(paddle.to_tensor(out), paddle.to_tensor(tgt), topk=(1, 5))
    assert np.allclose(got, ref)
    # fewer classes than k: top-k is capped (100% for k >= classes)
    assert ml.accuracy(paddle.to_tensor(out[:, :3]), paddle.to_tensor(tgt % 3), topk=(1, 5))[1] == 100.0


def test_sgd_state_round_trip():
    paddle.seed(0)
    layer = paddle.nn.Linear(4, 3)
    opt = ml.SGD(list(layer.named_parameters()), 0.1, 0.9, 1e-4)
    layer(paddle.ones([2, 4])).sum().backward()
    opt.step()
    state = opt.state_dict()
    opt2 = ml.SGD(list(layer.named_parameters()), 0.5, 0.9, 1e-4)
    opt2.set_state_dict(state)
    assert opt2.get_lr() == 0.1
    for k in state['accumulators']['velocity']:
        assert np.array_equal(opt2.buffers[k].numpy(), opt.buffers[k].numpy())


def test_checkpoint_format_shared_with_main_moco_and_convert():
    from paddle_impl import main_moco
    from convert import checkpoints
    assert main_moco.CHECKPOINT_FORMAT == ml.CHECKPOINT_FORMAT == checkpoints.FORMAT


# ---------------------------------------------------------------------------------------------- CLI

def test_cli_train_resume_evaluate(world):
    out = world['root'] / 'run'
    common = [world['data'], '-a', 'vit_small', '--pretrained', world['pretrain'], '-b', 8, '-j', 0, '--lr', 3,
              '--seed', 0, '--output-dir', out]
    r = run_cli('paddle_impl.main_lincls', common + ['--epochs', 2])
    assert r.returncode == 0, r.stderr[-2000:]
    assert 'sanity check passed' in r.stdout and "missing only ['head.bias', 'head.weight']" in r.stdout
    assert (out / 'checkpoint.pdparams').exists() and (out / 'model_best.pdparams').exists()
    ck = pio.load_checkpoint(str(out / 'checkpoint.pdparams'))
    assert ck['epoch'] == 2 and ck['kind'] == 'linear' and ck['num_classes'] == 3
    assert ck['vit_kwargs'] == TINY_VIT and ck['img_size'] == 32
    for k, v in world['backbone'].items():  # the backbone is the pre-trained one, bit for bit
        assert np.array_equal(ck['state_dict'][k], v), k
    assert ck['state_dict']['head.weight'].shape == (48, 3)

    r = run_cli('paddle_impl.main_lincls', common + ['--epochs', 3, '--resume', out / 'checkpoint.pdparams'])
    assert r.returncode == 0, r.stderr[-2000:]
    assert '(epoch 2, best acc@1' in r.stdout and 'epoch 2:' in r.stdout and 'epoch 1:' not in r.stdout
    assert pio.load_checkpoint(str(out / 'checkpoint.pdparams'))['epoch'] == 3

    r = run_cli('paddle_impl.main_lincls', [world['data'], '-a', 'vit_small', '-e', '--resume',
                                            out / 'model_best.pdparams', '-b', 8, '-j', 0])
    assert r.returncode == 0, r.stderr[-2000:]
    assert '* Acc@1' in r.stdout and '12 images' in r.stdout


def test_cli_bad_input_one_line_no_traceback(world):
    r = run_cli('paddle_impl.main_lincls', [world['data'], '--pretrained', world['pretrain'], '-j', 0])
    assert r.returncode == 2
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith('error: ') and 'Traceback' not in r.stderr, r.stderr
    assert 'holds a vit_small, not a resnet50' in lines[0] and 'pass -a vit_small' in lines[0]


def test_bad_inputs(world, tmp_path, capsys):
    data, pre = world['data'], world['pretrain']
    base = ['-a', 'vit_small', '-j', 0, '-b', 8, '--epochs', 1, '--output-dir', tmp_path / 'o']

    def err_of(argv):
        rc, err = call_main(ml.main, argv, capsys)
        assert rc == 2 and len(err) == 1 and err[0].startswith('error: '), (rc, err)
        return err[0]

    assert 'does not exist' in err_of([tmp_path / 'nowhere', '--pretrained', pre] + base)
    bad = make_data(tmp_path / 'badsplit', n_train=1, n_val=1, extra_val_class=True)
    assert 'differ' in err_of([bad, '--pretrained', pre] + base)
    junk = tmp_path / 'junk.pdparams'
    junk.write_bytes(b'not a checkpoint at all')
    assert 'junk.pdparams' in err_of([data, '--pretrained', junk] + base)

    class Evil:
        def __reduce__(self):
            return (os.system, ('touch ' + str(tmp_path / 'pwned'),))
    evil = tmp_path / 'evil.pdparams'
    evil.write_bytes(pickle.dumps({'state_dict': Evil()}, protocol=4))
    assert 'refused' in err_of([data, '--pretrained', evil] + base)
    assert not (tmp_path / 'pwned').exists()

    # a linear-classification file where a pre-training one is expected
    out = tmp_path / 'lin'
    rc, _ = call_main(ml.main, [data, '--pretrained', pre, '-a', 'vit_small', '-j', 0, '-b', 8, '--epochs', 1,
                                '--output-dir', out], capsys)
    assert rc == 0
    msg = err_of([data, '--pretrained', out / 'checkpoint.pdparams'] + base)
    assert 'linear-classification checkpoint' in msg and 'pre-training' in msg
    assert 'pass it as --pretrained' in err_of([data, '--resume', pre] + base)
    # the backbone does not fit (other --vit-* settings than the file's)
    msg = err_of([data, '--pretrained', pre, '--vit-embed-dim', '96', '--vit-num-heads', '3'] + base)
    assert 'does not fit' in msg or 'shape' in msg
    assert 'unknown arch' in err_of([data, '-a', 'vit_tiny', '-j', 0])
    assert '--epochs must be positive' in err_of([data, '--pretrained', pre, '-a', 'vit_small', '--epochs', 0])


def test_official_torch_files(world, tmp_path, capsys):
    """An official-layout PyTorch pre-training file is converted on the fly (through convert/); a linear one is
    refused as --pretrained and evaluated with -e --resume."""
    torch.manual_seed(0)
    moco = tm.build_moco('vit_small', 16, 32, 0.2, img_size=32)
    sd = {'module.' + k: v for k, v in moco.state_dict().items()}
    pre = tmp_path / 'vit-s-300ep.pth.tar'
    torch.save({'epoch': 300, 'arch': 'vit_small', 'state_dict': sd, 'optimizer': {}, 'scaler': {}}, pre)
    enc = tm.encoder_factory('vit_small', img_size=32)(num_classes=3)
    tl.prepare_linear_classifier(enc, 'vit_small')
    tl.load_pretrained(enc, sd, 'vit_small')
    opt, _ = tl.build_optimizer(enc, 3.0, 8)  # one official SGD step, so that the file holds momentum buffers
    tl.train([(torch.randn(2, 3, 32, 32), torch.tensor([0, 2]))], enc, torch.nn.CrossEntropyLoss(), opt)
    lin = tmp_path / 'linear-vit-s-300ep.pth.tar'
    torch.save({'epoch': 90, 'arch': 'vit_small', 'state_dict': {'module.' + k: v for k, v in enc.state_dict().items()},
                'best_acc1': 10.0, 'optimizer': opt.state_dict()}, lin)
    _, meta = ml.read_resume(str(lin))  # the official SGD state, as momentum buffers by parameter name
    vel = meta['optimizer']['accumulators']['velocity']
    assert np.array_equal(vel['head.weight'], opt.state[enc.head.weight]['momentum_buffer'].numpy().T)
    assert np.array_equal(vel['head.bias'], opt.state[enc.head.bias]['momentum_buffer'].numpy())

    rc, err = call_main(ml.main, [world['data'], '-a', 'vit_small', '--pretrained', lin, '-j', 0], capsys)
    assert rc == 2 and len(err) == 1 and 'linear-classification' in err[0] and 'pre-training' in err[0], err

    rc, err = call_main(ml.main, [world['data'], '-a', 'vit_small', '--pretrained', pre, '-e', '-b', 12, '-j', 0],
                        capsys)
    assert rc == 0, err

    args = ml.get_parser().parse_args([world['data'], '-a', 'vit_small', '-e', '--resume', str(lin), '-b', '12',
                                       '-j', '0'])
    res = ml.run(args)
    # the same classifier evaluated by torch on the same preprocessed images
    ds = ml.data_mod.ImageFolder(os.path.join(world['data'], 'val'), ml.loader_mod.build_lincls_transforms(32)[1])
    xs = torch.from_numpy(np.stack([ds[i][0] for i in range(len(ds))]))
    ys = torch.tensor([ds[i][1] for i in range(len(ds))])
    enc.eval()
    with torch.no_grad():
        acc_t = tl.accuracy(enc(xs), ys, topk=(1,))[0].item()
    assert abs(res['acc1'] - acc_t) < 1e-4, (res['acc1'], acc_t)


def test_linear_probe_random_backbone(world):
    out = ml.linear_probe(world['data'], pretrained=None, arch='vit_small', epochs=1, batch_size=8, img_size=32,
                          vit_kwargs=TINY_VIT)
    assert out['epochs_done'] == 1 and out['num_classes'] == 3 and 'model' not in out


def test_resume_continues_exactly(world, tmp_path):
    """2 epochs in one run == 1 epoch, then --resume for the second (classifier and momentum buffers bit for bit)."""
    base = [world['data'], '-a', 'vit_small', '--pretrained', world['pretrain'], '-b', 8, '-j', 0, '--seed', 5]

    def run(*extra):
        return ml.run(ml.get_parser().parse_args([str(v) for v in base + list(extra)]))
    a = run('--epochs', 2, '--output-dir', tmp_path / 'a')
    run('--epochs', 1, '--output-dir', tmp_path / 'b')
    b = run('--epochs', 2, '--output-dir', tmp_path / 'b', '--resume', tmp_path / 'b' / 'checkpoint.pdparams')
    assert np.array_equal(a['model'].head.weight.numpy(), b['model'].head.weight.numpy())
    ca = pio.load_checkpoint(str(tmp_path / 'a' / 'checkpoint.pdparams'))
    cb = pio.load_checkpoint(str(tmp_path / 'b' / 'checkpoint.pdparams'))
    va, vb = ca['optimizer']['accumulators']['velocity'], cb['optimizer']['accumulators']['velocity']
    assert all(np.array_equal(va[k], vb[k]) for k in va) and ca['best_acc1'] == cb['best_acc1']


def test_official_sgd_state_restored_or_told_why(tmp_path):
    """--resume of an official linear file: its SGD momentum buffers are restored into main_lincls' SGD; when its
    optimizer state cannot be used, one warning line says why (no exception swallowed in silence)."""
    import copy
    torch.manual_seed(0)
    enc = tm.encoder_factory('vit_small', img_size=32)(num_classes=3)  # official files name known archs only
    tl.prepare_linear_classifier(enc, 'vit_small')
    opt, _ = tl.build_optimizer(enc, 3.0, 8)
    tl.train([(torch.randn(2, 3, 32, 32), torch.tensor([0, 2]))], enc, torch.nn.CrossEntropyLoss(), opt)
    sd = {'module.' + k: v for k, v in enc.state_dict().items()}
    bad_opt = copy.deepcopy(opt.state_dict())
    bad_opt['state'] = {0: {'momentum_buffer': torch.zeros(7)}}  # a buffer of the wrong shape for head.weight
    files = {}
    for name, o in (('good', opt.state_dict()), ('bad', bad_opt), ('none', None)):
        files[name] = tmp_path / f'linear-{name}.pth.tar'
        torch.save({'epoch': 90, 'arch': 'vit_small', 'state_dict': sd, 'best_acc1': 10.0,
                    **({'optimizer': o} if o is not None else {})}, files[name])

    class Log:
        lines = []

        def warning(self, msg):
            self.lines.append(msg)

    def fresh_sgd():
        model = ml.build_classifier('vit_small', 3, 32)
        return ml.SGD([(n, p) for n, p in model.named_parameters() if not p.stop_gradient], 0.1)

    _, meta = ml.read_resume(str(files['good']))
    sgd, log = fresh_sgd(), Log()
    assert ml.restore_sgd_state(sgd, meta, files['good'], log) is True and log.lines == []
    np.testing.assert_array_equal(sgd.buffers['head.weight'].numpy(),
                                  opt.state[enc.head.weight]['momentum_buffer'].numpy().T)
    np.testing.assert_array_equal(sgd.buffers['head.bias'].numpy(), opt.state[enc.head.bias]['momentum_buffer'].numpy())
    for name in ('bad', 'none'):
        log.lines = []
        try:
            _, meta = ml.read_resume(str(files[name]))
        except ml.RunError as e:  # refusing the file with one line is telling why, too
            assert str(files[name]) in str(e) and '\n' not in str(e)
            continue
        sgd = fresh_sgd()
        try:
            if ml.restore_sgd_state(sgd, meta, files[name], log):
                raise AssertionError(f'{name}: a state that does not fit was restored')
        except ml.RunError as e:  # a state that does not fit: exit 2 with one line naming the file
            assert str(files[name]) in str(e) and '\n' not in str(e)
            continue
        assert len(log.lines) == 1 and 'the SGD state is not restored (' in log.lines[0], log.lines
        assert meta['optimizer_note'] and meta['optimizer_note'] in log.lines[0] and sgd.buffers == {}
