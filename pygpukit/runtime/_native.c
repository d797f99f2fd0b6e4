/*
 * pygpukit.runtime._native -- the Python types of the memory book and its arena
 * (_memory.c): runtime/_book.py's Book, the CUDA backend's Arena, and the calling thread's
 * binding for PyTorch's allocator. The module's shared object is also the library PyTorch's
 * CUDAPluggableAllocator loads pygpukit_torch_alloc/_free from.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include "_memory.h"

/* ---- Arena ---------------------------------------------------------------------------------- */

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
    CUresult rc;
    Py_BEGIN_ALLOW_THREADS;
    rc = arena_own_block(self->a, (CUpool)(uintptr_t)pool, (CUstream)(uintptr_t)stream);
    Py_END_ALLOW_THREADS;
    return Py_BuildValue("(iK)", rc, rc ? 0ULL : (unsigned long long)self->a->base);
}

static PyObject *Arena_forget_stream(ArenaObject *self, PyObject *unused) {
    (void)unused;
    arena_forget_stream(self->a);
    Py_RETURN_NONE;
}

static PyObject *Arena_get_used(ArenaObject *self, void *c) {
    (void)c;
    return PyLong_FromLongLong(arena_used(self->a));
}

static PyObject *Arena_get_size(ArenaObject *self, void *c) {
    (void)c;
    return PyLong_FromLongLong(self->a->size);
}

static PyObject *Arena_get_largest(ArenaObject *self, void *c) {
    (void)c;
    return PyLong_FromLongLong(arena_largest(self->a));
}

