"""Checkpoint files that never run code when loaded, written atomically. No torch needed.

Formats
- ``.pdparams`` (ours): a pickle (protocol 4) of plain data only: dict / list / tuple / str / int / float /
  bool / None / bytes and numpy arrays (Paddle tensors are saved as numpy arrays). It is the same byte
  layout ``paddle.save`` writes for such data, so ``paddle.load`` reads it too (on trusted files), but
  ``load_checkpoint`` reads it with a restricted unpickler that can only rebuild numpy arrays and builtin
  containers and refuses anything else without running it. (``paddle.load`` runs whatever a crafted
  ``.pdparams`` holds: FACTS.md.)
- ``.safetensors``: flat ``name -> array`` dicts plus string metadata (no code at all in the format).
- PyTorch ``.pth`` / ``.pth.tar`` (zip format of torch >= 1.6): ``load_torch_file_safe`` reads them with
  numpy alone: a restricted unpickler of ``data.pkl`` that knows torch's tensor-rebuild functions and
  storage records, and nothing else.

Every failure (not a checkpoint, truncated, crafted pickle, missing folder ...) raises CheckpointError
with one line naming the file.

Test hook: the environment variable MOCO_DEBUG_SLOW_SAVE=SECONDS makes atomic_write wait that long between
writing the temporary file and renaming it into place, so that a test can kill a process in mid-save.
"""
import collections
import io
import json
import os
import pickle
import struct
import sys
import tempfile
import time
import zipfile

import numpy as np

__all__ = ['CheckpointError', 'save_checkpoint', 'load_checkpoint', 'save_safetensors', 'load_safetensors',
           'load_torch_file_safe', 'atomic_write', 'sniff_format', 'to_plain']

PICKLE_PROTOCOL = 4


class CheckpointError(ValueError):
    """A checkpoint file that cannot be written or read safely; the message is one line naming the file."""


# ----------------------------------------------------------------------------------------------- writing

def _check_folder(path):
    folder = os.path.dirname(os.path.abspath(path)) or '.'
    if not os.path.isdir(folder):
        raise CheckpointError(f"cannot write '{path}': folder '{folder}' does not exist (create it first)")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise CheckpointError(f"cannot write '{path}': folder '{folder}' is not writable")
    if os.path.isdir(path):
        raise CheckpointError(f"cannot write '{path}': it is a folder")
    return folder


def atomic_write(path, write_fn, before_replace=None):
    """Call ``write_fn(binary_file)`` on a temporary file in the target folder, fsync it and rename it onto
    ``path``. ``before_replace(tmp_path)``, if given, may check the written file first (raise to abort).
    On any failure nothing is left behind and an existing ``path`` is untouched."""
    path = os.fspath(path)
    folder = _check_folder(path)
    try:
        fd, tmp = tempfile.mkstemp(dir=folder, prefix='.' + os.path.basename(path) + '.', suffix='.tmp')
    except OSError as e:
        raise CheckpointError(f"cannot write '{path}': {e.strerror or e}") from None
    try:
        with os.fdopen(fd, 'wb') as f:
            write_fn(f)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file the usual permissions
        if os.environ.get('MOCO_DEBUG_SLOW_SAVE'):  # test hook (module doc): a window to kill us in mid-save
            time.sleep(float(os.environ['MOCO_DEBUG_SLOW_SAVE']))
        if before_replace is not None:
            before_replace(tmp)
        os.replace(tmp, path)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(e, OSError):
            raise CheckpointError(f"cannot write '{path}': {e.strerror or e}") from None
        raise
    try:  # make the rename itself durable (best effort: not every file system allows it)
        dfd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass


