"""paddle_impl.io: atomic writes, our safe .pdparams, safetensors, and reading torch files without torch."""
import collections
import os
import pathlib
import pickle
import subprocess
import zipfile

import numpy as np
import paddle
import pytest
import torch

from paddle_impl import io as pio
from paddle_impl.io import CheckpointError


class Evil:
    """Unpickling this creates ``marker``: what a crafted checkpoint would do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def _nested():
    return {'epoch': 7, 'arch': 'vit_small', 'lr': 0.25, 'flag': True, 'none': None, 'name': 'x',
            'blob': b'\x00\x01', 'tuple': (1, 2.5, 'a'), 'list': [1, [2, {'k': np.float32(3)}]],
            'state_dict': {'w': np.arange(6, dtype=np.float32).reshape(2, 3), 'i': np.array(3, dtype=np.int64),
                           'h': np.ones(4, dtype=np.float16), 'b': np.array([True, False])},
            7: 'int key'}


def _equal(a, b):
    if isinstance(a, np.ndarray):
        return isinstance(b, np.ndarray) and a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and list(a) == list(b) and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


def test_save_load_roundtrip_and_paddle_load_compatible(tmp_path):
    obj = _nested()
    p = tmp_path / 'ck.pdparams'
    pio.save_checkpoint(obj, p)
    assert _equal(pio.load_checkpoint(p), obj)
    # the same bytes paddle.save writes for plain data: paddle.load reads ours (trusted files; it cannot
    # take bytes values)
    q = tmp_path / 'plain.pdparams'
    pio.save_checkpoint({'epoch': 1, 'state_dict': obj['state_dict']}, q)
    back = paddle.load(str(q))
    assert np.array_equal(np.asarray(back['state_dict']['w']), obj['state_dict']['w'])
    os.unlink(q)
    assert [f for f in os.listdir(tmp_path)] == ['ck.pdparams']  # no temporary left
    assert oct(os.stat(p).st_mode & 0o777) != oct(0o600)


def test_paddle_tensors_saved_as_arrays(tmp_path):
    lin = paddle.nn.Linear(3, 2)
    p = tmp_path / 'lin.pdparams'
    pio.save_checkpoint({'state_dict': lin.state_dict(), 'epoch': 1}, p)
    got = pio.load_checkpoint(p)
    assert isinstance(got['state_dict']['weight'], np.ndarray)
    assert np.array_equal(got['state_dict']['weight'], lin.weight.numpy())


def test_reads_paddle_save_files(tmp_path):
    """paddle.save of a state dict (name table) and of nested dicts ((name, array) tuples)."""
    lin = paddle.nn.Linear(3, 2)
    f1, f2 = tmp_path / 'a.pdparams', tmp_path / 'b.pdparams'
    paddle.save(lin.state_dict(), str(f1))
    paddle.save({'epoch': 3, 'state_dict': lin.state_dict(), 'lst': [1, 'x', 2.0], 't': (1, 2), 'none': None,
                 'opt': {'lr': 0.1}}, str(f2))
    a = pio.load_checkpoint(f1)
    assert set(a) == {'weight', 'bias'} and np.array_equal(a['weight'], lin.weight.numpy())
    b = pio.load_checkpoint(f2)
    assert b['epoch'] == 3 and b['lst'] == [1, 'x', 2.0] and b['t'] == (1, 2) and b['none'] is None
    assert np.array_equal(b['state_dict']['bias'], lin.bias.numpy())


def test_refuses_objects_on_save(tmp_path):
    with pytest.raises(CheckpointError, match='cannot save an object'):
        pio.save_checkpoint({'x': object()}, tmp_path / 'x.pdparams')
    assert os.listdir(tmp_path) == []


def test_missing_folder_and_unwritable(tmp_path):
    with pytest.raises(CheckpointError, match='does not exist'):
        pio.save_checkpoint({'a': 1}, tmp_path / 'nope' / 'x.pdparams')
    assert not (tmp_path / 'nope').exists()
    ro = tmp_path / 'ro'
    ro.mkdir()
    mounted = False
    if os.geteuid() == 0:  # root writes through permissions: a read-only tmpfs instead
        mounted = subprocess.run(['mount', '-t', 'tmpfs', '-o', 'size=64k,ro', 'tmpfs', str(ro)],
                                 capture_output=True).returncode == 0
        if not mounted:
            pytest.skip('running as root where mounting is not allowed: no folder is read-only to root')
    else:
        ro.chmod(0o500)
    try:
        with pytest.raises(CheckpointError, match='not writable'):
            pio.save_checkpoint({'a': 1}, ro / 'x.pdparams')
        assert os.listdir(ro) == []
    finally:
        if mounted:
            subprocess.run(['umount', str(ro)], capture_output=True)
        else:
            ro.chmod(0o700)


def test_failed_write_keeps_old_file(tmp_path):
    p = tmp_path / 'keep.pdparams'
    pio.save_checkpoint({'v': 1}, p)

    def boom(f):
        f.write(b'partial')
        raise RuntimeError('disk full')
    with pytest.raises(RuntimeError):
        pio.atomic_write(p, boom)
    assert pio.load_checkpoint(p) == {'v': 1}
    assert os.listdir(tmp_path) == ['keep.pdparams']

    def refuse(tmp):
        raise CheckpointError('checked and refused')
    with pytest.raises(CheckpointError):
        pio.save_checkpoint({'v': 2}, p, before_replace=refuse)
    assert pio.load_checkpoint(p) == {'v': 1} and os.listdir(tmp_path) == ['keep.pdparams']


def test_safetensors_roundtrip(tmp_path):
    sd = {'a': np.arange(6, dtype=np.float32).reshape(2, 3), 'n': np.array(5, dtype=np.int64),
          't': np.arange(6, dtype=np.float64).reshape(3, 2).T}  # non-contiguous
    p = tmp_path / 'w.safetensors'
    pio.save_checkpoint(sd, p, metadata={'arch': 'vit_small', 'epoch': 3})
    got, meta = pio.load_safetensors(p)
    assert all(_equal(got[k], sd[k]) for k in sd) and meta == {'arch': 'vit_small', 'epoch': '3'}
    assert _equal(pio.load_checkpoint(p)['n'], sd['n'])
    with pytest.raises(CheckpointError, match='holds only arrays'):
        pio.save_checkpoint({'a': {'nested': np.ones(1)}}, tmp_path / 'bad.safetensors')


def _torch_obj():
    lin = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    opt = torch.optim.AdamW(lin.parameters())
    lin(torch.ones(4, 3)).sum().backward()
    opt.step()
    base = torch.arange(24.).reshape(4, 6)
    return {'epoch': 1, 'arch': 'x', 'state_dict': lin.state_dict(), 'optimizer': opt.state_dict(),
            'scaler': torch.amp.GradScaler('cpu').state_dict(),
            'view': base[1:, 2:5].t(), 'same_storage': base[0], 'bf16': torch.tensor([1.5, -2.25], dtype=torch.bfloat16),
            'f16': torch.ones(2, dtype=torch.float16), 'i32': torch.arange(3, dtype=torch.int32),
            'bool': torch.tensor([True, False]), 'param': torch.nn.Parameter(torch.ones(2)),
            'size': torch.Size([2, 3]), 'bytes': b'xy', 'empty': torch.zeros(0, 3), 'scalar': torch.tensor(2.5),
            'od': collections.OrderedDict(a=1)}


def _to_np(o):
    if isinstance(o, torch.Tensor):
        o = o.detach()
        return (o.float() if o.dtype == torch.bfloat16 else o).numpy()
    if isinstance(o, torch.Size):
        return tuple(o)
    if isinstance(o, dict):
        return {k: _to_np(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return type(o)(_to_np(v) for v in o)
    return o


def test_torch_file_without_torch_matches_torch_load(tmp_path):
    p = tmp_path / 't.pth.tar'
    torch.save(_torch_obj(), p)
    mine = pio.load_torch_file_safe(p)
    ref = _to_np(torch.load(p, weights_only=True))
    assert _equal(mine, ref)
    assert mine['bf16'].dtype == np.float32 and list(mine['bf16']) == [1.5, -2.25]


def test_torch_file_with_namespace(tmp_path):
    import argparse
    p = tmp_path / 'deit.pth'
    torch.save({'model': {'w': torch.ones(2)}, 'args': argparse.Namespace(lr=0.1, model='vit')}, p)
    got = pio.load_torch_file_safe(p)
    assert got['args'] == {'lr': 0.1, 'model': 'vit'} and type(got['args']) is dict


def test_torch_legacy_format_is_named(tmp_path):
    p = tmp_path / 'old.pth'
    torch.save({'w': torch.ones(2)}, p, _use_new_zipfile_serialization=False)
    with pytest.raises(CheckpointError, match='legacy'):
        pio.load_torch_file_safe(p)
    with pytest.raises(CheckpointError, match='legacy'):
        pio.load_checkpoint(p)


@pytest.mark.parametrize('fmt', ['pdparams', 'torch-zip', 'raw-pickle-as-pth'])
def test_crafted_pickles_are_refused_and_not_run(tmp_path, fmt):
    marker = tmp_path / 'MARKER'
    if fmt == 'pdparams':
        p = tmp_path / 'evil.pdparams'
        with open(p, 'wb') as f:
            pickle.dump({'state_dict': {'w': np.ones(2)}, 'x': Evil(marker)}, f, protocol=4)
    elif fmt == 'torch-zip':
        p = tmp_path / 'evil.pth.tar'
        torch.save({'state_dict': {'w': torch.ones(2)}, 'x': Evil(marker)}, p)
    else:
        p = tmp_path / 'evil.pth.tar'
        with open(p, 'wb') as f:
            pickle.dump(Evil(marker), f, protocol=2)
    assert not marker.exists()
    for loader in (pio.load_checkpoint, pio.load_torch_file_safe, pio.load_safetensors):
        with pytest.raises(CheckpointError) as e:
            loader(p)
        assert str(p) in str(e.value) and '\n' not in str(e.value)
        assert not marker.exists()
    with pytest.raises(CheckpointError, match='refused'):
        (pio.load_torch_file_safe if fmt == 'torch-zip' else pio.load_checkpoint)(p)
    assert not marker.exists()
    # the facts this module exists for: torch.load(weights_only=True) refuses too; paddle.load would run it
    with pytest.raises(Exception):
        torch.load(p, weights_only=True)
    assert not marker.exists()


def test_corrupt_files(tmp_path):
    rnd = tmp_path / 'random.pth.tar'
    rnd.write_bytes(np.random.default_rng(0).bytes(5000))
    for loader in (pio.load_checkpoint, pio.load_torch_file_safe, pio.load_safetensors):
        with pytest.raises(CheckpointError, match='not'):
            loader(rnd)
    full = tmp_path / 'full.pth.tar'
    torch.save({'state_dict': {'w': torch.ones(1000)}}, full)
    cut = tmp_path / 'cut.pth.tar'
    cut.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    with pytest.raises(CheckpointError, match='corrupt or truncated'):
        pio.load_torch_file_safe(cut)
    ours = tmp_path / 'ours.pdparams'
    pio.save_checkpoint({'w': np.ones(1000)}, ours)
    cut2 = tmp_path / 'cut.pdparams'
    cut2.write_bytes(ours.read_bytes()[:3000])
    with pytest.raises(CheckpointError, match='truncated'):
        pio.load_checkpoint(cut2)
    st = tmp_path / 'w.safetensors'
    pio.save_checkpoint({'w': np.ones(1000)}, st)
    cut3 = tmp_path / 'cut.safetensors'
    cut3.write_bytes(st.read_bytes()[:2000])
    with pytest.raises(CheckpointError):
        pio.load_safetensors(cut3)
    with pytest.raises(CheckpointError, match='does not exist'):
        pio.load_checkpoint(tmp_path / 'missing.pdparams')


def test_torch_zip_geometry_is_bounds_checked(tmp_path):
    """A tensor whose size/stride reaches past its storage is refused, never read out of bounds."""
    p = tmp_path / 'ok.pth'
    torch.save({'w': torch.ones(4)}, p)
    with zipfile.ZipFile(p) as z:
        names = z.namelist()
        files = {n: z.read(n) for n in names}
    pkl = [n for n in names if n.endswith('data.pkl')][0]
    # the pickle stores size (4,) as BININT1 4 then TUPLE1; make it 400
    data = files[pkl]
    i = data.index(b'K\x04\x85')
    files[pkl] = data[:i] + b'M\x90\x01\x85' + data[i + 3:]
    bad = tmp_path / 'bad.pth'
    with zipfile.ZipFile(bad, 'w', zipfile.ZIP_STORED) as z:
        for n in names:
            z.writestr(n, files[n])
    with pytest.raises(CheckpointError, match='past the end'):
        pio.load_torch_file_safe(bad)
