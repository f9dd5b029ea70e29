"""Reliability of pre-training (paddle_impl/main_moco.py) on the CPU: SIGKILL at random moments and in mid-save
with `--resume auto` continuing each time, exact resume (epoch boundary and mid-epoch, 0 and 2 loader workers),
run-to-run determinism, and a full or unwritable disk.

Tiny settings (those of test_main_moco.py): 24 generated 40x40 images in 3 classes, 32x32 input, a ViT of width
32 / depth 1 / patch 8, MLP dims 16/32; batch 2, so an epoch is 12 iterations and 2 epochs are 24 steps.

Figures for the README come from the lines these tests print (pytest -s): 'kill test: ...'.
"""
import errno
import hashlib
import os
import random
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from test_main_moco import PY, REPO, TINY_VIT, _env, load, make_images, steps

COMMON = ['-b', '2', '--epochs', '2', '--warmup-epochs', '1', '-p', '1', '--seed', '0', '--moco-m-cos',
          '--crop-min', '0.2']
ITERS = 12  # 24 images / batch 2
CKPT_TMP = re.compile(r'^\.checkpoint_\d+\.pdparams\..+\.tmp$')  # paddle_impl.io.atomic_write's temporary names


def run_cli(args, timeout=240, **env):
    return subprocess.run([PY, '-m', 'paddle_impl.main_moco', *map(str, args)], cwd=REPO, env=_env(**env),
                          capture_output=True, text=True, timeout=timeout)


def moco_args(data_dir, out, workers=0, *extra):
    return [data_dir, *TINY_VIT, *COMMON, '-j', str(workers), '--output-dir', str(out), *map(str, extra)]


def assert_same_run(out, ref):
    """Same step records (global step, epoch, iteration, loss, lr, m: exact floats) and the same final
    weights and optimizer state, bit for bit."""
    assert steps(out) == steps(ref)
    a = load(os.path.join(ref, 'checkpoint_0001.pdparams'))
    b = load(os.path.join(out, 'checkpoint_0001.pdparams'))
    assert (b['epoch'], b['iteration'], b['global_step']) == (2, 0, 2 * ITERS)
    assert a['state_dict'].keys() == b['state_dict'].keys()
    for k, v in a['state_dict'].items():
        np.testing.assert_array_equal(v, b['state_dict'][k], err_msg=k)
    for acc, per in a['optimizer']['accumulators'].items():
        for k, v in per.items():
            np.testing.assert_array_equal(v, b['optimizer']['accumulators'][acc][k], err_msg=f'{acc} {k}')


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
    return make_images(tmp_path_factory.mktemp('data'))


@pytest.fixture(scope='module')
def straight(data_dir, tmp_path_factory):
    """Two epochs in one go, no loader workers: the reference of every test here."""
    out = tmp_path_factory.mktemp('straight')
    r = run_cli(moco_args(data_dir, out))
    assert r.returncode == 0, r.stderr[-3000:]
    return str(out)


# --------------------------------------------------------------------------------------- determinism

def test_same_seed_same_losses(straight, data_dir, tmp_path):
    """Two runs with the same seed on the same machine: the same losses (exact), the same weights (bitwise)."""
    r = run_cli(moco_args(data_dir, tmp_path))
    assert r.returncode == 0, r.stderr[-3000:]
    assert len(steps(straight)) == 2 * ITERS
    assert [s[3] for s in steps(tmp_path)] == [s[3] for s in steps(straight)]
    assert_same_run(str(tmp_path), straight)


# --------------------------------------------------------------------------------------- exact resume

def test_resume_at_epoch_boundary_equals_straight_run(straight, data_dir, tmp_path):
    """E=2: one epoch, stop, then --resume auto for the second == two epochs straight (no loader workers)."""
    r = run_cli(moco_args(data_dir, tmp_path, 0, '--max-steps', ITERS))
    assert r.returncode == 0, r.stderr[-3000:]
    ck = load(tmp_path / 'checkpoint_0000.pdparams')
    assert (ck['epoch'], ck['iteration'], ck['global_step']) == (1, 0, ITERS)
    assert not (tmp_path / 'checkpoint_0001.pdparams').exists()
    r = run_cli(moco_args(data_dir, tmp_path, 0, '--resume', 'auto'))
    assert r.returncode == 0, r.stderr[-3000:]
    assert f'global step {ITERS})' in r.stdout
    assert_same_run(str(tmp_path), straight)


