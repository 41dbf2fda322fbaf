/* The API-server hooks' request-path work in C (kvprof.probes.api_hooks holds the same in
 * Python, used where this module is not built).
 *
 * Why C: these run on the frontend's event loop for every request, and measured there
 * (bench/api_overhead.py) their cost is not the instructions they run but the memory they
 * touch and keep: code and objects run cold (every request's code evicts the last one's),
 * and what a record keeps alive until the export thread reads it (up to a flush interval)
 * makes later allocations land on cold memory. So the work is C, and a record is one
 * object, a Record, whose times are plain integers (not six int objects) and which keeps
 * of the request's parameters only the kv_transfer_params fields the export thread reads
 * (not vLLM's dicts, which the collector would walk). It reads like the Python version's
 * list (record[i], len, slices; the layout is documented in api_hooks.py), so the export
 * thread treats both alike; tests run both, and count what C keeps alive. For the same
 * reason vLLM's msgspec fields are read at their slots (Field), the ASGI wrapper is C, and
 * the response's end is noted without a coroutine of ours (Ending).
 *
 * Errors raise into the caller, whose Python try/except reports the hook failed (where no
 * caller can take one, report_failure does): nothing here may raise into vLLM.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <time.h>

/* Record positions (api_hooks.py). */
enum {
    KIND = 0, T_RECV, T_FIRST_BYTES, T_END, STATUS, XID, HTTP_TRACEPARENT, PATH,
    RID, T_INPUT, EXTRA_ARGS, TRACEPARENT, T_HANDOFF, INTERNAL, T_FIRST_OUTPUT, OK,
    RECORD_LEN
};

#define MAX_KV_FIELDS 8

/* A field read where it lies. vLLM's request, parameter and output types are msgspec
 * structs, whose fields are slots (member descriptors): a generic attribute read looks the
 * name up along the type's MRO and goes through the descriptor each time, cold code and
 * data on every request. So a field's offset is looked up once per type and read directly
 * while the type is unchanged (its version tag); anything else takes the generic path. */
typedef struct {
    PyTypeObject *type;  /* a strong reference, so the address cannot be reused */
    unsigned int version;
    Py_ssize_t offset;  /* 0: not a plain object slot of that type */
} Field;

enum { F_EXTRA_ARGS, F_REQUEST_ID, F_TRACE_HEADERS, F_OUT_REQUEST_ID, F_NEW_TOKEN_IDS,
       F_FINISH_REASON, N_FIELDS };

/* A Hooks object holds the state of one api_hooks module (the bench loads two). */
typedef struct {
    PyObject_HEAD
    PyObject *http_var, *call_var, *await_dict, *send_probes, *hooks_module, *api_kind,
        *traceparent_key, *cycle_attr, *prune, *failed;
    PyObject *kv_fields[MAX_KV_FIELDS];
    Py_ssize_t await_limit, n_kv_fields;
    Py_ssize_t relays;  /* relays given to apps (read by tests: uvicorn's cycle needs none) */
    PyObject *hooks_dict;  /* the hooks module's namespace (its _EMIT) */
    Field fields[N_FIELDS];
} Hooks;

static PyObject *s_emit, *s_method, *s_post, *s_headers, *s_path, *s_empty, *s_status,
    *s_body, *s_more_body, *s_type, *s_response_body, *s_response_pathsend, *s_on_response,
    *s_extra_args, *s_kv_transfer_params,
    *s_request_id, *s_trace_headers, *s_new_token_ids, *s_finish_reason;

static int
Hooks_ready(Hooks *self)
{
    if (self->http_var == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "Hooks not initialised");
        return 0;
    }
    return 1;
}

static void
learn_field(Field *f, PyTypeObject *tp, PyObject *name)
{
    Py_XSETREF(f->type, (PyTypeObject *)Py_NewRef(tp));
    f->offset = 0;
    PyObject *descr = NULL;  /* borrowed */
    if (tp->tp_getattro == PyObject_GenericGetAttr)
        descr = _PyType_Lookup(tp, name);  /* gives tp a version tag */
    f->version = tp->tp_version_tag;
    /* A member of tp itself or of a base (one copied from an unrelated class would read
     * at that class's offset; getattr refuses it). */
    if (descr == NULL || !Py_IS_TYPE(descr, &PyMemberDescr_Type)
            || !PyType_IsSubtype(tp, PyDescr_TYPE(descr)))
        return;
    PyMemberDef *m = ((PyMemberDescrObject *)descr)->d_member;
    if ((m->type == T_OBJECT_EX || m->type == T_OBJECT) && m->offset > 0)
        f->offset = m->offset;
}

/* getattr(o, name), read where it lies when o's type holds it in a slot (see Field). */
static PyObject *
get_field(Hooks *self, int which, PyObject *o, PyObject *name)
{
    Field *f = &self->fields[which];
    PyTypeObject *tp = Py_TYPE(o);
    int current = PyType_HasFeature(tp, Py_TPFLAGS_VALID_VERSION_TAG);
    if (f->type != tp || !current || f->version != tp->tp_version_tag) {
        learn_field(f, tp, name);  /* another type, or this one changed */
        current = PyType_HasFeature(tp, Py_TPFLAGS_VALID_VERSION_TAG);
    }
    if (f->offset > 0 && current && f->version == tp->tp_version_tag) {
        PyObject *v = *(PyObject **)((char *)o + f->offset);
        if (v != NULL)
            return Py_NewRef(v);
    }
    return PyObject_GetAttr(o, name);
}

static int64_t
now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);  /* time.time_ns() */
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

/* -- Record -------------------------------------------------------------------------------- */
/* One engine call, and for the HTTP request's record its HTTP part too. A time of 0 and a
 * NULL object read as None. Not tracked by the garbage collector: what it holds (strings,
 * the status, the kv fields' values, further calls, the Hooks) leads back to it only
 * through the hooks' own state (_AWAIT while a call waits, the export buffer until read),
 * which lets go of it by itself; so reference counting frees it, and a collection never
 * walks it. */
typedef struct {
    PyObject_HEAD
    PyObject *kind;  /* API, or None for a further call of an HTTP request */
    int64_t t_recv, t_first_bytes, t_end, t_input, t_handoff, t_first_output;
    PyObject *status, *xid, *http_traceparent, *path, *rid, *traceparent, *internal;
    Hooks *hooks;  /* the names of the kv fields */
    PyObject *kv[MAX_KV_FIELDS];  /* their values (NULL: absent) */
    PyObject *calls;  /* further calls of the HTTP request (a list), or NULL */
    char has_kv, ok;
} Record;

static PyTypeObject RecordType;

#define IS_RECORD(o) Py_IS_TYPE((o), &RecordType)

static Record *
new_record(Hooks *hooks, PyObject *kind)
{
    Record *r = PyObject_New(Record, &RecordType);
    if (r == NULL)
        return NULL;
    memset((char *)r + sizeof(PyObject), 0, sizeof(Record) - sizeof(PyObject));
    r->kind = Py_NewRef(kind);
    Py_INCREF(hooks);
    r->hooks = hooks;
    r->ok = 1;
    return r;
}

