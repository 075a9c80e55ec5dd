"""The signature of every CUDA kernel specialisation fastpool launches, for compiling
them without a GPU (``tests/test_cuda_compile.py``): for both dtypes (and float16 where
the kernels read it), with the argument types the launchers pass. Import this only in a
process where the CUDA simulator is off (``NUMBA_ENABLE_CUDASIM=0``)."""

import numpy as np
from numba import types


def kernels():
    """``[(name, kernel, signature)]``: every specialisation."""
    import fastpool.cuda._launch as launch
    import fastpool.cuda.conv as conv
    import fastpool.cuda.pooling as pooling

    i64, u64, i32, boolean = types.int64, types.uint64, types.int32, types.boolean
    key = types.UniTuple(u64, 7)  # _rng.kernel_key
    flag = types.Array(i32, 1, "C")
    # channels-last flag, then padding, kernel, stride, dilation of (D, H, W)
    window = (boolean,) + (i64,) * 12

    def array(dtype, ndim=4, layout="A"):
        return types.Array(dtype, ndim, layout)

    kernels = []
    for np_dtype, dt in ((np.float32, types.float32), (np.float64, types.float64)):
        # Pooling kernels index 5-D (N, C, D, H, W) arrays of any strides (results are
        # channels-last views for channels-last calls); convolution 4-D ones.
        x, out = array(dt, 5), array(dt, 5)
        f64 = array(types.float64, 5)
        indices = array(i64, 5)
        avg_forward, avg_backward = pooling._avg_kernels(np_dtype)
        avg = (boolean,) + (i64,) * 9 + (boolean, i64)
        kernels += [
            ("copy_2d", launch._copy_2d, (array(dt, 2), array(dt, 2, "C"))),
            ("copy_3d", launch._copy_3d, (array(dt, 3), array(dt, 3, "C"))),
            ("copy_5d", launch._copy_5d, (array(dt, 5), array(dt, 5, "C"))),
            ("max_forward", pooling._max_forward, (x, out, indices, boolean) + window),
            ("gather_to_indices", pooling._gather_to_indices_kernel(np_dtype),
             (x, array(i64, 5), out) + window),
            ("avg_forward", avg_forward, (x, out) + avg),
            ("avg_backward", avg_backward, (x, out) + avg),
            ("stochastic_train", pooling._stochastic_train,
             (x, out, indices, boolean, key) + window + (flag,)),
            ("stochastic_infer", pooling._stochastic_infer_kernel(np_dtype),
             (x, out) + window + (flag,)),
            ("stochastic_infer_shares", pooling._stochastic_infer_shares,
             (x, x, f64, f64) + window + (flag,)),
            ("stochastic_infer_backward",
             pooling._stochastic_infer_backward_kernel(np_dtype),
             (x, f64, f64, out) + window),
        ]
        x, out = array(dt), array(dt, layout="C")
        direct_forward, input_grad, weight_grad, bias_grad, sum_partials = (
            conv._simple_kernels(np_dtype))
        matrix, table = array(dt, 2, "C"), array(i64, 2, "C")
        flat = array(dt, 1, "C")
        forward = (x, array(dt, 3, "C"), array(dt, 1, "C"), boolean, out, table) + (i64,) * 4
        kernels += [
            ("tiled_forward", conv._tiled_forward_kernel(np.dtype(np_dtype),
                                                         conv.PRODUCTION_TILES),
             (flat, i64, i64, i64, flat, array(dt, 1), boolean, out, table) + (i64,) * 5),
            ("tiled_weight_grad", conv._tiled_weight_grad_kernel(
                np.dtype(np_dtype), conv.PRODUCTION_TILES),
             (flat, i64, i64, i64, flat, i64, i64, table, array(dt, 3, "C")) + (i64,) * 6),
            ("copy_4d", launch._copy_4d, (x, out)),
            ("direct_forward", direct_forward, forward),
            ("direct_input_grad", input_grad, (x, x, out) + (i64,) * 7),
            ("direct_weight_grad", weight_grad,
             (x, x, table, array(dt, 3, "C")) + (i64,) * 5),
            ("bias_grad", bias_grad, (x, matrix)),
            ("sum_partials", sum_partials, (matrix, array(dt, 1, "C"))),
            ("gemm_weights", conv._gemm_weights, (x, array(dt, 3, "C"), boolean)),
        ]
    # float16: the pooling kernels read and write it as it is (fastpool.cuda.HALF_NATIVE),
    # summing in float32 (stochastic pooling in float64, as for every dtype).
    x, out, indices = array(types.float16, 5), array(types.float16, 5), array(i64, 5)
    f64 = array(types.float64, 5)
    avg_forward, avg_backward = pooling._avg_kernels(np.float16)
    avg = (boolean,) + (i64,) * 9 + (boolean, i64)
    kernels += [
        ("max_forward", pooling._max_forward, (x, out, indices, boolean) + window),
        ("gather_to_indices", pooling._gather_to_indices_kernel(np.float16),
         (x, indices, out) + window),
        ("avg_forward", avg_forward, (x, out) + avg),
        ("avg_backward", avg_backward, (x, out) + avg),
        ("stochastic_train", pooling._stochastic_train,
         (x, out, indices, boolean, key) + window + (flag,)),
        ("stochastic_infer", pooling._stochastic_infer_kernel(np.float16),
         (x, out) + window + (flag,)),
        ("stochastic_infer_shares", pooling._stochastic_infer_shares,
         (x, x, f64, f64) + window + (flag,)),
        ("stochastic_infer_backward",
         pooling._stochastic_infer_backward_kernel(np.float16), (x, f64, f64, out) + window),
    ]
    import fastpool.cuda.slabs as slabs
    for dt in (types.float32, types.float64):
        kernels += [
            ("slabs_fill", slabs._fill, (array(dt, 3, "C"), array(dt, 1), boolean)),
            ("slabs_gather", slabs._gather, (array(dt, 5), array(dt, 4, "C"), i64, i64)),
            ("slabs_add", slabs._add_slabs, (array(dt, 5), array(dt, 4, "C"), i64, i64)),
            ("slabs_put_tap", slabs._put_tap, (array(dt, 5, "C"), i64, array(dt, 4, "C"))),
        ]
    import fastpool.cuda.pool_adaptive as adaptive
    import fastpool.cuda.pool_unpool as unpool
    table = array(i64, 1)
    tables = (table,) * 6
    for np_dtype, dt in ((np.float32, types.float32), (np.float64, types.float64)):
        x5 = array(dt, 5)
        forward, backward = adaptive.avg_kernels(np_dtype)
        kernels += [
            ("adaptive_avg_forward", forward, (x5, x5) + tables + (boolean,)),
            ("adaptive_avg_backward", backward, (x5, x5) + tables * 2 + (boolean,)),
            ("global_avg_forward", adaptive.global_avg_kernel(np_dtype), (x5, x5, boolean)),
            ("adaptive_max_forward", adaptive.max_forward,
             (x5, x5, array(i64, 5), boolean) + tables + (boolean,)),
            ("adaptive_max_backward", adaptive.max_backward_kernel(np_dtype),
             (x5, array(i64, 5), x5) + tables + (boolean,)),
            ("unpool_fill", unpool.fill_kernel(np_dtype),
             (x5, array(i64, 3, "C"), x5, boolean)),
            ("unpool_gather", unpool.gather_kernel(np_dtype),
             (x5, array(i64, 5), x5, boolean, flag)),
        ]
    import fastpool.cuda.pool_adaptive_stochastic as sampled
    for dt in (types.float32, types.float64):
        x5, f5 = array(dt, 5), array(types.float64, 5)
        kernels += [
            ("adaptive_stochastic_train", sampled.train_forward,
             (x5, x5, array(i64, 5), boolean, key) + tables + (boolean, flag)),
            ("adaptive_stochastic_infer", sampled.infer_forward,
             (x5, x5) + tables + (boolean, flag)),
            ("adaptive_stochastic_shares", sampled.infer_shares,
             (x5, x5, f5, f5) + tables + (boolean, flag)),
            ("adaptive_stochastic_backward", sampled.infer_backward,
             (x5, f5, f5, x5) + tables + (boolean,)),
        ]
    kernels += [
        ("adaptive_check_indices", adaptive.check_indices,
         (array(i64, 5), i64, i64) + tables + (boolean, flag)),
        ("unpool_claim", unpool.claim, (array(i64, 5), array(i64, 3, "C"), boolean, flag)),
        ("unpool_reset", unpool.reset, (array(i64, 3, "C"),)),
    ]
    kernels.append(("check_window_indices", pooling._check_window_indices,
                    (array(i64, 5), i64, i64, i64) + window + (flag,)))
    import fastpool.cuda.conv_reproducible as reproducible
    f64 = types.float64
    sigma = array(f64, 1, "C")
    for dt in (types.float32, types.float64):
        kernels += [
            ("reproducible_weight", reproducible._weight_kernel,
             (array(dt, 5), array(dt, 5), array(f64, 6, "C"), sigma, f64) + (i64,) * 13),
            ("reproducible_bias", reproducible._bias_kernel,
             (array(dt, 5), array(f64, 2, "C"), sigma, f64)),
            ("reproducible_max", reproducible._max_kernel,
             (array(dt, 5), array(f64, 1, "C"), flag)),
            ("reproducible_finish", reproducible._finish_kernel,
             (array(f64, 2, "C"), f64, array(dt, 1, "C"))),
        ]
    return kernels