def test_resume_mid_epoch_and_at_boundary_with_workers(straight, data_dir, tmp_path):
    """With 2 loader worker processes: stop in mid-epoch (after 5 of 12 iterations), resume to the epoch's end,
    stop, resume to the end == the straight run with no workers (data order and augmentations are drawn from
    (seed, epoch, index), not from the workers' generators)."""
    r = run_cli(moco_args(data_dir, tmp_path, 2, '--max-steps', 5))
    assert r.returncode == 0, r.stderr[-3000:]
    ck = load(tmp_path / 'checkpoint_0000.pdparams')
    assert (ck['epoch'], ck['iteration'], ck['global_step']) == (0, 5, 5)
    r = run_cli(moco_args(data_dir, tmp_path, 2, '--resume', 'auto', '--max-steps', ITERS - 5))
    assert r.returncode == 0, r.stderr[-3000:]
    assert '(epoch 0, iteration 5, global step 5)' in r.stdout
    ck = load(tmp_path / 'checkpoint_0000.pdparams')
    assert (ck['epoch'], ck['iteration'], ck['global_step']) == (1, 0, ITERS)
    r = run_cli(moco_args(data_dir, tmp_path, 2, '--resume', 'auto'))
    assert r.returncode == 0, r.stderr[-3000:]
    assert_same_run(str(tmp_path), straight)


# --------------------------------------------------------------------------------------- SIGKILL

def _ls(folder):
    return os.listdir(folder) if os.path.isdir(folder) else []


def _newest(out):
    from paddle_impl.main_moco import find_latest_checkpoint  # what --resume auto picks
    return find_latest_checkpoint(str(out))


def _reached(out):
    recs = [s[0] for s in steps(out)] if os.path.exists(os.path.join(out, 'metrics.jsonl')) else []
    return max(recs, default=0)


def _ckpt_step(path):
    return int(load(path)['global_step']) if path else 0


