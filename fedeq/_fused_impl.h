/* Per-element-type body of fedeq/_fused.c: included once per type with REAL (the element type) and
 * SFX(name) (the type's suffix) defined. Every function works on one sample at a time, so that the
 * sample's history rows are read from cache for everything the step does with them.
 *
 * Layouts (all C-contiguous, as fedeq.solvers allocates them):
 *   candidates, iterates   (b, d)
 *   history (G, F, X, Q)   (slots, b, d): row i of sample j at base + (i * b + j) * d
 *   Anderson S             (b, mem), H (b, mem, mem)
 *   Broyden M, UV          (b, K, K); CU, CV (b, K - 1, K); dz, bg_old (b, K)
 *   trace rows, thresh     (b,); diverged (b,) bool
 */

/* <g, h_a>, …, <g, h_d> together: four rows per pass over g, four independent running sums. */
FUSED_INLINE void SFX(dots4)(const REAL *restrict g, const REAL *restrict ha, const REAL *restrict hb,
                             const REAL *restrict hc, const REAL *restrict hd, int64_t d, REAL *out)
{
    REAL s0 = 0, s1 = 0, s2 = 0, s3 = 0;
#pragma omp simd reduction(+ : s0, s1, s2, s3)
    for (int64_t l = 0; l < d; l++) {
        REAL v = g[l];
        s0 += v * ha[l];
        s1 += v * hb[l];
        s2 += v * hc[l];
        s3 += v * hd[l];
    }
    out[0] = s0;
    out[1] = s1;
    out[2] = s2;
    out[3] = s3;
}

/* row[i] = <g, hist_i> for the rows i < n other than `slot` (hist_i at hist + i * stride). */
FUSED_INLINE void SFX(gram_row)(const REAL *g, const REAL *hist, int64_t stride, int64_t n, int64_t slot,
                                int64_t d, REAL *row)
{
    int64_t idx[FUSED_MAX_K], m = 0;
    for (int64_t i = 0; i < n; i++)
        if (i != slot) idx[m++] = i;
    for (int64_t q = 0; q < m; q += 4) {
        const REAL *h[4];
        for (int64_t e = 0; e < 4; e++) h[e] = hist + idx[q + e < m ? q + e : m - 1] * stride;
        REAL out[4];
        SFX(dots4)(g, h[0], h[1], h[2], h[3], d, out);
        for (int64_t e = 0; e < 4 && q + e < m; e++) row[idx[q + e]] = out[e];
    }
}

/* g = fx - x into g; row[i] = <g, hist_i> for i < n (row[slot] = ||g||²); returns ||g||², *ff = ||fx||². */
FUSED_INLINE REAL SFX(residual_row)(const REAL *restrict fx, const REAL *restrict x, REAL *restrict g,
                                    const REAL *hist, int64_t stride, int64_t n, int64_t slot, int64_t d,
                                    REAL *row, REAL *ff)
{
    REAL sg = 0, sf = 0;
#pragma omp simd reduction(+ : sg, sf)
    for (int64_t l = 0; l < d; l++) {
        REAL f = fx[l], v = f - x[l];
        g[l] = v;
        sg += v * v;
        sf += f * f;
    }
    if (n > 0) {
        SFX(gram_row)(g, hist, stride, n, slot, d, row);
        row[slot] = sg;
    }
    *ff = sf;
    return sg;
}

/* out = init + Σ_i coef[i] · rows_i (rows_i at rows + i * stride; init may be NULL for 0), accumulated per
 * block of FUSED_BLOCK entries in registers so that `out` is written once. */
FUSED_INLINE void SFX(combine)(REAL *out, const REAL *init, const REAL *rows, int64_t stride,
                                const REAL *coef, int64_t n, int64_t d)
{
    int64_t l0 = 0;
    for (; l0 + FUSED_BLOCK <= d; l0 += FUSED_BLOCK) {
        REAL acc[FUSED_BLOCK];
#pragma omp simd
        for (int64_t l = 0; l < FUSED_BLOCK; l++) acc[l] = init ? init[l0 + l] : (REAL)0;
        for (int64_t i = 0; i < n; i++) {
            const REAL *restrict r = rows + i * stride + l0;
            REAL c = coef[i];
#pragma omp simd
            for (int64_t l = 0; l < FUSED_BLOCK; l++) acc[l] += c * r[l];
        }
#pragma omp simd
        for (int64_t l = 0; l < FUSED_BLOCK; l++) out[l0 + l] = acc[l];
    }
    for (int64_t l = l0; l < d; l++) {
        REAL a = init ? init[l] : (REAL)0;
        for (int64_t i = 0; i < n; i++) a += coef[i] * rows[i * stride + l];
        out[l] = a;
    }
}

