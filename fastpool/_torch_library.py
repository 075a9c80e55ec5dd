"""The machinery behind fastpool's PyTorch custom operators (``torch.ops.fastpool.*``).

Every ``fastpool.torch`` function runs through an operator registered with
``torch.library.custom_op`` (docs/design.md section 1): the operator's kernel hands the
tensors to fastpool's NumPy-level function (zero-copy on the CPU), a fake ("meta")
function gives the output's shape, dtype and strides without running anything (what
``torch.compile`` and ``torch.export`` trace with), autograd is registered against the
backward operators, and a vmap rule folds the vmapped axis into the batch. This module
holds what every operator shares; the operators live in ``_torch_ops_pool`` and
``_torch_ops_conv``.
"""

import inspect

import numpy as np
import torch

from fastpool import _geometry

NAMESPACE = "fastpool"
_SEED_MASK = 2**64 - 1


# ----------------------------------------------------------------------------- tensors

def device_for(tensors):
    """fastpool's ``device=`` for a call on ``tensors`` (non-None): where they live,
    like PyTorch."""
    devices = {t.device.type for t in tensors}
    if len(devices) > 1:
        listed = ", ".join(str(t.device) for t in tensors)
        raise ValueError(f"expected all tensors on one device, got tensors on {listed}")
    return devices.pop()


def to_array(tensor):
    """What fastpool receives for ``tensor``: a zero-copy NumPy view of a CPU tensor
    (whatever its strides), the detached tensor itself for a CUDA tensor (fastpool reads
    its ``__cuda_array_interface__``, which PyTorch refuses on tensors that require
    grad)."""
    if tensor is None:
        return None
    tensor = tensor.detach()
    if tensor.device.type == "cuda":
        return tensor
    # resolve_neg is a no-op (returns the tensor itself) unless the lazy negation bit is
    # set, which .numpy() refuses.
    tensor = tensor.resolve_neg()
    if tensor.dtype == torch.bfloat16:  # NumPy has no bfloat16: ml_dtypes' (_native_half)
        return tensor.view(torch.int16).numpy().view(_ml_dtypes().bfloat16)
    return tensor.numpy()