static void
Record_dealloc(Record *r)
{
    Py_XDECREF(r->kind);
    Py_XDECREF(r->status);
    Py_XDECREF(r->xid);
    Py_XDECREF(r->http_traceparent);
    Py_XDECREF(r->path);
    Py_XDECREF(r->rid);
    Py_XDECREF(r->traceparent);
    Py_XDECREF(r->internal);
    for (int i = 0; i < MAX_KV_FIELDS; i++)
        Py_XDECREF(r->kv[i]);
    Py_XDECREF(r->calls);
    Py_XDECREF(r->hooks);
    PyObject_Free(r);
}

static PyObject *
time_or_none(int64_t t)
{
    if (t == 0)
        Py_RETURN_NONE;
    return PyLong_FromLongLong(t);
}

static PyObject *
or_none(PyObject *o)
{
    return Py_NewRef(o != NULL ? o : Py_None);
}

/* The EXTRA_ARGS slot: {"kv_transfer_params": {field: value}} with the fields kept. */
static PyObject *
Record_extra_args(Record *r)
{
    if (!r->has_kv)
        Py_RETURN_NONE;
    PyObject *kvp = PyDict_New(), *extra = NULL;
    if (kvp == NULL)
        return NULL;
    for (Py_ssize_t i = 0; i < r->hooks->n_kv_fields; i++)
        if (r->kv[i] != NULL && PyDict_SetItem(kvp, r->hooks->kv_fields[i], r->kv[i]) < 0)
            goto fail;
    if ((extra = PyDict_New()) == NULL
            || PyDict_SetItem(extra, s_kv_transfer_params, kvp) < 0)
        goto fail;
    Py_DECREF(kvp);
    return extra;
fail:
    Py_DECREF(kvp);
    Py_XDECREF(extra);
    return NULL;
}

static Py_ssize_t
Record_length(Record *r)
{
    return RECORD_LEN + (r->calls != NULL ? PyList_GET_SIZE(r->calls) : 0);
}

static PyObject *
Record_item(Record *r, Py_ssize_t i)
{
    switch (i) {
    case KIND: return Py_NewRef(r->kind);
    case T_RECV: return time_or_none(r->t_recv);
    case T_FIRST_BYTES: return time_or_none(r->t_first_bytes);
    case T_END: return time_or_none(r->t_end);
    case STATUS: return or_none(r->status);
    case XID: return or_none(r->xid);
    case HTTP_TRACEPARENT: return or_none(r->http_traceparent);
    case PATH: return or_none(r->path);
    case RID: return or_none(r->rid);
    case T_INPUT: return time_or_none(r->t_input);
    case EXTRA_ARGS: return Record_extra_args(r);
    case TRACEPARENT: return or_none(r->traceparent);
    case T_HANDOFF: return time_or_none(r->t_handoff);
    case INTERNAL: return or_none(r->internal);
    case T_FIRST_OUTPUT: return time_or_none(r->t_first_output);
    case OK: return PyBool_FromLong(r->ok);
    }
    if (i >= RECORD_LEN && i < Record_length(r))
        return Py_NewRef(PyList_GET_ITEM(r->calls, i - RECORD_LEN));
    PyErr_SetString(PyExc_IndexError, "record index out of range");
    return NULL;
}

static PyObject *
Record_as_list(Record *r)
{
    Py_ssize_t n = Record_length(r);
    PyObject *out = PyList_New(n);
    if (out == NULL)
        return NULL;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *v = Record_item(r, i);
        if (v == NULL) {
            Py_DECREF(out);
            return NULL;
        }
        PyList_SET_ITEM(out, i, v);
    }
    return out;
}

static PyObject *
Record_subscript(Record *r, PyObject *key)
{
    if (PyIndex_Check(key)) {
        Py_ssize_t i = PyNumber_AsSsize_t(key, PyExc_IndexError);
        if (i == -1 && PyErr_Occurred())
            return NULL;
        if (i < 0)
            i += Record_length(r);
        if (i < 0) {
            PyErr_SetString(PyExc_IndexError, "record index out of range");
            return NULL;
        }
        return Record_item(r, i);
    }
    if (PySlice_Check(key)) {  /* off the request path: as the list would */
        PyObject *all = Record_as_list(r);
        if (all == NULL)
            return NULL;
        PyObject *out = PyObject_GetItem(all, key);
        Py_DECREF(all);
        return out;
    }
    PyErr_Format(PyExc_TypeError, "record indices must be integers or slices, not %.100s",
                 Py_TYPE(key)->tp_name);
    return NULL;
}

static PyObject *
Record_repr(Record *r)
{
    PyObject *all = Record_as_list(r);
    if (all == NULL)
        return NULL;
    PyObject *out = PyUnicode_FromFormat("Record(%R)", all);
    Py_DECREF(all);
    return out;
}

static PyMappingMethods Record_mapping = {
    .mp_length = (lenfunc)Record_length,
    .mp_subscript = (binaryfunc)Record_subscript,
};

static PySequenceMethods Record_sequence = {
    .sq_length = (lenfunc)Record_length,
    .sq_item = (ssizeargfunc)Record_item,
};

static PyTypeObject RecordType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "kvprof.probes._fastrec.Record",
    .tp_doc = "An API-server record (read like api_hooks' list: record[i], len, slices).",
    .tp_basicsize = sizeof(Record),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_dealloc = (destructor)Record_dealloc,
    .tp_repr = (reprfunc)Record_repr,
    .tp_as_mapping = &Record_mapping,
    .tp_as_sequence = &Record_sequence,
};

/* -- shared steps -------------------------------------------------------------------------- */
static int
emit(Hooks *self, PyObject *event)
{
    /* looked up each time: set_emit may change it */
    PyObject *target = PyDict_GetItemWithError(self->hooks_dict, s_emit);  /* borrowed */
    if (target == NULL) {
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_AttributeError, "the hooks module has no _EMIT");
        return -1;
    }
    Py_INCREF(target);
    PyObject *r = PyObject_CallOneArg(target, event);
    Py_DECREF(target);
    if (r == NULL)
        return -1;
    Py_DECREF(r);
    return 0;
}

static int
set_var(PyObject *var, PyObject *value)
{
    PyObject *token = PyContextVar_Set(var, value);
    if (token == NULL)
        return -1;
    Py_DECREF(token);
    return 0;
}

/* var.get(): a new reference (None when unset, the var's default). */
static PyObject *
get_var(PyObject *var)
{
    PyObject *value;
    if (PyContextVar_Get(var, Py_None, &value) < 0)
        return NULL;
    return value;
}

static int
name_is(PyObject *k, const char *name, Py_ssize_t len)
{
    return PyBytes_Check(k) && PyBytes_GET_SIZE(k) == len
        && memcmp(PyBytes_AS_STRING(k), name, (size_t)len) == 0;
}

/* The exception being handled (sys.exception()), a new reference or NULL; and setting it.
 * Python 3.10, which vLLM images still run, has only the (type, value, traceback) form. */
static PyObject *
get_handled(void)
{
#if PY_VERSION_HEX >= 0x030B0000
    return PyErr_GetHandledException();
#else
    PyObject *type, *value, *tb;
    PyErr_GetExcInfo(&type, &value, &tb);
    Py_XDECREF(type);
    Py_XDECREF(tb);
    return value == Py_None ? (Py_DECREF(value), NULL) : value;
#endif
}