/* The tracker's decision for sample j (see fedeq.solvers._Tracker): writes the trace rows, the threshold
 * and the diverged flag; returns TR_BETTER | TR_STOP | TR_DIVERGED bits. */
FUSED_INLINE int SFX(track)(const Track *t, int64_t j, REAL r, REAL fnorm)
{
    REAL *abs_tr = (REAL *)t->abs_tr, *rel_tr = (REAL *)t->rel_tr, *thresh = (REAL *)t->thresh;
    REAL s = r;
    abs_tr[j] = r;
    if (rel_tr) {
        s = r / (fnorm + (REAL)FUSED_EPS);
        rel_tr[j] = s;
    }
    REAL th = thresh[j];
    int active = th > -(REAL)INFINITY;
    int better = s < th; /* false for NaN and for frozen samples (thresh = -inf) */
    int stop = !(isfinite(s) && s > (REAL)t->tol); /* converged or non-finite */
    if (better) th = s;
    if (stop) th = -(REAL)INFINITY;
    thresh[j] = th;
    int div = stop && active && !isfinite(r);
    if (div) t->diverged[j] = 1;
    return (better ? TR_BETTER : 0) | (stop && active ? TR_STOP : 0) | (div ? TR_DIVERGED : 0);
}

/* Sample j's result folded into the step's flags; with an owned best, an improved candidate is copied. */
FUSED_INLINE void SFX(fold)(const Track *t, int64_t j, int tr, int *flags, const REAL *fx)
{
    t->better[j] = (uint8_t)(tr & TR_BETTER);
    if (!(tr & TR_BETTER) || (tr & TR_STOP)) *flags &= ~FUSED_ALL_IMPROVED;
    if (tr & TR_STOP) *flags |= FUSED_ANY_STOPPED;
    if (tr & TR_DIVERGED) *flags |= FUSED_ANY_DIVERGED;
    if (((REAL *)t->thresh)[j] > -(REAL)INFINITY) *flags &= ~FUSED_ALL_DONE;
    if (t->own && (tr & TR_BETTER)) memcpy((REAL *)t->best_own + j * t->d, fx, (size_t)t->d * sizeof(REAL));
}

/* After every sample was scored: when the best was held by reference and not every sample improved, the
 * owned best is formed from the improved candidates and the previous best. */
FUSED_INLINE void SFX(settle_best)(const Track *t, int flags, const REAL *fx)
{
    if (t->own || (flags & FUSED_ALL_IMPROVED)) return;
    const REAL *prev = (const REAL *)t->best_prev;
    REAL *own = (REAL *)t->best_own;
    size_t row = (size_t)t->d * sizeof(REAL);
    for (int64_t j = 0; j < t->b; j++) {
        const REAL *src = (t->better[j] ? fx : prev) + j * t->d;
        if (src != own + j * t->d) memcpy(own + j * t->d, src, row);
    }
}

FUSED_INLINE int SFX(score)(const Track *t, const REAL *fx, const REAL *x, REAL *hist, int64_t n, int64_t slot,
                      REAL *row)
{
    int64_t b = t->b, d = t->d, stride = b * d;
    int flags = FUSED_ALL_IMPROVED | FUSED_ALL_DONE;
    for (int64_t j = 0; j < b; j++) {
        REAL ff;
        REAL gg = SFX(residual_row)(fx + j * d, x + j * d, hist + slot * stride + j * d, hist + j * d, stride,
                                    n, slot, d, row ? row + j * n : NULL, &ff);
        int tr = SFX(track)(t, j, sqrt(gg), sqrt(ff));
        SFX(fold)(t, j, tr, &flags, fx + j * d);
    }
    SFX(settle_best)(t, flags, fx);
    return flags;
}

/* Solve the n x n system A y = rhs (A with leading dimension lda) by Gaussian elimination with partial
 * pivoting in double precision; a zero pivot gives non-finite y, which the caller rejects. */