static PyMethodDef Arena_methods[] = {
    {"take", (PyCFunction)Arena_take, METH_O,
     "take(n): the offset of n free bytes (smallest fitting range), or None"},
    {"give", (PyCFunction)(void (*)(void))Arena_give, METH_FASTCALL,
     "give(offset, n): return n bytes at offset"},
    {"own_block", (PyCFunction)Arena_own_block, METH_VARARGS,
     "own_block(pool, stream) -> (status, ptr): take the block of device memory it carves"},
    {"forget_stream", (PyCFunction)Arena_forget_stream, METH_NOARGS,
     "forget_stream(): the block's stream is gone; its free goes on the legacy stream"},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef Arena_getset[] = {
    {"used", (getter)Arena_get_used, NULL, "bytes taken", NULL},
    {"size", (getter)Arena_get_size, NULL, "bytes in all", NULL},
    {"largest_free", (getter)Arena_get_largest, NULL, "the longest free range", NULL},
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

/* ---- Book ----------------------------------------------------------------------------------- */

typedef struct {
    PyObject_HEAD
    book_t *b;
} BookObject;

static PyTypeObject BookType;

static int Book_init(BookObject *self, PyObject *args, PyObject *kw) {
    static char *names[] = {"capacity", NULL};
    long long capacity;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "L", names, &capacity))
        return -1;
    self->b = book_new(capacity);
    if (!self->b) {
        PyErr_NoMemory();
        return -1;
    }
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
    if (!book_has(self->b, i)) {
        PyErr_Format(PyExc_ValueError, "no open account %ld in this book", i);
        return -1;
    }
    *out = (int)i;
    return 0;
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

static PyObject *Book_open(BookObject *self, PyObject *args) {
    /* open(max_vram, base_vram, reserved) -> account number; the caller checked the fit */
    long long max_vram, base_vram, reserved;
    if (!PyArg_ParseTuple(args, "LLL", &max_vram, &base_vram, &reserved))
        return NULL;
    int i = book_open(self->b, max_vram, base_vram, reserved);
    if (i < 0)
        return PyErr_NoMemory();
    return PyLong_FromLong(i);
}

static PyObject *Book_close(BookObject *self, PyObject *arg) {
    int i;
    if (account_arg(self, arg, &i) < 0)
        return NULL;
    book_close(self->b, i);
    Py_RETURN_NONE;
}

static PyObject *Book_drop(BookObject *self, PyObject *arg) {
    int i;
    if (account_arg(self, arg, &i) < 0)
        return NULL;
    return PyBool_FromLong(book_drop(self->b, i));
}

static PyObject *Book_charge(BookObject *self, PyObject *const *args, Py_ssize_t nargs) {
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
    return PyLong_FromLongLong(book_available(self->b, i));
}

static PyObject *Book_state(BookObject *self, PyObject *arg) {
    int i;
    if (account_arg(self, arg, &i) < 0)
        return NULL;
    account_t a = book_state(self->b, i);
    return Py_BuildValue("(LLLLLO)", (long long)a.held, (long long)a.peak,
                         (long long)a.reserved, (long long)a.max_vram, (long long)a.base_vram,
                         a.closed ? Py_True : Py_False);
}

static PyObject *Book_totals(BookObject *self, PyObject *unused) {
    (void)unused;
    int64_t capacity, reserved, shared_free;
    book_totals(self->b, &capacity, &reserved, &shared_free);
    return Py_BuildValue("(LLL)", (long long)capacity, (long long)reserved,
                         (long long)shared_free);
}

static PyObject *Book_set_arena(BookObject *self, PyObject *args) {
    PyObject *iarg;
    ArenaObject *arena;
    if (!PyArg_ParseTuple(args, "OO!", &iarg, &ArenaType, &arena))
        return NULL;
    int i;
    if (account_arg(self, iarg, &i) < 0)
        return NULL;
    book_set_arena(self->b, i, arena->a);
    Py_RETURN_NONE;
}

static PyObject *Book_set_pool(BookObject *self, PyObject *arg) {
    unsigned long long handle = PyLong_AsUnsignedLongLong(arg);
    if (PyErr_Occurred())
        return NULL;
    book_set_pool(self->b, (CUpool)(uintptr_t)handle);
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
    {"set_arena", (PyCFunction)Book_set_arena, METH_VARARGS,
     "set_arena(account, arena): PyTorch's blocks for account are carved from arena"},
    {"set_pool", (PyCFunction)Book_set_pool, METH_O,
     "set_pool(handle): the stream-ordered pool PyTorch's blocks come from (0: cuMemAlloc)"},
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

/* ---- the thread's binding --------------------------------------------------------------------- */

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
    book_t *prev_book;
    int prev_account;
    torch_bind(b, (int)i, &prev_book, &prev_account);
    return Py_BuildValue("(Ki)", (unsigned long long)(uintptr_t)prev_book, prev_account);
}

static PyObject *mod_unbind(PyObject *m, PyObject *arg) {
    /* unbind(token): put back the binding bind() returned */
    (void)m;
    unsigned long long book;
    int i;
    if (!PyArg_ParseTuple(arg, "Ki", &book, &i))
        return NULL;
    book_t *ignored_book;
    int ignored_account;
    torch_bind((book_t *)(uintptr_t)book, i, &ignored_book, &ignored_account);
    Py_RETURN_NONE;
}

static PyObject *mod_last_refusal(PyObject *m, PyObject *unused) {
    /* last_refusal() -> None or (why, size, account): the calling thread's last refused
     * PyTorch allocation, forgotten once read */
    (void)m;
    (void)unused;
    int64_t size;
    int account;
    int why = torch_last_refusal(&size, &account);
    if (why == REFUSED_NONE)
        Py_RETURN_NONE;
    return Py_BuildValue("(iLi)", why, (long long)size, account);
}

static PyMethodDef mod_methods[] = {
    {"bind", (PyCFunction)(void (*)(void))mod_bind, METH_FASTCALL,
     "bind(book, account) -> token: charge this thread's PyTorch allocations to account"},
    {"unbind", (PyCFunction)mod_unbind, METH_O, "unbind(token): the binding before bind()"},
    {"last_refusal", (PyCFunction)mod_last_refusal, METH_NOARGS,
     "last_refusal() -> None | (why, size, account)"},
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