static void
set_handled(PyObject *exc)  /* borrowed; NULL clears it */
{
#if PY_VERSION_HEX >= 0x030B0000
    PyErr_SetHandledException(exc);
#else
    if (exc == NULL || exc == Py_None) {
        PyErr_SetExcInfo(NULL, NULL, NULL);
        return;
    }
    PyErr_SetExcInfo(Py_NewRef((PyObject *)Py_TYPE(exc)), Py_NewRef(exc),
                     PyException_GetTraceback(exc));  /* SetExcInfo steals all three */
#endif
}

/* A recording failed where nothing may raise: hooks._hook_failed(name) (reported once). */
static void
report_failure(Hooks *self, const char *name)
{
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    PyErr_NormalizeException(&type, &value, &tb);
    if (value != NULL && tb != NULL)
        PyException_SetTraceback(value, tb);
    if (self->failed != NULL) {
        /* as the exception being handled, so the one-time warning shows it */
        PyObject *handled = get_handled();
        set_handled(value);
        PyObject *r = PyObject_CallFunction(self->failed, "s", name);
        Py_XDECREF(r);
        PyErr_Clear();
        set_handled(handled);
        Py_XDECREF(handled);
    }
    Py_XDECREF(type);
    Py_XDECREF(value);
    Py_XDECREF(tb);
}

/* A call of an ended response whose first output never came stops waiting for it. */
static int
stop_waiting(Hooks *self, PyObject *o)
{
    if (!IS_RECORD(o))
        return 0;
    Record *c = (Record *)o;
    if (c->rid == NULL || c->t_first_output != 0 || c->internal == NULL)
        return 0;
    PyObject *waiting = PyDict_GetItemWithError(self->await_dict, c->internal);
    if (waiting == NULL)
        return PyErr_Occurred() ? -1 : 0;
    return PyDict_DelItem(self->await_dict, c->internal);
}

/* The response has ended: its calls stop waiting; then, last, the end time (the record is
 * complete once the export thread sees it), written also when the first part failed (-1):
 * a record without one would count as in flight for ever. */
static int
end_record(Hooks *self, Record *h)
{
    int64_t t = now_ns();
    int r = 0;
    if (PyDict_GET_SIZE(self->await_dict) > 0) {
        r = stop_waiting(self, (PyObject *)h);
        if (h->calls != NULL)
            for (Py_ssize_t i = 0; r == 0 && i < PyList_GET_SIZE(h->calls); i++)
                r = stop_waiting(self, PyList_GET_ITEM(h->calls, i));
    }
    h->t_end = t;
    return r;
}

/* -- HTTP intake ----------------------------------------------------------------------------- */
/* The HTTP request's record, emitted and set in the task's context; NULL without an error
 * for anything but a POST (websocket and lifespan scopes have no method). */
static Record *
start_record(Hooks *self, PyObject *scope)
{
    if (!PyDict_Check(scope))
        return NULL;
    PyObject *method = PyDict_GetItemWithError(scope, s_method);  /* borrowed */
    if (method == NULL)
        return NULL;
    if (method != s_post
            && !(PyUnicode_Check(method) && PyUnicode_Compare(method, s_post) == 0))
        return NULL;
    int64_t t = now_ns();
    Record *h = new_record(self, self->api_kind);
    if (h == NULL)
        return NULL;
    h->t_recv = t;

    /* From the last header back until both are found (a header sent twice counts with
     * its last value), as the Python version. */
    PyObject *xid = NULL, *tp = NULL;  /* borrowed */
    PyObject *headers = PyDict_GetItemWithError(scope, s_headers);
    if (headers == NULL && PyErr_Occurred())
        goto fail;
    if (headers != NULL && PyList_Check(headers)) {
        for (Py_ssize_t i = PyList_GET_SIZE(headers) - 1; i >= 0; i--) {
            PyObject *item = PyList_GET_ITEM(headers, i);
            PyObject *k, *v;
            if (PyTuple_Check(item) && PyTuple_GET_SIZE(item) == 2) {
                k = PyTuple_GET_ITEM(item, 0);
                v = PyTuple_GET_ITEM(item, 1);
            }
            else if (PyList_Check(item) && PyList_GET_SIZE(item) == 2) {
                k = PyList_GET_ITEM(item, 0);
                v = PyList_GET_ITEM(item, 1);
            }
            else
                continue;
            if (name_is(k, "traceparent", 11)) {
                if (tp == NULL) {
                    tp = v;
                    if (xid != NULL)
                        break;
                }
            }
            else if (xid == NULL && name_is(k, "x-request-id", 12)) {
                xid = v;
                if (tp != NULL)
                    break;
            }
        }
    }
    if (xid != NULL)
        h->xid = Py_NewRef(xid);
    if (tp != NULL && PyBytes_Check(tp)) {
        h->http_traceparent = PyUnicode_DecodeLatin1(PyBytes_AS_STRING(tp),
                                                     PyBytes_GET_SIZE(tp), NULL);
        if (h->http_traceparent == NULL)
            goto fail;
    }
    PyObject *path = PyDict_GetItemWithError(scope, s_path);
    if (path == NULL && PyErr_Occurred())
        goto fail;
    h->path = Py_NewRef(path != NULL ? path : s_empty);
    if (emit(self, (PyObject *)h) < 0)
        goto fail;
    /* Set and not reset: the server runs each request in a task of its own. */
    if (set_var(self->http_var, (PyObject *)h) < 0) {
        h->t_end = now_ns();  /* out already: ended, so not in flight for ever */
        goto fail;
    }
    return h;
fail:
    Py_DECREF(h);
    return NULL;
}

/* Ending: what ends a record with its response, in one of two places, and at the latest
 * when it is let go, which is when the app has returned (also when the response never
 * completed: client gone, app failed). So the app runs with no coroutine of ours around it.
 *
 * - uvicorn's request cycle calls its on_response when the response is complete: wrapped
 *   in an Ending (ON_RESPONSE) the record ends, then uvicorn's own runs. The cycle lets go
 *   of it when run_asgi returns (it sets on_response to a no-op).
 * - Under a server kvprof does not probe, the app's ``send`` is an Ending (a relay): it
 *   notes the status (from the message that carries one, http.response.start), the time
 *   of the first body bytes and the end (the message after which no more body comes),
 *   then hands the message on, returning the server's own awaitable. */
/* A relay's states come first (noting while below ON_RESPONSE); SILENT: a relay whose
 * noting failed, which still ends the record at the last message or when let go. */
enum { AWAIT_STATUS, AWAIT_FIRST_BYTES, STREAMING, ON_RESPONSE, SILENT, ENDED };

typedef struct {
    PyObject_HEAD
    vectorcallfunc vectorcall;
    Hooks *hooks;
    Record *record;
    PyObject *target;  /* uvicorn's on_response, or the server's send */
    int state;
} Ending;

static PyTypeObject EndingType;

static void
Ending_end(Ending *self, const char *where)
{
    /* (hooks cleared: the collector is taking down a discarded module with this) */
    if (self->state == ENDED || self->hooks->await_dict == NULL)
        return;
    self->state = ENDED;
    if (end_record(self->hooks, self->record) < 0)
        report_failure(self->hooks, where);
}

static int
str_is(PyObject *v, PyObject *interned)
{
    return v == interned || (PyUnicode_Check(v) && PyUnicode_Compare(v, interned) == 0);
}

/* A relay: the status from the message that carries one (http.response.start), and the
 * first body bytes from any message with a body; -1 with an error. */
