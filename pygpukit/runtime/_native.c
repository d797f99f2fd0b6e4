/*
 * pygpukit.runtime._native -- the memory book in C, and PyTorch's allocator on it.
 *
 * Book: the numbers of the runtime's memory ledger (runtime/_ledger.py keeps the policy:
 * pressure handlers, eviction, errors). Each account holds bytes against its budget
 * (max_vram), its reservation and the device's shared remainder. The numbers live here so
 * that PyTorch's allocator can charge them without the GIL: PyTorch calls pygpukit_torch_alloc
 * while it holds its own allocator lock, and a thread holding the GIL may be waiting for that
 * lock (every tensor freed from Python takes it), so the allocator must never wait for the
 * GIL. Every operation takes the book's mutex, which nobody holds while waiting for
 * anything else.
 *
 * Arena: a Guaranteed context's reservation is one block of device memory carved into ranges
 * (best fit; freed ranges coalesce). The block belongs to the arena, which is freed once the
 * Python object and every range PyTorch still holds have gone.
 *
 * PyTorch: pygpukit_torch_alloc / pygpukit_torch_free are a CUDAPluggableAllocator's
 * functions (runtime/_torch.py makes one torch.cuda.MemPool on them per context and thread).
 * The account charged is the calling thread's binding (bind()); a refusal returns NULL, which
 * PyTorch turns into torch.OutOfMemoryError after freeing the pool's cached blocks and trying
 * once more; the refusal is remembered per thread so that the error can be translated.
 *
 * No CUDA header: the driver's entry points are looked up with dlsym on first use, so the
 * module builds and imports on machines without a GPU.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <dlfcn.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* ---- the driver ------------------------------------------------------------------------ */

typedef int CUresult;
typedef void *CUstream;
typedef void *CUpool;
typedef uint64_t CUdeviceptr;

static struct {
    int loaded; /* 0: not tried, 1: ok, -1: missing */
    CUresult (*alloc_pool_async)(CUdeviceptr *, size_t, CUpool, CUstream);
    CUresult (*free_async)(CUdeviceptr, CUstream);
    CUresult (*alloc)(CUdeviceptr *, size_t);
    CUresult (*free)(CUdeviceptr);
    CUresult (*is_capturing)(CUstream, int *);
    CUresult (*exchange_mode)(int *);
    CUresult (*ctx_current)(void **);
    CUresult (*ctx_push)(void *);
    CUresult (*ctx_pop)(void **);
} cu;
static pthread_mutex_t cu_lock = PTHREAD_MUTEX_INITIALIZER;

static int load_driver(void) {
    if (cu.loaded)
        return cu.loaded;
    pthread_mutex_lock(&cu_lock);
    if (!cu.loaded) {
        void *lib = dlopen("libcuda.so.1", RTLD_NOW | RTLD_GLOBAL);
        int ok = lib != NULL;
        if (ok) {
            cu.alloc_pool_async = dlsym(lib, "cuMemAllocFromPoolAsync");
            cu.free_async = dlsym(lib, "cuMemFreeAsync");
            cu.alloc = dlsym(lib, "cuMemAlloc_v2");
            cu.free = dlsym(lib, "cuMemFree_v2");
            cu.is_capturing = dlsym(lib, "cuStreamIsCapturing");
            cu.exchange_mode = dlsym(lib, "cuThreadExchangeStreamCaptureMode");
            cu.ctx_current = dlsym(lib, "cuCtxGetCurrent");
            cu.ctx_push = dlsym(lib, "cuCtxPushCurrent_v2");
            cu.ctx_pop = dlsym(lib, "cuCtxPopCurrent_v2");
            ok = cu.alloc_pool_async && cu.free_async && cu.alloc && cu.free &&
                 cu.is_capturing && cu.exchange_mode && cu.ctx_current && cu.ctx_push &&
                 cu.ctx_pop;
        }
        cu.loaded = ok ? 1 : -1;
    }
    pthread_mutex_unlock(&cu_lock);
    return cu.loaded;
}

enum { CAPTURE_RELAXED = 2 };

/* Device memory not ordered on any stream: for a capturing stream, where a stream-ordered
 * allocation would become a node of the graph. Relaxed, so that it does not break the
 * capture. Freed with cuMemFree, also relaxed. */
static CUdeviceptr plain_alloc(size_t n) {
    CUdeviceptr p = 0;
    int mode = CAPTURE_RELAXED;
    cu.exchange_mode(&mode);
    if (cu.alloc(&p, n) != 0)
        p = 0;
    cu.exchange_mode(&mode);
    return p;
}

static void plain_free(CUdeviceptr p) {
    int mode = CAPTURE_RELAXED;
    cu.exchange_mode(&mode);
    cu.free(p);
    cu.exchange_mode(&mode);
}

