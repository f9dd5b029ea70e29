"""Per-machine run-time settings, decided before Paddle is imported (Paddle and its MKL read them only then).

    python -m paddle_impl.machine            # the machine's facts and the decisions, with the reason for each
    python -m paddle_impl.machine --env      # the decisions as `export NAME=value` lines (the Makefile uses it)
    python -m paddle_impl.machine --json     # facts and decisions as JSON (bench/ records them)

What is decided, and why (measurements in docs/benchmarks.md; every value the user has already set wins):

- ``MKL_DEBUG_CPU_TYPE`` (AMD CPUs only). Paddle's bundled MKL (2019 Update 5) picks its slow generic code
  path on every CPU that is not Intel's. The variable names the path to take instead: 7 = AVX-512 where the
  CPU has AVX-512 F/CD/BW/DQ/VL, 5 = AVX2 where it has AVX2+FMA. Measured, one thread, 2048² fp32 GEMM on an
  AMD EPYC with AVX-512: unset 33 GFLOP/s, 5 -> 100, 7 -> 190 (torch 84). On Intel the variable is never set
  (measured on an Intel Xeon: 5 there drops Paddle's GEMM from 290 to 180 GFLOP/s). ``MKL_ENABLE_INSTRUCTIONS``
  (MKL's own cap, e.g. AVX2 to mimic an AVX2 CPU) is honoured: the path is never wider than the cap.
- ``OMP_NUM_THREADS``: the cores this process may use; under ``paddle.distributed.launch`` (``PADDLE_LOCAL_SIZE``
  processes on this node) the cores divided among the local processes, at least 1.
- glibc malloc tuning (keep freed memory for reuse: ``M_MMAP_MAX=0``, no heap trimming): on CPU training runs
  only, where it was measured to help Paddle (see ``MALLOC_HELPS``); never on GPU runs (``FLAGS_selected_gpus``
  set by the launcher, or ``MOCO_DEVICE=gpu``), and never in forked children (data-loading workers get glibc's
  defaults back). ``MOCO_MALLOC_TUNE=0|1`` forces it off/on; the ``MALLOC_*_`` variables, when set, win.
- glibc's per-thread cache of small freed blocks off (``GLIBC_TUNABLES=glibc.malloc.tcache_count=0``), with the
  tuning above. The cached small blocks stay in use from the heap's point of view, scattered between the large
  freed activations, so these cannot merge again and each training step places its activations in a more
  fragmented heap: ResNet-50's step peak RSS grew from ~2.0 to ~2.5 GiB after the first step, ~2.2 with the
  cache off (docs/benchmarks.md "ResNet-50 peak memory"). glibc reads this only when a program starts, so
  it is put in the environment (processes started from here inherit it) and our command-line programs
  (main_moco, main_lincls, main_finetune, this module) re-execute themselves once with it at start, before
  Paddle is imported (``MOCO_MALLOC_REEXEC=0`` stops that). A ``GLIBC_TUNABLES`` the user has set is kept.
"""
import os
import sys

# Measured (bench, see docs/benchmarks.md): does keeping freed memory make Paddle's CPU training step faster?
MALLOC_HELPS = True
TCACHE_OFF = 'glibc.malloc.tcache_count=0'
# the tuning as environment variables (bench/ gives them to both frameworks' workers)
MALLOC_ENV = {'MALLOC_MMAP_MAX_': '0', 'MALLOC_TRIM_THRESHOLD_': str(2 ** 31 - 1), 'GLIBC_TUNABLES': TCACHE_OFF}
_MALLOC_VARS = ('MALLOC_MMAP_MAX_', 'MALLOC_TRIM_THRESHOLD_', 'MALLOC_MMAP_THRESHOLD_', 'MALLOC_TOP_PAD_')
AVX512_FLAGS = {'avx512f', 'avx512cd', 'avx512bw', 'avx512dq', 'avx512vl'}


def read_cpuinfo(path='/proc/cpuinfo'):
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return ''