static int
Ending_note(Ending *self, PyObject *message)
{
    Record *h = self->record;
    PyObject *v;
    if (self->state == AWAIT_STATUS) {
        if ((v = PyDict_GetItemWithError(message, s_status)) == NULL || v == Py_None)
            return PyErr_Occurred() ? -1 : 0;
        Py_XSETREF(h->status, Py_NewRef(v));
        self->state = AWAIT_FIRST_BYTES;
    }
    else if (self->state == AWAIT_FIRST_BYTES) {
        if ((v = PyDict_GetItemWithError(message, s_body)) == NULL)
            return PyErr_Occurred() ? -1 : 0;
        int any = PyObject_IsTrue(v);
        if (any < 0)
            return -1;
        if (any) {
            h->t_first_bytes = now_ns();
            self->state = STREAMING;
        }
    }
    return 0;
}

/* Whether ``message`` ends the response: the last body message (more_body false), or a
 * pathsend (the file is the body); -1 with an error. */
static int
Ending_is_last(Ending *self, PyObject *message)
{
    PyObject *type = PyDict_GetItemWithError(message, s_type), *v;
    if (type == NULL)
        return PyErr_Occurred() ? -1 : 0;
    if (str_is(type, s_response_body)) {
        if ((v = PyDict_GetItemWithError(message, s_more_body)) == NULL)
            return PyErr_Occurred() ? -1 : 1;
        return PyObject_Not(v);
    }
    if (str_is(type, s_response_pathsend)) {
        if (self->record->t_first_bytes == 0)
            self->record->t_first_bytes = now_ns();
        return 1;
    }
    return PyErr_Occurred() ? -1 : 0;
}

static PyObject *
Ending_vectorcall(Ending *self, PyObject *const *args, size_t nargsf, PyObject *kwnames)
{
    if (self->state == ON_RESPONSE)
        Ending_end(self, "uvicorn on_response");
    else if (self->state != ENDED && PyVectorcall_NARGS(nargsf) == 1 && kwnames == NULL
             && PyDict_Check(args[0])) {
        /* a relay: a message it cannot read stops the noting (SILENT), not the end */
        if (self->state < ON_RESPONSE && Ending_note(self, args[0]) < 0) {
            report_failure(self->hooks, "ASGI send");
            self->state = SILENT;
        }
        int last = Ending_is_last(self, args[0]);
        if (last < 0)  /* it cannot be told when the response ends: now, then */
            report_failure(self->hooks, "ASGI send");
        if (last != 0)
            Ending_end(self, "ASGI response");
    }
    if (self->target == NULL)  /* cleared by the collector */
        Py_RETURN_NONE;
    return PyObject_Vectorcall(self->target, args, nargsf, kwnames);
}

static int
Ending_traverse(Ending *self, visitproc visit, void *arg)
{
    Py_VISIT(self->target);
    return 0;
}

static int
Ending_clear(Ending *self)
{
    Py_CLEAR(self->target);
    return 0;
}

static void
Ending_dealloc(Ending *self)
{
    PyObject_GC_UnTrack(self);
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    Ending_end(self, "ASGI response end");
    PyErr_Restore(type, value, tb);
    Py_CLEAR(self->target);
    Py_CLEAR(self->record);
    Py_CLEAR(self->hooks);
    PyObject_GC_Del(self);
}

static PyTypeObject EndingType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "kvprof.probes._fastrec.Ending",
    .tp_doc = "Ends a kvprof record with its response: uvicorn's on_response, or a send.",
    .tp_basicsize = sizeof(Ending),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_HAVE_VECTORCALL,
    .tp_vectorcall_offset = offsetof(Ending, vectorcall),
    .tp_call = PyVectorcall_Call,
    .tp_traverse = (traverseproc)Ending_traverse,
    .tp_clear = (inquiry)Ending_clear,
    .tp_dealloc = (destructor)Ending_dealloc,
};

static Ending *
new_ending(Hooks *hooks, Record *h, PyObject *target, int state)
{
    Ending *e = PyObject_GC_New(Ending, &EndingType);
    if (e == NULL)
        return NULL;
    e->vectorcall = (vectorcallfunc)Ending_vectorcall;
    e->hooks = (Hooks *)Py_NewRef(hooks);
    e->record = (Record *)Py_NewRef(h);
    e->target = Py_NewRef(target);
    e->state = state;
    PyObject_GC_Track(e);
    return e;
}

/* A POST to uvicorn's request cycle (its send probed): the cycle holds the record until the
 * response's first bytes are out (the probe notes them), and its on_response, wrapped in an
 * Ending, ends it. 1 when so, 0 where the cycle has no on_response (the caller relays). */
static int
register_with_cycle(Hooks *self, PyObject *cycle, Record *h)
{
    PyObject *on_response = PyObject_GetAttr(cycle, s_on_response);
    if (on_response == NULL) {
        if (!PyErr_ExceptionMatches(PyExc_AttributeError))
            return -1;
        PyErr_Clear();
        return 0;
    }
    if (!PyCallable_Check(on_response)) {
        Py_DECREF(on_response);
        return 0;
    }
    Ending *e = new_ending(self, h, on_response, ENDED);  /* ENDED until installed */
    Py_DECREF(on_response);
    if (e == NULL)
        return -1;
    int r = -1;
    if (PyObject_SetAttr(cycle, self->cycle_attr, (PyObject *)h) == 0) {
        if (PyObject_SetAttr(cycle, s_on_response, (PyObject *)e) == 0) {
            e->state = ON_RESPONSE;
            r = 1;
        }
        else {  /* the probe must not note a response nobody ends */
            PyObject *type, *value, *tb;
            PyErr_Fetch(&type, &value, &tb);
            if (PyObject_SetAttr(cycle, self->cycle_attr, Py_None) < 0)
                PyErr_Clear();
            PyErr_Restore(type, value, tb);
        }
    }
    Py_DECREF(e);
    return r;
}

/* Asgi: the ASGI app with kvprof's record around each POST; the record ends with the
 * response (uvicorn's cycle, or the relay), so what the server awaits is the app's own
 * coroutine. Nothing of this raises into the server: a failed recording is reported and
 * the app runs as it would. */
typedef struct {
    PyObject_HEAD
    vectorcallfunc vectorcall;
    Hooks *hooks;
    PyObject *app, *dict;
} Asgi;

/* The send the app gets for record h: the server's own where uvicorn's probed cycle notes
 * the response, else a relay (a new reference either way). */
static PyObject *
send_for(Hooks *self, Record *h, PyObject *send)
{
    if (PyMethod_Check(send)) {
        int probed = PySet_Contains(self->send_probes, PyMethod_GET_FUNCTION(send));
        if (probed < 0)
            return NULL;
        if (probed) {
            int registered = register_with_cycle(self, PyMethod_GET_SELF(send), h);
            if (registered > 0)
                return Py_NewRef(send);
            if (registered < 0)  /* reported; the relay notes and ends it then */
                report_failure(self, "ASGI request");
        }
    }
    self->relays++;
    return (PyObject *)new_ending(self, h, send, AWAIT_STATUS);
}

