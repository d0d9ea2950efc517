/* fedeq._fused: fused per-evaluation CPU steps of fedeq.solvers.
 *
 * A solver step on the CPU is a couple of dozen small tensor operations (residual, Gram row, scores,
 * the small least-squares or Broyden coefficient algebra, the mix); at DEQ sizes each costs more in
 * dispatch than in arithmetic. These functions do one whole step per call, sample by sample, on the
 * buffers that fedeq.solvers allocates, with exactly the semantics of the PyTorch code they replace
 * (which stays the reference and the fallback). They take raw addresses: the Python side checks dtype,
 * device and contiguity before calling. The GIL is released while they run.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#define FUSED_EPS 1e-12
#define FUSED_SQRT_EPS 1e-6
#define FUSED_MAX_MEM 64 /* Anderson memory handled here (larger ones use the PyTorch path) */
#define FUSED_MAX_K 512  /* Broyden evaluations handled here */
#define FUSED_BLOCK 128  /* entries of a linear combination accumulated in registers at a time */

/* Step flags (returned to Python). */
#define FUSED_ALL_IMPROVED 1 /* every sample improved its best score and none stopped */
#define FUSED_ANY_STOPPED 2  /* some active sample stopped at this evaluation */
#define FUSED_ANY_DIVERGED 4 /* some active sample produced a non-finite residual */
#define FUSED_ALL_DONE 8     /* no sample is active any more */

/* Per-sample tracker bits. */
#define TR_BETTER 1
#define TR_STOP 2
#define TR_DIVERGED 4

/* The entry points are compiled for several instruction sets (chosen at load time); everything they
 * call is inlined into each version. */
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define FUSED_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define FUSED_CLONES
#endif
#if defined(__GNUC__)
#define FUSED_INLINE static inline __attribute__((always_inline))
#else
#define FUSED_INLINE static inline
#endif

typedef struct {
    int64_t b, d;
    void *abs_tr;      /* (b,) this evaluation's abs-residual trace row */
    void *rel_tr;      /* (b,) its rel-residual row, or NULL in the abs stop mode */
    void *thresh;      /* (b,) each active sample's best score, -inf once stopped */
    uint8_t *diverged; /* (b,) bool */
    uint8_t *better;   /* (b,) scratch: improved at this evaluation */
    double tol;
    const void *best_prev; /* the best candidates when held by reference */
    void *best_own;        /* the owned best buffer */
    int own;               /* the best is best_own already */
} Track;

#define REAL float
#define SFX(name) name##_f32
#define FUSED_REAL_MAX FLT_MAX
#include "_fused_impl.h"
#undef REAL
#undef SFX
#undef FUSED_REAL_MAX

#define REAL double
#define SFX(name) name##_f64
#define FUSED_REAL_MAX DBL_MAX
#include "_fused_impl.h"
#undef REAL
#undef SFX
#undef FUSED_REAL_MAX

/* The dispatching entry points carry the instruction-set clones. */
FUSED_CLONES static int score_any(int dbl, const Track *t, void *fx, void *x, void *hist, int64_t n,
                                  int64_t slot, void *row)
{
    return dbl ? score_f64(t, fx, x, hist, n, slot, row) : score_f32(t, fx, x, hist, n, slot, row);
}

FUSED_CLONES static int anderson_any(int dbl, const Track *t, void *fx, void *x, void *G, void *F, void *X,
                                     void *S, void *H, void *row, int64_t mem, int64_t n, int64_t slot,
                                     double lameps, double beta, void *x_new, void *alphas)
{
    if (dbl) return anderson_f64(t, fx, x, G, F, X, S, H, row, mem, n, slot, lameps, beta, x_new, alphas);
    return anderson_f32(t, fx, x, G, F, X, S, H, row, mem, n, slot, lameps, beta, x_new, alphas);
}

FUSED_CLONES static int broyden_any(int dbl, const Track *t, void *fz, void *z, void *Q, void *M, void *CU,
                                    void *CV, void *UV, void *DZ, void *BG, int64_t K, int64_t k, int last,
                                    void *z_new)
{
    if (dbl) return broyden_f64(t, fz, z, Q, M, CU, CV, UV, DZ, BG, K, k, last, z_new);
    return broyden_f32(t, fz, z, Q, M, CU, CV, UV, DZ, BG, K, k, last, z_new);
}

