"""Hostile input to every public function, fuzzed (``fuzz_hostile.py`` holds the
generators and the rules a call must follow). The fuzz runs in a child process, so a
crash of the interpreter fails this test rather than killing pytest, and under a
timeout, so a hang fails it too."""

import pytest

from test_reliability import run_python


def test_hostile_input_is_refused_cleanly_or_computed_correctly():
    out = run_python("import fuzz_hostile; fuzz_hostile.main()", timeout=600,
                     env={"NUMBA_ENABLE_CUDASIM": "0"})
    print(f"\n{out['examples']} examples per function over {len(out['functions'])} "
          f"functions: {out['outcomes']}")
    assert out["findings"] == [], "\n\n".join(out["findings"][:20])
    # Both kinds of outcome happen: the fuzz is not refused wholesale, nor blind.
    assert out["outcomes"].get("ok", 0) > 50 and out["outcomes"].get("error", 0) > 200


# ----------------------------------------------------------------------------- the oracle

def _call(function, kinds):
    import fuzz_hostile as fz
    import numpy as np
    x = np.arange(24, dtype=np.float32).reshape(1, 1, 4, 6)
    return fz.Call("fake", function, dict(x=x, kernel_size=2), kinds, reference="max")


@pytest.mark.parametrize("behaviour, finding", [
    ("writes its input", "wrote into its input"),
    ("writes past its input", "wrote into its input"),
    ("mute error", "names no argument"),
    ("wrong values", "differ from the reference"),
    ("other exception", None),
])
def test_oracle_catches_each_kind_of_misbehaviour(behaviour, finding):
    """The rules of fuzz_hostile.judge fail on purpose-built misbehaving functions."""
    import fuzz_hostile as fz
    import numpy as np

    def function(x, kernel_size):
        if behaviour == "writes its input":
            x[0, 0, 0, 0] = 99
        elif behaviour == "writes past its input":
            np.ndarray((x.size + 1,), x.dtype, x.base if x.base is not None else x,
                       offset=x.__array_interface__["data"][0]
                       - x.base.__array_interface__["data"][0])[x.size] = 1.0
        elif behaviour == "mute error":
            raise ValueError("bad")
        elif behaviour == "other exception":
            raise IndexError("kernel_size")
        y = fz.ref.max_pool2d(np.asarray(x, np.float64), kernel_size)[0].astype(x.dtype)
        return y + 1 if behaviour == "wrong values" else y

    call = _call(function, dict(x="array", kernel_size="int"))
    if finding is None:
        with pytest.raises(IndexError):
            fz.judge(call, ["x"], dict(call.kwargs))
    else:
        with pytest.raises(fz.Finding, match=finding):
            fz.judge(call, ["x"], dict(call.kwargs))


def test_oracle_passes_a_correct_function():
    import fuzz_hostile as fz
    import numpy as np
    import fastpool

    call = _call(lambda x, kernel_size: fastpool.max_pool2d(x, kernel_size),
                 dict(x="array", kernel_size="int"))
    assert fz.judge(call, ["x"], dict(call.kwargs)) == "ok"
    assert fz.judge(call, ["kernel_size"], dict(call.kwargs, kernel_size=-1)) == "error"
    np.testing.assert_equal(call.kwargs["x"][0, 0, 0], np.arange(6))