static PyObject *
Asgi_vectorcall(Asgi *self, PyObject *const *args, size_t nargsf, PyObject *kwnames)
{
    if (PyVectorcall_NARGS(nargsf) != 3 || kwnames != NULL)
        return PyObject_Vectorcall(self->app, args, nargsf, kwnames);
    Record *h = start_record(self->hooks, args[0]);
    PyObject *send = NULL;
    if (h != NULL) {
        if ((send = send_for(self->hooks, h, args[2])) == NULL) {
            report_failure(self->hooks, "ASGI request");
            if (end_record(self->hooks, h) < 0)  /* nothing would end it */
                PyErr_Clear();
        }
        Py_DECREF(h);
    }
    else if (PyErr_Occurred())
        report_failure(self->hooks, "ASGI request");
    if (send == NULL)
        return PyObject_Vectorcall(self->app, args, nargsf, kwnames);
    PyObject *call[3] = {args[0], args[1], send};
    PyObject *result = PyObject_Vectorcall(self->app, call, 3, NULL);
    Py_DECREF(send);
    return result;
}

static int
Asgi_traverse(Asgi *self, visitproc visit, void *arg)
{
    Py_VISIT(self->app);
    Py_VISIT(self->dict);
    return 0;
}

static int
Asgi_clear(Asgi *self)
{
    Py_CLEAR(self->app);
    Py_CLEAR(self->dict);
    return 0;
}

static void
Asgi_dealloc(Asgi *self)
{
    PyObject_GC_UnTrack(self);
    Asgi_clear(self);
    Py_CLEAR(self->hooks);
    PyObject_GC_Del(self);
}

static PyObject *
Asgi_get_wrapped(Asgi *self, void *closure)
{
    return Py_NewRef(self->app);
}

static PyGetSetDef Asgi_getset[] = {
    {"__wrapped__", (getter)Asgi_get_wrapped, NULL, "The app inside.", NULL},
    {"__dict__", PyObject_GenericGetDict, PyObject_GenericSetDict, NULL, NULL},
    {NULL},
};

static PyTypeObject AsgiType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "kvprof.probes._fastrec.Asgi",
    .tp_doc = "An ASGI app with kvprof's record around each POST.",
    .tp_basicsize = sizeof(Asgi),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_HAVE_VECTORCALL,
    .tp_vectorcall_offset = offsetof(Asgi, vectorcall),
    .tp_dictoffset = offsetof(Asgi, dict),
    .tp_call = PyVectorcall_Call,
    .tp_getattro = PyObject_GenericGetAttr,
    .tp_setattro = PyObject_GenericSetAttr,
    .tp_getset = Asgi_getset,
    .tp_traverse = (traverseproc)Asgi_traverse,
    .tp_clear = (inquiry)Asgi_clear,
    .tp_dealloc = (destructor)Asgi_dealloc,
};

/* wrap_asgi(app): the app with a record around each POST. */
static PyObject *
wrap_asgi(Hooks *self, PyObject *app)
{
    if (!Hooks_ready(self))
        return NULL;
    Asgi *wrapper = PyObject_GC_New(Asgi, &AsgiType);
    if (wrapper == NULL)
        return NULL;
    wrapper->vectorcall = (vectorcallfunc)Asgi_vectorcall;
    wrapper->hooks = (Hooks *)Py_NewRef(self);
    wrapper->app = Py_NewRef(app);
    wrapper->dict = NULL;
    PyObject_GC_Track(wrapper);
    return (PyObject *)wrapper;
}

/* on_send(cycle, message): uvicorn's RequestResponseCycle.send, while the cycle holds a
 * record: the status from the first message, the time of the first body bytes (then the
 * cycle lets the record go: the rest of the stream costs one attribute test a message).
 * The probe tests the attribute and C reads it again: passing it on would cost the probe
 * a local variable, two more instructions on every message of the stream. */
static PyObject *
on_send(Hooks *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (!Hooks_ready(self))
        return NULL;
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "on_send(cycle, message)");
        return NULL;
    }
    PyObject *cycle = args[0], *message = args[1];
    PyObject *o = PyObject_GetAttr(cycle, self->cycle_attr);
    if (o == NULL)
        return NULL;
    if (!IS_RECORD(o) || !PyDict_Check(message)) {
        Py_DECREF(o);
        Py_RETURN_NONE;
    }
    Record *h = (Record *)o;
    if (h->status == NULL) {
        PyObject *status = PyDict_GetItemWithError(message, s_status);
        if (status == NULL && PyErr_Occurred())
            goto fail;
        if (status != NULL && status != Py_None)
            h->status = Py_NewRef(status);
    }
    else {
        PyObject *body = PyDict_GetItemWithError(message, s_body);
        if (body == NULL && PyErr_Occurred())
            goto fail;
        int any = body != NULL ? PyObject_IsTrue(body) : 0;
        if (any < 0)
            goto fail;
        if (any) {
            h->t_first_bytes = now_ns();
            if (PyObject_SetAttr(cycle, self->cycle_attr, Py_None) < 0)
                goto fail;
        }
    }
    Py_DECREF(o);
    Py_RETURN_NONE;
fail:
    Py_DECREF(o);
    return NULL;
}

/* -- AsyncLLM ------------------------------------------------------------------------------ */
/* The kv_transfer_params fields the export thread reads, from the params' extra_args (the
 * record keeps the values, not vLLM's dicts). */
static int
keep_kv_fields(Hooks *self, Record *c, PyObject *params)
{
    PyObject *extra = get_field(self, F_EXTRA_ARGS, params, s_extra_args);  /* PoolingParams
                                                                             * have none */
    if (extra == NULL) {
        if (!PyErr_ExceptionMatches(PyExc_AttributeError))
            return -1;
        PyErr_Clear();
        return 0;
    }
    int r = 0;
    if (PyDict_Check(extra)) {
        PyObject *kvp = PyDict_GetItemWithError(extra, s_kv_transfer_params);
        if (kvp == NULL)
            r = PyErr_Occurred() ? -1 : 0;
        else if (PyDict_Check(kvp)) {
            c->has_kv = 1;
            for (Py_ssize_t i = 0; i < self->n_kv_fields; i++) {
                PyObject *v = PyDict_GetItemWithError(kvp, self->kv_fields[i]);
                if (v == NULL && PyErr_Occurred()) {
                    r = -1;
                    break;
                }
                Py_XSETREF(c->kv[i], Py_XNewRef(v));
            }
        }
    }
    Py_DECREF(extra);
    return r;
}

static int
fill_call(Hooks *self, Record *c, PyObject *request_id, int64_t t, PyObject *params,
          PyObject *tp)
{
    Py_XSETREF(c->rid, Py_NewRef(request_id));
    c->t_input = t;
    if (tp != NULL && tp != Py_None)
        Py_XSETREF(c->traceparent, Py_NewRef(tp));
    return keep_kv_fields(self, c, params);
}

