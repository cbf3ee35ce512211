// Whether this library holds code the current GPU can run: SASS for its architecture,
// or PTX for an older one that the driver compiles at load time. Without either, every
// launch fails with "no kernel image is available"; the caller asks once per device and
// turns that into a reason the backend cannot serve the call.
//
// Every .cu of csrc/ is compiled with the same -gencode flags, so one kernel speaks for
// all of them.
#include "kernels.h"

namespace gk {
namespace {

__global__ void probe_kernel() {}

}  // namespace

cudaError_t kernel_image_status() {
  cudaFuncAttributes attributes;
  return cudaFuncGetAttributes(&attributes, probe_kernel);
}

}  // namespace gk
