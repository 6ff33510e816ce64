/* Python bindings: translate buffers, check sizes, release the GIL. No math here. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <string.h>
#include "qk.h"
#include "lattice.h"

typedef struct {
    const char *name;
    int64_t block;      /* weights per block */
    int64_t bytes;      /* bytes per block */
    void (*quantize)(const float *, uint8_t *, int64_t, int64_t, const float *);
    void (*dequantize)(const uint8_t *, float *, int64_t, int64_t);
    int lattice;        /* the QK_LAT_* grid its quantizer searches (built first), or -1 */
    int needs_imatrix;  /* ggml_quantize_requires_imatrix: no path without importance weights */
} qtype;

static const qtype QTYPES[] = {
    {"Q8_0", 32, 34, qk_quantize_q8_0, qk_dequantize_q8_0, -1, 0},
    {"MXFP4", 32, 17, qk_quantize_mxfp4, qk_dequantize_mxfp4, -1, 0},
    {"Q4_0", 32, 18, qk_quantize_q4_0, qk_dequantize_q4_0, -1, 0},
    {"Q4_1", 32, 20, qk_quantize_q4_1, qk_dequantize_q4_1, -1, 0},
    {"Q5_0", 32, 22, qk_quantize_q5_0, qk_dequantize_q5_0, -1, 0},
    {"Q5_1", 32, 24, qk_quantize_q5_1, qk_dequantize_q5_1, -1, 0},
    {"Q2_K", 256, 84, qk_quantize_q2_K, qk_dequantize_q2_K, -1, 0},
    {"Q3_K", 256, 110, qk_quantize_q3_K, qk_dequantize_q3_K, -1, 0},
    {"Q4_K", 256, 144, qk_quantize_q4_K, qk_dequantize_q4_K, -1, 0},
    {"Q5_K", 256, 176, qk_quantize_q5_K, qk_dequantize_q5_K, -1, 0},
    {"Q6_K", 256, 210, qk_quantize_q6_K, qk_dequantize_q6_K, -1, 0},
    {"IQ4_NL", 32, 18, qk_quantize_iq4_nl, qk_dequantize_iq4_nl, -1, 0},
    {"IQ4_XS", 256, 136, qk_quantize_iq4_xs, qk_dequantize_iq4_xs, -1, 0},
    {"TQ1_0", 256, 54, qk_quantize_tq1_0, qk_dequantize_tq1_0, -1, 0},
    {"TQ2_0", 256, 66, qk_quantize_tq2_0, qk_dequantize_tq2_0, -1, 0},
    {"Q1_0", 128, 18, qk_quantize_q1_0, qk_dequantize_q1_0, -1, 0},
    {"IQ2_XXS", 256, 66, qk_quantize_iq2_xxs, qk_dequantize_iq2_xxs, QK_LAT_IQ2_XXS, 1},
    {"IQ2_XS", 256, 74, qk_quantize_iq2_xs, qk_dequantize_iq2_xs, QK_LAT_IQ2_XS, 1},
    {"IQ2_S", 256, 82, qk_quantize_iq2_s, qk_dequantize_iq2_s, QK_LAT_IQ2_S, 0},
    {"IQ3_XXS", 256, 98, qk_quantize_iq3_xxs, qk_dequantize_iq3_xxs, QK_LAT_IQ3_XXS, 0},
    {"IQ3_S", 256, 110, qk_quantize_iq3_s, qk_dequantize_iq3_s, QK_LAT_IQ3_S, 0},
    {"IQ1_S", 256, 50, qk_quantize_iq1_s, qk_dequantize_iq1_s, QK_LAT_IQ1, 1},
    {"IQ1_M", 256, 56, qk_quantize_iq1_m, qk_dequantize_iq1_m, QK_LAT_IQ1, 0},
};

static const qtype *find_qtype(const char *name) {
    for (size_t i = 0; i < sizeof QTYPES / sizeof QTYPES[0]; i++)
        if (strcmp(QTYPES[i].name, name) == 0) return &QTYPES[i];
    PyErr_Format(PyExc_ValueError, "no C kernel for block type %s", name);
    return NULL;
}

typedef struct {
    const qtype *t;
    const float *src;
    uint8_t *dst;
    float *fdst;
    const uint8_t *qsrc;
    int64_t n_per_row;
    const float *qw;
    const float *ms;  /* each row's mean square for the legacy types' importance (or NULL) */
    int legacy;       /* QK_LEGACY_* where ms is given */
} rows_ctx;

