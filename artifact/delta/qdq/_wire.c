/* Protobuf bytes from a field list, in C: what wire.py's Python writer does, faster.
 *
 * The canonical QDQ builder (build.py) describes the model it builds as a list of
 * fields and this writes them: the edge agent rebuilds a small model's whole graph
 * in tens of microseconds instead of a millisecond of Python calls. wire.py's
 * `write_python` is the reference; tests check both give the same bytes.
 *
 * A field is a tuple (kind, tag, value); tag is the field's key (number << 3 | wire
 * type), written as a varint:
 *   (0, tag, str | bytes)   length-delimited: a string (UTF-8) or bytes
 *   (1, tag, int)           varint (a negative int as its 64-bit two's complement)
 *   (2, tag, [fields])      length-delimited: a nested message
 *   (3, tag, n)             length-delimited: n zero bytes
 *   (4, tag, [str])         one length-delimited field a string
 *   (5, 0, bytes)           a serialized NodeProto's fields after its leading inputs
 *                           and outputs (fields 1 and 2), written as they are
 *
 * Python API (artifact.delta.qdq.wire wraps it):
 *   write(fields) -> bytes
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <stdint.h>
#include <string.h>

#define MAX_DEPTH 8

enum { K_BYTES = 0, K_VARINT = 1, K_MESSAGE = 2, K_ZEROS = 3, K_STRINGS = 4, K_TAIL = 5 };

static size_t varint_size(uint64_t v) {
    size_t n = 1;
    while (v >= 0x80) {
        v >>= 7;
        n++;
    }
    return n;
}

static uint8_t *put_varint(uint8_t *p, uint64_t v) {
    while (v >= 0x80) {
        *p++ = (uint8_t)(v | 0x80);
        v >>= 7;
    }
    *p++ = (uint8_t)v;
    return p;
}

/* A str's UTF-8 or a bytes object's contents; 0 on success. */
static int text_of(PyObject *o, const char **data, Py_ssize_t *n) {
    if (PyUnicode_Check(o)) {
        *data = PyUnicode_AsUTF8AndSize(o, n);
        return *data ? 0 : -1;
    }
    if (PyBytes_Check(o)) {
        *data = PyBytes_AS_STRING(o);
        *n = PyBytes_GET_SIZE(o);
        return 0;
    }
    PyErr_SetString(PyExc_TypeError, "a length-delimited field's value must be str or bytes");
    return -1;
}

/* A NodeProto's bytes after its leading fields 1 and 2 (length-delimited). */
static int tail_of(PyObject *o, const char **data, Py_ssize_t *n) {
    if (!PyBytes_Check(o)) {
        PyErr_SetString(PyExc_TypeError, "a node tail's value must be bytes");
        return -1;
    }
    const uint8_t *b = (const uint8_t *)PyBytes_AS_STRING(o);
    size_t len = (size_t)PyBytes_GET_SIZE(o), pos = 0;
    while (pos < len) {
        size_t at = pos;
        uint64_t key = 0, size = 0;
        int shift = 0;
        while (pos < len && shift < 64) {
            uint8_t c = b[pos++];
            key |= (uint64_t)(c & 0x7F) << shift;
            shift += 7;
            if (!(c & 0x80)) break;
        }
        if ((key != 0x0A && key != 0x12) || pos >= len) {
            pos = at;
            break;
        }
        shift = 0;
        uint8_t c = 0x80;
        while (pos < len && shift < 64) {
            c = b[pos++];
            size |= (uint64_t)(c & 0x7F) << shift;
            shift += 7;
            if (!(c & 0x80)) break;
        }
        if ((c & 0x80) || size > len - pos) {
            PyErr_SetString(PyExc_ValueError, "a node's serialized inputs or outputs are cut short");
            return -1;
        }
        pos += (size_t)size;
    }
    *data = (const char *)b + pos;
    *n = (Py_ssize_t)(len - pos);
    return 0;
}

