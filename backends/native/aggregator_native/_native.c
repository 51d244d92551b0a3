/* The native backend's compiled part: per-thread buffers and the add that fills them.
 *
 * Everything here mirrors aggregator_freethreaded's GIL path (``_add_gil`` and its
 * ``Buffer``), which the Python part of this backend reuses for flushes and reads:
 *
 * - A ``Buffer`` is one thread's records. Its owner marks it ``busy`` for the whole of
 *   an add; a flush or read (in Python, holding the storage's ``_shared`` lock) swaps
 *   its ``state`` out, then waits until it is not busy. That is a Dekker handshake:
 *   the owner stores ``busy`` then loads ``state``, the other side stores ``state``
 *   then loads ``busy``; sequentially consistent atomics (free-threaded builds) or the
 *   GIL (other builds) make at least one of them see the other, so no record is
 *   written into a state after it was taken and seen idle. Nothing is shared per add:
 *   the owner writes only its own buffer.
 * - A ``Core`` is one storage's add: the merge function, the home (re-queued and read
 *   records, rebound only while ``gathers`` is odd) and the closed flag, which the
 *   Python part reads and writes through properties.
 *
 * Thread safety: ``Buffer.state`` and ``Buffer.stranded`` are replaced or changed by
 * other threads only while they hold the storage's ``_shared`` lock; the owner reads
 * ``state`` (borrowed) only while busy, and a taker keeps the state it took alive until
 * it has seen the owner idle (or keeps it among ``stranded`` for good). ``home`` is
 * read (borrowed) by an add only after it saw ``gathers`` even; a gather makes it odd,
 * then waits for every busy buffer before it rebinds ``home``.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stddef.h>
#include <stdint.h>

#if PY_VERSION_HEX < 0x030C0000
#include <structmember.h>
#define MEMBER_OBJECT T_OBJECT_EX
#define MEMBER_READONLY READONLY
#else
#define MEMBER_OBJECT Py_T_OBJECT_EX
#define MEMBER_READONLY Py_READONLY
#endif

#ifdef Py_GIL_DISABLED
/* Threads run at once: the handshake needs sequentially consistent loads and stores. */
#define LOAD(x) __atomic_load_n(&(x), __ATOMIC_SEQ_CST)
#define STORE(x, v) __atomic_store_n(&(x), (v), __ATOMIC_SEQ_CST)
#define STORE_RELEASE(x, v) __atomic_store_n(&(x), (v), __ATOMIC_RELEASE)
#define LOAD_RELAXED(x) __atomic_load_n(&(x), __ATOMIC_RELAXED)
#define STORE_RELAXED(x, v) __atomic_store_n(&(x), (v), __ATOMIC_RELAXED)
#define EXCHANGE(x, v) __atomic_exchange_n(&(x), (v), __ATOMIC_SEQ_CST)
#else
/* The GIL orders everything; Python code runs only between bytecodes, never inside these. */
#define LOAD(x) (x)
#define STORE(x, v) ((x) = (v))
#define STORE_RELEASE(x, v) ((x) = (v))
#define LOAD_RELAXED(x) (x)
#define STORE_RELAXED(x, v) ((x) = (v))
static inline PyObject *
exchange_object(PyObject **slot, PyObject *value)
{
    PyObject *old = *slot;
    *slot = value;
    return old;
}
#define EXCHANGE(x, v) exchange_object(&(x), (v))
#endif

/* Stand-ins for 3.13's strong-reference look-ups on older versions (the GIL is held). */
#if PY_VERSION_HEX < 0x030D0000
static int
PyDict_GetItemRef(PyObject *dict, PyObject *key, PyObject **result)
{
    PyObject *item = PyDict_GetItemWithError(dict, key);
    *result = Py_XNewRef(item);
    return item != NULL ? 1 : PyErr_Occurred() ? -1 : 0;
}

static int
PyWeakref_GetRef(PyObject *ref, PyObject **result)
{
    PyObject *item = PyWeakref_GetObject(ref);
    if (item == NULL) {
        *result = NULL;
        return -1;
    }
    *result = item == Py_None ? NULL : Py_NewRef(item);
    return *result != NULL;
}
#endif

static PyObject *allocate_lock; /* _thread.allocate_lock */
static uint64_t next_core;      /* numbers the cores, from 1 */

/* The calling thread's buffer of the core it added to last (borrowed). A core's number is
   never reused, so a number that matches names a live core, and the core keeps the buffer
   (Core.buffers) while its thread's mark lives: a storage drops only the buffers of threads
   whose mark has died, and a mark zeroes these as it dies, in its thread. Per thread:
   nothing shared. Other cores' buffers are found in the thread-state dict (own_buffer). */
static _Thread_local uint64_t last_core;
static _Thread_local PyObject *last_buffer;

