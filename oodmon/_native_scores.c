/* Row kernels for oodmon's logit scores on the CPU (oodmon/_native.py says when).
 *
 * Why: at a few thousand logits every PyTorch call costs about as much as one log_softmax
 * pass, and an eager score makes two to five of them; at a million, the eager passes and
 * their [N, K] temporaries cost more than the arithmetic. Here each score is one call and
 * one sweep: a pass for the row maximum and the NaN/inf check, then a pass that
 * exponentiates relative to the maximum and accumulates what the score needs.
 *
 * Two layouts of the vector lanes, both summing in a fixed order (no reassociation):
 * - rows of few or strided columns: eight rows in the eight lanes, so that K = 10
 *   vectorises; each lane sums its own row;
 * - rows of many contiguous columns: eight columns in the lanes, loaded together; each lane
 *   sums every eighth column, and the lanes are added at the end.
 *
 * Float32 only; the inputs are 2-D buffers with any strides (NumPy views of tensors).
 * Results match the eager scores to float32 rounding; a row holding NaN or +-inf gives NaN.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <math.h>
#include <stdint.h>
#include <string.h>

#define LANES 8
typedef float vfloat __attribute__((vector_size(4 * LANES)));
typedef int32_t vint __attribute__((vector_size(4 * LANES)));

#define INLINE static inline __attribute__((always_inline))

/* AVX2 (and FMA with GCC) where the CPU has them, SSE2 otherwise; chosen once, at load time,
 * by CPU features (an `arch=haswell` clone would be chosen by CPU model, never on AMD). */
#if defined(__x86_64__) && !defined(__clang__) && __GNUC__ >= 12
#define MULTIVERSION __attribute__((target_clones("arch=x86-64-v3", "default")))
#elif defined(__x86_64__) && defined(__clang__) && __clang_major__ >= 14
#define MULTIVERSION __attribute__((target_clones("avx2", "default")))
#else
#define MULTIVERSION
#endif

INLINE vfloat splat(float x) {
    vfloat v = {x, x, x, x, x, x, x, x};
    return v;
}

INLINE vfloat select_lanes(vint mask, vfloat a, vfloat b) {
    vint ai, bi, r;
    vfloat out;
    memcpy(&ai, &a, sizeof ai);
    memcpy(&bi, &b, sizeof bi);
    r = (mask & ai) | (~mask & bi);
    memcpy(&out, &r, sizeof out);
    return out;
}

/* max(x, floor), and floor where x is NaN. */
INLINE vfloat clamp_below(vfloat x, float floor) {
    return select_lanes(~(x >= splat(floor)), splat(floor), x);
}

/* e^x for x <= 0, to about 1 ulp: Cody-Waite reduction to |r| <= ln2 / 2, a degree-6
 * polynomial, and 2^n from the exponent bits. Below -87 it gives e^-87 (1.6e-38), which
 * no sum of these scores (each at least 1) can tell from the true value. NaN (a row with
 * +inf, whose result is NaN anyway) is clamped too, so no NaN reaches the int conversion. */
INLINE vfloat exp_nonpositive(vfloat x) {
    x = clamp_below(x, -87.0f);
    vfloat n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f; /* round(x / ln2) */
    vfloat r = x - n * 0.693359375f;
    r = r + n * 2.12194440e-4f;
    vfloat p = r * (1.0f / 720.0f) + (1.0f / 120.0f);
    p = p * r + (1.0f / 24.0f);
    p = p * r + (1.0f / 6.0f);
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    vint bits = (__builtin_convertvector(n, vint) + 127) << 23;
    vfloat scale;
    memcpy(&scale, &bits, sizeof scale);
    return p * scale;
}

/* log(x) for normal x > 0 (the sums s >= 1 here), to about 1 ulp: x = m 2^e with m in
 * [sqrt(1/2), sqrt(2)), log(m) = f - f^2 / 2 + f^3 P(f) for f = m - 1 with a degree-8
 * minimax P, and e ln2 added in two parts. A lane holding garbage (a NaN row) gives
 * garbage, which the NaN mask then replaces. */