static int unpack_field(PyObject *f, long *kind, uint64_t *tag, PyObject **value) {
    if (!PyTuple_Check(f) || PyTuple_GET_SIZE(f) != 3) {
        PyErr_SetString(PyExc_TypeError, "a field must be a (kind, tag, value) tuple");
        return -1;
    }
    PyObject *k = PyTuple_GET_ITEM(f, 0), *t = PyTuple_GET_ITEM(f, 1);
    *value = PyTuple_GET_ITEM(f, 2);
    /* ints only: anything with __index__ could run Python code between the passes */
    if (!PyLong_Check(k) || !PyLong_Check(t)) {
        PyErr_SetString(PyExc_TypeError, "a field's kind and tag must be ints");
        return -1;
    }
    *kind = PyLong_AsLong(k);
    *tag = PyLong_AsUnsignedLongLong(t);
    if (PyErr_Occurred()) return -1;
    if (*kind < K_BYTES || *kind > K_TAIL) {
        PyErr_Format(PyExc_ValueError, "unknown field kind %ld", *kind);
        return -1;
    }
    return 0;
}

static int as_int64(PyObject *o, uint64_t *out) {
    if (!PyLong_Check(o)) {
        PyErr_SetString(PyExc_TypeError, "a varint field's value must be an int");
        return -1;
    }
    int overflow = 0;
    long long v = PyLong_AsLongLongAndOverflow(o, &overflow);
    if (v == -1 && PyErr_Occurred()) return -1;
    if (overflow) {
        PyErr_SetString(PyExc_OverflowError, "a varint field's value does not fit int64");
        return -1;
    }
    *out = (uint64_t)v;
    return 0;
}

/* The bytes `fields` take; each nested message's size is stored in `sizes` (in
 * visiting order) for the writing pass. -1 on error. */
typedef struct {
    size_t *v;
    size_t n, cap;
} Sizes;

static int sizes_push(Sizes *s, size_t v) {
    if (s->n == s->cap) {
        size_t cap = s->cap ? s->cap * 2 : 64;
        size_t *grown = PyMem_Realloc(s->v, cap * sizeof(size_t));
        if (!grown) {
            PyErr_NoMemory();
            return -1;
        }
        s->v = grown;
        s->cap = cap;
    }
    s->v[s->n++] = v;
    return 0;
}

static Py_ssize_t measure(PyObject *fields, Sizes *s, int depth) {
    if (depth > MAX_DEPTH) {
        PyErr_SetString(PyExc_ValueError, "messages nested too deep");
        return -1;
    }
    if (!PyList_Check(fields)) {
        PyErr_SetString(PyExc_TypeError, "a message's fields must be a list");
        return -1;
    }
    size_t total = 0;
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(fields); i++) {
        long kind;
        uint64_t tag;
        PyObject *value;
        if (unpack_field(PyList_GET_ITEM(fields, i), &kind, &tag, &value)) return -1;
        const char *data;
        Py_ssize_t n;
        uint64_t v;
        switch (kind) {
        case K_BYTES:
            if (text_of(value, &data, &n)) return -1;
            total += varint_size(tag) + varint_size((uint64_t)n) + (size_t)n;
            break;
        case K_VARINT:
            if (as_int64(value, &v)) return -1;
            total += varint_size(tag) + varint_size(v);
            break;
        case K_MESSAGE: {
            size_t slot = s->n;
            if (sizes_push(s, 0)) return -1;
            Py_ssize_t inner = measure(value, s, depth + 1);
            if (inner < 0) return -1;
            s->v[slot] = (size_t)inner;
            total += varint_size(tag) + varint_size((uint64_t)inner) + (size_t)inner;
            break;
        }
        case K_ZEROS:
            if (!PyLong_Check(value)) {
                PyErr_SetString(PyExc_TypeError, "a zero-filled field's length must be an int");
                return -1;
            }
            n = PyLong_AsSsize_t(value);
            if (n < 0) {
                if (!PyErr_Occurred())
                    PyErr_SetString(PyExc_ValueError, "a negative number of zero bytes");
                return -1;
            }
            total += varint_size(tag) + varint_size((uint64_t)n) + (size_t)n;
            break;
        case K_STRINGS: {
            if (!PyList_Check(value) && !PyTuple_Check(value)) {
                PyErr_SetString(PyExc_TypeError, "repeated strings must be a list or tuple");
                return -1;
            }
            Py_ssize_t count = PySequence_Fast_GET_SIZE(value);
            for (Py_ssize_t k = 0; k < count; k++) {
                if (text_of(PySequence_Fast_GET_ITEM(value, k), &data, &n)) return -1;
                total += varint_size(tag) + varint_size((uint64_t)n) + (size_t)n;
            }
            break;
        }
        case K_TAIL:
            if (tail_of(value, &data, &n)) return -1;
            total += (size_t)n;
            break;
        }
        if (total > (size_t)PY_SSIZE_T_MAX / 2) {
            PyErr_SetString(PyExc_OverflowError, "the message is too large");
            return -1;
        }
    }
    return (Py_ssize_t)total;
}