/* -- a thread's mark ------------------------------------------------------------------- */

/* One per thread, in its thread-state dict: it dies when the interpreter clears that dict,
   once the thread has ended (threading's is_alive() is False earlier: for the main thread
   in atexit handlers, which may still add). Each buffer holds a weak reference to it. */
typedef struct {
    PyObject_HEAD
    PyObject *weakrefs;
} MarkObject;

static PyObject *mark_key;   /* the mark's key in the thread-state dicts */
static PyObject *key_prefix; /* how each core's key in them begins */

static void
mark_dealloc(MarkObject *self)
{
    last_core = 0; /* this thread's cache: its buffers may go from now on */
    last_buffer = NULL;
    if (self->weakrefs != NULL) {
        PyObject_ClearWeakRefs((PyObject *)self);
    }
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyTypeObject MarkType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "aggregator_native._native.ThreadMark",
    .tp_doc = "Lives as long as its thread's state.",
    .tp_basicsize = sizeof(MarkObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_dealloc = (destructor)mark_dealloc,
    .tp_weaklistoffset = offsetof(MarkObject, weakrefs),
};

/* A weak reference to the calling thread's mark (made on first use). */
static PyObject *
this_threads_mark(void)
{
    PyObject *dict = PyThreadState_GetDict();
    if (dict == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "this thread has no thread-state dict");
        return NULL;
    }
    PyObject *mark;
    int found = PyDict_GetItemRef(dict, mark_key, &mark);
    if (found < 0) {
        return NULL;
    }
    if (!found) {
        mark = PyType_GenericAlloc(&MarkType, 0);
        if (mark == NULL || PyDict_SetItem(dict, mark_key, mark) < 0) {
            Py_XDECREF(mark);
            return NULL;
        }
    }
    PyObject *ref = PyWeakref_NewRef(mark, NULL);
    Py_DECREF(mark);
    return ref;
}

/* Stores ``value``'s truth into ``*flag`` (a setter's work); -1 with an error if it has none. */
static int
set_flag(int *flag, PyObject *value, const char *what)
{
    int truth = value == NULL ? -1 : PyObject_IsTrue(value);
    if (truth < 0) {
        if (!PyErr_Occurred()) {
            PyErr_Format(PyExc_TypeError, "%s cannot be deleted", what);
        }
        return -1;
    }
    STORE(*flag, truth);
    return 0;
}

/* Getters and setters of an object slot run in a critical section of its owner: without
   one, a getter could take a new reference to an object that a setter has just released
   (free-threaded builds; the GIL does this elsewhere). Adds read the slots without it, by
   the rules at the top. */
#ifndef Py_BEGIN_CRITICAL_SECTION
#define Py_BEGIN_CRITICAL_SECTION(op) {
#define Py_END_CRITICAL_SECTION() }
#endif

#include "_stamps.h"

/* A new reference to ``*slot`` (a getter's work). */
static PyObject *
get_object(PyObject *owner, PyObject **slot)
{
    PyObject *value;
    Py_BEGIN_CRITICAL_SECTION(owner);
    value = Py_NewRef(LOAD(*slot));
    Py_END_CRITICAL_SECTION();
    return value;
}

/* Replaces ``*slot`` with ``value`` if it is of ``type`` exactly (a setter's work). */
static int
swap_object(PyObject *owner, PyObject **slot, PyObject *value, PyTypeObject *type, const char *what)
{
    if (value == NULL || !Py_IS_TYPE(value, type)) {
        PyErr_Format(PyExc_TypeError, "%s must be a %s", what, type->tp_name);
        return -1;
    }
    PyObject *old;
    Py_BEGIN_CRITICAL_SECTION(owner);
    old = EXCHANGE(*slot, Py_NewRef(value));
    Py_END_CRITICAL_SECTION();
    Py_DECREF(old); /* outside: its finalizer may run any code */
    return 0;
}

/* -- Buffer -------------------------------------------------------------------------- */

typedef struct {
    PyObject_HEAD
    PyObject *state;    /* (records: dict, stamps: Stamps), replaced whole by takers */
    PyObject *stranded; /* list of older states; the same list object for good */
    PyObject *lock;     /* a threading.Lock: taken by the Python part's own merging only */
    PyObject *mark;     /* a weak reference to the owner thread's mark */
    PyObject *weakrefs;
    Py_ssize_t allowed; /* ``stored`` up to which the owner stores new records unasked */
    Py_ssize_t merges;
    Py_ssize_t stored;
    int busy;
} BufferObject;

static PyTypeObject BufferType;