/* ---- the arena --------------------------------------------------------------------------- */

typedef struct {
    int64_t start, length;
} range_t;

typedef struct arena {
    pthread_mutex_t lock;
    int64_t size, used;
    range_t *free; /* sorted by start */
    int nfree, capfree;
    CUdeviceptr base; /* 0 for an arena of offsets only (tests, the host) */
    int owns_base;    /* 1: from a stream-ordered pool, 2: from cuMemAlloc */
    void *context;    /* the CUDA context the block is in */
    CUstream stream;  /* the stream its free is ordered on (NULL once that stream is gone) */
    _Atomic long refs; /* the Python object + one per range PyTorch holds */
} arena_t;

static arena_t *arena_new(int64_t size) {
    arena_t *a = calloc(1, sizeof *a);
    if (!a)
        return NULL;
    a->free = malloc(8 * sizeof(range_t));
    if (!a->free) {
        free(a);
        return NULL;
    }
    pthread_mutex_init(&a->lock, NULL);
    a->size = size;
    a->capfree = 8;
    a->nfree = 1;
    a->free[0].start = 0;
    a->free[0].length = size;
    atomic_init(&a->refs, 1);
    return a;
}

static void arena_unref(arena_t *a) {
    if (atomic_fetch_sub(&a->refs, 1) != 1)
        return;
    if (a->owns_base && a->base && load_driver() == 1) {
        /* the last range is gone: nothing uses the block (from any thread: in its context) */
        void *popped = NULL;
        int pushed = cu.ctx_push(a->context) == 0;
        if (a->owns_base != 1 || cu.free_async(a->base, a->stream) != 0)
            plain_free(a->base); /* cuMemFree takes pool memory too (waiting for the device) */
        if (pushed)
            cu.ctx_pop(&popped);
    }
    pthread_mutex_destroy(&a->lock);
    free(a->free);
    free(a);
}

/* The offset of n free bytes (the smallest range that fits), or -1. */
static int64_t arena_take(arena_t *a, int64_t n) {
    pthread_mutex_lock(&a->lock);
    int best = -1;
    for (int i = 0; i < a->nfree; i++) {
        if (a->free[i].length >= n && (best < 0 || a->free[i].length < a->free[best].length)) {
            best = i;
            if (a->free[i].length == n)
                break;
        }
    }
    int64_t offset = -1;
    if (best >= 0) {
        offset = a->free[best].start;
        if (a->free[best].length == n) {
            memmove(&a->free[best], &a->free[best + 1],
                    (size_t)(a->nfree - best - 1) * sizeof(range_t));
            a->nfree--;
        } else {
            a->free[best].start += n;
            a->free[best].length -= n;
        }
        a->used += n;
    }
    pthread_mutex_unlock(&a->lock);
    return offset;
}

/* Give back n bytes at offset; 0, or -1 when the list could not grow (the range is lost). */
static int arena_give(arena_t *a, int64_t offset, int64_t n) {
    int rc = 0;
    pthread_mutex_lock(&a->lock);
    a->used -= n;
    int i = 0; /* the first free range after offset */
    int lo = 0, hi = a->nfree;
    while (lo < hi) {
        int mid = (lo + hi) / 2;
        if (a->free[mid].start < offset)
            lo = mid + 1;
        else
            hi = mid;
    }
    i = lo;
    int merge_next = i < a->nfree && a->free[i].start == offset + n;
    int merge_prev = i > 0 && a->free[i - 1].start + a->free[i - 1].length == offset;
    if (merge_prev && merge_next) {
        a->free[i - 1].length += n + a->free[i].length;
        memmove(&a->free[i], &a->free[i + 1], (size_t)(a->nfree - i - 1) * sizeof(range_t));
        a->nfree--;
    } else if (merge_prev) {
        a->free[i - 1].length += n;
    } else if (merge_next) {
        a->free[i].start = offset;
        a->free[i].length += n;
    } else {
        if (a->nfree == a->capfree) {
            range_t *grown = realloc(a->free, (size_t)a->capfree * 2 * sizeof(range_t));
            if (!grown) {
                rc = -1;
                goto out;
            }
            a->free = grown;
            a->capfree *= 2;
        }
        memmove(&a->free[i + 1], &a->free[i], (size_t)(a->nfree - i) * sizeof(range_t));
        a->free[i].start = offset;
        a->free[i].length = n;
        a->nfree++;
    }
out:
    pthread_mutex_unlock(&a->lock);
    return rc;
}

static int64_t arena_largest(arena_t *a) {
    pthread_mutex_lock(&a->lock);
    int64_t best = 0;
    for (int i = 0; i < a->nfree; i++)
        if (a->free[i].length > best)
            best = a->free[i].length;
    pthread_mutex_unlock(&a->lock);
    return best;
}

/* ---- the book ------------------------------------------------------------------------------ */

