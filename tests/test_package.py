"""pyproject.toml: `pip install .` into a fresh virtual environment gives the four packages (with the C++
kernel source as package data) and the console scripts moco-pretrain, moco-lincls, moco-finetune,
moco-convert and moco-parity, each of which answers --help.

The venv reuses the project's installed dependencies instead of the network: it is made with
--system-site-packages, and since a venv made from a venv's interpreter sees the base interpreter's packages,
not the project venv's, a .pth line adds the project venv's site-packages (paddle, torch, pip, setuptools).
The install is `pip install --no-deps --no-build-isolation --no-index` from a copy of the sources (so the
build leaves nothing in the checkout); the scripts run from an empty folder with PYTHONPATH unset, so they
import the installed copy."""
import os
import shutil
import subprocess
import sys
import sysconfig

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ('paddle_impl', 'torch_ref', 'parity', 'convert')
# a flag only that CLI's --help shows
SCRIPTS = {'moco-pretrain': '--moco-m-cos', 'moco-lincls': '--pretrained', 'moco-finetune': '--mixup-switch-prob',
           'moco-convert': 'torch2paddle', 'moco-parity': '--dtype'}


def _env():
    env = {k: v for k, v in os.environ.items() if k not in ('PYTHONPATH', 'PYTHONHOME', 'VIRTUAL_ENV')}
    env['PIP_DISABLE_PIP_VERSION_CHECK'] = '1'
    env['PIP_NO_INPUT'] = '1'
    return env


def _run(cmd, cwd, timeout=120):
    r = subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f'{cmd}: rc {r.returncode}\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}'
    return r.stdout


@pytest.fixture(scope='module')
def installed(tmp_path_factory):
    tmp = tmp_path_factory.mktemp('pkg')
    src = tmp / 'src'
    src.mkdir()
    for name in ('pyproject.toml', 'README.md'):
        shutil.copy(os.path.join(ROOT, name), src / name)
    for pkg in PACKAGES:
        shutil.copytree(os.path.join(ROOT, pkg), src / pkg,
                        ignore=shutil.ignore_patterns('__pycache__', '*.pyc', '*.so', 'build'))
    venv = tmp / 'venv'
    _run([sys.executable, '-m', 'venv', '--system-site-packages', '--without-pip', str(venv)], cwd=tmp)
    py = str(venv / 'bin' / 'python')
    site = _run([py, '-c', 'import sysconfig; print(sysconfig.get_paths()["purelib"])'], cwd=tmp).strip()
    with open(os.path.join(site, 'project_venv.pth'), 'w') as f:
        f.write(sysconfig.get_paths()['purelib'] + '\n')  # this (the project's) interpreter's site-packages
    _run([py, '-m', 'pip', 'install', '-q', '--no-deps', '--no-build-isolation', '--no-index', str(src)], cwd=tmp,
         timeout=300)
    empty = tmp / 'elsewhere'
    empty.mkdir()
    return venv, py, site, empty


def test_packages_installed_with_kernel_source(installed):
    venv, py, site, empty = installed
    out = _run([py, '-c', 'import importlib; print("\\n".join(importlib.import_module(m).__file__ for m in '
                f'{PACKAGES!r}))'], cwd=empty).split()
    assert len(out) == 4
    for path in out:
        assert path.startswith(site), f'{path} is not the installed copy (under {site})'
    sources = [n for n in os.listdir(os.path.join(ROOT, 'paddle_impl', 'csrc')) if n.endswith(('.cc', '.h', '.c'))]
    assert 'cpu_kernels.cc' in sources
    for name in sources:  # the C++ sources the kernels are compiled from, byte for byte
        kernel = os.path.join(site, 'paddle_impl', 'csrc', name)
        assert os.path.isfile(kernel), f'{name} is not in the installed package'
        with open(kernel, 'rb') as a, open(os.path.join(ROOT, 'paddle_impl', 'csrc', name), 'rb') as b:
            assert a.read() == b.read(), name
    # nothing else of the checkout came along
    assert not os.path.exists(os.path.join(site, 'tests')) and not os.path.exists(os.path.join(site, 'demo'))


@pytest.mark.parametrize('script', sorted(SCRIPTS))
def test_console_script_help(installed, script):
    venv, py, site, empty = installed
    exe = venv / 'bin' / script
    assert exe.is_file(), f'{script} was not installed'
    with open(exe) as f:
        assert f.readline().strip() == f'#!{py}', 'the script must run the venv\'s interpreter'
    out = _run([str(exe), '--help'], cwd=empty)
    assert 'usage:' in out and SCRIPTS[script] in out, out[:500]