/* on_add_request(request_id, params, trace_headers): AsyncLLM.add_request. */
static PyObject *
on_add_request(Hooks *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (!Hooks_ready(self))
        return NULL;
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "on_add_request(request_id, params, trace_headers)");
        return NULL;
    }
    PyObject *request_id = args[0], *params = args[1], *trace_headers = args[2];
    int64_t t = now_ns();
    PyObject *tp = NULL;  /* borrowed */
    if (trace_headers != Py_None && PyDict_Check(trace_headers)
            && PyDict_GET_SIZE(trace_headers) > 0) {
        tp = PyDict_GetItemWithError(trace_headers, self->traceparent_key);
        if (tp == NULL && PyErr_Occurred())
            return NULL;
    }
    PyObject *o = get_var(self->http_var);
    if (o == NULL)
        return NULL;
    Record *h = IS_RECORD(o) ? (Record *)o : NULL, *c = NULL;
    if (h == NULL || h->t_end != 0) {
        /* no HTTP request around it, or one that ended */
        if ((c = new_record(self, self->api_kind)) == NULL
                || fill_call(self, c, request_id, t, params, tp) < 0
                || set_var(self->call_var, (PyObject *)c) < 0)
            goto fail;
        if (PyDict_GET_SIZE(self->await_dict) > self->await_limit) {
            PyObject *r = PyObject_CallNoArgs(self->prune);
            if (r == NULL)
                goto fail;
            Py_DECREF(r);
        }
    }
    else if (h->rid == NULL) {  /* the HTTP request's first call */
        if (fill_call(self, h, request_id, t, params, tp) < 0)
            goto fail;
    }
    else {
        if ((c = new_record(self, Py_None)) == NULL
                || fill_call(self, c, request_id, t, params,
                             tp != NULL && tp != Py_None ? tp : h->http_traceparent) < 0)
            goto fail;
        if (h->calls == NULL && (h->calls = PyList_New(0)) == NULL)
            goto fail;
        if (PyList_Append(h->calls, (PyObject *)c) < 0
                || set_var(self->call_var, (PyObject *)c) < 0)
            goto fail;
    }
    Py_DECREF(o);
    Py_XDECREF(c);
    Py_RETURN_NONE;
fail:
    Py_DECREF(o);
    Py_XDECREF(c);
    return NULL;
}

/* PyObject_IsTrue for a field that may be NULL (-1 with an error). */
static int
truthy(PyObject *o)
{
    return o == NULL || o == Py_None ? 0 : PyObject_IsTrue(o);
}

/* on_handoff(request): EngineCoreClient.add_request_async. */
static PyObject *
on_handoff(Hooks *self, PyObject *request)
{
    if (!Hooks_ready(self))
        return NULL;
    PyObject *o = get_var(self->http_var), *co = NULL, *rid = NULL, *th = NULL;
    if (o == NULL)
        return NULL;
    Record *h = IS_RECORD(o) ? (Record *)o : NULL;
    int open_record = h != NULL && h->t_end == 0;
    if (open_record && h->calls == NULL)
        co = Py_NewRef(o);
    else {
        if ((co = get_var(self->call_var)) == NULL)
            goto fail;
        if (co == Py_None && open_record)
            Py_SETREF(co, Py_NewRef(o));
    }
    Record *c = IS_RECORD(co) ? (Record *)co : NULL;
    if (c != NULL && c->rid != NULL && c->t_handoff == 0) {
        /* the first hand-off of the call (n > 1 makes several) */
        c->t_handoff = now_ns();
        if ((rid = get_field(self, F_REQUEST_ID, request, s_request_id)) == NULL)
            goto fail;
        Py_XSETREF(c->internal, Py_NewRef(rid));
        if (PyDict_SetItem(self->await_dict, rid, co) < 0)
            goto fail;
        PyObject *tp = c->traceparent;
        int has = truthy(tp);
        if (has == 0)
            has = truthy(tp = c->http_traceparent);
        if (has < 0)
            goto fail;
        if (has) {
            /* AsyncLLM drops trace headers unless vLLM's own tracing is on; the
             * EngineCore needs them so its spans join the caller's trace. */
            if ((th = get_field(self, F_TRACE_HEADERS, request, s_trace_headers)) == NULL)
                goto fail;
            int set = PyObject_IsTrue(th);
            Py_CLEAR(th);
            if (set < 0)
                goto fail;
            if (!set) {
                if ((th = PyDict_New()) == NULL
                        || PyDict_SetItem(th, self->traceparent_key, tp) < 0
                        || PyObject_SetAttr(request, s_trace_headers, th) < 0)
                    goto fail;
            }
        }
    }
    Py_DECREF(o);
    Py_DECREF(co);
    Py_XDECREF(rid);
    Py_XDECREF(th);
    Py_RETURN_NONE;
fail:
    Py_DECREF(o);
    Py_XDECREF(co);
    Py_XDECREF(rid);
    Py_XDECREF(th);
    return NULL;
}

/* One output of a step: the first of its call when it has tokens (or has finished). */
static int
note_output(Hooks *self, PyObject *o, int64_t t)
{
    PyObject *rid = get_field(self, F_OUT_REQUEST_ID, o, s_request_id);
    if (rid == NULL)
        return -1;
    int r = 0;
    PyObject *w = PyDict_GetItemWithError(self->await_dict, rid);  /* borrowed */
    if (w == NULL) {
        if (PyErr_Occurred())
            r = -1;
    }
    else if (IS_RECORD(w)) {
        Record *c = (Record *)Py_NewRef(w);
        PyObject *v = get_field(self, F_NEW_TOKEN_IDS, o, s_new_token_ids);
        int any = v == NULL ? -1 : PyObject_IsTrue(v), output = any;
        Py_XDECREF(v);
        if (any == 0) {  /* not an output yet unless finished */
            v = get_field(self, F_FINISH_REASON, o, s_finish_reason);
            output = v == NULL ? -1 : v != Py_None;
            Py_XDECREF(v);
        }
        if (any < 0 || output < 0)
            r = -1;
        else if (output) {
            if (PyDict_DelItem(self->await_dict, rid) < 0)
                r = -1;
            else {
                c->t_first_output = t;
                c->ok = any ? 1 : 0;
                /* no HTTP response around it to wait for (Dynamo, LLM): out now */
                if (c->t_recv == 0 && c->kind != Py_None)
                    r = emit(self, (PyObject *)c);
            }
        }
        Py_DECREF(c);
    }
    Py_DECREF(rid);
    return r;
}

/* on_outputs(engine_core_outputs): OutputProcessor.process_outputs, while calls wait for
 * their first output. vLLM passes a list: read in place (an iterator would be one more
 * object a step). */
static PyObject *
on_outputs(Hooks *self, PyObject *outputs)
{
    if (!Hooks_ready(self))
        return NULL;
    int64_t t = now_ns();
    if (PyList_CheckExact(outputs)) {
        for (Py_ssize_t i = 0; i < PyList_GET_SIZE(outputs); i++) {
            PyObject *o = Py_NewRef(PyList_GET_ITEM(outputs, i));
            int r = note_output(self, o, t);
            Py_DECREF(o);
            if (r < 0)
                return NULL;
        }
        Py_RETURN_NONE;
    }
    PyObject *it = PyObject_GetIter(outputs), *o;
    if (it == NULL)
        return NULL;
    while ((o = PyIter_Next(it)) != NULL) {
        int r = note_output(self, o, t);
        Py_DECREF(o);
        if (r < 0) {
            Py_DECREF(it);
            return NULL;
        }
    }
    Py_DECREF(it);
    if (PyErr_Occurred())
        return NULL;
    Py_RETURN_NONE;
}