INLINE vfloat log_positive(vfloat x) {
    vint bits;
    memcpy(&bits, &x, sizeof bits);
    vint e = ((bits >> 23) & 0xff) - 126;
    bits = (bits & 0x007fffff) | 0x3f000000; /* m in [1/2, 1) */
    vfloat m;
    memcpy(&m, &bits, sizeof m);
    vint small = m < splat(0.70710678118654752f);
    e = e + small; /* small is -1 where true: m -> 2m, e -> e - 1 */
    m = select_lanes(small, m + m, m) - 1.0f;
    vfloat ef = __builtin_convertvector(e, vfloat);
    vfloat m2 = m * m;
    vfloat p = m * 7.0376836292e-2f - 1.1514610310e-1f;
    p = p * m + 1.1676998740e-1f;
    p = p * m - 1.2420140846e-1f;
    p = p * m + 1.4249322787e-1f;
    p = p * m - 1.6668057665e-1f;
    p = p * m + 2.0000714765e-1f;
    p = p * m - 2.4999993993e-1f;
    p = p * m + 3.3333331174e-1f;
    vfloat y = p * m * m2 + ef * -2.12194440e-4f - 0.5f * m2;
    return m + y + ef * 0.693359375f;
}

/* A 2-D float32 view: rows, columns, and strides in bytes. */
typedef struct {
    const char *data;
    Py_ssize_t rows, cols, row_stride, col_stride;
} Logits;

/* The row start of each lane for the block at row `first`; lanes past the end repeat the
 * last row (computed, never written). */
INLINE void lane_rows(const Logits *z, Py_ssize_t first, const char *row[LANES]) {
    for (int lane = 0; lane < LANES; lane++) {
        Py_ssize_t i = first + lane < z->rows ? first + lane : z->rows - 1;
        row[lane] = z->data + i * z->row_stride;
    }
}

INLINE vfloat column(const char *const row[LANES], Py_ssize_t offset) {
    vfloat v = {
        *(const float *)(row[0] + offset), *(const float *)(row[1] + offset),
        *(const float *)(row[2] + offset), *(const float *)(row[3] + offset),
        *(const float *)(row[4] + offset), *(const float *)(row[5] + offset),
        *(const float *)(row[6] + offset), *(const float *)(row[7] + offset),
    };
    return v;
}

/* The first columns of a block are gathered once, in the first pass, and read back from
 * here in the second: gathering eight rows' values is most of the work at small K. */
#define CACHED_COLUMNS 64

/* Row maxima of a block, and a mask of the rows holding NaN or +-inf. */
INLINE vfloat block_max(const Logits *z, const char *const row[LANES], vint *nonfinite,
                        vfloat cache[CACHED_COLUMNS]) {
    const vint exponent = {0x7f800000, 0x7f800000, 0x7f800000, 0x7f800000,
                           0x7f800000, 0x7f800000, 0x7f800000, 0x7f800000};
    vfloat m = column(row, 0);
    vint bad = {0};
    for (Py_ssize_t k = 0; k < z->cols; k++) {
        vfloat v = column(row, k * z->col_stride);
        if (k < CACHED_COLUMNS) cache[k] = v;
        vint bits;
        memcpy(&bits, &v, sizeof bits);
        bad |= (bits & exponent) == exponent;
        m = select_lanes(v > m, v, m);
    }
    *nonfinite = bad;
    return m;
}

enum Score { MAX_LOGIT, MSP, NEG_LOG_SUM_EXP, ENTROPY, KL, REVERSE_KL };

typedef struct {
    enum Score score;
    const float *constant; /* log pi (KL) or pi (reverse KL), one per column */
    float scalar;          /* the temperature (energy) or sum_k pi_k log pi_k (reverse KL) */
} Spec;