typedef struct {
    int64_t held, peak, reserved, max_vram, base_vram;
    int in_use, closed;
    arena_t *arena;   /* a Guaranteed context's reservation (one reference), or NULL */
} account_t;

typedef struct book {
    pthread_mutex_t lock;
    int64_t capacity, reserved_total, shared_used;
    account_t *acc;
    int nacc, capacc;
    CUpool pool; /* the backend's stream-ordered pool, or NULL: cuMemAlloc */
    _Atomic long refs; /* the Python object + one per block PyTorch holds */
} book_t;

static void book_unref(book_t *b) {
    if (atomic_fetch_sub(&b->refs, 1) != 1)
        return;
    for (int i = 0; i < b->nacc; i++)
        if (b->acc[i].arena)
            arena_unref(b->acc[i].arena);
    pthread_mutex_destroy(&b->lock);
    free(b->acc);
    free(b);
}

static int64_t over(int64_t held, int64_t reserved) {
    return held > reserved ? held - reserved : 0;
}

/* What account i could still get (call with the lock held). */
static int64_t available_locked(book_t *b, int i) {
    account_t *a = &b->acc[i];
    int64_t shared = b->capacity - b->reserved_total - b->shared_used;
    if (shared < 0)
        shared = 0;
    int64_t from_reservation = a->reserved > a->held ? a->reserved - a->held : 0;
    int64_t room = from_reservation + shared;
    int64_t budget = a->max_vram - a->held;
    int64_t v = room < budget ? room : budget;
    return v > 0 ? v : 0;
}

static void set_held_locked(book_t *b, account_t *a, int64_t held) {
    b->shared_used += over(held, a->reserved) - over(a->held, a->reserved);
    a->held = held;
    if (held > a->peak)
        a->peak = held;
}

/* 1: charged; 0: does not fit; -1: the account is closed. */
static int book_try(book_t *b, int i, int64_t n) {
    pthread_mutex_lock(&b->lock);
    int rc;
    account_t *a = &b->acc[i];
    if (a->closed)
        rc = -1;
    else if (n > available_locked(b, i))
        rc = 0;
    else {
        set_held_locked(b, a, a->held + n);
        rc = 1;
    }
    pthread_mutex_unlock(&b->lock);
    return rc;
}

static void book_release(book_t *b, int i, int64_t n) {
    pthread_mutex_lock(&b->lock);
    set_held_locked(b, &b->acc[i], b->acc[i].held - n);
    pthread_mutex_unlock(&b->lock);
}

/* ---- PyTorch's blocks ---------------------------------------------------------------------- */

/* Every block given to PyTorch, by address: who was charged, and how to give it back. */
enum { BLOCK_POOL = 0, BLOCK_PLAIN = 1, BLOCK_ARENA = 2 };

typedef struct {
    CUdeviceptr ptr; /* 0: empty, 1: deleted */
    int64_t size;
    book_t *book;
    int account;
    int kind;
} block_t;

static block_t *blocks = NULL;
static size_t blocks_cap = 0, blocks_used = 0, blocks_live = 0;
static pthread_mutex_t blocks_lock = PTHREAD_MUTEX_INITIALIZER;

static size_t slot_of(CUdeviceptr p, size_t cap) {
    uint64_t h = (uint64_t)p * 0x9E3779B97F4A7C15ull;
    return (size_t)(h >> 17) & (cap - 1);
}

static int blocks_grow(void) {
    size_t cap = blocks_cap ? blocks_cap * 2 : 1024;
    block_t *grown = calloc(cap, sizeof(block_t));
    if (!grown)
        return -1;
    for (size_t i = 0; i < blocks_cap; i++) {
        if (blocks[i].ptr > 1) {
            size_t j = slot_of(blocks[i].ptr, cap);
            while (grown[j].ptr)
                j = (j + 1) & (cap - 1);
            grown[j] = blocks[i];
        }
    }
    free(blocks);
    blocks = grown;
    blocks_cap = cap;
    blocks_used = blocks_live;
    return 0;
}

static int blocks_put(block_t blk) {
    pthread_mutex_lock(&blocks_lock);
    if ((blocks_used + 1) * 2 > blocks_cap && blocks_grow() != 0) {
        pthread_mutex_unlock(&blocks_lock);
        return -1;
    }
    size_t j = slot_of(blk.ptr, blocks_cap);
    while (blocks[j].ptr > 1)
        j = (j + 1) & (blocks_cap - 1);
    if (blocks[j].ptr == 0)
        blocks_used++;
    blocks[j] = blk;
    blocks_live++;
    pthread_mutex_unlock(&blocks_lock);
    return 0;
}