static PyObject *
new_state(void)
{
    PyObject *records = PyDict_New();
    PyObject *stamps = StampsType.tp_alloc(&StampsType, 0);
    PyObject *state = NULL;
    if (records != NULL && stamps != NULL) {
        state = PyTuple_Pack(2, records, stamps);
    }
    Py_XDECREF(records);
    Py_XDECREF(stamps);
    return state;
}

static PyObject *
buffer_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    static char *names[] = {"allowed", NULL};
    Py_ssize_t allowed;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "n:Buffer", names, &allowed)) {
        return NULL;
    }
    BufferObject *self = (BufferObject *)type->tp_alloc(type, 0);
    if (self == NULL) {
        return NULL;
    }
    self->allowed = allowed;
    self->state = new_state();
    self->stranded = PyList_New(0);
    self->lock = PyObject_CallNoArgs(allocate_lock);
    self->mark = this_threads_mark(); /* a buffer is made by its owner thread */
    if (self->state == NULL || self->stranded == NULL || self->lock == NULL || self->mark == NULL) {
        Py_DECREF(self);
        return NULL;
    }
    return (PyObject *)self;
}

static int
buffer_traverse(BufferObject *self, visitproc visit, void *arg)
{
    Py_VISIT(self->state);
    Py_VISIT(self->stranded);
    Py_VISIT(self->lock);
    Py_VISIT(self->mark);
    return 0;
}

static int
buffer_clear(BufferObject *self)
{
    Py_CLEAR(self->mark);
    Py_CLEAR(self->state);
    Py_CLEAR(self->stranded);
    Py_CLEAR(self->lock);
    return 0;
}

static void
buffer_dealloc(BufferObject *self)
{
    PyObject_GC_UnTrack(self);
    if (self->weakrefs != NULL) {
        PyObject_ClearWeakRefs((PyObject *)self);
    }
    buffer_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *
buffer_get_state(BufferObject *self, void *closure)
{
    return get_object((PyObject *)self, &self->state);
}

static int
buffer_set_state(BufferObject *self, PyObject *value, void *closure)
{
    if (value == NULL || !PyTuple_CheckExact(value) || PyTuple_GET_SIZE(value) != 2
        || !PyDict_CheckExact(PyTuple_GET_ITEM(value, 0))
        || !Py_IS_TYPE(PyTuple_GET_ITEM(value, 1), &StampsType)) {
        PyErr_SetString(PyExc_TypeError, "Buffer.state must be a (dict, Stamps) tuple");
        return -1;
    }
    return swap_object((PyObject *)self, &self->state, value, &PyTuple_Type, "Buffer.state");
}

static PyObject *
buffer_get_stranded(BufferObject *self, void *closure)
{
    return Py_NewRef(self->stranded);
}

static int
buffer_set_stranded(BufferObject *self, PyObject *value, void *closure)
{
    /* In place: the owner reads the list's length while busy, so the list never goes away. */
    if (value == NULL || !PyList_Check(value)) {
        PyErr_SetString(PyExc_TypeError, "Buffer.stranded must be a list");
        return -1;
    }
    return PyList_SetSlice(self->stranded, 0, PY_SSIZE_T_MAX, value);
}

static PyObject *
buffer_get_busy(BufferObject *self, void *closure)
{
    return PyBool_FromLong(LOAD(self->busy));
}

static int
buffer_set_busy(BufferObject *self, PyObject *value, void *closure)
{
    return set_flag(&self->busy, value, "Buffer.busy");
}

static PyObject *
buffer_get_count(BufferObject *self, void *closure)
{
    Py_ssize_t *field = (Py_ssize_t *)((char *)self + (Py_ssize_t)closure);
    return PyLong_FromSsize_t(LOAD(*field));
}

static int
buffer_set_count(BufferObject *self, PyObject *value, void *closure)
{
    Py_ssize_t *field = (Py_ssize_t *)((char *)self + (Py_ssize_t)closure);
    if (value == NULL) {
        PyErr_SetString(PyExc_TypeError, "Buffer counts cannot be deleted");
        return -1;
    }
    Py_ssize_t count = PyLong_AsSsize_t(value);
    if (count == -1 && PyErr_Occurred()) {
        return -1;
    }
    STORE(*field, count);
    return 0;
}

static PyObject *
buffer_get_alive(BufferObject *self, void *closure)
{
    PyObject *mark;
    int alive = PyWeakref_GetRef(self->mark, &mark);
    if (alive < 0) {
        return NULL;
    }
    Py_XDECREF(mark);
    return PyBool_FromLong(alive);
}

static PyObject *
buffer_get_locked(BufferObject *self, void *closure)
{
    Py_RETURN_FALSE; /* takers watch ``busy``; ``lock`` is never held by an add */
}

#define COUNT(name, doc)                                                                    \
    {#name, (getter)buffer_get_count, (setter)buffer_set_count, doc,                        \
     (void *)offsetof(BufferObject, name)}

static PyGetSetDef buffer_getset[] = {
    {"state", (getter)buffer_get_state, (setter)buffer_set_state,
     "(records, stamps): replaced whole by a taker holding the storage's _shared lock", NULL},
    {"stranded", (getter)buffer_get_stranded, (setter)buffer_set_stranded,
     "older states a taker left; assigning replaces the list's items", NULL},
    {"busy", (getter)buffer_get_busy, (setter)buffer_set_busy,
     "the owner is inside add(), or inside a merge run on its behalf", NULL},
    {"locked", (getter)buffer_get_locked, NULL, "always False: takers watch busy", NULL},
    {"alive", (getter)buffer_get_alive, NULL,
     "whether the owner thread may still add: its thread state exists", NULL},
    COUNT(allowed, "stored up to which the owner stores new records without asking (BUF-1)"),
    COUNT(merges, "adds that merged into a record of this buffer"),
    COUNT(stored, "records this buffer stored"),
    {NULL},
};

static PyObject *
buffer_new_state(PyObject *unused, PyObject *noargs)
{
    return new_state();
}

static PyMethodDef buffer_methods[] = {
    {"new_state", (PyCFunction)buffer_new_state, METH_NOARGS | METH_STATIC,
     "new_state() -> (dict, Stamps): an empty state, what a taker leaves in its place"},
    {NULL},
};

static PyMemberDef buffer_members[] = {
    {"lock", MEMBER_OBJECT, offsetof(BufferObject, lock), MEMBER_READONLY, "a threading.Lock"},
    {NULL},
};

static PyTypeObject BufferType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "aggregator_native._native.Buffer",
    .tp_doc = "The calling thread's records: Buffer(allowed). See aggregator_freethreaded's Buffer.",
    .tp_basicsize = sizeof(BufferObject),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_new = buffer_new,
    .tp_dealloc = (destructor)buffer_dealloc,
    .tp_traverse = (traverseproc)buffer_traverse,
    .tp_clear = (inquiry)buffer_clear,
    .tp_weaklistoffset = offsetof(BufferObject, weakrefs),
    .tp_getset = buffer_getset,
    .tp_methods = buffer_methods,
    .tp_members = buffer_members,
};

