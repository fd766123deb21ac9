#!/usr/bin/env python
"""Validate the zoo skeletons in tests/fixtures/zoo (runs with the project venv, no torch).

For every model: refill weights (``load_zoo_model``), ``onnx.checker`` full check, run
ONNX Runtime (CPU) at batch 1 and 2 (dynamic batch), require finite, non-constant
outputs and batch consistency, then ``onnxsim.simplify`` and check the simplified model
gives the same outputs. Prints op histograms before/after simplify.
"""
from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

ROOT = Path(__file__).resolve().parents[1]


def _load_zoo_module():
    spec = importlib.util.spec_from_file_location("_zoo_fixtures", ROOT / "tests" / "fixtures" / "zoo.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def op_hist(model: onnx.ModelProto) -> dict[str, int]:
    return dict(Counter(n.op_type for n in model.graph.node).most_common())


def fmt_hist(h: dict[str, int]) -> str:
    return " ".join(f"{k}:{v}" for k, v in h.items())


def run_ort(model: onnx.ModelProto, x: np.ndarray) -> list[np.ndarray]:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})


def input_shape(model: onnx.ModelProto, batch: int) -> tuple[int, ...]:
    dims = model.graph.input[0].type.tensor_type.shape.dim
    return tuple(batch if i == 0 else d.dim_value for i, d in enumerate(dims))


def check(name: str, zoo, simplify: bool) -> bool:
    ok = True

    def fail(msg: str) -> None:
        nonlocal ok
        ok = False
        print(f"  FAIL {msg}")

    t0 = time.perf_counter()
    m = zoo.load_zoo_model(name, seed=0)
    t_load = time.perf_counter() - t0
    onnx.checker.check_model(m, full_check=True)
    # Refill must be deterministic per seed and differ across seeds.
    if zoo.load_zoo_model(name, seed=0).SerializeToString() != m.SerializeToString():
        fail("refill not deterministic")
    m1 = zoo.load_zoo_model(name, seed=1)
    if len(m.graph.initializer) and all(
        a.raw_data == b.raw_data for a, b in zip(m.graph.initializer, m1.graph.initializer)
    ):
        fail("seed has no effect")
    rng = np.random.default_rng(123)
    x2 = rng.standard_normal(input_shape(m, 2), dtype=np.float32)
    t0 = time.perf_counter()
    y1 = run_ort(m, x2[:1])
    t_ort = time.perf_counter() - t0
    y2 = run_ort(m, x2)
    for a, b in zip(y1, y2):
        if a.shape[0] != 1 or b.shape[0] != 2:
            fail(f"batch dim: {a.shape} / {b.shape}")
        if not (np.isfinite(a).all() and np.isfinite(b).all()):
            fail("non-finite output")
        if not (a.std() > 0 and b.std() > 0):
            fail("constant output")
        sens = float(np.abs(b[0] - b[1]).std() / (b.std() + 1e-30))
        if sens < 1e-3:
            fail(f"output barely depends on the input (row diff / std = {sens:.2g})")
        tol = 1e-4 * (1 + np.abs(a).max())
        if not np.allclose(a, b[:1], rtol=1e-3, atol=tol):
            fail(f"batch-2 row 0 != batch-1 (max diff {np.abs(a - b[:1]).max():.3g})")
    size_kib = (zoo.ZOO_DIR / f"{name}.onnx").stat().st_size / 1024
    print(f"{name}: {size_kib:.1f} KiB skeleton, refill {t_load * 1000:.0f} ms, ORT session+run (b1) {t_ort * 1000:.0f} ms, "
          f"out {[a.shape for a in y2]} std {y1[0].std():.3g} max|y| {np.abs(y1[0]).max():.3g} "
          f"input-sensitivity {sens:.3f}")
    print(f"  before: {fmt_hist(op_hist(m))}")
    if simplify:
        import onnxsim

        ms, valid = onnxsim.simplify(m)
        if not valid:
            fail("onnxsim check failed")
        print(f"  after:  {fmt_hist(op_hist(ms))}")
        ys = run_ort(ms, x2)
        for a, b in zip(y2, ys):
            if not np.allclose(a, b, rtol=1e-3, atol=1e-4 * (1 + np.abs(a).max())):
                fail(f"simplified output differs (max diff {np.abs(a - b).max():.3g})")
    return ok


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", action="append", metavar="NAME", help="check only this model (repeatable)")
    p.add_argument("--no-simplify", action="store_true", help="skip the onnxsim step")
    args = p.parse_args(argv)
    zoo = _load_zoo_module()
    names = args.only or zoo.zoo_names()
    failed = [n for n in names if not check(n, zoo, not args.no_simplify)]
    print(f"{len(names) - len(failed)} passed, {len(failed)} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
