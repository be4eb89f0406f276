/* One-read histogram of |x| for HistogramCalibrator on the CPU.
 *
 * torch.histc needs |x| materialised first (a copy for signed tensors) and costs ~5 ns per element
 * per thread; calibration then takes longer than the forward it observes. This kernel reads x once:
 * |x|, the bin, the maximum, zeros, values above the range and non-finite values in the same pass.
 * The bin of a value is floor(|x| * (nbins / range)) with nbins / range a power of two, so it is
 * exact and equals torch.histc's bin on the same range (a value equal to range goes to the last bin).
 * Each thread counts into four interleaved uint32 sub-histograms (consecutive equal bins, e.g. the
 * zeros of a ReLU output, would otherwise serialise on one counter) and flushes to int64.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
    const float *x;
    int64_t n;
    int32_t nbins;
    float range;
    int64_t *counts; /* nbins, this thread's totals */
    int64_t zeros, over, nonfinite;
    float maxabs;
    int failed;
} job_t;

typedef uint32_t __attribute__((may_alias)) u32a; /* reads the float bits without UB */

#define FLUSH_EVERY ((int64_t)1 << 30) /* < 2^32 increments per uint32 counter between flushes */

#define BLOCK 256

/* The bin and max loops vectorise; with AVX2 (pmaxud, vcvttps2dq on 8 lanes) the kernel is ~2.5x
 * faster than with the SSE2 baseline, so x86-64 builds carry both and pick at load time. */
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
__attribute__((target_clones("avx2", "default")))
#endif
static void *run(void *arg) {
    job_t *j = (job_t *)arg;
    const int32_t nb = j->nbins, last = nb - 1, stride = nb + 2;
    const float scale = (float)nb / j->range, range = j->range;
    /* Bins 0..nb-1, then nb: finite values above the range, nb+1: NaN/inf (neither is a real bin). */
    uint32_t *h = (uint32_t *)calloc((size_t)stride * 4, sizeof(uint32_t));
    if (!h) {
        j->failed = 1;
        return NULL;
    }
    int32_t idx[BLOCK];
    int64_t zeros = 0;
    uint32_t umx = 0;
    for (int64_t start = 0; start < j->n; start += FLUSH_EVERY) {
        const int64_t stop = start + FLUSH_EVERY < j->n ? start + FLUSH_EVERY : j->n;
        for (int64_t i0 = start; i0 < stop; i0 += BLOCK) {
            const int32_t m = (int32_t)(stop - i0 < BLOCK ? stop - i0 : BLOCK);
            const float *xf = j->x + i0;
            const u32a *xu = (const u32a *)xf;
            int32_t z = 0;
            uint32_t bm = 0;
            /* Two vectorisable passes over the block (it stays in L1). On |x| as bits integer order
             * is float order and >= 0x7f800000 is inf/NaN, so the maximum needs no float compare. */
            for (int32_t k = 0; k < m; ++k) {
                const uint32_t u = xu[k] & 0x7fffffffu;
                const uint32_t uf = u & (0u - (uint32_t)(u < 0x7f800000u)); /* 0 for inf/NaN */
                bm = uf > bm ? uf : bm;
                z += (u == 0u);
            }
            umx = bm > umx ? bm : umx;
            for (int32_t k = 0; k < m; ++k) {
                const int32_t finite = (xu[k] & 0x7fffffffu) < 0x7f800000u;
                const float a = fabsf(xf[k]);
                int32_t b = (int32_t)((a < range ? a : range) * scale);
                b = b > last ? last : b;
                b = a > range ? nb : b;
                idx[k] = finite ? b : nb + 1;
            }
            zeros += z;
            int32_t k = 0;
            for (; k + 4 <= m; k += 4) {
                ++h[idx[k]];
                ++h[stride + idx[k + 1]];
                ++h[2 * stride + idx[k + 2]];
                ++h[3 * stride + idx[k + 3]];
            }
            for (; k < m; ++k) ++h[idx[k]];
        }
        for (int32_t b = 0; b < stride; ++b) {
            const int64_t c = (int64_t)h[b] + h[stride + b] + h[2 * stride + b] + h[3 * stride + b];
            if (b < nb) j->counts[b] += c;
            else if (b == nb) j->over += c;
            else j->nonfinite += c;
        }
        memset(h, 0, (size_t)stride * 4 * sizeof(uint32_t));
    }
    free(h);
    j->zeros = zeros;
    memcpy(&j->maxabs, &umx, sizeof umx);
    return NULL;
}

/* Adds the counts of |x| over [0, range] in nbins bins to counts[nbins] (int64).
 * stats[0] = max |x| over finite values, stats[1] = zeros, stats[2] = finite values above range
 * (not counted), stats[3] = non-finite values (not counted). Returns 0, or -1 on allocation failure.
 *
 * Threads come from OpenMP: built with -fopenmp, this library binds to the libgomp that PyTorch has
 * already loaded, so it runs on PyTorch's own (still spinning) worker threads instead of competing
 * with them for the cores, and follows torch.set_num_threads(). */
int trtq_abs_histogram_f32(const float *x, int64_t n, int32_t nbins, float range, int64_t *counts,
                           int32_t nthreads, double *stats) {
    if (nthreads < 1) nthreads = 1;
    if (n < ((int64_t)1 << 16)) nthreads = 1; /* waking threads costs more than it saves */
    if (nthreads > 256) nthreads = 256;
    job_t *jobs = (job_t *)calloc((size_t)nthreads, sizeof(job_t));
    int64_t *local = (int64_t *)calloc((size_t)nbins * nthreads, sizeof(int64_t));
    if (!jobs || !local) {
        free(jobs);
        free(local);
        return -1;
    }
    const int64_t per = (n + nthreads - 1) / nthreads;
    for (int t = 0; t < nthreads; ++t) {
        int64_t lo = per * t, hi = lo + per < n ? lo + per : n;
        if (lo > n) lo = n;
        jobs[t] = (job_t){x + lo, hi - lo, nbins, range, local + (size_t)t * nbins, 0, 0, 0, 0.0f, 0};
    }
#ifdef _OPENMP
#pragma omp parallel for num_threads(nthreads) schedule(static, 1)
#endif
    for (int t = 0; t < nthreads; ++t) run(&jobs[t]);
    int failed = 0;
    double mx = 0.0, zeros = 0.0, over = 0.0, nonfinite = 0.0;
    for (int t = 0; t < nthreads; ++t) {
        failed |= jobs[t].failed;
        mx = jobs[t].maxabs > mx ? jobs[t].maxabs : mx;
        zeros += (double)jobs[t].zeros;
        over += (double)jobs[t].over;
        nonfinite += (double)jobs[t].nonfinite;
        for (int32_t b = 0; b < nbins; ++b) counts[b] += local[(size_t)t * nbins + b];
    }
    free(jobs);
    free(local);
    stats[0] = mx;
    stats[1] = zeros;
    stats[2] = over;
    stats[3] = nonfinite;
    return failed ? -1 : 0;
}