MULTIVERSION static void score_blocks(const Logits *z, const Spec *spec, float *out) {
    const float temperature = spec->score == NEG_LOG_SUM_EXP ? spec->scalar : 1.0f;
    for (Py_ssize_t first = 0; first < z->rows; first += LANES) {
        const char *row[LANES];
        vint bad;
        vfloat cache[CACHED_COLUMNS];
        lane_rows(z, first, row);
        vfloat m = block_max(z, row, &bad, cache);
#define COLUMN(k) ((k) < CACHED_COLUMNS ? cache[k] : column(row, (k) * z->col_stride))
        vfloat s = splat(0.0f), t = splat(0.0f), result = splat(0.0f);
        switch (spec->score) {
        case MAX_LOGIT:
            result = -m;
            break;
        case MSP: /* the top class has e = 1, so max_k p_k = 1 / s */
            for (Py_ssize_t k = 0; k < z->cols; k++)
                s += exp_nonpositive(COLUMN(k) - m);
            result = -1.0f / s;
            break;
        case NEG_LOG_SUM_EXP: /* -T logsumexp(z / T); max(z / T) = max(z) / T exactly */
            m = m / temperature;
            for (Py_ssize_t k = 0; k < z->cols; k++)
                s += exp_nonpositive(COLUMN(k) / temperature - m);
            result = -temperature * (m + log_positive(s));
            break;
        case ENTROPY: /* log s - sum_k e_k d_k / s */
            for (Py_ssize_t k = 0; k < z->cols; k++) {
                vfloat d = COLUMN(k) - m, e = exp_nonpositive(d);
                s += e;
                t += e * d;
            }
            result = log_positive(s) - t / s;
            break;
        case KL: /* sum_k e_k (d_k - log pi_k) / s - log s */
            for (Py_ssize_t k = 0; k < z->cols; k++) {
                vfloat d = COLUMN(k) - m, e = exp_nonpositive(d);
                s += e;
                t += e * (d - spec->constant[k]);
            }
            result = t / s - log_positive(s);
            result = select_lanes(result < splat(0.0f), splat(0.0f), result);
            break;
        case REVERSE_KL: /* sum_k pi_k log pi_k - sum_k pi_k d_k + log s */
            for (Py_ssize_t k = 0; k < z->cols; k++) {
                vfloat d = COLUMN(k) - m;
                s += exp_nonpositive(d);
                t += d * spec->constant[k];
            }
            result = splat(spec->scalar) - t + log_positive(s);
            result = select_lanes(result < splat(0.0f), splat(0.0f), result);
            break;
        }
#undef COLUMN
        result = select_lanes(bad, splat(NAN), result);
        for (int lane = 0; lane < LANES && first + lane < z->rows; lane++)
            out[first + lane] = result[lane];
    }
}

/* Rows of many contiguous columns: lanes along the row instead, loaded eight at a time
 * (no gathering); each lane sums every eighth column, and the lanes are added at the end. */
#define ALONG_MIN_COLUMNS 32

INLINE vfloat load8(const float *p) {
    vfloat v;
    memcpy(&v, p, sizeof v);
    return v;
}

INLINE float lanes_max(vfloat v) {
    float m = v[0];
    for (int lane = 1; lane < LANES; lane++) m = v[lane] > m ? v[lane] : m;
    return m;
}

INLINE float lanes_sum(vfloat v) {
    return ((v[0] + v[1]) + (v[2] + v[3])) + ((v[4] + v[5]) + (v[6] + v[7]));
}

/* The last, partial vector of a row: the n <= 7 remaining values, and 0 in the lanes past
 * them (the caller masks those lanes out of every sum). */
INLINE vfloat load_tail(const float *p, int n) {
    vfloat v = splat(0.0f);
    for (int lane = 0; lane < n; lane++) v[lane] = p[lane];
    return v;
}

INLINE vint lanes_below(int n) {
    vint mask;
    for (int lane = 0; lane < LANES; lane++) mask[lane] = lane < n ? -1 : 0;
    return mask;
}

/* Adds one vector of a row to the score's sums: e = exp(d) to s, and what the score needs
 * to t (with `valid`, the lanes outside it add nothing). */
INLINE void accumulate(enum Score score, vfloat d, vfloat c, const vint *valid, vfloat *s,
                       vfloat *t) {
    vfloat e = exp_nonpositive(d);
    if (valid) e = select_lanes(*valid, e, splat(0.0f));
    *s += e;
    if (score == ENTROPY) *t += e * d;
    if (score == KL) *t += e * (d - c);
    if (score == REVERSE_KL) *t += d * c; /* c and d are 0 past the row's end */
}