static void quantize_rows(void *p, int64_t b, int64_t e) {
    rows_ctx *c = p;
    const int64_t row_bytes = c->n_per_row / c->t->block * c->t->bytes;
    if (c->ms)
        qk_quantize_legacy(c->legacy, c->src + b * c->n_per_row, c->dst + b * row_bytes, e - b, c->n_per_row, c->qw,
                           c->ms + b);
    else
        c->t->quantize(c->src + b * c->n_per_row, c->dst + b * row_bytes, e - b, c->n_per_row, c->qw);
}

/* QK_LEGACY_* of a type name, or -1 */
static int legacy_kind(const char *name) {
    static const char *names[] = {[QK_LEGACY_Q4_0] = "Q4_0", [QK_LEGACY_Q4_1] = "Q4_1", [QK_LEGACY_Q5_0] = "Q5_0",
                                  [QK_LEGACY_Q5_1] = "Q5_1"};
    for (int k = 0; k < 4; k++)
        if (!strcmp(name, names[k])) return k;
    return -1;
}

static void dequantize_rows(void *p, int64_t b, int64_t e) {
    rows_ctx *c = p;
    const int64_t row_bytes = c->n_per_row / c->t->block * c->t->bytes;
    c->t->dequantize(c->qsrc + b * row_bytes, c->fdst + b * c->n_per_row, e - b, c->n_per_row);
}

static int check_rows(const qtype *t, Py_ssize_t nrows, Py_ssize_t n_per_row) {
    if (nrows < 0 || n_per_row <= 0 || n_per_row % t->block) {
        PyErr_Format(PyExc_ValueError, "%s: row length must be a positive multiple of %lld, got %zd",
                     t->name, (long long)t->block, n_per_row);
        return 0;
    }
    return 1;
}

static PyObject *py_quantize(PyObject *self, PyObject *args) {
    const char *name;
    Py_buffer src, dst, qw = {0}, ms = {0};
    Py_ssize_t nrows, n_per_row;
    int threads = 1;
    PyObject *qw_obj = Py_None, *ms_obj = Py_None;
    (void)self;
    if (!PyArg_ParseTuple(args, "sy*w*nn|iOO", &name, &src, &dst, &nrows, &n_per_row, &threads, &qw_obj, &ms_obj))
        return NULL;
    if ((qw_obj != Py_None && PyObject_GetBuffer(qw_obj, &qw, PyBUF_C_CONTIGUOUS) < 0) ||
        (ms_obj != Py_None && PyObject_GetBuffer(ms_obj, &ms, PyBUF_C_CONTIGUOUS) < 0)) {
        if (qw.buf) PyBuffer_Release(&qw);
        PyBuffer_Release(&src);
        PyBuffer_Release(&dst);
        return NULL;
    }
    PyObject *ret = NULL;
    const qtype *t = find_qtype(name);
    if (t && t->lattice >= 0 && !qk_lattice_get(t->lattice)) {
        PyErr_Format(PyExc_ValueError, "%s: its lattice is not built (call lattice() first)", name);
    } else if (t && t->needs_imatrix && !qw.buf) {
        PyErr_Format(PyExc_ValueError, "%s: importance weights are required (ggml cannot quantize it without them)",
                     name);
    } else if (t && check_rows(t, nrows, n_per_row)) {
        const int64_t need_src = (int64_t)nrows * n_per_row * 4;
        const int64_t need_dst = (int64_t)nrows * (n_per_row / t->block) * t->bytes;
        if (src.len != need_src || dst.len != need_dst) {
            PyErr_Format(PyExc_ValueError, "%s: buffers must be %lld and %lld bytes, got %zd and %zd",
                         name, (long long)need_src, (long long)need_dst, src.len, dst.len);
        } else if (qw.buf && qw.len != (Py_ssize_t)n_per_row * 4) {
            PyErr_Format(PyExc_ValueError, "%s: importance weights must be %zd float32, got %zd bytes",
                         name, n_per_row, qw.len);
        } else if (ms.buf && (legacy_kind(name) < 0 || !qw.buf || ms.len != (Py_ssize_t)nrows * 4)) {
            PyErr_Format(PyExc_ValueError, "%s: mean squares are for Q4_0, Q4_1, Q5_0 and Q5_1 with importance "
                         "weights, %zd float32", name, nrows);
        } else {
            rows_ctx c = {t, src.buf, dst.buf, NULL, NULL, n_per_row, qw.buf, ms.buf, legacy_kind(name)};
            Py_BEGIN_ALLOW_THREADS
            qk_parallel_rows(quantize_rows, &c, nrows, threads);
            Py_END_ALLOW_THREADS
            ret = Py_NewRef(Py_None);
        }
    }
    if (qw.buf) PyBuffer_Release(&qw);
    if (ms.buf) PyBuffer_Release(&ms);
    PyBuffer_Release(&src);
    PyBuffer_Release(&dst);
    return ret;
}

