// Running a model deployed by `convgen deploy` from C++, with tvm-ffi and TVM's runtime
// library only (no TVM compiler, no Python).
//
//   g++ -std=c++17 -O2 deploy_model.cc -I<tvm_ffi include> -L<dir of libtvm_ffi.so> \
//       -ltvm_ffi -Wl,-rpath,<dir of libtvm_ffi.so> -ldl -o deploy_model
//   ./deploy_model DIR/<model>.so <path to libtvm_runtime.so> INPUT_SHAPE INPUT.bin
//
// INPUT_SHAPE is the manifest's inputs[0].shape (1x3x224x224), INPUT.bin that many
// float32 values in C order. The model's weights are inside the module, already
// packed for its kernels. Prints the output's shape, then its values, one per line.
#include <dlfcn.h>

#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <vector>
#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/extra/module.h>

namespace ffi = tvm::ffi;

struct AlignedAlloc {
  void AllocData(DLTensor* t) {
    size_t bytes = (ffi::GetDataSize(*t) + 63) / 64 * 64;
    t->data = std::aligned_alloc(64, bytes);
  }
  void FreeData(DLTensor* t) { std::free(t->data); }
};

int main(int argc, char** argv) {
  if (argc < 5) {
    std::fprintf(stderr, "usage: %s MODEL.so LIBTVM_RUNTIME.so INPUT_SHAPE INPUT.bin\n",
                 argv[0]);
    return 2;
  }
  // The Relax VM, its executable loader and the thread pool live in TVM's runtime
  // library: load it (globally) before the module.
  if (!dlopen(argv[2], RTLD_NOW | RTLD_GLOBAL)) {
    std::fprintf(stderr, "%s\n", dlerror());
    return 1;
  }
  std::vector<int64_t> shape;
  for (const char* p = argv[3]; *p;) {
    char* end;
    shape.push_back(std::strtoll(p, &end, 10));
    p = *end == 'x' ? end + 1 : end;
  }
  DLDevice cpu{kDLCPU, 0};
  DLDataType f32{kDLFloat, 32, 1};
  ffi::Tensor x = ffi::Tensor::FromNDAlloc(AlignedAlloc(), ffi::Shape(shape.begin(), shape.end()),
                                           f32, cpu);
  std::ifstream in(argv[4], std::ios::binary);
  in.read(static_cast<char*>(x.data_ptr()), static_cast<std::streamsize>(ffi::GetDataSize(*x.GetDLTensorPtr())));
  if (!in) {
    std::fprintf(stderr, "cannot read %s\n", argv[4]);
    return 1;
  }

  // The module is a Relax VM executable: load it, start a VM on the CPU (device type
  // kDLCPU, device 0, TVM's pooled allocator), and call its "main".
  ffi::Module lib = ffi::Module::LoadFromFile(argv[1]);
  ffi::Module vm = lib->GetFunction("vm_load_executable").value()().cast<ffi::Module>();
  vm->GetFunction("vm_initialization").value()(static_cast<int>(kDLCPU), 0, 2);
  ffi::Function run = vm->GetFunction("main").value();

  ffi::Tensor y = run(x).cast<ffi::Tensor>();  // a model with one output
  for (int i = 0; i < y.ndim(); ++i) std::printf("%lld%s", static_cast<long long>(y.shape()[i]),
                                                 i + 1 < y.ndim() ? "x" : "\n");
  const float* v = static_cast<const float*>(y.data_ptr());
  for (int64_t i = 0; i < y.numel(); ++i) std::printf("%.9g\n", v[i]);
  return 0;
}