static int blocks_pop(CUdeviceptr p, block_t *out) {
    int found = 0;
    pthread_mutex_lock(&blocks_lock);
    if (blocks_cap) {
        size_t j = slot_of(p, blocks_cap);
        while (blocks[j].ptr) {
            if (blocks[j].ptr == p) {
                *out = blocks[j];
                blocks[j].ptr = 1;
                blocks_live--;
                found = 1;
                break;
            }
            j = (j + 1) & (blocks_cap - 1);
        }
    }
    pthread_mutex_unlock(&blocks_lock);
    return found;
}

/* The calling thread's binding, and its last refusal. */
static __thread book_t *tls_book = NULL;
static __thread int tls_account = -1;
enum { REFUSED_NONE = 0, REFUSED_BUDGET = 1, REFUSED_CLOSED = 2, REFUSED_DEVICE = 3,
       REFUSED_UNBOUND = 4 };
static __thread int tls_refused = REFUSED_NONE;
static __thread int64_t tls_refused_size = 0;
static __thread int tls_refused_account = -1;
static __thread book_t *tls_refused_book = NULL;

static void *refuse(int why, size_t size) {
    tls_refused = why;
    tls_refused_size = (int64_t)size;
    tls_refused_book = tls_book;
    tls_refused_account = tls_account;
    return NULL;
}

__attribute__((visibility("default"))) void *pygpukit_torch_alloc(size_t size, int device,
                                                                   void *stream) {
    (void)device; /* a runtime's pools are on its own device; bind() is per device */
    book_t *b = tls_book;
    int i = tls_account;
    if (b == NULL || i < 0)
        return refuse(REFUSED_UNBOUND, size);
    if (size == 0)
        size = 1;
    int charged = book_try(b, i, (int64_t)size);
    if (charged <= 0)
        return refuse(charged < 0 ? REFUSED_CLOSED : REFUSED_BUDGET, size);
    block_t blk = {0, (int64_t)size, b, i, BLOCK_POOL};
    if (load_driver() != 1) {
        book_release(b, i, (int64_t)size);
        return refuse(REFUSED_DEVICE, size);
    }
    int capturing = 0;
    if (stream && cu.is_capturing((CUstream)stream, &capturing) != 0)
        capturing = 1; /* an invalidated capture: stay out of it */
    pthread_mutex_lock(&b->lock);
    arena_t *arena = b->acc[i].arena; /* the account array may move: read under the lock */
    CUpool pool = b->pool;
    pthread_mutex_unlock(&b->lock);
    if (arena && arena->base) {
        int64_t off = arena_take(arena, (int64_t)size);
        if (off >= 0) {
            atomic_fetch_add(&arena->refs, 1);
            blk.ptr = arena->base + (CUdeviceptr)off;
            blk.kind = BLOCK_ARENA;
        }
    } else if (capturing || pool == NULL) {
        blk.ptr = plain_alloc(size);
        blk.kind = BLOCK_PLAIN;
    } else if (cu.alloc_pool_async(&blk.ptr, size, pool, (CUstream)stream) != 0) {
        blk.ptr = 0;
    }
    if (blk.ptr == 0) {
        book_release(b, i, (int64_t)size);
        /* a fragmented reservation, or a device without the memory the budget promised */
        return refuse(arena ? REFUSED_BUDGET : REFUSED_DEVICE, size);
    }
    atomic_fetch_add(&b->refs, 1);
    if (blocks_put(blk) != 0) {
        atomic_fetch_sub(&b->refs, 1);
        if (blk.kind == BLOCK_ARENA) {
            arena_give(arena, (int64_t)(blk.ptr - arena->base), (int64_t)size);
            arena_unref(arena);
        } else if (blk.kind == BLOCK_PLAIN) {
            plain_free(blk.ptr);
        } else {
            cu.free_async(blk.ptr, (CUstream)stream);
        }
        book_release(b, i, (int64_t)size);
        return refuse(REFUSED_DEVICE, size);
    }
    tls_refused = REFUSED_NONE;
    return (void *)(uintptr_t)blk.ptr;
}

__attribute__((visibility("default"))) void pygpukit_torch_free(void *ptr, size_t size,
                                                                 int device, void *stream) {
    (void)size;
    (void)device;
    block_t blk;
    if (ptr == NULL || !blocks_pop((CUdeviceptr)(uintptr_t)ptr, &blk))
        return;
    book_t *b = blk.book;
    pthread_mutex_lock(&b->lock);
    arena_t *arena = b->acc[blk.account].arena;
    int closed = b->acc[blk.account].closed;
    pthread_mutex_unlock(&b->lock);
    if (blk.kind == BLOCK_ARENA) {
        arena_give(arena, (int64_t)(blk.ptr - arena->base), blk.size);
        arena_unref(arena);
    } else if (blk.kind == BLOCK_PLAIN) {
        plain_free(blk.ptr);
    } else {
        /* PyTorch frees a block once the work that used it is done; on its own stream while
         * that stream lives, else on the legacy stream (its context was destroyed and
         * synchronized). */
        CUstream on = closed ? NULL : (CUstream)stream;
        if (cu.free_async(blk.ptr, on) != 0)
            plain_free(blk.ptr);
    }
    book_release(b, blk.account, blk.size);
    book_unref(b);
}

