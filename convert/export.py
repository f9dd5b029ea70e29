"""python -m convert export: a MoCo v3 model for inference, as Paddle Inference files and/or ONNX.

Input: a main_moco, main_lincls or main_finetune checkpoint of this port (ViTs with --vit-* settings
included), a file written by ``python -m convert``, or an official PyTorch file: all read without running code
in them (convert.formats). What is exported (--kind):
  backbone  the encoder without classifier: features of an image (ViT: the class token after the final norm;
            ResNet-50: the pooled 2048 features). From any file; a classifier file gives its encoder.
  linear    the classifier: logits. Needs a classifier file (main_lincls, main_finetune, linear-*.pth.tar).
  auto      linear for a classifier file, else backbone (the default).

``paddle.jit.save`` traces the eval-mode model with one input ``image`` [N, 3, S, S] float32, N dynamic (for
ResNet-50 the height and width are dynamic too: any size its pooling takes), and
writes PREFIX.json + PREFIX.pdiparams (Paddle 3's program and parameters); ``--format onnx`` converts those
with ``paddle2onnx.export`` into PREFIX.onnx. paddle2onnx's default post-pass (polygraphy constant folding)
would pip-install onnx_graphsurgeon at run time; it is turned off here (``optimize_tool=None``): nothing is
ever installed or downloaded while exporting. Files are written under temporary names and renamed into place
only after the export (and --verify) succeeded: a failure leaves no output behind.
"""
import contextlib
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass, field

import numpy as np

from paddle_impl.io import CheckpointError

from . import keymap
from .formats import FORMAT, _strip_prefixes, load_raw
from .output import VerifyError
from .spec import KIND_WORDS, build_classes

PADDLE_TOL = 1e-5     # Paddle Inference and the torch_ref model vs the eager Paddle model, float32, relative
ONNX_TOL = 1e-4       # onnxruntime vs the eager Paddle model
OPSET = 17
_VIT_FLAGS = (('vit_patch_size', 'patch_size'), ('vit_embed_dim', 'embed_dim'), ('vit_depth', 'depth'),
              ('vit_num_heads', 'num_heads'))


@dataclass
class Source:
    """The weights of one inference model (Paddle layout) and what is needed to build it."""
    path: str
    arch: str
    img_size: int
    what: str                          # one line: what the file is
    classifier: bool                   # the file holds a classifier (linear / fine-tuned)
    state_dict: dict                   # Paddle names, the whole encoder (+ classifier if any)
    vit_kwargs: dict = field(default_factory=dict)
    num_classes: int = None
    extras: dict = field(default_factory=dict)   # num_batches_tracked, for the torch twin


def _head(arch):
    return 'fc' if arch == 'resnet50' else 'head'


def _int_or_none(v):
    return None if v is None else int(np.asarray(v).reshape(-1)[0]) if isinstance(v, np.ndarray) else int(v)


def _from_trainer(obj, path):
    """A Source from a checkpoint written by main_moco / main_lincls / main_finetune."""
    kind, arch = obj.get('kind'), obj.get('arch')
    args = obj.get('args') if isinstance(obj.get('args'), dict) else {}
    sd = obj.get('model') if kind == 'finetune' else obj.get('state_dict')
    if not isinstance(arch, str) or not isinstance(sd, dict) or not sd:
        raise CheckpointError(f"'{path}': a {kind} checkpoint of this port without its arch and weights")
    sd = _strip_prefixes(dict(sd))
    word = {'pretrain': 'main_moco pre-training', 'linear': 'main_lincls linear-classification',
            'finetune': 'main_finetune fine-tuned classifier'}[kind]
    img = _int_or_none(obj.get('img_size') or args.get('img_size')) or 224
    if kind == 'pretrain':
        vit_kwargs = {key: int(args[flag]) for flag, key in _VIT_FLAGS if args.get(flag) is not None}
        skip = f'base_encoder.{_head(arch)}.'
        enc = {k[len('base_encoder.'):]: v for k, v in sd.items()
               if k.startswith('base_encoder.') and not k.startswith(skip)}
        if not enc:
            raise CheckpointError(f"'{path}': no base_encoder.* weights in this pre-training checkpoint")
        return Source(path, arch, img, f'{word} checkpoint ({arch}, epoch {_int_or_none(obj.get("epoch"))})',
                      False, enc, vit_kwargs if arch != 'resnet50' else {})
    vit_kwargs = obj.get('vit_kwargs') if isinstance(obj.get('vit_kwargs'), dict) else {}
    w = sd.get(f'{_head(arch)}.weight')
    if w is None:
        raise CheckpointError(f"'{path}': a {word} checkpoint without its classifier {_head(arch)}.weight")
    n = int(np.shape(w)[1])  # Paddle Linear weight: [in, out]
    return Source(path, arch, img, f'{word} checkpoint ({arch}, {n} classes, epoch '
                  f'{_int_or_none(obj.get("epoch"))})', True, sd, {k: int(v) for k, v in vit_kwargs.items()}, n)


