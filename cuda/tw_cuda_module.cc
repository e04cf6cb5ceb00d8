// jax_tw._cuda: the pybind11 module of the CUDA custom-call targets (kernels in tw_cuda.cu).
#include <pybind11/pybind11.h>

#include "xla/ffi/api/c_api.h"

extern "C" XLA_FFI_Error* JaxTwTwMatmulCuda(XLA_FFI_CallFrame* call_frame);
extern "C" int JaxTwCudaDeviceCount();
extern "C" void JaxTwCudaSetPoisonOutput(int on);

PYBIND11_MODULE(_cuda, m) {
  m.doc() = "jax_tw CUDA kernels (XLA FFI custom-call targets, platform CUDA)";
  m.def("registrations", [] {
    pybind11::dict d;
    d["jax_tw_tw_matmul_cuda_v2"] =
        pybind11::capsule(reinterpret_cast<void*>(JaxTwTwMatmulCuda));
    return d;
  });
  m.def("device_count", &JaxTwCudaDeviceCount,
        "CUDA devices the runtime sees, or minus the CUDA error code (no driver: -35 or -100).");
  m.def("set_poison_output", [](bool on) { JaxTwCudaSetPoisonOutput(on); },
        "Test hook: while on, the kernel's output is filled with NaN before it runs (also set "
        "by JAX_TW_POISON_OUTPUT=1 at import).");
}
