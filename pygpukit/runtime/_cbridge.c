/*
 * pygpukit.runtime._cbridge -- the GIL-free half of the completion bridge.
 *
 * A waiter is a small integer "slot". When the GPU reaches the point a waiter waits for,
 * a host function enqueued with cuLaunchHostFunc pushes the slot into a lock-free ring and
 * writes an eventfd. The event loop watches that fd and resolves every finished waiter in
 * one batch (drain()). The host function never touches Python, so it cannot take the GIL,
 * cannot deadlock against a thread holding it, and stays safe after the loop or the
 * interpreter has gone: the ring is static and never freed.
 *
 * The ring is a bounded multi-producer / single-consumer queue in the style of Vyukov's:
 * each cell carries a sequence number that says whose turn it is. The Python side never
 * hands out more live slots than the ring holds, so a producer never finds it full.
 *
 * No CUDA header is needed: the driver's entry points are looked up with dlsym the first
 * time launch() is called, so the module builds and imports on machines without a GPU.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <dlfcn.h>
#include <errno.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <sys/eventfd.h>
#include <unistd.h>

typedef struct {
    _Atomic uint64_t seq;
    uint64_t value;
} cell_t;

static cell_t *ring = NULL;
static uint64_t ring_mask = 0;
static _Atomic uint64_t ring_tail = 0; /* next position producers claim */
static uint64_t ring_head = 0;         /* next position the consumer reads (one consumer) */
static int efd = -1;
static _Atomic uint64_t pushes = 0;

static void push(uint64_t value) {
    uint64_t pos = atomic_fetch_add_explicit(&ring_tail, 1, memory_order_relaxed);
    cell_t *c = &ring[pos & ring_mask];
    /* The cell is free once the consumer has advanced its seq to pos. Live slots never
     * exceed capacity, so this loop does not spin in practice. */
    while (atomic_load_explicit(&c->seq, memory_order_acquire) != pos) {
    }
    c->value = value;
    atomic_store_explicit(&c->seq, pos + 1, memory_order_release);
    atomic_fetch_add_explicit(&pushes, 1, memory_order_relaxed);
    uint64_t one = 1;
    ssize_t r;
    do {
        r = write(efd, &one, sizeof one);
    } while (r < 0 && errno == EINTR);
}

/* The host function the driver calls. userData is the slot number. */
static void host_fn(void *user_data) { push((uint64_t)(uintptr_t)user_data); }

/* --- CUDA driver entry points, found at run time ------------------------------------ */
typedef int (*cuLaunchHostFunc_t)(void *stream, void (*fn)(void *), void *data);
typedef int (*cuCtxGetCurrent_t)(void **ctx);
typedef int (*cuCtxSetCurrent_t)(void *ctx);
typedef int (*cuStreamGetCtx_t)(void *stream, void **ctx);

static cuLaunchHostFunc_t p_launch = NULL;
static cuCtxGetCurrent_t p_get_ctx = NULL;
static cuCtxSetCurrent_t p_set_ctx = NULL;
static cuStreamGetCtx_t p_stream_ctx = NULL;

static int load_driver(void) {
    if (p_launch != NULL) return 0;
    void *lib = dlopen("libcuda.so.1", RTLD_NOW | RTLD_GLOBAL);
    if (lib == NULL) lib = dlopen("libcuda.so", RTLD_NOW | RTLD_GLOBAL);
    if (lib == NULL) {
        PyErr_Format(PyExc_OSError, "cannot load the CUDA driver (libcuda.so.1): %s",
                     dlerror());
        return -1;
    }
    p_get_ctx = (cuCtxGetCurrent_t)dlsym(lib, "cuCtxGetCurrent");
    p_set_ctx = (cuCtxSetCurrent_t)dlsym(lib, "cuCtxSetCurrent");
    p_stream_ctx = (cuStreamGetCtx_t)dlsym(lib, "cuStreamGetCtx");
    cuLaunchHostFunc_t launch = (cuLaunchHostFunc_t)dlsym(lib, "cuLaunchHostFunc");
    if (launch == NULL || p_get_ctx == NULL || p_set_ctx == NULL || p_stream_ctx == NULL) {
        PyErr_SetString(PyExc_OSError, "the CUDA driver lacks cuLaunchHostFunc (CUDA >= 10)");
        return -1;
    }
    p_launch = launch;
    return 0;
}

