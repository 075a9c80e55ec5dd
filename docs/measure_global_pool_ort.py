"""Global average pooling: fastpool against ONNX Runtime (a one-node GlobalAveragePool
model, 2 intra-op threads, spinning off) and PyTorch NCHW, interleaved, each timed call
after an untimed one, medians of 100; float32, 2 threads. Run: ``python
docs/measure_global_pool_ort.py`` (needs torch, onnx, onnxruntime: the bench extra).
Figures in docs/site/performance.md."""
import os
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import time, numpy as np, numba, fastpool, onnx, onnxruntime as ort, torch
from onnx import helper, TensorProto
numba.set_num_threads(2); torch.set_num_threads(2)
def session(shape):
    node = helper.make_node("GlobalAveragePool", ["x"], ["y"])
    g = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(shape))],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(shape[:2]) + [1, 1])])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    o = ort.SessionOptions(); o.intra_op_num_threads = 2; o.inter_op_num_threads = 1
    o.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(m.SerializeToString(), o, providers=["CPUExecutionProvider"])
for shape in ((32, 2048, 7, 7), (1, 2048, 7, 7), (1, 512, 7, 7)):
    x = np.random.default_rng(0).random(shape, dtype=np.float32)
    s = session(shape)
    fs = {"fastpool": lambda: fastpool.adaptive_avg_pool2d(x, 1), "ort": lambda: s.run(None, {"x": x}),
          "torch": lambda: torch.nn.functional.adaptive_avg_pool2d(torch.from_numpy(x), 1)}
    np.testing.assert_allclose(fs["fastpool"](), s.run(None, {"x": x})[0], rtol=1e-5)
    t = {k: [] for k in fs}
    for _ in range(100):
        for k, f in fs.items():
            f(); a = time.perf_counter(); f(); t[k].append(time.perf_counter() - a)
    m = {k: np.median(v) * 1e6 for k, v in t.items()}
    print(shape, " ".join(f"{k} {v:.1f}us" for k, v in m.items()), f"ort/fastpool {m['ort']/m['fastpool']:.2f} torch/fastpool {m['torch']/m['fastpool']:.2f}")