/* -- Core ---------------------------------------------------------------------------- */

typedef struct {
    PyObject_HEAD
    PyObject *merge;
    PyObject *key;       /* this core's key in each thread-state dict (a unique str) */
    PyObject *home;      /* dict of re-queued and read records; see the top of this file */
    PyObject *register_; /* () -> Buffer: makes the calling thread's buffer and binds it */
    PyObject *from_home; /* (buffer, key, value) -> bool: the rest of an add, in Python */
    PyObject *refuse_reentrant;
    PyObject *refuse_closed;
    PyObject *clock;   /* time.perf_counter_ns: the stamp of each new record */
    PyObject *buffers; /* the storage's buffers: each lives at least as long as this core */
    PyObject *weakrefs;
    uint64_t number;    /* unique for the life of the process, never 0 */
    Py_ssize_t gathers; /* gathers begun and ended: odd while one runs */
    int closed;
} CoreObject;

static PyTypeObject CoreType;

/* Marks an add that must go on in Python (its key may be at home, or a new record needs room). */
static PyObject from_home_marker;
#define FROM_HOME (&from_home_marker)

static PyObject *
core_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    static char *names[] = {
        "merge", "register", "from_home", "refuse_reentrant", "refuse_closed", "clock", NULL};
    PyObject *merge, *register_, *from_home, *refuse_reentrant, *refuse_closed, *clock;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OOOOOO:Core", names, &merge, &register_,
                                     &from_home, &refuse_reentrant, &refuse_closed, &clock)) {
        return NULL;
    }
    CoreObject *self = (CoreObject *)type->tp_alloc(type, 0);
    if (self == NULL) {
        return NULL;
    }
    self->merge = Py_NewRef(merge);
    self->register_ = Py_NewRef(register_);
    self->from_home = Py_NewRef(from_home);
    self->refuse_reentrant = Py_NewRef(refuse_reentrant);
    self->refuse_closed = Py_NewRef(refuse_closed);
    self->clock = Py_NewRef(clock);
    self->home = PyDict_New();
    self->buffers = PyTuple_New(0);
    unsigned long long number = __atomic_add_fetch(&next_core, 1, __ATOMIC_RELAXED);
    self->number = number;
    self->key = PyUnicode_FromFormat("%U%llu", key_prefix, number);
    if (self->home == NULL || self->key == NULL || self->buffers == NULL) {
        Py_DECREF(self);
        return NULL;
    }
    return (PyObject *)self;
}

