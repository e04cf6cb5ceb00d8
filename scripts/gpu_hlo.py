"""Does XLA transpose x in front of the CUDA custom call, or does the producer write x in the
column-major layout the call asks for? Compiles a small packed model (dense -> gelu -> TWDense)
and prints the custom call, the instruction producing its x and, for a fusion, that fusion's
root. Writes the optimized HLO to the path given (default /tmp/tw_hlo.txt).

    python scripts/gpu_hlo.py [out.txt]
"""

import re
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from jax_tw import _ffi, packing, patterns
from jax_tw.nn import TWDense

M, D, F, G = 4096, 1024, 4096, 128


class Block(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.gelu(nn.Dense(D, dtype=jnp.bfloat16, name="pre")(x))
        return TWDense(F, tile_size=G, dtype=jnp.bfloat16, name="ffn")(h)


def main(out_path="/tmp/tw_hlo.txt"):
    model = Block()
    x = jnp.ones((M, D), jnp.bfloat16)
    variables = jax.tree.map(np.asarray, model.init(jax.random.key(0), x))
    rng = np.random.default_rng(0)
    [mask] = patterns.TW2D()([rng.random((D, F)).astype(np.float32)], 0.75, tile_size=G, min_keep=0.0)
    variables["tw_mask"] = {"ffn": jax.tree.map(np.asarray, mask)}
    packed = packing.pack_variables(variables, tile_size=G, dtype=jnp.bfloat16)
    text = jax.jit(model.apply).lower(packed, x).compile().as_text()
    with open(out_path, "w") as f:
        f.write(text)
    lines = text.splitlines()
    calls = [l for l in lines if "custom-call(" in l and _ffi.CUDA_TARGET in l]
    if not calls:
        print(f"no {_ffi.CUDA_TARGET} custom call in the optimized HLO (backend {jax.default_backend()})")
        return 1
    call = calls[0].strip()
    print("custom call:", call[:400])
    operand = re.search(r"custom-call\((?:[\w\[\],{}]+ )?(%[\w.\-]+)", call).group(1)
    producer = next(l.strip() for l in lines if re.match(rf"\s*(ROOT )?{re.escape(operand)} = ", l))
    print("x produced by:", producer[:400])
    kind = re.search(r"= [\w\[\],{}]+ (\w[\w\-]*)\(", producer).group(1)
    root = ""
    called = re.search(r"calls=(%[\w.\-]+)", producer)
    if called:  # the fused computation's ROOT
        start = next(i for i, l in enumerate(lines) if l.startswith(called.group(1) + " ") or
                     l.startswith(called.group(1)[1:] + " ") or f"{called.group(1)} (" in l)
        root = next(l.strip() for l in lines[start:] if l.strip().startswith("ROOT"))
        print("fusion root:", root[:300])
    extra = kind in ("copy", "transpose") or re.search(r"\b(transpose|copy)\(", root or "")
    print("transpose in front of the custom call:", "yes" if extra else "no (the producer writes x column-major)")
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
