/*
 * geventproxy._accel: the per-chunk work of the copy loop, compiled.
 *
 * A drop-in for the pure-Python reference, which stays the definition of
 * what is right (codec.py, stats.py, latency.py, meter.py); the tests run
 * both on the same input and require identical results:
 *
 *   classify(line), count_block(block, max_line)   as codec.classify / count_block
 *   LineScanner(max_line)                          as codec.LineScanner
 *   StatsWriter(block, clock, layout, bounds)      as stats.Stats.record / observe_latency
 *   RequestTimer(writer, limit)                    as latency.RequestTimer
 *   Meter(direction, max_line, timer)              as meter.Meter: account(data) scans
 *       one forwarded chunk, updates the counters and windows, and times the
 *       REQs and replies, in one call.
 *   copy(...)                                      as relay._copy: the copy loop itself,
 *       recv and send on the descriptors into one buffer, the accounting in
 *       place, the same hub waits, outcomes and partial-send path.
 *
 * Bounds: a scanner holds at most max_line bytes of an unfinished line; a
 * timer at most limit + 1 entries; every slot index into the statistics
 * block is checked against the block's length when the writer is made (and
 * a list block's length again on every call). Nothing here allocates in
 * proportion to what a peer sends beyond those bounds.
 *
 * The block is either a list of ints (one process) or a writable buffer of
 * signed 64-bit integers (the shared memory of several workers); both are
 * handled. Counters that would overflow 64 bits raise OverflowError.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include "structmember.h"

#include <errno.h>
#include <stdint.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>

enum { K_REQ = 0, K_ACK = 1, K_NAK = 2, K_INVALID = 3 };

#define DEFAULT_MAX_LINE (64 * 1024)
#define HELD_MIN_CAP 256        /* first allocation for an unfinished line */
#define HELD_KEEP_CAP 1024      /* a bigger buffer is freed once its line is done */
#define TIMER_MIN_CAP 4
#define TIMER_KEEP_CAP 16       /* a bigger queue is freed once it is empty */
#define MAX_BOUNDS 128

/* What the Python side expects of this module (accel.INTERFACE): raised with
   every change of what a call means, so that a stale build is not used. */
#define INTERFACE 2

/* ------------------------------------------------------------------------ */
/* Integer helpers: Python's floor division and modulo (b > 0).              */

static inline int64_t floordiv64(int64_t a, int64_t b)
{
    int64_t q = a / b;
    if ((a % b) != 0 && a < 0)
        q--;
    return q;
}

static inline int64_t floormod64(int64_t a, int64_t b)
{
    int64_t m = a % b;
    if (m < 0)
        m += b;
    return m;
}

/* ------------------------------------------------------------------------ */
/* One line: the grammar of codec.classify.                                  */

/* Data: UTF-8 (as Python's strict decoder accepts it), and no code point in
 * U+0000..U+0020 or U+007F. */
static int valid_data(const unsigned char *p, Py_ssize_t n)
{
    Py_ssize_t i = 0;
    while (i < n) {
        unsigned char c = p[i];
        if (c < 0x80) {
            if (c <= 0x20 || c == 0x7f)
                return 0;
            i++;
            continue;
        }
        Py_ssize_t need;
        unsigned char lo = 0x80, hi = 0xbf;   /* range of the second byte */
        if (c >= 0xc2 && c <= 0xdf) {
            need = 1;
        } else if (c >= 0xe0 && c <= 0xef) {
            need = 2;
            if (c == 0xe0)
                lo = 0xa0;   /* no overlong forms */
            else if (c == 0xed)
                hi = 0x9f;   /* no surrogates */
        } else if (c >= 0xf0 && c <= 0xf4) {
            need = 3;
            if (c == 0xf0)
                lo = 0x90;
            else if (c == 0xf4)
                hi = 0x8f;   /* nothing above U+10FFFF */
        } else {
            return 0;
        }
        if (n - i - 1 < need)
            return 0;
        if (p[i + 1] < lo || p[i + 1] > hi)
            return 0;
        for (Py_ssize_t k = 2; k <= need; k++)
            if ((p[i + k] & 0xc0) != 0x80)
                return 0;
        i += need + 1;
    }
    return 1;
}

/* REQ, ACK, NAK or INVALID for one complete line of n bytes, LF included. */
static int classify_line(const unsigned char *p, Py_ssize_t n)
{
    if (n < 1 || p[n - 1] != '\n')
        return K_INVALID;
    Py_ssize_t len = n - 1;
    if (len > 0 && p[len - 1] == '\r')
        len--;
    if (len < 5 || p[3] != ' ')
        return K_INVALID;
    int kind;
    if (p[0] == 'R' && p[1] == 'E' && p[2] == 'Q')
        kind = K_REQ;
    else if (p[0] == 'A' && p[1] == 'C' && p[2] == 'K')
        kind = K_ACK;
    else if (p[0] == 'N' && p[1] == 'A' && p[2] == 'K')
        kind = K_NAK;
    else
        return K_INVALID;
    /* SEQ := ["+" | "-"] DIGIT+, its value in [-2**63, 2**63 - 1]; leading zeros allowed. */
    Py_ssize_t i = 4;
    int negative = 0;
    if (p[i] == '+' || p[i] == '-') {
        negative = p[i] == '-';
        i++;
    }
    Py_ssize_t first = i;
    while (i < len && p[i] == '0')
        i++;
    Py_ssize_t significant = i;
    uint64_t value = 0;
    while (i < len && p[i] >= '0' && p[i] <= '9') {
        if (i - significant < 19)
            value = value * 10 + (uint64_t)(p[i] - '0');
        i++;
    }
    if (i == first || i - significant > 19)
        return K_INVALID;
    if (value > (negative ? (uint64_t)INT64_MAX + 1 : (uint64_t)INT64_MAX))
        return K_INVALID;
    if (i == len)
        return kind;
    if (p[i] != ' ')
        return K_INVALID;
    i++;
    return valid_data(p + i, len - i) ? kind : K_INVALID;
}

