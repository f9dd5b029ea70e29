"""paddle_impl/machine.py: the per-machine settings, decided from fake /proc/cpuinfo texts and environments
(an AMD AVX2 EPYC, an AMD AVX-512 EPYC, an Intel Xeon with AVX-512 and AMX, a GPU run under
paddle.distributed.launch), and the CLI the Makefile reads."""
import os
import subprocess
import sys

from paddle_impl import machine

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_BASE = 'fpu vme de pse tsc msr pae mce cx8 apic sep mtrr sse sse2 ssse3 sse4_1 sse4_2 popcnt avx f16c'


def _cpuinfo(vendor, model, flags, processors=2):
    block = (f'processor\t: {{i}}\nvendor_id\t: {vendor}\ncpu family\t: 25\nmodel name\t: {model}\n'
             f'flags\t\t: {_BASE} {flags}\n\n')
    return ''.join(block.format(i=i) for i in range(processors))


AMD_AVX2 = _cpuinfo('AuthenticAMD', 'AMD EPYC 7B12', 'fma avx2 bmi2 sha_ni clzero')
AMD_AVX512 = _cpuinfo('AuthenticAMD', 'AMD EPYC 9B14',
                      'fma avx2 avx512f avx512dq avx512cd avx512bw avx512vl avx512_bf16 avx512_vnni')
INTEL_AMX = _cpuinfo('GenuineIntel', 'Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz',
                     'fma avx2 avx512f avx512dq avx512cd avx512bw avx512vl avx512_vnni amx_bf16 amx_tile amx_int8')
INTEL_OLD = _cpuinfo('GenuineIntel', 'Intel(R) Xeon(R) CPU E5-2680 v2', '')


def test_cpu_facts():
    f = machine.cpu_facts(AMD_AVX2)
    assert (f['vendor'], f['model'], f['isa']) == ('amd', 'AMD EPYC 7B12', ['avx2'])
    assert machine.cpu_facts(AMD_AVX512)['isa'] == ['avx2', 'avx512']
    f = machine.cpu_facts(INTEL_AMX)
    assert (f['vendor'], f['isa']) == ('intel', ['avx2', 'avx512', 'amx'])
    assert machine.cpu_facts(INTEL_OLD)['isa'] == []
    # avx512f alone (no BW/VL, e.g. Knights Landing) is not the AVX-512 level our kernels and MKL's path need
    assert 'avx512' not in machine.cpu_facts(_cpuinfo('GenuineIntel', 'x', 'fma avx2 avx512f avx512cd'))['isa']
    assert machine.cpu_facts('')['vendor'] == 'other'


def test_mkl_path_only_on_amd():
    assert machine.decide({}, AMD_AVX2, cores=2)['env']['MKL_DEBUG_CPU_TYPE'] == '5'
    assert machine.decide({}, AMD_AVX512, cores=2)['env']['MKL_DEBUG_CPU_TYPE'] == '7'
    # MKL's own instruction cap (how an AVX2 CPU is mimicked on an AVX-512 one) keeps the path within it
    d = machine.decide({'MKL_ENABLE_INSTRUCTIONS': 'AVX2'}, AMD_AVX512, cores=2)
    assert d['env']['MKL_DEBUG_CPU_TYPE'] == '5'
    for text in (INTEL_AMX, INTEL_OLD):
        d = machine.decide({}, text, cores=2)
        assert 'MKL_DEBUG_CPU_TYPE' not in d['env'], d
        assert 'intel' in d['reasons']['MKL_DEBUG_CPU_TYPE']


def test_user_values_win():
    env = {'OMP_NUM_THREADS': '3', 'MKL_DEBUG_CPU_TYPE': '5'}
    d = machine.decide(env, AMD_AVX512, cores=16)
    assert d['env'] == {} and d['kept'] == env
    d = machine.decide({'MALLOC_MMAP_MAX_': '65536'}, AMD_AVX2, cores=2)
    assert not d['malloc_tune']
    assert not machine.decide({'MOCO_MALLOC_TUNE': '0'}, AMD_AVX2, cores=2)['malloc_tune']
    assert machine.decide({'MOCO_MALLOC_TUNE': '1', 'FLAGS_selected_gpus': '0'}, AMD_AVX2, cores=2)['malloc_tune']