def cpu_facts(text=None):
    """Vendor, model name, flags and ISA levels of the first processor listed in a /proc/cpuinfo text."""
    text = read_cpuinfo() if text is None else text
    fields = {}
    for line in text.splitlines():
        if not line.strip():
            if fields:
                break  # first processor only
            continue
        key, _, value = line.partition(':')
        fields.setdefault(key.strip(), value.strip())
    flags = set(fields.get('flags', '').split())
    vendor = {'GenuineIntel': 'intel', 'AuthenticAMD': 'amd'}.get(fields.get('vendor_id', ''), 'other')
    isa = []
    if {'avx2', 'fma'} <= flags:
        isa.append('avx2')
    if AVX512_FLAGS <= flags:
        isa.append('avx512')
    if 'amx_tile' in flags:
        isa.append('amx')
    return {'vendor': vendor, 'vendor_id': fields.get('vendor_id', ''), 'model': fields.get('model name', ''),
            'isa': isa, 'flags': flags}


def usable_cores():
    return len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else (os.cpu_count() or 1)


def _positive_int(value):
    try:
        n = int(str(value).strip())
    except (TypeError, ValueError):
        return None
    return n if n > 0 else None


def is_gpu_run(env):
    return bool(env.get('FLAGS_selected_gpus', '').strip()) or env.get('MOCO_DEVICE', '').strip().lower() == 'gpu'


def _mkl_path(facts, env):
    """The MKL code path for an AMD CPU (None: leave MKL to choose), with the reason."""
    if facts['vendor'] != 'amd':
        return None, f'{facts["vendor"]} CPU: MKL chooses its own path (the AMD workaround would slow it)'
    cap = env.get('MKL_ENABLE_INSTRUCTIONS', '').strip().upper()
    avx512_ok = 'avx512' in facts['isa'] and (not cap or cap.startswith('AVX512'))
    if avx512_ok:
        return '7', 'AMD CPU with AVX-512: MKL\'s AVX-512 path (else its generic path)'
    if 'avx2' in facts['isa'] and cap not in ('SSE4_2', 'AVX'):
        return '5', 'AMD CPU with AVX2/FMA' + (f' (MKL_ENABLE_INSTRUCTIONS={cap})' if cap else '') + \
            ': MKL\'s AVX2 path (else its generic path)'
    return None, 'AMD CPU without AVX2: MKL chooses'


