"""Convolution as PyTorch custom operators: ``torch.ops.fastpool.conv{1,2,3}d`` and
``conv_transpose{1,2,3}d``, each with a ``_backward`` operator that computes the
gradients asked for (docs/design.md section 1).

The backward operators return three tensors, always (an operator's outputs are
tensors): those not asked for by ``output_mask`` are empty placeholders. ``padding='same'``
reaches the operator as ``same=True`` (its padding is derived from the kernel, which
only the weight knows).
"""

from fastpool import _geometry
from fastpool._torch_library import (
    define,
    differentiable,
    fastpool_function,
    device_for,
    empty,
    is_channels_last,
    nothing,
    to_array,
    to_tensor,
)

OPS = {}  # name -> operator, e.g. OPS["conv2d"], OPS["conv2d_backward"]
CALLS = {}  # name -> the autograd Function's apply running that operator

_GEOMETRY = {
    "conv": "int[] stride, int[] padding, int[] dilation, int groups, bool same",
    "conv_transpose": ("int[] stride, int[] padding, int[] output_padding, int groups, "
                       "int[] dilation"),
}


def _fp_args(kind, args):
    """The operator's geometry arguments as fastpool's function takes them."""
    if kind == "conv":
        stride, padding, dilation, groups, same = args
        return (tuple(stride), "same" if same else tuple(padding), tuple(dilation),
                groups)
    stride, padding, output_padding, groups, dilation = args
    return tuple(stride), tuple(padding), tuple(output_padding), groups, tuple(dilation)


def _out_spatial(kind, input, weight, rank, args):
    sizes, kernel = input.shape[-rank:], weight.shape[-rank:]
    if kind == "conv":
        stride, padding, dilation, _groups, same = args
        if same:
            totals = [d * (k - 1) for k, d in zip(kernel, dilation)]
            lo, hi = [t // 2 for t in totals], [t - t // 2 for t in totals]
        else:
            lo = hi = padding
        return [_geometry.output_size(n, k, s, a, b, d) for n, k, s, a, b, d in
                zip(sizes, kernel, stride, lo, hi, dilation)]
    stride, padding, output_padding, _groups, dilation = args
    return [(n - 1) * s - 2 * p + d * (k - 1) + o + 1 for n, s, p, d, k, o in
            zip(sizes, stride, padding, dilation, kernel, output_padding)]


def _out_channels(kind, weight, args):
    return weight.shape[0] if kind == "conv" else weight.shape[1] * args[3]


def _convolution(kind, rank):
    name = f"{kind}{rank}d"
    forward = fastpool_function(name)
    backward = fastpool_function(f"{name}_backward")
    geometry = _GEOMETRY[kind]

    def impl(input, weight, bias, *args):
        device = device_for([t for t in (input, weight, bias) if t is not None])
        y = forward(to_array(input), to_array(weight), to_array(bias),
                    *_fp_args(kind, args), device=device)
        return to_tensor(y)

    def fake(input, weight, bias, *args):
        lead = tuple(input.shape[:-rank - 1])
        shape = lead + (_out_channels(kind, weight, args),) + tuple(
            _out_spatial(kind, input, weight, rank, args))
        return empty(input, shape, is_channels_last(input, rank), rank)

    op = define(name, f"(Tensor input, Tensor weight, Tensor? bias, {geometry}) -> Tensor",
                impl, fake, rank=rank, batch_args=(0,))

    def back_impl(grad_output, input, weight, *args):
        *args, output_mask = args
        device = device_for([grad_output, input, weight])
        grads = backward(to_array(grad_output), to_array(input), to_array(weight),
                         *_fp_args(kind, args), output_mask=tuple(output_mask),
                         device=device)
        return tuple(to_tensor(g) if g is not None else nothing(input) for g in grads)

    def back_fake(grad_output, input, weight, *args):
        *args, output_mask = args
        return (empty(input, tuple(input.shape), is_channels_last(input, rank), rank)
                if output_mask[0] else nothing(input),
                weight.new_empty(weight.shape) if output_mask[1] else nothing(input),
                weight.new_empty((_out_channels(kind, weight, args),)) if output_mask[2]
                else nothing(input))

    back = define(f"{name}_backward",
                  f"(Tensor grad_output, Tensor input, Tensor weight, {geometry}, "
                  f"bool[] output_mask) -> (Tensor, Tensor, Tensor)",
                  back_impl, back_fake, rank=rank)

    def setup_context(ctx, inputs, output):
        input, weight, bias, *args = inputs
        ctx.args = args
        ctx.has_bias = bias is not None
        ctx.save_for_backward(input, weight)

    def grad(ctx, grad_output):
        input, weight = ctx.saved_tensors
        needs = ctx.needs_input_grad
        mask = [bool(needs[0]), bool(needs[1]), bool(ctx.has_bias and needs[2])]
        if not any(mask):
            return (None,) * (3 + len(ctx.args))
        grads = CALLS[f"{name}_backward"](grad_output, input, weight, *ctx.args, mask)
        return tuple(g if m else None for g, m in zip(grads, mask)) + (None,) * len(ctx.args)

    CALLS[name] = differentiable(op, grad, setup_context)
    _differentiable_backward(name, back, rank)
    OPS[name], OPS[f"{name}_backward"] = op, back


def _differentiable_backward(name, back, rank):
    """Autograd for a backward operator: ``y = op(x, w, b)`` is bilinear in ``(x, w)``,
    so the gradients of its gradients are ``op`` and ``back`` again (gradient
    penalties, Hessian-vector products)."""

    def setup_context(ctx, inputs, output):
        grad_output, input, weight, *args = inputs
        *ctx.geometry, ctx.mask = args
        ctx.save_for_backward(grad_output, input, weight)

    def grad(ctx, ggx, ggw, ggb):
        g, x, w = ctx.saved_tensors
        ggx, ggw, ggb = (gg if asked and gg is not None else None
                         for gg, asked in zip((ggx, ggw, ggb), ctx.mask))
        needs = ctx.needs_input_grad
        terms = []
        if ggx is not None:
            terms.append(CALLS[name](ggx, w, None, *ctx.geometry))
        if ggw is not None:
            terms.append(CALLS[name](x, ggw, None, *ctx.geometry))
        if ggb is not None:
            channel_axis = g.dim() - rank - 1
            shape = [1] * g.dim()
            shape[channel_axis] = -1
            terms.append(ggb.reshape(shape).expand(g.shape))
        grad_g = sum(terms[1:], terms[0]) if terms and needs[0] else None
        grad_x = grad_w = None
        if ggw is not None and needs[1]:
            grad_x = CALLS[f"{name}_backward"](g, x, ggw, *ctx.geometry, [True, False, False])[0]
        if ggx is not None and needs[2]:
            grad_w = CALLS[f"{name}_backward"](g, ggx, w, *ctx.geometry, [False, True, False])[1]
        return (grad_g, grad_x, grad_w) + (None,) * (len(ctx.geometry) + 1)

    CALLS[f"{name}_backward"] = differentiable(back, grad, setup_context)


for _rank in (1, 2, 3):
    _convolution("conv", _rank)
    _convolution("conv_transpose", _rank)
