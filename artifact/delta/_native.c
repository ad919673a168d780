/* The delta decoder's compiled fast path: a RECORDS delta's table and blocks, in C.
 *
 * It mirrors the Python decoder (decode.py, table.py, codecs.py, frames.py,
 * onnx_wire.py) bit for bit on the cases it knows, and answers None on everything
 * else: a feature it does not implement (casts between element types, float16 or
 * bfloat16 arithmetic, int64 quantization), a damaged or crafted delta, or memory it
 * cannot get (last_decline() says which, and where). The caller then runs the Python decoder, which is the reference: it
 * decodes what this one does not and says precisely what is wrong with a bad delta.
 * The caller also checks the rebuilt bytes against the target sha256 before using
 * them, so a mistake here costs speed, never a wrong model.
 *
 * Every computation is the one numpy makes: IEEE float32/float64 division,
 * multiplication and round-half-to-even, no contraction into fused multiply-adds
 * (built with -ffp-contract=off), integer wrap-around done on unsigned types.
 *
 * Python API (artifact.delta.native wraps it):
 *   ranges(old, table, target_size) -> (old_cuts, covered) | None
 *   decode(old, table, skeleton, chunks, target_size, decompress) -> bytes | None
 *   unpack_words(payload, count, dtype, layout, predicted, decompress) -> bytes | None
 *   last_decline() -> (reason, line) | None
 *
 * Layout: errors and memory; element types; the old file's tensors (onnx_wire); the
 * table; frames; predictions (codecs); blocks (decode); the Python interface.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <float.h>
#include <math.h>
#include <setjmp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* ---- errors and memory ------------------------------------------------------ */

enum { FAIL_UNSUPPORTED = 1, FAIL_CORRUPT = 2, FAIL_MEMORY = 3 };

enum { STORAGE_RAW = 0, STORAGE_VARINT = 1 };

/* A tensor payload in the old file (codecs.OldRef). */
typedef struct {
    uint64_t offset, nbytes, dtype, storage;
} OldRef;

typedef struct {
    PyObject *tuple; /* the CHUNK records' data, bytes-like objects */
    Py_ssize_t next;
    Py_buffer current;
    int held;
    size_t pos;
} Chunks;

typedef struct {
    jmp_buf jump;
    void **owned;
    size_t n_owned, cap_owned;
    PyObject *decompress; /* frames.decompress_exact */
    Chunks chunks;
    uint64_t *scratch[8]; /* block-sized working arrays, reused from block to block */
    size_t scratch_words[8];
    OldRef varints_of; /* the old varint tensor last decoded, and its words */
    uint64_t *varints;
    uint64_t n_varints;
} Ctx;

enum { S_PREDICTED, S_WORDS, S_SOURCE, S_ORDERED, S_ORDER, S_GAPS, S_VALUES, S_VALUES_X };

/* Working arrays kept from one call to the next (up to 1 MiB each): fresh ones cost a
 * page fault per 4 KiB, a third of a small model's decode. Calls hold the GIL (the zstd
 * callback needs it), so one set serves them all. */
#define KEPT_SCRATCH_WORDS ((size_t)1 << 17)
static uint64_t *kept_scratch[8];
static size_t kept_scratch_words[8];

static Ctx *ctx_new(void) {
    Ctx *c = calloc(1, sizeof(Ctx));
    if (!c) return NULL;
    for (int i = 0; i < 8; i++) {
        c->scratch[i] = kept_scratch[i];
        c->scratch_words[i] = kept_scratch_words[i];
        kept_scratch[i] = NULL;
        kept_scratch_words[i] = 0;
    }
    return c;
}

static void ctx_free(Ctx *c) {
    for (size_t i = 0; i < c->n_owned; i++) free(c->owned[i]);
    free(c->owned);
    for (int i = 0; i < 8; i++) {
        if (c->scratch_words[i] <= KEPT_SCRATCH_WORDS && !kept_scratch[i]) {
            kept_scratch[i] = c->scratch[i];
            kept_scratch_words[i] = c->scratch_words[i];
        } else {
            free(c->scratch[i]);
        }
    }
    free(c);
}

/* Why and where the last call declined (last_decline(): for logs and tests). */
static int declined_why, declined_line;

static void fail_at(Ctx *c, int why, int line) {
    declined_why = why;
    declined_line = line;
    longjmp(c->jump, why);
}
#define fail(c, why) fail_at((c), (why), __LINE__)

/* Memory freed when the call ends (zeroed: a block's padding is zero words). */
static void *take_mem(Ctx *c, size_t count, size_t size) {
    if (size && count > SIZE_MAX / size) fail(c, FAIL_MEMORY);
    if (c->n_owned == c->cap_owned) {
        size_t cap = c->cap_owned ? 2 * c->cap_owned : 64;
        void **grown = realloc(c->owned, cap * sizeof(void *));
        if (!grown) fail(c, FAIL_MEMORY);
        c->owned = grown;
        c->cap_owned = cap;
    }
    void *p = calloc(count ? count : 1, size ? size : 1);
    if (!p) fail(c, FAIL_MEMORY);
    c->owned[c->n_owned++] = p;
    return p;
}

/* Working array ``slot`` of at least ``n`` words; not zeroed (its users fill it). */
static uint64_t *scratch(Ctx *c, int slot, uint64_t n) {
    if (n > c->scratch_words[slot]) {
        if (n > SIZE_MAX / sizeof(uint64_t)) fail(c, FAIL_MEMORY);
        free(c->scratch[slot]);
        c->scratch[slot] = malloc((size_t)n * sizeof(uint64_t));
        c->scratch_words[slot] = c->scratch[slot] ? (size_t)n : 0;
        if (!c->scratch[slot]) fail(c, FAIL_MEMORY);
    }
    return c->scratch[slot];
}

/* ---- element types (dtypes.py) ---------------------------------------------- */

enum { K_FLOAT, K_BF16, K_SIGNED, K_UNSIGNED, K_OPAQUE };

typedef struct {
    int kind, width, lanes;
} EType;

static EType etype_of(uint64_t code) {
    switch (code) {
    case 1: return (EType){K_FLOAT, 4, 1};
    case 2: return (EType){K_UNSIGNED, 1, 1};
    case 3: return (EType){K_SIGNED, 1, 1};
    case 4: return (EType){K_UNSIGNED, 2, 1};
    case 5: return (EType){K_SIGNED, 2, 1};
    case 6: return (EType){K_SIGNED, 4, 1};
    case 7: return (EType){K_SIGNED, 8, 1};
    case 9: return (EType){K_UNSIGNED, 1, 1};
    case 10: return (EType){K_FLOAT, 2, 1};
    case 11: return (EType){K_FLOAT, 8, 1};
    case 12: return (EType){K_UNSIGNED, 4, 1};
    case 13: return (EType){K_UNSIGNED, 8, 1};
    case 14: return (EType){K_FLOAT, 4, 2};
    case 15: return (EType){K_FLOAT, 8, 2};
    case 16: return (EType){K_BF16, 2, 1};
    default: return (EType){K_OPAQUE, 1, 1};
    }
}

static int is_integer(EType t) { return t.kind == K_SIGNED || t.kind == K_UNSIGNED; }
static int is_float(EType t) { return t.kind == K_FLOAT || t.kind == K_BF16; }

static uint64_t width_mask(int width) {
    return width == 8 ? UINT64_MAX : (((uint64_t)1 << (8 * width)) - 1);
}

/* A word's value as an integer of its type (sign-extended for signed types). */
static int64_t word_as_int(uint64_t w, EType t) {
    if (t.kind != K_SIGNED || t.width == 8) return (int64_t)w;
    int shift = 64 - 8 * t.width;
    return (int64_t)(w << shift) >> shift;
}

static uint64_t load_word(const uint8_t *p, int width) {
    uint64_t w = 0;
    for (int i = 0; i < width; i++) w |= (uint64_t)p[i] << (8 * i);
    return w;
}

/* ``n`` little-endian words of ``width`` bytes to uint64 and back, one loop per width
 * (a loop over bytes inside the loop over words costs more than the rest of a block). */
static void load_words(const uint8_t *p, uint64_t n, int width, uint64_t *out) {
    switch (width) {
    case 1:
        for (uint64_t i = 0; i < n; i++) out[i] = p[i];
        return;
    case 2:
        for (uint64_t i = 0; i < n; i++) out[i] = (uint64_t)p[2 * i] | (uint64_t)p[2 * i + 1] << 8;
        return;
    case 4:
        for (uint64_t i = 0; i < n; i++)
            out[i] = (uint64_t)p[4 * i] | (uint64_t)p[4 * i + 1] << 8 | (uint64_t)p[4 * i + 2] << 16 |
                     (uint64_t)p[4 * i + 3] << 24;
        return;
    default:
        for (uint64_t i = 0; i < n; i++) out[i] = load_word(p + 8 * i, 8);
    }
}

static void store_words(const uint64_t *w, uint64_t n, int width, uint8_t *dest) {
    switch (width) {
    case 1:
        for (uint64_t i = 0; i < n; i++) dest[i] = (uint8_t)w[i];
        return;
    case 2:
        for (uint64_t i = 0; i < n; i++) {
            dest[2 * i] = (uint8_t)w[i];
            dest[2 * i + 1] = (uint8_t)(w[i] >> 8);
        }
        return;
    case 4:
        for (uint64_t i = 0; i < n; i++) {
            dest[4 * i] = (uint8_t)w[i];
            dest[4 * i + 1] = (uint8_t)(w[i] >> 8);
            dest[4 * i + 2] = (uint8_t)(w[i] >> 16);
            dest[4 * i + 3] = (uint8_t)(w[i] >> 24);
        }
        return;
    default:
        for (uint64_t i = 0; i < n; i++)
            for (int k = 0; k < 8; k++) dest[8 * i + k] = (uint8_t)(w[i] >> (8 * k));
    }
}