/* ------------------------------------------------------------------------ */
/* The scanner: codec.LineScanner's state and feed.                          */

typedef struct {
    Py_ssize_t max_line;
    unsigned char *held;   /* the start of an unfinished line */
    Py_ssize_t held_len, held_cap;
    int skipping;          /* inside an over-long line, already counted */
} scan_t;

static void scan_drop(scan_t *s)
{
    s->held_len = 0;
    if (s->held_cap > HELD_KEEP_CAP) {
        PyMem_Free(s->held);
        s->held = NULL;
        s->held_cap = 0;
    }
}

/* Append to the held line; the caller has checked held_len + n <= max_line. */
static int scan_hold(scan_t *s, const unsigned char *p, Py_ssize_t n)
{
    Py_ssize_t need = s->held_len + n;
    if (need > s->held_cap) {
        Py_ssize_t cap = s->held_cap ? s->held_cap : HELD_MIN_CAP;
        while (cap < need)
            cap *= 2;
        if (cap > s->max_line)
            cap = s->max_line;
        unsigned char *grown = PyMem_Realloc(s->held, (size_t)cap);
        if (grown == NULL)
            return -1;
        s->held = grown;
        s->held_cap = cap;
    }
    memcpy(s->held + s->held_len, p, (size_t)n);
    s->held_len = need;
    return 0;
}

/* Count into c[4] the messages this chunk completes; -1 on MemoryError. */
static int scan_feed(scan_t *s, const unsigned char *p, Py_ssize_t n, int64_t c[4])
{
    Py_ssize_t pos = 0;
    while (pos < n) {
        const unsigned char *lf = memchr(p + pos, '\n', (size_t)(n - pos));
        if (lf == NULL)
            break;
        Py_ssize_t end = lf - p + 1, piece = end - pos;
        if (s->skipping) {
            s->skipping = 0;   /* the end of a line counted when it overflowed */
        } else if (s->held_len) {
            if (s->held_len + piece > s->max_line) {
                c[K_INVALID]++;
            } else {
                if (scan_hold(s, p + pos, piece) < 0)
                    return -1;
                c[classify_line(s->held, s->held_len)]++;
            }
            scan_drop(s);
        } else {
            c[piece > s->max_line ? K_INVALID : classify_line(p + pos, piece)]++;
        }
        pos = end;
    }
    Py_ssize_t tail = n - pos;
    if (tail && !s->skipping) {
        if (s->held_len + tail > s->max_line) {
            s->held_len = s->held_cap = 0;
            PyMem_Free(s->held);
            s->held = NULL;
            s->skipping = 1;
            c[K_INVALID]++;
        } else if (scan_hold(s, p + pos, tail) < 0) {
            return -1;
        }
    }
    return 0;
}

static int scan_init(scan_t *s, Py_ssize_t max_line)
{
    if (max_line < 2) {
        PyErr_SetString(PyExc_ValueError, "max_line must be at least 2");
        return -1;
    }
    PyMem_Free(s->held);
    memset(s, 0, sizeof *s);
    s->max_line = max_line;
    return 0;
}

static PyObject *counts_tuple(const int64_t c[4])
{
    return Py_BuildValue("(LLLL)", (long long)c[0], (long long)c[1], (long long)c[2],
                         (long long)c[3]);
}

/* The bytes of a bytes-like object: bytes directly, anything else by the buffer protocol. */
typedef struct {
    const unsigned char *p;
    Py_ssize_t n;
    Py_buffer view;
    int has_view;
} bytes_arg;

static int bytes_arg_get(PyObject *obj, bytes_arg *a)
{
    if (PyBytes_CheckExact(obj)) {
        a->p = (const unsigned char *)PyBytes_AS_STRING(obj);
        a->n = PyBytes_GET_SIZE(obj);
        a->has_view = 0;
        return 0;
    }
    if (PyObject_GetBuffer(obj, &a->view, PyBUF_SIMPLE) < 0)
        return -1;
    a->p = a->view.buf;
    a->n = a->view.len;
    a->has_view = 1;
    return 0;
}

static void bytes_arg_release(bytes_arg *a)
{
    if (a->has_view)
        PyBuffer_Release(&a->view);
}

/* ------------------------------------------------------------------------ */
/* classify() and count_block(), for the tests against codec's.              */

static PyObject *accel_classify(PyObject *module, PyObject *line)
{
    bytes_arg a;
    if (bytes_arg_get(line, &a) < 0)
        return NULL;
    int kind = classify_line(a.p, a.n);
    bytes_arg_release(&a);
    return PyLong_FromLong(kind);
}

static PyObject *accel_count_block(PyObject *module, PyObject *args)
{
    PyObject *obj;
    Py_ssize_t max_line = DEFAULT_MAX_LINE;
    if (!PyArg_ParseTuple(args, "O|n:count_block", &obj, &max_line))
        return NULL;
    bytes_arg a;
    if (bytes_arg_get(obj, &a) < 0)
        return NULL;
    int64_t c[4] = {0, 0, 0, 0};
    Py_ssize_t pos = 0;
    while (pos < a.n) {
        const unsigned char *lf = memchr(a.p + pos, '\n', (size_t)(a.n - pos));
        if (lf == NULL)
            break;
        Py_ssize_t end = lf - a.p + 1;
        c[end - pos > max_line ? K_INVALID : classify_line(a.p + pos, end - pos)]++;
        pos = end;
    }
    bytes_arg_release(&a);
    return counts_tuple(c);
}

/* ------------------------------------------------------------------------ */
/* LineScanner                                                               */

typedef struct {
    PyObject_HEAD
    scan_t scan;
} ScannerObject;

static int Scanner_init(ScannerObject *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"max_line", NULL};
    Py_ssize_t max_line = DEFAULT_MAX_LINE;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "|n:LineScanner", kwlist, &max_line))
        return -1;
    return scan_init(&self->scan, max_line);
}