def test_cpu_run_threads_and_malloc():
    d = machine.decide({}, INTEL_AMX, cores=32)
    assert d['env']['OMP_NUM_THREADS'] == '32'
    assert d['malloc_tune'] == machine.MALLOC_HELPS
    # CPU processes under paddle.distributed.launch share the node's cores too
    assert machine.decide({'PADDLE_LOCAL_SIZE': '2'}, AMD_AVX2, cores=2)['env']['OMP_NUM_THREADS'] == '1'


def test_gpu_run_environment():
    """8 GPU processes on a 32-core node (what paddle.distributed.launch gives each): 4 threads each, no malloc
    tuning (which every data-loading worker would inherit)."""
    env = {'PADDLE_LOCAL_SIZE': '8', 'PADDLE_LOCAL_RANK': '3', 'PADDLE_GLOBAL_SIZE': '16',
           'FLAGS_selected_gpus': '3', 'PADDLE_TRAINER_ID': '11'}
    d = machine.decide(env, INTEL_AMX, cores=32)
    assert d['gpu_run'] and d['env']['OMP_NUM_THREADS'] == '4'
    assert not d['malloc_tune']
    assert 'MKL_DEBUG_CPU_TYPE' not in d['env']
    # more processes than cores: one thread each, never 0
    assert machine.decide(dict(env, PADDLE_LOCAL_SIZE='8'), AMD_AVX2, cores=4)['env']['OMP_NUM_THREADS'] == '1'
    assert machine.decide({'MOCO_DEVICE': 'gpu'}, AMD_AVX2, cores=4)['malloc_tune'] is False


def test_cli_prints_what_it_decided():
    """`python -m paddle_impl.machine --env` (the Makefile's --make too): only what the user has not set."""
    env = {k: v for k, v in os.environ.items() if k not in ('OMP_NUM_THREADS', 'MKL_DEBUG_CPU_TYPE')}
    env.update(PYTHONPATH=ROOT, MKL_DEBUG_CPU_TYPE='4')
    r = subprocess.run([sys.executable, '-m', 'paddle_impl.machine', '--env'], env=env, capture_output=True,
                       text=True, timeout=60, cwd=ROOT)
    assert r.returncode == 0 and r.stderr == '', r.stderr
    lines = r.stdout.splitlines()
    assert f'export OMP_NUM_THREADS={machine.usable_cores()}' in lines
    assert not any('MKL_DEBUG_CPU_TYPE' in line for line in lines)  # the user's 4 is kept
    r = subprocess.run([sys.executable, '-m', 'paddle_impl.machine', '--make'], env=env, capture_output=True,
                       text=True, timeout=60, cwd=ROOT)
    assert r.stdout.split() == [line[len('export '):] for line in lines]


def test_tcache_off_goes_with_the_malloc_tuning():
    """glibc's tcache off (GLIBC_TUNABLES, read at program start) wherever the malloc tuning is on; a
    GLIBC_TUNABLES the user set is kept; nothing where the tuning is off."""
    d = machine.decide({}, INTEL_AMX, cores=2)
    assert d['malloc_tune'] == machine.MALLOC_HELPS
    if machine.MALLOC_HELPS:
        assert d['start_env'] == {'GLIBC_TUNABLES': 'glibc.malloc.tcache_count=0'}
    d = machine.decide({'GLIBC_TUNABLES': 'glibc.malloc.arena_max=2'}, INTEL_AMX, cores=2)
    assert d['start_env'] == {}
    if machine.MALLOC_HELPS:
        assert d['kept']['GLIBC_TUNABLES'] == 'glibc.malloc.arena_max=2'
    for env in ({'MOCO_MALLOC_TUNE': '0'}, {'MALLOC_MMAP_MAX_': '0'}, {'MOCO_DEVICE': 'gpu'},
                {'FLAGS_selected_gpus': '1'}):
        assert machine.decide(env, AMD_AVX2, cores=2)['start_env'] == {}, env
    # the value our own re-execution gave is ours, not the user's
    d = machine.decide({'GLIBC_TUNABLES': machine.TCACHE_OFF, 'MOCO_MALLOC_REEXEC': '1'}, AMD_AVX2, cores=2)
    assert 'GLIBC_TUNABLES' not in d['kept']