static PyObject *py_dequantize(PyObject *self, PyObject *args) {
    const char *name;
    Py_buffer src, dst;
    Py_ssize_t nrows, n_per_row;
    int threads = 1;
    (void)self;
    if (!PyArg_ParseTuple(args, "sy*w*nn|i", &name, &src, &dst, &nrows, &n_per_row, &threads)) return NULL;
    PyObject *ret = NULL;
    const qtype *t = find_qtype(name);
    if (t && t->lattice >= 0 && !qk_lattice_get(t->lattice)) {
        PyErr_Format(PyExc_ValueError, "%s: its lattice is not built (call lattice() first)", name);
    } else if (t && check_rows(t, nrows, n_per_row)) {
        const int64_t need_src = (int64_t)nrows * (n_per_row / t->block) * t->bytes;
        const int64_t need_dst = (int64_t)nrows * n_per_row * 4;
        if (src.len != need_src || dst.len != need_dst) {
            PyErr_Format(PyExc_ValueError, "%s: buffers must be %lld and %lld bytes, got %zd and %zd",
                         name, (long long)need_src, (long long)need_dst, src.len, dst.len);
        } else {
            rows_ctx c = {t, NULL, NULL, dst.buf, src.buf, n_per_row, NULL, NULL, -1};
            Py_BEGIN_ALLOW_THREADS
            qk_parallel_rows(dequantize_rows, &c, nrows, threads);
            Py_END_ALLOW_THREADS
            ret = Py_NewRef(Py_None);
        }
    }
    PyBuffer_Release(&src);
    PyBuffer_Release(&dst);
    return ret;
}

/* element-wise conversions, split into chunks of CHUNK elements across threads */
#define CHUNK 65536
typedef struct { int kind; const void *src; void *dst; int64_t n; } conv_ctx;

static void convert_chunks(void *p, int64_t b, int64_t e) {
    conv_ctx *c = p;
    const int64_t lo = b * CHUNK, hi = e * CHUNK < c->n ? e * CHUNK : c->n;
    const int64_t n = hi - lo;
    switch (c->kind) {
    case 0: qk_f32_to_f16_n((const float *)c->src + lo, (uint16_t *)c->dst + lo, n); break;
    case 1: qk_f32_to_bf16_n((const float *)c->src + lo, (uint16_t *)c->dst + lo, n); break;
    case 2: qk_f16_to_f32_n((const uint16_t *)c->src + lo, (float *)c->dst + lo, n); break;
    case 3: qk_bf16_to_f32_n((const uint16_t *)c->src + lo, (float *)c->dst + lo, n); break;
    }
}

static PyObject *py_convert(PyObject *self, PyObject *args) {
    static const char *kinds[] = {"f32>f16", "f32>bf16", "f16>f32", "bf16>f32"};
    static const int src_size[] = {4, 4, 2, 2}, dst_size[] = {2, 2, 4, 4};
    const char *kind_name;
    Py_buffer src, dst;
    int threads = 1;
    (void)self;
    if (!PyArg_ParseTuple(args, "sy*w*|i", &kind_name, &src, &dst, &threads)) return NULL;
    int kind = -1;
    for (int i = 0; i < 4; i++) if (strcmp(kinds[i], kind_name) == 0) kind = i;
    PyObject *ret = NULL;
    if (kind < 0) {
        PyErr_Format(PyExc_ValueError, "unknown conversion %s", kind_name);
    } else if (src.len % src_size[kind] || src.len / src_size[kind] != dst.len / dst_size[kind]
               || dst.len % dst_size[kind]) {
        PyErr_Format(PyExc_ValueError, "%s: buffer sizes %zd and %zd do not match", kind_name, src.len, dst.len);
    } else {
        conv_ctx c = {kind, src.buf, dst.buf, src.len / src_size[kind]};
        const int64_t chunks = (c.n + CHUNK - 1) / CHUNK;
        Py_BEGIN_ALLOW_THREADS
        qk_parallel_rows(convert_chunks, &c, chunks, threads);
        Py_END_ALLOW_THREADS
        ret = Py_NewRef(Py_None);
    }
    PyBuffer_Release(&src);
    PyBuffer_Release(&dst);
    return ret;
}