static uint8_t *put_bytes(uint8_t *p, uint64_t tag, const char *data, Py_ssize_t n) {
    p = put_varint(p, tag);
    p = put_varint(p, (uint64_t)n);
    memcpy(p, data, (size_t)n);
    return p + n;
}

/* The second pass: every check already passed in `measure`. */
static uint8_t *emit(PyObject *fields, const Sizes *s, size_t *next, uint8_t *p) {
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(fields); i++) {
        PyObject *f = PyList_GET_ITEM(fields, i);
        long kind = PyLong_AsLong(PyTuple_GET_ITEM(f, 0));
        uint64_t tag = PyLong_AsUnsignedLongLong(PyTuple_GET_ITEM(f, 1));
        PyObject *value = PyTuple_GET_ITEM(f, 2);
        const char *data;
        Py_ssize_t n;
        uint64_t v;
        switch (kind) {
        case K_BYTES:
            text_of(value, &data, &n);
            p = put_bytes(p, tag, data, n);
            break;
        case K_VARINT:
            as_int64(value, &v);
            p = put_varint(put_varint(p, tag), v);
            break;
        case K_MESSAGE:
            p = put_varint(p, tag);
            p = put_varint(p, s->v[(*next)++]);
            p = emit(value, s, next, p);
            break;
        case K_ZEROS:
            n = PyLong_AsSsize_t(value);
            p = put_varint(put_varint(p, tag), (uint64_t)n);
            memset(p, 0, (size_t)n);
            p += n;
            break;
        case K_STRINGS:
            for (Py_ssize_t k = 0; k < PySequence_Fast_GET_SIZE(value); k++) {
                text_of(PySequence_Fast_GET_ITEM(value, k), &data, &n);
                p = put_bytes(p, tag, data, n);
            }
            break;
        case K_TAIL:
            tail_of(value, &data, &n);
            memcpy(p, data, (size_t)n);
            p += n;
            break;
        }
    }
    return p;
}

PyDoc_STRVAR(write_doc, "write(fields) -> bytes\n\n"
                        "The protobuf bytes of a field list (see wire.py).");

static PyObject *py_write(PyObject *self, PyObject *fields) {
    (void)self;
    Sizes s = {NULL, 0, 0};
    Py_ssize_t total = measure(fields, &s, 0);
    PyObject *out = NULL;
    if (total >= 0) {
        out = PyBytes_FromStringAndSize(NULL, total);
        if (out) {
            size_t next = 0;
            uint8_t *start = (uint8_t *)PyBytes_AS_STRING(out);
            uint8_t *end = emit(fields, &s, &next, start);
            if (end != start + total) { /* cannot happen: both passes read the same fields */
                Py_CLEAR(out);
                PyErr_SetString(PyExc_SystemError, "the field list changed while it was written");
            }
        }
    }
    PyMem_Free(s.v);
    return out;
}

static PyMethodDef methods[] = {
    {"write", py_write, METH_O, write_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_wire", "Protobuf bytes from a field list (see wire.py).",
    -1, methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__wire(void) { return PyModule_Create(&module); }