/* ---- Python: Arena ------------------------------------------------------------------------- */

typedef struct {
    PyObject_HEAD
    arena_t *a;
} ArenaObject;

static PyTypeObject ArenaType;

static int Arena_init(ArenaObject *self, PyObject *args, PyObject *kw) {
    static char *names[] = {"size", NULL};
    long long size;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "L", names, &size))
        return -1;
    if (size <= 0) {
        PyErr_SetString(PyExc_ValueError, "an arena must be at least one byte long");
        return -1;
    }
    self->a = arena_new(size);
    if (!self->a) {
        PyErr_NoMemory();
        return -1;
    }
    return 0;
}

static void Arena_dealloc(ArenaObject *self) {
    if (self->a)
        arena_unref(self->a);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *Arena_take(ArenaObject *self, PyObject *arg) {
    long long n = PyLong_AsLongLong(arg);
    if (n == -1 && PyErr_Occurred())
        return NULL;
    if (n <= 0) {
        PyErr_Format(PyExc_ValueError, "an arena range must be at least one byte long, not %lld",
                     n);
        return NULL;
    }
    int64_t off = arena_take(self->a, n);
    if (off < 0)
        Py_RETURN_NONE;
    return PyLong_FromLongLong(off);
}

static PyObject *Arena_give(ArenaObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "give(offset, n)");
        return NULL;
    }
    long long off = PyLong_AsLongLong(args[0]), n = PyLong_AsLongLong(args[1]);
    if (PyErr_Occurred())
        return NULL;
    if (arena_give(self->a, off, n) != 0)
        return PyErr_NoMemory();
    Py_RETURN_NONE;
}

static PyObject *Arena_own_block(ArenaObject *self, PyObject *args) {
    /* own_block(pool, stream) -> (status, ptr): take the block of device memory the arena
     * carves, from the stream-ordered pool on stream (pool 0: cuMemAlloc); freed with the
     * arena, ordered on that stream while it lives (forget_stream() once it is gone) */
    unsigned long long pool, stream;
    if (!PyArg_ParseTuple(args, "KK", &pool, &stream))
        return NULL;
    if (load_driver() != 1) {
        PyErr_SetString(PyExc_RuntimeError, "the CUDA driver library (libcuda.so.1) is missing");
        return NULL;
    }
    if (self->a->base) {
        PyErr_SetString(PyExc_RuntimeError, "the arena already has its block");
        return NULL;
    }
    CUdeviceptr p = 0;
    CUresult rc;
    size_t size = (size_t)self->a->size;
    Py_BEGIN_ALLOW_THREADS;
    if (pool)
        rc = cu.alloc_pool_async(&p, size, (CUpool)(uintptr_t)pool, (CUstream)(uintptr_t)stream);
    else
        rc = cu.alloc(&p, size);
    Py_END_ALLOW_THREADS;
    if (rc != 0)
        return Py_BuildValue("(iK)", rc, 0ULL);
    cu.ctx_current(&self->a->context);
    self->a->base = p;
    self->a->owns_base = pool ? 1 : 2;
    self->a->stream = (CUstream)(uintptr_t)stream;
    return Py_BuildValue("(iK)", 0, (unsigned long long)p);
}

static PyObject *Arena_forget_stream(ArenaObject *self, PyObject *unused) {
    /* forget_stream(): the block's stream is gone; its free goes on the legacy stream */
    (void)unused;
    pthread_mutex_lock(&self->a->lock);
    self->a->stream = NULL;
    pthread_mutex_unlock(&self->a->lock);
    Py_RETURN_NONE;
}

static PyObject *Arena_get_used(ArenaObject *self, void *c) {
    (void)c;
    pthread_mutex_lock(&self->a->lock);
    int64_t used = self->a->used;
    pthread_mutex_unlock(&self->a->lock);
    return PyLong_FromLongLong(used);
}

static PyObject *Arena_get_size(ArenaObject *self, void *c) {
    (void)c;
    return PyLong_FromLongLong(self->a->size);
}

static PyObject *Arena_get_largest(ArenaObject *self, void *c) {
    (void)c;
    return PyLong_FromLongLong(arena_largest(self->a));
}

static PyObject *Arena_get_base(ArenaObject *self, void *c) {
    (void)c;
    return PyLong_FromUnsignedLongLong(self->a->base);
}