static PyObject *py_first_nonfinite(PyObject *self, PyObject *args) {
    Py_buffer src;
    (void)self;
    if (!PyArg_ParseTuple(args, "y*", &src)) return NULL;
    if (src.len % 4) {
        PyBuffer_Release(&src);
        PyErr_SetString(PyExc_ValueError, "first_nonfinite: buffer of float32 expected");
        return NULL;
    }
    int64_t at;
    Py_BEGIN_ALLOW_THREADS
    at = qk_first_nonfinite(src.buf, src.len / 4);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&src);
    return PyLong_FromLongLong(at);
}

static PyObject *py_lattice(PyObject *self, PyObject *args) {
    static const char *names[QK_LAT_COUNT] = {
        [QK_LAT_IQ2_XXS] = "IQ2_XXS", [QK_LAT_IQ2_XS] = "IQ2_XS", [QK_LAT_IQ2_S] = "IQ2_S",
        [QK_LAT_IQ1] = "IQ1", [QK_LAT_IQ3_XXS] = "IQ3_XXS", [QK_LAT_IQ3_S] = "IQ3_S"};
    const char *name;
    Py_buffer levels;
    (void)self;
    if (!PyArg_ParseTuple(args, "sy*", &name, &levels)) return NULL;
    int which = -1;
    for (int i = 0; i < QK_LAT_COUNT; i++) if (strcmp(names[i], name) == 0) which = i;
    PyObject *ret = NULL;
    if (which < 0) {
        PyErr_Format(PyExc_ValueError, "unknown lattice %s", name);
    } else {
        int size, dim, rc;
        qk_lattice_shape(which, &size, &dim);
        if (levels.len != (Py_ssize_t)size * dim) {
            PyErr_Format(PyExc_ValueError, "lattice %s: %d x %d levels expected, got %zd bytes", name, size, dim,
                         levels.len);
        } else {
            rc = qk_lattice_build(which, levels.buf, size, dim); /* under the GIL: built once */
            const qk_lattice *l = qk_lattice_get(which);
            if (rc || !l) {
                PyErr_Format(PyExc_ValueError, "lattice %s: levels out of range or out of memory", name);
            } else {
                ret = Py_BuildValue("(y#y#)", (const char *)l->map, (Py_ssize_t)l->map_size * 4,
                                    (const char *)l->neighbours, (Py_ssize_t)l->neighbours_size * 2);
            }
        }
    }
    PyBuffer_Release(&levels);
    return ret;
}

/* bnb4_quantize(src_f32, packed, absmax_f32, block, bounds_f32[15], remap_u8[16], threads) */
static PyObject *py_bnb4_quantize(PyObject *self, PyObject *args) {
    Py_buffer x, packed, absmax, bounds, remap;
    Py_ssize_t block;
    int threads = 1;
    (void)self;
    if (!PyArg_ParseTuple(args, "y*w*w*ny*y*|i", &x, &packed, &absmax, &block, &bounds, &remap, &threads)) return NULL;
    PyObject *ret = NULL;
    const int64_t n = x.len / 4, blocks = block > 0 ? (n + block - 1) / block : 0;
    if (block < 2 || block > 4096 || block % 2) {
        PyErr_Format(PyExc_ValueError, "bnb4_quantize: block %zd is not an even size up to 4096", block);
    } else if (packed.len != (n + 1) / 2 || absmax.len != blocks * 4 || bounds.len != 15 * 4 || remap.len != 16) {
        PyErr_SetString(PyExc_ValueError, "bnb4_quantize: buffer sizes do not fit");
    } else {
        Py_BEGIN_ALLOW_THREADS
        qk_bnb4_quantize(x.buf, n, block, bounds.buf, remap.buf, packed.buf, absmax.buf, threads);
        Py_END_ALLOW_THREADS
        ret = Py_NewRef(Py_None);
    }
    PyBuffer_Release(&x); PyBuffer_Release(&packed); PyBuffer_Release(&absmax);
    PyBuffer_Release(&bounds); PyBuffer_Release(&remap);
    return ret;
}

