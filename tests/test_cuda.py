"""The CUDA path. On any machine: the module is built where nvcc is, imports without a GPU or
driver, carries sm_80 and sm_90 machine code of its kernels, and jitted models lower to its
custom call with x requested feature-major. On a GPU the numerical tests of test_ops.py and
test_packed_model.py also run the 'cuda' backend (twcheck.runnable_backends), and the tests
marked below check what only a GPU can."""

import contextlib
import dataclasses
import importlib.util
import os
import pathlib
import re
import shutil
import struct
import subprocess

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from jax_tw import _ffi, ops, packing, patterns
from jax_tw.nn import TWDense
from twcheck import clamped_reference, corrupt

ROOT = pathlib.Path(__file__).resolve().parent.parent
needs_cuda_module = pytest.mark.skipif(not _ffi.cuda_available(), reason=_ffi.cuda_import_error())
needs_gpu = pytest.mark.skipif(not (_ffi.cuda_available() and jax.default_backend() == "gpu"),
                               reason="needs a GPU and jax_tw._cuda")


def test_cuda_module_is_built_where_nvcc_is():
    if not shutil.which("nvcc"):
        pytest.skip("no nvcc on this machine: the CUDA module is not expected")
    if os.environ.get("JAX_TW_CUDA") == "OFF":
        pytest.skip("JAX_TW_CUDA=OFF")
    assert _ffi.cuda_available(), _ffi.cuda_import_error()


@needs_cuda_module
def test_cuda_module_imports_and_counts_devices():
    """Statically linked runtime: it loads without a driver and reports an error code there."""
    count = _ffi._cuda.device_count()
    assert isinstance(count, int)
    assert (count > 0) == (jax.default_backend() == "gpu"), count


def _cutlass_include():
    """The CUTLASS headers the build used: $JAX_TW_CUTLASS_INCLUDE, the nvidia-cutlass package,
    or where scripts/venv.sh puts them."""
    candidates = [os.environ.get("JAX_TW_CUTLASS_INCLUDE", "")]
    spec = importlib.util.find_spec("cutlass_library")
    if spec and spec.submodule_search_locations:
        candidates.append(os.path.join(list(spec.submodule_search_locations)[0], "source", "include"))
    candidates.append(str(ROOT / ".venv" / "cutlass" / "cutlass_library" / "source" / "include"))
    return next((c for c in candidates if c and os.path.exists(os.path.join(c, "cute", "tensor.hpp"))), None)


