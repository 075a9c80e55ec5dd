"""Pooling as PyTorch custom operators: ``torch.ops.fastpool.{max,avg,stochastic}_pool{1,2,3}d``,
``adaptive_{avg,max,stochastic}_pool{1,2,3}d`` and ``max_unpool{1,2,3}d``, each with its
``_backward`` operator, autograd wired from one to the other (docs/design.md section 1).

Arguments arrive normalised (``fastpool.torch`` turns PyTorch's ints, tuples and
``None`` into per-axis lists first); the operators take fastpool's NumPy-level functions
to the tensors and give back what they return. Fakes compute output shapes with
fastpool's one output-size rule (``_geometry.output_size``) and strides with its
memory-format rule, so a traced graph's tensors have the eager results' strides.
"""

import torch

from fastpool import _geometry
from fastpool._torch_library import (
    define,
    differentiable,
    fastpool_function,
    device_for,
    empty,
    is_channels_last,
    nothing,
    seed_value,
    to_array,
    to_tensor,
)

OPS = {}  # name -> operator, e.g. OPS["max_pool2d"], OPS["max_pool2d_backward"]
CALLS = {}  # name -> the autograd Function's apply running that operator

_WINDOW = "int[] kernel_size, int[] stride, int[] padding"
_POOL = {
    "max": f"{_WINDOW}, int[] dilation, bool ceil_mode",
    "avg": f"{_WINDOW}, bool ceil_mode, bool count_include_pad, int? divisor_override",
    "stochastic": f"{_WINDOW}, int[] dilation, bool ceil_mode",
}


def _like_input(input, rank, dtype=None):
    """A fake gradient with ``input``'s shape and fastpool's layout for it."""
    return empty(input, tuple(input.shape), is_channels_last(input, rank), rank, dtype)


def _pooled(input, rank, out_spatial, dtype=None):
    return empty(input, tuple(input.shape[:-rank]) + tuple(out_spatial),
                 is_channels_last(input, rank), rank, dtype)


def _window_out(input, rank, kernel_size, stride, padding, dilation, ceil_mode):
    return [_geometry.output_size(n, k, s, p, p, d, ceil_mode) for n, k, s, p, d in
            zip(input.shape[-rank:], kernel_size, stride, padding, dilation)]


def _geometry_args(mode, args):
    """(kernel_size, stride, padding, dilation, ceil_mode) of a window pool's arguments
    (average pooling has dilation 1)."""
    kernel_size, stride, padding = args[:3]
    if mode == "avg":
        return kernel_size, stride, padding, [1] * len(kernel_size), args[3]
    return kernel_size, stride, padding, args[3], args[4]


def _fp_geometry(args):
    """The operator's list arguments as the tuples fastpool's functions take."""
    return tuple(tuple(a) if isinstance(a, list) else a for a in args)


_KEEP = object()  # marks a saved tensor among a backward operator's other arguments


def _gather(values, indices, rank):
    """``values`` read at ``indices`` (flat positions per ``(n, c)`` volume): the
    derivative of a scatter to those positions, as in PyTorch's double backward of
    max pooling."""
    picked = torch.gather(values.flatten(-rank), -1, indices.flatten(-rank))
    return picked.reshape(indices.shape)


def _differentiable_backward(back, grad_of_grad):
    """Register autograd on a backward operator, which is linear in its first argument
    (``grad_output``): ``grad_of_grad(gg, *other_arguments)`` gives that argument's
    gradient. Nothing flows to the others: the input only sets shapes, indices only
    select."""

    def setup_context(ctx, inputs, output):
        rest = inputs[1:]
        ctx.save_for_backward(*[a for a in rest if isinstance(a, torch.Tensor)])
        ctx.rest = [_KEEP if isinstance(a, torch.Tensor) else a for a in rest]

    def backward(ctx, gg):
        saved = iter(ctx.saved_tensors)
        rest = [next(saved) if a is _KEEP else a for a in ctx.rest]
        return (grad_of_grad(gg, *rest),) + (None,) * len(rest)

    CALLS[back._name] = differentiable(back, backward, setup_context)


def _no_double_backward(name):
    raise RuntimeError(
        f"{name} in inference (training=False) is once differentiable: its backward has "
        f"no derivative in fastpool; differentiate the training mode or max pooling "
        f"twice instead")


# ----------------------------------------------------------------------------- window pools