FUSED_INLINE void SFX(small_solve)(const REAL *A, int64_t lda, const REAL *rhs, int64_t n, double *y,
                                    double *work)
{
    for (int64_t a = 0; a < n; a++) {
        for (int64_t c = 0; c < n; c++) work[a * n + c] = (double)A[a * lda + c];
        y[a] = (double)rhs[a];
    }
    for (int64_t c = 0; c < n; c++) {
        int64_t p = c;
        double best = fabs(work[c * n + c]);
        for (int64_t a = c + 1; a < n; a++) {
            double v = fabs(work[a * n + c]);
            if (v > best) {
                best = v;
                p = a;
            }
        }
        if (p != c) {
            for (int64_t e = 0; e < n; e++) {
                double tmp = work[c * n + e];
                work[c * n + e] = work[p * n + e];
                work[p * n + e] = tmp;
            }
            double tmp = y[c];
            y[c] = y[p];
            y[p] = tmp;
        }
        double ipiv = 1.0 / work[c * n + c];
        work[c * n + c] = ipiv; /* kept as its reciprocal for the back substitution */
        for (int64_t a = c + 1; a < n; a++) {
            double m = work[a * n + c] * ipiv;
            if (m == 0.0) continue;
            for (int64_t e = c + 1; e < n; e++) work[a * n + e] -= m * work[c * n + e];
            y[a] -= m * y[c];
        }
    }
    for (int64_t a = n - 1; a >= 0; a--) {
        double s = y[a];
        for (int64_t e = a + 1; e < n; e++) s -= work[a * n + e] * y[e];
        y[a] = s * work[a * n + a];
    }
}

/* torch.lerp(a, b, w) as PyTorch computes it. */
FUSED_INLINE REAL SFX(lerp)(REAL a, REAL b, REAL w)
{
    return w < (REAL)0.5 ? a + w * (b - a) : b - (b - a) * ((REAL)1 - w);
}

/* One Anderson evaluation (fedeq.solvers.anderson, history of n <= mem slots, the new one at `slot`):
 * score fx, store it, refresh row/column `slot` of the scaled Gram matrix H and mix the new iterate into
 * x_new (skipped when x_new is NULL: n = 1 without damping, where the iterate is fx itself). */
FUSED_INLINE int SFX(anderson)(const Track *t, const REAL *fx, const REAL *x, REAL *G, REAL *F, REAL *X,
                               REAL *S, REAL *H, REAL *row, int64_t mem, int64_t n, int64_t slot, double lameps,
                               double beta, REAL *x_new, REAL *alphas)
{
    int64_t b = t->b, d = t->d, stride = b * d;
    int flags = FUSED_ALL_IMPROVED | FUSED_ALL_DONE;
    REAL rb = (REAL)beta;
    /* 1. Score, store, and refresh the scaled Gram matrix H = S G Gᵀ S + (lam + eps) I with the Jacobi
     *    scaling s_i = 1 / max(||g_i||, sqrt(eps)). */
    for (int64_t j = 0; j < b; j++) {
        const REAL *fj = fx + j * d, *xj = x + j * d;
        REAL *rj = row + j * n, *Sj = S + j * mem, *Hj = H + j * mem * mem;
        REAL ff;
        REAL gg = SFX(residual_row)(fj, xj, G + slot * stride + j * d, G + j * d, stride, n, slot, d, rj, &ff);
        REAL r = sqrt(gg);
        int tr = SFX(track)(t, j, r, sqrt(ff));
        SFX(fold)(t, j, tr, &flags, fj);
        REAL sn = isnan(r) ? r : (REAL)1 / (r > (REAL)FUSED_SQRT_EPS ? r : (REAL)FUSED_SQRT_EPS);
        Sj[slot] = sn;
        for (int64_t i = 0; i < n; i++) {
            REAL h = rj[i] * (Sj[i] * sn) + (i == slot ? (REAL)lameps : (REAL)0);
            Hj[slot * mem + i] = h;
            Hj[i * mem + slot] = h;
        }
    }
    /* The candidates (and, when damping, the iterates) join the history. */
    for (int64_t j = 0; j < b; j++) {
        memcpy(F + slot * stride + j * d, fx + j * d, (size_t)d * sizeof(REAL));
        if (X) memcpy(X + slot * stride + j * d, x + j * d, (size_t)d * sizeof(REAL));
    }
    if (!x_new) {
        SFX(settle_best)(t, flags, fx);
        return flags;
    }
    if (n == 1) {
        for (int64_t l = 0; l < b * d; l++) x_new[l] = SFX(lerp)(x[l], fx[l], rb);
        SFX(settle_best)(t, flags, fx);
        return flags;
    }
    /* 2. The mixing weights α = y / Σy, (S GGᵀ S + lam I) y' = S 1, y = S y' (a separate pass, so that the
     *    samples' short dependent chains overlap). A non-finite α is marked by α_0 = NaN. */
    double y[FUSED_MAX_MEM], work[FUSED_MAX_MEM * FUSED_MAX_MEM];
    for (int64_t j = 0; j < b; j++) {
        const REAL *Sj = S + j * mem;
        REAL *alpha = alphas + j * n;
        SFX(small_solve)(H + j * mem * mem, mem, Sj, n, y, work);
        double sum = 0;
        for (int64_t i = 0; i < n; i++) {
            y[i] *= (double)Sj[i];
            sum += y[i];
        }
        double inv = 1.0 / sum;
        int ok = isfinite(inv) && sum != 0.0;
        for (int64_t i = 0; i < n; i++) {
            alpha[i] = (REAL)(y[i] * inv);
            ok = ok && isfinite(alpha[i]);
        }
        if (!ok) alpha[0] = (REAL)NAN;
    }
    /* 3. The mix x_new = Σ α_i f(x_i) (damped: β Σ α_i f(x_i) + (1 - β) Σ α_i x_i); a non-finite mix falls
     *    back to f(x). */
    for (int64_t j = 0; j < b; j++) {
        const REAL *alpha = alphas + j * n, *fj = fx + j * d;
        REAL *out = x_new + j * d;
        int ok = !isnan(alpha[0]);
        if (ok) {
            if (!X) {
                SFX(combine)(out, NULL, F + j * d, stride, alpha, n, d);
            } else {
                REAL cf[FUSED_MAX_MEM], cx[FUSED_MAX_MEM];
                for (int64_t i = 0; i < n; i++) {
                    cf[i] = rb * alpha[i];
                    cx[i] = ((REAL)1 - rb) * alpha[i];
                }
                SFX(combine)(out, NULL, F + j * d, stride, cf, n, d);
                SFX(combine)(out, out, X + j * d, stride, cx, n, d);
            }
            REAL total = 0;
#pragma omp simd reduction(+ : total)
            for (int64_t l = 0; l < d; l++) total += out[l];
            ok = isfinite(total);
        }
        if (!ok) memcpy(out, fj, (size_t)d * sizeof(REAL));
    }
    SFX(settle_best)(t, flags, fx);
    return flags;
}