def _from_converted(obj, path, fmt, st_meta):
    """A Source from any other file: convert's reader (official PyTorch files, converted files)."""
    from .checkpoints import backbone_of
    from .detect import from_object
    from .translate import paddle_state_dict
    ck = from_object(obj, path, fmt=fmt, st_meta=st_meta)
    what = ck.describe()
    if ck.kind == 'pretrain':
        ck = backbone_of(ck, 'backbone')
    sd, extras = paddle_state_dict(ck)
    return Source(path, ck.arch, ck.img_size or 224, what, ck.kind == 'linear', sd, {}, ck.num_classes, extras)


def read_source(path):
    """The Source of any checkpoint file, read without running code."""
    path = os.fspath(path)
    if os.path.isdir(path):
        raise CheckpointError(f"'{path}' is a folder, not a checkpoint file")
    if not os.path.exists(path):
        raise CheckpointError(f"--input '{path}': no such file")
    obj, fmt, st_meta = load_raw(path)
    if (fmt == 'pickle' and isinstance(obj, dict) and obj.get('format') == FORMAT
            and obj.get('kind') in ('pretrain', 'linear', 'finetune')):
        return _from_trainer(obj, path)
    return _from_converted(obj, path, fmt, st_meta)


def select(src, kind):
    """(kind to export, Paddle state dict of that model): the classifier, or the encoder alone."""
    if kind == 'auto':
        kind = 'linear' if src.classifier else 'backbone'
    if kind == 'linear' and not src.classifier:
        raise CheckpointError(f"'{src.path}' is a {src.what}: it holds no classifier, so --kind linear cannot be "
                              f"exported; use --kind backbone (features), or pass a main_lincls / main_finetune "
                              f"checkpoint or a {KIND_WORDS['linear']} file")
    if kind not in ('linear', 'backbone'):
        raise CheckpointError(f"--kind must be backbone, linear or auto, not '{kind}'")
    sd = src.state_dict
    if kind == 'backbone' and src.classifier:
        sd = {k: v for k, v in sd.items() if not k.startswith(_head(src.arch) + '.')}
    return kind, sd


# ------------------------------------------------------------------------------------------------ models

def paddle_model(src, kind, sd):
    """The eval-mode paddle_impl model (float32) with the weights ``sd``."""
    import paddle

    from paddle_impl import models as pm

    from .bridge import load_into_paddle
    nc = build_classes(kind, src.arch, src.num_classes)
    prev = paddle.get_default_dtype()
    paddle.set_default_dtype('float32')
    try:
        m = pm.encoder_factory(src.arch, img_size=src.img_size, **src.vit_kwargs)(num_classes=nc)
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"'{src.path}': cannot build {src.arch} at --img-size {src.img_size}: {e}") from None
    finally:
        paddle.set_default_dtype(prev)
    if kind == 'backbone' and src.arch == 'resnet50':
        m.fc = paddle.nn.Identity()
    try:
        load_into_paddle(m, sd, f"'{src.path}'")
    except keymap.KeyMapError as e:
        raise CheckpointError(str(e)) from None
    m.eval()
    return m


def torch_model(src, kind, sd):
    """The eval-mode torch_ref twin (float32) with the same weights."""
    import torch

    from torch_ref import models as tm

    from .bridge import load_into_torch
    nc = build_classes(kind, src.arch, src.num_classes)
    m = tm.encoder_factory(src.arch, img_size=src.img_size, **src.vit_kwargs)(num_classes=nc)
    if kind == 'backbone' and src.arch == 'resnet50':
        m.fc = torch.nn.Identity()
    load_into_torch(m, keymap.paddle_to_torch(sd, src.extras), f"'{src.path}'")
    return m.float().eval()


