"""Distributed semantics on two CPU processes (gloo), against one process holding the whole batch.

1. float64, from the same seeded weights (parity/distributed.py): Paddle on 2 processes (paddle.distributed
   .launch) == Paddle on 1; torch_ref on 2 (gloo, DistributedDataParallel, torch_ref.distributed's CPU
   SyncBN) == torch_ref on 1; Paddle 2 == torch 2. Loss (keys gathered, labels offset by rank), the
   DDP-averaged gradients, BN running statistics under SyncBN, and every parameter after 3 optimizer steps,
   for vit_small (depth 2, AdamW) and ResNet-50 (LARS) at 32 px, to a relative L2 of 1e-9. Planted
   mistakes (BN not synchronised, labels not offset) change the loss, so the equalities are not vacuous.
2. The CLI (paddle_impl/main_moco.py, float32): a chain 2 proc -> 2 proc (resumes its own checkpoint) ->
   1 proc (resumes the 2-process checkpoint in mid-epoch) -> 2 proc (resumes the 1-process one) takes the
   6 steps of an uninterrupted 1-process run: same losses, same final weights and optimizer state (measured
   rel L2 ~5e-6: float32 rounding). Only rank 0 opens any file of the output folder for writing (audit hook).
3. Bad launches end with an error in bounded time: processes started with different --arch / --batch-size
   stop at once with one line naming both; a worker killed mid-training takes the job down within seconds.
"""
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from parity import distributed as D
from parity.compare import compare, format_table

REPO = D.REPO
PY = sys.executable
TINY_VIT = ['-a', 'vit_small', '--vit-patch-size', '8', '--vit-embed-dim', '32', '--vit-depth', '1',
            '--vit-num-heads', '2', '--moco-dim', '16', '--moco-mlp-dim', '32', '--img-size', '32']
COMMON = ['-b', '8', '--epochs', '2', '--warmup-epochs', '1', '-j', '0', '-p', '1', '--seed', '0', '--moco-m-cos',
          '--crop-min', '0.2']
SCRIPT = 'paddle_impl/main_moco.py'
F32_TOL = 1e-4  # CLI runs are float32; measured 2 proc vs 1 proc after 6 steps: params 5e-6, LARS mu 5e-6


def _assert_rows(rows, title):
    table = format_table(rows, title)
    print('\n' + table)
    assert all(r.passed for r in rows), table


# ------------------------------------------------------------------------------------- 1. float64 proof

@pytest.fixture(scope='module')
def parity_dir(tmp_path_factory):
    wd = str(tmp_path_factory.mktemp('dist_f64'))
    t0 = time.time()
    D.prepare(wd, cases=('vit_small', 'resnet50'), steps=3, world=2)
    t1 = time.time()
    D.run_paddle_workers(wd, world=2, controls=True)
    t2 = time.time()
    D.run_torch_workers(wd, world=2)
    print(f'\nprepare {t1 - t0:.1f}s, paddle 2 proc {t2 - t1:.1f}s, torch 2 proc {time.time() - t2:.1f}s')
    yield wd
    shutil.rmtree(wd, ignore_errors=True)  # ~1.4 GB of float64 records; pytest keeps its last temp folders


@pytest.mark.parametrize('case', ['vit_small', 'resnet50'])
def test_float64_two_processes_equal_one_paddle_and_torch(parity_dir, case):
    t0 = time.time()
    p1 = D.run_single('paddle', parity_dir, [case])[case]
    t1 = time.time()
    t1p = D.as_paddle_names(D.run_single('torch', parity_dir, [case])[case])
    print(f'\n{case}: paddle 1 proc {t1 - t0:.1f}s, torch 1 proc {time.time() - t1:.1f}s')
    p2 = D.load_result(parity_dir, 'paddle', 2, 0, case)
    t2 = D.as_paddle_names(D.load_result(parity_dir, 'torch', 2, 0, case))
    p2r1 = D.load_result(parity_dir, 'paddle', 2, 1, case)
    t2r1 = D.load_result(parity_dir, 'torch', 2, 1, case)

    rows = (D.compare_records('paddle 2p vs 1p', p2, p1, case) + D.compare_records('torch 2p vs 1p', t2, t1p, case)
            + D.compare_records('paddle 2p vs torch 2p', p2, t2, case)
            + D.rank_rows('paddle 2p', p2, case) + D.rank_rows('torch 2p', t2, case))
    # each rank's own loss (its N queries against all 2N keys, labels offset by rank): Paddle == torch
    rows.append(compare(f'per-rank loss paddle vs torch {case}', {'r0': p2['loss_local'], 'r1': p2r1['loss_local']},
                        {'r0': t2['loss_local'], 'r1': t2r1['loss_local']}, 1e-9))
    # and their mean is the one process's loss over the 2N queries
    rows.append(compare(f'mean of per-rank losses vs 1p {case}', {'loss': (p2['loss_local'] + p2r1['loss_local']) / 2},
                        {'loss': p1['loss_mean']}, 1e-9))
    rows.append(compare(f'schedules (lr, m) 2p vs 1p {case}', {'lr': p2['lr'], 'm': p2['m']},
                        {'lr': p1['lr'], 'm': p1['m']}, 0.0))
    n = D.load_spec(parity_dir)['cases'][case]['per_rank']
    _assert_rows(rows, f'{case}: 2 processes x {n} samples vs 1 process x {2 * n}, float64, 3 steps')
    # the ranks' losses really differ (each holds other rows of the logits matrix)
    assert np.abs(p2['loss_local'] - p2r1['loss_local']).min() > 1e-3
    # the weights moved: the comparison is not of untouched initial values
    with np.load(os.path.join(parity_dir, f'weights_{case}.npz')) as z:
        w0 = z['predictor.0.weight'].T  # torch layout [out, in] -> Paddle [in, out]
    moved = np.linalg.norm(p2['param/predictor.0.weight'] - w0) / np.linalg.norm(w0)
    assert moved > 1e-4, moved