/* One Broyden evaluation in the residual basis (fedeq.solvers.broyden, evaluation k of K): score fz with
 * g_k stored in Q[k], refresh row/column k of M = QᵀQ, apply the rank-one update to the coefficients
 * (CU, CV, UV = Cᵤᵀ Cᵥ) and, unless `last`, form the next iterate z_new = z - Q [B g] and Δz = -B g. */
FUSED_INLINE int SFX(broyden)(const Track *t, const REAL *fz, const REAL *z, REAL *Q, REAL *M, REAL *CU, REAL *CV,
                        REAL *UV, REAL *DZ, REAL *BG, int64_t K, int64_t k, int last, REAL *z_new)
{
    int64_t b = t->b, d = t->d, stride = b * d, N = k + 1, rows = K > 1 ? K - 1 : 1;
    int flags = FUSED_ALL_IMPROVED | FUSED_ALL_DONE;
    REAL h[FUSED_MAX_K], bg[FUSED_MAX_K], w[FUSED_MAX_K], vt[FUSED_MAX_K], u[FUSED_MAX_K];
    for (int64_t j = 0; j < b; j++) {
        const REAL *fj = fz + j * d, *zj = z + j * d;
        REAL *gk = Q + k * stride + j * d, *Mj = M + j * K * K, *Kj = UV + j * K * K;
        REAL *dz = DZ + j * K, *bg_old = BG + j * K;
        REAL ff;
        REAL gg = SFX(residual_row)(fj, zj, gk, Q + j * d, stride, N, k, d, h, &ff);
        int tr = SFX(track)(t, j, sqrt(gg), sqrt(ff));
        SFX(fold)(t, j, tr, &flags, fj);
        if (!isfinite(gg)) { /* as torch.nan_to_num_: NaN -> 0, ±inf -> the largest finite values */
            for (int64_t l = 0; l < d; l++) {
                REAL v = gk[l];
                gk[l] = isnan(v) ? (REAL)0 : (isinf(v) ? (v > 0 ? FUSED_REAL_MAX : -FUSED_REAL_MAX) : v);
            }
            SFX(gram_row)(gk, Q + j * d, stride, N, -1, d, h);
        }
        for (int64_t i = 0; i < N; i++) {
            Mj[k * K + i] = h[i];
            Mj[i * K + k] = h[i];
        }
        for (int64_t i = 0; i < N; i++) bg[i] = (i == k) ? (REAL)-1 : (REAL)0; /* B g = -g_k */
        if (k >= 1) {
            /* w = Qᵀ Δz = M [Δz]; with UVᵀ = Q K Qᵀ: [B g_k] = -e_k + K h, [Bᵀ Δz] = -[Δz] + Kᵀ w. */
            for (int64_t i = 0; i < N; i++) {
                REAL s = 0;
                for (int64_t l = 0; l < N; l++) s += dz[l] * Mj[l * K + i];
                w[i] = s;
            }
            if (k == 1) {
                for (int64_t i = 0; i < N; i++) vt[i] = -dz[i];
            } else {
                for (int64_t i = 0; i < N; i++) {
                    REAL s = 0, v = 0;
                    for (int64_t l = 0; l < N; l++) {
                        s += h[l] * Kj[i * K + l];
                        v += w[l] * Kj[l * K + i];
                    }
                    bg[i] += s;
                    vt[i] = v - dz[i];
                }
            }
            REAL denom = 0, vg = 0;
            for (int64_t i = 0; i < N; i++) {
                denom += w[i] * (bg[i] - bg_old[i]); /* Δzᵀ B Δg */
                vg += h[i] * vt[i];                  /* vᵀ g_k */
            }
            int good = fabs(denom) > FUSED_EPS; /* else the update is skipped (u = v = 0) */
            REAL *cu = CU + (j * rows + (k - 1)) * K, *cv = CV + (j * rows + (k - 1)) * K;
            for (int64_t i = 0; i < N; i++) {
                u[i] = good ? (dz[i] - (bg[i] - bg_old[i])) / denom : (REAL)0;
                if (!good) vt[i] = 0;
                cu[i] = u[i];
                cv[i] = vt[i];
            }
            for (int64_t a = 0; a < N; a++) {
                if (u[a] == 0) continue;
                for (int64_t c = 0; c < N; c++) Kj[a * K + c] += u[a] * vt[c];
            }
            for (int64_t i = 0; i < N; i++) bg[i] += u[i] * vg; /* B_new g_k = B g_k + u (vᵀ g_k) */
        }
        if (last) continue;
        REAL *out = z_new + j * d;
        int active = ((REAL *)t->thresh)[j] > -(REAL)INFINITY;
        if (!active) { /* frozen samples stop moving, so their factors describe their returned point */
            memcpy(out, zj, (size_t)d * sizeof(REAL));
            for (int64_t i = 0; i < K; i++) dz[i] = 0;
            for (int64_t i = 0; i < N; i++) bg_old[i] = bg[i];
            continue;
        }
        REAL total = 0;
        if (k == 0) {
            memcpy(out, fj, (size_t)d * sizeof(REAL)); /* z - B g = z + g_0 */
        } else {
            for (int64_t i = 0; i < N; i++) u[i] = -bg[i]; /* u is free again: the coefficients of -Q [B g] */
            SFX(combine)(out, zj, Q + j * d, stride, u, N, d);
#pragma omp simd reduction(+ : total)
            for (int64_t l = 0; l < d; l++) total += out[l];
        }
        if (isfinite(total)) {
            if (k == 0) {
                dz[0] = 1; /* Δz = g_0 */
            } else {
                for (int64_t i = 0; i < N; i++) dz[i] = -bg[i];
            }
        } else { /* a non-finite step falls back to f(z), Δz = g_k */
            memcpy(out, fj, (size_t)d * sizeof(REAL));
            for (int64_t i = 0; i < K; i++) dz[i] = (i == k) ? (REAL)1 : (REAL)0;
        }
        for (int64_t i = 0; i < N; i++) bg_old[i] = bg[i];
    }
    SFX(settle_best)(t, flags, fz);
    return flags;
}

