/* Stamps: a buffer's first-add stamps, one int64 per record, in the records' insertion order.

   8 bytes a record, where a list of ints takes 40 (an 8-byte slot and a 32-byte int): the
   records of a million keys cost about 1.1x a plain dict of them instead of 1.55x. The add
   path pushes in C; the Python part of the storage (aggregator_freethreaded's _parts and
   _gathering) reads it as a sequence (len, index, iteration) and appends with append().

   Included by _native.c only. Thread safety: every access runs in a critical section of the
   object on free-threaded builds (a no-op before 3.13 and with the GIL), so a misuse from two
   threads can give a wrong stamp but never touches freed memory. By the storage's design only
   one thread uses a state's stamps at a time: its owner while it adds, a taker afterwards. */

typedef struct {
    PyObject_HEAD
    int64_t *items;
    Py_ssize_t size;
    Py_ssize_t allocated;
} StampsObject;

static PyTypeObject StampsType;

/* Appends one stamp: 0, or -1 with MemoryError set. Grows by an eighth, as a list does. */
static int
stamps_push(StampsObject *self, int64_t stamp)
{
    int failed = 0;
    Py_BEGIN_CRITICAL_SECTION(self);
    if (self->size == self->allocated) {
        Py_ssize_t allocated = self->allocated + (self->allocated >> 3) + 8;
        int64_t *items = allocated <= PY_SSIZE_T_MAX / (Py_ssize_t)sizeof(int64_t)
                             ? PyMem_Realloc(self->items, (size_t)allocated * sizeof(int64_t))
                             : NULL;
        if (items == NULL) {
            failed = -1;
        }
        else {
            self->items = items;
            self->allocated = allocated;
        }
    }
    if (!failed) {
        self->items[self->size++] = stamp;
    }
    Py_END_CRITICAL_SECTION();
    if (failed) {
        PyErr_NoMemory();
    }
    return failed;
}

static PyObject *
stamps_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    if (PyTuple_GET_SIZE(args) != 0 || (kwds != NULL && PyDict_GET_SIZE(kwds) != 0)) {
        PyErr_SetString(PyExc_TypeError, "Stamps() takes no arguments");
        return NULL;
    }
    return type->tp_alloc(type, 0);
}

static void
stamps_dealloc(StampsObject *self)
{
    PyMem_Free(self->items);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *
stamps_append(StampsObject *self, PyObject *value)
{
    long long stamp = PyLong_AsLongLong(value);
    if (stamp == -1 && PyErr_Occurred()) {
        return NULL;
    }
    if (stamps_push(self, (int64_t)stamp) < 0) {
        return NULL;
    }
    Py_RETURN_NONE;
}

static Py_ssize_t
stamps_length(StampsObject *self)
{
    Py_ssize_t size;
    Py_BEGIN_CRITICAL_SECTION(self);
    size = self->size;
    Py_END_CRITICAL_SECTION();
    return size;
}

static PyObject *
stamps_item(StampsObject *self, Py_ssize_t index)
{
    int64_t stamp = 0;
    int found;
    Py_BEGIN_CRITICAL_SECTION(self);
    found = index >= 0 && index < self->size;
    if (found) {
        stamp = self->items[index];
    }
    Py_END_CRITICAL_SECTION();
    if (!found) {
        PyErr_SetString(PyExc_IndexError, "Stamps index out of range");
        return NULL;
    }
    return PyLong_FromLongLong((long long)stamp);
}

static PySequenceMethods stamps_as_sequence = {
    .sq_length = (lenfunc)stamps_length,
    .sq_item = (ssizeargfunc)stamps_item,
};

static PyMethodDef stamps_methods[] = {
    {"append", (PyCFunction)stamps_append, METH_O, "append(stamp): one more stamp, an int64"},
    {NULL},
};

static PyTypeObject StampsType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "aggregator_native._native.Stamps",
    .tp_doc = "Stamps(): first-add stamps of a buffer's records, 8 bytes each; a sequence of ints.",
    .tp_basicsize = sizeof(StampsObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = stamps_new,
    .tp_dealloc = (destructor)stamps_dealloc,
    .tp_as_sequence = &stamps_as_sequence,
    .tp_methods = stamps_methods,
};
