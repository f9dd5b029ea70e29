"""Bad inputs across the four command lines (main_moco, main_lincls, main_finetune, python -m convert), and
untrusted files through every loader of ours.

Each row of CASES is one thing a user may get wrong. Every one must end with exit status 2 and exactly one line
on stderr, 'error: ...', naming the file or flag (argparse rows: its own 'usage:' line, then one 'error:' line
naming the flag), no traceback; and nothing already on disk may change: the checkpoints, metrics and converted
files of earlier runs are hashed before and after every row (only log.txt may grow). Rows already covered by
other test files are not repeated here (README's table names those tests).

Untrusted files: a crafted pickle that creates MARKER when unpickled, as a .pdparams and inside a PyTorch
zip (.pth.tar), handed to main_moco --resume, main_lincls --pretrained/--resume, main_finetune
--finetune/--resume (convert's four sub-commands: tests/test_convert.py::test_crafted_pickles_never_run). The
fixture first proves that the payload works (a plain pickle.loads creates the marker), then removes the marker.

Rows marked 'subprocess' run the real program with a time limit: a folder without any readable image used to
hang main_moco / main_lincls / main_finetune forever with -j 0 (Paddle's single-process DataLoader runs the
dataset in a thread whose exception is never passed on).
"""
import hashlib
import os
import pathlib
import pickle
import shutil
import subprocess
import sys
import zipfile

import numpy as np
import pytest

from test_lincls import make_data
from test_main_moco import REPO, TINY_VIT, _env

MOCO = [*TINY_VIT, '-b', '4', '--epochs', '2', '-j', '0', '--seed', '0']  # TINY_VIT: the tiny ViT and MLP dims
CLS = ['-a', 'vit_small', '-b', '4', '--epochs', '1', '-j', '0']


