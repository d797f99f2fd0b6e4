/*
 * The memory book and PyTorch's allocator on it: plain C, no Python (see _memory.h).
 *
 * Every operation on a book or an arena takes its mutex, which nobody holds while waiting
 * for anything else: PyTorch calls pygpukit_torch_alloc inside its own allocator lock, where
 * nothing may wait for the GIL. The driver's entry points are looked up with dlsym on first
 * use, so this builds and loads on machines without a GPU.
 */
#include "_memory.h"

#include <dlfcn.h>
#include <stdlib.h>
#include <string.h>

/* ---- the driver ------------------------------------------------------------------------ */

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

int load_driver(void) {
    if (cu.loaded)
        return cu.loaded;
    pthread_mutex_lock(&cu_lock);
    if (!cu.loaded) {
        void *lib = dlopen("libcuda.so.1", RTLD_NOW | RTLD_GLOBAL);
        if (lib == NULL) /* as the completion bridge (_cbridge.c) finds it */
            lib = dlopen("libcuda.so", RTLD_NOW | RTLD_GLOBAL);
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

arena_t *arena_new(int64_t size) {
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

void arena_unref(arena_t *a) {
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
int64_t arena_take(arena_t *a, int64_t n) {
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
int arena_give(arena_t *a, int64_t offset, int64_t n) {
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

int64_t arena_largest(arena_t *a) {
    pthread_mutex_lock(&a->lock);
    int64_t best = 0;
    for (int i = 0; i < a->nfree; i++)
        if (a->free[i].length > best)
            best = a->free[i].length;
    pthread_mutex_unlock(&a->lock);
    return best;
}

/* ---- the book ------------------------------------------------------------------------------ */

void book_unref(book_t *b) {
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

/* Memory no reservation holds and no burst uses (call with the lock held). */
static int64_t shared_free_locked(const book_t *b) {
    int64_t shared = b->capacity - b->reserved_total - b->shared_used;
    return shared > 0 ? shared : 0;
}

/* What account i could still get (call with the lock held). */
static int64_t available_locked(book_t *b, int i) {
    account_t *a = &b->acc[i];
    int64_t shared = shared_free_locked(b);
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
int book_try(book_t *b, int i, int64_t n) {
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

void book_release(book_t *b, int i, int64_t n) {
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

/* Rebuild the table for the blocks alive now, freed-slot markers dropped: sized from the
 * live blocks, not from the old size, so a process that sees ever new addresses (with few
 * alive at once) keeps a small table rather than doubling it at every rebuild. */
static int blocks_grow(void) {
    size_t cap = 1024;
    while (cap < (blocks_live + 1) * 4)
        cap *= 2;
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
static __thread int tls_refused = REFUSED_NONE;
static __thread int64_t tls_refused_size = 0;
static __thread int tls_refused_account = -1;

static void *refuse(int why, size_t size) {
    tls_refused = why;
    tls_refused_size = (int64_t)size;
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

/* ---- what the Python types need --------------------------------------------------------- */

CUresult arena_own_block(arena_t *a, CUpool pool, CUstream stream) {
    CUdeviceptr p = 0;
    CUresult rc = pool ? cu.alloc_pool_async(&p, (size_t)a->size, pool, stream)
                       : cu.alloc(&p, (size_t)a->size);
    if (rc != 0)
        return rc;
    cu.ctx_current(&a->context);
    a->base = p;
    a->owns_base = pool ? 1 : 2;
    a->stream = stream;
    return 0;
}

void arena_forget_stream(arena_t *a) {
    pthread_mutex_lock(&a->lock);
    a->stream = NULL;
    pthread_mutex_unlock(&a->lock);
}

int64_t arena_used(arena_t *a) {
    pthread_mutex_lock(&a->lock);
    int64_t used = a->used;
    pthread_mutex_unlock(&a->lock);
    return used;
}

book_t *book_new(int64_t capacity) {
    book_t *b = calloc(1, sizeof *b);
    if (!b)
        return NULL;
    pthread_mutex_init(&b->lock, NULL);
    b->capacity = capacity;
    atomic_init(&b->refs, 1);
    return b;
}

int book_open(book_t *b, int64_t max_vram, int64_t base_vram, int64_t reserved) {
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
                return -1;
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
    return i;
}

int book_has(book_t *b, long i) {
    pthread_mutex_lock(&b->lock);
    int ok = i >= 0 && i < b->nacc && b->acc[i].in_use;
    pthread_mutex_unlock(&b->lock);
    return ok;
}

void book_close(book_t *b, int i) {
    pthread_mutex_lock(&b->lock);
    account_t *a = &b->acc[i];
    if (!a->closed) {
        b->shared_used += a->held - over(a->held, a->reserved);
        b->reserved_total -= a->reserved;
        a->reserved = 0;
        a->closed = 1;
    }
    pthread_mutex_unlock(&b->lock);
}

int book_drop(book_t *b, int i) {
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
    return gone;
}

int64_t book_available(book_t *b, int i) {
    pthread_mutex_lock(&b->lock);
    int64_t v = available_locked(b, i);
    pthread_mutex_unlock(&b->lock);
    return v;
}

account_t book_state(book_t *b, int i) {
    pthread_mutex_lock(&b->lock);
    account_t a = b->acc[i];
    pthread_mutex_unlock(&b->lock);
    return a;
}

void book_totals(book_t *b, int64_t *capacity, int64_t *reserved, int64_t *shared_free) {
    pthread_mutex_lock(&b->lock);
    *capacity = b->capacity;
    *reserved = b->reserved_total;
    *shared_free = shared_free_locked(b);
    pthread_mutex_unlock(&b->lock);
}

void book_set_arena(book_t *b, int i, arena_t *arena) {
    atomic_fetch_add(&arena->refs, 1);
    pthread_mutex_lock(&b->lock);
    arena_t *old = b->acc[i].arena;
    b->acc[i].arena = arena;
    pthread_mutex_unlock(&b->lock);
    if (old)
        arena_unref(old);
}

void book_set_pool(book_t *b, CUpool pool) {
    pthread_mutex_lock(&b->lock);
    b->pool = pool;
    pthread_mutex_unlock(&b->lock);
}

void torch_bind(book_t *b, int i, book_t **prev_book, int *prev_account) {
    *prev_book = tls_book;
    *prev_account = tls_account;
    tls_book = b;
    tls_account = b ? i : -1;
}

int torch_last_refusal(int64_t *size, int *account) {
    int why = tls_refused;
    *size = tls_refused_size;
    *account = tls_refused_account;
    tls_refused = REFUSED_NONE;
    return why;
}
