// Calling a convgen CPU artifact from C++ with tvm-ffi alone (no TVM compiler).
//
//   g++ -std=c++17 -O2 deploy.cc -I<tvm_ffi include> -L<dir of libtvm_ffi.so> -ltvm_ffi \
//       -Wl,-rpath,<dir of libtvm_ffi.so> -ldl -o deploy
//   ./deploy build/<name>.so <path to libtvm_runtime.so> [PACKED_SHAPE]
//
// Runs the seed example (1x1x5x5 input, 1x1x3x3 kernel) through the plain entry,
// convgen_main(data, weight, out), and prints the output. With PACKED_SHAPE (the
// manifest's packed_weights.packed.shape, as 1x1x3x3) it then does what a
// deployment with constant weights does: packs them once with
// convgen_pack(weight, packed) and runs convgen_run_packed(data, packed, out),
// printing the same output again.
#include <dlfcn.h>

#include <cstdio>
#include <cstdlib>
#include <vector>
#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/extra/module.h>

namespace ffi = tvm::ffi;

// The module takes any float-aligned buffer; 64-byte aligned ones keep every vector
// store inside one cache line.
struct AlignedAlloc {
  void AllocData(DLTensor* t) {
    size_t bytes = (ffi::GetDataSize(*t) + 63) / 64 * 64;
    t->data = std::aligned_alloc(64, bytes);
  }
  void FreeData(DLTensor* t) { std::free(t->data); }
};

static void print(const ffi::Tensor& out) {
  const float* y = static_cast<const float*>(out.data_ptr());
  for (int i = 0; i < 9; ++i) std::printf("%g%c", y[i], i % 3 == 2 ? '\n' : ' ');
}

int main(int argc, char** argv) {
  if (argc < 3) {
    std::fprintf(stderr, "usage: %s MODULE.so LIBTVM_RUNTIME.so [PACKED_SHAPE]\n", argv[0]);
    return 2;
  }
  // CPU artifacts call TVM's thread pool (__TVMBackendParallelLaunch): make it visible.
  if (!dlopen(argv[2], RTLD_NOW | RTLD_GLOBAL)) {
    std::fprintf(stderr, "%s\n", dlerror());
    return 1;
  }
  ffi::Module mod = ffi::Module::LoadFromFile(argv[1]);
  ffi::Function f = mod->GetFunction("convgen_main").value();

  DLDevice cpu{kDLCPU, 0};
  DLDataType f32{kDLFloat, 32, 1};
  ffi::Tensor data = ffi::Tensor::FromNDAlloc(AlignedAlloc(), ffi::Shape({1, 1, 5, 5}), f32, cpu);
  ffi::Tensor weight = ffi::Tensor::FromNDAlloc(AlignedAlloc(), ffi::Shape({1, 1, 3, 3}), f32, cpu);
  ffi::Tensor out = ffi::Tensor::FromNDAlloc(AlignedAlloc(), ffi::Shape({1, 1, 3, 3}), f32, cpu);
  const float image[25] = {1, 2, 2, 1, 0, 3, 3, 3, 3, 0, 3, 0, 0, 2, 2, 0, 3, 0, 3, 3, 2, 2, 2, 3, 2};
  for (int i = 0; i < 25; ++i) static_cast<float*>(data.data_ptr())[i] = image[i];
  for (int i = 0; i < 9; ++i) static_cast<float*>(weight.data_ptr())[i] = static_cast<float>(i);

  f(data, weight, out);  // destination passing: (data, weight[, bias], out)
  print(out);
  if (argc < 4) return 0;

  // Constant weights: pack once, then run on the packed form as often as needed.
  std::vector<int64_t> packed_shape;
  for (const char* p = argv[3]; *p;) {
    char* end;
    packed_shape.push_back(std::strtoll(p, &end, 10));
    p = *end == 'x' ? end + 1 : end;
  }
  ffi::Tensor packed = ffi::Tensor::FromNDAlloc(
      AlignedAlloc(), ffi::Shape(packed_shape.begin(), packed_shape.end()), f32, cpu);
  mod->GetFunction("convgen_pack").value()(weight, packed);
  ffi::Function run = mod->GetFunction("convgen_run_packed").value();
  run(data, packed, out);  // (data, packed[, bias], out)
  print(out);
  return 0;
}
