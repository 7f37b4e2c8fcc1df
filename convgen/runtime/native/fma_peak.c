// FMA throughput probe for `convgen bench`: 12 independent vector FMA chains per
// thread (enough to cover the FMA latency x throughput on current x86 and Arm
// cores), VBYTES-wide vectors, OpenMP threads. Returns GFLOP/s.
#include <omp.h>
typedef float vf __attribute__((vector_size(VBYTES)));
double fma_peak(long iters, int threads) {
  double t0 = omp_get_wtime();
  #pragma omp parallel num_threads(threads)
  {
    vf a0={0},a1={0},a2={0},a3={0},a4={0},a5={0},a6={0},a7={0},a8={0},a9={0},a10={0},a11={0};
    vf b, c;
    for (int i = 0; i < (int)(sizeof(vf)/4); ++i) { b[i] = 1.0f + 1e-7f * i; c[i] = 1e-7f; }
    for (long i = 0; i < iters; ++i) {
      a0=a0*b+c; a1=a1*b+c; a2=a2*b+c; a3=a3*b+c; a4=a4*b+c; a5=a5*b+c;
      a6=a6*b+c; a7=a7*b+c; a8=a8*b+c; a9=a9*b+c; a10=a10*b+c; a11=a11*b+c;
      __asm__ volatile("" : "+v"(a0),"+v"(a1),"+v"(a2),"+v"(a3),"+v"(a4),"+v"(a5),"+v"(a6),"+v"(a7),"+v"(a8),"+v"(a9),"+v"(a10),"+v"(a11));
    }
    volatile float sink = a0[0]+a1[0]+a2[0]+a3[0]+a4[0]+a5[0]+a6[0]+a7[0]+a8[0]+a9[0]+a10[0]+a11[0];
    (void)sink;
  }
  double secs = omp_get_wtime() - t0;
  return 2.0 * 12 * (sizeof(vf)/4) * (double)iters * threads / secs / 1e9;
}
