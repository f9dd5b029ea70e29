"""MoCo v3 checkpoints between PyTorch and Paddle: read any of them safely, say what they are, convert.

Kinds (what a file holds):
  pretrain  the whole MoCo model (base + momentum encoder with projectors, predictor), as main_moco saves:
            {'epoch', 'arch', 'state_dict' (module.base_encoder. / module.momentum_encoder. / module.predictor.),
             'optimizer', 'scaler'}
  linear    a classifier (ViT head / ResNet fc), as main_lincls saves:
            {'epoch', 'arch', 'state_dict' (module.), 'best_acc1', 'optimizer'}
  deit      the base encoder without its projector, as convert_to_deit writes: {'model': backbone}
  backbone  the same weights as a bare state dict

Everything is read with numpy alone (paddle_impl.io: no code in a file is ever run) and kept internally in
the torch layout (names, [out, in] Linear weights, num_batches_tracked), in the official module order; the
Paddle layout is produced through convert.keymap, the one place that knows the mapping.

This module is the public face of convert/ and holds the commands (torch2paddle, paddle2torch, extract,
load_backbone); the work is split by concern:
  formats.py    file formats: reading any file safely, unwrapping the state dict, file-name conventions
  spec.py       kinds, the Checkpoint record, the name -> shape table of each kind and arch
  detect.py     read_checkpoint: framework, kind, arch and image size detected and checked
  translate.py  state dict (over keymap.py), num_batches_tracked, optimizer state and scaler translation
  output.py     writing a Checkpoint in either layout, and --verify (torch_ref vs paddle_impl models)
  export.py     python -m convert export: paddle.jit.save / ONNX for inference

Paddle files we write (.pdparams, our safe pickle, paddle_impl.io.load_checkpoint):
  pretrain / linear: {'format', 'kind', 'arch', 'img_size', 'epoch', 'state_dict' (Paddle names, no prefix),
                      'optimizer' (keyed by parameter name, see below), 'scaler' (Paddle GradScaler form),
                      'best_acc1', 'torch_extras': {'num_batches_tracked': {...}}}
  deit: {'format', 'kind', 'arch', 'img_size', 'model', 'torch_extras'};  backbone: the bare state dict.
Optimizer state: torch's is keyed by the index of a parameter in model.parameters(), a Paddle optimizer's by
run-time tensor names; neither survives the other framework. Paddle files carry the form of the Paddle
trainer (paddle_impl.utils.optimizer_state: {'type', 'lr', 'accumulators': {name: {parameter: array}}}, so
main_moco --resume continues a converted run), with torch's AdamW exp_avg/exp_avg_sq/step as Paddle's
moment1/moment2/beta pows, LARS mu as mu, SGD momentum_buffer as Momentum velocity, Linear-weight states
transposed, plus a 'torch' entry with what only torch has, so that paddle2torch restores the original exactly.
A Paddle-trained optimizer goes to torch when its weight decay is known (the checkpoint's 'args'). Anything
else (several param groups, Paddle's own tensor-name state dict) is dropped with a printed line: the weights
still convert; only resuming the optimizer is lost.
"""
import os

from paddle_impl.io import CheckpointError  # noqa: F401  (re-exported)

from . import output as _output
from .detect import (_detect_kind, _kind_clash, detect_arch, detect_framework,  # noqa: F401
                     from_object, read_checkpoint)
from .formats import (FORMAT, PADDLE_EXTS, TORCH_EXTS, _is_array, _size, _strip_prefixes,  # noqa: F401
                      _unwrap, framework_of_output, load_raw)
from .keymap import KeyMapError  # noqa: F401
from .output import (VerifyError, _safetensors_output, _to_torch, build_output, compare_models,  # noqa: F401
                     model_outputs, paddle_model, relative_differences, torch_model, verify)
from .spec import (KIND_WORDS, KINDS, NBT, Checkpoint, expected_shapes, is_buffer,  # noqa: F401
                   torch_shapes_to_paddle)
from .translate import (TORCH_SCALER_DEFAULT, _optimizer_in, _scaler_paddle_to_torch,  # noqa: F401
                        _scaler_torch_to_paddle, optimizer_to_paddle, paddle_state_dict)


def write_checkpoint(ck, path, framework, before_replace=None):
    """Write ``ck`` to ``path`` (atomically) in ``framework``'s layout (convert.output.write_checkpoint), with
    the object built by this module's ``build_output`` (so that a test can plant a fault in it)."""
    return _output.write_checkpoint(ck, path, framework, before_replace, build=build_output)


# -------------------------------------------------------------------------------------- the commands