def test_planted_mistakes_change_the_loss(parity_dir):
    """On the same 2 processes: BatchNorm left unsynchronised, or labels not offset by the rank, give another
    first-step loss than the one process does (which the correct 2-process run matches to 1e-13)."""
    import json
    with open(os.path.join(parity_dir, 'controls_w2.json')) as f:
        ctl = json.load(f)
    right = float(D.load_result(parity_dir, 'paddle', 2, 0, 'vit_small')['loss_mean'][0])
    print('\nfirst-step loss: synced', right, ctl)
    for what, loss in ctl.items():
        assert abs(loss - right) / right > 1e-2, (what, loss, right)


# ------------------------------------------------------------------------------------------ 2./3. the CLI

def make_images(root, classes=3, per_class=8, size=40, seed=0):
    from PIL import Image
    rng = np.random.default_rng(seed)
    for c in range(classes):
        os.makedirs(os.path.join(root, 'train', f'class{c}'), exist_ok=True)
        for k in range(per_class):
            a = (rng.random((size, size, 3)) * 160).astype(np.uint8)
            a[..., c] = 255 - a[..., c]
            Image.fromarray(a).save(os.path.join(root, 'train', f'class{c}', f'{k}.png'))
    return str(root)


def run_one(args, timeout=300):
    r = subprocess.run([PY, '-m', 'paddle_impl.main_moco', *args], cwd=REPO, env=D._env(), capture_output=True,
                       text=True, timeout=timeout)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def run_two(args, log_dir, env=None, timeout=300):
    r = D.launch_paddle([SCRIPT, *args], nproc=2, log_dir=log_dir, env=env, timeout=timeout)
    assert r.returncode == 0, D.worker_logs(log_dir)
    return r


def load(path):
    from paddle_impl.io import load_checkpoint
    return load_checkpoint(str(path))


def step_records(out_dir):
    from paddle_impl.utils import read_metrics
    return [r for r in read_metrics(os.path.join(out_dir, 'metrics.jsonl')) if r['type'] == 'step']


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
    return make_images(str(tmp_path_factory.mktemp('dist_data')))


@pytest.fixture(scope='module')
def one_process_run(data_dir, tmp_path_factory):
    """2 epochs x 3 iterations on one process: the reference."""
    out = str(tmp_path_factory.mktemp('dist_ref'))
    run_one([data_dir, *TINY_VIT, *COMMON, '--output-dir', out])
    return out


def _ckpt_rows(label, a, b):
    """float32 rows: final model state and LARS buffers of checkpoint a against b (null directions apart)."""
    from parity.steps import split_null
    rows = []
    sa, sb = split_null(a['state_dict']), split_null(b['state_dict'])
    rows.append(compare(f'{label}: model state (params + BN stats)', sa[0], sb[0], F32_TOL, atol=1e-6))
    rows.append(compare(f'{label}: null-direction params', sa[1], sb[1], F32_TOL, atol=1e-6))
    for acc in b['optimizer']['accumulators']:
        oa, ob = split_null(a['optimizer']['accumulators'][acc]), split_null(b['optimizer']['accumulators'][acc])
        rows.append(compare(f'{label}: optimizer {acc}', oa[0], ob[0], F32_TOL, atol=1e-6))
    return rows