INLINE float score_one_row(const float *r, Py_ssize_t cols, const Spec *spec, enum Score score) {
    const vint exponent = {0x7f800000, 0x7f800000, 0x7f800000, 0x7f800000,
                           0x7f800000, 0x7f800000, 0x7f800000, 0x7f800000};
    const float temperature = score == NEG_LOG_SUM_EXP ? spec->scalar : 1.0f;
    const Py_ssize_t full = cols - cols % LANES;
    const int rest = (int)(cols - full);
    const vint tail = lanes_below(rest);
    vfloat mv = load8(r);
    vint bad = {0};
    for (Py_ssize_t k = 0; k < full; k += LANES) {
        vfloat v = load8(r + k);
        vint bits;
        memcpy(&bits, &v, sizeof bits);
        bad |= (bits & exponent) == exponent;
        mv = select_lanes(v > mv, v, mv);
    }
    float m = lanes_max(mv);
    int nonfinite = 0;
    for (int lane = 0; lane < LANES; lane++) nonfinite |= bad[lane];
    for (Py_ssize_t k = full; k < cols; k++) {
        nonfinite |= !isfinite(r[k]);
        m = r[k] > m ? r[k] : m;
    }
    if (nonfinite) return NAN;
    if (score == MAX_LOGIT) return -m;
    m = m / temperature;
    vfloat s = splat(0.0f), t = splat(0.0f);
    const float *c = spec->constant;
    for (Py_ssize_t k = 0; k < full; k += LANES)
        accumulate(score, load8(r + k) / temperature - splat(m), c ? load8(c + k) : splat(0.0f),
                   NULL, &s, &t);
    if (rest)
        accumulate(score, select_lanes(tail, load_tail(r + full, rest) / temperature - splat(m),
                                       splat(0.0f)),
                   c ? load_tail(c + full, rest) : splat(0.0f), &tail, &s, &t);
    float sum = lanes_sum(s), total = lanes_sum(t), result;
    switch (score) {
    case MSP:
        return -1.0f / sum;
    case NEG_LOG_SUM_EXP:
        return -temperature * (m + logf(sum));
    case ENTROPY:
        return logf(sum) - total / sum;
    case KL:
        result = total / sum - logf(sum);
        return result < 0.0f ? 0.0f : result;
    case REVERSE_KL:
        result = spec->scalar - total + logf(sum);
        return result < 0.0f ? 0.0f : result;
    default:
        return -m;
    }
}

MULTIVERSION static void score_along_rows(const Logits *z, const Spec *spec, float *out) {
    for (Py_ssize_t i = 0; i < z->rows; i++) {
        const float *r = (const float *)(z->data + i * z->row_stride);
        switch (spec->score) { /* one inlined copy of the row loop per score */
        case MAX_LOGIT: out[i] = score_one_row(r, z->cols, spec, MAX_LOGIT); break;
        case MSP: out[i] = score_one_row(r, z->cols, spec, MSP); break;
        case NEG_LOG_SUM_EXP: out[i] = score_one_row(r, z->cols, spec, NEG_LOG_SUM_EXP); break;
        case ENTROPY: out[i] = score_one_row(r, z->cols, spec, ENTROPY); break;
        case KL: out[i] = score_one_row(r, z->cols, spec, KL); break;
        case REVERSE_KL: out[i] = score_one_row(r, z->cols, spec, REVERSE_KL); break;
        }
    }
}

static void score_rows(const Logits *z, const Spec *spec, float *out) {
    if (z->col_stride == 4 && z->cols >= ALONG_MIN_COLUMNS)
        score_along_rows(z, spec, out);
    else
        score_blocks(z, spec, out);
}

/* ------------------------------------------------------------------ Python bindings */

/* 1: a batch the kernels serve; 0: one they leave to the eager path (no columns, no rows,
 * another dtype, odd strides), without an error; -1: an error. */
static int view_logits(PyObject *obj, Py_buffer *view, Logits *z) {
    if (PyObject_GetBuffer(obj, view, PyBUF_STRIDES | PyBUF_FORMAT) < 0) return -1;
    if (view->ndim != 2 || view->itemsize != 4 || strcmp(view->format, "f") != 0 ||
        view->shape[0] < 1 || view->shape[1] < 1 || view->strides[0] % 4 ||
        view->strides[1] % 4) {
        PyBuffer_Release(view);
        return 0;
    }
    z->data = view->buf;
    z->rows = view->shape[0];
    z->cols = view->shape[1];
    z->row_stride = view->strides[0];
    z->col_stride = view->strides[1];
    return 1;
}