def _window_pool(mode, rank):
    name = f"{mode}_pool{rank}d"
    forward = fastpool_function(name)
    backward = fastpool_function(f"{name}_backward")
    stochastic = mode == "stochastic"
    with_indices = mode != "avg"
    extra = ", bool training, Tensor seed" if stochastic else ""
    outputs = "(Tensor, Tensor)" if with_indices else "Tensor"

    def impl(input, *args):
        device = device_for([input])
        x = to_array(input)
        if mode == "avg":
            return to_tensor(forward(x, *_fp_geometry(args), device=device))
        if mode == "max":
            y, indices = forward(x, *_fp_geometry(args), return_indices=True,
                                 device=device)
            return to_tensor(y), to_tensor(indices)
        *geometry, training, seed = args
        if not training:
            y = forward(x, *_fp_geometry(geometry), training=False, device=device)
            return to_tensor(y), nothing(input, torch.int64)
        y, indices = forward(x, *_fp_geometry(geometry), training=True,
                             seed=seed_value(seed), return_indices=True, device=device)
        return to_tensor(y), to_tensor(indices)

    def fake(input, *args):
        out = _window_out(input, rank, *_geometry_args(mode, args))
        y = _pooled(input, rank, out)
        if not with_indices:
            return y
        if stochastic and not args[-2]:
            return y, nothing(input, torch.int64)
        return y, _pooled(input, rank, out, torch.int64)

    op = define(name, f"(Tensor input, {_POOL[mode]}{extra}) -> {outputs}", impl, fake,
                rank=rank, batch_args=(0,))

    back_args = "Tensor grad_output, Tensor input" + (", Tensor indices" if with_indices
                                                      else "")
    back_extra = ", bool training" if stochastic else ""

    def back_impl(grad_output, input, *args):
        device = device_for([grad_output, input])
        g, x = to_array(grad_output), to_array(input)
        if mode == "avg":
            return to_tensor(backward(g, x, *_fp_geometry(args), device=device))
        indices, *args = args
        if mode == "max":
            return to_tensor(backward(g, x, *_fp_geometry(args),
                                      indices=to_array(indices), device=device))
        *geometry, training = args
        picks = {"indices": to_array(indices)} if training else {}
        return to_tensor(backward(g, x, *_fp_geometry(geometry), training=training,
                                  device=device, **picks))

    def back_fake(grad_output, input, *args):
        return _like_input(input, rank)

    back = define(f"{name}_backward",
                  f"({back_args}, {_POOL[mode]}{back_extra}) -> Tensor", back_impl,
                  back_fake, rank=rank,
                  batch_args=(0, 1, 2) if with_indices else (0, 1))

    def setup_context(ctx, inputs, output):
        input, *args = inputs
        if stochastic:
            *args, training, _seed = args
            args.append(training)
        ctx.args = args
        ctx.save_for_backward(input, output[1] if with_indices else None)

    def grad(ctx, grad_output, *_grad_indices):
        input, indices = ctx.saved_tensors
        picks = (indices,) if with_indices else ()
        if stochastic and not ctx.args[-1]:
            picks = (nothing(input, torch.int64),)
        grad_input = CALLS[f"{name}_backward"](grad_output, input, *picks, *ctx.args)
        return (grad_input,) + (None,) * (len(ctx.args) + (1 if stochastic else 0))

    if mode == "avg":
        _differentiable_backward(back, lambda gg, input, *args: CALLS[name](gg, *args))
    else:
        def grad_of_grad(gg, input, indices, *args):
            if stochastic and not args[-1]:
                _no_double_backward(name)
            return _gather(gg, indices, rank)
        _differentiable_backward(back, grad_of_grad)
    CALLS[name] = differentiable(op, grad, setup_context)
    OPS[name], OPS[f"{name}_backward"] = op, back


# ----------------------------------------------------------------------------- adaptive

def _kept(output_size):
    """An adaptive operator's ``output_size`` as fastpool's functions take it: ``-1``
    (keep that axis's size) is ``None``."""
    return tuple(None if o == -1 else o for o in output_size)