def test_sigkill_at_random_moments_then_resume_auto(straight, data_dir, tmp_path):
    """Six SIGKILLs (seeded): three in mid-save (MOCO_DEBUG_SLOW_SAVE holds the written temporary file 0.5 s
    before its rename; the kill comes at the 1st-3rd save of the run), two at a random moment of training,
    one during start-up. Every restart is the same command with --resume auto. After each kill: every
    checkpoint file is loadable, none was lost, at most one temporary file (that crash's) is there and
    --resume auto does not pick it, and the newest checkpoint is at most one step (--save-freq 1) behind the
    step reached. Meanwhile the newest checkpoint is read again and again while the run writes it. At the end,
    the run equals the straight one bit for bit."""
    rng = random.Random(20240601)
    out = tmp_path / 'out'
    args = [PY, '-m', 'paddle_impl.main_moco', *moco_args(data_dir, out, 0, '--save-freq', 1, '--resume', 'auto')]
    plan = ['save', 'random', 'startup', 'save', 'random', 'save']
    stats = {'kills': 0, 'kills_in_save': 0, 'resumes': 0, 'steps_lost': 0, 'reads_while_writing': 0,
             'files_lost': 0, 'leftover_removed': 0}
    rounds = []  # (what, step reached, step of the newest checkpoint, temporary file left)
    ever = set()  # checkpoint names seen so far
    prev_step = 0
    t0 = time.time()
    for k, what in enumerate(plan + ['finish']):
        before = set(_ls(out))
        log_path = tmp_path / f'round{k}.log'
        env = _env(PYTHONUNBUFFERED=1, MOCO_DEBUG_SLOW_SAVE=0.5 if what == 'save' else 0.02)
        with open(log_path, 'w') as log:
            p = subprocess.Popen(args, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            killed = False
            if what == 'startup':
                time.sleep(rng.uniform(0.5, 2.0))
                killed = p.poll() is None
            elif what in ('save', 'random'):
                nth = rng.randint(1, 3)
                delay = rng.uniform(0.0, 0.3)
                tmps_seen, polls, deadline = set(), 0, time.time() + 120
                while p.poll() is None and time.time() < deadline:
                    if what == 'save':
                        tmps_seen |= {n for n in _ls(out) if CKPT_TMP.match(n)} - before
                        if len(tmps_seen) >= nth:  # the nth save of this run is between write and rename
                            break
                    elif 'Epoch: [' in log_path.read_text():
                        time.sleep(delay)
                        break
                    polls += 1
                    if polls % 25 == 0:  # a reader sees complete checkpoints only, even in mid-save
                        newest = _newest(out)
                        if newest:
                            load(newest)
                            stats['reads_while_writing'] += 1
                    time.sleep(0.002)
                killed = p.poll() is None
            if killed:
                p.send_signal(signal.SIGKILL)
            rc = p.wait(timeout=240)
        finally:
            if p.poll() is None:
                p.kill()
        text = log_path.read_text()
        assert 'Traceback' not in text, text[-3000:]
        if k > 0 and prev_step:
            if 'loaded checkpoint' in text:
                stats['resumes'] += 1
                assert f'global step {prev_step})' in text, text[-2000:]
        stats['leftover_removed'] += text.count('temporary file(s) of an interrupted save')

        names = set(_ls(out))
        ckpts = sorted(n for n in names if re.match(r'^checkpoint_\d+\.pdparams$', n))
        for n in ckpts:  # every checkpoint file there is complete
            assert load(out / n)['kind'] == 'pretrain'
        stats['files_lost'] += len(ever - set(ckpts))
        ever |= set(ckpts)
        tmps = [n for n in names if CKPT_TMP.match(n)]
        assert len(tmps) <= 1, tmps  # this crash's leftover at most: the earlier ones were removed at start
        assert not [n for n in names if n.endswith('.tmp') and not CKPT_TMP.match(n) and n != 'metrics.jsonl.tmp']
        newest = _newest(out)
        assert newest is None or not CKPT_TMP.match(os.path.basename(newest))
        step = _ckpt_step(newest)
        assert step >= prev_step  # progress is never undone
        if what == 'finish':
            assert rc == 0, text[-3000:]
            assert not tmps
            break
        if not killed:  # finished before its kill (a very slow or very fast machine): stop the plan here
            assert rc == 0, text[-3000:]
            break
        assert rc == -signal.SIGKILL
        stats['kills'] += 1
        if tmps:
            stats['kills_in_save'] += 1
        lost = _reached(out) - step
        assert 0 <= lost <= 1, (what, _reached(out), step)  # --save-freq 1: one step at most is redone
        rounds.append((what, _reached(out), step, bool(tmps)))
        stats['steps_lost'] += lost
        prev_step = step
    stats['seconds'] = round(time.time() - t0, 1)
    print(f'\nkill test: {stats}\nkill test rounds (kind, step reached, newest checkpoint step, temporary file '
          f'left): {rounds}')
    assert stats['kills'] == len(plan) and stats['kills_in_save'] >= 3 and stats['files_lost'] == 0
    assert stats['resumes'] >= 4
    assert_same_run(str(out), straight)


# --------------------------------------------------------------------------------------- disks

def _mount_tmpfs(path, size_kb, ro=False):
    """A small tmpfs at ``path``; False when this machine does not let us mount (not root, no CAP_SYS_ADMIN)."""
    os.makedirs(path, exist_ok=True)
    opts = f'size={size_kb}k' + (',ro' if ro else '')
    r = subprocess.run(['mount', '-t', 'tmpfs', '-o', opts, 'tmpfs', str(path)], capture_output=True, text=True)
    return r.returncode == 0


def _open_files():
    """The paths this process holds open."""
    out = []
    for fd in os.listdir('/proc/self/fd'):
        try:
            out.append(os.readlink(f'/proc/self/fd/{fd}'))
        except OSError:  # the listing's own descriptor
            pass
    return out


def _umount(path):
    r = subprocess.run(['umount', str(path)], capture_output=True, text=True)
    if r.returncode != 0:
        subprocess.run(['umount', '-l', str(path)], capture_output=True)  # never leave a mount behind
        raise AssertionError(f'{path} still in use after the run ({r.stderr.strip()}); open here: '
                             f'{[f for f in _open_files() if f.startswith(str(path))]}')


def test_no_file_left_open_after_an_in_process_run(data_dir, tmp_path, capsys):
    """main() called in-process (a notebook, a sweep) releases its output folder: log.txt is closed when it
    returns, on success and on an error, so the folder can be unmounted, moved or deleted."""
    from paddle_impl import main_moco
    out = tmp_path / 'out'
    rc, err = _in_process(main_moco.main, [*moco_args(data_dir, out), '--no-vdl'], capsys)
    assert rc == 0 and os.path.exists(out / 'log.txt'), err
    assert not [f for f in _open_files() if f.startswith(str(out))]
    rc, err = _in_process(main_moco.main, [*moco_args(data_dir, out), '--no-vdl', '--resume', out / 'nothing'],
                          capsys)
    assert rc == 2 and len(err) == 1, err
    assert not [f for f in _open_files() if f.startswith(str(out))]


def _digest(folder):
    return {n: hashlib.sha256(open(os.path.join(folder, n), 'rb').read()).hexdigest()
            for n in sorted(os.listdir(folder)) if os.path.isfile(os.path.join(folder, n))}


def _in_process(main, argv, capsys):
    capsys.readouterr()
    rc = main([str(a) for a in argv])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    return rc, err


@pytest.mark.parametrize('cli', ['main_moco', 'main_lincls', 'main_finetune'])
def test_unwritable_output_dir_fails_before_training(cli, data_dir, tmp_path, capsys):
    """A read-only --output-dir (a read-only tmpfs where mounting is allowed; else a folder without write
    permission, or a skip as root): one line naming the folder, exit 2, before any model is built."""
    import importlib
    main = importlib.import_module(f'paddle_impl.{cli}').main
    ro = tmp_path / 'ro'
    mounted = _mount_tmpfs(ro, 64, ro=True)
    try:
        if not mounted:
            if os.geteuid() == 0:  # root writes through permissions: only a read-only mount stops it
                pytest.skip('running as root where mounting is not allowed: no folder is read-only to root')
            ro.mkdir(exist_ok=True)
            ro.chmod(0o500)
        data = data_dir
        if cli != 'main_moco':  # these need val/ too: the train images serve as both
            data = tmp_path / 'tv'
            os.makedirs(data)
            os.symlink(os.path.join(data_dir, 'train'), data / 'train')
            os.symlink(os.path.join(data_dir, 'train'), data / 'val')
        argv = [data, '-a', 'vit_small', '-b', 8, '-j', 0, '--output-dir', ro]
        t = time.time()
        rc, err = _in_process(main, argv, capsys)
        assert rc == 2 and len(err) == 1 and err[0].startswith('error: --output-dir') and 'not writable' in err[0], err
        assert time.time() - t < 20
    finally:
        if mounted:
            _umount(ro)
        elif os.path.isdir(tmp_path / 'ro'):
            (tmp_path / 'ro').chmod(0o700)


def test_output_dir_too_small_fails_before_training(data_dir, tmp_path, capsys, monkeypatch):
    """Less free space than one checkpoint needs: one line with both sizes, exit 2, no training step taken.
    A 200 KiB tmpfs where mounting is allowed (the tiny model's checkpoint is ~0.3 MB), else disk_usage is
    made to say 200 KiB."""
    from paddle_impl import main_moco
    small = tmp_path / 'small'
    mounted = _mount_tmpfs(small, 200)
    try:
        if not mounted:
            small.mkdir()
            import shutil
            real = shutil.disk_usage
            monkeypatch.setattr(shutil, 'disk_usage', lambda p: real(p)._replace(free=200 * 1024))
        rc, err = _in_process(main_moco.main, [*moco_args(data_dir, small / 'out'), '--save-freq', 1], capsys)
        assert rc == 2 and len(err) == 1, err
        assert re.match(r'error: --output-dir .* has 0\.\d+ MiB free, a checkpoint of this model needs about '
                        r'0\.\d+ MiB; free space or choose another folder$', err[0]), err
        assert not os.path.exists(small / 'out' / 'metrics.jsonl')
        assert not [n for n in os.listdir(small / 'out') if 'checkpoint' in n]
    finally:
        if mounted:
            _umount(small)


@pytest.mark.parametrize('how', ['tmpfs', 'injected'])
def test_disk_full_during_save_keeps_last_checkpoint(how, data_dir, tmp_path, capsys, monkeypatch):
    """The disk fills up in mid-run (--save-freq 1: the 2nd save needs room for a second copy while the first
    is still in place). 'tmpfs': a real 450 KiB file system where mounting is allowed (else skipped, with the
    reason); 'injected': the pickle writer raises ENOSPC half-way through the 2nd checkpoint. Either way:
    exit 2, one line naming the file, the cause and the last checkpoint; that checkpoint byte-identical to
    what it was before the failed save; no temporary file left."""
    from paddle_impl import io as pio
    from paddle_impl import main_moco
    root = tmp_path / 'disk'
    mounted = how == 'tmpfs' and _mount_tmpfs(root, 450)
    if how == 'tmpfs' and not mounted:  # never a silent copy of the injected case
        pytest.skip('mounting a tmpfs is not allowed here (needs root or CAP_SYS_ADMIN): no real full disk')
    real_save, snapshots = pio.save_checkpoint, {}

    def recording_save(obj, path, *a, **kw):  # what the target held just before each save
        snapshots[path] = open(path, 'rb').read() if os.path.exists(path) else None
        return real_save(obj, path, *a, **kw)
    monkeypatch.setattr(pio, 'save_checkpoint', recording_save)
    if not mounted:
        root.mkdir()
        import pickle
        real_dump, calls = pickle.dump, []

        def dump_until_full(obj, f, *a, **kw):
            calls.append(1)
            if len(calls) < 2:
                return real_dump(obj, f, *a, **kw)
            data = pickle.dumps(obj, *a, **kw)
            f.write(data[: len(data) // 2])
            f.flush()
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        monkeypatch.setattr(pio.pickle, 'dump', dump_until_full)
    try:
        out = root / 'out'
        rc, err = _in_process(main_moco.main, [*moco_args(data_dir, out), '--save-freq', 1, '--no-vdl'], capsys)
        ck = str(out / 'checkpoint_0000.pdparams')
        assert rc == 2 and len(err) == 1, err
        assert err[0] == (f"error: cannot write '{ck}': No space left on device; last checkpoint: {ck} (intact); "
                          f"free space or choose another --output-dir (then move the checkpoints there), and "
                          f"rerun with --resume auto"), err
        assert snapshots[ck] is not None and open(ck, 'rb').read() == snapshots[ck]
        c = load(ck)
        assert (c['epoch'], c['iteration'], c['global_step']) == (0, 1, 1)
        assert sorted(os.listdir(out)) == ['checkpoint_0000.pdparams', 'log.txt', 'metrics.jsonl']
        print(f'\ndisk full ({"tmpfs" if mounted else "injected ENOSPC"}): {err[0][:90]}...')
    finally:
        if mounted:
            _umount(root)


def test_disk_full_while_logging_metrics(data_dir, tmp_path, capsys, monkeypatch):
    """metrics.jsonl cannot be appended to (ENOSPC injected at its 3rd record): exit 2, one line, and the
    checkpoint of the last step saved is intact."""
    from paddle_impl import main_moco, utils
    real_write, calls = utils.MetricsWriter.write, []

    def write(self, record):
        calls.append(1)
        if len(calls) == 3:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(self, record)
    monkeypatch.setattr(utils.MetricsWriter, 'write', write)
    out = tmp_path / 'out'
    rc, err = _in_process(main_moco.main, [*moco_args(data_dir, out), '--save-freq', 1], capsys)
    assert rc == 2 and len(err) == 1, err
    assert err[0] == (f'error: cannot write a file in --output-dir {out}: No space left on device; the checkpoints '
                      f'written so far are intact: fix the cause and rerun with --resume auto'), err
    c = load(out / 'checkpoint_0000.pdparams')
    assert (c['epoch'], c['iteration'], c['global_step']) == (0, 2, 2)