def test_cli_entry_names_only_our_programs():
    py = '/usr/bin/python3'
    script = os.path.join(ROOT, 'paddle_impl', 'main_moco.py')
    assert machine.cli_entry([py, '-m', 'paddle_impl.main_moco', 'data', '-a', 'vit_small']) == 'main_moco'
    assert machine.cli_entry([py, '-u', '-X', 'faulthandler', '-m', 'paddle_impl.main_lincls']) == 'main_lincls'
    assert machine.cli_entry([py, '-mpaddle_impl.main_finetune']) == 'main_finetune'
    assert machine.cli_entry([py, '-u', script, '--epochs', '1']) == 'main_moco'  # paddle.distributed.launch
    assert machine.cli_entry([py, '-m', 'paddle_impl.machine', '--json']) == 'machine'
    for argv in ([py, '-m', 'pytest', 'tests'], [py, '-c', 'import paddle_impl'], [py, '-m', 'paddle_impl.models'],
                 [py, '-m', 'bench.bench'], [py, '/tmp/main_moco.py'], [py, '-'], [py],
                 [py, '-m', 'paddle.distributed.launch', script]):
        assert machine.cli_entry(argv) is None, argv


def _run_machine_json(env):
    import json
    r = subprocess.run([sys.executable, '-m', 'paddle_impl.machine', '--json'], env=env, capture_output=True,
                       text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_programs_start_again_with_tcache_off():
    """A CPU run of one of our programs started without GLIBC_TUNABLES re-executes itself once with it (glibc
    reads it only at start): the process then runs with the tcache off; MOCO_MALLOC_REEXEC=0 and
    MOCO_MALLOC_TUNE=0 keep the process as started; the user's OMP_NUM_THREADS is not mistaken for ours."""
    base = {k: v for k, v in os.environ.items()
            if k not in ('GLIBC_TUNABLES', 'MOCO_MALLOC_REEXEC', 'MOCO_MALLOC_TUNE', 'OMP_NUM_THREADS')
            and not k.startswith('MALLOC_')}
    base.update(PYTHONPATH=ROOT)
    j = _run_machine_json(base)
    assert j['malloc_tune'] == machine.MALLOC_HELPS
    assert j['tcache_off'] is machine.MALLOC_HELPS
    if machine.MALLOC_HELPS:
        assert j['start_env'] == {'GLIBC_TUNABLES': machine.TCACHE_OFF} and 'GLIBC_TUNABLES' not in j['kept']
        assert j['set'].get('OMP_NUM_THREADS') == str(machine.usable_cores())  # decided, not "the user's"
    assert _run_machine_json(dict(base, MOCO_MALLOC_REEXEC='0'))['tcache_off'] is False
    j = _run_machine_json(dict(base, MOCO_MALLOC_TUNE='0'))
    assert j['tcache_off'] is False and j['start_env'] == {}
    # not one of our programs: no re-execution, but what it starts inherits the setting
    code = ('import os, paddle_impl; from paddle_impl import machine; '
            'print(machine.tcache_off_here(), os.environ.get("GLIBC_TUNABLES"))')
    r = subprocess.run([sys.executable, '-c', code], env=base, capture_output=True, text=True, timeout=120,
                       cwd=ROOT)
    expect = f'False {machine.TCACHE_OFF}' if machine.MALLOC_HELPS else 'False None'
    assert r.returncode == 0 and r.stdout.split('\n')[0] == expect, (r.stdout, r.stderr)