def decide(env=None, cpuinfo=None, cores=None):
    """The settings for this process: {'env': {NAME: value to set}, 'malloc_tune': bool, 'reasons': {...},
    'kept': {NAME: the user's value}, 'facts': cpu facts}. Pure: reads only its arguments (or the process's
    environment, /proc/cpuinfo and affinity where they are None)."""
    env = os.environ if env is None else env
    facts = cpu_facts(cpuinfo)
    cores = usable_cores() if cores is None else cores
    out, reasons, kept = {}, {}, {}

    local = _positive_int(env.get('PADDLE_LOCAL_SIZE')) or 1
    threads = max(1, cores // local)
    reasons['OMP_NUM_THREADS'] = (f'{cores} cores / {local} local processes' if local > 1 else f'{cores} cores')
    out['OMP_NUM_THREADS'] = str(threads)

    mkl, reasons['MKL_DEBUG_CPU_TYPE'] = _mkl_path(facts, env)
    if mkl is not None:
        out['MKL_DEBUG_CPU_TYPE'] = mkl

    for name in list(out):
        if env.get(name, '').strip():
            kept[name] = env[name]
            del out[name]

    gpu = is_gpu_run(env)
    force = env.get('MOCO_MALLOC_TUNE', '').strip()
    if any(k in env for k in _MALLOC_VARS):
        tune, why = False, 'MALLOC_*_ variables set by the user: glibc reads those'
    elif force in ('0', '1'):
        tune, why = force == '1', f'MOCO_MALLOC_TUNE={force}'
    elif gpu:
        tune, why = False, 'GPU run: host memory is not the bottleneck; nothing to gain'
    elif not sys.platform.startswith('linux'):
        tune, why = False, 'not Linux/glibc'
    else:
        tune, why = MALLOC_HELPS, 'CPU run: ' + ('measured to help Paddle' if MALLOC_HELPS else 'measured not to help')
    reasons['malloc'] = why
    # glibc's tcache: read at program start only (see apply)
    start_env = {}
    ours = env.get('MOCO_MALLOC_REEXEC') == '1' and env.get('GLIBC_TUNABLES') == TCACHE_OFF  # our re-execution
    if tune and env.get('GLIBC_TUNABLES', '').strip() and not ours:
        kept['GLIBC_TUNABLES'] = env['GLIBC_TUNABLES']
        reasons['GLIBC_TUNABLES'] = 'set by the user; kept'
    elif tune:
        start_env['GLIBC_TUNABLES'] = TCACHE_OFF
        reasons['GLIBC_TUNABLES'] = ('malloc tuning: glibc\'s cache of small freed blocks off (they kept the '
                                     'freed activations from merging; ResNet-50 peak RSS ~0.3 GiB lower)')
    return {'env': out, 'malloc_tune': tune, 'reasons': reasons, 'kept': kept, 'facts': facts, 'cores': cores,
            'gpu_run': gpu, 'local_processes': local, 'start_env': start_env}


def _mallopt(pairs):
    try:
        import ctypes
        libc = ctypes.CDLL('libc.so.6')
        for param, value in pairs:
            libc.mallopt(param, value)
        return True
    except (OSError, AttributeError):  # not glibc
        return False


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_MMAP_MAX = -1, -3, -4


def _untune_child():
    """In a forked child (a data-loading worker): glibc's default limits again, so that its freed memory goes
    back to the system."""
    _mallopt([(_M_MMAP_MAX, 65536), (_M_TRIM_THRESHOLD, 128 * 1024), (_M_MMAP_THRESHOLD, 128 * 1024)])


_applied = {}


def apply(env=None):
    """Set the decided variables (those not set already) in ``env`` (default: os.environ) and tune malloc
    for this process. Returns the decision (see decide). Once per process; too late once paddle is imported."""
    if _applied:
        return _applied['decision']
    env = os.environ if env is None else env
    d = decide(env)
    if 'paddle' in sys.modules:
        d['reasons']['late'] = 'paddle was imported before paddle_impl: its thread/MKL settings are fixed'
    else:
        for k, v in d['env'].items():
            env.setdefault(k, v)
    if d['malloc_tune']:
        d['malloc_tune'] = _mallopt([(_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, 2 ** 31 - 1)])
        if d['malloc_tune'] and hasattr(os, 'register_at_fork'):
            os.register_at_fork(after_in_child=_untune_child)
    if d['malloc_tune'] and d['start_env']:
        for k, v in d['start_env'].items():
            env.setdefault(k, v)  # what processes started from here inherit
        if env is os.environ:
            _reexec_cli(d)  # returns where this is not one of our programs (or it cannot)
    d['tcache_off'] = tcache_off_here()
    _applied['decision'] = d
    return d


# our command-line programs (paddle_impl/<name>.py), which re-execute themselves to start with GLIBC_TUNABLES
CLI_MODULES = ('main_moco', 'main_lincls', 'main_finetune', 'machine')


def cli_entry(argv):
    """The program of ours that an interpreter command line (sys.orig_argv) runs: 'main_moco' for
    ``python -u -m paddle_impl.main_moco ...`` or ``python paddle_impl/main_moco.py ...`` (how
    paddle.distributed.launch starts its workers), else None."""
    args, i = list(argv[1:]), 0
    while i < len(args):
        a = args[i]
        if a == '-m' or (a.startswith('-m') and not a.startswith('--')):
            mod = a[2:] or (args[i + 1] if i + 1 < len(args) else '')
            pkg, _, name = mod.rpartition('.')
            return name if pkg == 'paddle_impl' and name in CLI_MODULES else None
        if a in ('-c', '-') or a.startswith('-c'):
            return None
        if a in ('-X', '-W'):  # options with a separate value
            i += 2
            continue
        if a.startswith('-'):
            i += 1
            continue
        path = os.path.abspath(a)
        name, ext = os.path.splitext(os.path.basename(path))
        here = os.path.dirname(os.path.abspath(__file__))
        return name if ext == '.py' and os.path.dirname(path) == here and name in CLI_MODULES else None
    return None


def _start_env():
    """This process's environment as it was when the program started (/proc/self/environ), or None."""
    try:
        with open('/proc/self/environ', 'rb') as f:
            raw = f.read()
    except OSError:
        return None
    out = {}
    for item in raw.split(b'\0'):
        k, sep, v = item.partition(b'=')
        if sep:
            out[k.decode(errors='replace')] = v.decode(errors='replace')
    return out


def tcache_off_here():
    """True where glibc's tcache is off in this process (GLIBC_TUNABLES at program start asked for it)."""
    start = _start_env()
    return bool(start) and 'glibc.malloc.tcache_count=0' in start.get('GLIBC_TUNABLES', '').split(':')


def _reexec_cli(d):
    """Run this program again, the same command line, with d['start_env'] in its environment from the start
    (glibc reads GLIBC_TUNABLES only then): only for our command-line programs, before paddle is imported,
    once (MOCO_MALLOC_REEXEC is set in the new process; '0' from the user stops it). Where exec fails, the
    program goes on as it is."""
    if os.environ.get('MOCO_MALLOC_REEXEC', '').strip() or 'paddle' in sys.modules or tcache_off_here():
        return
    argv = getattr(sys, 'orig_argv', None)
    if not argv or cli_entry(argv) is None or _start_env() is None:
        return
    # the environment the program started with (our settings of d['env'] are decided again in the new process)
    env = {k: v for k, v in os.environ.items() if k not in d['env']}
    env.update(d['start_env'], MOCO_MALLOC_REEXEC='1')
    try:
        sys.stdout.flush()
        sys.stderr.flush()
        os.execve(sys.executable, [sys.executable] + list(argv[1:]), env)
    except OSError as e:
        d['reasons']['GLIBC_TUNABLES'] += f' (not in effect in this process: re-executing failed: {e})'


def describe(d):
    f = d['facts']
    lines = [f'CPU: {f["model"] or "?"} ({f["vendor"]}), ISA: {", ".join(f["isa"]) or "baseline x86-64"}, '
             f'{d["cores"]} usable cores' + (', GPU run' if d['gpu_run'] else '')]
    for k, v in d['env'].items():
        lines.append(f'{k}={v}  ({d["reasons"].get(k, "")})')
    for k, v in d['kept'].items():
        lines.append(f'{k}={v}  (set by the user; kept)')
    if 'MKL_DEBUG_CPU_TYPE' not in d['env'] and 'MKL_DEBUG_CPU_TYPE' not in d['kept']:
        lines.append(f'MKL_DEBUG_CPU_TYPE unset  ({d["reasons"]["MKL_DEBUG_CPU_TYPE"]})')
    lines.append(f'malloc tuning: {"on" if d["malloc_tune"] else "off"}  ({d["reasons"]["malloc"]})')
    for k, v in d.get('start_env', {}).items():
        lines.append(f'{k}={v}  ({d["reasons"].get(k, "")})')
    if 'tcache_off' in d:
        lines.append(f'glibc tcache in this process: {"off" if d["tcache_off"] else "on"}')
    return '\n'.join(lines)


def as_json(d):
    f = d['facts']
    return {'vendor': f['vendor'], 'model': f['model'], 'isa': f['isa'], 'cores': d['cores'],
            'gpu_run': d['gpu_run'], 'local_processes': d['local_processes'], 'set': d['env'], 'kept': d['kept'],
            'malloc_tune': d['malloc_tune'], 'reasons': d['reasons'], 'start_env': d.get('start_env', {}),
            'tcache_off': d.get('tcache_off')}


def main(argv=None):
    import argparse
    import json
    p = argparse.ArgumentParser(prog='python -m paddle_impl.machine',
                                description='The run-time settings paddle_impl chooses for this machine.')
    g = p.add_mutually_exclusive_group()
    g.add_argument('--env', action='store_true', help='print `export NAME=value` lines (for a shell)')
    g.add_argument('--make', action='store_true', help='print NAME=value words (for the Makefile)')
    g.add_argument('--json', action='store_true', help='print facts and decisions as JSON')
    a = p.parse_args(argv)
    # the decision taken on this process's environment as it was before paddle_impl/__init__ applied it
    from paddle_impl import machine as imported  # run as __main__, this is a second copy of the module
    d = imported._applied.get('decision') or decide()
    if a.env:
        for k, v in d['env'].items():
            print(f'export {k}={v}')
    elif a.make:  # malloc tuning is not exported: paddle_impl does it in its own process (not in children)
        print(' '.join(f'{k}={v}' for k, v in d['env'].items()))
    elif a.json:
        print(json.dumps(as_json(d), indent=1))
    else:
        print(describe(d))
    return 0


if __name__ == '__main__':
    sys.exit(main())