static void Scanner_dealloc(ScannerObject *self)
{
    PyMem_Free(self->scan.held);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *Scanner_feed(ScannerObject *self, PyObject *data)
{
    bytes_arg a;
    if (bytes_arg_get(data, &a) < 0)
        return NULL;
    int64_t c[4] = {0, 0, 0, 0};
    int rc = scan_feed(&self->scan, a.p, a.n, c);
    bytes_arg_release(&a);
    if (rc < 0)
        return PyErr_NoMemory();
    return counts_tuple(c);
}

static PyObject *Scanner_pending(ScannerObject *self, void *closure)
{
    return PyLong_FromSsize_t(self->scan.held_len);
}

static PyObject *Scanner_mid_line(ScannerObject *self, void *closure)
{
    return PyBool_FromLong(self->scan.held_len || self->scan.skipping);
}

static PyObject *Scanner_max_line(ScannerObject *self, void *closure)
{
    return PyLong_FromSsize_t(self->scan.max_line);
}

static PyMethodDef Scanner_methods[] = {
    {"feed", (PyCFunction)Scanner_feed, METH_O,
     "Count the messages this chunk completes, as a (req, ack, nak, invalid) tuple."},
    {NULL}};

static PyGetSetDef Scanner_getset[] = {
    {"pending", (getter)Scanner_pending, NULL, "Bytes of an unfinished line held now.", NULL},
    {"mid_line", (getter)Scanner_mid_line, NULL,
     "Has the stream an unfinished line: held, or over-long and skipped to its LF?", NULL},
    {"max_line", (getter)Scanner_max_line, NULL, "Longest well-formed line, LF included.",
     NULL},
    {NULL}};

static PyTypeObject ScannerType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "geventproxy._accel.LineScanner",
    .tp_basicsize = sizeof(ScannerObject),
    .tp_dealloc = (destructor)Scanner_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Counts the messages of one byte stream, fed in arbitrary chunks.",
    .tp_methods = Scanner_methods,
    .tp_getset = Scanner_getset,
    .tp_init = (initproc)Scanner_init,
    .tp_new = PyType_GenericNew,
};

/* ------------------------------------------------------------------------ */
/* StatsWriter: stats.Stats.record and observe_latency on one block.         */

typedef struct {
    PyObject_HEAD
    PyObject *block;
    PyObject *clock;       /* NULL: read CLOCK_MONOTONIC, as time.monotonic_ns does */
    Py_buffer view;
    int64_t *slots;        /* the block's int64 items, if it exports them */
    Py_ssize_t nslots;     /* slots the layout needs */
    Py_ssize_t bytes_, msg, stamp, wreq, wresp, ring, lcount, lsum, lstamp, lring, nb,
        lwindow, dropped, unmatched;
    int64_t bucket_ns;
    Py_ssize_t nbounds;
    int64_t bounds[MAX_BOUNDS];
} WriterObject;

static PyTypeObject WriterType;

/* A list block must still hold every slot (nothing resizes it, but check). */
static inline int w_check(WriterObject *w)
{
    if (w->slots == NULL && PyList_GET_SIZE(w->block) < w->nslots) {
        PyErr_SetString(PyExc_ValueError, "the statistics block has shrunk");
        return -1;
    }
    return 0;
}

static inline int w_get(WriterObject *w, Py_ssize_t i, int64_t *out)
{
    if (w->slots) {
        *out = w->slots[i];
        return 0;
    }
    long long v = PyLong_AsLongLong(PyList_GET_ITEM(w->block, i));
    if (v == -1 && PyErr_Occurred())
        return -1;
    *out = v;
    return 0;
}

static inline int w_set(WriterObject *w, Py_ssize_t i, int64_t v)
{
    if (w->slots) {
        w->slots[i] = v;
        return 0;
    }
    PyObject *obj = PyLong_FromLongLong(v);
    if (obj == NULL)
        return -1;
    PyObject *old = PyList_GET_ITEM(w->block, i);
    PyList_SET_ITEM(w->block, i, obj);
    Py_DECREF(old);
    return 0;
}

static inline int w_add(WriterObject *w, Py_ssize_t i, int64_t d)
{
    int64_t v;
    if (w_get(w, i, &v) < 0)
        return -1;
    if (__builtin_add_overflow(v, d, &v)) {
        PyErr_SetString(PyExc_OverflowError, "a statistics counter passed 64 bits");
        return -1;
    }
    return w_set(w, i, v);
}