def to_tensor(result):
    """A tensor for what a fastpool kernel returned: ``torch.from_numpy`` (zero-copy)
    for NumPy arrays; GPU results already are CUDA tensors."""
    if result is None or isinstance(result, torch.Tensor):
        return result
    if result.dtype.name == "bfloat16":
        return torch.from_numpy(result.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(result)


def fastpool_function(name):
    """fastpool's NumPy-level function ``name``, looked up at each call (so a wrapped
    or patched ``fastpool.<name>`` is the one that runs)."""
    import fastpool

    def call(*args, **kwargs):
        return getattr(fastpool, name)(*args, **kwargs)
    return call


def nothing(like, dtype=None):
    """The placeholder an operator returns for an output that was not asked for (an
    operator's outputs are always tensors): empty, 1-D."""
    return like.new_empty((0,), dtype=dtype)


def seed_tensor(seed):
    """A 64-bit fastpool seed as the one-element int64 tensor the stochastic operators
    take (a tensor, so a seed drawn from a torch generator stays inside a compiled
    graph)."""
    signed = seed - 2**64 if seed >= 2**63 else seed
    return torch.full((1,), signed, dtype=torch.int64)


def draw_seed(generator):
    """A seed tensor drawn from ``generator`` (None: PyTorch's default CPU generator),
    so ``torch.manual_seed`` makes stochastic pooling reproducible."""
    device = generator.device if generator is not None else "cpu"
    return torch.randint(-2**63, 2**63 - 1, (1,), dtype=torch.int64, generator=generator,
                         device=device)


def seed_value(seed):
    """The fastpool seed (``[0, 2**64)``) a seed tensor holds."""
    return int(seed.reshape(-1)[0].item()) & _SEED_MASK


# ----------------------------------------------------------------------------- fakes

def is_channels_last(tensor, rank):
    """Whether fastpool computes ``tensor`` (``(N, C, *spatial)`` or ``(C, *spatial)``)
    channels-last: its own rule (``_geometry.memory_format``), read from the strides."""
    shape, strides = tuple(tensor.shape), tuple(tensor.stride())
    if len(shape) == rank + 1:
        shape, strides = (1,) + shape, (tensor.numel(),) + strides
    return _geometry.memory_format(shape, strides, 1) == _geometry.CHANNELS_LAST


def empty(like, shape, channels_last, rank, dtype=None):
    """An uninitialised tensor of ``shape`` (``(N, C, *spatial)`` or ``(C, *spatial)``,
    ``rank`` spatial axes) on ``like``'s device, with the strides fastpool's result
    has: C-contiguous, or those of an ``(N, *spatial, C)`` buffer."""
    if not channels_last:
        return like.new_empty(shape, dtype=dtype)
    lead = len(shape) - rank - 1  # the channel axis
    strides = [0] * len(shape)
    strides[lead] = 1
    step = shape[lead]
    for axis in range(len(shape) - 1, lead, -1):
        strides[axis] = step
        step = step * shape[axis]
    if lead:
        strides[0] = step
    return like.new_empty_strided(tuple(shape), tuple(strides), dtype=dtype)


def out_sizes(input, rank):
    """``input``'s leading (batch, channel) sizes and spatial sizes."""
    return tuple(input.shape[:-rank]), tuple(input.shape[-rank:])


# ----------------------------------------------------------------------------- vmap

def _fold_rule(op, rank, batch_args):
    """A vmap rule for ``op``: the vmapped axis joins the batch axis of the tensors at
    positions ``batch_args`` (input, gradient, indices), the op runs once, and the
    results are split again. Anything else vmapped (a weight, a seed) runs the op once
    per vmapped slice instead."""

    def rule(info, in_dims, *args):
        size = info.batch_size
        others = [d for i, d in enumerate(in_dims) if i not in batch_args]
        if any(isinstance(d, int) for d in others):
            return _loop(op, size, in_dims, args)
        args = list(args)
        folded = None
        for i in batch_args:
            x, d = args[i], in_dims[i]
            x = x.unsqueeze(0).expand(size, *x.shape) if d is None else x.movedim(d, 0)
            if x.dim() == rank + 3:  # batched per sample: (B, N, C, ...) -> (B*N, C, ...)
                folded = x.shape[1]
                x = x.reshape(size * folded, *x.shape[2:])
            args[i] = x
        outputs = op(*args)
        single = isinstance(outputs, torch.Tensor)
        results, dims = [], []
        for out in (outputs,) if single else outputs:
            if out.dim() == 1 and out.numel() == 0:  # a placeholder, the same per sample
                results.append(out[:0])
                dims.append(None)
                continue
            if folded is not None:
                out = out.reshape(size, folded, *out.shape[1:])
            results.append(out)
            dims.append(0)
        if single:
            return results[0], dims[0]
        return tuple(results), tuple(dims)

    return rule


def _loop(op, size, in_dims, args):
    """``op`` once per vmapped slice, results stacked along a new leading axis."""
    runs = []
    for b in range(size):
        sliced = [a.select(d, b) if isinstance(d, int) else a
                  for a, d in zip(args, in_dims)]
        runs.append(op(*sliced))
    if isinstance(runs[0], torch.Tensor):
        return torch.stack(runs), 0
    stacked = tuple(torch.stack([r[k] for r in runs]) for k in range(len(runs[0])))
    return stacked, (0,) * len(stacked)


def _loop_rule(op):
    def rule(info, in_dims, *args):
        return _loop(op, info.batch_size, in_dims, args)
    return rule


# ----------------------------------------------------------------------------- half precision

HALF = (torch.float16, torch.bfloat16)
# The operators whose CPU kernels read and write half precision (fastpool.cpu.HALF_NATIVE).
NATIVE_HALF = frozenset(f"{mode}_pool{rank}d{part}" for mode in ("max", "avg", "stochastic")
                        for rank in (1, 2, 3) for part in ("", "_backward"))


def _ml_dtypes():
    import ml_dtypes
    return ml_dtypes


def _native_half(dtype, tensors):
    """Whether the CPU kernels take ``dtype`` tensors as they are (``HALF_NATIVE``
    operators): CPU tensors, and for bfloat16 ``ml_dtypes`` importable (NumPy's view of
    a bfloat16 tensor)."""
    if any(t.device.type != "cpu" for t in tensors):
        return False
    if dtype == torch.bfloat16:
        try:
            _ml_dtypes()
        except ImportError:
            return False
    return True


def _in_float32(impl, native=False):
    """``impl`` for half-precision tensors: fastpool's kernels compute in float32
    (``fastpool._half``), so float16/bfloat16 tensor arguments are widened (exact), the
    operator runs, and its floating results are rounded once to the input's dtype, as
    PyTorch's CPU kernels accumulate these dtypes in float32. The widened copies keep
    the originals' strides, so fastpool picks the same memory format for them. Floating
    tensors of different dtypes raise ``TypeError``, as PyTorch's ops do. ``native``
    operators get CPU half-precision tensors as they are (``_native_half``): their
    kernels read and write 16-bit floats, with the same results."""
    names = [p.name for p in inspect.signature(impl).parameters.values()
             if p.kind is p.POSITIONAL_OR_KEYWORD]

    def run(*args):
        half = next((a.dtype for a in args
                     if isinstance(a, torch.Tensor) and a.dtype in HALF), None)
        if half is None:
            return impl(*args)
        for i, a in enumerate(args):
            if isinstance(a, torch.Tensor) and a.is_floating_point() and a.dtype != half:
                first = next(j for j, b in enumerate(args) if isinstance(b, torch.Tensor)
                             and b.dtype == half)
                raise TypeError(
                    f"{_name(names, i)} has dtype {a.dtype} but {_name(names, first)} has "
                    f"{half}; pass tensors of one dtype")
        if native and _native_half(half, [a for a in args if isinstance(a, torch.Tensor)]):
            return impl(*args)
        out = impl(*[_widened(a) if isinstance(a, torch.Tensor) and a.dtype in HALF else a
                     for a in args])
        if isinstance(out, torch.Tensor):
            return out.to(half) if out.dtype == torch.float32 else out
        return tuple(o.to(half) if o.dtype == torch.float32 else o for o in out)
    return run


def _name(names, i):
    return names[i] if i < len(names) else f"argument {i}"


def _widened(tensor):
    """``tensor`` in float32 with the same strides, so fastpool reads the same memory
    format from them (``.float()`` would make a non-dense tensor dense, in whichever
    layout its strides are nearest to)."""
    if any(st == 0 and n > 1 for st, n in zip(tensor.stride(), tensor.shape)):
        return tensor.float().contiguous()  # broadcast: fastpool copies it anyway
    wide = torch.empty_strided(tensor.shape, tensor.stride(), dtype=torch.float32,
                               device=tensor.device)
    return wide.copy_(tensor)


# PyTorch's autocast policy for the ops fastpool has (read off torch 2.13's autocast
# tables and checked against them by tests/test_half.py): convolutions run in the
# autocast dtype, these pooling ops in float32 on the CPU; every other pooling op runs
# in its input's dtype. Stochastic pooling follows max pooling.
_LOWER_PRECISION = ("conv", "conv_transpose")
_FLOAT32_ON_CPU = {"max_pool3d", "avg_pool3d", "stochastic_pool3d",
                   "adaptive_max_pool3d", "adaptive_avg_pool3d",
                   "adaptive_stochastic_pool3d",
                   "max_unpool1d", "max_unpool2d", "max_unpool3d"}


def autocast_policy(name):
    """For a forward operator ``name``: a function casting its tensor arguments as
    ``torch.autocast`` would cast a PyTorch op's (None: the op runs as it is called).
    As in PyTorch, only float32/float16/bfloat16 tensors are cast; float64 stays."""
    lower = name[:-2] in _LOWER_PRECISION  # conv2d -> conv
    if not lower and name not in _FLOAT32_ON_CPU:
        return None

    def cast(args):
        device = args[0].device.type
        if lower:
            dtype = torch.get_autocast_dtype(device)
        elif device == "cpu":
            dtype = torch.float32
        else:
            return args
        return tuple(a.to(dtype) if isinstance(a, torch.Tensor) and a.dtype in
                     (torch.float32,) + HALF else a for a in args)
    return cast


# ----------------------------------------------------------------------------- autograd

_IMPLS = {}  # operator name -> the Python function that runs it


def _plain_eager(tensor):
    """Whether a call on ``tensor`` can skip the dispatcher: an ordinary tensor, outside
    torch.compile/export tracing, jit tracing and torch.func transforms."""
    return (type(tensor) is torch.Tensor and not torch.compiler.is_compiling()
            and not torch.jit.is_tracing()
            and not torch._C._are_functorch_transforms_active())


def differentiable(op, backward, setup_context):
    """Register ``backward``/``setup_context`` as ``op``'s autograd formula and return
    a ``torch.autograd.Function`` running ``op`` with the same formula, which is what
    the public functions call: ``torch.func`` transforms (grad, jacrev, ...) take
    autograd Functions that have a ``setup_context``, not custom operators' formulas;
    its vmap rule comes from the operator's own (``generate_vmap_rule``).

    In plain eager calls the Function runs the operator's Python function itself: the
    dispatcher's round trip through a Python-registered operator costs about 100 µs a
    call, several times a small pooling layer's work. Traced calls (compile, export,
    jit.trace) and transformed ones go through the operator."""
    op.register_autograd(backward, setup_context=setup_context)
    name = op._name
    overload = getattr(getattr(torch.ops, NAMESPACE), name).default  # what Dynamo traces

    # An explicit parameter list: Dynamo binds a forward's parameters by name.
    names = [a.name for a in overload._schema.arguments]
    listed = ", ".join(names)
    plain = _plain_eager
    namespace = {"overload": overload, "impl": _IMPLS[name], "plain": plain}
    exec(f"def forward({listed}):\n"
         f"    if plain({names[0]}):\n"
         f"        return impl({listed})\n"
         f"    return overload({listed})\n", namespace)
    forward = namespace["forward"]

    function = type(f"{name}_function", (torch.autograd.Function,), {
        "forward": staticmethod(forward),
        "setup_context": staticmethod(setup_context),
        "backward": staticmethod(backward),
        "generate_vmap_rule": True,
    })
    # Function.apply binds default arguments with inspect.signature on every call
    # (about 40 µs); with every argument given positionally and no torch.func
    # transform active, its C++ base does the same work without that.
    direct = super(torch.autograd.Function, function).apply

    policy = None if name.endswith("_backward") else autocast_policy(name)

    def call(*args):
        if policy is not None and torch.is_autocast_enabled(args[0].device.type):
            args = policy(args)
        if plain(args[0]):
            return direct(*args)
        return function.apply(*args)

    call.function = function
    return call


# ----------------------------------------------------------------------------- define

def define(name, schema, impl, fake, *, rank, batch_args=None):
    """Register ``fastpool::name`` with ``schema``: ``impl`` runs it (on every device),
    ``fake`` gives its outputs' metadata. vmap folds the arguments at ``batch_args``
    into the batch (None: a loop over the vmapped axis). Returns the operator; autograd
    is registered by the caller, which knows the backward operators."""
    impl = _in_float32(impl, native=name in NATIVE_HALF)
    op = torch.library.custom_op(f"{NAMESPACE}::{name}", impl, mutates_args=(),
                                 schema=schema)
    _IMPLS[name] = impl
    op.register_fake(fake)
    if batch_args is None:
        op.register_vmap(_loop_rule(op))
    else:
        op.register_vmap(_fold_rule(op, rank, tuple(batch_args)))
    return op