/* -Bᵀ w = w - Q Kᵀ Qᵀ w per sample (fedeq.solvers.broyden_transpose_apply on the residual basis): sample
 * j's basis rows at q + j * qs + i * qr (i < N), its coefficients K at kk + j * ks (row stride kr); w and
 * out are (b, d). Qᵀ w and the combination read the sample's rows back to back, the second time from
 * cache. */
FUSED_INLINE void SFX(tapply)(const REAL *q, int64_t qs, int64_t qr, const REAL *kk, int64_t ks, int64_t kr,
                              const REAL *w, REAL *out, int64_t b, int64_t N, int64_t d)
{
    REAL a[FUSED_MAX_K], c[FUSED_MAX_K];
    for (int64_t j = 0; j < b; j++) {
        const REAL *qj = q + j * qs, *kj = kk + j * ks, *wj = w + j * d;
        SFX(gram_row)(wj, qj, qr, N, -1, d, a); /* a = Qᵀ w */
        for (int64_t e = 0; e < N; e++) {       /* c = -Kᵀ a */
            REAL s = 0;
            for (int64_t i = 0; i < N; i++) s += a[i] * kj[i * kr + e];
            c[e] = -s;
        }
        SFX(combine)(out + j * d, wj, qj, qr, c, N, d);
    }
}