FUSED_CLONES static void tapply_any(int dbl, void *q, int64_t qs, int64_t qr, void *kk, int64_t ks, int64_t kr,
                                    void *w, void *out, int64_t b, int64_t N, int64_t d)
{
    if (dbl)
        tapply_f64(q, qs, qr, kk, ks, kr, w, out, b, N, d);
    else
        tapply_f32(q, qs, qr, kk, ks, kr, w, out, b, N, d);
}

/* ------------------------------------------------------------------------------------ argument parsing */

#define TRACK_NARGS 12 /* dbl, b, d, abs_tr, rel_tr, thresh, diverged, better, tol, best_prev, best_own, own */

static int as_ptr(PyObject *o, void **out)
{
    *out = PyLong_AsVoidPtr(o);
    return !(*out == NULL && PyErr_Occurred());
}

static int as_i64(PyObject *o, int64_t *out)
{
    *out = (int64_t)PyLong_AsLongLong(o);
    return !(*out == -1 && PyErr_Occurred());
}

static int as_f64(PyObject *o, double *out)
{
    *out = PyFloat_AsDouble(o);
    return !(*out == -1.0 && PyErr_Occurred());
}

static int parse_track(PyObject *const *a, Py_ssize_t nargs, Py_ssize_t want, int *dbl, Track *t)
{
    if (nargs != want) {
        PyErr_Format(PyExc_TypeError, "expected %zd arguments, got %zd", want, nargs);
        return 0;
    }
    int64_t dflag, own;
    void *div, *better;
    if (!(as_i64(a[0], &dflag) && as_i64(a[1], &t->b) && as_i64(a[2], &t->d) && as_ptr(a[3], &t->abs_tr) &&
          as_ptr(a[4], &t->rel_tr) && as_ptr(a[5], &t->thresh) && as_ptr(a[6], &div) && as_ptr(a[7], &better) &&
          as_f64(a[8], &t->tol) && as_ptr(a[9], (void **)&t->best_prev) && as_ptr(a[10], &t->best_own) &&
          as_i64(a[11], &own)))
        return 0;
    *dbl = (int)dflag;
    t->diverged = (uint8_t *)div;
    t->better = (uint8_t *)better;
    t->own = (int)own;
    return 1;
}

static PyObject *py_score(PyObject *self, PyObject *const *a, Py_ssize_t nargs)
{
    int dbl;
    Track t;
    void *fx, *x, *hist, *row;
    int64_t n, slot;
    if (!parse_track(a, nargs, TRACK_NARGS + 6, &dbl, &t)) return NULL;
    a += TRACK_NARGS;
    if (!(as_ptr(a[0], &fx) && as_ptr(a[1], &x) && as_ptr(a[2], &hist) && as_i64(a[3], &n) &&
          as_i64(a[4], &slot) && as_ptr(a[5], &row)))
        return NULL;
    int flags;
    Py_BEGIN_ALLOW_THREADS flags = score_any(dbl, &t, fx, x, hist, n, slot, row);
    Py_END_ALLOW_THREADS return PyLong_FromLong(flags);
}

static PyObject *py_anderson(PyObject *self, PyObject *const *a, Py_ssize_t nargs)
{
    int dbl;
    Track t;
    void *fx, *x, *G, *F, *X, *S, *H, *row, *x_new, *alphas;
    int64_t mem, n, slot;
    double lameps, beta;
    if (!parse_track(a, nargs, TRACK_NARGS + 15, &dbl, &t)) return NULL;
    a += TRACK_NARGS;
    if (!(as_ptr(a[0], &fx) && as_ptr(a[1], &x) && as_ptr(a[2], &G) && as_ptr(a[3], &F) && as_ptr(a[4], &X) &&
          as_ptr(a[5], &S) && as_ptr(a[6], &H) && as_ptr(a[7], &row) && as_i64(a[8], &mem) &&
          as_i64(a[9], &n) && as_i64(a[10], &slot) && as_f64(a[11], &lameps) && as_f64(a[12], &beta) &&
          as_ptr(a[13], &x_new) && as_ptr(a[14], &alphas)))
        return NULL;
    if (mem > FUSED_MAX_MEM || n > mem || slot >= n) {
        PyErr_SetString(PyExc_ValueError, "anderson: memory out of range for the fused step");
        return NULL;
    }
    int flags;
    Py_BEGIN_ALLOW_THREADS flags = anderson_any(dbl, &t, fx, x, G, F, X, S, H, row, mem, n, slot, lameps, beta,
                                                x_new, alphas);
    Py_END_ALLOW_THREADS return PyLong_FromLong(flags);
}