static int w_now(WriterObject *w, int64_t *out)
{
    if (w->clock == NULL) {
        struct timespec ts;
        clock_gettime(CLOCK_MONOTONIC, &ts);
        *out = (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
        return 0;
    }
    PyObject *r = PyObject_CallObject(w->clock, NULL);
    if (r == NULL)
        return -1;
    long long v = PyLong_AsLongLong(r);
    Py_DECREF(r);
    if (v == -1 && PyErr_Occurred())
        return -1;
    *out = v;
    return 0;
}

/* Stats.record: bytes and messages of one chunk; *now is the clock reading, or
 * 0 when the chunk completed no message. */
static int w_record(WriterObject *w, int direction, int64_t nbytes, const int64_t c[4],
                    int64_t *now)
{
    int64_t req = c[0], ack = c[1], nak = c[2], invalid = c[3];
    Py_ssize_t base = w->msg + direction * 4;
    *now = 0;
    if (w_add(w, w->bytes_ + direction, nbytes) < 0)
        return -1;
    if (invalid && w_add(w, base + 3, invalid) < 0)
        return -1;
    if (req) {
        if (w_add(w, base, req) < 0)
            return -1;
    } else if (!(ack || nak)) {
        return 0;
    }
    if (ack && w_add(w, base + 1, ack) < 0)
        return -1;
    if (nak && w_add(w, base + 2, nak) < 0)
        return -1;
    int64_t t;
    if (w_now(w, &t) < 0)
        return -1;
    int64_t k = floordiv64(t, w->bucket_ns);
    Py_ssize_t i = (Py_ssize_t)floormod64(k, w->ring);
    int64_t stamp;
    if (w_get(w, w->stamp + i, &stamp) < 0)
        return -1;
    if (stamp == k) {
        if (req && w_add(w, w->wreq + i, req) < 0)
            return -1;
        if ((ack || nak) && w_add(w, w->wresp + i, ack + nak) < 0)
            return -1;
    } else {
        /* Counts first, stamp last: a reader in another process sees either
         * the old stamp (and skips the bucket) or the new counts. */
        if (w_set(w, w->wreq + i, req) < 0 || w_set(w, w->wresp + i, ack + nak) < 0)
            return -1;
        __atomic_thread_fence(__ATOMIC_RELEASE);
        if (w_set(w, w->stamp + i, k) < 0)
            return -1;
    }
    *now = t;
    return 0;
}

/* Stats.observe_latency: n responses that took latency_ns each. */
static int w_observe(WriterObject *w, int64_t now, int64_t latency_ns, int64_t n)
{
    int64_t us = floordiv64(latency_ns, 1000), sum;
    Py_ssize_t lo = 0, hi = w->nbounds;   /* bisect_left */
    while (lo < hi) {
        Py_ssize_t mid = (lo + hi) / 2;
        if (w->bounds[mid] < us)
            lo = mid + 1;
        else
            hi = mid;
    }
    if (__builtin_mul_overflow(us, n, &sum)) {
        PyErr_SetString(PyExc_OverflowError, "a latency sum passed 64 bits");
        return -1;
    }
    if (w_add(w, w->lcount + lo, n) < 0 || w_add(w, w->lsum, sum) < 0)
        return -1;
    int64_t second = floordiv64(now, 1000000000);
    Py_ssize_t slot = (Py_ssize_t)floormod64(second, w->lwindow);
    Py_ssize_t base = w->lring + slot * w->nb;
    int64_t stamp;
    if (w_get(w, w->lstamp + slot, &stamp) < 0)
        return -1;
    if (stamp != second) {
        for (Py_ssize_t j = base; j < base + w->nb; j++)
            if (w_set(w, j, 0) < 0)
                return -1;
        if (w_set(w, w->lstamp + slot, second) < 0)
            return -1;
    }
    return w_add(w, base + lo, n);
}

static int layout_item(PyObject *layout, const char *name, Py_ssize_t *out)
{
    PyObject *v = PyDict_GetItemString(layout, name);   /* borrowed */
    if (v == NULL) {
        PyErr_Format(PyExc_KeyError, "layout has no %s", name);
        return -1;
    }
    *out = PyLong_AsSsize_t(v);
    if (*out == -1 && PyErr_Occurred())
        return -1;
    if (*out < 0) {
        PyErr_Format(PyExc_ValueError, "layout %s is negative", name);
        return -1;
    }
    return 0;
}

static int Writer_init(WriterObject *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"block", "clock", "layout", "bounds", NULL};
    PyObject *block, *clock, *layout, *bounds;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OOO!O:StatsWriter", kwlist, &block, &clock,
                                     &PyDict_Type, &layout, &bounds))
        return -1;
    if (self->block != NULL) {
        PyErr_SetString(PyExc_TypeError, "StatsWriter is initialised once");
        return -1;
    }
    Py_ssize_t bucket_ns, slots;
    struct {
        const char *name;
        Py_ssize_t *field;
    } items[] = {
        {"bytes", &self->bytes_},     {"msg", &self->msg},       {"stamp", &self->stamp},
        {"wreq", &self->wreq},        {"wresp", &self->wresp},   {"ring", &self->ring},
        {"lcount", &self->lcount},    {"lsum", &self->lsum},     {"lstamp", &self->lstamp},
        {"lring", &self->lring},      {"nb", &self->nb},         {"lwindow", &self->lwindow},
        {"dropped", &self->dropped},  {"unmatched", &self->unmatched},
        {"bucket_ns", &bucket_ns},    {"slots", &slots},
    };
    for (size_t k = 0; k < sizeof items / sizeof items[0]; k++)
        if (layout_item(layout, items[k].name, items[k].field) < 0)
            return -1;
    self->bucket_ns = bucket_ns;
    self->nslots = slots;
    /* Every index the writer computes must lie inside the block. */
    if (bucket_ns <= 0 || self->ring <= 0 || self->lwindow <= 0 || self->nb <= 0 ||
        self->bytes_ + 2 > slots || self->msg + 8 > slots || self->stamp + self->ring > slots ||
        self->wreq + self->ring > slots || self->wresp + self->ring > slots ||
        self->lcount + self->nb > slots || self->lsum >= slots ||
        self->lstamp + self->lwindow > slots || self->lring + self->lwindow * self->nb > slots ||
        self->dropped >= slots || self->unmatched >= slots) {
        PyErr_SetString(PyExc_ValueError, "inconsistent statistics layout");
        return -1;
    }
    PyObject *seq = PySequence_Fast(bounds, "bounds must be a sequence");
    if (seq == NULL)
        return -1;
    self->nbounds = PySequence_Fast_GET_SIZE(seq);
    if (self->nbounds + 1 != self->nb || self->nbounds > MAX_BOUNDS) {
        Py_DECREF(seq);
        PyErr_SetString(PyExc_ValueError, "bounds do not match the layout");
        return -1;
    }
    for (Py_ssize_t k = 0; k < self->nbounds; k++) {
        long long v = PyLong_AsLongLong(PySequence_Fast_GET_ITEM(seq, k));
        if (v == -1 && PyErr_Occurred()) {
            Py_DECREF(seq);
            return -1;
        }
        self->bounds[k] = v;
    }
    Py_DECREF(seq);
    if (PyList_CheckExact(block)) {
        if (PyList_GET_SIZE(block) < slots) {
            PyErr_SetString(PyExc_ValueError, "the block is shorter than the layout");
            return -1;
        }
    } else {
        if (PyObject_GetBuffer(block, &self->view, PyBUF_WRITABLE | PyBUF_FORMAT |
                                                       PyBUF_C_CONTIGUOUS) < 0)
            return -1;
        const char *f = self->view.format ? self->view.format : "B";
        if (*f == '@' || *f == '=' || *f == '<')
            f++;
        if (self->view.itemsize != 8 || (strcmp(f, "q") != 0 && strcmp(f, "l") != 0) ||
            self->view.len < (Py_ssize_t)(slots * 8)) {
            PyBuffer_Release(&self->view);
            PyErr_SetString(PyExc_TypeError,
                            "the block must be a list or a buffer of int64 covering the layout");
            return -1;
        }
        self->slots = self->view.buf;
    }
    Py_INCREF(block);
    self->block = block;
    if (clock != Py_None) {
        Py_INCREF(clock);
        self->clock = clock;
    }
    return 0;
}