def eager_paddle(model, x):
    import paddle
    with paddle.no_grad():
        return np.asarray(model(paddle.to_tensor(x)).numpy())


def eager_torch(model, x):
    import torch
    with torch.no_grad():
        return model(torch.from_numpy(x)).numpy()


def predictor(prefix, onednn=False, threads=None):
    """A Paddle Inference predictor (CPU) of PREFIX.json + PREFIX.pdiparams."""
    from paddle import inference
    config = inference.Config(prefix + '.json', prefix + '.pdiparams')
    config.disable_gpu()
    if onednn:
        config.enable_onednn()
    else:
        config.disable_onednn()
    if threads:
        config.set_cpu_math_library_num_threads(int(threads))
    config.disable_glog_info()
    return inference.create_predictor(config)


def run_predictor(pred, x):
    h = pred.get_input_handle(pred.get_input_names()[0])
    h.reshape(list(x.shape))
    h.copy_from_cpu(np.ascontiguousarray(x))
    pred.run()
    return pred.get_output_handle(pred.get_output_names()[0]).copy_to_cpu()


def onnx_session(path, threads=None):
    import onnxruntime as ort
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if threads:
        opts.intra_op_num_threads = int(threads)
    return ort.InferenceSession(path, sess_options=opts, providers=['CPUExecutionProvider'])


def run_onnx(sess, x):
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


# ---------------------------------------------------------------------------------------------- writing

@contextlib.contextmanager
def _quiet_stdout():
    """paddle2onnx's C++ part prints progress on file descriptor 1: keep it for an error message."""
    sys.stdout.flush()
    saved = os.dup(1)
    with tempfile.TemporaryFile(mode='w+b') as tmp:
        os.dup2(tmp.fileno(), 1)
        text = []
        try:
            yield text
        finally:
            sys.stdout.flush()
            os.dup2(saved, 1)
            os.close(saved)
            tmp.seek(0)
            text.append(tmp.read().decode('utf-8', 'replace'))


def jit_save(model, prefix, img_size, dynamic_size=False):
    """paddle.jit.save with a dynamic-batch InputSpec (``dynamic_size``: height and width too, for a ResNet):
    PREFIX.json + PREFIX.pdiparams."""
    import paddle
    hw = [None, None] if dynamic_size else [img_size, img_size]
    spec = paddle.static.InputSpec([None, 3, *hw], 'float32', name='image')
    paddle.jit.save(model, prefix, input_spec=[spec])
    for ext in ('.json', '.pdiparams'):
        if not os.path.isfile(prefix + ext):
            raise CheckpointError(f'paddle.jit.save did not write {prefix + ext}')


def to_onnx(prefix, onnx_path):
    """paddle2onnx.export of PREFIX.json/.pdiparams, with its pip-installing polygraphy pass turned off."""
    import paddle2onnx
    with _quiet_stdout() as printed:
        try:  # paddle2onnx logs its own failure, then fails on an unset variable: keep the logged reason
            paddle2onnx.export(prefix + '.json', prefix + '.pdiparams', save_file=onnx_path, opset_version=OPSET,
                               enable_onnx_checker=True, optimize_tool=None, verbose=False)
        except Exception:  # noqa: BLE001
            pass
    if not os.path.isfile(onnx_path):
        lines = [ln for ln in ''.join(printed).splitlines() if ln.strip()]
        raise CheckpointError(f"paddle2onnx could not convert the model: {lines[-1][:300] if lines else '?'}")


def check_prefix(prefix):
    """The folder PREFIX's files go to must exist and be writable (checked before any work)."""
    prefix = os.fspath(prefix)
    if not prefix or prefix.endswith(os.sep) or os.path.isdir(prefix):
        raise CheckpointError(f"--output '{prefix}' is a folder; give a file prefix such as {prefix.rstrip(os.sep) or '.'}"
                              f"{os.sep}model (writes model.json, model.pdiparams, model.onnx)")
    folder = os.path.dirname(os.path.abspath(prefix))
    if not os.path.isdir(folder):
        raise CheckpointError(f"cannot write '{prefix}.*': folder '{folder}' does not exist (create it first)")
    try:
        fd, probe = tempfile.mkstemp(prefix='.export-probe-', dir=folder)
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        raise CheckpointError(f"cannot write '{prefix}.*' in '{folder}': {e.strerror}") from None
    return folder