static PyMethodDef Arena_methods[] = {
    {"take", (PyCFunction)Arena_take, METH_O,
     "take(n): the offset of n free bytes (smallest fitting range), or None"},
    {"give", (PyCFunction)(void (*)(void))Arena_give, METH_FASTCALL,
     "give(offset, n): return n bytes at offset"},
    {"own_block", (PyCFunction)Arena_own_block, METH_VARARGS,
     "own_block(pool, stream) -> (status, ptr): take the block of device memory it carves"},
    {"forget_stream", (PyCFunction)Arena_forget_stream, METH_NOARGS,
     "forget_stream(): the block's stream is gone"},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef Arena_getset[] = {
    {"used", (getter)Arena_get_used, NULL, "bytes taken", NULL},
    {"size", (getter)Arena_get_size, NULL, "bytes in all", NULL},
    {"largest_free", (getter)Arena_get_largest, NULL, "the longest free range", NULL},
    {"base", (getter)Arena_get_base, NULL, "the block's device address (0: none)", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject ArenaType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "pygpukit.runtime._native.Arena",
    .tp_basicsize = sizeof(ArenaObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Offsets into a region; freed ranges coalesce with their neighbours.",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Arena_init,
    .tp_dealloc = (destructor)Arena_dealloc,
    .tp_methods = Arena_methods,
    .tp_getset = Arena_getset,
};

/* ---- Python: Book -------------------------------------------------------------------------- */

typedef struct {
    PyObject_HEAD
    book_t *b;
} BookObject;

static int Book_init(BookObject *self, PyObject *args, PyObject *kw) {
    static char *names[] = {"capacity", NULL};
    long long capacity;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "L", names, &capacity))
        return -1;
    book_t *b = calloc(1, sizeof *b);
    if (!b) {
        PyErr_NoMemory();
        return -1;
    }
    pthread_mutex_init(&b->lock, NULL);
    b->capacity = capacity;
    atomic_init(&b->refs, 1);
    self->b = b;
    return 0;
}

static void Book_dealloc(BookObject *self) {
    if (self->b)
        book_unref(self->b);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int account_arg(BookObject *self, PyObject *arg, int *out) {
    long i = PyLong_AsLong(arg);
    if (i == -1 && PyErr_Occurred())
        return -1;
    if (i < 0 || i >= self->b->nacc || !self->b->acc[i].in_use) {
        PyErr_Format(PyExc_ValueError, "no open account %ld in this book", i);
        return -1;
    }
    *out = (int)i;
    return 0;
}

static PyObject *Book_open(BookObject *self, PyObject *args) {
    /* open(max_vram, base_vram, reserved) -> account number; the caller checked the fit */
    long long max_vram, base_vram, reserved;
    if (!PyArg_ParseTuple(args, "LLL", &max_vram, &base_vram, &reserved))
        return NULL;
    book_t *b = self->b;
    pthread_mutex_lock(&b->lock);
    int i = 0;
    while (i < b->nacc && b->acc[i].in_use)
        i++;
    if (i == b->nacc) {
        if (b->nacc == b->capacc) {
            int cap = b->capacc ? b->capacc * 2 : 16;
            account_t *grown = realloc(b->acc, (size_t)cap * sizeof(account_t));
            if (!grown) {
                pthread_mutex_unlock(&b->lock);
                return PyErr_NoMemory();
            }
            b->acc = grown;
            b->capacc = cap;
        }
        b->nacc++;
    }
    account_t *a = &b->acc[i];
    memset(a, 0, sizeof *a);
    a->in_use = 1;
    a->max_vram = max_vram;
    a->base_vram = base_vram;
    a->reserved = reserved;
    b->reserved_total += reserved;
    pthread_mutex_unlock(&b->lock);
    return PyLong_FromLong(i);
}

static PyObject *Book_close(BookObject *self, PyObject *arg) {
    /* close(i): the context is gone: no new charge, its reservation released */
    int i;
    if (account_arg(self, arg, &i) < 0)
        return NULL;
    book_t *b = self->b;
    pthread_mutex_lock(&b->lock);
    account_t *a = &b->acc[i];
    if (!a->closed) {
        b->shared_used += over(a->held, 0) - over(a->held, a->reserved);
        b->reserved_total -= a->reserved;
        a->reserved = 0;
        a->closed = 1;
    }
    pthread_mutex_unlock(&b->lock);
    Py_RETURN_NONE;
}

static PyObject *Book_drop(BookObject *self, PyObject *arg) {
    /* drop(i): forget a closed account that holds nothing; False if it still holds bytes */
    int i;
    if (account_arg(self, arg, &i) < 0)
        return NULL;
    book_t *b = self->b;
    pthread_mutex_lock(&b->lock);
    account_t *a = &b->acc[i];
    int gone = a->closed && a->held == 0;
    arena_t *arena = NULL;
    if (gone) {
        arena = a->arena;
        a->arena = NULL;
        a->in_use = 0;
    }
    pthread_mutex_unlock(&b->lock);
    if (arena)
        arena_unref(arena);
    return PyBool_FromLong(gone);
}

/* The (account, n) arguments of charge() and release(). */
static int account_bytes(BookObject *self, PyObject *const *args, Py_ssize_t nargs,
                         const char *usage, int *i, long long *n) {
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, usage);
        return -1;
    }
    if (account_arg(self, args[0], i) < 0)
        return -1;
    *n = PyLong_AsLongLong(args[1]);
    return (*n == -1 && PyErr_Occurred()) ? -1 : 0;
}