def to_plain(obj, where='checkpoint'):
    """``obj`` with Paddle tensors turned into numpy arrays, checked to hold only what load_checkpoint
    accepts (dict, list, tuple, str, int, float, bool, None, bytes, numpy arrays and scalars)."""
    if obj is None or isinstance(obj, (bool, int, float, str, bytes)):
        return obj
    if isinstance(obj, np.ndarray):
        if obj.dtype.hasobject:
            raise CheckpointError(f'{where}: numpy arrays of Python objects cannot be saved')
        return obj
    if isinstance(obj, np.generic):
        return obj
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            if not isinstance(k, (str, int)):
                raise CheckpointError(f'{where}: dict key {k!r} is not a str or int')
            out[k] = to_plain(v, f'{where}[{k!r}]')
        return out
    if isinstance(obj, (list, tuple)):
        seq = [to_plain(v, f'{where}[{i}]') for i, v in enumerate(obj)]
        return seq if isinstance(obj, list) else tuple(seq)
    mod = type(obj).__module__ or ''
    if mod.startswith('paddle') and hasattr(obj, 'numpy'):
        return np.asarray(obj.numpy())
    raise CheckpointError(f'{where}: cannot save an object of type {mod}.{type(obj).__qualname__} '
                          f'(only containers, numbers, strings and arrays)')


def save_checkpoint(obj, path, metadata=None, before_replace=None):
    """Write ``obj`` to ``path`` atomically. ``.safetensors``: ``obj`` must be a flat dict of arrays
    (``metadata``: str -> str). Anything else: our safe pickle (see the module doc)."""
    path = os.fspath(path)
    if path.endswith('.safetensors'):
        return save_safetensors(obj, path, metadata, before_replace)
    if metadata:
        raise CheckpointError(f"'{path}': metadata is only for .safetensors; put it inside the dict")
    plain = to_plain(obj, os.path.basename(path))
    atomic_write(path, lambda f: pickle.dump(plain, f, protocol=PICKLE_PROTOCOL), before_replace)


def save_safetensors(tensors, path, metadata=None, before_replace=None):
    from safetensors.numpy import save
    if not isinstance(tensors, dict):
        raise CheckpointError(f"'{path}': .safetensors holds a flat dict name -> array, got {type(tensors).__name__}")
    arrays = {}
    for k, v in tensors.items():
        v = to_plain(v, f'{path}[{k!r}]')
        if not isinstance(k, str) or not isinstance(v, (np.ndarray, np.generic)):
            raise CheckpointError(f"'{path}': .safetensors holds only arrays; entry {k!r} is a {type(v).__name__}")
        arrays[k] = np.asarray(v) if np.asarray(v).flags.c_contiguous else np.asarray(v).copy(order="C")
    meta = None
    if metadata:
        meta = {str(k): v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()}
    data = save(arrays, metadata=meta)
    atomic_write(path, lambda f: f.write(data), before_replace)


# ----------------------------------------------------------------------------------------------- reading

def _open_bytes(path):
    path = os.fspath(path)
    if not os.path.exists(path):
        raise CheckpointError(f"'{path}' does not exist")
    if os.path.isdir(path):
        raise CheckpointError(f"'{path}' is a folder, not a checkpoint file")
    try:
        with open(path, 'rb') as f:
            head = f.read(16)
    except OSError as e:
        raise CheckpointError(f"cannot read '{path}': {e.strerror or e}") from None
    return path, head


def sniff_format(path):
    """'torch-zip' | 'pickle' | 'safetensors' | 'unknown', from the first bytes of the file."""
    path, head = _open_bytes(path)
    if head[:4] == b'PK\x03\x04':
        return 'torch-zip'
    if head[:1] == b'\x80' and len(head) >= 2 and 2 <= head[1] <= 5:
        return 'pickle'
    if len(head) >= 9:
        n = int.from_bytes(head[:8], 'little')
        if head[8:9] == b'{' and 0 < n < 100_000_000:
            return 'safetensors'
    return 'unknown'


def _refuse(path, module, name):
    raise CheckpointError(f"'{path}' refused: its pickle asks for '{module}.{name}', which a weights file has "
                          f"no need for (a crafted or foreign file; nothing in it was run)")


class _NDArrayMarker:
    """What a pickle gets for 'numpy.ndarray': usable only as _reconstruct's first argument."""


def _numpy_reconstruct(cls, shape, dtype):
    if cls is not _NDArrayMarker:
        raise pickle.UnpicklingError('only plain numpy arrays')
    return np.ndarray.__new__(np.ndarray, shape, dtype)


def _numpy_dtype(*args):
    return np.dtype(*args)