static PyObject *py_broyden(PyObject *self, PyObject *const *a, Py_ssize_t nargs)
{
    int dbl;
    Track t;
    void *fz, *z, *Q, *M, *CU, *CV, *UV, *DZ, *BG, *z_new;
    int64_t K, k, last;
    if (!parse_track(a, nargs, TRACK_NARGS + 13, &dbl, &t)) return NULL;
    a += TRACK_NARGS;
    if (!(as_ptr(a[0], &fz) && as_ptr(a[1], &z) && as_ptr(a[2], &Q) && as_ptr(a[3], &M) && as_ptr(a[4], &CU) &&
          as_ptr(a[5], &CV) && as_ptr(a[6], &UV) && as_ptr(a[7], &DZ) && as_ptr(a[8], &BG) &&
          as_i64(a[9], &K) && as_i64(a[10], &k) && as_i64(a[11], &last) && as_ptr(a[12], &z_new)))
        return NULL;
    if (K > FUSED_MAX_K || k >= K) {
        PyErr_SetString(PyExc_ValueError, "broyden: evaluation count out of range for the fused step");
        return NULL;
    }
    int flags;
    Py_BEGIN_ALLOW_THREADS flags = broyden_any(dbl, &t, fz, z, Q, M, CU, CV, UV, DZ, BG, K, k, (int)last, z_new);
    Py_END_ALLOW_THREADS return PyLong_FromLong(flags);
}

static PyObject *py_broyden_tapply(PyObject *self, PyObject *const *a, Py_ssize_t nargs)
{
    /* dbl, b, N, d, q, q_sample_stride, q_row_stride, k, k_sample_stride, k_row_stride, w, out (strides in
     * elements) */
    if (nargs != 12) {
        PyErr_Format(PyExc_TypeError, "expected 12 arguments, got %zd", nargs);
        return NULL;
    }
    int64_t dbl, b, N, d, qs, qr, ks, kr;
    void *q, *kk, *w, *out;
    if (!(as_i64(a[0], &dbl) && as_i64(a[1], &b) && as_i64(a[2], &N) && as_i64(a[3], &d) && as_ptr(a[4], &q) &&
          as_i64(a[5], &qs) && as_i64(a[6], &qr) && as_ptr(a[7], &kk) && as_i64(a[8], &ks) &&
          as_i64(a[9], &kr) && as_ptr(a[10], &w) && as_ptr(a[11], &out)))
        return NULL;
    if (N < 1 || N > FUSED_MAX_K) {
        PyErr_SetString(PyExc_ValueError, "broyden_tapply: basis size out of range for the fused step");
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS tapply_any((int)dbl, q, qs, qr, kk, ks, kr, w, out, b, N, d);
    Py_END_ALLOW_THREADS Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"score", (PyCFunction)(void (*)(void))py_score, METH_FASTCALL,
     "Score one evaluation (residual into the history slot, trace rows, tracker state); returns flags."},
    {"anderson", (PyCFunction)(void (*)(void))py_anderson, METH_FASTCALL,
     "One fused Anderson evaluation: score, store, Gram update, small solve and mix; returns flags."},
    {"broyden", (PyCFunction)(void (*)(void))py_broyden, METH_FASTCALL,
     "One fused Broyden evaluation in the residual basis: score, Gram row, rank-one update, step."},
    {"broyden_tapply", (PyCFunction)(void (*)(void))py_broyden_tapply, METH_FASTCALL,
     "-B^T w = w - Q K^T Q^T w per sample, from Broyden's residual basis Q and coefficients K."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_fused", "Fused CPU solver steps.", -1, methods};

PyMODINIT_FUNC PyInit__fused(void)
{
    PyObject *m = PyModule_Create(&module);
    if (!m) return NULL;
    if (PyModule_AddIntConstant(m, "ALL_IMPROVED", FUSED_ALL_IMPROVED) < 0 ||
        PyModule_AddIntConstant(m, "ANY_STOPPED", FUSED_ANY_STOPPED) < 0 ||
        PyModule_AddIntConstant(m, "ANY_DIVERGED", FUSED_ANY_DIVERGED) < 0 ||
        PyModule_AddIntConstant(m, "ALL_DONE", FUSED_ALL_DONE) < 0 ||
        PyModule_AddIntConstant(m, "MAX_MEM", FUSED_MAX_MEM) < 0 ||
        PyModule_AddIntConstant(m, "MAX_K", FUSED_MAX_K) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