# ------------------------------------------------------------------------------------------- verifying

def _rel(ref, other):
    d = float(np.abs(np.asarray(ref, np.float64) - np.asarray(other, np.float64)).max())
    return d / max(float(np.abs(ref).max()), 1e-30)


def verify(src, kind, sd, model, tmp_prefix, formats, log, seed=0):
    """Compare the written files with the eager Paddle model (and the torch twin when torch is there)
    at batch 1 and 3; raises VerifyError past the tolerances. Returns {check: relative difference}."""
    x = np.random.default_rng(seed).standard_normal((3, 3, src.img_size, src.img_size)).astype('float32')
    ref = eager_paddle(model, x)
    res = {}
    if 'paddle' in formats:
        pred = predictor(tmp_prefix)
        got = np.concatenate([run_predictor(pred, x[:1]), run_predictor(pred, x)[1:]])
        res['Paddle Inference vs eager Paddle'] = (_rel(ref, got), PADDLE_TOL)
    if 'onnx' in formats:
        sess = onnx_session(tmp_prefix + '.onnx')
        got = np.concatenate([run_onnx(sess, x[:1]), run_onnx(sess, x)[1:]])
        res['onnxruntime vs eager Paddle'] = (_rel(ref, got), ONNX_TOL)
    try:
        import torch  # noqa: F401
    except ImportError:
        log('verify: torch is not installed: the torch_ref comparison is skipped')
    else:
        res['torch_ref vs eager Paddle'] = (_rel(eager_torch(torch_model(src, kind, sd), x), ref), PADDLE_TOL)
    for name, (r, tol) in res.items():
        log(f'verify: {name}: relative difference {r:.3g} (tolerance {tol:g}, batch 1 and 3)')
    bad = [f'{name} {r:.3g} > {tol:g}' for name, (r, tol) in res.items() if not r <= tol]
    if bad:
        raise VerifyError(f"verification failed: {'; '.join(bad)}; nothing written")
    return {name: r for name, (r, _) in res.items()}


# ---------------------------------------------------------------------------------------------- command

def export(input, output, kind='auto', fmt='paddle', img_size='auto', do_verify=False, log=print):
    """The command: read ``input``, export the ``kind`` model to ``output`` (a prefix) as ``fmt``
    (paddle | onnx | both). Returns {'kind', 'files', 'verify'}."""
    formats = {'paddle': ('paddle',), 'onnx': ('onnx',), 'both': ('paddle', 'onnx')}.get(fmt)
    if formats is None:
        raise CheckpointError(f"--format must be paddle, onnx or both, not '{fmt}'")
    folder = check_prefix(output)
    src = read_source(input)
    log(f"read '{input}': {src.what}")
    if img_size not in ('auto', None):
        src.img_size = int(img_size)
    kind, sd = select(src, kind)
    model = paddle_model(src, kind, sd)
    tmpdir = tempfile.mkdtemp(prefix='.export-', dir=folder)
    try:
        tmp_prefix = os.path.join(tmpdir, 'model')
        jit_save(model, tmp_prefix, src.img_size, dynamic_size=src.arch == 'resnet50')
        if 'onnx' in formats:
            to_onnx(tmp_prefix, tmp_prefix + '.onnx')
        checks = verify(src, kind, sd, model, tmp_prefix, formats, log) if do_verify else None
        exts = (['.json', '.pdiparams'] if 'paddle' in formats else []) + (['.onnx'] if 'onnx' in formats else [])
        files = []
        for ext in exts:
            os.replace(tmp_prefix + ext, os.fspath(output) + ext)
            files.append(os.fspath(output) + ext)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
    out_dim = 'classes' if kind == 'linear' else 'features'
    hw = 'H, W] float32, N, H and W dynamic' if src.arch == 'resnet50' else \
        f'{src.img_size}, {src.img_size}] float32, N dynamic'
    log(f"wrote {', '.join(repr(f) for f in files)} ({src.arch} {kind}: input 'image' [N, 3, {hw}; "
        f"output [N, {out_dim}])")
    return {'kind': kind, 'files': files, 'verify': checks, 'source': src}