static int
core_traverse(CoreObject *self, visitproc visit, void *arg)
{
    Py_VISIT(self->merge);
    Py_VISIT(self->home);
    Py_VISIT(self->register_);
    Py_VISIT(self->from_home);
    Py_VISIT(self->refuse_reentrant);
    Py_VISIT(self->refuse_closed);
    Py_VISIT(self->clock);
    Py_VISIT(self->buffers);
    return 0;
}

static int
core_clear(CoreObject *self)
{
    Py_CLEAR(self->merge);
    Py_CLEAR(self->home);
    Py_CLEAR(self->register_);
    Py_CLEAR(self->from_home);
    Py_CLEAR(self->refuse_reentrant);
    Py_CLEAR(self->refuse_closed);
    Py_CLEAR(self->clock);
    Py_CLEAR(self->buffers);
    return 0;
}

static void
core_dealloc(CoreObject *self)
{
    PyObject_GC_UnTrack(self);
    if (self->weakrefs != NULL) {
        PyObject_ClearWeakRefs((PyObject *)self);
    }
    core_clear(self);
    Py_CLEAR(self->key);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* The calling thread's buffer (a new reference), or NULL: none yet, or an error is set. */
static BufferObject *
own_buffer(CoreObject *self)
{
    if (last_core == self->number) {
        return (BufferObject *)Py_NewRef(last_buffer);
    }
    PyObject *dict = PyThreadState_GetDict(); /* borrowed; this thread's */
    if (dict == NULL) {
        return NULL;
    }
    PyObject *ref, *buffer = NULL;
    if (PyDict_GetItemRef(dict, self->key, &ref) <= 0) {
        return NULL;
    }
    int alive = PyWeakref_GetRef(ref, &buffer);
    Py_DECREF(ref);
    if (alive <= 0) {
        return NULL;
    }
    last_core = self->number;
    last_buffer = buffer;
    return (BufferObject *)buffer;
}

static PyObject *
refuse(PyObject *how, const char *call)
{
    PyObject *result = PyObject_CallFunction(how, "s", call);
    Py_XDECREF(result);
    if (!PyErr_Occurred()) {
        PyErr_Format(PyExc_SystemError, "%s: the refusal returned", call);
    }
    return NULL;
}

/* An add with ``buffer`` marked busy: True, False, NULL (an error), or FROM_HOME. */
static PyObject *
add_busy(CoreObject *self, BufferObject *buffer, PyObject *key, PyObject *value)
{
    if (LOAD(self->closed)) {
        return refuse(self->refuse_closed, "add()");
    }
    PyObject *state = LOAD(buffer->state); /* borrowed: a taker keeps it alive (see the top) */
    PyObject *records = PyTuple_GET_ITEM(state, 0);
    PyObject *stored;
    int found = PyDict_GetItemRef(records, key, &stored);
    if (found < 0) {
        return NULL;
    }
    if (found) {
        PyObject *pair[2] = {stored, value};
        PyObject *merged = PyObject_Vectorcall(self->merge, pair, 2, NULL);
        Py_DECREF(stored);
        if (merged == NULL) {
            return NULL;
        }
        int failed = PyDict_SetItem(records, key, merged);
        Py_DECREF(merged);
        if (failed) {
            return NULL;
        }
        STORE_RELAXED(buffer->merges, LOAD_RELAXED(buffer->merges) + 1);
        Py_RETURN_TRUE;
    }
    /* A new record, unless the key is elsewhere: older states, or home. */
    Py_ssize_t gathers = LOAD(self->gathers);
    if (gathers & 1) {
        return FROM_HOME; /* a gather runs: home is elsewhere meanwhile */
    }
    if (LOAD_RELAXED(((PyVarObject *)buffer->stranded)->ob_size) > 0) {
        return FROM_HOME;
    }
    PyObject *home = LOAD(self->home); /* borrowed: rebound only after this add ends */
    if (PyDict_GET_SIZE(home) > 0) {
        int at_home = PyDict_Contains(home, key);
        if (at_home != 0) {
            return at_home < 0 ? NULL : FROM_HOME;
        }
    }
    if (LOAD(self->gathers) != gathers) {
        return FROM_HOME;
    }
    /* Counted before it is stored, so that a flush that revokes the allowance (BUF-2)
       either sees it counted or makes this check fail. */
    Py_ssize_t count = LOAD_RELAXED(buffer->stored) + 1;
    STORE(buffer->stored, count);
    if (count > LOAD(buffer->allowed)) {
        STORE(buffer->stored, count - 1);
        return FROM_HOME;
    }
    if (PyDict_SetItem(records, key, value) < 0) { /* the key's hash raised this time */
        STORE(buffer->stored, count - 1);
        return NULL;
    }
    PyObject *stamp = PyObject_CallNoArgs(self->clock);
    if (stamp == NULL) {
        return NULL;
    }
    long long now = PyLong_AsLongLong(stamp);
    Py_DECREF(stamp);
    if ((now == -1 && PyErr_Occurred()) || stamps_push((StampsObject *)PyTuple_GET_ITEM(state, 1), now) < 0) {
        return NULL;
    }
    Py_RETURN_FALSE;
}

/* One add into ``buffer``, the calling thread's. */
static PyObject *
add_to(CoreObject *self, BufferObject *buffer, PyObject *key, PyObject *value)
{
    if (LOAD(buffer->busy)) {
        return refuse(self->refuse_reentrant, "add()");
    }
    STORE(buffer->busy, 1);
    PyObject *result = add_busy(self, buffer, key, value);
    STORE_RELEASE(buffer->busy, 0);
    if (result != FROM_HOME) {
        return result;
    }
    return PyObject_CallFunctionObjArgs(self->from_home, (PyObject *)buffer, key, value, NULL);
}

static BufferObject *
own_or_new_buffer(CoreObject *self)
{
    BufferObject *buffer = own_buffer(self);
    if (buffer != NULL || PyErr_Occurred()) {
        return buffer;
    }
    buffer = (BufferObject *)PyObject_CallNoArgs(self->register_);
    if (buffer != NULL && !Py_IS_TYPE(buffer, &BufferType)) {
        PyErr_SetString(PyExc_TypeError, "register() must return a Buffer");
        Py_CLEAR(buffer);
    }
    return buffer;
}

static PyObject *
core_add(CoreObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2) {
        PyErr_Format(PyExc_TypeError, "add() takes 2 positional arguments (key, value), got %zd", nargs);
        return NULL;
    }
    BufferObject *buffer = own_or_new_buffer(self);
    if (buffer == NULL) {
        return NULL;
    }
    PyObject *result = add_to(self, buffer, args[0], args[1]);
    Py_DECREF(buffer);
    return result;
}