/* bnb4_dequantize(packed, absmax_f32, levels_f32[16], dst_f32, block, threads) */
static PyObject *py_bnb4_dequantize(PyObject *self, PyObject *args) {
    Py_buffer packed, absmax, levels, out;
    Py_ssize_t block;
    int threads = 1;
    (void)self;
    if (!PyArg_ParseTuple(args, "y*y*y*w*n|i", &packed, &absmax, &levels, &out, &block, &threads)) return NULL;
    PyObject *ret = NULL;
    const int64_t n = out.len / 4, blocks = block > 0 ? (n + block - 1) / block : 0;
    if (block < 2 || block % 2) {
        PyErr_Format(PyExc_ValueError, "bnb4_dequantize: block %zd is not even", block);
    } else if (packed.len != (n + 1) / 2 || absmax.len != blocks * 4 || levels.len != 16 * 4) {
        PyErr_SetString(PyExc_ValueError, "bnb4_dequantize: buffer sizes do not fit");
    } else {
        Py_BEGIN_ALLOW_THREADS
        qk_bnb4_dequantize(packed.buf, absmax.buf, levels.buf, n, block, out.buf, threads);
        Py_END_ALLOW_THREADS
        ret = Py_NewRef(Py_None);
    }
    PyBuffer_Release(&packed); PyBuffer_Release(&absmax); PyBuffer_Release(&levels); PyBuffer_Release(&out);
    return ret;
}

static PyObject *py_feedback_round(PyObject *self, PyObject *args) {
    Py_buffer w, u, a, b, table, codes, err, targets;
    Py_ssize_t B, N;
    int levels, threads = 1;
    (void)self;
    if (!PyArg_ParseTuple(args, "w*y*y*y*y*iw*w*w*nn|i", &w, &u, &a, &b, &table, &levels, &codes, &err, &targets, &B,
                          &N, &threads))
        return NULL;
    PyObject *ret = NULL;
    const Py_ssize_t cells = B * N;
    if (B < 0 || N < 0 || levels < 2 || levels > 256) {
        PyErr_SetString(PyExc_ValueError, "feedback_round: bad block shape or levels");
    } else if (w.len != cells * 4 || a.len != cells * 4 || b.len != cells * 4 || err.len != cells * 4 ||
               codes.len != cells || u.len != B * B * 4 || (table.len != 0 && (levels != 16 || table.len != 64)) ||
               (targets.len != 0 && targets.len != cells * 4)) {
        PyErr_SetString(PyExc_ValueError, "feedback_round: buffer sizes do not fit");
    } else {
        Py_BEGIN_ALLOW_THREADS
        qk_feedback_round(w.buf, u.buf, a.buf, b.buf, table.len ? table.buf : NULL, levels, codes.buf, err.buf,
                          targets.len ? targets.buf : NULL, B, N, threads);
        Py_END_ALLOW_THREADS
        ret = Py_NewRef(Py_None);
    }
    PyBuffer_Release(&w); PyBuffer_Release(&u); PyBuffer_Release(&a); PyBuffer_Release(&b);
    PyBuffer_Release(&table); PyBuffer_Release(&codes); PyBuffer_Release(&err); PyBuffer_Release(&targets);
    return ret;
}

static PyObject *py_search_scale(PyObject *self, PyObject *args) {
    Py_buffer x, w, levels, fr, d;
    Py_ssize_t B;
    int table, threads = 1;
    (void)self;
    if (!PyArg_ParseTuple(args, "y*y*y*iy*w*n|i", &x, &w, &levels, &table, &fr, &d, &B, &threads))
        return NULL;
    PyObject *ret = NULL;
    const Py_ssize_t nlev = levels.len / 4;
    if (B < 0 || x.len != B * 32 * 4 || w.len != 32 * 4 || d.len != B * 4 || nlev < 2 || nlev > 256 || (table && nlev != 16) ||
        levels.len % 4 || fr.len % 4) {
        PyErr_SetString(PyExc_ValueError, "search_scale: buffer sizes do not fit");
    } else {
        Py_BEGIN_ALLOW_THREADS
        qk_search_scale(x.buf, B, w.buf, levels.buf, (int)nlev, table, fr.buf, (int)(fr.len / 4), d.buf, threads);
        Py_END_ALLOW_THREADS
        ret = Py_NewRef(Py_None);
    }
    PyBuffer_Release(&x); PyBuffer_Release(&w); PyBuffer_Release(&levels); PyBuffer_Release(&fr);
    PyBuffer_Release(&d);
    return ret;
}