def _numpy_scalar(dtype, *args):
    if not isinstance(dtype, np.dtype) or dtype.hasobject:
        raise pickle.UnpicklingError('numpy scalar of an unexpected type')
    return _np_scalar(dtype, *args)


try:
    from numpy._core.multiarray import scalar as _np_scalar  # numpy >= 2
except ImportError:  # pragma: no cover
    from numpy.core.multiarray import scalar as _np_scalar


def _codecs_encode(s, encoding='utf-8', errors='strict'):
    if not isinstance(s, str) or encoding not in ('latin1', 'latin-1', 'utf-8', 'utf8'):
        raise pickle.UnpicklingError('unexpected _codecs.encode call')
    return s.encode(encoding, errors)


def _tuple(x=()):
    return tuple(x)


_NUMPY_GLOBALS = {
    ('numpy._core.multiarray', '_reconstruct'): _numpy_reconstruct,
    ('numpy.core.multiarray', '_reconstruct'): _numpy_reconstruct,
    ('numpy', 'ndarray'): _NDArrayMarker,
    ('numpy', 'dtype'): np.dtype,
    ('numpy._core.multiarray', 'scalar'): _numpy_scalar,
    ('numpy.core.multiarray', 'scalar'): _numpy_scalar,
}
_BUILTIN_GLOBALS = {
    ('builtins', 'tuple'): _tuple,  # paddle.save writes a nested tensor as tuple((name, array))
    ('builtins', 'list'): list,
    ('builtins', 'set'): set,
    ('builtins', 'frozenset'): frozenset,
    ('builtins', 'bytearray'): bytearray,
    ('builtins', 'complex'): complex,
    ('collections', 'OrderedDict'): collections.OrderedDict,
    ('_codecs', 'encode'): _codecs_encode,
}


class _SafeUnpickler(pickle.Unpickler):
    """Builds only builtin containers, scalars and numpy arrays; refuses every other global."""

    allowed = {**_NUMPY_GLOBALS, **_BUILTIN_GLOBALS}

    def __init__(self, f, path):
        super().__init__(f, encoding='latin1')
        self._path = path

    def find_class(self, module, name):
        fn = self.allowed.get((module, name))
        if fn is not None:
            return fn
        _refuse(self._path, module, name)

    def persistent_load(self, pid):
        raise CheckpointError(f"'{self._path}' refused: it refers to external records (persistent id), "
                              f'which our .pdparams files never do')


def _is_paddle_tensor_tuple(v):
    return (isinstance(v, tuple) and len(v) == 2 and isinstance(v[0], str) and isinstance(v[1], np.ndarray))