static int Writer_traverse(WriterObject *self, visitproc visit, void *arg)
{
    Py_VISIT(self->block);
    Py_VISIT(self->clock);
    return 0;
}

static int Writer_clear(WriterObject *self)
{
    if (self->slots) {
        self->slots = NULL;
        PyBuffer_Release(&self->view);
    }
    Py_CLEAR(self->block);
    Py_CLEAR(self->clock);
    return 0;
}

static void Writer_dealloc(WriterObject *self)
{
    PyObject_GC_UnTrack(self);
    Writer_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int w_ready(WriterObject *w)
{
    if (w->block == NULL) {
        PyErr_SetString(PyExc_ValueError, "StatsWriter is not initialised");
        return -1;
    }
    return w_check(w);
}

static int counts_arg(PyObject *obj, int64_t c[4])
{
    PyObject *seq = PySequence_Fast(obj, "counts must be a sequence of 4 ints");
    if (seq == NULL)
        return -1;
    if (PySequence_Fast_GET_SIZE(seq) != 4) {
        Py_DECREF(seq);
        PyErr_SetString(PyExc_ValueError, "counts must be a sequence of 4 ints");
        return -1;
    }
    for (int k = 0; k < 4; k++) {
        long long v = PyLong_AsLongLong(PySequence_Fast_GET_ITEM(seq, k));
        if (v == -1 && PyErr_Occurred()) {
            Py_DECREF(seq);
            return -1;
        }
        c[k] = v;
    }
    Py_DECREF(seq);
    return 0;
}

static PyObject *Writer_record(WriterObject *self, PyObject *args)
{
    int direction;
    long long nbytes;
    PyObject *counts;
    int64_t c[4], now;
    if (!PyArg_ParseTuple(args, "iLO:record", &direction, &nbytes, &counts))
        return NULL;
    if (direction != 0 && direction != 1) {
        PyErr_SetString(PyExc_ValueError, "direction must be 0 or 1");
        return NULL;
    }
    if (w_ready(self) < 0 || counts_arg(counts, c) < 0 ||
        w_record(self, direction, nbytes, c, &now) < 0)
        return NULL;
    return PyLong_FromLongLong(now);
}

static PyObject *Writer_observe_latency(WriterObject *self, PyObject *args)
{
    long long now, latency, n = 1;
    if (!PyArg_ParseTuple(args, "LL|L:observe_latency", &now, &latency, &n))
        return NULL;
    if (w_ready(self) < 0 || w_observe(self, now, latency, n) < 0)
        return NULL;
    Py_RETURN_NONE;
}

static PyMethodDef Writer_methods[] = {
    {"record", (PyCFunction)Writer_record, METH_VARARGS,
     "Account one forwarded chunk, as Stats.record; the clock reading or 0."},
    {"observe_latency", (PyCFunction)Writer_observe_latency, METH_VARARGS,
     "Record n responses that took latency_ns each, as Stats.observe_latency."},
    {NULL}};

static PyMemberDef Writer_members[] = {
    {"block", T_OBJECT, offsetof(WriterObject, block), READONLY, "The block written."},
    {NULL}};

static PyTypeObject WriterType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "geventproxy._accel.StatsWriter",
    .tp_basicsize = sizeof(WriterObject),
    .tp_dealloc = (destructor)Writer_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "Writes one statistics block as stats.Stats does.",
    .tp_traverse = (traverseproc)Writer_traverse,
    .tp_clear = (inquiry)Writer_clear,
    .tp_methods = Writer_methods,
    .tp_members = Writer_members,
    .tp_init = (initproc)Writer_init,
    .tp_new = PyType_GenericNew,
};

/* ------------------------------------------------------------------------ */
/* RequestTimer: latency.RequestTimer.                                       */

typedef struct {
    int64_t sent_ns, waiting;
} pending_t;

typedef struct {
    PyObject_HEAD
    WriterObject *writer;
    pending_t *queue;       /* a ring of at most limit + 1 entries, made on first use */
    Py_ssize_t head, len, cap, limit;
    int64_t forgotten;      /* dropped REQs whose replies are still to come */
} TimerObject;

static int Timer_init(TimerObject *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"writer", "limit", NULL};
    PyObject *writer;
    Py_ssize_t limit = 1024;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O!|n:RequestTimer", kwlist, &WriterType,
                                     &writer, &limit))
        return -1;
    Py_INCREF(writer);
    Py_XSETREF(self->writer, (WriterObject *)writer);
    PyMem_Free(self->queue);
    self->queue = NULL;
    self->head = self->len = self->cap = 0;
    self->limit = limit < 0 ? 0 : limit;
    self->forgotten = 0;
    return 0;
}