def test_cli_resume_chain_across_world_sizes_equals_one_process(data_dir, one_process_run, tmp_path):
    """2 proc (1 step) -> 2 proc resumes its own checkpoint (1 step) -> 1 proc resumes that 2-process
    checkpoint in mid-epoch (2 steps, across the epoch end) -> 2 proc resumes the 1-process checkpoint in
    mid-epoch (to the end): the same 6 steps as one uninterrupted process. The DistributedBatchSampler cuts
    each global batch of the shuffled (seed = epoch) index list into contiguous parts, rank r the r-th, and
    the views of an image depend on (seed, epoch, index) only, so both world sizes see the same batches."""
    out = str(tmp_path / 'out')
    audit = str(tmp_path / 'audit')
    env = D._env(**D.write_audit_env(audit, out))
    args = [data_dir, *TINY_VIT, *COMMON, '--output-dir', out]
    timings = {}

    t = time.time()
    run_two(args + ['--max-steps', '1'], tmp_path / 'log_b', env)
    timings['2p 1 step'] = time.time() - t
    ck = load(os.path.join(out, 'checkpoint_0000.pdparams'))
    assert (ck['epoch'], ck['iteration'], ck['world_size'], ck['global_batch']) == (0, 1, 2, 8)

    t = time.time()
    r = run_two(args + ['--resume', 'auto', '--max-steps', '1'], tmp_path / 'log_c', env)
    timings['2p resumes 2p'] = time.time() - t
    ck = load(os.path.join(out, 'checkpoint_0000.pdparams'))
    assert (ck['epoch'], ck['iteration'], ck['global_step']) == (0, 2, 2)

    t = time.time()
    r = run_one(args + ['--resume', os.path.join(out, 'checkpoint_0000.pdparams'), '--max-steps', '2'])
    timings['1p resumes 2p'] = time.time() - t
    assert 'iteration 2' in r.stdout and 'restarts from its first batch' not in r.stdout + r.stderr
    ck = load(os.path.join(out, 'checkpoint_0001.pdparams'))
    assert (ck['epoch'], ck['iteration'], ck['global_step'], ck['world_size']) == (1, 1, 4, 1)

    t = time.time()
    run_two(args + ['--resume', 'auto'], tmp_path / 'log_e', env)
    timings['2p resumes 1p'] = time.time() - t
    logs = D.worker_logs(tmp_path / 'log_e', tail=20000)
    assert 'iteration 1' in logs and 'restarts from its first batch' not in logs

    # the steps: same global step numbers, losses, learning rates and momenta as one process
    ref, got = step_records(one_process_run), step_records(out)
    assert [r['global_step'] for r in got] == [r['global_step'] for r in ref] == [1, 2, 3, 4, 5, 6]
    rows = [compare('chain vs 1 proc: loss per step', {'loss': np.array([r['loss'] for r in got])},
                    {'loss': np.array([r['loss'] for r in ref])}, 1e-5),
            compare('chain vs 1 proc: lr and m per step',
                    {'lr': np.array([r['lr'] for r in got]), 'm': np.array([r['m'] for r in got])},
                    {'lr': np.array([r['lr'] for r in ref]), 'm': np.array([r['m'] for r in ref])}, 1e-12)]
    a, b = load(os.path.join(out, 'checkpoint_0001.pdparams')), load(os.path.join(one_process_run,
                                                                                  'checkpoint_0001.pdparams'))
    assert (a['epoch'], a['iteration'], a['global_step'], a['world_size']) == (2, 0, 6, 2)
    rows += _ckpt_rows('chain vs 1 proc after 6 steps', a, b)
    _assert_rows(rows, 'CLI, float32: 2p -> 2p -> 1p -> 2p vs one uninterrupted process ' + str(
        {k: round(v, 1) for k, v in timings.items()}))

    # written once: in the three 2-process runs, rank 1 opened nothing in the output folder for writing;
    # rank 0 wrote each checkpoint save once (a temporary file renamed into place)
    writes = D.read_write_audit(audit)
    assert set(writes) == {0, 1}, writes.keys()
    assert writes[1] == [], writes[1][:5]
    renames = [p for e, p in writes[0] if e == 'os.rename' and os.path.basename(p).startswith('checkpoint_')]
    # saves: run B (0,1); run C (0,2); run E: end of epoch 1 -> checkpoint_0001 once
    assert sorted(os.path.basename(p) for p in renames) == ['checkpoint_0000.pdparams'] * 2 + \
        ['checkpoint_0001.pdparams'], renames


def _wait(procs, timeout):
    t0 = time.time()
    for p in procs:
        try:
            p.wait(timeout=max(timeout - (time.time() - t0), 1))
        except subprocess.TimeoutExpired:
            for q in procs:
                if q.poll() is None:
                    q.kill()
            raise AssertionError(f'launch still running after {timeout}s: a hang')
    return time.time() - t0