static float word_as_f32(uint64_t w) {
    uint32_t bits = (uint32_t)w;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

static uint64_t f32_as_word(float f) {
    uint32_t bits;
    memcpy(&bits, &f, 4);
    return bits;
}

/* The float32 at index ``i`` of little-endian bytes ``p``. */
static inline float f32_at(const uint8_t *p, uint64_t i) {
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
    float v;
    memcpy(&v, p + 4 * i, 4);
    return v;
#else
    return word_as_f32(load_word(p + 4 * i, 4));
#endif
}

static double word_as_f64(uint64_t w) {
    double d;
    memcpy(&d, &w, 8);
    return d;
}

/* ---- the old file's tensors (onnx_wire.py) ---------------------------------- */



typedef struct {
    OldRef *refs;
    size_t count, cap;
} OldList;

typedef struct {
    const uint8_t *buf;
    size_t end;
    int bad; /* a WireError: the file yields no tensors */
} Wire;

static uint64_t wire_varint(Wire *w, size_t *pos, size_t end) {
    uint64_t result = 0;
    int shift = 0;
    for (;;) {
        if (*pos >= end) { w->bad = 1; return 0; }
        uint8_t byte = w->buf[(*pos)++];
        /* over 64 bits: Python's ints hold it, ours do not; treated as damage (the
         * tensor list then differs, the table does not fit it, and Python decides) */
        if (shift == 63 && (byte & 0x7E)) { w->bad = 1; return 0; }
        result |= (uint64_t)(byte & 0x7F) << shift;
        if (byte < 0x80) return result;
        shift += 7;
        if (shift >= 70) { w->bad = 1; return 0; }
    }
}

typedef struct {
    uint64_t number, wire, value;
    size_t start, stop;
} Field;

/* The next field of the message ending at ``end``; 0 at its end or on a WireError. */
static int next_field(Wire *w, size_t *pos, size_t end, Field *f) {
    if (*pos >= end || w->bad) return 0;
    uint64_t key = wire_varint(w, pos, end);
    if (w->bad) return 0;
    f->number = key >> 3;
    f->wire = key & 7;
    if (f->number == 0) { w->bad = 1; return 0; }
    f->start = *pos;
    f->value = 0;
    if (f->wire == 0) {
        f->value = wire_varint(w, pos, end);
    } else if (f->wire == 1) {
        *pos += 8;
    } else if (f->wire == 5) {
        *pos += 4;
    } else if (f->wire == 2) {
        f->value = wire_varint(w, pos, end);
        f->start = *pos;
        if (!w->bad && f->value > end - *pos) { w->bad = 1; return 0; }
        *pos += f->value;
    } else {
        w->bad = 1;
    }
    if (w->bad || *pos > end) { w->bad = 1; return 0; }
    f->stop = *pos;
    return 1;
}

static int in_set(uint64_t v, const int *set, int n) {
    for (int i = 0; i < n; i++)
        if ((uint64_t)set[i] == v) return 1;
    return 0;
}

static const int FLOAT_DATA_TYPES[] = {1, 14}, DOUBLE_DATA_TYPES[] = {11, 15};
static const int INT32_DATA_TYPES[] = {2, 3, 4, 5, 6, 9, 10, 16}, INT64_DATA_TYPES[] = {7},
                 UINT64_DATA_TYPES[] = {12, 13};

/* One initializer: 1 and ``ref`` filled when it is a tensor the codec codes (_tensor). */
static int wire_tensor(Wire *w, size_t start, size_t end, OldRef *ref) {
    uint64_t data_type = 0, elements = 1;
    int negative_dim = 0, zero_dim = 0, overflow = 0, payloads = 0;
    Field f, payload = {0};
    size_t pos = start;
    while (next_field(w, &pos, end, &f)) {
        if (f.number == 1 && (f.wire == 0 || f.wire == 2)) {
            size_t p = f.start;
            for (int first = 1; f.wire == 0 ? first : p < f.stop; first = 0) {
                uint64_t dim = f.wire == 0 ? f.value : wire_varint(w, &p, f.stop);
                if (w->bad) return 0;
                if ((int64_t)dim < 0) negative_dim = 1;
                else if (dim == 0) zero_dim = 1;
                else if (elements > UINT64_MAX / dim) overflow = 1;
                else elements *= dim;
            }
        } else if (f.number == 2 && f.wire == 0) {
            data_type = f.value;
        } else if (f.number == 3 || f.number == 6 || f.number == 13 ||
                   (f.number == 14 && f.value != 0)) {
            return 0; /* segmented, strings, external data: not ours to code */
        } else if (f.number == 9 || f.number == 4 || f.number == 10 || f.number == 5 ||
                   f.number == 7 || f.number == 11) {
            if (f.wire != 2) return 0; /* unpacked repeated values */
            payload = f;
            payloads++;
        }
    }
    if (w->bad || payloads != 1 || negative_dim) return 0;
    uint64_t nbytes = payload.stop - payload.start;
    if (nbytes == 0) return 0;
    if (zero_dim) elements = 0, overflow = 0;
    EType t = etype_of(data_type);
    ref->offset = payload.start;
    ref->nbytes = nbytes;
    ref->dtype = data_type;
    if (payload.number == 9) {
        ref->storage = STORAGE_RAW; /* a size that does not fit makes it opaque: same ref */
    } else if (payload.number == 4 || payload.number == 10) {
        const int *set = payload.number == 4 ? FLOAT_DATA_TYPES : DOUBLE_DATA_TYPES;
        if (!in_set(data_type, set, 2)) return 0;
        if (overflow || elements > UINT64_MAX / 16) return 0; /* cannot match nbytes */
        if (nbytes != elements * (uint64_t)t.lanes * (uint64_t)t.width) return 0;
        ref->storage = STORAGE_RAW;
    } else {
        int ok = payload.number == 5   ? in_set(data_type, INT32_DATA_TYPES, 8)
                 : payload.number == 7 ? in_set(data_type, INT64_DATA_TYPES, 1)
                                       : in_set(data_type, UINT64_DATA_TYPES, 2);
        if (!ok) return 0;
        ref->storage = STORAGE_VARINT;
    }
    return 1;
}

static void old_push(Ctx *c, OldList *list, OldRef ref) {
    if (list->count == list->cap) {
        size_t cap = list->cap ? 2 * list->cap : 64;
        OldRef *grown = take_mem(c, cap, sizeof(OldRef));
        if (list->count) memcpy(grown, list->refs, list->count * sizeof(OldRef));
        list->refs = grown;
        list->cap = cap;
    }
    list->refs[list->count++] = ref;
}

static int by_offset(const void *a, const void *b) {
    uint64_t x = ((const OldRef *)a)->offset, y = ((const OldRef *)b)->offset;
    return x < y ? -1 : x > y;
}

/* find_tensors: every inline initializer of the main graph, in file order. */
static OldList old_tensors(Ctx *c, const uint8_t *buf, size_t size) {
    OldList list = {0};
    Wire w = {buf, size, 0};
    size_t pos = 0;
    Field model;
    while (next_field(&w, &pos, size, &model)) {
        if (model.number != 7 || model.wire != 2) continue;
        size_t gpos = model.start;
        Field graph;
        while (next_field(&w, &gpos, model.stop, &graph)) {
            if (graph.number != 5 || graph.wire != 2) continue;
            OldRef ref;
            if (wire_tensor(&w, graph.start, graph.stop, &ref)) old_push(c, &list, ref);
            if (w.bad) break;
        }
        if (w.bad) break;
    }
    if (w.bad) return (OldList){0};
    if (list.count > 1) qsort(list.refs, list.count, sizeof(OldRef), by_offset);
    return list;
}

/* ---- the table (table.py) ----------------------------------------------------- */

#define BIG ((uint64_t)1 << 48)
#define MAX_ENTRIES ((uint64_t)1 << 24)
#define BLOCK_WORDS ((uint64_t)1 << 20)

enum { P_NONE, P_COPY, P_VALUES, P_QUANT, P_SCALE, P_PRODUCT, P_DECAY };
enum { T_NONE, T_XOR, T_SUB };
enum { L_INTERLEAVED, L_PLANES, L_PACK1, L_PACK2, L_PACK4, L_GROUPED, L_RICE, L_SPARSE };

typedef struct {
    uint64_t count, inner;
} Channels;

typedef struct {
    uint64_t out_offset, out_nbytes, dtype, storage, word_start, word_count;
    int predictor, transform, layout;
    uint64_t copy_from, payload_len;
    OldRef source; /* VALUES, QUANT, SCALE, DECAY */
    /* QUANT */
    int has_dequant, dq_has_zp;
    OldRef dq_scale, dq_zp;
    Channels dq_channels, channels; /* channels: QUANT and SCALE */
    uint64_t scale_index, zp_index, precision;
    int has_zp;
    int64_t lo, hi;
    /* SCALE */
    int symmetric;
    uint64_t levels;
    /* PRODUCT */
    uint64_t left, right;
    /* DECAY */
    uint64_t factor_bits, steps;
} Block;

typedef struct {
    const uint8_t *p;
    size_t n, pos;
} Reader;

static uint64_t rd_uint(Ctx *c, Reader *r, uint64_t limit) {
    uint64_t result = 0;
    int shift = 0;
    for (;;) {
        if (r->pos >= r->n) fail(c, FAIL_CORRUPT);
        uint8_t byte = r->p[r->pos++];
        if (shift == 63 && (byte & 0x7E)) fail(c, FAIL_CORRUPT); /* over 64 bits */
        result |= (uint64_t)(byte & 0x7F) << shift;
        if (byte < 0x80) break;
        shift += 7;
        if (shift >= 70) fail(c, FAIL_CORRUPT);
    }
    if (result > limit) fail(c, FAIL_CORRUPT);
    return result;
}

static int64_t unzigzag(uint64_t v) {
    return (v & 1) ? -(int64_t)(v >> 1) - 1 : (int64_t)(v >> 1);
}

/* Reader.sint(limit): a zigzag varint of at most 2 * limit + 1. */
static int64_t rd_sint(Ctx *c, Reader *r, uint64_t limit) {
    uint64_t raw_limit = limit >= ((uint64_t)1 << 62) ? UINT64_MAX : 2 * limit + 1;
    return unzigzag(rd_uint(c, r, raw_limit));
}

enum { COL_HEAD, COL_KIND, COL_POS, COL_SIZE, COL_REF, COL_EXPLICIT, COL_ARGS, COL_LEN, N_COLS };

typedef struct {
    Reader col[N_COLS];
    const OldList *old;
    int64_t last_ref, last_scale;
} Cols;

typedef struct {
    uint64_t offset, length;
} Range;

typedef struct {
    uint64_t skeleton_len;
    Range *cuts;
    size_t n_cuts;
    Block *params, *blocks;
    size_t n_params, n_blocks;
} Table;

static OldRef read_ref(Ctx *c, Cols *r) {
    uint64_t code = rd_uint(c, &r->col[COL_REF], BIG);
    if (code == 0) {
        Reader *e = &r->col[COL_EXPLICIT];
        OldRef ref;
        ref.offset = rd_uint(c, e, BIG);
        ref.nbytes = rd_uint(c, e, BIG);
        ref.dtype = rd_uint(c, e, (uint64_t)1 << 16);
        ref.storage = rd_uint(c, e, 1);
        return ref;
    }
    int64_t index = r->last_ref + unzigzag(code - 1);
    if (index < 0 || (uint64_t)index >= r->old->count) fail(c, FAIL_CORRUPT);
    r->last_ref = index;
    return r->old->refs[index];
}

static Channels read_channels(Ctx *c, Reader *r, const Channels *same) {
    uint64_t count = rd_uint(c, r, BIG);
    if (count == 0 && same) return *same;
    uint64_t inner = count ? rd_uint(c, r, BIG) : 0;
    if (count < 1 || inner < 1) fail(c, FAIL_CORRUPT);
    return (Channels){count, inner};
}

static int cmp_range(const void *a, const void *b) {
    const Range *x = a, *y = b;
    if (x->offset != y->offset) return x->offset < y->offset ? -1 : 1;
    return x->length < y->length ? -1 : x->length > y->length;
}

static void read_cuts(Ctx *c, Cols *r, Table *t) {
    Reader *head = &r->col[COL_HEAD];
    size_t cap = 16, n = 0;
    Range *cuts = take_mem(c, cap, sizeof(Range));
    uint64_t pos = 0;
    uint64_t runs = rd_uint(c, head, MAX_ENTRIES);
    for (uint64_t i = 0; i < runs; i++) {
        pos += rd_uint(c, head, MAX_ENTRIES);
        uint64_t take = rd_uint(c, head, MAX_ENTRIES);
        if (pos + take > r->old->count) fail(c, FAIL_CORRUPT);
        if (n + take > cap) {
            size_t grown_cap = 2 * (n + take);
            Range *grown = take_mem(c, grown_cap, sizeof(Range));
            memcpy(grown, cuts, n * sizeof(Range));
            cuts = grown;
            cap = grown_cap;
        }
        for (uint64_t k = 0; k < take; k++) {
            cuts[n++] = (Range){r->old->refs[pos + k].offset, r->old->refs[pos + k].nbytes};
        }
        pos += take;
    }
    uint64_t others = rd_uint(c, head, MAX_ENTRIES);
    int64_t prev = 0;
    for (uint64_t i = 0; i < others; i++) {
        int64_t offset = prev + rd_sint(c, head, BIG);
        uint64_t length = rd_uint(c, head, BIG);
        if (offset < 0) fail(c, FAIL_CORRUPT);
        if (n == cap) {
            size_t grown_cap = 2 * cap;
            Range *grown = take_mem(c, grown_cap, sizeof(Range));
            memcpy(grown, cuts, n * sizeof(Range));
            cuts = grown;
            cap = grown_cap;
        }
        cuts[n++] = (Range){(uint64_t)offset, length};
        prev = offset + (int64_t)length;
    }
    qsort(cuts, n, sizeof(Range), cmp_range);
    t->cuts = cuts;
    t->n_cuts = n;
}

static uint64_t read_copy(Ctx *c, Cols *r) {
    uint64_t code = rd_uint(c, &r->col[COL_REF], BIG);
    if (code == 0) return rd_uint(c, &r->col[COL_EXPLICIT], BIG);
    int64_t index = r->last_ref + unzigzag(code - 1);
    if (index < 0 || (uint64_t)index >= r->old->count) fail(c, FAIL_CORRUPT);
    r->last_ref = index;
    return r->old->refs[index].offset + rd_uint(c, &r->col[COL_ARGS], BIG);
}

static void read_block(Ctx *c, Cols *r, uint64_t prev_end, Block *b) {
    memset(b, 0, sizeof(*b));
    Reader *kind = &r->col[COL_KIND], *size = &r->col[COL_SIZE], *args = &r->col[COL_ARGS];
    b->dtype = rd_uint(c, kind, (uint64_t)1 << 16);
    b->storage = rd_uint(c, kind, 1);
    uint64_t code = rd_uint(c, kind, 8 * 3 * 8 - 1);
    b->predictor = (int)(code % 8);
    if (b->predictor > P_DECAY) fail(c, FAIL_CORRUPT);
    b->transform = (int)(code / 8 % 3);
    b->layout = (int)(code / 8 / 3);
    EType t = etype_of(b->dtype);
    if (b->predictor == P_COPY) {
        b->out_nbytes = rd_uint(c, size, BIG);
        b->copy_from = read_copy(c, r);
    } else {
        b->word_start = rd_uint(c, size, BIG);
        b->word_count = rd_uint(c, size, BIG);
        int64_t nbytes = (int64_t)(b->word_count * (uint64_t)t.width) + rd_sint(c, size, BIG);
        if (nbytes < 0) fail(c, FAIL_CORRUPT);
        b->out_nbytes = (uint64_t)nbytes;
    }
    int has_source = 0;
    if (b->predictor == P_VALUES) {
        b->source = read_ref(c, r);
        has_source = 1;
    } else if (b->predictor == P_QUANT) {
        b->source = read_ref(c, r);
        has_source = 1;
        uint64_t flag = rd_uint(c, args, 2);
        if (flag) {
            b->has_dequant = 1;
            b->dq_scale = read_ref(c, r);
            if (flag == 2) {
                b->dq_has_zp = 1;
                b->dq_zp = read_ref(c, r);
            }
            b->dq_channels = read_channels(c, args, NULL);
        }
        int64_t scale_index = r->last_scale + rd_sint(c, args, MAX_ENTRIES);
        if (scale_index < 0 || (uint64_t)scale_index > MAX_ENTRIES) fail(c, FAIL_CORRUPT);
        r->last_scale = scale_index;
        b->scale_index = (uint64_t)scale_index;
        uint64_t zp = rd_uint(c, args, 2 * MAX_ENTRIES);
        if (zp) {
            int64_t zp_index = scale_index + unzigzag(zp - 1);
            if (zp_index < 0 || (uint64_t)zp_index > MAX_ENTRIES) fail(c, FAIL_CORRUPT);
            b->has_zp = 1;
            b->zp_index = (uint64_t)zp_index;
        }
        b->channels = read_channels(c, args, b->has_dequant ? &b->dq_channels : NULL);
        b->precision = rd_uint(c, args, 8);
        b->lo = rd_sint(c, args, (uint64_t)1 << 63);
        b->hi = rd_sint(c, args, (uint64_t)1 << 63);
    } else if (b->predictor == P_SCALE) {
        b->source = read_ref(c, r);
        has_source = 1;
        b->channels = read_channels(c, args, NULL);
        b->symmetric = rd_uint(c, args, 1) != 0;
        b->levels = rd_uint(c, args, (uint64_t)1 << 32);
    } else if (b->predictor == P_PRODUCT) {
        b->left = rd_uint(c, args, MAX_ENTRIES);
        b->right = rd_uint(c, args, MAX_ENTRIES);
    } else if (b->predictor == P_DECAY) {
        b->source = read_ref(c, r);
        has_source = 1;
        b->factor_bits = rd_uint(c, args, (uint64_t)1 << 32);
        b->steps = rd_uint(c, args, (uint64_t)1 << 16);
    }
    b->payload_len = b->predictor == P_COPY ? 0 : rd_uint(c, &r->col[COL_LEN], BIG);
    uint64_t pos = rd_uint(c, &r->col[COL_POS], BIG);
    int64_t delta = unzigzag(pos >> 2);
    int place = (int)(pos & 3);
    int64_t out_offset;
    if (place == 1) { /* relative to where its old tensor's words are */
        int64_t anchor;
        if (b->predictor == P_COPY) anchor = (int64_t)b->copy_from;
        else if (!has_source) fail(c, FAIL_CORRUPT);
        else if (b->storage == STORAGE_RAW)
            anchor = (int64_t)(b->source.offset + b->word_start * (uint64_t)t.width);
        else anchor = (int64_t)b->source.offset;
        out_offset = anchor + delta;
    } else if (place == 2) {
        out_offset = (int64_t)read_ref(c, r).offset + delta;
    } else if (place == 0) {
        out_offset = (int64_t)prev_end + delta;
    } else {
        fail(c, FAIL_CORRUPT);
    }
    if (out_offset < 0) fail(c, FAIL_CORRUPT);
    b->out_offset = (uint64_t)out_offset;
}

static Table read_table(Ctx *c, const uint8_t *data, size_t n, const OldList *old) {
    Cols r;
    memset(&r, 0, sizeof(r));
    r.old = old;
    Reader head = {data, n, 0};
    uint64_t lengths[N_COLS], total = 0;
    for (int i = 0; i < N_COLS; i++) {
        lengths[i] = rd_uint(c, &head, n);
        total += lengths[i];
    }
    if (head.pos + total != n) fail(c, FAIL_CORRUPT);
    size_t pos = head.pos;
    for (int i = 0; i < N_COLS; i++) {
        r.col[i] = (Reader){data + pos, lengths[i], 0};
        pos += lengths[i];
    }
    Table t;
    memset(&t, 0, sizeof(t));
    t.skeleton_len = rd_uint(c, &r.col[COL_HEAD], BIG);
    read_cuts(c, &r, &t);
    for (int list = 0; list < 2; list++) {
        uint64_t count = rd_uint(c, &r.col[COL_HEAD], MAX_ENTRIES);
        /* every block takes at least three bytes of KIND: a count the table cannot hold is damage */
        if (count > r.col[COL_KIND].n) fail(c, FAIL_CORRUPT);
        Block *blocks = take_mem(c, count, sizeof(Block));
        uint64_t prev = 0;
        for (uint64_t i = 0; i < count; i++) {
            read_block(c, &r, prev, &blocks[i]);
            prev = blocks[i].out_offset + blocks[i].out_nbytes;
        }
        if (list == 0) {
            t.params = blocks;
            t.n_params = count;
        } else {
            t.blocks = blocks;
            t.n_blocks = count;
        }
    }
    for (int i = 0; i < N_COLS; i++)
        if (r.col[i].pos != r.col[i].n) fail(c, FAIL_CORRUPT);
    return t;
}

/* ---- frames (frames.py) ------------------------------------------------------- */

enum { FRAME_STORED = 0, FRAME_ZSTD = 1, FRAME_ZERO = 2 };
#define RICE_MAX_K 63
#define RICE_CHUNK 32768
#define GROUP_MIN_WORDS 16384

typedef struct {
    const uint8_t *p;
    size_t n, pos;
} Payload;

static const uint8_t *payload_take(Ctx *c, Payload *r, uint64_t n) {
    if (n > r->n - r->pos) fail(c, FAIL_CORRUPT);
    const uint8_t *part = r->p + r->pos;
    r->pos += n;
    return part;
}

static uint64_t payload_uint(Ctx *c, Payload *r) {
    uint64_t result = 0;
    int shift = 0;
    for (;;) {
        if (r->pos >= r->n || shift > 63) fail(c, FAIL_CORRUPT);
        uint8_t byte = r->p[r->pos++];
        if (shift == 63 && (byte & 0x7E)) fail(c, FAIL_CORRUPT);
        result |= (uint64_t)(byte & 0x7F) << shift;
        if (byte < 0x80) return result;
        shift += 7;
    }
}

/* One frame of exactly ``size`` bytes (zeroed memory for a ZERO frame). */
static const uint8_t *read_frame(Ctx *c, Payload *r, uint64_t size) {
    if (r->pos >= r->n) fail(c, FAIL_CORRUPT);
    uint8_t method = r->p[r->pos++];
    if (method == FRAME_ZERO) return take_mem(c, size, 1);
    if (method == FRAME_STORED) return payload_take(c, r, size);
    if (method != FRAME_ZSTD) fail(c, FAIL_CORRUPT);
    uint64_t length = payload_uint(c, r);
    const uint8_t *frame = payload_take(c, r, length);
    PyObject *view = PyMemoryView_FromMemory((char *)frame, (Py_ssize_t)length, PyBUF_READ);
    if (!view) {
        PyErr_Clear();
        fail(c, FAIL_MEMORY);
    }
    PyObject *out = PyObject_CallFunction(c->decompress, "OK", view, (unsigned long long)size);
    Py_DECREF(view);
    if (!out) {
        PyErr_Clear();
        fail(c, FAIL_CORRUPT);
    }
    char *bytes;
    Py_ssize_t got;
    if (PyBytes_AsStringAndSize(out, &bytes, &got) < 0 || (uint64_t)got != size) {
        PyErr_Clear();
        Py_DECREF(out);
        fail(c, FAIL_CORRUPT);
    }
    uint8_t *copy = take_mem(c, size, 1);
    memcpy(copy, bytes, size);
    Py_DECREF(out);
    return copy;
}

static void read_words(Ctx *c, Payload *r, uint64_t count, int width, int layout, uint64_t *out);

static void rice_decode(Ctx *c, Payload *r, uint64_t count, uint64_t *out) {
    int k = *payload_take(c, r, 1);
    if (k > RICE_MAX_K) fail(c, FAIL_CORRUPT);
    if (!count) return;
    const uint8_t *data = r->p + r->pos;
    size_t avail = r->n - r->pos;
    /* the unary quotients: ``count`` ones, each ending a run of zeros (MSB first) */
    uint64_t found = 0, zeros = 0;
    size_t byte = 0;
    for (;; byte++) {
        if (byte >= avail) fail(c, FAIL_CORRUPT);
        unsigned v = data[byte];
        int left = 8; /* bits of this byte not yet read */
        while (v) {
            int skip = __builtin_clz(v) - 24 - (8 - left); /* zeros before the next one */
            zeros += (uint64_t)skip;
            out[found++] = zeros;
            zeros = 0;
            left -= skip + 1;
            v &= (1u << left) - 1;
            if (found == count) goto unary_done;
        }
        zeros += (uint64_t)left;
    }
unary_done:
    r->pos += byte + 1;
    if (!k) return;
    for (uint64_t start = 0; start < count; start += RICE_CHUNK) {
        uint64_t n = count - start < RICE_CHUNK ? count - start : RICE_CHUNK;
        uint64_t nbytes = (n * (uint64_t)k + 7) / 8;
        const uint8_t *raw = payload_take(c, r, nbytes);
        /* the k-bit remainders, MSB first: a 64-bit window refilled a byte at a time */
        uint64_t window = 0, at = 0;
        int held = 0;
        for (uint64_t i = 0; i < n; i++) {
            uint64_t q = out[start + i];
            if (q >> (64 - k)) fail(c, FAIL_CORRUPT);
            uint64_t rem = 0;
            int need = k;
            while (need) {
                if (!held) {
                    window = raw[at++];
                    held = 8;
                }
                int take = need < held ? need : held;
                rem = rem << take | (window >> (held - take) & ((1u << take) - 1));
                held -= take;
                need -= take;
            }
            out[start + i] = q << k | rem;
        }
    }
}

static void fit_words(Ctx *c, const uint64_t *w, uint64_t n, int width) {
    if (width == 8) return;
    uint64_t mask = width_mask(width);
    for (uint64_t i = 0; i < n; i++)
        if (w[i] & ~mask) fail(c, FAIL_CORRUPT);
}

static void sparse_decode(Ctx *c, Payload *r, uint64_t count, int width, uint64_t *out) {
    uint64_t n = payload_uint(c, r);
    if (n > count) fail(c, FAIL_CORRUPT);
    memset(out, 0, count * sizeof(uint64_t));
    if (!n) return;
    uint64_t *gaps = scratch(c, S_GAPS, n);
    rice_decode(c, r, n, gaps);
    uint64_t *values = scratch(c, S_VALUES, n);
    uint64_t pos = 0;
    for (uint64_t i = 0; i < n; i++) { /* positions: each gap plus one after the previous */
        if (gaps[i] >= count) fail(c, FAIL_CORRUPT);
        pos += gaps[i] + (i ? 1 : 0);
        if (pos >= count) fail(c, FAIL_CORRUPT);
        gaps[i] = pos;
    }
    rice_decode(c, r, n, values);
    for (uint64_t i = 0; i < n; i++) {
        if (values[i] == UINT64_MAX) fail(c, FAIL_CORRUPT);
        values[i] += 1;
    }
    fit_words(c, values, n, width);
    for (uint64_t i = 0; i < n; i++) out[gaps[i]] = values[i];
}

static void read_words(Ctx *c, Payload *r, uint64_t count, int width, int layout, uint64_t *out) {
    if (layout == L_RICE) {
        rice_decode(c, r, count, out);
        fit_words(c, out, count, width);
        return;
    }
    if (layout == L_SPARSE) {
        sparse_decode(c, r, count, width, out);
        return;
    }
    if (layout == L_PACK1 || layout == L_PACK2 || layout == L_PACK4) {
        int bits = layout == L_PACK1 ? 1 : layout == L_PACK2 ? 2 : 4;
        int per = 8 / bits;
        uint64_t limit = ((uint64_t)1 << bits) - 1;
        const uint8_t *packed = read_frame(c, r, (count * (uint64_t)bits + 7) / 8);
        uint64_t escaped = 0, whole = count / (uint64_t)per;
        for (uint64_t byte = 0; byte < whole; byte++) {
            unsigned v = packed[byte];
            for (int k = 0; k < per; k++) out[byte * per + k] = v >> (bits * k) & limit;
        }
        for (uint64_t i = whole * per; i < count; i++)
            out[i] = (uint64_t)(packed[i / per] >> (bits * (i % per))) & limit;
        for (uint64_t i = 0; i < count; i++) escaped += out[i] == limit;
        if (escaped) {
            uint64_t *excess = take_mem(c, escaped, sizeof(uint64_t));
            read_words(c, r, escaped, width, L_PLANES, excess);
            uint64_t mask = width_mask(width), e = 0;
            for (uint64_t i = 0; i < count && e < escaped; i++)
                if (out[i] == limit) out[i] = (excess[e++] + limit) & mask;
        }
        return;
    }
    if (layout != L_INTERLEAVED && layout != L_PLANES) fail(c, FAIL_CORRUPT);
    int planes = layout == L_PLANES && width > 1 ? width : 1;
    if (count > UINT64_MAX / 8) fail(c, FAIL_CORRUPT);
    if (planes == 1) {
        load_words(read_frame(c, r, count * (uint64_t)width), count, width, out);
        return;
    }
    memset(out, 0, count * sizeof(uint64_t));
    for (int p = 0; p < planes; p++) {
        const uint8_t *plane = read_frame(c, r, count);
        for (uint64_t i = 0; i < count; i++) out[i] |= (uint64_t)plane[i] << (8 * p);
    }
}

/* exponent_grouping + group_by: word indices stably sorted by their prediction's
 * exponent, cut into segments of at least GROUP_MIN_WORDS (smaller runs merged on). */
typedef struct {
    uint64_t *order;
    uint64_t *ends;
    size_t n_ends;
} Grouping;

static int grouping_of(Ctx *c, const Block *b, const uint64_t *predicted, Grouping *g) {
    EType t = etype_of(b->dtype);
    if (!predicted || !is_float(t) || b->storage != STORAGE_RAW ||
        b->word_count < 2 * GROUP_MIN_WORDS)
        return 0;
    int shift, nkeys;
    uint64_t mask;
    if (t.kind == K_BF16) { shift = 7; mask = 0xFF; }
    else if (t.width == 2) { shift = 10; mask = 0x1F; }
    else if (t.width == 4) { shift = 23; mask = 0xFF; }
    else { shift = 52; mask = 0x7FF; }
    nkeys = (int)mask + 1;
    uint64_t n = b->word_count;
    uint64_t *counts = take_mem(c, (size_t)nkeys + 1, sizeof(uint64_t));
    for (uint64_t i = 0; i < n; i++) counts[(predicted[i] >> shift) & mask]++;
    uint64_t *starts = take_mem(c, (size_t)nkeys, sizeof(uint64_t));
    g->ends = take_mem(c, (size_t)nkeys + 1, sizeof(uint64_t));
    g->n_ends = 0;
    uint64_t run_end = 0, begin = 0;
    for (int key = 0; key < nkeys; key++) {
        starts[key] = run_end;
        if (!counts[key]) continue;
        run_end += counts[key];
        if (run_end - begin >= GROUP_MIN_WORDS) {
            g->ends[g->n_ends++] = run_end;
            begin = run_end;
        }
    }
    if (begin < n) {
        if (g->n_ends) g->ends[g->n_ends - 1] = n;
        else g->ends[g->n_ends++] = n;
    }
    g->order = scratch(c, S_ORDER, n);
    for (uint64_t i = 0; i < n; i++) g->order[starts[(predicted[i] >> shift) & mask]++] = i;
    return 1;
}

/* unpack_frames for GROUPED: the segments' planes in grouped order, put back in place. */
static void read_grouped(Ctx *c, Payload *r, const Block *b, const uint64_t *predicted,
                         uint64_t *words) {
    Grouping g;
    if (!grouping_of(c, b, predicted, &g)) fail(c, FAIL_CORRUPT);
    uint64_t n = b->word_count, begin = 0;
    uint64_t *ordered = scratch(c, S_ORDERED, n);
    for (size_t k = 0; k < g.n_ends; k++) {
        read_words(c, r, g.ends[k] - begin, etype_of(b->dtype).width, L_PLANES, ordered + begin);
        begin = g.ends[k];
    }
    for (uint64_t i = 0; i < n; i++) words[g.order[i]] = ordered[i];
}

/* ---- predictions (codecs.py) --------------------------------------------------- */

typedef struct {
    uint64_t dtype;
    const uint8_t *data; /* little-endian words */
    uint64_t count;
} Param;

typedef struct {
    const uint8_t *data;
    size_t size;
} Old;

static const uint8_t *old_span(Ctx *c, const Old *old, uint64_t offset, uint64_t nbytes) {
    if (offset > old->size || nbytes > old->size - offset) fail(c, FAIL_CORRUPT);
    return old->data + offset;
}

/* varint.decode: every protobuf varint of ``n`` bytes as a uint64 word (bits past the
 * 64th dropped, as numpy's shifts drop them); the count in ``count``. */
static uint64_t *decode_varints(Ctx *c, const uint8_t *p, uint64_t n, uint64_t *count) {
    uint64_t total = 0;
    for (uint64_t i = 0; i < n; i++) total += p[i] < 0x80;
    if (n && p[n - 1] >= 0x80) fail(c, FAIL_CORRUPT);
    uint64_t *out = take_mem(c, total, sizeof(uint64_t));
    uint64_t k = 0, value = 0;
    int length = 0;
    for (uint64_t i = 0; i < n; i++) {
        if (length >= 10) fail(c, FAIL_CORRUPT);
        if (length < 10) value |= (uint64_t)(p[i] & 0x7F) << (7 * length);
        length++;
        if (p[i] < 0x80) {
            out[k++] = value;
            value = 0;
            length = 0;
        }
    }
    *count = total;
    return out;
}

/* varint.encode of ``n`` words into ``dest`` (NULL: only count); the bytes it takes. */
static uint64_t encode_varints(const uint64_t *w, uint64_t n, uint8_t *dest) {
    uint64_t pos = 0;
    for (uint64_t i = 0; i < n; i++) {
        uint64_t v = w[i];
        while (v >= 0x80) {
            if (dest) dest[pos] = (uint8_t)(v | 0x80);
            pos++;
            v >>= 7;
        }
        if (dest) dest[pos] = (uint8_t)v;
        pos++;
    }
    return pos;
}

static void check_ref(Ctx *c, const OldRef *ref) {
    EType t = etype_of(ref->dtype);
    if (ref->storage == STORAGE_VARINT && !(is_integer(t) || ref->dtype == 10 || ref->dtype == 16))
        fail(c, FAIL_CORRUPT);
    if (ref->storage > STORAGE_VARINT) fail(c, FAIL_CORRUPT);
}

/* An old varint tensor's words, decoded once per call (the last one asked for is kept). */
static const uint64_t *old_varint_words(Ctx *c, const Old *old, const OldRef *ref, uint64_t *count) {
    if (c->varints_of.offset == ref->offset && c->varints_of.nbytes == ref->nbytes &&
        c->varints) {
        *count = c->n_varints;
        return c->varints;
    }
    c->varints = decode_varints(c, old_span(c, old, ref->offset, ref->nbytes), ref->nbytes, count);
    c->n_varints = *count;
    c->varints_of = *ref;
    return c->varints;
}

/* The words ``start .. start+n`` of an old tensor, cut short at its end: returns how many
 * there were. Varint tensors: the decoded uint64 words with ``stored``, else cut to the
 * element's width (the bits its value takes: words_to_values). */
static uint64_t old_words_as(Ctx *c, const Old *old, const OldRef *ref, uint64_t start, uint64_t n,
                             uint64_t *out, int stored) {
    check_ref(c, ref);
    EType t = etype_of(ref->dtype);
    if (ref->storage == STORAGE_VARINT) {
        uint64_t total;
        const uint64_t *all = old_varint_words(c, old, ref, &total);
        if (start >= total) return 0;
        uint64_t got = n > total - start ? total - start : n, mask = stored ? UINT64_MAX : width_mask(t.width);
        for (uint64_t i = 0; i < got; i++) out[i] = all[start + i] & mask;
        return got;
    }
    uint64_t width = (uint64_t)t.width, total = ref->nbytes / width;
    if (ref->nbytes % width) fail(c, FAIL_CORRUPT);
    if (start >= total) return 0;
    uint64_t stop = n > total - start ? total : start + n;
    const uint8_t *p = old_span(c, old, ref->offset + start * width, (stop - start) * width);
    load_words(p, stop - start, t.width, out);
    return stop - start;
}

static uint64_t old_words(Ctx *c, const Old *old, const OldRef *ref, uint64_t start, uint64_t n,
                          uint64_t *out) {
    return old_words_as(c, old, ref, start, n, out, 0);
}

/* How many elements an old tensor holds. */
static uint64_t old_count(Ctx *c, const Old *old, const OldRef *ref) {
    check_ref(c, ref);
    if (ref->storage == STORAGE_VARINT) {
        uint64_t total;
        old_varint_words(c, old, ref, &total);
        return total;
    }
    return ref->nbytes / (uint64_t)etype_of(ref->dtype).width;
}

/* The float value (in float32 or float64 arithmetic) of a float32/float64 word. */
static double float_value(Ctx *c, uint64_t w, EType t, int precision) {
    if (t.kind != K_FLOAT || t.lanes != 1 || t.width == 2) fail(c, FAIL_UNSUPPORTED);
    if (t.width == 4) return (double)word_as_f32(w);
    double d = word_as_f64(w);
    return precision == 4 ? (double)(float)d : d;
}

/* np.rint (round half to even) without a libm call: adding and taking away 1.5 * 2**23
 * leaves the nearest integer in the default rounding mode, for |x| < 2**22 (larger
 * floats are integers already, or go to nearbyintf, as NaN and infinities do). The sign
 * of a zero may differ from rint's; it cannot matter once the value becomes an integer. */
static inline float rint_f32(float x) {
    const float magic = 12582912.0f; /* 1.5 * 2**23 */
    if (fabsf(x) < 4194304.0f) return (x + magic) - magic;
    return nearbyintf(x);
}

static inline double rint_f64(double x) {
    const double magic = 6755399441055744.0; /* 1.5 * 2**52 */
    if (fabs(x) < 2251799813685248.0) return (x + magic) - magic;
    return nearbyint(x);
}

static uint64_t channel_of(const Channels *ch, uint64_t i) { return i / ch->inner % ch->count; }

/* Word by word through the channels without a division per word: channel ``ch`` for
 * ``left`` more words, then the next one (wrapping at ``count``). */
typedef struct {
    uint64_t ch, left, inner, count;
} Walk;

static Walk walk_from(const Channels *channels, uint64_t start) {
    if (channels->count <= 1 || channels->inner == 0) return (Walk){0, UINT64_MAX, UINT64_MAX, 1};
    return (Walk){channel_of(channels, start), channels->inner - start % channels->inner,
                  channels->inner, channels->count};
}

static void walk_next(Walk *w) {
    if (--w->left) return;
    w->left = w->inner;
    if (++w->ch == w->count) w->ch = 0;
}

/* A parameter's values as the channels need them: one, or one per channel. */
static void check_per_channel(Ctx *c, uint64_t size, const Channels *ch) {
    if (ch->count == 1 ? size != 1 : size != ch->count) fail(c, FAIL_CORRUPT);
}

static const Param *param_at(Ctx *c, const Param *params, size_t n_params, uint64_t index) {
    if (index >= n_params) fail(c, FAIL_CORRUPT);
    return &params[index];
}

/* The common case of quant_prediction in float32 and int32 arrays, loops the compiler
 * vectorizes: precision 4, an 8- or 16-bit integer source (dequantized: exact in
 * float32, as numpy's narrow path) or a float32 one, clip bounds inside int32. */

#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
#define LITTLE_ENDIAN_HOST 1
#else
#define LITTLE_ENDIAN_HOST 0
#endif

/* (q - zero point) * scale over a run of one channel, q read straight from the old file */
#define DEQUANT_RUN(T)                                                                          \
    do {                                                                                        \
        const T *qs = (const T *)(const void *)raw;                                             \
        for (uint64_t j = i; j < i + run; j++) xf[j] = ((float)qs[j] - zf) * sv;                \
    } while (0)

/* rint(x / scale) + zero point, clipped; 1 when a value needs the exact scalar path
 * (NaN, infinite, or too large for the rounding trick) */
static int quant_run_f32(const float *xf, uint64_t *out, uint64_t n, float sv, float zv, float lo,
                         float hi, uint64_t mask) {
    const float magic = 12582912.0f, small = 4194304.0f;
    int exact = 1;
    for (uint64_t j = 0; j < n; j++) {
        float v = xf[j] / sv;
        exact &= fabsf(v) < small;
        v = (v + magic) - magic;
        v = v + zv;
        v = v < lo ? lo : v;
        v = v > hi ? hi : v;
        out[j] = (uint64_t)(int64_t)(int32_t)v & mask;
    }
    return !exact;
}

/* quant_run_f32 over a row of consecutive channels, each word its own scale */
static int quant_row_f32(const float *xf, uint64_t *out, uint64_t n, const float *sv,
                         const float *zv, float lo, float hi, uint64_t mask) {
    const float magic = 12582912.0f, small = 4194304.0f;
    int exact = 1;
    for (uint64_t j = 0; j < n; j++) {
        float v = xf[j] / sv[j];
        exact &= fabsf(v) < small;
        v = (v + magic) - magic;
        v = v + zv[j];
        v = v < lo ? lo : v;
        v = v > hi ? hi : v;
        out[j] = (uint64_t)(int64_t)(int32_t)v & mask;
    }
    return !exact;
}

static void quant_run_scalar(const float *xf, uint64_t *out, uint64_t n, float sv, float zv,
                             int has_zp, float lo, float hi, uint64_t mask) {
    for (uint64_t j = 0; j < n; j++) {
        float v = nearbyintf(xf[j] / sv);
        if (isnan(v)) v = 0.0f;
        if (has_zp) v = v + zv;
        v = v < lo ? lo : v;
        v = v > hi ? hi : v;
        out[j] = (uint64_t)(int64_t)(int32_t)v & mask;
    }
}

/* 1 when done; 0 when the block is not the common case */
static int quant_fast(Ctx *c, const Block *b, const Old *old, EType src_type, const double *scales,
                      const double *zps, int has_zp, const float *dq_scales, const int64_t *dq_zps,
                      uint64_t *out) {
    EType target = etype_of(b->dtype);
    float lo = (float)b->lo, hi = (float)b->hi;
    if (!LITTLE_ENDIAN_HOST || b->precision != 4 || target.width > 4 || b->lo < INT32_MIN ||
        (double)hi > 2147483520.0)
        return 0;
    if (b->has_dequant ? !(is_integer(src_type) && src_type.width <= 2) : src_type.width != 4)
        return 0;
    if (b->source.storage != STORAGE_RAW) return 0;
    if (b->has_dequant)
        for (uint64_t ch = 0; ch < (b->dq_channels.count == 1 ? 1 : b->dq_channels.count); ch++)
            if (dq_zps[ch] < -65536 || dq_zps[ch] > 65536) return 0; /* exact in float32 */
    uint64_t n = b->word_count, start = b->word_start, width = (uint64_t)src_type.width;
    if (b->source.nbytes % width || b->source.nbytes / width < start ||
        b->source.nbytes / width - start < n)
        fail(c, FAIL_CORRUPT);
    const uint8_t *raw = old_span(c, old, b->source.offset + start * width, n * width);
    if (b->has_dequant && b->dq_channels.count > 1 && b->dq_channels.inner == 1) return 0;
    float *xf = (float *)scratch(c, S_VALUES_X, n);
    if (b->has_dequant) {
        Walk at = walk_from(&b->dq_channels, start);
        for (uint64_t i = 0; i < n;) {
            uint64_t run = at.left < n - i ? at.left : n - i;
            float sv = dq_scales[at.ch], zf = (float)dq_zps[at.ch];
            if (src_type.kind == K_SIGNED && width == 1) DEQUANT_RUN(int8_t);
            else if (width == 1) DEQUANT_RUN(uint8_t);
            else if (src_type.kind == K_SIGNED) DEQUANT_RUN(int16_t);
            else DEQUANT_RUN(uint16_t);
            i += run;
            at.left -= run - 1;
            walk_next(&at);
        }
    } else {
        memcpy(xf, raw, n * 4);
    }
    uint64_t mask = b->storage == STORAGE_VARINT ? UINT64_MAX : width_mask(target.width);
    if (b->channels.count > 1 && b->channels.inner == 1) {
        /* a new channel every word (the last axis): by rows of every channel in turn */
        uint64_t count = b->channels.count;
        float *sv = (float *)take_mem(c, count, sizeof(float));
        float *zv = (float *)take_mem(c, count, sizeof(float));
        for (uint64_t ch = 0; ch < count; ch++) {
            sv[ch] = (float)scales[ch];
            zv[ch] = has_zp ? (float)zps[ch] : 0.0f;
        }
        for (uint64_t i = 0, ch = start % count; i < n; ch = 0) {
            uint64_t len = count - ch < n - i ? count - ch : n - i;
            if (quant_row_f32(xf + i, out + i, len, sv + ch, zv + ch, lo, hi, mask))
                for (uint64_t k = 0; k < len; k++)
                    quant_run_scalar(xf + i + k, out + i + k, 1, sv[ch + k], zv[ch + k], has_zp, lo,
                                     hi, mask);
            i += len;
        }
        return 1;
    }
    Walk at = walk_from(&b->channels, start);
    for (uint64_t i = 0; i < n;) {
        uint64_t run = at.left < n - i ? at.left : n - i;
        float sv = (float)scales[at.ch], zv = has_zp ? (float)zps[at.ch] : 0.0f;
        if (quant_run_f32(xf + i, out + i, run, sv, zv, lo, hi, mask))
            quant_run_scalar(xf + i, out + i, run, sv, zv, has_zp, lo, hi, mask);
        i += run;
        at.left -= run - 1;
        walk_next(&at);
    }
    return 1;
}

static void quant_prediction(Ctx *c, const Block *b, const Old *old, const Param *params,
                             size_t n_params, uint64_t *out) {
    EType target = etype_of(b->dtype);
    if (!is_integer(target) || target.lanes != 1) fail(c, FAIL_CORRUPT);
    if (target.width == 8) fail(c, FAIL_UNSUPPORTED); /* 64-bit clip bounds round in floats */
    int bits = 8 * target.width;
    int64_t smallest = target.kind == K_SIGNED ? -((int64_t)1 << (bits - 1)) : 0;
    int64_t largest = target.kind == K_SIGNED ? ((int64_t)1 << (bits - 1)) - 1
                                              : (int64_t)(((uint64_t)1 << bits) - 1);
    if (!(smallest <= b->lo && b->lo <= b->hi && b->hi <= largest)) fail(c, FAIL_CORRUPT);
    if (b->precision != 4 && b->precision != 8) fail(c, FAIL_CORRUPT);
    int p4 = b->precision == 4;
    uint64_t n = b->word_count, start = b->word_start;
    EType src_type = etype_of(b->source.dtype);
    check_ref(c, &b->source);
    if (!b->has_dequant && !(src_type.kind == K_FLOAT && src_type.lanes == 1)) {
        if (is_float(src_type)) fail(c, FAIL_UNSUPPORTED); /* bfloat16 */
        fail(c, FAIL_CORRUPT);
    }
    if (b->has_dequant && !is_integer(src_type)) fail(c, FAIL_CORRUPT);
    if (!b->has_dequant && src_type.width == 2) fail(c, FAIL_UNSUPPORTED); /* float16 */
    uint64_t *src = scratch(c, S_SOURCE, n);
    /* the new scale and zero point (parameters) */
    const Param *scale = param_at(c, params, n_params, b->scale_index);
    EType scale_type = etype_of(scale->dtype);
    if (!(scale_type.kind == K_FLOAT && scale_type.lanes == 1 && scale_type.width >= 4))
        fail(c, FAIL_UNSUPPORTED);
    check_per_channel(c, scale->count, &b->channels);
    const Param *zp = NULL;
    EType zp_type = {0};
    if (b->has_zp) {
        zp = param_at(c, params, n_params, b->zp_index);
        zp_type = etype_of(zp->dtype);
        if (!is_integer(zp_type)) fail(c, FAIL_CORRUPT);
        if (zp_type.kind == K_UNSIGNED && zp_type.width == 8) fail(c, FAIL_UNSUPPORTED);
        check_per_channel(c, zp->count, &b->channels);
    }
    /* the old parameters, to dequantize an old integer tensor */
    uint64_t *dq_scale = NULL, *dq_zp = NULL;
    EType dq_scale_type = {0}, dq_zp_type = {0};
    if (b->has_dequant) {
        check_ref(c, &b->dq_scale);
        dq_scale_type = etype_of(b->dq_scale.dtype);
        if (!(dq_scale_type.kind == K_FLOAT && dq_scale_type.lanes == 1 && dq_scale_type.width >= 4))
            fail(c, FAIL_UNSUPPORTED);
        uint64_t count = old_count(c, old, &b->dq_scale);
        dq_scale = take_mem(c, count ? count : 1, sizeof(uint64_t));
        count = old_words(c, old, &b->dq_scale, 0, count, dq_scale);
        check_per_channel(c, count, &b->dq_channels);
        if (b->dq_has_zp) {
            check_ref(c, &b->dq_zp);
            dq_zp_type = etype_of(b->dq_zp.dtype);
            if (!is_integer(dq_zp_type)) fail(c, FAIL_UNSUPPORTED);
            uint64_t zcount = old_count(c, old, &b->dq_zp);
            dq_zp = take_mem(c, zcount ? zcount : 1, sizeof(uint64_t));
            zcount = old_words(c, old, &b->dq_zp, 0, zcount, dq_zp);
            check_per_channel(c, zcount, &b->dq_channels);
        }
    }
    /* each channel's numbers once, as the arithmetic below takes them */
    uint64_t count = b->channels.count == 1 ? 1 : b->channels.count;
    double *scales = take_mem(c, count, sizeof(double)), *zps = take_mem(c, count, sizeof(double));
    for (uint64_t ch = 0; ch < count; ch++) {
        uint64_t s_word = load_word(scale->data + ch * (uint64_t)scale_type.width, scale_type.width);
        scales[ch] = float_value(c, s_word, scale_type, (int)b->precision);
        if (zp) {
            uint64_t z = load_word(zp->data + ch * (uint64_t)zp_type.width, zp_type.width);
            int64_t zv = word_as_int(z, zp_type);
            zps[ch] = p4 ? (double)(float)zv : (double)zv;
        }
    }
    uint64_t dcount = b->dq_channels.count == 1 ? 1 : b->dq_channels.count;
    float *dq_scales = NULL;
    int64_t *dq_zps = NULL;
    if (b->has_dequant) {
        dq_scales = take_mem(c, dcount, sizeof(float));
        dq_zps = take_mem(c, dcount, sizeof(int64_t));
        for (uint64_t ch = 0; ch < dcount; ch++) {
            dq_scales[ch] = (float)float_value(c, dq_scale[ch], dq_scale_type, 4);
            dq_zps[ch] = dq_zp ? word_as_int(dq_zp[ch], dq_zp_type) : 0;
        }
    }
    if (quant_fast(c, b, old, src_type, scales, zps, zp != NULL, dq_scales, dq_zps, out)) return;
    if (old_words(c, old, &b->source, start, n, src) != n) fail(c, FAIL_CORRUPT);
    /* the old values as floats, x: dequantized (float32), or the float source itself */
    double *x = (double *)scratch(c, S_VALUES_X, n);
    if (b->has_dequant) {
        int64_t *q = (int64_t *)src; /* in place: the words sign-extended */
        if (src_type.kind == K_SIGNED && src_type.width < 8) {
            int shift = 64 - 8 * src_type.width;
            for (uint64_t i = 0; i < n; i++) q[i] = (int64_t)(src[i] << shift) >> shift;
        }
        Walk at = walk_from(&b->dq_channels, start);
        for (uint64_t i = 0; i < n;) {
            uint64_t run = at.left < n - i ? at.left : n - i;
            float sv = dq_scales[at.ch];
            uint64_t zv = (uint64_t)dq_zps[at.ch];
            /* (q - zero point) exactly in int64 (wrapping as numpy's does), rounded once */
            for (uint64_t j = i; j < i + run; j++) x[j] = (double)((float)(int64_t)((uint64_t)q[j] - zv) * sv);
            i += run;
            at.left -= run - 1;
            walk_next(&at);
        }
    } else {
        if (src_type.width == 4) {
            for (uint64_t i = 0; i < n; i++) x[i] = (double)word_as_f32(src[i]);
        } else {
            for (uint64_t i = 0; i < n; i++) x[i] = float_value(c, src[i], src_type, (int)b->precision);
        }
    }
    uint64_t mask = b->storage == STORAGE_VARINT ? UINT64_MAX : width_mask(target.width);
    float lo4 = (float)b->lo, hi4 = (float)b->hi;
    double lo8 = (double)b->lo, hi8 = (double)b->hi;
    int out_of_range = 0;
    Walk at = walk_from(&b->channels, start);
    for (uint64_t i = 0; i < n;) {
        uint64_t run = at.left < n - i ? at.left : n - i;
        if (p4) {
            float sv = (float)scales[at.ch], zv = zp ? (float)zps[at.ch] : 0.0f;
            for (uint64_t j = i; j < i + run; j++) {
                float q = rint_f32((float)x[j] / sv);
                if (isnan(q)) q = 0.0f;
                if (zp) q = q + zv;
                q = q < lo4 ? lo4 : q;
                q = q > hi4 ? hi4 : q;
                out_of_range |= (double)q < (double)smallest || (double)q > (double)largest;
                out[j] = (uint64_t)(int64_t)q & mask;
            }
        } else {
            double sv = scales[at.ch], zv = zp ? zps[at.ch] : 0.0;
            for (uint64_t j = i; j < i + run; j++) {
                double q = rint_f64(x[j] / sv);
                if (isnan(q)) q = 0.0;
                if (zp) q = q + zv;
                q = q < lo8 ? lo8 : q;
                q = q > hi8 ? hi8 : q;
                out_of_range |= q < (double)smallest || q > (double)largest;
                out[j] = (uint64_t)(int64_t)q & mask;
            }
        }
        i += run;
        at.left -= run - 1;
        walk_next(&at);
    }
    if (out_of_range) fail(c, FAIL_UNSUPPORTED); /* numpy's cast of it is the platform's */
}

static void scale_prediction(Ctx *c, const Block *b, const Old *old, uint64_t *out) {
    EType target = etype_of(b->dtype);
    if (!is_float(target) || target.lanes != 1) fail(c, FAIL_CORRUPT);
    if (b->levels < 1 || b->levels >= ((uint64_t)1 << 32)) fail(c, FAIL_CORRUPT);
    if (b->word_start + b->word_count > b->channels.count) fail(c, FAIL_CORRUPT);
    EType source = etype_of(b->source.dtype);
    if (!is_float(source) || source.lanes != 1) fail(c, FAIL_CORRUPT);
    if (source.kind != K_FLOAT || source.width != 4 || target.kind != K_FLOAT || target.width != 4)
        fail(c, FAIL_UNSUPPORTED);
    check_ref(c, &b->source);
    uint64_t total = b->source.nbytes / 4;
    if (b->source.nbytes % 4) fail(c, FAIL_CORRUPT);
    const uint8_t *p = old_span(c, old, b->source.offset, b->source.nbytes);
    uint64_t per_block = b->channels.count * b->channels.inner;
    if (b->channels.inner && per_block / b->channels.inner != b->channels.count) fail(c, FAIL_CORRUPT);
    if (total == 0 || total % per_block) fail(c, FAIL_CORRUPT);
    uint64_t count = b->channels.count;
    float *rmin = take_mem(c, count, sizeof(float)), *rmax = take_mem(c, count, sizeof(float));
    for (uint64_t ch = 0; ch < count; ch++) rmin[ch] = INFINITY, rmax[ch] = -INFINITY;
    int nan = 0;
    if (b->channels.count > 1 && b->channels.inner == 1) { /* rows of every channel in turn */
        for (uint64_t i = 0; i < total; i += count) {
            uint64_t len = count < total - i ? count : total - i;
            for (uint64_t k = 0; k < len; k++) {
                float v = f32_at(p, i + k);
                nan |= v != v;
                rmin[k] = v < rmin[k] ? v : rmin[k];
                rmax[k] = v > rmax[k] ? v : rmax[k];
            }
        }
    } else {
        Walk at = walk_from(&b->channels, 0);
        for (uint64_t i = 0; i < total;) { /* by runs of one channel: loops that vectorize */
            uint64_t run = at.left < total - i ? at.left : total - i;
            /* eight lanes, then folded: min and max do not care about order (NaN aside,
             * which declines; a zero's sign is dropped below) */
            float lo[8], hi[8];
            for (int k = 0; k < 8; k++) lo[k] = rmin[at.ch], hi[k] = rmax[at.ch];
            uint64_t j = i;
            for (; j + 8 <= i + run; j += 8)
                for (int k = 0; k < 8; k++) {
                    float v = f32_at(p, j + (uint64_t)k);
                    nan |= v != v;
                    lo[k] = v < lo[k] ? v : lo[k];
                    hi[k] = v > hi[k] ? v : hi[k];
                }
            for (; j < i + run; j++) {
                float v = f32_at(p, j);
                nan |= v != v;
                lo[0] = v < lo[0] ? v : lo[0];
                hi[0] = v > hi[0] ? v : hi[0];
            }
            for (int k = 1; k < 8; k++) {
                lo[0] = lo[k] < lo[0] ? lo[k] : lo[0];
                hi[0] = hi[k] > hi[0] ? hi[k] : hi[0];
            }
            rmin[at.ch] = lo[0];
            rmax[at.ch] = hi[0];
            i += run;
            at.left -= run - 1;
            walk_next(&at);
        }
    }
    if (nan) fail(c, FAIL_UNSUPPORTED); /* numpy's min and max propagate NaN: Python's */
    for (uint64_t i = 0; i < b->word_count; i++) {
        uint64_t ch = b->word_start + i;
        float lo = rmin[ch] < 0.0f ? rmin[ch] : 0.0f, hi = rmax[ch] > 0.0f ? rmax[ch] : 0.0f;
        if (b->symmetric) {
            float a = fabsf(lo), z = fabsf(hi);
            float absmax = a > z ? a : z;
            lo = -absmax;
            hi = absmax;
        }
        double scale = ((double)hi - (double)lo) / (double)b->levels;
        float stored = (float)scale;
        if (scale < (double)FLT_MIN) stored = 1.0f;
        out[i] = f32_as_word(stored);
    }
}

static void product_prediction(Ctx *c, const Block *b, const Param *params, size_t n_params,
                               uint64_t *out) {
    EType target = etype_of(b->dtype);
    if (!is_float(target) || target.lanes != 1) fail(c, FAIL_CORRUPT);
    const Param *left = param_at(c, params, n_params, b->left);
    const Param *right = param_at(c, params, n_params, b->right);
    EType lt = etype_of(left->dtype), rt = etype_of(right->dtype);
    if (!is_float(lt) || !is_float(rt)) fail(c, FAIL_CORRUPT);
    if (lt.kind != K_FLOAT || lt.width != 4 || rt.kind != K_FLOAT || rt.width != 4 ||
        target.kind != K_FLOAT || target.width != 4 || lt.lanes != 1 || rt.lanes != 1)
        fail(c, FAIL_UNSUPPORTED);
    uint64_t start = b->word_start, n = b->word_count, need = start + n;
    uint64_t sizes[2] = {left->count, right->count};
    for (int k = 0; k < 2; k++) {
        uint64_t size = sizes[k];
        if (size != 1 && size != need && size < need) fail(c, FAIL_CORRUPT);
        uint64_t sliced = size == 1 ? 1 : (size > start ? (size - start < n ? size - start : n) : 0);
        if (sliced != 1 && sliced != n) fail(c, FAIL_CORRUPT);
    }
    for (uint64_t i = 0; i < n; i++) {
        uint64_t li = left->count == 1 ? 0 : start + i, ri = right->count == 1 ? 0 : start + i;
        float a = word_as_f32(load_word(left->data + 4 * li, 4));
        float z = word_as_f32(load_word(right->data + 4 * ri, 4));
        out[i] = f32_as_word(a * z);
    }
}

static void decay_prediction(Ctx *c, const Block *b, const Old *old, uint64_t *out) {
    if (b->dtype != 1 || b->source.dtype != 1 || b->storage != STORAGE_RAW) fail(c, FAIL_CORRUPT);
    if (b->steps < 1 || b->steps > 256 || b->factor_bits >= ((uint64_t)1 << 32)) fail(c, FAIL_CORRUPT);
    check_ref(c, &b->source);
    float factor = word_as_f32(b->factor_bits);
    uint64_t got = old_words(c, old, &b->source, b->word_start, b->word_count, out);
    for (uint64_t i = 0; i < got; i++) {
        float v = word_as_f32(out[i]);
        for (uint64_t s = 0; s < b->steps; s++) v = v * factor;
        out[i] = f32_as_word(v);
    }
    memset(out + got, 0, (b->word_count - got) * sizeof(uint64_t)); /* `_padded` */
}

/* The block's predicted words into ``out``; 0 when it has no predictor. */
static int predict(Ctx *c, const Block *b, const Old *old, const Param *params, size_t n_params,
                   uint64_t *out) {
    switch (b->predictor) {
    case P_NONE:
        return 0;
    case P_VALUES: {
        check_ref(c, &b->source);
        if (b->source.dtype != b->dtype || b->source.storage != b->storage)
            fail(c, FAIL_UNSUPPORTED); /* a cast between element types */
        uint64_t got = old_words_as(c, old, &b->source, b->word_start, b->word_count, out, 1);
        memset(out + got, 0, (b->word_count - got) * sizeof(uint64_t)); /* `_padded` */
        return 1;
    }
    case P_QUANT:
        quant_prediction(c, b, old, params, n_params, out);
        return 1;
    case P_SCALE:
        scale_prediction(c, b, old, out);
        return 1;
    case P_DECAY:
        decay_prediction(c, b, old, out);
        return 1;
    case P_PRODUCT:
        product_prediction(c, b, params, n_params, out);
        return 1;
    default:
        fail(c, FAIL_CORRUPT);
    }
    return 0;
}

/* ---- blocks (decode.py) --------------------------------------------------------- */

static void chunks_release(Chunks *ch) {
    if (ch->held) PyBuffer_Release(&ch->current);
    ch->held = 0;
}

/* _Payloads.take: the next ``n`` payload bytes, within one chunk. */
static const uint8_t *chunks_take(Ctx *c, uint64_t n) {
    static const uint8_t empty[1] = {0};
    Chunks *ch = &c->chunks;
    if (n == 0) return empty;
    if (!ch->held || ch->pos == (size_t)ch->current.len) {
        if (ch->next >= PyTuple_GET_SIZE(ch->tuple)) fail(c, FAIL_CORRUPT);
        chunks_release(ch);
        if (PyObject_GetBuffer(PyTuple_GET_ITEM(ch->tuple, ch->next), &ch->current, PyBUF_SIMPLE) < 0) {
            PyErr_Clear();
            fail(c, FAIL_CORRUPT);
        }
        ch->held = 1;
        ch->next++;
        ch->pos = 0;
    }
    if (n > (uint64_t)ch->current.len - ch->pos) fail(c, FAIL_CORRUPT);
    const uint8_t *part = (const uint8_t *)ch->current.buf + ch->pos;
    ch->pos += n;
    return part;
}

static int exact_prediction(const uint8_t *payload, uint64_t len, int layout, int transform, int width) {
    if (transform == T_NONE) return 0;
    uint64_t frames;
    if (layout == L_INTERLEAVED) frames = 1;
    else if (layout == L_PLANES) frames = (uint64_t)width;
    else return 0;
    if (len != frames) return 0;
    for (uint64_t i = 0; i < len; i++)
        if (payload[i] != FRAME_ZERO) return 0;
    return 1;
}

/* The block's bytes, written at ``dest`` (its place in the output). */
static void decode_block(Ctx *c, const Block *b, const uint8_t *payload, const Old *old,
                         const Param *params, size_t n_params, uint8_t *dest) {
    EType t = etype_of(b->dtype);
    int varints = b->storage == STORAGE_VARINT;
    if (varints) {
        if (!(is_integer(t) || b->dtype == 10 || b->dtype == 16)) fail(c, FAIL_CORRUPT);
        if (b->predictor != P_COPY && b->predictor != P_NONE && b->predictor != P_VALUES &&
            b->predictor != P_QUANT)
            fail(c, FAIL_UNSUPPORTED); /* float16 bits in int32_data: Python's */
    } else if (b->predictor != P_COPY && b->out_nbytes != b->word_count * (uint64_t)t.width) {
        fail(c, FAIL_CORRUPT);
    }
    int ww = varints ? 8 : t.width; /* a word's width: varint words are uint64 */
    if (b->predictor == P_COPY) {
        if (b->transform != T_NONE || b->payload_len) fail(c, FAIL_CORRUPT);
        memcpy(dest, old_span(c, old, b->copy_from, b->out_nbytes), b->out_nbytes);
        return;
    }
    if (b->word_count > BLOCK_WORDS) fail(c, FAIL_CORRUPT);
    if (b->predictor == P_VALUES || b->predictor == P_QUANT || b->predictor == P_SCALE ||
        b->predictor == P_DECAY)
        check_ref(c, &b->source);
    uint64_t n = b->word_count;
    uint64_t *predicted = scratch(c, S_PREDICTED, n);
    int has_prediction = predict(c, b, old, params, n_params, predicted);
    uint64_t *words;
    if (has_prediction && exact_prediction(payload, b->payload_len, b->layout, b->transform, ww)) {
        words = predicted;
    } else {
        words = scratch(c, S_WORDS, n);
        Payload r = {payload, b->payload_len, 0};
        if (b->layout == L_GROUPED) {
            read_grouped(c, &r, b, has_prediction ? predicted : NULL, words);
        } else {
            read_words(c, &r, n, ww, b->layout, words);
        }
        if (r.pos != r.n) fail(c, FAIL_CORRUPT);
        if (b->transform != T_NONE) {
            if (!has_prediction) fail(c, FAIL_CORRUPT);
            uint64_t mask = width_mask(ww);
            if (b->transform == T_XOR) {
                for (uint64_t i = 0; i < n; i++) words[i] ^= predicted[i];
            } else {
                for (uint64_t i = 0; i < n; i++) {
                    uint64_t z = words[i];
                    uint64_t d = ((z >> 1) ^ (0 - (z & 1))) & mask;
                    words[i] = (d + predicted[i]) & mask;
                }
            }
        }
    }
    if (varints) { /* words_to_bytes: varint.encode, which must fill the block exactly */
        if (encode_varints(words, n, NULL) != b->out_nbytes) fail(c, FAIL_CORRUPT);
        encode_varints(words, n, dest);
    } else {
        store_words(words, n, t.width, dest);
    }
}

static int cmp_u64_pair(const void *a, const void *b) { return cmp_range(a, b); }

/* _check_layout: blocks and parameters tile the file with the skeleton; sorted ranges. */
static Range *check_layout(Ctx *c, const Table *t, uint64_t target_size) {
    size_t n = t->n_params + t->n_blocks;
    Range *ranges = take_mem(c, n, sizeof(Range));
    for (size_t i = 0; i < t->n_params; i++)
        ranges[i] = (Range){t->params[i].out_offset, t->params[i].out_nbytes};
    for (size_t i = 0; i < t->n_blocks; i++)
        ranges[t->n_params + i] = (Range){t->blocks[i].out_offset, t->blocks[i].out_nbytes};
    qsort(ranges, n, sizeof(Range), cmp_u64_pair);
    uint64_t pos = 0, covered = 0;
    for (size_t i = 0; i < n; i++) {
        if (ranges[i].offset < pos) fail(c, FAIL_CORRUPT);
        if (ranges[i].length > target_size || ranges[i].offset > target_size) fail(c, FAIL_CORRUPT);
        pos = ranges[i].offset + ranges[i].length;
        covered += ranges[i].length;
    }
    if (pos > target_size || covered > target_size || covered + t->skeleton_len != target_size)
        fail(c, FAIL_CORRUPT);
    for (size_t i = 1; i < t->n_blocks; i++)
        if (t->blocks[i].out_offset < t->blocks[i - 1].out_offset) fail(c, FAIL_CORRUPT);
    return ranges;
}

/* ---- the Python interface --------------------------------------------------------- */

static PyObject *ranges_list(const Range *ranges, size_t n) {
    PyObject *list = PyList_New((Py_ssize_t)n);
    if (!list) return NULL;
    for (size_t i = 0; i < n; i++) {
        PyObject *pair = Py_BuildValue("(KK)", (unsigned long long)ranges[i].offset,
                                       (unsigned long long)ranges[i].length);
        if (!pair) {
            Py_DECREF(list);
            return NULL;
        }
        PyList_SET_ITEM(list, (Py_ssize_t)i, pair);
    }
    return list;
}

PyDoc_STRVAR(ranges_doc,
             "ranges(old, table, target_size) -> (old_cuts, covered) | None\n\n"
             "The table's cuts of the old file and the new file's ranges that blocks cover,\n"
             "each a sorted list of (offset, length); None where the Python decoder must decide.");

static PyObject *py_ranges(PyObject *self, PyObject *args) {
    (void)self;
    Py_buffer old, table;
    unsigned long long target_size;
    if (!PyArg_ParseTuple(args, "y*y*K", &old, &table, &target_size)) return NULL;
    /* on the heap: what longjmp leaves behind must not live in registers */
    Ctx *c = ctx_new();
    declined_why = 0;
    if (!c) {
        PyBuffer_Release(&old);
        PyBuffer_Release(&table);
        return PyErr_NoMemory();
    }
    PyObject *result = NULL;
    if (setjmp(c->jump) == 0) {
        OldList list = old_tensors(c, old.buf, (size_t)old.len);
        Table t = read_table(c, table.buf, (size_t)table.len, &list);
        Range *covered = check_layout(c, &t, target_size);
        PyObject *cuts = ranges_list(t.cuts, t.n_cuts);
        PyObject *cov = cuts ? ranges_list(covered, t.n_params + t.n_blocks) : NULL;
        if (cuts && cov) result = Py_BuildValue("(NN)", cuts, cov);
        else {
            Py_XDECREF(cuts);
            Py_XDECREF(cov);
        }
    } else {
        result = Py_NewRef(Py_None);
    }
    ctx_free(c);
    PyBuffer_Release(&old);
    PyBuffer_Release(&table);
    return result;
}

PyDoc_STRVAR(decode_doc,
             "decode(old, table, skeleton, chunks, target_size, decompress) -> bytes | None\n\n"
             "The new file rebuilt from the base, the decompressed table, the decoded skeleton\n"
             "and the CHUNK records' data (a tuple); ``decompress(frame, size)`` inflates a zstd\n"
             "frame. None: not decoded here (unsupported or damaged): use the Python decoder.");

static PyObject *py_decode(PyObject *self, PyObject *args) {
    (void)self;
    Py_buffer old, table, skeleton;
    PyObject *chunk_tuple, *decompress;
    unsigned long long target_size;
    if (!PyArg_ParseTuple(args, "y*y*y*O!KO", &old, &table, &skeleton, &PyTuple_Type, &chunk_tuple,
                          &target_size, &decompress))
        return NULL;
    Ctx *c = ctx_new(); /* on the heap: see py_ranges */
    declined_why = 0;
    if (!c) {
        PyBuffer_Release(&old);
        PyBuffer_Release(&table);
        PyBuffer_Release(&skeleton);
        return PyErr_NoMemory();
    }
    c->decompress = decompress;
    c->chunks.tuple = chunk_tuple;
    PyObject *out = NULL;
    if (target_size > (unsigned long long)PY_SSIZE_T_MAX) {
        out = Py_NewRef(Py_None);
        goto done;
    }
    out = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)target_size);
    if (!out) goto done;
    if (setjmp(c->jump) == 0) {
        uint8_t *dest = (uint8_t *)PyBytes_AS_STRING(out);
        Old base = {old.buf, (size_t)old.len};
        OldList list = old_tensors(c, old.buf, (size_t)old.len);
        Table t = read_table(c, table.buf, (size_t)table.len, &list);
        Range *ranges = check_layout(c, &t, target_size);
        if ((uint64_t)skeleton.len != t.skeleton_len) fail(c, FAIL_CORRUPT);
        Param *params = take_mem(c, t.n_params, sizeof(Param));
        for (size_t i = 0; i < t.n_params; i++) {
            const Block *b = &t.params[i];
            const uint8_t *payload = chunks_take(c, b->payload_len);
            decode_block(c, b, payload, &base, params, i, dest + b->out_offset);
            EType pt = etype_of(b->dtype);
            if (b->storage == STORAGE_VARINT) { /* its values, cut to the element's width */
                uint64_t count;
                uint64_t *words = decode_varints(c, dest + b->out_offset, b->out_nbytes, &count);
                uint8_t *packed = take_mem(c, count, (size_t)pt.width);
                store_words(words, count, pt.width, packed);
                params[i] = (Param){b->dtype, packed, count};
                continue;
            }
            if (b->out_nbytes % (uint64_t)pt.width) fail(c, FAIL_CORRUPT);
            params[i] = (Param){b->dtype, dest + b->out_offset, b->out_nbytes / (uint64_t)pt.width};
        }
        for (size_t i = 0; i < t.n_blocks; i++) {
            const Block *b = &t.blocks[i];
            const uint8_t *payload = chunks_take(c, b->payload_len);
            decode_block(c, b, payload, &base, params, t.n_params, dest + b->out_offset);
        }
        Chunks *ch = &c->chunks;
        if ((ch->held && ch->pos != (size_t)ch->current.len) ||
            ch->next != PyTuple_GET_SIZE(chunk_tuple))
            fail(c, FAIL_CORRUPT);
        /* the skeleton fills the gaps, front to back */
        const uint8_t *skel = skeleton.buf;
        uint64_t used = 0, pos = 0;
        for (size_t i = 0; i < t.n_params + t.n_blocks; i++) {
            uint64_t gap = ranges[i].offset - pos;
            memcpy(dest + pos, skel + used, gap);
            used += gap;
            pos = ranges[i].offset + ranges[i].length;
        }
        memcpy(dest + pos, skel + used, target_size - pos);
    } else {
        Py_DECREF(out);
        out = Py_NewRef(Py_None);
    }