def _adaptive_pool(mode, rank):
    name = f"adaptive_{mode}_pool{rank}d"
    forward = fastpool_function(name)
    backward = fastpool_function(f"{name}_backward")
    stochastic = mode == "stochastic"
    with_indices = mode != "avg"
    extra = ", bool training, Tensor seed" if stochastic else ""

    def impl(input, output_size, *args):
        device = device_for([input])
        x, size = to_array(input), _kept(output_size)
        if mode == "avg":
            return to_tensor(forward(x, size, device=device))
        if mode == "max":
            y, indices = forward(x, size, return_indices=True, device=device)
            return to_tensor(y), to_tensor(indices)
        training, seed = args
        if not training:
            return (to_tensor(forward(x, size, training=False, device=device)),
                    nothing(input, torch.int64))
        y, indices = forward(x, size, training=True, seed=seed_value(seed),
                             return_indices=True, device=device)
        return to_tensor(y), to_tensor(indices)

    def fake(input, output_size, *args):
        size = [n if o == -1 else o for n, o in zip(input.shape[-rank:], output_size)]
        y = _pooled(input, rank, size)
        if not with_indices:
            return y
        if stochastic and not args[0]:
            return y, nothing(input, torch.int64)
        return y, _pooled(input, rank, size, torch.int64)

    op = define(name, f"(Tensor input, SymInt[] output_size{extra}) -> "
                + ("(Tensor, Tensor)" if with_indices else "Tensor"),
                impl, fake, rank=rank, batch_args=(0,))

    back_args = "Tensor grad_output, Tensor input" + (", Tensor indices" if with_indices
                                                      else "")

    def back_impl(grad_output, input, *args):
        device = device_for([grad_output, input])
        g, x = to_array(grad_output), to_array(input)
        if mode == "avg":
            (output_size,) = args
            return to_tensor(backward(g, x, _kept(output_size), device=device))
        indices, output_size, *training = args
        if mode == "max":
            return to_tensor(backward(g, x, _kept(output_size),
                                      indices=to_array(indices), device=device))
        picks = {"indices": to_array(indices)} if training[0] else {}
        return to_tensor(backward(g, x, _kept(output_size), training=training[0],
                                  device=device, **picks))

    def back_fake(grad_output, input, *args):
        return _like_input(input, rank)

    back = define(f"{name}_backward",
                  f"({back_args}, SymInt[] output_size"
                  + (", bool training" if stochastic else "") + ") -> Tensor",
                  back_impl, back_fake, rank=rank,
                  batch_args=(0, 1, 2) if with_indices else (0, 1))

    def setup_context(ctx, inputs, output):
        input, output_size, *rest = inputs
        ctx.args = [output_size] + rest[:1]
        ctx.save_for_backward(input, output[1] if with_indices else None)

    def grad(ctx, grad_output, *_grad_indices):
        input, indices = ctx.saved_tensors
        picks = (indices,) if with_indices else ()
        grad_input = CALLS[f"{name}_backward"](grad_output, input, *picks, *ctx.args)
        return (grad_input,) + (None,) * (3 if stochastic else 1)

    if mode == "avg":
        _differentiable_backward(
            back, lambda gg, input, output_size: CALLS[name](gg, output_size))
    else:
        def grad_of_grad(gg, input, indices, output_size, *training):
            if stochastic and not training[0]:
                _no_double_backward(name)
            return _gather(gg, indices, rank)
        _differentiable_backward(back, grad_of_grad)
    CALLS[name] = differentiable(op, grad, setup_context)
    OPS[name], OPS[f"{name}_backward"] = op, back


# ----------------------------------------------------------------------------- unpooling

def _max_unpool(rank):
    name = f"max_unpool{rank}d"
    forward = fastpool_function(name)
    backward = fastpool_function(f"{name}_backward")
    geometry = f"{_WINDOW}, SymInt[]? output_size"

    def impl(input, indices, *args):
        y = forward(to_array(input), to_array(indices), *_fp_geometry(args),
                    device=device_for([input, indices]))
        return to_tensor(y)

    def fake(input, indices, kernel_size, stride, padding, output_size):
        if output_size is None:
            output_size = [(n - 1) * s - 2 * p + k for n, k, s, p in
                           zip(input.shape[-rank:], kernel_size, stride, padding)]
        return _pooled(input, rank, output_size)

    op = define(name, f"(Tensor input, Tensor indices, {geometry}) -> Tensor", impl, fake,
                rank=rank, batch_args=(0, 1))

    def back_impl(grad_output, input, indices, *args):
        grad_input = backward(to_array(grad_output), to_array(input), to_array(indices),
                              *_fp_geometry(args),
                              device=device_for([grad_output, input, indices]))
        return to_tensor(grad_input)

    def back_fake(grad_output, input, indices, *args):
        return _like_input(input, rank)

    back = define(f"{name}_backward",
                  f"(Tensor grad_output, Tensor input, Tensor indices, {geometry}) -> Tensor",
                  back_impl, back_fake, rank=rank, batch_args=(0, 1, 2))

    def setup_context(ctx, inputs, output):
        input, indices, *args = inputs
        ctx.args = args
        ctx.save_for_backward(input, indices)

    def grad(ctx, grad_output):
        input, indices = ctx.saved_tensors
        return (CALLS[f"{name}_backward"](grad_output, input, indices, *ctx.args),) + (
            None,) * 5

    _differentiable_backward(
        back, lambda gg, input, indices, *args: CALLS[name](gg, indices, *args))
    CALLS[name] = differentiable(op, grad, setup_context)
    OPS[name], OPS[f"{name}_backward"] = op, back


for _rank in (1, 2, 3):
    for _mode in ("max", "avg", "stochastic"):
        _window_pool(_mode, _rank)
        _adaptive_pool(_mode, _rank)
    _max_unpool(_rank)