/* ``key, value = item``, with Python's errors; 0, or -1 with an error set. New references. */
static int
unpack_pair(PyObject *item, PyObject **key, PyObject **value)
{
    if (PyTuple_CheckExact(item) && PyTuple_GET_SIZE(item) == 2) {
        *key = Py_NewRef(PyTuple_GET_ITEM(item, 0));
        *value = Py_NewRef(PyTuple_GET_ITEM(item, 1));
        return 0;
    }
    PyObject *iterator = PyObject_GetIter(item);
    if (iterator == NULL) {
        if (PyErr_ExceptionMatches(PyExc_TypeError)) {
            PyErr_Format(PyExc_TypeError, "cannot unpack non-iterable %.200s object", Py_TYPE(item)->tp_name);
        }
        return -1;
    }
    PyObject *parts[3] = {NULL, NULL, NULL};
    int got = 0;
    while (got < 3 && (parts[got] = PyIter_Next(iterator)) != NULL) {
        got++;
    }
    Py_DECREF(iterator);
    if (PyErr_Occurred() || got != 2) {
        if (!PyErr_Occurred()) {
            if (got < 2) {
                PyErr_Format(PyExc_ValueError, "not enough values to unpack (expected 2, got %d)", got);
            }
            else {
                PyErr_SetString(PyExc_ValueError, "too many values to unpack (expected 2)");
            }
        }
        for (int i = 0; i < got; i++) {
            Py_DECREF(parts[i]);
        }
        return -1;
    }
    *key = parts[0];
    *value = parts[1];
    return 0;
}

/* Adds a note to the ``Exception`` being raised (ADD-7), as the engine's add_many does. */
static void
note_failed_pair(Py_ssize_t index)
{
    if (!PyErr_ExceptionMatches(PyExc_Exception)) {
        return; /* a KeyboardInterrupt goes on as it is */
    }
    PyObject *note = PyUnicode_FromFormat(
        "add_many(): pair %zd failed; the %zd pair(s) before it stay added", index, index);
#if PY_VERSION_HEX >= 0x030C0000
    PyObject *error = PyErr_GetRaisedException();
    if (note != NULL) {
        PyObject *done = PyObject_CallMethod(error, "add_note", "O", note);
        Py_XDECREF(done);
        PyErr_Clear(); /* failing to annotate must not replace the error */
    }
    PyErr_SetRaisedException(error);
#else
    PyObject *type, *error, *traceback;
    PyErr_Fetch(&type, &error, &traceback);
    PyErr_NormalizeException(&type, &error, &traceback);
    if (traceback != NULL) {
        PyException_SetTraceback(error, traceback);
    }
    if (note != NULL) {
        PyObject *done = PyObject_CallMethod(error, "add_note", "O", note);
        Py_XDECREF(done);
        PyErr_Clear();
    }
    PyErr_Restore(type, error, traceback);
#endif
    Py_XDECREF(note);
}