/* -- Hooks --------------------------------------------------------------------------------- */
static int
Hooks_init(Hooks *self, PyObject *args, PyObject *kwds)
{
    PyObject *hv, *cv, *aw, *sp, *hm, *kind, *tpk, *attr, *pr, *fl, *kvf;
    Py_ssize_t limit;
    if (!PyArg_ParseTuple(args, "O!O!O!O!O!OUnUOOO!:Hooks", &PyContextVar_Type, &hv,
                          &PyContextVar_Type, &cv, &PyDict_Type, &aw, &PySet_Type, &sp,
                          &PyModule_Type, &hm, &kind, &tpk, &limit, &attr, &pr, &fl,
                          &PyTuple_Type, &kvf))
        return -1;
    if (PyTuple_GET_SIZE(kvf) > MAX_KV_FIELDS) {
        PyErr_Format(PyExc_ValueError, "at most %d kv_transfer_params fields", MAX_KV_FIELDS);
        return -1;
    }
    for (Py_ssize_t i = 0; i < MAX_KV_FIELDS; i++)
        Py_XSETREF(self->kv_fields[i], i < PyTuple_GET_SIZE(kvf)
                   ? Py_NewRef(PyTuple_GET_ITEM(kvf, i)) : NULL);
    self->n_kv_fields = PyTuple_GET_SIZE(kvf);
    Py_XSETREF(self->failed, Py_NewRef(fl));
    Py_XSETREF(self->http_var, Py_NewRef(hv));
    Py_XSETREF(self->call_var, Py_NewRef(cv));
    Py_XSETREF(self->await_dict, Py_NewRef(aw));
    Py_XSETREF(self->send_probes, Py_NewRef(sp));
    Py_XSETREF(self->hooks_module, Py_NewRef(hm));
    Py_XSETREF(self->hooks_dict, Py_NewRef(PyModule_GetDict(hm)));
    Py_XSETREF(self->api_kind, Py_NewRef(kind));
    Py_XSETREF(self->traceparent_key, Py_NewRef(tpk));
    Py_XSETREF(self->cycle_attr, Py_NewRef(attr));
    Py_XSETREF(self->prune, Py_NewRef(pr));
    self->await_limit = limit;
    return 0;
}

/* Hooks is in the collector's sight: through its module's namespace (prune, _EMIT, _AWAIT)
 * it is part of cycles, which a discarded module (the bench loads a second one) leaves. */
static int
Hooks_traverse(Hooks *self, visitproc visit, void *arg)
{
    Py_VISIT(self->http_var);
    Py_VISIT(self->call_var);
    Py_VISIT(self->await_dict);
    Py_VISIT(self->send_probes);
    Py_VISIT(self->hooks_module);
    Py_VISIT(self->hooks_dict);
    Py_VISIT(self->api_kind);
    Py_VISIT(self->traceparent_key);
    Py_VISIT(self->cycle_attr);
    Py_VISIT(self->prune);
    Py_VISIT(self->failed);
    for (int i = 0; i < MAX_KV_FIELDS; i++)
        Py_VISIT(self->kv_fields[i]);
    for (int i = 0; i < N_FIELDS; i++)
        Py_VISIT(self->fields[i].type);
    return 0;
}

static int
Hooks_clear(Hooks *self)
{
    Py_CLEAR(self->http_var);
    Py_CLEAR(self->call_var);
    Py_CLEAR(self->await_dict);
    Py_CLEAR(self->send_probes);
    Py_CLEAR(self->hooks_module);
    Py_CLEAR(self->hooks_dict);
    Py_CLEAR(self->api_kind);
    Py_CLEAR(self->traceparent_key);
    Py_CLEAR(self->cycle_attr);
    Py_CLEAR(self->prune);
    Py_CLEAR(self->failed);
    for (int i = 0; i < MAX_KV_FIELDS; i++)
        Py_CLEAR(self->kv_fields[i]);
    self->n_kv_fields = 0;
    for (int i = 0; i < N_FIELDS; i++)
        Py_CLEAR(self->fields[i].type);
    return 0;
}

static void
Hooks_dealloc(Hooks *self)
{
    PyObject_GC_UnTrack(self);
    Hooks_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyMethodDef Hooks_methods[] = {
    {"wrap_asgi", (PyCFunction)wrap_asgi, METH_O,
     "wrap_asgi(app): the app with a record around each POST."},
    {"on_add_request", (PyCFunction)(void (*)(void))on_add_request, METH_FASTCALL,
     "AsyncLLM.add_request's recording."},
    {"on_handoff", (PyCFunction)on_handoff, METH_O,
     "EngineCoreClient.add_request_async's recording."},
    {"on_outputs", (PyCFunction)on_outputs, METH_O,
     "OutputProcessor.process_outputs' recording."},
    {"on_send", (PyCFunction)(void (*)(void))on_send, METH_FASTCALL,
     "uvicorn RequestResponseCycle.send's recording."},
    {NULL, NULL, 0, NULL},
};

static PyMemberDef Hooks_members[] = {
    {"relays", T_PYSSIZET, offsetof(Hooks, relays), READONLY,
     "How many responses went through a relay (a server kvprof does not probe)."},
    {NULL},
};

static PyTypeObject HooksType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "kvprof.probes._fastrec.Hooks",
    .tp_doc = "Hooks(http_var, call_var, await_dict, send_probes, hooks_module, api_kind, "
              "traceparent_key, await_limit, cycle_attr, prune, failed, kv_fields): one "
              "api_hooks module's request-path recording.",
    .tp_basicsize = sizeof(Hooks),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_traverse = (traverseproc)Hooks_traverse,
    .tp_clear = (inquiry)Hooks_clear,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Hooks_init,
    .tp_dealloc = (destructor)Hooks_dealloc,
    .tp_methods = Hooks_methods,
    .tp_members = Hooks_members,
};

/* -- engine steps ------------------------------------------------------------------------- */
/* The EngineCore step record (hooks.scheduler_schedule / scheduler_update_from_output):
 * the very tuples the Python probes build, each in one call. Every step pays these, and in
 * Python their cost was mostly the calls themselves (time.time_ns(), the tuple, the emit):
 * bench/step_record_cost.py. Errors raise into the probe, which reports the hook failed. */
static PyObject *s_kv_cache_manager, *s_block_pool, *s_free_block_queue, *s_num_free_blocks,
    *s_num_gpu_blocks, *s_get_request_counts, *s_kv_connector_output, *minus_one;

/* step_begin(starts, scheduler, output, t): starts[id(output)] = (t, now, running, waiting,
 * KV blocks free, KV blocks total), the counts from the scheduler's get_request_counts();
 * (t, now, -1, -1, -1, -1) for a scheduler without these, as the Python probe's
 * `except Exception`. */