static void Timer_dealloc(TimerObject *self)
{
    Py_XDECREF(self->writer);
    PyMem_Free(self->queue);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int t_ready(TimerObject *t)
{
    if (t->writer == NULL) {
        PyErr_SetString(PyExc_ValueError, "RequestTimer is not initialised");
        return -1;
    }
    return w_ready(t->writer);
}

/* A chunk holding n REQs was sent at now. */
static int t_sent(TimerObject *t, int64_t now, int64_t n)
{
    if (!n)
        return 0;
    if (t->len == t->cap) {
        Py_ssize_t cap = t->cap ? t->cap * 2 : TIMER_MIN_CAP;
        if (cap > t->limit + 1)
            cap = t->limit + 1;
        pending_t *q = PyMem_Malloc((size_t)cap * sizeof *q);
        if (q == NULL) {
            PyErr_NoMemory();
            return -1;
        }
        for (Py_ssize_t k = 0; k < t->len; k++)
            q[k] = t->queue[(t->head + k) % t->cap];
        PyMem_Free(t->queue);
        t->queue = q;
        t->head = 0;
        t->cap = cap;
    }
    pending_t *e = &t->queue[(t->head + t->len) % t->cap];
    e->sent_ns = now;
    e->waiting = n;
    t->len++;
    if (t->len > t->limit) {
        int64_t dropped = t->queue[t->head].waiting;
        t->head = (t->head + 1) % t->cap;
        t->len--;
        t->forgotten += dropped;
        if (w_add(t->writer, t->writer->dropped, dropped) < 0)
            return -1;
    }
    return 0;
}

/* A chunk holding n replies arrived at now. */
static int t_answered(TimerObject *t, int64_t now, int64_t n)
{
    if (t->forgotten) {   /* the oldest replies answer REQs no longer remembered */
        int64_t skip = n < t->forgotten ? n : t->forgotten;
        t->forgotten -= skip;
        n -= skip;
    }
    while (n && t->len) {
        pending_t *e = &t->queue[t->head];
        int64_t take;
        int64_t sent_ns = e->sent_ns;
        if (e->waiting <= n) {
            take = e->waiting;
            t->head = (t->head + 1) % t->cap;
            t->len--;
        } else {
            e->waiting -= n;
            take = n;
        }
        if (w_observe(t->writer, now, now - sent_ns, take) < 0)
            return -1;
        n -= take;
    }
    if (t->len == 0 && t->cap > TIMER_KEEP_CAP) {
        PyMem_Free(t->queue);
        t->queue = NULL;
        t->head = t->cap = 0;
    }
    if (n && w_add(t->writer, t->writer->unmatched, n) < 0)
        return -1;
    return 0;
}

static PyObject *Timer_sent(TimerObject *self, PyObject *args)
{
    long long now;
    PyObject *counts;
    int64_t c[4];
    if (!PyArg_ParseTuple(args, "LO:sent", &now, &counts))
        return NULL;
    if (t_ready(self) < 0 || counts_arg(counts, c) < 0 || t_sent(self, now, c[0]) < 0)
        return NULL;
    Py_RETURN_NONE;
}

static PyObject *Timer_answered(TimerObject *self, PyObject *args)
{
    long long now;
    PyObject *counts;
    int64_t c[4];
    if (!PyArg_ParseTuple(args, "LO:answered", &now, &counts))
        return NULL;
    if (t_ready(self) < 0 || counts_arg(counts, c) < 0 ||
        t_answered(self, now, c[1] + c[2]) < 0)
        return NULL;
    Py_RETURN_NONE;
}

static Py_ssize_t Timer_length(TimerObject *self)
{
    return self->len;
}

static PyObject *Timer_get_limit(TimerObject *self, void *closure)
{
    return PyLong_FromSsize_t(self->limit);
}

static PyMethodDef Timer_methods[] = {
    {"sent", (PyCFunction)Timer_sent, METH_VARARGS,
     "A chunk from the client was forwarded, holding counts[0] REQs."},
    {"answered", (PyCFunction)Timer_answered, METH_VARARGS,
     "A chunk from the upstream was forwarded, holding ACKs and NAKs."},
    {NULL}};

static PyGetSetDef Timer_getset[] = {
    {"limit", (getter)Timer_get_limit, NULL, "Most chunks of unanswered REQs remembered.",
     NULL},
    {NULL}};

static PySequenceMethods Timer_as_sequence = {.sq_length = (lenfunc)Timer_length};

static PyTypeObject TimerType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "geventproxy._accel.RequestTimer",
    .tp_basicsize = sizeof(TimerObject),
    .tp_dealloc = (destructor)Timer_dealloc,
    .tp_as_sequence = &Timer_as_sequence,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "The unanswered REQs of one connection, oldest first.",
    .tp_methods = Timer_methods,
    .tp_getset = Timer_getset,
    .tp_init = (initproc)Timer_init,
    .tp_new = PyType_GenericNew,
};

/* ------------------------------------------------------------------------ */
/* Meter: one direction's accounting, one call per chunk.                    */

typedef struct {
    PyObject_HEAD
    TimerObject *timer;
    int direction;
    scan_t scan;
} MeterObject;

static int Meter_init(MeterObject *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"direction", "max_line", "timer", NULL};
    int direction;
    Py_ssize_t max_line;
    PyObject *timer;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "inO!:Meter", kwlist, &direction, &max_line,
                                     &TimerType, &timer))
        return -1;
    if (direction != 0 && direction != 1) {
        PyErr_SetString(PyExc_ValueError, "direction must be 0 or 1");
        return -1;
    }
    if (scan_init(&self->scan, max_line) < 0)
        return -1;
    self->direction = direction;
    Py_INCREF(timer);
    Py_XSETREF(self->timer, (TimerObject *)timer);
    return 0;
}

static void Meter_dealloc(MeterObject *self)
{
    Py_XDECREF(self->timer);
    PyMem_Free(self->scan.held);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* The work of account(): scan, count and time n bytes; *lines gets the lines ended (LFs). */
static int meter_account(MeterObject *self, const unsigned char *p, Py_ssize_t n, int64_t *lines)
{
    int64_t c[4] = {0, 0, 0, 0}, now;
    int skipping = self->scan.skipping;
    if (scan_feed(&self->scan, p, n, c) < 0) {
        PyErr_NoMemory();
        return -1;
    }
    TimerObject *t = self->timer;
    if (w_record(t->writer, self->direction, n, c, &now) < 0)
        return -1;
    if (now &&
        (self->direction == 0 ? t_sent(t, now, c[0]) : t_answered(t, now, c[1] + c[2])) < 0)
        return -1;
    /* Lines ended (LFs), well-formed or not: a Foo server answers each one. An
       over-long line was counted when it overflowed, before its LF: count the LFs. */
    if (skipping || self->scan.skipping) {
        int64_t ended = 0;
        const unsigned char *q = p, *end = p + n;
        while ((q = memchr(q, '\n', (size_t)(end - q))) != NULL) {
            ended++;
            q++;
        }
        *lines = ended;
    } else {
        *lines = c[0] + c[1] + c[2] + c[3];
    }
    return 0;
}

static int meter_ready(MeterObject *self)
{
    if (self->timer == NULL || t_ready(self->timer) < 0) {
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_ValueError, "Meter is not initialised");
        return -1;
    }
    return 0;
}