static PyObject *
core_add_many(CoreObject *self, PyObject *pairs)
{
    PyObject *iterator = PyObject_GetIter(pairs);
    if (iterator == NULL) {
        return NULL;
    }
    BufferObject *buffer = NULL; /* looked up at the first pair: an empty call registers nothing */
    Py_ssize_t index = 0, merged = 0;
    PyObject *item, *key, *value;
    while ((item = PyIter_Next(iterator)) != NULL) {
        int failed = unpack_pair(item, &key, &value);
        Py_DECREF(item);
        PyObject *result = NULL;
        if (!failed) {
            if (buffer == NULL) {
                buffer = own_or_new_buffer(self);
            }
            result = buffer == NULL ? NULL : add_to(self, buffer, key, value);
            Py_DECREF(key);
            Py_DECREF(value);
        }
        if (result == NULL) {
            note_failed_pair(index);
            break;
        }
        merged += result == Py_True;
        Py_DECREF(result);
        index++;
    }
    Py_DECREF(iterator);
    Py_XDECREF(buffer);
    return PyErr_Occurred() ? NULL : PyLong_FromSsize_t(merged);
}

static PyObject *
core_get_buffer(CoreObject *self, void *closure)
{
    BufferObject *buffer = own_buffer(self);
    if (buffer == NULL && !PyErr_Occurred()) {
        PyErr_SetString(PyExc_AttributeError, "this thread has no buffer yet");
    }
    return (PyObject *)buffer;
}

/* Removes the entries of storages gone from this thread's state dict (their buffers died):
   once per buffer a thread gets, so each thread keeps entries only for live storages. */
static int
sweep_dead_buffers(PyObject *dict)
{
    PyObject *dead = PyList_New(0);
    if (dead == NULL) {
        return -1;
    }
    PyObject *key, *value;
    Py_ssize_t position = 0;
    int failed = 0;
#ifdef Py_GIL_DISABLED
    Py_BEGIN_CRITICAL_SECTION(dict);
#endif
    while (!failed && PyDict_Next(dict, &position, &key, &value)) {
        if (PyWeakref_CheckRefExact(value) && PyUnicode_Check(key)
            && PyUnicode_Tailmatch(key, key_prefix, 0, PY_SSIZE_T_MAX, -1) == 1) {
            PyObject *buffer;
            int alive = PyWeakref_GetRef(value, &buffer);
            Py_XDECREF(buffer);
            failed = alive < 0 || (!alive && PyList_Append(dead, key) < 0);
        }
    }
#ifdef Py_GIL_DISABLED
    Py_END_CRITICAL_SECTION();
#endif
    for (Py_ssize_t i = 0; !failed && i < PyList_GET_SIZE(dead); i++) {
        failed = PyDict_DelItem(dict, PyList_GET_ITEM(dead, i)) < 0;
    }
    Py_DECREF(dead);
    return failed ? -1 : 0;
}

static int
core_set_buffer(CoreObject *self, PyObject *value, void *closure)
{
    if (value == NULL || !Py_IS_TYPE(value, &BufferType)) {
        PyErr_SetString(PyExc_TypeError, "Core.buffer must be set to a Buffer");
        return -1;
    }
    PyObject *dict = PyThreadState_GetDict();
    if (dict == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "this thread has no thread-state dict");
        return -1;
    }
    if (sweep_dead_buffers(dict) < 0) {
        return -1;
    }
    /* A weak reference: a thread that outlives the storage does not keep its records. */
    PyObject *ref = PyWeakref_NewRef(value, NULL);
    if (ref == NULL) {
        return -1;
    }
    int failed = PyDict_SetItem(dict, self->key, ref);
    Py_DECREF(ref);
    last_core = 0; /* the next add looks this thread's buffer up again */
    return failed;
}

static PyObject *
core_get_home(CoreObject *self, void *closure)
{
    return get_object((PyObject *)self, &self->home);
}

static int
core_set_home(CoreObject *self, PyObject *value, void *closure)
{
    return swap_object((PyObject *)self, &self->home, value, &PyDict_Type, "Core.home");
}

static PyObject *
core_get_gathers(CoreObject *self, void *closure)
{
    return PyLong_FromSsize_t(LOAD(self->gathers));
}

static int
core_set_gathers(CoreObject *self, PyObject *value, void *closure)
{
    Py_ssize_t gathers = value == NULL ? -1 : PyLong_AsSsize_t(value);
    if (gathers == -1) {
        if (!PyErr_Occurred()) {
            PyErr_SetString(PyExc_TypeError, "Core.gathers must be an int >= 0");
        }
        return -1;
    }
    STORE(self->gathers, gathers);
    return 0;
}