static PyObject *Book_charge(BookObject *self, PyObject *const *args, Py_ssize_t nargs) {
    /* charge(i, n) -> 1 charged, 0 does not fit, -1 closed */
    int i;
    long long n;
    if (account_bytes(self, args, nargs, "charge(account, n)", &i, &n) < 0)
        return NULL;
    return PyLong_FromLong(book_try(self->b, i, n));
}

static PyObject *Book_release(BookObject *self, PyObject *const *args, Py_ssize_t nargs) {
    int i;
    long long n;
    if (account_bytes(self, args, nargs, "release(account, n)", &i, &n) < 0)
        return NULL;
    book_release(self->b, i, n);
    Py_RETURN_NONE;
}

static PyObject *Book_available(BookObject *self, PyObject *arg) {
    int i;
    if (account_arg(self, arg, &i) < 0)
        return NULL;
    pthread_mutex_lock(&self->b->lock);
    int64_t v = available_locked(self->b, i);
    pthread_mutex_unlock(&self->b->lock);
    return PyLong_FromLongLong(v);
}

static PyObject *Book_state(BookObject *self, PyObject *arg) {
    /* state(i) -> (held, peak, reserved, max_vram, base_vram, closed) */
    int i;
    if (account_arg(self, arg, &i) < 0)
        return NULL;
    pthread_mutex_lock(&self->b->lock);
    account_t a = self->b->acc[i];
    pthread_mutex_unlock(&self->b->lock);
    return Py_BuildValue("(LLLLLO)", (long long)a.held, (long long)a.peak,
                         (long long)a.reserved, (long long)a.max_vram, (long long)a.base_vram,
                         a.closed ? Py_True : Py_False);
}

static PyObject *Book_totals(BookObject *self, PyObject *unused) {
    /* totals() -> (capacity, reserved_total, shared_free) */
    (void)unused;
    book_t *b = self->b;
    pthread_mutex_lock(&b->lock);
    int64_t shared = b->capacity - b->reserved_total - b->shared_used;
    PyObject *r = Py_BuildValue("(LLL)", (long long)b->capacity, (long long)b->reserved_total,
                                (long long)(shared > 0 ? shared : 0));
    pthread_mutex_unlock(&b->lock);
    return r;
}

static PyObject *Book_set_arena(BookObject *self, PyObject *args) {
    /* set_arena(i, arena): PyTorch's blocks for account i are carved from arena */
    PyObject *iarg;
    ArenaObject *arena;
    if (!PyArg_ParseTuple(args, "OO!", &iarg, &ArenaType, &arena))
        return NULL;
    int i;
    if (account_arg(self, iarg, &i) < 0)
        return NULL;
    pthread_mutex_lock(&self->b->lock);
    arena_t *old = self->b->acc[i].arena;
    atomic_fetch_add(&arena->a->refs, 1);
    self->b->acc[i].arena = arena->a;
    pthread_mutex_unlock(&self->b->lock);
    if (old)
        arena_unref(old);
    Py_RETURN_NONE;
}

static PyObject *Book_set_pool(BookObject *self, PyObject *arg) {
    /* set_pool(handle): the stream-ordered pool PyTorch's blocks come from (0: cuMemAlloc) */
    unsigned long long handle = PyLong_AsUnsignedLongLong(arg);
    if (PyErr_Occurred())
        return NULL;
    pthread_mutex_lock(&self->b->lock);
    self->b->pool = (CUpool)(uintptr_t)handle;
    pthread_mutex_unlock(&self->b->lock);
    Py_RETURN_NONE;
}