static PyObject *Meter_account(MeterObject *self, PyObject *data)
{
    bytes_arg a;
    int64_t lines;
    if (meter_ready(self) < 0 || bytes_arg_get(data, &a) < 0)
        return NULL;
    int rc = meter_account(self, a.p, a.n, &lines);
    bytes_arg_release(&a);
    return rc < 0 ? NULL : PyLong_FromLongLong(lines);
}

static PyObject *Meter_pending(MeterObject *self, void *closure)
{
    return PyLong_FromSsize_t(self->scan.held_len);
}

static PyObject *Meter_mid_line(MeterObject *self, void *closure)
{
    return PyBool_FromLong(self->scan.held_len || self->scan.skipping);
}

static PyMethodDef Meter_methods[] = {
    {"account", (PyCFunction)Meter_account, METH_O,
     "Scan, count and time one forwarded chunk; the lines it ended (LFs), well-formed or not."},
    {NULL}};

static PyGetSetDef Meter_getset[] = {
    {"pending", (getter)Meter_pending, NULL, "Bytes of an unfinished line held now.", NULL},
    {"mid_line", (getter)Meter_mid_line, NULL,
     "Has the stream an unfinished line: held, or over-long and skipped to its LF?", NULL},
    {NULL}};

static PyTypeObject MeterType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "geventproxy._accel.Meter",
    .tp_basicsize = sizeof(MeterObject),
    .tp_dealloc = (destructor)Meter_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "One direction's per-chunk accounting: scan, count, time.",
    .tp_methods = Meter_methods,
    .tp_getset = Meter_getset,
    .tp_init = (initproc)Meter_init,
    .tp_new = PyType_GenericNew,
};

/* ------------------------------------------------------------------------ */
/* copy(): relay._copy with the socket calls and the accounting in C.        */

/* One buffer per thread: a chunk lives in it from its recv to the end of its
 * accounting, and only C runs in between (no Python code, so no greenlet
 * switch); a partial send is copied out first and finished from that copy,
 * in Python (Direction.finish_send). */
static _Thread_local unsigned char *copy_buf;
static _Thread_local Py_ssize_t copy_buf_size;
static PyObject *owed_name;   /* "owed", interned */

/* The errnos of relay._RESETS: ConnectionResetError, BrokenPipeError (EPIPE,
 * ESHUTDOWN), ConnectionAbortedError, TimeoutError. */
static int is_reset(int err)
{
    return err == ECONNRESET || err == EPIPE || err == ESHUTDOWN || err == ECONNABORTED ||
           err == ETIMEDOUT;
}

/* list[i] += d, for the Tally's two-item lists of ints. */
static int list_add(PyObject *list, Py_ssize_t i, int64_t d)
{
    if (!PyList_CheckExact(list) || PyList_GET_SIZE(list) != 2) {
        PyErr_SetString(PyExc_TypeError, "expected a list of two counters");
        return -1;
    }
    long long v = PyLong_AsLongLong(PyList_GET_ITEM(list, i));
    if (v == -1 && PyErr_Occurred())
        return -1;
    long long sum;
    if (__builtin_add_overflow(v, d, &sum)) {
        PyErr_SetString(PyExc_OverflowError, "counter overflow");
        return -1;
    }
    PyObject *obj = PyLong_FromLongLong(sum);
    if (obj == NULL)
        return -1;
    PyObject *old = PyList_GET_ITEM(list, i);
    PyList_SET_ITEM(list, i, obj);
    Py_DECREF(old);
    return 0;
}

/* lines[1] >= tally.owed: the client has half-closed and has every reply (1), or not (0). */
static int answered(PyObject *tally, PyObject *lines)
{
    if (!PyList_CheckExact(lines) || PyList_GET_SIZE(lines) != 2) {
        PyErr_SetString(PyExc_TypeError, "expected a list of two counters");
        return -1;
    }
    PyObject *owed = PyObject_GetAttr(tally, owed_name);
    if (owed == NULL)
        return -1;
    int r = PyObject_RichCompareBool(PyList_GET_ITEM(lines, 1), owed, Py_GE);
    Py_DECREF(owed);
    return r;
}

static PyObject *outcome(PyObject *outcomes, int k)
{
    PyObject *o = PyTuple_GET_ITEM(outcomes, k);
    Py_INCREF(o);
    return o;
}

enum { O_EOF, O_SRC_ERROR, O_DST_ERROR, O_ERROR, O_PARKED, O_ANSWERED, O_COUNT };

/* The outcome of Direction.finish_send's exception, as relay._failed maps it; NULL to raise it. */
static PyObject *send_rest_failed(PyObject *outcomes)
{
    if (PyErr_ExceptionMatches(PyExc_ConnectionResetError) ||
        PyErr_ExceptionMatches(PyExc_BrokenPipeError) ||
        PyErr_ExceptionMatches(PyExc_ConnectionAbortedError) ||
        PyErr_ExceptionMatches(PyExc_TimeoutError)) {
        PyErr_Clear();
        return outcome(outcomes, O_DST_ERROR);
    }
    if (PyErr_ExceptionMatches(PyExc_OSError)) {
        PyErr_Clear();
        return outcome(outcomes, O_ERROR);
    }
    return NULL;
}

/* copy(wait, src_fd, dst_fd, meter, tally, direction, bufsize, send_rest, park, outcomes)
 *   wait       hub.switch: returns when the source's readability watcher fires
 *   tally      relay.Tally: its bytes and lines lists are added to, owed is read
 *   send_rest  send_rest(data, sent) finishes a partial send (Direction.finish_send)
 *   park       the exception (relay.Park) that asks the loop to return PARKED
 *   outcomes   (eof, source error, destination error, "error", PARKED, ANSWERED)
 * The steps, their order and the outcomes are relay._copy's. The descriptors
 * are read once: the sockets must stay open until the loop has returned (the
 * connection closes them only after both of its loops have ended). */
