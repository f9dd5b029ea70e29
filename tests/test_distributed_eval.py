"""main_lincls and main_finetune on 2 CPU processes (paddle.distributed.launch, gloo): the validation set is
sharded so that every image is evaluated exactly once (no padding: 9 images -> 5 + 4), and the all-reduced
loss / top-1 / top-5 equal those of one process evaluating the same checkpoint.

The checkpoints come from a short 1-process training run of each CLI; both evaluations (-e / --eval with
--resume) read the same file, so each rank holds the same weights."""
import os
import re

import numpy as np
import pytest

from paddle_impl import main_finetune as mf
from paddle_impl import main_lincls as ml

from parity import distributed as D
from test_lincls import TINY_FLAGS, make_data, make_pretrain

N_VAL_PER_CLASS, CLASSES = 3, 3  # 9 val images: odd, so an even split or a padding sampler would show
LINE = re.compile(r'\* Acc@1 (\d+\.\d+) Acc@5 (\d+\.\d+)\s+\(loss (\d+\.\d+), (\d+) images\)')


class _Seq:
    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        if not 0 <= i < self.n:
            raise IndexError(i)
        return i


@pytest.mark.parametrize('world', [1, 2, 3, 4])
def test_val_subset_covers_every_index_once(world):
    for n in range(0, 12):
        shares = [[s[i] for i in range(len(s))] for s in (ml.val_subset(_Seq(n), r, world) for r in range(world))]
        flat = sorted(i for s in shares for i in s)
        assert flat == list(range(n)), (n, world, shares)
        assert max(len(s) for s in shares) - min(len(s) for s in shares) <= 1


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
    """One checkpoint of each CLI, from 1 epoch on one process (lincls: a tiny lr, so its top-1 stays below
    100%: measured 66.7%, finetune 66.7%)."""
    root = tmp_path_factory.mktemp('dist_eval')
    data = make_data(root / 'data', classes=CLASSES, n_train=8, n_val=N_VAL_PER_CLASS)
    pre = root / 'pretrain.pdparams'
    make_pretrain(pre)
    common = [data, '-a', 'vit_small', *TINY_FLAGS, '-b', '8', '-j', '0', '--epochs', '1', '--seed', '0']
    ml.run(ml.get_parser().parse_args([str(a) for a in common + ['--pretrained', pre, '--lr', '0.01',
                                                                    '--output-dir', root / 'lin']]))
    mf.run(mf.get_parser().parse_args([str(a) for a in common + ['--finetune', pre, '--lr', '1e-3',
                                                                    '--warmup-epochs', '0',
                                                                    '--output-dir', root / 'ft']]))
    return {'root': root, 'data': data, 'lincls': str(root / 'lin' / 'checkpoint.pdparams'),
            'finetune': str(root / 'ft' / 'checkpoint.pdparams')}


CLIS = {'lincls': (ml, 'paddle_impl/main_lincls.py', '-e'), 'finetune': (mf, 'paddle_impl/main_finetune.py', '--eval')}


@pytest.mark.parametrize('cli', sorted(CLIS))
def test_two_process_eval_equals_one_process(trained, cli, tmp_path):
    mod, script, eval_flag = CLIS[cli]
    args = [trained['data'], '-a', 'vit_small', '-b', '4', '-j', '0', eval_flag, '--resume', trained[cli]]
    one = mod.run(mod.get_parser().parse_args([str(a) for a in args + ['--output-dir', tmp_path / 'one']]))

    r = D.launch_paddle([script, *args, '--output-dir', tmp_path / 'two'], nproc=2, log_dir=tmp_path / 'log',
                        timeout=300)
    logs = D.worker_logs(str(tmp_path / 'log'))
    assert r.returncode == 0, f'{r.stderr[-2000:]}\n{logs}'
    with open(tmp_path / 'log' / 'workerlog.0') as f:  # rank 0's output (evaluation writes no log.txt)
        found = LINE.findall(f.read())
    assert len(found) == 1, logs
    acc1, acc5, loss, count = float(found[0][0]), float(found[0][1]), float(found[0][2]), int(found[0][3])
    n_val = CLASSES * N_VAL_PER_CLASS
    assert count == n_val, f'2 processes evaluated {count} images, the val set has {n_val}'
    assert 0 < one['acc1'] < 100, 'a top-1 of 0 or 100 would not show a duplicated or missing image'
    # the log line shows 3 (acc) and 4 (loss) decimals: equal to one process's values at that precision
    assert acc1 == pytest.approx(one['acc1'], abs=6e-4) and acc5 == pytest.approx(one['acc5'], abs=6e-4)
    assert loss == pytest.approx(one['val_loss'], abs=6e-5)
    # and one process's numbers are those of a plain loop over all 9 images (what a per-image duplicate or a
    # dropped image would change): top-1 is a multiple of 100/9
    assert np.isclose(one['acc1'] * n_val / 100.0, round(one['acc1'] * n_val / 100.0), atol=1e-6)
    print(f'\n{cli}: 1 proc acc1 {one["acc1"]:.3f} loss {one["val_loss"]:.4f}; 2 proc acc1 {acc1:.3f} '
          f'loss {loss:.4f} over {count} images')
