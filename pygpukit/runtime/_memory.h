/*
 * pygpukit's memory book and PyTorch's allocator on it (_memory.c), and what the Python
 * types in _native.c use of them.
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
 * functions (runtime/_backends/_torch.py makes one torch.cuda.MemPool on them per context and
 * thread).
 * The account charged is the calling thread's binding (bind()); a refusal returns NULL, which
 * PyTorch turns into torch.OutOfMemoryError after freeing the pool's cached blocks and trying
 * once more; the refusal is remembered per thread so that the error can be translated.
 */
#ifndef PYGPUKIT_MEMORY_H
#define PYGPUKIT_MEMORY_H

#include <pthread.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>

typedef int CUresult;
typedef void *CUstream;
typedef void *CUpool;
typedef uint64_t CUdeviceptr;

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

enum { REFUSED_NONE = 0, REFUSED_BUDGET = 1, REFUSED_CLOSED = 2, REFUSED_DEVICE = 3,
       REFUSED_UNBOUND = 4 };

int load_driver(void); /* 1: the driver's entry points are there, -1: they are not */

arena_t *arena_new(int64_t size);
void arena_unref(arena_t *a);
int64_t arena_take(arena_t *a, int64_t n); /* an offset, or -1 */
int arena_give(arena_t *a, int64_t offset, int64_t n);
int64_t arena_largest(arena_t *a);
int64_t arena_used(arena_t *a);
CUresult arena_own_block(arena_t *a, CUpool pool, CUstream stream);
void arena_forget_stream(arena_t *a);

book_t *book_new(int64_t capacity);
void book_unref(book_t *b);
int book_open(book_t *b, int64_t max_vram, int64_t base_vram, int64_t reserved); /* -1: no memory */
int book_has(book_t *b, long i);
void book_close(book_t *b, int i);
int book_drop(book_t *b, int i);
int book_try(book_t *b, int i, int64_t n); /* 1 charged, 0 does not fit, -1 closed */
void book_release(book_t *b, int i, int64_t n);
int64_t book_available(book_t *b, int i);
account_t book_state(book_t *b, int i);
void book_totals(book_t *b, int64_t *capacity, int64_t *reserved, int64_t *shared_free);
void book_set_arena(book_t *b, int i, arena_t *arena);
void book_set_pool(book_t *b, CUpool pool);

void torch_bind(book_t *b, int i, book_t **prev_book, int *prev_account);
int torch_last_refusal(int64_t *size, int *account); /* a REFUSED_* reason, forgotten */

void *pygpukit_torch_alloc(size_t size, int device, void *stream);
void pygpukit_torch_free(void *ptr, size_t size, int device, void *stream);

#endif
