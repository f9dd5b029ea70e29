"""RNG state in checkpoints (paddle_impl.utils.rng_state / set_rng_state).

- Resuming where the number of visible GPUs differs from the run that saved (8 -> 4, 2 -> 4, 8 -> 0):
  the states that match are restored, one warning line names the rest, nothing raises. Paddle's per-GPU
  generators are replaced by fakes (this machine has no GPU); the saved "GPU" states are real
  GeneratorState tuples.
- The state is plain data (no numpy arrays), so plain ``paddle.load`` reads every checkpoint that holds it
  (issue 15: numpy's uint32 MT19937 key made it fail); files written before (uint32 array) still resume.
- End to end: a main_moco, a main_lincls and a main_finetune checkpoint from tiny runs load with plain
  ``paddle.load`` and give the same content as paddle_impl.io.load_checkpoint (the safe loader).
"""
import logging
import os
import random
import subprocess
import sys

import numpy as np
import paddle
import pytest

from paddle_impl import io as pio
from paddle_impl import utils

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class FakeGpuGenerator:
    """Stands in for paddle.base.core.default_cuda_generator(i): get_state / set_state of a GeneratorState."""

    def __init__(self, seed):
        g = paddle.base.core.default_cpu_generator()
        saved = g.get_state()
        g.manual_seed(seed)
        self.state = g.get_state()
        g.set_state(saved)
        self.restored = None

    def get_state(self):
        return self.state

    def set_state(self, s):
        self.restored = s.__getstate__()
        self.state = s


def _saved_gpu_states(n, base=100):
    return [FakeGpuGenerator(base + i).get_state().__getstate__() for i in range(n)]


@pytest.mark.parametrize('saved,visible', [(8, 4), (2, 4), (4, 4), (8, 1)])
def test_gpu_count_changes_restore_what_matches(saved, visible, caplog):
    states = _saved_gpu_states(saved)
    gens = [FakeGpuGenerator(1000 + i) for i in range(visible)]
    fresh = [g.state.__getstate__() for g in gens]
    with caplog.at_level(logging.WARNING, logger=utils.LOGGER_NAME):
        n = utils._restore_gpu_states(states, gens)
    k = min(saved, visible)
    assert n == k
    for i, g in enumerate(gens):
        if i < k:
            assert g.restored == tuple(states[i])
        else:
            assert g.restored is None and g.state.__getstate__() == fresh[i]
    warns = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    if saved == visible:
        assert warns == []
    else:
        assert len(warns) == 1 and '\n' not in warns[0]
        assert f'holds {saved} GPU generator states' in warns[0] and f'sees {visible} GPUs' in warns[0]


def test_set_rng_state_with_mocked_gpus(monkeypatch, caplog):
    """The whole set_rng_state path: an 8-GPU state resumed where 4 GPUs are visible, and on a CPU-only
    process (0 visible: every GPU state unused, one warning); the CPU/numpy/Python states are restored."""
    st = utils.rng_state()
    st['paddle_gpu'] = _saved_gpu_states(8)
    want_np = np.random.rand(3)
    want_py = random.random()
    for visible in (4, 0):
        gens = [FakeGpuGenerator(7 + i) for i in range(visible)]
        monkeypatch.setattr(utils, '_gpu_generators', lambda gens=gens: gens)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger=utils.LOGGER_NAME):
            utils.set_rng_state(st)
        assert np.array_equal(np.random.rand(3), want_np) and random.random() == want_py
        assert [g.restored for g in gens] == [tuple(s) for s in st['paddle_gpu'][:visible]]
        assert len([r for r in caplog.records if r.levelno >= logging.WARNING]) == 1


def test_rng_state_is_plain_data_and_round_trips(tmp_path):
    def leaves(o):
        if isinstance(o, dict):
            for v in o.values():
                yield from leaves(v)
        elif isinstance(o, (list, tuple)):
            for v in o:
                yield from leaves(v)
        else:
            yield o
    st = utils.rng_state()
    bad = {type(x).__name__ for x in leaves(st) if not isinstance(x, (int, float, str, type(None)))}
    assert not bad, bad
    path = str(tmp_path / 'rng.pdparams')
    pio.save_checkpoint({'rng': st}, path)
    want = (np.random.rand(4), random.random(), paddle.rand([3]).numpy())
    np.random.rand(5), random.random(), paddle.rand([2])  # move every generator on
    plain = paddle.load(path)  # reads it (issue 15); the safe loader gives the same
    assert plain['rng']['numpy'] == pio.load_checkpoint(path)['rng']['numpy'] == st['numpy']
    utils.set_rng_state(pio.load_checkpoint(path)['rng'])
    got = (np.random.rand(4), random.random(), paddle.rand([3]).numpy())
    assert np.array_equal(got[0], want[0]) and got[1] == want[1] and np.array_equal(got[2], want[2])


