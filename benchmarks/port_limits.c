/* Peak issue rates behind the limits in benchmarks/int8.py and benchmarks/adder_op.py.

       gcc -O2 -mavx512bw -o /tmp/port_limits benchmarks/port_limits.c && /tmp/port_limits

   Register-only loops with independent accumulators (no memory traffic), so each reports
   the ports' rate: 512-bit vpsadbw per cycle, and fp32 adder ops per cycle of the
   instruction mixes of the adder kernels: the float max / min / fma triple (the input
   gradient for strides > 1), the integer max / min + fma one (stride 1: the clamp on
   integer keys) and sub / and / fma (the forward: |x - w| accumulated by an FMA by 1). Cycles come from a chain of dependent one-cycle adds
   timed the same way (the turbo clock, not /proc/cpuinfo's nominal one). One core. */
#include <immintrin.h>
#include <stdio.h>
#include <time.h>

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

int main(void) {
    const long n = 50000000;
    long x = 0;
    double t = now();
    for (long i = 0; i < n; i++)
        __asm__ volatile("add $1, %0\n\tadd $1, %0\n\tadd $1, %0\n\tadd $1, %0" : "+r"(x));
    double ghz = 4.0 * n / (now() - t) / 1e9;

    __m512i a[4], acc[16];
    for (int i = 0; i < 4; i++) a[i] = _mm512_set1_epi8((char)(3 * i + 1));
    for (int i = 0; i < 16; i++) acc[i] = _mm512_setzero_si512();
    t = now();
    for (long i = 0; i < n; i++) {
        __asm__ volatile("" : "+v"(a[0]), "+v"(a[1]), "+v"(a[2]), "+v"(a[3]));
#pragma GCC unroll 16
        for (int k = 0; k < 16; k++) acc[k] = _mm512_sad_epu8(a[k % 4], acc[k]);
    }
    double sad = 16.0 * n / ((now() - t) * ghz * 1e9);
    long long chk = 0;
    for (int i = 0; i < 16; i++) chk += _mm512_reduce_add_epi64(acc[i]);

    __m512 lo[8], hi[8], f[8], w[4], g[2];
    for (int i = 0; i < 8; i++) {
        lo[i] = _mm512_set1_ps(-1.0f + 0.01f * i);
        hi[i] = _mm512_set1_ps(1.0f + 0.01f * i);
        f[i] = _mm512_setzero_ps();
    }
    for (int i = 0; i < 4; i++) w[i] = _mm512_set1_ps(0.1f * i);
    g[0] = _mm512_set1_ps(1e-9f);
    g[1] = _mm512_set1_ps(2e-9f);
    t = now();
    for (long i = 0; i < n; i++) {
        __asm__ volatile("" : "+v"(w[0]), "+v"(w[1]), "+v"(w[2]), "+v"(w[3]), "+v"(g[0]), "+v"(g[1]));
#pragma GCC unroll 8
        for (int k = 0; k < 8; k++)
            f[k] = _mm512_fmadd_ps(g[k / 4], _mm512_min_ps(_mm512_max_ps(w[k % 4], lo[k]), hi[k]), f[k]);
    }
    double clamp = 8.0 * 16 * n / ((now() - t) * ghz * 1e9);
    float fchk = 0;
    for (int i = 0; i < 8; i++) fchk += _mm512_reduce_add_ps(f[i]);
    __m512i klo[8], khi[8], kw[4];
    for (int i = 0; i < 8; i++) {
        klo[i] = _mm512_set1_epi32(0x3f800000 + i);
        khi[i] = _mm512_set1_epi32(0x40000000 + i);
        f[i] = _mm512_setzero_ps();
    }
    for (int i = 0; i < 4; i++) kw[i] = _mm512_set1_epi32(0x3fc00000 + i);
    t = now();
    for (long i = 0; i < n; i++) {
        __asm__ volatile("" : "+v"(kw[0]), "+v"(kw[1]), "+v"(kw[2]), "+v"(kw[3]), "+v"(g[0]), "+v"(g[1]));
#pragma GCC unroll 8
        for (int k = 0; k < 8; k++)
            f[k] = _mm512_fmadd_ps(g[k / 4], _mm512_castsi512_ps(
                _mm512_min_epi32(_mm512_max_epi32(kw[k % 4], klo[k]), khi[k])), f[k]);
    }
    double keyed = 8.0 * 16 * n / ((now() - t) * ghz * 1e9);
    for (int i = 0; i < 8; i++) fchk += _mm512_reduce_add_ps(f[i]);
    const __m512 one = _mm512_set1_ps(1.0f);
    const __m512i mag = _mm512_set1_epi32(0x7fffffff);
    for (int i = 0; i < 8; i++) f[i] = _mm512_setzero_ps();
    t = now();
    for (long i = 0; i < n; i++) {
        __asm__ volatile("" : "+v"(w[0]), "+v"(w[1]), "+v"(w[2]), "+v"(w[3]), "+v"(g[0]), "+v"(g[1]));
#pragma GCC unroll 8
        for (int k = 0; k < 8; k++) {
            __m512 d = _mm512_sub_ps(w[k % 4], g[k / 4]);
            d = _mm512_castsi512_ps(_mm512_and_si512(_mm512_castps_si512(d), mag));
            f[k] = _mm512_fmadd_ps(d, one, f[k]);
        }
    }
    double absum = 8.0 * 16 * n / ((now() - t) * ghz * 1e9);
    for (int i = 0; i < 8; i++) fchk += _mm512_reduce_add_ps(f[i]);

    printf("clock %.2f GHz\n", ghz);
    printf("vpsadbw zmm: %.2f per cycle (%.0f byte ops per cycle)\n", sad, 64 * sad);
    printf("max/min/fma (input gradient, strides > 1): %.1f fp32 adder ops per cycle\n", clamp);
    printf("integer max/min + fma (input gradient, stride 1): %.1f fp32 adder ops per cycle\n", keyed);
    printf("sub/and/fma (forward): %.1f fp32 adder ops per cycle\n", absum);
    return (chk == 42 && fchk == 42.0f);  /* keeps the accumulators live */
}