def _postprocess_paddle(obj):
    """Undo paddle.save's encodings: nested tensors as (name, array), its name table, big-param slices."""
    if isinstance(obj, dict):
        if 'UnpackBigParamInfor@@' in obj:  # paddle.save with protocol 2/3 splits big arrays
            info = obj.pop('UnpackBigParamInfor@@')
            for key, value in info.items():
                parts = [obj.pop(p) for p in value['slices']]
                obj[key] = np.concatenate(parts).reshape(value['OriginShape'])
        obj.pop('StructuredToParameterName@@', None)
        return type(obj)((k, _postprocess_paddle(v)) for k, v in obj.items())
    if _is_paddle_tensor_tuple(obj):
        return obj[1]
    if isinstance(obj, list):
        return [_postprocess_paddle(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_postprocess_paddle(v) for v in obj)
    return obj


_PLAIN_LEAVES = (type(None), bool, int, float, complex, str, bytes, bytearray, np.generic)


def _check_no_objects(obj, path):
    """Refuse anything in a loaded object beyond plain data and numeric numpy arrays."""
    if isinstance(obj, np.ndarray):
        if obj.dtype.hasobject:
            raise CheckpointError(f"'{path}' refused: it holds an array of Python objects, not weights")
    elif isinstance(obj, dict):
        for k, v in obj.items():
            _check_no_objects(k, path)
            _check_no_objects(v, path)
    elif isinstance(obj, (list, tuple, set, frozenset)):
        for v in obj:
            _check_no_objects(v, path)
    elif not isinstance(obj, _PLAIN_LEAVES):
        raise CheckpointError(f"'{path}' refused: it holds a {type(obj).__name__} object, not plain data")


def _unpickle(data_or_file, path, unpickler_cls=_SafeUnpickler, **kw):
    f = io.BytesIO(data_or_file) if isinstance(data_or_file, (bytes, bytearray)) else data_or_file
    try:
        return unpickler_cls(f, path, **kw).load()
    except CheckpointError:
        raise
    except (EOFError, pickle.UnpicklingError, ValueError, TypeError, IndexError, KeyError, AttributeError,
            MemoryError, OverflowError, UnicodeDecodeError, RecursionError, struct.error) as e:
        detail = 'it ends early (truncated?)' if isinstance(e, EOFError) else f'{type(e).__name__}: {e}'
        raise CheckpointError(f"'{path}' is corrupt or truncated: {detail}"[:400]) from None


def load_checkpoint(path):
    """Read one of our checkpoints (or a paddle.save file of plain data) without running any code.

    ``.safetensors`` -> flat dict of numpy arrays (use load_safetensors for the metadata too); pickle
    files -> the saved object with numpy arrays in place of Paddle tensors."""
    path, _ = _open_bytes(path)
    fmt = sniff_format(path)
    if fmt == 'safetensors':
        return load_safetensors(path)[0]
    if fmt == 'torch-zip':
        raise CheckpointError(f"'{path}' is a PyTorch checkpoint, not a Paddle one: convert it with "
                              f"'python -m convert torch2paddle --input {path} --output OUT.pdparams'")
    if fmt != 'pickle':
        raise CheckpointError(f"'{path}' is not a checkpoint (neither a pickle, a torch zip nor safetensors)")
    with open(path, 'rb') as f:
        obj = _unpickle(f, path)
        rest = f.read(1)
    if rest:
        raise CheckpointError(f"'{path}' has data after its pickle: a legacy PyTorch file or a foreign format "
                              f"(not a .pdparams written by paddle.save or by us)")
    _check_no_objects(obj, path)
    return _postprocess_paddle(obj)


def load_safetensors(path):
    """(flat dict name -> numpy array, metadata dict str -> str) of a .safetensors file."""
    path, _ = _open_bytes(path)
    from safetensors import safe_open
    try:
        with safe_open(path, framework='np') as f:
            meta = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own SafetensorError, OSError or ValueError
        raise CheckpointError(f"'{path}' is not a readable .safetensors file: {str(e).splitlines()[0][:200]}") from None
    return tensors, meta


# ------------------------------------------------------------------------------- PyTorch files, no torch

# torch storage class name -> numpy dtype (bfloat16 is read as its bits and widened to float32, exactly)
_TORCH_STORAGE_DTYPES = {
    'DoubleStorage': np.float64, 'FloatStorage': np.float32, 'HalfStorage': np.float16,
    'BFloat16Storage': 'bfloat16', 'LongStorage': np.int64, 'IntStorage': np.int32,
    'ShortStorage': np.int16, 'CharStorage': np.int8, 'ByteStorage': np.uint8, 'BoolStorage': np.bool_,
}
_TORCH_DTYPES = {  # torch.float32 etc. as they appear in _rebuild_tensor_v3 / UntypedStorage files
    'float64': np.float64, 'float32': np.float32, 'float16': np.float16, 'bfloat16': 'bfloat16',
    'int64': np.int64, 'int32': np.int32, 'int16': np.int16, 'int8': np.int8, 'uint8': np.uint8,
    'bool': np.bool_,
}


class _StorageType:
    def __init__(self, dtype):
        self.dtype = dtype


class _TorchDtype:
    def __init__(self, name):
        self.dtype = _TORCH_DTYPES[name]


class _Storage:
    """The raw bytes of one torch storage, with the dtype its record was saved as."""

    def __init__(self, raw, dtype):
        self.raw = raw
        self.dtype = dtype

    def array(self, dtype=None):
        dtype = dtype if dtype is not None else self.dtype
        if dtype == 'bfloat16':
            bits = np.frombuffer(self.raw, dtype='<u2')
            return (bits.astype(np.uint32) << 16).view(np.float32)
        return np.frombuffer(self.raw, dtype=np.dtype(dtype).newbyteorder('<'))


def _strided(storage, offset, size, stride, path, dtype=None):
    flat = storage.array(dtype)
    size = tuple(int(s) for s in size)
    stride = tuple(int(s) for s in stride)
    offset = int(offset)
    if len(size) != len(stride) or offset < 0 or any(s < 0 for s in size) or any(s < 0 for s in stride):
        raise CheckpointError(f"'{path}' is corrupt: bad tensor geometry size={size} stride={stride}")
    if 0 in size:
        return np.zeros(size, dtype=flat.dtype)
    last = offset + sum((n - 1) * s for n, s in zip(size, stride))
    if last >= flat.size:
        raise CheckpointError(f"'{path}' is corrupt: a tensor reaches past the end of its storage")
    item = flat.itemsize
    view = np.lib.stride_tricks.as_strided(flat[offset:], shape=size, strides=tuple(s * item for s in stride),
                                           writeable=False)
    out = np.array(view, copy=True)  # own, native-order memory
    return out.astype(out.dtype.newbyteorder('='), copy=False)


class _TorchUnpickler(_SafeUnpickler):
    """data.pkl of a torch zip checkpoint: tensors become numpy arrays; nothing else beyond plain data."""

    def __init__(self, f, path, storages):
        super().__init__(f, path)
        self._storages = storages  # key -> _Storage

    def find_class(self, module, name):
        if module == 'torch._utils' and name in ('_rebuild_tensor_v2', '_rebuild_tensor'):
            return self._rebuild_tensor
        if module == 'torch._utils' and name == '_rebuild_tensor_v3':
            return self._rebuild_tensor_v3
        if module == 'torch._utils' and name in ('_rebuild_parameter', '_rebuild_parameter_with_state'):
            return lambda data, *args: data
        if module == 'torch' and name in _TORCH_STORAGE_DTYPES:
            return _StorageType(_TORCH_STORAGE_DTYPES[name])
        if module == 'torch' and name in _TORCH_DTYPES:
            return _TorchDtype(name)
        if module == 'torch.storage' and name in ('UntypedStorage', '_UntypedStorage'):
            return _StorageType(np.uint8)
        if module == 'torch' and name == 'Size':
            return _tuple
        if module == 'argparse' and name == 'Namespace':  # DeiT checkpoints carry their args
            return _Namespace
        return super().find_class(module, name)

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == 'storage'):
            raise pickle.UnpicklingError(f'unknown persistent id {str(pid)[:60]}')
        stype, key = pid[1], str(pid[2])
        if isinstance(stype, _TorchDtype):
            stype = _StorageType(stype.dtype)
        if not isinstance(stype, _StorageType):
            raise pickle.UnpicklingError('storage of an unknown type')
        if key not in self._storages:
            raise pickle.UnpicklingError(f'storage record {key} is missing from the archive')
        return _Storage(self._storages[key], stype.dtype)

    def _rebuild_tensor(self, storage, storage_offset, size, stride, *rest):
        if not isinstance(storage, _Storage):
            raise pickle.UnpicklingError('tensor without a storage')
        return _strided(storage, storage_offset, size, stride, self._path)

    def _rebuild_tensor_v3(self, storage, storage_offset, size, stride, requires_grad, backward_hooks, dtype,
                           *rest):
        if not isinstance(storage, _Storage) or not isinstance(dtype, _TorchDtype):
            raise pickle.UnpicklingError('tensor without a storage')
        return _strided(storage, storage_offset, size, stride, self._path, dtype.dtype)