static PyObject *py_have_avx2(PyObject *self, PyObject *args) {
    (void)self;
    (void)args;
    return PyBool_FromLong(qk_have_avx2());
}

static PyMethodDef methods[] = {
    {"quantize", py_quantize, METH_VARARGS,
     "quantize(type, src_f32, dst, nrows, n_per_row, threads=1, imatrix=None, mean_squares=None): float32 rows "
     "-> blocks; imatrix: n_per_row float32 importance weights; mean_squares (Q4_0, Q4_1, Q5_0, Q5_1 with an "
     "imatrix): nrows float32, each row's mean square in the importance in place of its own"},
    {"dequantize", py_dequantize, METH_VARARGS,
     "dequantize(type, src, dst_f32, nrows, n_per_row, threads=1): blocks -> float32 rows"},
    {"convert", py_convert, METH_VARARGS,
     "convert(kind, src, dst, threads=1): kind is f32>f16, f32>bf16, f16>f32 or bf16>f32"},
    {"first_nonfinite", py_first_nonfinite, METH_VARARGS,
     "first_nonfinite(src_f32) -> index of the first NaN/Inf, or -1"},
    {"lattice", py_lattice, METH_VARARGS,
     "lattice(name, levels) -> (map int32 bytes, neighbours uint16 bytes): builds an i-quant grid's neighbour "
     "map once (name IQ2_XXS, IQ2_XS, IQ2_S, IQ1, IQ3_XXS or IQ3_S; levels: its points' level per coordinate)"},
    {"bnb4_quantize", py_bnb4_quantize, METH_VARARGS,
     "bnb4_quantize(src_f32, packed_u8, absmax_f32, block, bounds_f32, remap_u8, threads=1): bitsandbytes' "
     "4-bit codes of float32 weights in blocks (quant/bnb.py)"},
    {"bnb4_dequantize", py_bnb4_dequantize, METH_VARARGS,
     "bnb4_dequantize(packed_u8, absmax_f32, levels_f32, dst_f32, block, threads=1): level times its block's absmax"},
    {"feedback_round", py_feedback_round, METH_VARARGS,
     "feedback_round(w_f32, u_f32, a_f32, b_f32, table_f32, levels, codes_u8, err_f32, targets_f32, B, N, "
     "threads=1): one block of columns w [B, N] rounded in order to the grid a c + b (or a table[c]; table empty "
     "for none), each error / u[i, i] spread over the later columns by u's row i; targets (or empty) gets each "
     "weight as it was when rounded (quant/feedback.py)"},
    {"search_scale", py_search_scale, METH_VARARGS,
     "search_scale(x_f32, w_f32, levels_f32, table, fractions_f32, d_f32, B, threads=1): blocks x [B, 32] with "
     "importance w [32]: each block's scale d (in: its quantizer's) chosen again among d and its largest weight / "
     "(levels[0] * fraction), each f16 and refitted, by the lowest weighted error (quant/feedback.py)"},
    {"have_avx2", py_have_avx2, METH_NOARGS,
     "have_avx2() -> whether the AVX2 paths run (the CPU has AVX2 and QCONVERT_NO_SIMD is unset)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_kernels", "qconvert C block kernels", -1, methods};

PyMODINIT_FUNC PyInit__kernels(void) {
    PyObject *m = PyModule_Create(&module);
    if (!m) return NULL;
    PyObject *types = PyTuple_New(sizeof QTYPES / sizeof QTYPES[0]);
    for (size_t i = 0; i < sizeof QTYPES / sizeof QTYPES[0]; i++)
        PyTuple_SET_ITEM(types, i, PyUnicode_FromString(QTYPES[i].name));
    PyModule_AddObject(m, "QUANT_TYPES", types);
    PyObject *sizes = PyDict_New();  /* name -> (weights, bytes) per block, checked against gguf's table */
    for (size_t i = 0; i < sizeof QTYPES / sizeof QTYPES[0]; i++) {
        PyObject *v = Py_BuildValue("(LL)", (long long)QTYPES[i].block, (long long)QTYPES[i].bytes);
        PyDict_SetItemString(sizes, QTYPES[i].name, v);
        Py_DECREF(v);
    }
    PyModule_AddObject(m, "QUANT_SIZES", sizes);
    return m;
}