static PyObject *
step_begin(PyObject *mod, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 4 || !PyDict_Check(args[0])) {
        PyErr_SetString(PyExc_TypeError, "step_begin(starts: dict, scheduler, output, t)");
        return NULL;
    }
    PyObject *starts = args[0], *sched = args[1], *out = args[2], *t = args[3];
    PyObject *t1 = PyLong_FromLongLong(now_ns());
    if (t1 == NULL)
        return NULL;
    PyObject *counts = NULL, *free_blocks = NULL, *total = NULL, *pool = NULL, *tmp, *info;
    tmp = PyObject_GetAttr(sched, s_kv_cache_manager);
    if (tmp != NULL) {
        pool = PyObject_GetAttr(tmp, s_block_pool);
        Py_DECREF(tmp);
    }
    if (pool != NULL) {
        counts = PyObject_CallMethodNoArgs(sched, s_get_request_counts);
        if (counts != NULL && !(PyTuple_CheckExact(counts) && PyTuple_GET_SIZE(counts) == 2)) {
            /* `running, waiting = ...` unpacks any pair */
            tmp = PySequence_Tuple(counts);
            Py_SETREF(counts, tmp);
            if (counts != NULL && PyTuple_GET_SIZE(counts) != 2) {
                PyErr_SetString(PyExc_ValueError, "get_request_counts(): not a pair");
                Py_CLEAR(counts);
            }
        }
        if (counts != NULL) {
            tmp = PyObject_GetAttr(pool, s_free_block_queue);
            if (tmp != NULL) {
                free_blocks = PyObject_GetAttr(tmp, s_num_free_blocks);
                Py_DECREF(tmp);
            }
            if (free_blocks != NULL)
                total = PyObject_GetAttr(pool, s_num_gpu_blocks);
        }
        Py_DECREF(pool);
    }
    if (total == NULL) {
        Py_XDECREF(counts);
        Py_XDECREF(free_blocks);
        if (!PyErr_ExceptionMatches(PyExc_Exception)) {
            Py_DECREF(t1);
            return NULL;
        }
        PyErr_Clear();
        info = PyTuple_Pack(6, t, t1, minus_one, minus_one, minus_one, minus_one);
        Py_DECREF(t1);
    }
    else {
        /* Flat, as in Python: a tuple of ints, which the garbage collector stops tracking
         * at its first pass (the counts pair nested inside would keep it tracked longer). */
        info = PyTuple_New(6);
        if (info == NULL) {
            Py_DECREF(t1);
            Py_DECREF(counts);
            Py_DECREF(free_blocks);
            Py_DECREF(total);
            return NULL;
        }
        PyTuple_SET_ITEM(info, 0, Py_NewRef(t));
        PyTuple_SET_ITEM(info, 1, t1);
        PyTuple_SET_ITEM(info, 2, Py_NewRef(PyTuple_GET_ITEM(counts, 0)));
        PyTuple_SET_ITEM(info, 3, Py_NewRef(PyTuple_GET_ITEM(counts, 1)));
        PyTuple_SET_ITEM(info, 4, free_blocks);
        PyTuple_SET_ITEM(info, 5, total);
        Py_DECREF(counts);
    }
    if (info == NULL)
        return NULL;
    PyObject *key = PyLong_FromVoidPtr(out);  /* id(output) */
    if (key == NULL) {
        Py_DECREF(info);
        return NULL;
    }
    int rc = PyDict_SetItem(starts, key, info);
    Py_DECREF(key);
    Py_DECREF(info);
    if (rc < 0)
        return NULL;
    if (PyDict_GET_SIZE(starts) > 64) {  /* outputs never passed back (shutdown) */
        Py_ssize_t pos = 0;
        PyObject *k, *v;
        if (PyDict_Next(starts, &pos, &k, &v)) {
            Py_INCREF(k);
            rc = PyDict_DelItem(starts, k);
            Py_DECREF(k);
            if (rc < 0)
                return NULL;
        }
    }
    Py_RETURN_NONE;
}

/* step_end(emit, kind, info, t, scheduler_output, model_runner_output):
 * emit((kind, info, t, now, scheduler_output, model_runner_output.kv_connector_output or
 * None when it has no such attribute)). */
static PyObject *
step_end(PyObject *mod, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 6) {
        PyErr_SetString(PyExc_TypeError, "step_end(emit, kind, info, t, so, mro)");
        return NULL;
    }
    PyObject *kvo = PyObject_GetAttr(args[5], s_kv_connector_output);
    if (kvo == NULL) {
        if (!PyErr_ExceptionMatches(PyExc_AttributeError))
            return NULL;
        PyErr_Clear();
        kvo = Py_NewRef(Py_None);
    }
    PyObject *t2 = PyLong_FromLongLong(now_ns());
    PyObject *event = t2 == NULL ? NULL : PyTuple_New(6);
    if (event == NULL) {
        Py_XDECREF(t2);
        Py_DECREF(kvo);
        return NULL;
    }
    PyTuple_SET_ITEM(event, 0, Py_NewRef(args[1]));
    PyTuple_SET_ITEM(event, 1, Py_NewRef(args[2]));
    PyTuple_SET_ITEM(event, 2, Py_NewRef(args[3]));
    PyTuple_SET_ITEM(event, 3, t2);
    PyTuple_SET_ITEM(event, 4, Py_NewRef(args[4]));
    PyTuple_SET_ITEM(event, 5, kvo);
    PyObject *r = PyObject_CallOneArg(args[0], event);
    Py_DECREF(event);
    if (r == NULL)
        return NULL;
    Py_DECREF(r);
    Py_RETURN_NONE;
}

static PyMethodDef module_methods[] = {
    {"step_begin", (PyCFunction)(void (*)(void))step_begin, METH_FASTCALL,
     "step_begin(starts, scheduler, output, t): note a step's schedule() (hooks.py)."},
    {"step_end", (PyCFunction)(void (*)(void))step_end, METH_FASTCALL,
     "step_end(emit, kind, info, t, so, mro): emit a step's record (hooks.py)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_fastrec",
    "The API-server hooks' request-path work in C (see api_hooks.py), and the engine "
    "step record (hooks.py).", -1, module_methods,
};

PyMODINIT_FUNC
PyInit__fastrec(void)
{
#define INTERN(var, text) if ((var = PyUnicode_InternFromString(text)) == NULL) return NULL
    INTERN(s_emit, "_EMIT");
    INTERN(s_method, "method");
    INTERN(s_post, "POST");
    INTERN(s_headers, "headers");
    INTERN(s_path, "path");
    INTERN(s_empty, "");
    INTERN(s_status, "status");
    INTERN(s_body, "body");
    INTERN(s_more_body, "more_body");
    INTERN(s_type, "type");
    INTERN(s_response_body, "http.response.body");
    INTERN(s_response_pathsend, "http.response.pathsend");
    INTERN(s_on_response, "on_response");
    INTERN(s_extra_args, "extra_args");
    INTERN(s_kv_transfer_params, "kv_transfer_params");
    INTERN(s_request_id, "request_id");
    INTERN(s_trace_headers, "trace_headers");
    INTERN(s_new_token_ids, "new_token_ids");
    INTERN(s_finish_reason, "finish_reason");
    INTERN(s_kv_cache_manager, "kv_cache_manager");
    INTERN(s_block_pool, "block_pool");
    INTERN(s_free_block_queue, "free_block_queue");
    INTERN(s_num_free_blocks, "num_free_blocks");
    INTERN(s_num_gpu_blocks, "num_gpu_blocks");
    INTERN(s_get_request_counts, "get_request_counts");
    INTERN(s_kv_connector_output, "kv_connector_output");
#undef INTERN
    if ((minus_one = PyLong_FromLong(-1)) == NULL)
        return NULL;
    if (PyType_Ready(&HooksType) < 0 || PyType_Ready(&RecordType) < 0
            || PyType_Ready(&EndingType) < 0
            || PyType_Ready(&AsgiType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    if (PyModule_AddObjectRef(m, "Hooks", (PyObject *)&HooksType) < 0
            || PyModule_AddObjectRef(m, "Record", (PyObject *)&RecordType) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