class _Namespace(dict):
    """argparse.Namespace as pickled (NEWOBJ + BUILD of its __dict__), rebuilt as a plain dict."""

    def __new__(cls, *args, **kwargs):
        return dict.__new__(cls)

    def __init__(self, *args, **kwargs):
        dict.__init__(self, **{k: v for k, v in kwargs.items()})

    def __setstate__(self, state):
        if isinstance(state, dict):
            self.update(state)


def _plain_namespaces(obj):
    if isinstance(obj, dict):
        base = dict if isinstance(obj, _Namespace) else type(obj)
        return base((k, _plain_namespaces(v)) for k, v in obj.items())
    if isinstance(obj, list):
        return [_plain_namespaces(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_plain_namespaces(v) for v in obj)
    return obj


class _LazyStorages(dict):
    """Storage records of a torch zip, read on first use."""

    def __init__(self, zf, prefix, path):
        super().__init__()
        self._zf, self._prefix, self._path = zf, prefix, path
        self._names = set(zf.namelist())

    def __contains__(self, key):
        return dict.__contains__(self, key) or f'{self._prefix}data/{key}' in self._names

    def __getitem__(self, key):
        if not dict.__contains__(self, key):
            try:
                dict.__setitem__(self, key, self._zf.read(f'{self._prefix}data/{key}'))
            except (zipfile.BadZipFile, EOFError, OSError, zipfile.LargeZipFile) as e:
                raise CheckpointError(f"'{self._path}' is corrupt or truncated: {e}") from None
        return dict.__getitem__(self, key)


def load_torch_file_safe(path):
    """Read a PyTorch checkpoint (zip format, torch >= 1.6: every released MoCo v3 file) into plain Python
    containers and numpy arrays, with numpy alone. bfloat16 tensors come back as float32 (exact)."""
    path, _ = _open_bytes(path)
    fmt = sniff_format(path)
    if fmt == 'pickle':
        raise CheckpointError(f"'{path}' is a bare pickle, not a PyTorch zip checkpoint (a legacy torch < 1.6 "
                              f"file or a Paddle .pdparams); re-save it with torch >= 1.6, or load it with "
                              f"torch.load(weights_only=True)")
    if fmt != 'torch-zip':
        raise CheckpointError(f"'{path}' is not a PyTorch checkpoint (no zip archive inside)")
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise CheckpointError(f"'{path}' is corrupt or truncated (bad zip archive: {e})") from None
    with zf:
        pkls = [n for n in zf.namelist() if n.endswith('data.pkl') and n.count('/') == 1]
        if len(pkls) != 1:
            raise CheckpointError(f"'{path}' is a zip archive but not a PyTorch checkpoint (no single data.pkl)")
        prefix = pkls[0][: -len('data.pkl')]
        try:
            order = zf.read(prefix + 'byteorder').decode() if prefix + 'byteorder' in zf.namelist() else 'little'
            data = zf.read(pkls[0])
        except (zipfile.BadZipFile, OSError, EOFError) as e:
            raise CheckpointError(f"'{path}' is corrupt or truncated: {e}") from None
        if order != 'little':
            raise CheckpointError(f"'{path}' was saved on a big-endian machine; not supported")
        obj = _unpickle(data, path, _TorchUnpickler, storages=_LazyStorages(zf, prefix, path))
    _check_no_objects(obj, path)
    return _plain_namespaces(obj)


def _main(argv=None):  # python -m paddle_impl.io FILE: a quick look inside a checkpoint, safely
    import argparse
    p = argparse.ArgumentParser(description='Print the structure of a checkpoint without running it.')
    p.add_argument('file')
    a = p.parse_args(argv)
    try:
        fmt = sniff_format(a.file)
        obj = load_torch_file_safe(a.file) if fmt == 'torch-zip' else load_checkpoint(a.file)
    except CheckpointError as e:
        print(f'error: {e}', file=sys.stderr)
        return 2

    def show(o, indent=''):
        if isinstance(o, dict):
            for k, v in o.items():
                if isinstance(v, (dict, list, tuple)) and not isinstance(v, np.ndarray):
                    print(f'{indent}{k}:')
                    show(v, indent + '  ')
                else:
                    print(f'{indent}{k}: ' + (f'{v.dtype}{list(v.shape)}' if isinstance(v, np.ndarray) else repr(v)))
        elif isinstance(o, (list, tuple)):
            print(f'{indent}{type(o).__name__} of {len(o)}')
    print(f'{a.file}: {fmt}')
    show(obj)
    return 0


if __name__ == '__main__':
    sys.exit(_main())