def test_kernel_index_assumptions_hold_for_its_cute_layouts(tmp_path):
    """tests/cuda_layout_check.cu, compiled with nvcc and run on the host: the 16-byte copies land
    on contiguous aligned shared memory at the coordinates the kernel computes their sources
    from, each stage is written exactly once, and the epilogue covers the tile exactly once."""
    nvcc, include = shutil.which("nvcc"), _cutlass_include()
    if not nvcc or not include:
        pytest.skip("needs nvcc and the CUTLASS headers (nvidia-cutlass)")
    exe = tmp_path / "layout_check"
    subprocess.run([nvcc, "-std=c++17", "-O1", "--expt-relaxed-constexpr", f"-I{ROOT / 'cuda'}", f"-I{ROOT / 'cpu'}",
                    f"-I{include}", str(ROOT / "tests" / "cuda_layout_check.cu"), "-o", str(exe)],
                   check=True, capture_output=True, timeout=300)
    done = subprocess.run([str(exe)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "layout ok" in done.stdout, done.stdout + done.stderr


def _nvcc_and_cutlass():
    nvcc, include = shutil.which("nvcc"), _cutlass_include()
    if not nvcc or not include:
        pytest.skip("needs nvcc and the CUTLASS headers (nvidia-cutlass)")
    examples = pathlib.Path(include).parent / "examples" / "common"
    return nvcc, [f"-I{ROOT / 'cuda'}", f"-I{ROOT / 'cpu'}", f"-I{include}", f"-I{examples}"]


def test_hopper_kernel_index_assumptions_hold(tmp_path):
    """tests/cuda_sm90_check.cu, compiled with nvcc and run on the host: the Hopper kernel's
    gathered 16-byte copies read x at the kept (or, when corrupt, the zero) K index and the
    weights at the kept row, each element of a tile once, for depths below, at and above the
    k-block and M not a multiple of the block; they land once each in the swizzled stages; the
    wgmma accumulators, staged 64 rows at a time, cover the block once; the shared memory fits
    an H100/H200 with at least 4 stages; the persistent grid's walk gives every unit to one CTA,
    in the schedule's order, and writes every entry of y once."""
    nvcc, includes = _nvcc_and_cutlass()
    exe = tmp_path / "sm90_check"
    subprocess.run([nvcc, "-std=c++17", "-O1", "--expt-relaxed-constexpr", "-diag-suppress=177", *includes,
                    str(ROOT / "tests" / "cuda_sm90_check.cu"), "-o", str(exe)],
                   check=True, capture_output=True, timeout=300)
    done = subprocess.run([str(exe)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "sm90 ok" in done.stdout, done.stdout + done.stderr


def test_hopper_kernel_is_built_with_warpgroup_mma(tmp_path):
    """The sm_90a kernel really holds wgmma (a kernel built for a target without it compiles
    silently to a stub): its PTX for compute_90a has the m64n128k16 bf16 warpgroup MMA, fed by
    cp.async copies. Every named barrier it waits on exists: the hardware has 16, and
    CUTLASS's NamedBarrier adds 8 to a user ID (a reserved ID cast to int was once passed
    as a user ID, giving barrier 16)."""
    nvcc, includes = _nvcc_and_cutlass()
    ptx = tmp_path / "sm90.ptx"
    subprocess.run([nvcc, "-std=c++17", "-O3", "--expt-relaxed-constexpr", "-diag-suppress=177,940,2473",
                    "-arch=compute_90a", *includes, "-ptx", str(ROOT / "cuda" / "tw_cuda_sm90.cu"),
                    "-o", str(ptx)], check=True, capture_output=True, timeout=300)
    text = ptx.read_text()
    for shape in ("m64n128k16", "m64n64k16"):  # column chunks of 128 and 64
        assert text.count(f"wgmma.mma_async.sync.aligned.{shape}.f32.bf16.bf16") >= 2, f"no {shape} wgmma"
    assert "cp.async" in text and "TileGemmSm90Kernel" in text
    lines = text.splitlines()
    ids = []
    for i, line in enumerate(lines):
        m = re.match(r"\s*bar(?:rier)?\.sync(?:\.aligned)?\s+(%r\d+|\d+)", line)
        if not m:
            continue
        operand = m.group(1)
        if operand.startswith("%"):  # the ID is a register: the constant moved into it last
            movs = [re.match(rf"\s*mov\.[ub]32\s+{re.escape(operand)},\s*(\d+);", lines[j])
                    for j in range(i - 1, -1, -1)]
            value = next((int(mv.group(1)) for mv in movs if mv), None)
            assert value is not None, f"barrier ID {operand} at PTX line {i + 1} is not a constant"
            ids.append(value)
        else:
            ids.append(int(operand))
    assert ids and all(0 <= b < 16 for b in ids), f"named barrier IDs {sorted(set(ids))}"
    assert 8 in ids, "the epilogue's barrier (user barrier 0, hardware 8) is missing"


def _elf_sections(data):
    """{name: (offset, size)} of the sections of a 64-bit little-endian ELF image."""
    assert data[:4] == b"\x7fELF" and data[4] == 2, "not a 64-bit ELF image"
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    headers = [struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize) for i in range(shnum)]
    names = headers[shstrndx][4]
    return {data[names + h[0]:data.index(b"\0", names + h[0])].decode(): (h[4], h[5]) for h in headers}


def fatbin_cubins(path):
    """(sm, kind, payload) of every entry in the .nv_fatbin section of a shared object
    (kind 1: PTX, 2: ELF machine code)."""
    data = open(path, "rb").read()
    start, size = _elf_sections(data)[".nv_fatbin"]
    out, pos, end = [], start, start + size
    while pos + 16 <= end:
        magic, _, header_size, fat_size = struct.unpack_from("<IHHQ", data, pos)
        if magic != 0xBA55ED50:  # fatbin header magic; the section may be zero-padded
            break
        entry = pos + header_size
        while entry < pos + header_size + fat_size:
            kind, _, entry_header, padded = struct.unpack_from("<HHII", data, entry)
            sm, = struct.unpack_from("<I", data, entry + 28)
            out.append((sm, kind, data[entry + entry_header:entry + entry_header + padded]))
            entry += entry_header + padded
        pos += header_size + fat_size
    return out


@needs_cuda_module
def test_module_carries_sm80_sm90_and_hopper_tile_kernels():
    """Machine code for both architectures plus the sm_90a Hopper kernel, and real code: a
    kernel compiled for an architecture its instructions are not enabled on builds silently to
    a stub of a few instructions (the plain-sm_90 trap of BUILD-FACTS), so each tile GEMM's code
    size is checked too."""
    texts = [(sm, {name: size for name, (_, size) in _elf_sections(payload).items() if name.startswith(".text.")})
             for sm, kind, payload in fatbin_cubins(_ffi._cuda.__file__) if kind == 2]
    for sm in (80, 90):
        [text] = [t for s, t in texts if s == sm and any("TileGemmKernel" in name for name in t)]
        for config in ("Bf16Config", "Tf32Config", "F32Config"):
            sizes = [size for name, size in text.items() if re.search(rf"TileGemmKernelI\w*?{config}", name)]
            assert sizes, (sm, config, sorted(text))
            assert min(sizes) > 16384, f"sm_{sm} {config} tile GEMM is only {min(sizes)} bytes: a stub?"
        # One kernel per layer: no fill, tile-order or column-marking kernels any more.
        assert all("TileGemmKernel" in name for name in text if "jax_tw" in name), (sm, sorted(text))
    # The Hopper kernel: sm_90a machine code only, column chunks of 64 and 128, bf16 and f32 out.
    hopper = [(s, size) for s, t in texts for name, size in t.items() if "TileGemmSm90Kernel" in name]
    assert len(hopper) == 4 and all(s == 90 and size > 16384 for s, size in hopper), hopper


class PackedModel(nn.Module):
    dtype: object = None

    @nn.compact
    def __call__(self, x):
        x = nn.gelu(TWDense(96, tile_size=32, dtype=self.dtype, name="fc1")(x))
        return TWDense(40, tile_size=16, dtype=self.dtype, name="fc2")(x)


def _packed_model(dtype):
    model = PackedModel(dtype=dtype)
    x = jnp.ones((4, 10, 64), dtype or jnp.float32)
    variables = jax.tree.map(np.asarray, model.init(jax.random.key(0), x))
    rng = np.random.default_rng(0)
    masks = {}
    for name, k, n, g in (("fc1", 64, 96, 32), ("fc2", 96, 40, 16)):
        [masks[name]] = patterns.TW2D()([rng.random((k, n)).astype(np.float32)], 0.75, tile_size=g,
                                        min_keep=0.0)
    variables["tw_mask"] = jax.tree.map(np.asarray, masks)
    packed = {}
    for name, g in (("fc1", 32), ("fc2", 16)):
        v = {"params": {name: variables["params"][name]}, "tw_mask": {name: variables["tw_mask"][name]}}
        p = packing.pack_variables(v, tile_size=g, dtype=dtype)
        for col, tree in p.items():
            packed.setdefault(col, {}).update(tree)
    return model, packed, x


@needs_cuda_module
@pytest.mark.parametrize("dtype", [None, jnp.bfloat16])
def test_jitted_model_lowers_to_the_cuda_custom_call(dtype, monkeypatch):
    """From this machine: the automatic backend on a GPU platform is the CUDA custom call, one
    per TWDense layer, with x asked for in column-major layout and the bias fused (no add)."""
    monkeypatch.delenv("JAX_TW_BACKEND", raising=False)
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    model, packed, x = _packed_model(dtype)
    for layer in ("fc1", "fc2"):
        assert packed[packing.PACKED_COLLECTION][layer]["tiles"].dense is None
    lowered = jax.jit(model.apply).trace(packed, x).lower(lowering_platforms=("cuda",))
    text = lowered.as_text()
    calls = [line for line in text.splitlines() if _ffi.CUDA_TARGET in line]
    assert len(calls) == 2, text
    assert _ffi.CPU_TARGET not in text
    for call in calls:
        # operand 0 (x) minor-to-major [0, 1]: column-major; the others default
        assert re.search(r"operand_layouts = \[dense<\[0, 1\]>", call), call
        out = "bf16" if dtype else "f32"
        assert re.search(rf"-> tensor<40x\d+x{out}>", call), call
        assert "exact_f32 = 0" in call, call  # f32: TF32 tensor cores, as jnp.dot by default


@needs_cuda_module
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_packed_layer_fuses_bias_and_dtype_into_the_cuda_call(dtype, monkeypatch):
    """TWDense's packed path hands its bias to tw_matmul, and the CUDA kernel adds it and writes
    the layer's dtype itself: lowered for a GPU, nothing adds or converts after the call."""
    monkeypatch.setenv("JAX_TW_BACKEND", "cuda")
    layer = TWDense(40, tile_size=16, dtype=dtype, param_dtype=dtype)
    x = jax.random.normal(jax.random.key(0), (16, 24), dtype)
    variables = layer.init(jax.random.key(1), x)
    variables["params"]["bias"] = jax.random.normal(jax.random.key(2), (40,), dtype)
    packed = packing.pack_variables(variables)
    text = jax.jit(layer.apply).trace(packed, x).lower(lowering_platforms=("cuda",)).as_text()
    calls = text.split(f"custom_call @{_ffi.CUDA_TARGET}")
    assert len(calls) == 2, text
    after = calls[1].split("return")[0]  # the rest of the function that makes the call
    assert "stablehlo.add" not in after and "stablehlo.convert" not in after, after


@needs_cuda_module
def test_layer_precision_reaches_the_cuda_call(monkeypatch):
    """A packed layer's precision: HIGHEST asks the kernel for exact f32, anything else (or
    nothing) for TF32, per call or through JAX's default matmul precision."""
    monkeypatch.delenv("JAX_TW_BACKEND", raising=False)
    _, packed, x = _packed_model(None)
    tiles = packed[packing.PACKED_COLLECTION]["fc1"]["tiles"]
    variables = {"params": {"bias": np.zeros(96, np.float32)}, packing.PACKED_COLLECTION: {"tiles": tiles}}

    def exact_flags(precision, default=None):
        layer = TWDense(96, tile_size=32, precision=precision)
        with jax.default_matmul_precision(default) if default else contextlib.nullcontext():
            text = jax.jit(layer.apply).trace(variables, x).lower(lowering_platforms=("cuda",)).as_text()
        return re.findall(r"exact_f32 = (\d)", text)

    highest = jax.lax.Precision.HIGHEST
    assert exact_flags(None) == exact_flags(jax.lax.Precision.DEFAULT) == exact_flags("high") == ["0"]
    assert exact_flags(highest) == exact_flags((highest, highest)) == exact_flags("highest") == ["1"]
    assert exact_flags(None, default="float32") == ["1"]
    with pytest.raises(ValueError, match="precision must be"):
        ops.tw_matmul(x.reshape(-1, 64), tiles, precision="bogus")


@needs_cuda_module
def test_gradients_lower_for_cuda(monkeypatch):
    """Training through packed tiles on a GPU: the forward is the CUDA kernel, the backward the
    reference path (no second custom call)."""
    model, packed, x = _packed_model(None)

    tiles = packed[packing.PACKED_COLLECTION]["fc1"]["tiles"]

    def loss(values, x):
        return jnp.sum(ops.tw_matmul(x, dataclasses.replace(tiles, values=values), backend="cuda") ** 2)

    grad = jax.jit(jax.grad(loss, argnums=(0, 1)))
    text = grad.trace(tiles.values, x).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count(f"@{_ffi.CUDA_TARGET}(") == 1, text


@needs_cuda_module
def test_cuda_backend_named_when_missing_is_a_clear_error(monkeypatch):
    _, packed, x = _packed_model(None)
    monkeypatch.setattr(_ffi, "_cuda", None)
    monkeypatch.setattr(_ffi, "_cuda_error", "jax_tw._cuda is not built (test)")
    with pytest.raises(ValueError, match=r"backend='cuda' was requested but jax_tw._cuda is not built"):
        ops.tw_matmul(x, packed[packing.PACKED_COLLECTION]["fc1"]["tiles"], backend="cuda")


def _emulated_kernel(calls):
    """A stand-in for jax.ffi.ffi_call of the CUDA target, computing the kernel's contract on
    the host with numpy (independently of the library's reference path). It checks what the
    kernel requires of its operands and records each call's layouts and shapes."""
    real_ffi_call = jax.ffi.ffi_call

    def ffi_call(target, result, vmap_method=None, input_layouts=None, **kw):
        if target != _ffi.CUDA_TARGET:
            return real_ffi_call(target, result, vmap_method=vmap_method, input_layouts=input_layouts, **kw)

        def call(x, columns, row_offsets, rows, values, tile_order, pruned, pruned_offsets, bias, *,
                 n, tile_size, exact_f32):
            calls.append(dict(layouts=input_layouts, x=x.shape, values=values.shape, out=result.dtype,
                              exact_f32=int(exact_f32)))

            def host(x, columns, row_offsets, rows, values, tile_order, pruned, pruned_offsets, bias):
                vec = 16 // x.dtype.itemsize
                assert x.shape[0] % vec == 0 and values.shape[1] % vec == 0
                assert not np.asarray(x[:, -1], np.float32).any()  # the zero feature K
                x = x[:, :-1]
                assert values.shape[1] >= tile_size and bias.dtype == np.float32
                t = len(row_offsets) - 1
                assert t > 0 and len(pruned) >= 1
                # The kernel's write pattern: tile t writes its columns and its span of pruned
                # columns, in the schedule's order (NaN where nothing writes).
                xf, vf = np.asarray(x, np.float64), np.asarray(values, np.float64)
                y = np.full((x.shape[0], int(n)), np.nan)
                for tile in tile_order:
                    q = slice(row_offsets[tile], row_offsets[tile + 1])
                    cols = columns[tile * tile_size:(tile + 1) * tile_size]
                    y[:, cols] = xf[:, rows[q]] @ vf[q, :len(cols)] + bias[cols]
                    span = pruned[pruned_offsets[tile]:pruned_offsets[tile + 1]]
                    y[:, span] = bias[span]
                return y.astype(result.dtype)

            return jax.pure_callback(host, jax.ShapeDtypeStruct(result.shape, result.dtype),
                                     x, columns, row_offsets, rows, values, tile_order, pruned,
                                     pruned_offsets, bias)
        return call
    return ffi_call


@needs_cuda_module
@pytest.mark.parametrize("dtype", [np.float32, jnp.bfloat16])
@pytest.mark.parametrize("m,g,pattern", [(1, 12, patterns.TW2D()), (13, 32, patterns.TEW(residue=0.05)),
                                         (40, 8, patterns.TW2D())])
def test_cuda_path_glue_with_an_emulated_kernel(dtype, m, g, pattern, monkeypatch):
    """The Python side of the CUDA path on this machine: padding of M and of the weight rows,
    column-major x, fused bias, output dtype (f32 when XLA adds a residue), slicing, grads."""
    calls = []
    monkeypatch.setattr(jax.ffi, "ffi_call", _emulated_kernel(calls))
    rng = np.random.default_rng(m + g)
    k, n = 48, 70
    w = rng.normal(size=(k, n)).astype(dtype)
    [mask] = pattern([rng.random((k, n)).astype(np.float32)], 0.6, tile_size=g, min_keep=0.0)
    p = packing.pack(w, jax.tree.map(np.asarray, mask), g, keep_dense=False)
    has_residue = np.shape(p.residue_rows)[0] > 0
    assert has_residue == isinstance(pattern, patterns.TEW)
    x = rng.normal(size=(m, k)).astype(dtype)
    bias = rng.normal(size=(n,)).astype(np.float32)
    y = jax.jit(lambda x, b: ops.tw_matmul(x, p, b, backend="cuda"))(x, bias)
    assert y.shape == (m, n) and y.dtype == np.dtype(dtype)
    want = np.asarray(x, np.float64) @ np.asarray(packing.unpack(p), np.float64) + bias
    tol = 1e-5 if dtype == np.float32 else 2 ** -7
    np.testing.assert_allclose(np.asarray(y, np.float64), want, rtol=tol, atol=tol * np.abs(want).max())
    [c] = calls
    vec = 16 // np.dtype(dtype).itemsize
    assert c["layouts"][0] == (1, 0) and c["x"] == (max(vec, -(-m // vec) * vec), k + 1)
    assert c["values"][1] == -(-g // vec) * vec
    assert c["out"] == (np.float32 if has_residue else np.dtype(dtype))
    assert c["exact_f32"] == 0  # TF32 for f32 unless HIGHEST is asked for
    if dtype == np.float32:  # gradients: the reference backward around the custom forward
        gx = jax.grad(lambda x: jnp.sum(ops.tw_matmul(x, p, bias, backend="cuda") ** 2))(x)
        gx_ref = jax.grad(lambda x: jnp.sum((x @ packing.unpack(p) + bias) ** 2))(x)
        np.testing.assert_allclose(gx, gx_ref, rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------- GPU only

@needs_gpu
@pytest.mark.parametrize("dtype", [np.float32, jnp.bfloat16])
@pytest.mark.parametrize("m,k,n,g,s", [(1, 64, 96, 32, 0.75), (333, 200, 300, 128, 0.5),
                                       (1000, 256, 520, 200, 0.75), (64, 48, 72, 12, 0.6)])
def test_cuda_kernel_matches_float64_reference(dtype, m, k, n, g, s):
    """Awkward shapes: M = 1 and M not a multiple of 8, N not a multiple of G, G above the
    CTA's 128 columns (two chunks), G not a multiple of 8 (padded weight rows), empty tiles."""
    rng = np.random.default_rng(m + k)
    w = rng.normal(size=(k, n)).astype(dtype)
    [mask] = patterns.TW2D()([rng.random((k, n)).astype(np.float32)], s, tile_size=g, min_keep=0.0)
    mask = jax.tree.map(np.asarray, mask)
    mask["rows"] = mask["rows"].copy()
    mask["rows"][::3] = False  # tiles with no kept rows
    p = packing.pack(w, mask, g)
    x = rng.normal(size=(m, k)).astype(dtype)
    bias = rng.normal(size=(n,)).astype(np.float32)
    y = jax.jit(lambda x, p, b: ops.tw_matmul(x, p, b, backend="cuda"))(x, p, bias)
    want = np.asarray(x, np.float64) @ np.asarray(packing.unpack(p), np.float64) + bias
    got = np.asarray(y, np.float64)
    if dtype == np.float32:  # exact f32 (the tests' default precision is HIGHEST on a GPU)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
        # TF32 tensor cores (Precision.DEFAULT, jnp.dot's default): within twice the error of
        # XLA's own default-precision dot of the same operands.
        default = jax.lax.Precision.DEFAULT
        tf32 = jax.jit(lambda x, p, b: ops.tw_matmul(x, p, b, backend="cuda", precision=default))(x, p, bias)
        xla = jnp.dot(x, jnp.asarray(packing.unpack(p)), precision=default) + bias
        err, xla_err = (np.abs(np.asarray(a, np.float64) - want).max() for a in (tf32, xla))
        assert 0 < err <= 2 * xla_err + 1e-6, (err, xla_err)  # > 0: TF32 did run
    else:  # bf16 inputs exactly representable; f32 accumulation; one bf16 rounding of y
        np.testing.assert_allclose(got, want, rtol=2 ** -7, atol=1e-2 * np.abs(want).max())


@needs_gpu
@pytest.mark.parametrize("dtype", [np.float32, jnp.bfloat16])  # bf16: the Hopper kernel on an H100/H200
def test_cuda_kernel_is_memory_safe_on_corrupt_tiles(dtype):
    """Under jit the tiles cannot be checked on the host: out-of-range indices must be ignored
    by the kernel, not read (the GPU check runs this under compute-sanitizer), and the output is
    the specified clamped result, not whatever memory held."""
    rng = np.random.default_rng(0)
    w = rng.normal(size=(64, 96)).astype(dtype)
    [mask] = patterns.TW2D()([rng.random((64, 96)).astype(np.float32)], 0.5, tile_size=32, min_keep=0.0)
    p = packing.pack(w, jax.tree.map(np.asarray, mask), 32)
    bias = rng.normal(size=(96,)).astype(np.float32)
    f = jax.jit(lambda x, p: _ffi.cuda_tw_matmul(x, p, jnp.asarray(bias), jnp.float32, exact_f32=True))
    x = rng.normal(size=(16, 64)).astype(dtype)
    rows = np.array(p.rows)
    rows[::2] += 10 ** 6  # half the rows out of range
    tol = 1e-5 if dtype == np.float32 else 1e-2
    for bad in (corrupt(p, rows=p.rows + 10 ** 6), corrupt(p, rows=rows),
                corrupt(p, columns=p.columns - 10 ** 6), corrupt(p, row_offsets=p.row_offsets * 1000)):
        y = np.asarray(jax.block_until_ready(f(x, bad)), np.float64)
        np.testing.assert_allclose(y, clamped_reference(x, bad, bias), rtol=tol, atol=10 * tol)


def test_clamped_reference_is_the_plain_product_on_valid_tiles():
    """The corrupt-tiles reference above reduces to x @ W + bias on well-formed tiles, and to
    the bias alone when every index is out of range (checked here, without a GPU)."""
    rng = np.random.default_rng(1)
    w = rng.normal(size=(40, 70)).astype(np.float32)
    [mask] = patterns.TW2D()([rng.random((40, 70)).astype(np.float32)], 0.6, tile_size=16, min_keep=0.0)
    p = packing.pack(w, jax.tree.map(np.asarray, mask), 16)
    x, bias = rng.normal(size=(5, 40)), rng.normal(size=(70,))
    np.testing.assert_allclose(clamped_reference(x, p, bias), x @ packing.unpack(p) + bias, rtol=1e-10)
    for bad in (dataclasses.replace(p, rows=p.rows + 10 ** 6), dataclasses.replace(p, columns=p.columns - 10 ** 6)):
        np.testing.assert_array_equal(clamped_reference(x, bad, bias), np.tile(bias, (5, 1)))