static PyObject *accel_copy(PyObject *module, PyObject *args)
{
    PyObject *wait, *meter_obj, *tally, *send_rest, *park, *outcomes;
    int src, dst, direction;
    Py_ssize_t bufsize;
    if (!PyArg_ParseTuple(args, "OiiO!OinOOO!:copy", &wait, &src, &dst, &MeterType, &meter_obj,
                          &tally, &direction, &bufsize, &send_rest, &park, &PyTuple_Type,
                          &outcomes))
        return NULL;
    if (PyTuple_GET_SIZE(outcomes) != O_COUNT || bufsize < 1 || (direction != 0 && direction != 1)) {
        PyErr_SetString(PyExc_ValueError, "copy: bad outcomes, bufsize or direction");
        return NULL;
    }
    MeterObject *meter = (MeterObject *)meter_obj;
    PyObject *moved = PyObject_GetAttrString(tally, "bytes");
    PyObject *lines = moved == NULL ? NULL : PyObject_GetAttrString(tally, "lines");
    PyObject *result = NULL;
    if (lines == NULL)
        goto done;
    if (bufsize > copy_buf_size) {
        unsigned char *grown = PyMem_Realloc(copy_buf, (size_t)bufsize);
        if (grown == NULL) {
            PyErr_NoMemory();
            goto done;
        }
        copy_buf = grown;
        copy_buf_size = bufsize;
    }
    for (;;) {
        PyObject *r = PyObject_CallNoArgs(wait);   /* resumed when src is readable */
        if (r == NULL) {
            if (PyErr_ExceptionMatches(park)) {
                PyErr_Clear();
                result = outcome(outcomes, O_PARKED);
            }
            goto done;
        }
        Py_DECREF(r);
        ssize_t n;
        while ((n = recv(src, copy_buf, (size_t)bufsize, 0)) < 0 && errno == EINTR)
            if (PyErr_CheckSignals() < 0)
                goto done;
        if (n < 0) {
            if (errno == EAGAIN || errno == EWOULDBLOCK)
                continue;
            result = outcome(outcomes, is_reset(errno) ? O_SRC_ERROR : O_ERROR);
            goto done;
        }
        if (n == 0) {
            shutdown(dst, SHUT_WR);   /* the peer sees the half-close; an error does not matter */
            result = outcome(outcomes, O_EOF);
            goto done;
        }
        /* Forward first, at once (no retry on EINTR: a signal handler must not
         * run while the chunk is only in copy_buf; a short send is finished below). */
        ssize_t sent = send(dst, copy_buf, (size_t)n, MSG_NOSIGNAL);
        if (sent < 0) {
            if (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR) {
                result = outcome(outcomes, is_reset(errno) ? O_DST_ERROR : O_ERROR);
                goto done;
            }
            sent = 0;
        }
        /* What is left to send is copied out before anything that could run Python. */
        PyObject *rest = NULL;
        if (sent < n && (rest = PyBytes_FromStringAndSize((const char *)copy_buf, n)) == NULL)
            goto done;
        /* Then count, before finishing a partial send (see relay._copy). */
        int64_t ended;
        if (meter_ready(meter) < 0 || list_add(moved, direction, n) < 0 ||
            meter_account(meter, copy_buf, n, &ended) < 0 ||
            list_add(lines, direction, ended) < 0) {
            Py_XDECREF(rest);
            goto done;
        }
        if (rest != NULL) {   /* wait for writability, in Python */
            r = PyObject_CallFunction(send_rest, "Nn", rest, (Py_ssize_t)sent);
            if (r == NULL) {
                result = send_rest_failed(outcomes);
                goto done;
            }
            Py_DECREF(r);
        }
        int k = answered(tally, lines);
        if (k < 0)
            goto done;
        if (k) {
            result = outcome(outcomes, O_ANSWERED);
            goto done;
        }
    }
done:
    Py_XDECREF(moved);
    Py_XDECREF(lines);
    return result;
}

/* ------------------------------------------------------------------------ */

static PyMethodDef module_methods[] = {
    {"classify", (PyCFunction)accel_classify, METH_O,
     "REQ (0), ACK (1), NAK (2) or INVALID (3) for one complete line (LF included)."},
    {"count_block", (PyCFunction)accel_count_block, METH_VARARGS,
     "The (req, ack, nak, invalid) counts of a run of complete lines."},
    {"copy", (PyCFunction)accel_copy, METH_VARARGS,
     "relay._copy with recv, send and the accounting in C; returns the outcome."},
    {NULL}};

static struct PyModuleDef accel_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "geventproxy._accel",
    .m_doc = "The copy loop's per-chunk work, compiled; see geventproxy/accel.py.",
    .m_size = -1,
    .m_methods = module_methods,
};

PyMODINIT_FUNC PyInit__accel(void)
{
    PyTypeObject *types[] = {&ScannerType, &WriterType, &TimerType, &MeterType};
    const char *names[] = {"LineScanner", "StatsWriter", "RequestTimer", "Meter"};
    owed_name = PyUnicode_InternFromString("owed");
    if (owed_name == NULL)
        return NULL;
    PyObject *m = PyModule_Create(&accel_module);
    if (m == NULL)
        return NULL;
    for (size_t k = 0; k < sizeof types / sizeof types[0]; k++) {
        if (PyType_Ready(types[k]) < 0)
            goto fail;
        Py_INCREF(types[k]);
        if (PyModule_AddObject(m, names[k], (PyObject *)types[k]) < 0) {
            Py_DECREF(types[k]);
            goto fail;
        }
    }
    if (PyModule_AddIntConstant(m, "DEFAULT_MAX_LINE", DEFAULT_MAX_LINE) < 0 ||
        PyModule_AddIntConstant(m, "INTERFACE", INTERFACE) < 0)
        goto fail;
    return m;
fail:
    Py_DECREF(m);
    return NULL;
}