class Evil:
    """Unpickling this creates ``marker``: what a crafted checkpoint would do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def _torch_zip_with(obj, path):
    """A file laid out as torch.save writes it (zip: archive/data.pkl, byteorder, version), made without torch."""
    with zipfile.ZipFile(path, 'w', zipfile.ZIP_STORED) as z:
        z.writestr('archive/data.pkl', pickle.dumps(obj, protocol=2))
        z.writestr('archive/byteorder', 'little')
        z.writestr('archive/version', '3\n')


def _run_main(module, argv, capsys):
    import importlib
    main = importlib.import_module(module).main
    capsys.readouterr()
    try:
        rc = main([str(a) for a in argv])
    except SystemExit as e:  # argparse
        rc = e.code
    cap = capsys.readouterr()
    return rc, cap.err


def _truncate(src, dst):
    data = open(src, 'rb').read()
    open(dst, 'wb').write(data[: len(data) // 2])
    return str(dst)


@pytest.fixture(scope='module')
def w(tmp_path_factory):
    """Data folders (good, corrupt, mismatched), real checkpoints of the three trainers, crafted files."""
    root = tmp_path_factory.mktemp('bad_inputs')
    d = {'root': root, 'data': make_data(root / 'data', classes=2, n_train=4, n_val=2, size=36)}
    from paddle_impl import main_finetune, main_lincls, main_moco
    d['moco_out'] = root / 'moco_out'
    assert main_moco.main([d['data'], *MOCO, '--max-steps', '1', '--output-dir', str(d['moco_out'])]) == 0
    d['moco_ck'] = str(d['moco_out'] / 'checkpoint_0000.pdparams')
    d['lin_out'] = root / 'lin_out'
    assert main_lincls.main([d['data'], *CLS, '--pretrained', d['moco_ck'], '--output-dir', str(d['lin_out'])]) == 0
    d['lin_ck'] = str(d['lin_out'] / 'checkpoint.pdparams')
    d['ft_out'] = root / 'ft_out'
    assert main_finetune.main([d['data'], *CLS, '--finetune', d['moco_ck'], '--output-dir', str(d['ft_out'])]) == 0
    d['ft_ck'] = str(d['ft_out'] / 'checkpoint.pdparams')

    files = root / 'files'
    files.mkdir()
    d['marker'] = files / 'MARKER'
    payload = {'format': 'mocov3-paddle/1', 'kind': 'pretrain', 'epoch': 1, 'arch': 'vit_small',
               'state_dict': {'w': np.ones(2, np.float32)}, 'x': Evil(d['marker'])}
    d['evil_pd'] = str(files / 'evil.pdparams')
    with open(d['evil_pd'], 'wb') as f:
        pickle.dump(payload, f, protocol=4)
    d['evil_pth'] = str(files / 'evil.pth.tar')
    _torch_zip_with(payload, d['evil_pth'])
    pickle.loads(open(d['evil_pd'], 'rb').read())  # the payload is live: an unsafe load runs it
    assert d['marker'].exists()
    d['marker'].unlink()
    d['trunc_moco'] = _truncate(d['moco_ck'], files / 'trunc_moco.pdparams')
    d['trunc_lin'] = _truncate(d['lin_ck'], files / 'trunc_lin.pdparams')
    d['trunc_ft'] = _truncate(d['ft_ck'], files / 'trunc_ft.pdparams')
    d['empty'] = str(files / 'empty.pdparams')
    open(d['empty'], 'wb').close()
    d['folder'] = str(files / 'a_folder.pdparams')
    os.mkdir(d['folder'])
    d['afile'] = str(files / 'notes.txt')
    open(d['afile'], 'w').write('not images\n')
    d['existing_out'] = str(files / 'converted.safetensors')  # a file an earlier conversion wrote
    open(d['existing_out'], 'wb').write(b'earlier output')

    # --resume auto where the newest checkpoint was cut short (copied by hand, a disk error ...)
    d['auto_out'] = root / 'auto_out'
    shutil.copytree(d['moco_out'], d['auto_out'])
    _truncate(d['moco_ck'], d['auto_out'] / 'checkpoint_0001.pdparams')

    # image folders: nothing readable; train unreadable only; val classes differ
    bad = root / 'corrupt'
    for split in ('train', 'val'):
        for c in ('a', 'b'):
            os.makedirs(bad / split / c)
            for i in range(4):
                (bad / split / c / f'{i}.png').write_bytes(b'not a png' * (i + 1))
    d['corrupt'] = str(bad)
    d['corrupt_train'] = str(root / 'corrupt_train')
    for c, name in (('a', 'c0'), ('b', 'c1')):  # the class names of the good val/
        shutil.copytree(bad / 'train' / c, root / 'corrupt_train' / 'train' / name)
    shutil.copytree(os.path.join(d['data'], 'val'), root / 'corrupt_train' / 'val')
    d['mismatch'] = make_data(root / 'mismatch', classes=2, n_train=2, n_val=1, extra_val_class=True)
    return d


# id: (module, argv(w), the text the error line must hold[, 'subprocess'])
MM, ML, MF, CV = 'paddle_impl.main_moco', 'paddle_impl.main_lincls', 'paddle_impl.main_finetune', 'convert.__main__'
CASES = {
    # ------------------------------------------------------------------ main_moco
    'moco-resume-crafted-pdparams': (MM, lambda w: [w['data'], *MOCO, '--resume', w['evil_pd'], '--output-dir',
                                                    w['moco_out']], "refused: its pickle asks for 'pathlib"),
    'moco-resume-crafted-pth': (MM, lambda w: [w['data'], *MOCO, '--resume', w['evil_pth'], '--output-dir',
                                               w['moco_out']],
                                "is a PyTorch checkpoint, not a Paddle one: convert it with 'python -m convert"),
    'moco-resume-truncated': (MM, lambda w: [w['data'], *MOCO, '--resume', w['trunc_moco'], '--output-dir',
                                             w['moco_out']], "trunc_moco.pdparams' is corrupt or truncated"),
    'moco-resume-empty-file': (MM, lambda w: [w['data'], *MOCO, '--resume', w['empty'], '--output-dir',
                                              w['moco_out']], "empty.pdparams' is not a checkpoint"),
    'moco-resume-folder': (MM, lambda w: [w['data'], *MOCO, '--resume', w['folder'], '--output-dir', w['moco_out']],
                           'a_folder.pdparams: not a file'),
    'moco-resume-auto-truncated-newest': (MM, lambda w: [w['data'], *MOCO, '--resume', 'auto', '--output-dir',
                                                         w['auto_out']],
                                          "checkpoint_0001.pdparams' is corrupt or truncated: UnpicklingError: "
                                          'pickle data was truncated (picked by --resume auto as the highest-'
                                          'numbered checkpoint in'),
    'moco-resume-linear-checkpoint': (MM, lambda w: [w['data'], *MOCO, '--resume', w['lin_ck'], '--output-dir',
                                                     w['moco_out']],
                                      'is a linear-classification checkpoint (main_lincls), not a pre-training one'),
    'moco-resume-finetune-checkpoint': (MM, lambda w: [w['data'], *MOCO, '--resume', w['ft_ck'], '--output-dir',
                                                       w['moco_out']], 'is a fine-tuning checkpoint (main_finetune)'),
    'moco-resume-other-width': (MM, lambda w: [w['data'], *MOCO, '--vit-embed-dim', '48', '--resume', w['moco_ck'],
                                               '--output-dir', w['moco_out']],
                                'in the model; use the --vit-*/--moco-*/--img-size settings it was trained with'),
    'moco-data-is-a-file': (MM, lambda w: [w['afile'], *MOCO, '--output-dir', w['moco_out']],
                            'notes.txt is not a folder'),
    'moco-only-corrupt-images-j0': (MM, lambda w: [w['corrupt'], *MOCO, '--output-dir', w['moco_out']],
                                    'no readable image among the 8 files under', 'subprocess'),
    'moco-only-corrupt-images-j2': (MM, lambda w: [w['corrupt'], *MOCO, '-j', '2', '--output-dir', w['moco_out']],
                                    'no readable image among the 8 files under'),
    'moco-batch-zero': (MM, lambda w: [w['data'], *MOCO, '-b', '0'], '--batch-size must be positive, got 0'),
    'moco-batch-negative': (MM, lambda w: [w['data'], *MOCO, '-b', '-4'], '--batch-size must be positive, got -4'),
    'moco-epochs-zero': (MM, lambda w: [w['data'], *MOCO, '--epochs', '0'], '--epochs must be positive, got 0'),
    'moco-workers-negative': (MM, lambda w: [w['data'], *MOCO, '-j', '-1'], '--workers must not be negative'),
    'moco-lr-negative': (MM, lambda w: [w['data'], *MOCO, '--lr', '-0.1'], '--lr must be positive, got -0.1'),
    'moco-lr-nan': (MM, lambda w: [w['data'], *MOCO, '--lr', 'nan'], '--lr must be positive, got nan'),
    'moco-wd-negative': (MM, lambda w: [w['data'], *MOCO, '--wd', '-0.5'], '--wd must not be negative'),
    'moco-temperature-nan': (MM, lambda w: [w['data'], *MOCO, '--moco-t', 'nan'], '--moco-t must be positive'),
    'moco-momentum-one': (MM, lambda w: [w['data'], *MOCO, '--momentum', '1'], '--momentum must be in [0, 1)'),
    'moco-optimizer-unknown': (MM, lambda w: [w['data'], *MOCO, '--optimizer', 'sgd'],
                               "argument --optimizer: invalid choice: 'sgd'"),
    'moco-batch-not-a-number': (MM, lambda w: [w['data'], *MOCO, '-b', 'abc'],
                                "argument -b/--batch-size: invalid int value: 'abc'"),
    # ------------------------------------------------------------------ main_lincls
    'lincls-pretrained-crafted-pth': (ML, lambda w: [w['data'], *CLS, '--pretrained', w['evil_pth'], '--output-dir',
                                                     w['lin_out']], "evil.pth.tar' refused: its pickle asks for"),
    'lincls-pretrained-truncated': (ML, lambda w: [w['data'], *CLS, '--pretrained', w['trunc_moco'], '--output-dir',
                                                   w['lin_out']], "trunc_moco.pdparams' is corrupt or truncated"),
    'lincls-pretrained-folder': (ML, lambda w: [w['data'], *CLS, '--pretrained', w['folder'], '--output-dir',
                                                w['lin_out']], "a_folder.pdparams' is a folder, not a checkpoint"),
    'lincls-resume-crafted-pdparams': (ML, lambda w: [w['data'], *CLS, '--resume', w['evil_pd'], '--output-dir',
                                                      w['lin_out']], "evil.pdparams' refused: its pickle asks for"),
    'lincls-resume-crafted-pth': (ML, lambda w: [w['data'], *CLS, '--resume', w['evil_pth'], '--output-dir',
                                                 w['lin_out']], "evil.pth.tar' refused: its pickle asks for"),
    'lincls-resume-truncated': (ML, lambda w: [w['data'], *CLS, '--resume', w['trunc_lin'], '--output-dir',
                                               w['lin_out']], "trunc_lin.pdparams' is corrupt or truncated"),
    'lincls-resume-missing': (ML, lambda w: [w['data'], *CLS, '--resume', str(w['root'] / 'nope.pdparams'),
                                             '--output-dir', w['lin_out']], "nope.pdparams': no such file"),
    'lincls-resume-finetune-checkpoint': (ML, lambda w: [w['data'], *CLS, '--resume', w['ft_ck'], '--output-dir',
                                                         w['lin_out']], 'is a fine-tuning checkpoint'),
    'lincls-no-val-folder': (ML, lambda w: [w['corrupt_train'] + '/train', *CLS,
                                            '--pretrained', w['moco_ck'], '--output-dir', w['lin_out']],
                             'has no val/ sub-folder'),
    'lincls-num-classes-too-small': (ML, lambda w: [w['data'], *CLS, '--pretrained', w['moco_ck'], '--num-classes',
                                                    '1', '--output-dir', w['lin_out']],
                                     '--num-classes 1 is smaller than the 2 class folders'),
    'lincls-batch-zero': (ML, lambda w: [w['data'], *CLS, '-b', '0'], '--batch-size must be positive, got 0'),
    'lincls-workers-negative': (ML, lambda w: [w['data'], *CLS, '-j', '-2'], '--workers must not be negative'),
    'lincls-lr-zero': (ML, lambda w: [w['data'], *CLS, '--lr', '0'], '--lr must be positive'),
    'lincls-only-corrupt-images-j0': (ML, lambda w: [w['corrupt'], *CLS, '--pretrained', w['moco_ck'],
                                                     '--output-dir', w['lin_out']],
                                      'no readable image among the 8 files under', 'subprocess'),
    'lincls-only-corrupt-train-j2': (ML, lambda w: [w['corrupt_train'], *CLS, '-j', '2', '--pretrained',
                                                    w['moco_ck'], '--output-dir', w['lin_out']],
                                     'corrupt_train/train (first failure'),
    'lincls-evaluate-corrupt-val': (ML, lambda w: [w['corrupt'], *CLS, '-e', '--resume', w['lin_ck']],
                                    'corrupt/val (first failure'),
    # ------------------------------------------------------------------ main_finetune
    'finetune-finetune-crafted-pdparams': (MF, lambda w: [w['data'], *CLS, '--finetune', w['evil_pd'],
                                                          '--output-dir', w['ft_out']], 'refused: its pickle asks for'),
    'finetune-finetune-crafted-pth': (MF, lambda w: [w['data'], *CLS, '--finetune', w['evil_pth'],
                                                     '--output-dir', w['ft_out']], 'refused: its pickle asks for'),
    'finetune-resume-crafted-pdparams': (MF, lambda w: [w['data'], *CLS, '--resume', w['evil_pd'],
                                                        '--output-dir', w['ft_out']], 'refused: its pickle asks for'),
    'finetune-resume-crafted-pth': (MF, lambda w: [w['data'], *CLS, '--resume', w['evil_pth'], '--output-dir',
                                                   w['ft_out']], 'is not a fine-tuning checkpoint of this port'),
    'finetune-finetune-truncated': (MF, lambda w: [w['data'], *CLS, '--finetune', w['trunc_moco'], '--output-dir',
                                                   w['ft_out']], "trunc_moco.pdparams' is corrupt or truncated"),
    'finetune-resume-truncated': (MF, lambda w: [w['data'], *CLS, '--resume', w['trunc_ft'], '--output-dir',
                                                 w['ft_out']], "trunc_ft.pdparams' is corrupt or truncated"),
    'finetune-train-val-mismatch': (MF, lambda w: [w['mismatch'], *CLS, '--finetune', w['moco_ck'],
                                                   '--output-dir', w['ft_out']], 'only in val: zz'),
    'finetune-clip-grad-negative': (MF, lambda w: [w['data'], *CLS, '--clip-grad', '-1'],
                                    '--clip-grad must be positive'),
    'finetune-batch-zero': (MF, lambda w: [w['data'], *CLS, '-b', '0'], '--batch-size must be positive, got 0'),
    'finetune-mixup-negative': (MF, lambda w: [w['data'], *CLS, '--mixup', '-0.5'], '--mixup must not be negative'),
    'finetune-only-corrupt-images-j0': (MF, lambda w: [w['corrupt'], *CLS, '--finetune', w['moco_ck'],
                                                       '--output-dir', w['ft_out']],
                                        'no readable image among the 8 files under', 'subprocess'),
    'finetune-only-corrupt-train-j2': (MF, lambda w: [w['corrupt_train'], *CLS, '-j', '2', '--finetune',
                                                      w['moco_ck'], '--output-dir', w['ft_out']],
                                       'corrupt_train/train (first failure'),
    # ------------------------------------------------------------------ python -m convert
    'convert-inspect-empty-file': (CV, lambda w: ['inspect', w['empty']], "empty.pdparams' is not a checkpoint"),
    'convert-inspect-folder': (CV, lambda w: ['inspect', w['folder']], "a_folder.pdparams' is a folder"),
    'convert-paddle2torch-truncated': (CV, lambda w: ['paddle2torch', '--input', w['trunc_lin'], '--output',
                                                      w['existing_out']], 'is corrupt or truncated'),
    'convert-extract-truncated': (CV, lambda w: ['extract', '--input', w['trunc_moco'], '--output',
                                                 w['existing_out']], 'is corrupt or truncated'),
    'convert-img-size-zero': (CV, lambda w: ['torch2paddle', '--input', w['evil_pth'], '--output', w['existing_out'],
                                             '--img-size', '0'], "argument --img-size: 0 is not a positive image size"),
}


def _watched(w):
    """Every file of the earlier runs and of the inputs, hashed (log.txt may grow: not watched)."""
    out = {}
    for key in ('moco_out', 'lin_out', 'ft_out', 'auto_out'):
        for name in sorted(os.listdir(w[key])):
            p = os.path.join(w[key], name)
            if os.path.isfile(p) and name != 'log.txt':
                out[p] = hashlib.sha256(open(p, 'rb').read()).hexdigest()
    for p in sorted((w['root'] / 'files').iterdir()):
        if p.is_file():
            out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


@pytest.mark.parametrize('case', list(CASES))
def test_bad_input(case, w, capsys, tmp_path, monkeypatch):
    module, make_argv, expect, *how = CASES[case]
    argv = [str(a) for a in make_argv(w)]
    before = _watched(w)
    monkeypatch.chdir(tmp_path)  # the default --output-dir '.' is a fresh folder
    if how == ['subprocess']:  # the real program, with a time limit (these used to hang with -j 0)
        r = subprocess.run([sys.executable, '-m', module, *argv], cwd=tmp_path, env=_env(), capture_output=True,
                           text=True, timeout=180)
        rc, err = r.returncode, r.stderr
    else:
        rc, err = _run_main(module, argv, capsys)
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 2, (rc, err[-3000:])
    assert 'Traceback' not in err, err[-3000:]
    if lines and lines[0].startswith('usage:'):  # argparse: its usage, then one error line naming the flag
        assert lines[-1].split(': error: ', 1)[-1].startswith('argument '), lines
        assert expect in lines[-1], lines[-1]
    else:
        assert len(lines) == 1 and lines[0].startswith('error: '), lines
        assert expect in lines[0], lines[0]
    assert _watched(w) == before  # nothing already on disk changed or went missing
    assert not w['marker'].exists()
    print(f'\n{case}: {lines[-1]}')


def test_crafted_files_reach_every_loader_and_run_nothing(w, capsys):
    """Task 5 in one place: both crafted files through each loader of the three trainers (the convert
    sub-commands: test_convert.py::test_crafted_pickles_never_run); none runs the payload."""
    loaders = [(MM, '--resume'), (ML, '--pretrained'), (ML, '--resume'), (MF, '--finetune'), (MF, '--resume')]
    base = {MM: MOCO, ML: CLS, MF: CLS}
    out = {MM: w['moco_out'], ML: w['lin_out'], MF: w['ft_out']}
    tried = 0
    for module, flag in loaders:
        for f in (w['evil_pd'], w['evil_pth']):
            rc, err = _run_main(module, [w['data'], *base[module], flag, f, '--output-dir', out[module]], capsys)
            assert rc == 2 and err.count('\n') == 1 and os.path.basename(f) in err, err
            assert not w['marker'].exists()
            tried += 1
    from paddle_impl import io as pio
    for f in (w['evil_pd'], w['evil_pth']):  # and the library loaders directly
        for loader in (pio.load_checkpoint, pio.load_torch_file_safe):
            with pytest.raises(pio.CheckpointError):
                loader(f)
            tried += 1
    assert not w['marker'].exists()
    print(f'\ncrafted files: {tried} loads refused, marker never created')


def test_corrupt_image_among_good_ones_is_skipped_with_a_warning(w, tmp_path):
    """Not an error: one unreadable file among good ones is skipped with a warning naming it; training goes on."""
    data = tmp_path / 'data'
    shutil.copytree(w['data'], data)
    bad = data / 'train' / 'c0' / 'broken.png'
    bad.write_bytes(b'\x89PNG\r\n\x1a\n' + b'\x00' * 40)  # a PNG signature, then nothing valid
    r = subprocess.run([sys.executable, '-m', MM, str(data), *MOCO, '--output-dir',
                        str(tmp_path / 'out')], cwd=REPO, env=_env(), capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr[-3000:]
    assert 'Traceback' not in r.stderr
    assert f'CorruptImageWarning: skipping unreadable image {bad}' in r.stderr
    assert (tmp_path / 'out' / 'checkpoint_0000.pdparams').exists()