def _convert(input, output, src, dst, kind, arch, img_size, do_verify, log, tol=1e-4):
    out_fw = framework_of_output(output, default=dst)
    if out_fw != dst:
        raise CheckpointError(f"'{output}' is a {'PyTorch' if out_fw == 'torch' else 'Paddle'} file name; "
                              f"{'torch2paddle' if dst == 'paddle' else 'paddle2torch'} writes "
                              f"{'.pdparams or .safetensors' if dst == 'paddle' else '.pth / .pth.tar or .safetensors'}")
    _check_output_folder(output)
    ck = read_checkpoint(input, kind, arch, img_size, expect_framework=src)
    log(f"read '{input}': {ck.describe()}")
    def check_written(tmp):  # --verify: the file as written, before it takes the output's name
        back = read_checkpoint(tmp, ck.kind, ck.arch, ck.img_size or 'auto', expect_framework=dst)
        back.path = output
        if dst == 'paddle':
            verify(ck, back, tol, log=log)
        else:
            verify(back, ck, tol, log=log)
    notes = write_checkpoint(ck, output, dst, before_replace=check_written if do_verify else None)
    for n in notes:
        log(n)
    log(f"wrote '{output}' ({'Paddle' if dst == 'paddle' else 'PyTorch'} {ck.kind}, "
        f"{len(ck.state_dict)} tensors, {_size(output)})")
    return ck


def _check_output_folder(output):
    folder = os.path.dirname(os.path.abspath(output))
    if not os.path.isdir(folder):
        raise CheckpointError(f"cannot write '{output}': folder '{folder}' does not exist (create it first)")


def torch2paddle(input, output, kind='auto', arch='auto', img_size='auto', verify=False, log=print):
    """A PyTorch MoCo v3 checkpoint (pretrain / linear / deit / backbone) -> .pdparams or .safetensors."""
    return _convert(input, output, 'torch', 'paddle', kind, arch, img_size, verify, log)


def paddle2torch(input, output, kind='auto', arch='auto', img_size='auto', verify=False, log=print):
    """A Paddle checkpoint -> the official PyTorch layout (.pth / .pth.tar) or .safetensors."""
    return _convert(input, output, 'paddle', 'torch', kind, arch, img_size, verify, log)


def backbone_of(ck, kind='deit'):
    """The base encoder of a pretrain Checkpoint without its projector (what convert_to_deit keeps)."""
    if ck.kind != 'pretrain':
        raise CheckpointError(f"'{ck.path}' is a {KIND_WORDS[ck.kind]} checkpoint ({ck.arch}); extracting a "
                              f"backbone needs a MoCo pre-training checkpoint (module.base_encoder.*)")
    head = 'fc.' if ck.arch == 'resnet50' else 'head.'
    sd = {k[len('base_encoder.'):]: v for k, v in ck.state_dict.items()
          if k.startswith('base_encoder.') and not k.startswith('base_encoder.' + head)}
    return Checkpoint(path=ck.path, kind=kind, arch=ck.arch, img_size=ck.img_size, state_dict=sd,
                      framework=ck.framework)


def extract(input, output, kind='deit', arch='auto', img_size='auto', log=print):
    """Backbone of a pre-training checkpoint (torch or Paddle) for fine-tuning: torch output {'model': sd}
    (convert_to_deit), Paddle output the same in our format; ``kind='backbone'``: the bare state dict."""
    if kind not in ('deit', 'backbone'):
        raise CheckpointError(f"extract writes --kind deit or backbone, not '{kind}'")
    _check_output_folder(output)
    ck = read_checkpoint(input, 'auto', arch, img_size)
    log(f"read '{input}': {ck.describe()}")
    bb = backbone_of(ck, kind)
    fw = framework_of_output(output, default=ck.framework)
    for n in write_checkpoint(bb, output, fw):
        log(n)
    log(f"wrote '{output}' ({'Paddle' if fw == 'paddle' else 'PyTorch'} {kind} backbone of {ck.arch}, "
        f"{len(bb.state_dict)} tensors, {_size(output)})")
    return bb


def load_backbone(path, arch='auto'):
    """For Paddle fine-tuning / linear classification: (Paddle-layout backbone state dict, Checkpoint) from a
    pretrain, deit or backbone file of either framework (a pretrain file gives its base encoder)."""
    ck = read_checkpoint(path, 'auto', arch)
    if ck.kind == 'linear':
        raise CheckpointError(f"'{path}' is a {KIND_WORDS['linear']} checkpoint; a backbone comes from a "
                              f"pre-training (or DeiT-format) checkpoint")
    if ck.kind == 'pretrain':
        ck = backbone_of(ck)
    sd, _ = paddle_state_dict(ck)
    return sd, ck