static PyMethodDef Book_methods[] = {
    {"open", (PyCFunction)Book_open, METH_VARARGS,
     "open(max_vram, base_vram, reserved) -> account"},
    {"close", (PyCFunction)Book_close, METH_O, "close(account): no new charges, no reservation"},
    {"drop", (PyCFunction)Book_drop, METH_O,
     "drop(account) -> bool: forget a closed account that holds nothing"},
    {"charge", (PyCFunction)(void (*)(void))Book_charge, METH_FASTCALL,
     "charge(account, n) -> 1 charged, 0 does not fit, -1 closed"},
    {"release", (PyCFunction)(void (*)(void))Book_release, METH_FASTCALL,
     "release(account, n)"},
    {"available", (PyCFunction)Book_available, METH_O, "available(account) -> bytes"},
    {"state", (PyCFunction)Book_state, METH_O,
     "state(account) -> (held, peak, reserved, max_vram, base_vram, closed)"},
    {"totals", (PyCFunction)Book_totals, METH_NOARGS,
     "totals() -> (capacity, reserved_total, shared_free)"},
    {"set_arena", (PyCFunction)Book_set_arena, METH_VARARGS, "set_arena(account, arena)"},
    {"set_pool", (PyCFunction)Book_set_pool, METH_O, "set_pool(handle)"},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject BookType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "pygpukit.runtime._native.Book",
    .tp_basicsize = sizeof(BookObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "The numbers of a memory ledger, shared with PyTorch's allocator.",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Book_init,
    .tp_dealloc = (destructor)Book_dealloc,
    .tp_methods = Book_methods,
};

/* ---- Python: the thread's binding ----------------------------------------------------------- */

static PyObject *mod_bind(PyObject *m, PyObject *const *args, Py_ssize_t nargs) {
    /* bind(book, account) -> the previous binding, for unbind(); bind(None, -1) unbinds */
    (void)m;
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "bind(book, account)");
        return NULL;
    }
    book_t *b = NULL;
    if (args[0] != Py_None) {
        if (!PyObject_TypeCheck(args[0], &BookType)) {
            PyErr_SetString(PyExc_TypeError, "bind() takes a Book");
            return NULL;
        }
        b = ((BookObject *)args[0])->b;
    }
    long i = PyLong_AsLong(args[1]);
    if (i == -1 && PyErr_Occurred())
        return NULL;
    PyObject *prev = Py_BuildValue("(Ki)", (unsigned long long)(uintptr_t)tls_book, tls_account);
    if (!prev)
        return NULL;
    tls_book = b;
    tls_account = b ? (int)i : -1;
    return prev;
}

static PyObject *mod_unbind(PyObject *m, PyObject *arg) {
    /* unbind(token): put back the binding bind() returned */
    (void)m;
    unsigned long long book;
    int i;
    if (!PyArg_ParseTuple(arg, "Ki", &book, &i))
        return NULL;
    tls_book = (book_t *)(uintptr_t)book;
    tls_account = i;
    Py_RETURN_NONE;
}

static PyObject *mod_last_refusal(PyObject *m, PyObject *unused) {
    /* last_refusal() -> None or (why, size, account): the calling thread's last refused
     * PyTorch allocation, forgotten once read */
    (void)m;
    (void)unused;
    if (tls_refused == REFUSED_NONE)
        Py_RETURN_NONE;
    PyObject *r = Py_BuildValue("(iLi)", tls_refused, (long long)tls_refused_size,
                                tls_refused_account);
    tls_refused = REFUSED_NONE;
    return r;
}

static PyObject *mod_live_blocks(PyObject *m, PyObject *unused) {
    (void)m;
    (void)unused;
    pthread_mutex_lock(&blocks_lock);
    size_t n = blocks_live;
    pthread_mutex_unlock(&blocks_lock);
    return PyLong_FromSize_t(n);
}

static PyMethodDef mod_methods[] = {
    {"bind", (PyCFunction)(void (*)(void))mod_bind, METH_FASTCALL,
     "bind(book, account) -> token: charge this thread's PyTorch allocations to account"},
    {"unbind", (PyCFunction)mod_unbind, METH_O, "unbind(token): the binding before bind()"},
    {"last_refusal", (PyCFunction)mod_last_refusal, METH_NOARGS,
     "last_refusal() -> None | (why, size, account)"},
    {"live_blocks", (PyCFunction)mod_live_blocks, METH_NOARGS,
     "blocks PyTorch holds from these functions now"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef moddef = {
    PyModuleDef_HEAD_INIT, "_native", "The memory book in C, and PyTorch's allocator on it.",
    -1, mod_methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__native(void) {
    if (PyType_Ready(&ArenaType) < 0 || PyType_Ready(&BookType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&moddef);
    if (!m)
        return NULL;
    Py_INCREF(&ArenaType);
    Py_INCREF(&BookType);
    if (PyModule_AddObject(m, "Arena", (PyObject *)&ArenaType) < 0 ||
        PyModule_AddObject(m, "Book", (PyObject *)&BookType) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    PyModule_AddIntConstant(m, "REFUSED_BUDGET", REFUSED_BUDGET);
    PyModule_AddIntConstant(m, "REFUSED_CLOSED", REFUSED_CLOSED);
    PyModule_AddIntConstant(m, "REFUSED_DEVICE", REFUSED_DEVICE);
    PyModule_AddIntConstant(m, "REFUSED_UNBOUND", REFUSED_UNBOUND);
    return m;
}