def test_old_checkpoint_with_uint32_numpy_state_still_resumes(tmp_path):
    """Files written before this change hold np.random.get_state() as it is (a uint32 array)."""
    old = {'python': random.getstate(), 'numpy': np.random.get_state(),
           'paddle_cpu': [g.__getstate__() for g in paddle.get_rng_state('cpu')]}
    assert old['numpy'][1].dtype == np.uint32
    path = str(tmp_path / 'old.pdparams')
    pio.save_checkpoint({'rng': old}, path)
    with pytest.raises(ValueError):  # what issue 15 saw with such a file
        paddle.load(path)
    want = np.random.rand(6)
    np.random.rand(9)
    utils.set_rng_state(pio.load_checkpoint(path)['rng'])
    assert np.array_equal(np.random.rand(6), want)
    # and the tensor paddle.load(return_numpy=False) cannot make does not matter: a list of ints is accepted
    utils.set_rng_state({'numpy': [old['numpy'][0], old['numpy'][1].tolist(), *old['numpy'][2:]]})
    assert np.array_equal(np.random.rand(6), want)


# ------------------------------------------------------------------------ checkpoints of the three CLIs

def _same(a, b, where='ckpt'):
    """Differences between plain paddle.load's result ``a`` (tensors) and the safe loader's ``b`` (arrays)."""
    if isinstance(a, paddle.Tensor):
        a = a.numpy()
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        a, b = np.asarray(a), np.asarray(b)
        ok = a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b, equal_nan=a.dtype.kind == 'f')
        return [] if ok else [f'{where}: {a.dtype}{a.shape} vs {b.dtype}{b.shape}']
    if isinstance(a, dict):
        if not isinstance(b, dict) or set(a) != set(b):
            return [f'{where}: keys differ']
        return [d for k in a for d in _same(a[k], b[k], f'{where}[{k!r}]')]
    if isinstance(a, (list, tuple)):
        if type(a) is not type(b) or len(a) != len(b):
            return [f'{where}: {type(a).__name__} vs {type(b).__name__}']
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in _same(x, y, f'{where}[{i}]')]
    same = type(a) is type(b) and (a == b or (isinstance(a, float) and a != a and b != b))
    return [] if same else [f'{where}: {a!r} vs {b!r}']


def _run(module, args):
    env = dict(os.environ, OMP_NUM_THREADS='2', PYTHONPATH=REPO)
    r = subprocess.run([sys.executable, '-m', module, *[str(a) for a in args]], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, r.stderr[-3000:]


@pytest.fixture(scope='module')
def cli_checkpoints(tmp_path_factory):
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from test_lincls import make_data
    from test_main_moco import make_images
    root = tmp_path_factory.mktemp('rng_ckpt')
    pre_data = make_images(str(root / 'pre'), per_class=4)
    data = make_data(str(root / 'cls'), n_train=4, n_val=2)
    moco = root / 'moco'
    _run('paddle_impl.main_moco', [pre_data, '-a', 'vit_small', '--vit-patch-size', 8, '--vit-embed-dim', 32,
                                   '--vit-depth', 1, '--vit-num-heads', 2, '--moco-dim', 16, '--moco-mlp-dim', 32,
                                   '--img-size', 32, '-b', 4, '--epochs', 1, '--warmup-epochs', 1, '-j', 0,
                                   '--seed', 0, '--output-dir', moco])
    pre = moco / 'checkpoint_0000.pdparams'
    common = ['-a', 'vit_small', '-b', 4, '-j', 0, '--epochs', 1]
    _run('paddle_impl.main_lincls', [data, *common, '--pretrained', pre, '--lr', 3, '--seed', 0,
                                     '--output-dir', root / 'lin'])
    _run('paddle_impl.main_finetune', [data, *common, '--finetune', pre, '--lr', 1e-3, '--warmup-epochs', 1,
                                       '--output-dir', root / 'ft'])
    return {'moco': pre, 'lincls': root / 'lin' / 'checkpoint.pdparams',
            'lincls_best': root / 'lin' / 'model_best.pdparams', 'finetune': root / 'ft' / 'checkpoint.pdparams',
            'finetune_best': root / 'ft' / 'model_best.pdparams'}


@pytest.mark.parametrize('kind', ['moco', 'lincls', 'lincls_best', 'finetune', 'finetune_best'])
def test_plain_paddle_load_reads_cli_checkpoints(cli_checkpoints, kind):
    path = str(cli_checkpoints[kind])
    safe = pio.load_checkpoint(path)
    plain = paddle.load(path)
    assert not _same(plain, safe)[:5]
    if kind in ('moco', 'finetune'):  # the RNG state is inside, as plain data
        rng = safe['rng'] if kind == 'moco' else safe['rank_states'][0]['rng']
        assert isinstance(rng['numpy'][1], list) and len(rng['numpy'][1]) == 624