done:
    chunks_release(&c->chunks);
    ctx_free(c);
    PyBuffer_Release(&old);
    PyBuffer_Release(&table);
    PyBuffer_Release(&skeleton);
    return out;
}

PyDoc_STRVAR(unpack_words_doc,
             "unpack_words(payload, count, dtype, layout, predicted, decompress) -> bytes | None\n\n"
             "frames.unpack_frames for one block's residual, as little-endian words of the\n"
             "dtype's width (``predicted``: the prediction's words, for the GROUPED layout).\n"
             "For the differential tests against the Python decoder.");

static PyObject *py_unpack_words(PyObject *self, PyObject *args) {
    (void)self;
    Py_buffer payload, predicted;
    unsigned long long count, dtype;
    int layout;
    PyObject *decompress;
    if (!PyArg_ParseTuple(args, "y*KKiy*O", &payload, &count, &dtype, &layout, &predicted,
                          &decompress))
        return NULL;
    Ctx *c = ctx_new();
    declined_why = 0;
    if (!c) {
        PyBuffer_Release(&payload);
        PyBuffer_Release(&predicted);
        return PyErr_NoMemory();
    }
    c->decompress = decompress;
    PyObject *out = NULL;
    EType t = etype_of(dtype);
    if (count > BLOCK_WORDS || layout < 0 || layout > L_SPARSE ||
        (uint64_t)predicted.len != (layout == L_GROUPED ? count * (uint64_t)t.width : 0)) {
        out = Py_NewRef(Py_None);
    } else if (setjmp(c->jump) == 0) {
        uint64_t *words = scratch(c, S_WORDS, count);
        Payload r = {payload.buf, (size_t)payload.len, 0};
        if (layout == L_GROUPED) {
            Block b;
            memset(&b, 0, sizeof(b));
            b.dtype = dtype;
            b.storage = STORAGE_RAW;
            b.word_count = count;
            uint64_t *guess = scratch(c, S_PREDICTED, count);
            load_words(predicted.buf, count, t.width, guess);
            read_grouped(c, &r, &b, guess, words);
        } else {
            read_words(c, &r, count, t.width, layout, words);
        }
        if (r.pos != r.n) fail(c, FAIL_CORRUPT);
        out = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)(count * (uint64_t)t.width));
        if (out) store_words(words, count, t.width, (uint8_t *)PyBytes_AS_STRING(out));
    } else {
        out = Py_NewRef(Py_None);
    }
    ctx_free(c);
    PyBuffer_Release(&payload);
    PyBuffer_Release(&predicted);
    return out;
}

PyDoc_STRVAR(last_decline_doc,
             "last_decline() -> (reason, line) | None\n\n"
             "Why the last call answered None: 'unsupported', 'damaged' or 'memory', and the\n"
             "line of _native.c that decided it; None after a call that decoded.");

static PyObject *py_last_decline(PyObject *self, PyObject *noargs) {
    (void)self;
    (void)noargs;
    static const char *reasons[] = {"", "unsupported", "damaged", "memory"};
    if (!declined_why) Py_RETURN_NONE;
    return Py_BuildValue("(si)", reasons[declined_why], declined_line);
}

static PyMethodDef methods[] = {
    {"ranges", py_ranges, METH_VARARGS, ranges_doc},
    {"decode", py_decode, METH_VARARGS, decode_doc},
    {"unpack_words", py_unpack_words, METH_VARARGS, unpack_words_doc},
    {"last_decline", py_last_decline, METH_NOARGS, last_decline_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_native", "The delta decoder's compiled fast path (see native.py).",
    -1, methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__native(void) { return PyModule_Create(&module); }