static int view_constant(PyObject *obj, Py_buffer *view, Py_ssize_t cols) {
    if (PyObject_GetBuffer(obj, view, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT) < 0) return -1;
    if (view->itemsize != 4 || strcmp(view->format, "f") != 0 || view->len != 4 * cols) {
        PyBuffer_Release(view);
        PyErr_SetString(PyExc_ValueError, "expected a contiguous float32 vector, one per column");
        return -1;
    }
    return 0;
}

/* score(logits[, constant][, scalar]) -> bytearray of one float32 per row, or None */
static PyObject *run(enum Score score, PyObject *const *args, Py_ssize_t nargs) {
    int wants_constant = score == KL || score == REVERSE_KL;
    int wants_scalar = score == NEG_LOG_SUM_EXP || score == REVERSE_KL;
    if (nargs != 1 + wants_constant + wants_scalar) {
        PyErr_SetString(PyExc_TypeError, "wrong number of arguments");
        return NULL;
    }
    Spec spec = {score, NULL, 1.0f};
    if (wants_scalar) {
        double scalar = PyFloat_AsDouble(args[nargs - 1]);
        if (scalar == -1.0 && PyErr_Occurred()) return NULL;
        spec.scalar = (float)scalar;
    }
    Py_buffer logits_view, constant_view;
    Logits z;
    int served = view_logits(args[0], &logits_view, &z);
    if (served < 0) return NULL;
    if (served == 0) Py_RETURN_NONE;
    if (wants_constant) {
        if (view_constant(args[1], &constant_view, z.cols) < 0) {
            PyBuffer_Release(&logits_view);
            return NULL;
        }
        spec.constant = constant_view.buf;
    }
    PyObject *out = PyByteArray_FromStringAndSize(NULL, 4 * z.rows);
    if (out != NULL) {
        float *result = (float *)PyByteArray_AS_STRING(out);
        Py_BEGIN_ALLOW_THREADS score_rows(&z, &spec, result);
        Py_END_ALLOW_THREADS
    }
    if (wants_constant) PyBuffer_Release(&constant_view);
    PyBuffer_Release(&logits_view);
    return out;
}

#define BINDING(name, score)                                                              \
    static PyObject *name(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {      \
        (void)self;                                                                       \
        return run(score, args, nargs);                                                   \
    }
BINDING(max_logit, MAX_LOGIT)
BINDING(msp, MSP)
BINDING(neg_log_sum_exp, NEG_LOG_SUM_EXP)
BINDING(entropy, ENTROPY)
BINDING(kl, KL)
BINDING(reverse_kl, REVERSE_KL)

static PyMethodDef methods[] = {
    {"max_logit", (PyCFunction)(void (*)(void))max_logit, METH_FASTCALL, "-max_k z_k"},
    {"msp", (PyCFunction)(void (*)(void))msp, METH_FASTCALL, "-max_k softmax(z)_k"},
    {"neg_log_sum_exp", (PyCFunction)(void (*)(void))neg_log_sum_exp, METH_FASTCALL,
     "(z, T): -T logsumexp(z / T)"},
    {"entropy", (PyCFunction)(void (*)(void))entropy, METH_FASTCALL, "H(softmax(z))"},
    {"kl", (PyCFunction)(void (*)(void))kl, METH_FASTCALL, "(z, log_pi): KL(softmax(z) || pi)"},
    {"reverse_kl", (PyCFunction)(void (*)(void))reverse_kl, METH_FASTCALL,
     "(z, pi, sum_k pi_k log pi_k): KL(pi || softmax(z))"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    .m_base = PyModuleDef_HEAD_INIT,
    .m_name = "oodmon._native_scores",
    .m_doc = "Row kernels for the logit scores on the CPU (see oodmon/_native.py).",
    .m_size = -1,
    .m_methods = methods,
};

PyMODINIT_FUNC PyInit__native_scores(void) { return PyModule_Create(&module); }