static PyObject *
core_get_closed(CoreObject *self, void *closure)
{
    return PyBool_FromLong(LOAD(self->closed));
}

static int
core_set_closed(CoreObject *self, PyObject *value, void *closure)
{
    return set_flag(&self->closed, value, "Core.closed");
}

static PyObject *
core_get_buffers(CoreObject *self, void *closure)
{
    return get_object((PyObject *)self, &self->buffers);
}

static int
core_set_buffers(CoreObject *self, PyObject *value, void *closure)
{
    /* Set under the storage's _shared lock whenever it registers or drops a buffer. */
    return swap_object((PyObject *)self, &self->buffers, value, &PyTuple_Type, "Core.buffers");
}

static PyGetSetDef core_getset[] = {
    {"buffers", (getter)core_get_buffers, (setter)core_set_buffers,
     "the storage's buffers, kept alive as long as this core", NULL},
    {"buffer", (getter)core_get_buffer, (setter)core_set_buffer,
     "the calling thread's Buffer (AttributeError if none); setting binds one to it", NULL},
    {"home", (getter)core_get_home, (setter)core_set_home, "re-queued and read records", NULL},
    {"gathers", (getter)core_get_gathers, (setter)core_set_gathers, "odd while a gather runs",
     NULL},
    {"closed", (getter)core_get_closed, (setter)core_set_closed, "adds are refused", NULL},
    {NULL},
};

static PyMethodDef core_methods[] = {
    {"add", (PyCFunction)(void (*)(void))core_add, METH_FASTCALL,
     "add(key, value) -> bool: merge into this thread's buffer; True if it merged"},
    {"add_many", (PyCFunction)core_add_many, METH_O,
     "add_many(pairs) -> int: add each (key, value) in order; how many merged (ADD-7)"},
    {NULL},
};

static PyTypeObject CoreType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "aggregator_native._native.Core",
    .tp_doc = "One storage's add: Core(merge, register, from_home, refuse_reentrant, "
              "refuse_closed, clock).",
    .tp_basicsize = sizeof(CoreObject),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_new = core_new,
    .tp_dealloc = (destructor)core_dealloc,
    .tp_traverse = (traverseproc)core_traverse,
    .tp_clear = (inquiry)core_clear,
    .tp_weaklistoffset = offsetof(CoreObject, weakrefs),
    .tp_getset = core_getset,
    .tp_methods = core_methods,
};

/* -- the module ------------------------------------------------------------------------ */

static int
native_exec(PyObject *module)
{
    if (allocate_lock == NULL) {
        PyObject *thread = PyImport_ImportModule("_thread");
        if (thread == NULL) {
            return -1;
        }
        allocate_lock = PyObject_GetAttrString(thread, "allocate_lock");
        Py_DECREF(thread);
        if (allocate_lock == NULL) {
            return -1;
        }
    }
    if (mark_key == NULL) {
        mark_key = PyUnicode_InternFromString("aggregator_native.ThreadMark");
        key_prefix = PyUnicode_InternFromString("aggregator_native.Core.");
        if (mark_key == NULL || key_prefix == NULL) {
            return -1;
        }
    }
    if (PyType_Ready(&MarkType) < 0 || PyType_Ready(&StampsType) < 0 || PyType_Ready(&BufferType) < 0
        || PyType_Ready(&CoreType) < 0) {
        return -1;
    }
    if (PyModule_AddObjectRef(module, "Buffer", (PyObject *)&BufferType) < 0
        || PyModule_AddObjectRef(module, "Stamps", (PyObject *)&StampsType) < 0
        || PyModule_AddObjectRef(module, "Core", (PyObject *)&CoreType) < 0) {
        return -1;
    }
#ifdef Py_GIL_DISABLED
    return PyModule_AddIntConstant(module, "FREE_THREADED", 1);
#else
    return PyModule_AddIntConstant(module, "FREE_THREADED", 0);
#endif
}

static PyModuleDef_Slot native_slots[] = {
    {Py_mod_exec, native_exec},
#if PY_VERSION_HEX >= 0x030C0000
    /* Static types and module globals: one interpreter only. */
    {Py_mod_multiple_interpreters, Py_MOD_MULTIPLE_INTERPRETERS_NOT_SUPPORTED},
#endif
#ifdef Py_mod_gil
    {Py_mod_gil, Py_MOD_GIL_NOT_USED}, /* safe without the GIL: see the top of this file */
#endif
    {0, NULL},
};

static struct PyModuleDef native_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "aggregator_native._native",
    .m_doc = "The native backend's compiled part: per-thread buffers and their add.",
    .m_size = 0,
    .m_slots = native_slots,
};

PyMODINIT_FUNC
PyInit__native(void)
{
    return PyModuleDef_Init(&native_module);
}
