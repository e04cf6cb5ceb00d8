"""jax.export of a packed model, run in two processes by tests/test_ops.py:
``export DIR`` exports and serializes a jitted packed TWDense model (for CPU and CUDA) with its
inputs and outputs; ``call DIR`` deserializes it in a fresh process and checks the outputs."""

import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np

import jax_tw  # registers the custom-call targets and PackedTiles' serialization
from jax_tw import _ffi, nn, ops, packing, prune

step, out = sys.argv[1], pathlib.Path(sys.argv[2])
model = nn.TWDense(40, tile_size=8)
x = np.random.default_rng(0).normal(size=(5, 24)).astype(np.float32)
if step == "export":
    variables = model.init(jax.random.key(0), jnp.asarray(x))
    tx = prune.step(variables["tw_mask"], prune.one_shot(0.75))
    _, state = tx.update(variables["params"], tx.init(variables["params"]), variables["params"])
    packed = packing.pack_variables({"params": variables["params"], "tw_mask": prune.masks(state)})
    assert packed["tw_packed"]["tiles"].dense is None  # sparse enough: the kernels run
    f = jax.jit(model.apply)
    try:
        jax.export.export(f)(packed, x)
        raise SystemExit("export without export_checks() should refuse the custom calls")
    except ValueError as e:
        assert "custom calls" in str(e), e
    exported = jax.export.export(f, platforms=("cpu", "cuda"), disabled_checks=ops.export_checks())(packed, x)
    text = exported.mlir_module()
    assert _ffi.CPU_TARGET in text, text
    assert _ffi.CUDA_TARGET in text or not _ffi.cuda_available(), text
    (out / "model.bin").write_bytes(exported.serialize())
    packing.save(str(out / "packed.safetensors"), packed)
    np.save(out / "want.npy", np.asarray(f(packed, x)))
else:
    exported = jax.export.deserialize(bytearray((out / "model.bin").read_bytes()))
    packed = packing.load(str(out / "packed.safetensors"))
    y = np.asarray(exported.call(packed, x))
    np.testing.assert_array_equal(y, np.load(out / "want.npy"))
    want = x.astype(np.float64) @ packing.unpack(packed["tw_packed"]["tiles"]) + packed["params"]["bias"]
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)
print(f"export_check {step} ok")