/* --- Python API ---------------------------------------------------------------------- */
static PyObject *py_open(PyObject *self, PyObject *arg) {
    if (ring != NULL) return PyLong_FromLong(efd);
    unsigned long long capacity = PyLong_AsUnsignedLongLong(arg);
    if (PyErr_Occurred()) return NULL;
    if (capacity < 2 || (capacity & (capacity - 1)) != 0) {
        PyErr_SetString(PyExc_ValueError, "ring capacity must be a power of two >= 2");
        return NULL;
    }
    cell_t *cells = (cell_t *)calloc(capacity, sizeof(cell_t));
    if (cells == NULL) return PyErr_NoMemory();
    for (uint64_t i = 0; i < capacity; i++) atomic_init(&cells[i].seq, i);
    int fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (fd < 0) {
        free(cells);
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    efd = fd;
    ring_mask = capacity - 1;
    ring = cells; /* published last; never freed (host functions may fire at exit) */
    return PyLong_FromLong(efd);
}

static PyObject *py_notify(PyObject *self, PyObject *arg) {
    unsigned long long slot = PyLong_AsUnsignedLongLong(arg);
    if (PyErr_Occurred()) return NULL;
    if (ring == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "bridge not opened");
        return NULL;
    }
    push(slot);
    Py_RETURN_NONE;
}

static PyObject *py_drain(PyObject *self, PyObject *unused) {
    if (ring == NULL) return PyList_New(0);
    uint64_t count;
    while (read(efd, &count, sizeof count) < 0 && errno == EINTR) {
    }
    PyObject *out = PyList_New(0);
    if (out == NULL) return NULL;
    for (;;) {
        cell_t *c = &ring[ring_head & ring_mask];
        if (atomic_load_explicit(&c->seq, memory_order_acquire) != ring_head + 1) break;
        PyObject *v = PyLong_FromUnsignedLongLong(c->value);
        atomic_store_explicit(&c->seq, ring_head + ring_mask + 1, memory_order_release);
        ring_head++;
        if (v == NULL || PyList_Append(out, v) < 0) {
            Py_XDECREF(v);
            Py_DECREF(out);
            return NULL;
        }
        Py_DECREF(v);
    }
    return out;
}

static PyObject *py_launch(PyObject *self, PyObject *args) {
    unsigned long long stream, slot;
    if (!PyArg_ParseTuple(args, "KK", &stream, &slot)) return NULL;
    if (ring == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "bridge not opened");
        return NULL;
    }
    if (stream == 0) {
        PyErr_SetString(PyExc_ValueError, "launch() needs a created stream, not the null stream");
        return NULL;
    }
    if (load_driver() < 0) return NULL;
    int status;
    Py_BEGIN_ALLOW_THREADS
    void *ctx = NULL;
    status = p_get_ctx(&ctx);
    if (status == 0 && ctx == NULL) {
        /* A thread that never touched CUDA: make the stream's context current. */
        status = p_stream_ctx((void *)(uintptr_t)stream, &ctx);
        if (status == 0) status = p_set_ctx(ctx);
    }
    if (status == 0)
        status = p_launch((void *)(uintptr_t)stream, host_fn, (void *)(uintptr_t)slot);
    Py_END_ALLOW_THREADS
    return PyLong_FromLong(status);
}

static PyObject *py_pushes(PyObject *self, PyObject *unused) {
    return PyLong_FromUnsignedLongLong(atomic_load(&pushes));
}

static PyMethodDef methods[] = {
    {"open", py_open, METH_O, "open(capacity) -> eventfd; idempotent"},
    {"notify", py_notify, METH_O, "notify(slot): push a slot from Python (host backend)"},
    {"drain", py_drain, METH_NOARGS, "drain() -> list of finished slots"},
    {"launch", py_launch, METH_VARARGS,
     "launch(stream_ptr, slot) -> CUresult; enqueue the GIL-free host function"},
    {"pushes", py_pushes, METH_NOARGS, "total slots pushed so far"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "pygpukit.runtime._cbridge",
    "GIL-free completion signalling (see the C source's header).", -1, methods,
};

PyMODINIT_FUNC PyInit__cbridge(void) { return PyModule_Create(&module); }
