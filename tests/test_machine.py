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