def test_processes_that_disagree_stop_with_a_clear_error(data_dir, tmp_path):
    """Two nodes of one job (two launchers, --nnodes 2 --master --rank), the second started with another
    --arch and --batch-size: every process stops after the first collective with one line naming both."""
    base = [data_dir, *COMMON, '--output-dir', str(tmp_path / 'out')]
    arch0 = TINY_VIT
    arch1 = ['-a', 'vit_base'] + TINY_VIT[2:]  # the same layer sizes through the --vit-* overrides
    procs = D.launch_nodes([[SCRIPT, *base, *arch0], [SCRIPT, *base, *arch1, '-b', '16']], tmp_path / 'log')
    took = _wait(procs, 180)
    print(f'\ndisagreeing launch ended in {took:.1f}s')
    logs = D.worker_logs(tmp_path / 'log', tail=20000)
    assert all(p.returncode != 0 for p in procs), (logs, [p.returncode for p in procs])
    for node in (0, 1):
        with open(tmp_path / 'log' / f'node{node}' / 'workerlog.0') as f:
            err = [line for line in f.read().splitlines() if line.startswith('error:')]
        assert len(err) == 1, logs
        assert "processes disagree on their settings" in err[0], err
        assert "--arch: rank 0 'vit_small', rank 1 'vit_base'" in err[0], err
        assert '--batch-size: rank 0 8, rank 1 16' in err[0], err
    assert not os.path.exists(tmp_path / 'out' / 'checkpoint_0000.pdparams')


def _long_run_args(out):
    args = [a if a != '--epochs' else '--epochs=1000' for a in COMMON]
    args.remove('2')  # the value of --epochs
    return [*TINY_VIT, *args, '--output-dir', str(out)]


def _kill_rank1_when_training(launchers, out, log):
    """Wait until rank 0 logged a step of epoch 1, SIGKILL the rank-1 worker; returns (seconds until every
    launcher exited, pid of the rank-0 worker)."""
    deadline = time.time() + 180
    workers = {}
    while time.time() < deadline and all(p.poll() is None for p in launchers):
        if os.path.exists(out / 'log.txt') and 'Epoch: [1]' in (out / 'log.txt').read_text():
            workers = {D.trainer_id(c): c for p in launchers for c in D.child_pids(p.pid)}
            if 0 in workers and 1 in workers:
                break
        time.sleep(0.2)
    assert 0 in workers and 1 in workers, 'training did not start: ' + D.worker_logs(log)
    os.kill(workers[1], signal.SIGKILL)
    return _wait(launchers, 120), workers[0]


def _gone(pid):
    try:
        with open(f'/proc/{pid}/stat') as f:
            return f.read().rsplit(')', 1)[1].split()[0] == 'Z'  # a zombie: exited, not yet reaped
    except OSError:
        return True


def test_a_killed_process_stops_the_others(data_dir, tmp_path):
    """One node, 2 workers; rank 1 killed (SIGKILL) in mid-training: paddle.distributed.launch sees it exit
    and stops rank 0 (SIGTERM) within seconds; the launch exits non-zero."""
    out, log = tmp_path / 'out', tmp_path / 'log'
    cmd = [PY, '-m', 'paddle.distributed.launch', '--nproc_per_node', '2', '--log_dir', str(log), SCRIPT, data_dir,
           *_long_run_args(out)]
    launcher = subprocess.Popen(cmd, cwd=REPO, env=D._env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        took, survivor = _kill_rank1_when_training([launcher], out, log)
    finally:
        if launcher.poll() is None:
            launcher.kill()
    print(f'\none node: the launch exited {took:.1f}s after rank 1 was killed (exit code {launcher.returncode})')
    assert launcher.returncode != 0 and took < 30 and _gone(survivor)


def test_a_killed_process_on_another_node_stops_the_job(data_dir, tmp_path):
    """Two nodes (two launchers of one job), one worker each; node 1's worker killed: node 1's launcher fails,
    rank 0's next collective fails (gloo: the peer's connection closed) or node 0's launcher stops it on the
    job's failed status; both launchers exit non-zero within seconds."""
    out, log = tmp_path / 'out', tmp_path / 'log'
    launchers = D.launch_nodes([[SCRIPT, data_dir, *_long_run_args(out)]] * 2, log)
    try:
        took, survivor = _kill_rank1_when_training(launchers, out, log)
    finally:
        for p in launchers:
            if p.poll() is None:
                p.kill()
    with open(log / 'node0' / 'workerlog.0', errors='replace') as f:
        rank0 = f.read()
    how = 'gloo error' if 'gloo' in rank0 else ('SIGTERM from its launcher' if 'SIGTERM' in rank0 else 'other')
    print(f'\ntwo nodes: both launches exited {took:.1f}s after rank 1 was killed (exit codes '
          f'{[p.returncode for p in launchers]}; rank 0 ended by {how})')
    assert all(p.returncode != 0 for p in launchers) and took < 30 and _gone(survivor), rank0[-3000:]
