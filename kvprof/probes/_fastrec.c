/* The API-server hooks' request-path work in C (kvprof.probes.api_hooks holds the same in
 * Python, used where this module is not built).
 *
 * Why C: these run on the frontend's event loop for every request, and measured there
 * (bench/api_overhead.py) their cost is the Python bytecode they run cold, 15-20 ns an
 * instruction on a 2-core VM: a hook that is one call here runs a handful instead of
 * 40-150. What they do is what the Python versions do, field for field (the record's
 * layout is documented in api_hooks.py; tests run both, and count what C keeps alive).
 *
 * Errors raise into the caller, whose Python try/except reports the hook failed (where no
 * caller can take one, report_failure does): nothing here may raise into vLLM.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <string.h>
#include <time.h>

/* Record positions (api_hooks.py). */
enum {
    T_RECV = 1, T_FIRST_BYTES, T_END, STATUS, XID, HTTP_TRACEPARENT, PATH,
    RID, T_INPUT, EXTRA_ARGS, TRACEPARENT, T_HANDOFF, INTERNAL, T_FIRST_OUTPUT, OK,
    RECORD_LEN
};

/* A Hooks object holds the state of one api_hooks module (the bench loads two). */
typedef struct {
    PyObject_HEAD
    PyObject *http_var, *call_var, *await_dict, *send_probes, *hooks_module, *api_kind,
        *traceparent_key, *cycle_attr, *prune, *failed;
    Py_ssize_t await_limit;
} Hooks;

static PyTypeObject EndedType;
static int end_with_cycle(Hooks *self, PyObject *cycle, PyObject *h);

static PyObject *s_emit, *s_method, *s_post, *s_headers, *s_path, *s_empty, *s_status,
    *s_body, *s_on_response, *s_extra_args, *s_request_id, *s_trace_headers,
    *s_new_token_ids, *s_finish_reason;

static int
Hooks_ready(Hooks *self)
{
    if (self->http_var == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "Hooks not initialised");
        return 0;
    }
    return 1;
}

static PyObject *
now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);  /* time.time_ns() */
    return PyLong_FromLongLong((long long)ts.tv_sec * 1000000000LL + ts.tv_nsec);
}

static int
emit(Hooks *self, PyObject *event)
{
    /* looked up each time: set_emit may change it */
    PyObject *target = PyObject_GetAttr(self->hooks_module, s_emit);
    if (target == NULL)
        return -1;
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

/* A record list: [kind, None x 15] with OK = True. */
static PyObject *
new_record(PyObject *kind)
{
    PyObject *h = PyList_New(RECORD_LEN);
    if (h == NULL)
        return NULL;
    for (Py_ssize_t i = 0; i < RECORD_LEN; i++) {
        Py_INCREF(Py_None);
        PyList_SET_ITEM(h, i, Py_None);
    }
    Py_INCREF(kind);
    Py_SETREF(((PyListObject *)h)->ob_item[0], kind);
    Py_INCREF(Py_True);
    Py_SETREF(((PyListObject *)h)->ob_item[OK], Py_True);
    /* Out of the garbage collector's sight: a record lives until the export thread has
     * read it (up to a flush interval) and holds no reference back to anything holding
     * it, so reference counting frees it; tracked, every collection meanwhile would walk
     * it. */
    PyObject_GC_UnTrack(h);
    return h;
}

/* h[i] = value (new reference stolen; h a list of RECORD_LEN or more). */
static void
put(PyObject *h, Py_ssize_t i, PyObject *value)
{
    Py_SETREF(((PyListObject *)h)->ob_item[i], value);
}

static void
put_ref(PyObject *h, Py_ssize_t i, PyObject *value)
{
    Py_INCREF(value);
    put(h, i, value);
}

static int
is_record(PyObject *h)
{
    return PyList_CheckExact(h) && PyList_GET_SIZE(h) >= RECORD_LEN;
}

#define ITEM(h, i) PyList_GET_ITEM((h), (i))

static int
name_is(PyObject *k, const char *name, Py_ssize_t len)
{
    return PyBytes_Check(k) && PyBytes_GET_SIZE(k) == len
        && memcmp(PyBytes_AS_STRING(k), name, (size_t)len) == 0;
}

/* intake(scope, send): the HTTP request's record (emitted, in the task's context). None
 * for anything but a POST, and for a POST to uvicorn's request cycle (probed), which then
 * notes the response and ends the record itself; else (record, registered): whether the
 * server's send notes the response (the caller ends the record when the app returns). */
static PyObject *
intake(Hooks *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (!Hooks_ready(self))
        return NULL;
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "intake(scope, send)");
        return NULL;
    }
    PyObject *scope = args[0], *send = args[1];
    if (!PyDict_Check(scope))
        Py_RETURN_NONE;
    PyObject *method = PyDict_GetItemWithError(scope, s_method);  /* borrowed */
    if (method == NULL) {
        if (PyErr_Occurred())
            return NULL;
        Py_RETURN_NONE;  /* websocket, lifespan */
    }
    int post = PyUnicode_Check(method) && PyUnicode_Compare(method, s_post) == 0;
    if (!post) {
        if (PyErr_Occurred())
            return NULL;
        Py_RETURN_NONE;
    }
    PyObject *t = now_ns();
    if (t == NULL)
        return NULL;
    PyObject *h = new_record(self->api_kind);
    if (h == NULL) {
        Py_DECREF(t);
        return NULL;
    }
    put(h, T_RECV, t);

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
        put_ref(h, XID, xid);
    if (tp != NULL && PyBytes_Check(tp)) {
        PyObject *s = PyUnicode_DecodeLatin1(PyBytes_AS_STRING(tp), PyBytes_GET_SIZE(tp),
                                             NULL);
        if (s == NULL)
            goto fail;
        put(h, HTTP_TRACEPARENT, s);
    }
    PyObject *path = PyDict_GetItemWithError(scope, s_path);
    if (path == NULL && PyErr_Occurred())
        goto fail;
    put_ref(h, PATH, path != NULL ? path : s_empty);

    int registered = 0, ends_itself = 0;
    if (PyMethod_Check(send)) {
        int probed = PySet_Contains(self->send_probes, PyMethod_GET_FUNCTION(send));
        if (probed < 0)
            goto fail;
        if (probed) {
            PyObject *cycle = PyMethod_GET_SELF(send);
            if (PyObject_SetAttr(cycle, self->cycle_attr, h) < 0)
                goto fail;
            registered = 1;
            if ((ends_itself = end_with_cycle(self, cycle, h)) < 0)
                goto fail;
        }
    }
    /* Set and not reset: the server runs each request in a task of its own. */
    if (set_var(self->http_var, h) < 0 || emit(self, h) < 0)
        goto fail;
    if (ends_itself) {
        Py_DECREF(h);
        Py_RETURN_NONE;
    }
    PyObject *out = PyTuple_New(2);
    if (out == NULL)
        goto fail;
    PyTuple_SET_ITEM(out, 0, h);
    PyObject *flag = registered ? Py_True : Py_False;
    Py_INCREF(flag);
    PyTuple_SET_ITEM(out, 1, flag);
    return out;
fail:
    Py_DECREF(h);
    return NULL;
}

/* A call list of its own: kind (API, or None for a further call of an HTTP request). */
static PyObject *
new_call(PyObject *kind, PyObject *request_id, PyObject *t, PyObject *extra, PyObject *tp)
{
    PyObject *c = new_record(kind);
    if (c == NULL)
        return NULL;
    put_ref(c, RID, request_id);
    put_ref(c, T_INPUT, t);
    put_ref(c, EXTRA_ARGS, extra);
    put_ref(c, TRACEPARENT, tp);
    return c;
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
    PyObject *t = now_ns(), *extra = NULL, *h = NULL, *c = NULL;
    if (t == NULL)
        return NULL;
    extra = PyObject_GetAttr(params, s_extra_args);  /* PoolingParams have none */
    if (extra == NULL) {
        if (!PyErr_ExceptionMatches(PyExc_AttributeError))
            goto fail;
        PyErr_Clear();
        extra = Py_NewRef(Py_None);
    }
    PyObject *tp = Py_None;  /* borrowed */
    if (trace_headers != Py_None && PyDict_Check(trace_headers)
            && PyDict_GET_SIZE(trace_headers) > 0) {
        PyObject *v = PyDict_GetItemWithError(trace_headers, self->traceparent_key);
        if (v == NULL && PyErr_Occurred())
            goto fail;
        if (v != NULL)
            tp = v;
    }
    h = get_var(self->http_var);
    if (h == NULL)
        goto fail;
    if (!is_record(h) || ITEM(h, T_END) != Py_None) {
        /* no HTTP request around it, or one that ended */
        c = new_call(self->api_kind, request_id, t, extra, tp);
        if (c == NULL || set_var(self->call_var, c) < 0)
            goto fail;
        if (PyDict_GET_SIZE(self->await_dict) > self->await_limit) {
            PyObject *r = PyObject_CallNoArgs(self->prune);
            if (r == NULL)
                goto fail;
            Py_DECREF(r);
        }
    }
    else if (ITEM(h, RID) == Py_None) {  /* the HTTP request's first call */
        put_ref(h, RID, request_id);
        put_ref(h, T_INPUT, t);
        put_ref(h, EXTRA_ARGS, extra);
        if (tp != Py_None)
            put_ref(h, TRACEPARENT, tp);
    }
    else {
        c = new_call(Py_None, request_id, t, extra,
                     tp == Py_None ? ITEM(h, HTTP_TRACEPARENT) : tp);
        if (c == NULL || PyList_Append(h, c) < 0 || set_var(self->call_var, c) < 0)
            goto fail;
    }
    Py_DECREF(t);
    Py_DECREF(extra);
    Py_DECREF(h);
    Py_XDECREF(c);
    Py_RETURN_NONE;
fail:
    Py_DECREF(t);
    Py_XDECREF(extra);
    Py_XDECREF(h);
    Py_XDECREF(c);
    return NULL;
}

/* on_handoff(request): EngineCoreClient.add_request_async. */
static PyObject *
on_handoff(Hooks *self, PyObject *request)
{
    if (!Hooks_ready(self))
        return NULL;
    PyObject *h = get_var(self->http_var), *c = NULL, *rid = NULL, *t = NULL, *th = NULL;
    if (h == NULL)
        return NULL;
    int open_record = is_record(h) && ITEM(h, T_END) == Py_None;
    if (open_record && PyList_GET_SIZE(h) == RECORD_LEN)
        c = Py_NewRef(h);
    else {
        c = get_var(self->call_var);
        if (c == NULL)
            goto fail;
        if (c == Py_None && open_record)
            Py_SETREF(c, Py_NewRef(h));
    }
    if (is_record(c) && ITEM(c, RID) != Py_None && ITEM(c, T_HANDOFF) == Py_None) {
        /* the first hand-off of the call (n > 1 makes several) */
        if ((t = now_ns()) == NULL)
            goto fail;
        put(c, T_HANDOFF, t);
        t = NULL;
        if ((rid = PyObject_GetAttr(request, s_request_id)) == NULL)
            goto fail;
        put_ref(c, INTERNAL, rid);
        if (PyDict_SetItem(self->await_dict, rid, c) < 0)
            goto fail;
        PyObject *tp = ITEM(c, TRACEPARENT);
        int has = PyObject_IsTrue(tp);
        if (has < 0)
            goto fail;
        if (!has) {
            tp = ITEM(c, HTTP_TRACEPARENT);
            if ((has = PyObject_IsTrue(tp)) < 0)
                goto fail;
        }
        if (has) {
            /* AsyncLLM drops trace headers unless vLLM's own tracing is on; the
             * EngineCore needs them so its spans join the caller's trace. */
            if ((th = PyObject_GetAttr(request, s_trace_headers)) == NULL)
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
    Py_DECREF(h);
    Py_DECREF(c);
    Py_XDECREF(rid);
    Py_XDECREF(th);
    Py_RETURN_NONE;
fail:
    Py_DECREF(h);
    Py_XDECREF(c);
    Py_XDECREF(rid);
    Py_XDECREF(th);
    return NULL;
}

/* on_outputs(engine_core_outputs): OutputProcessor.process_outputs, while calls wait for
 * their first output. */
static PyObject *
on_outputs(Hooks *self, PyObject *outputs)
{
    if (!Hooks_ready(self))
        return NULL;
    PyObject *t = now_ns(), *it = NULL, *o = NULL, *rid = NULL, *tokens = NULL,
        *finish = NULL;
    if (t == NULL)
        return NULL;
    if ((it = PyObject_GetIter(outputs)) == NULL)
        goto fail;
    while ((o = PyIter_Next(it)) != NULL) {
        if ((rid = PyObject_GetAttr(o, s_request_id)) == NULL)
            goto fail;
        PyObject *c = PyDict_GetItemWithError(self->await_dict, rid);  /* borrowed */
        if (c == NULL) {
            if (PyErr_Occurred())
                goto fail;
        }
        else if (is_record(c)) {
            if ((tokens = PyObject_GetAttr(o, s_new_token_ids)) == NULL)
                goto fail;
            int any = PyObject_IsTrue(tokens);
            Py_CLEAR(tokens);
            if (any < 0)
                goto fail;
            int output = any;
            if (!any) {  /* not an output yet unless finished */
                if ((finish = PyObject_GetAttr(o, s_finish_reason)) == NULL)
                    goto fail;
                output = finish != Py_None;
                Py_CLEAR(finish);
            }
            if (output) {
                Py_INCREF(c);
                if (PyDict_DelItem(self->await_dict, rid) < 0) {
                    Py_DECREF(c);
                    goto fail;
                }
                put_ref(c, T_FIRST_OUTPUT, t);
                put_ref(c, OK, any ? Py_True : Py_False);
                if (ITEM(c, T_RECV) == Py_None && ITEM(c, 0) != Py_None) {
                    /* no HTTP response around it to wait for (Dynamo, LLM): out now */
                    if (emit(self, c) < 0) {
                        Py_DECREF(c);
                        goto fail;
                    }
                }
                Py_DECREF(c);
            }
        }
        Py_CLEAR(rid);
        Py_CLEAR(o);
    }
    if (PyErr_Occurred())
        goto fail;
    Py_DECREF(it);
    Py_DECREF(t);
    Py_RETURN_NONE;
fail:
    Py_DECREF(t);
    Py_XDECREF(it);
    Py_XDECREF(o);
    Py_XDECREF(rid);
    Py_XDECREF(tokens);
    Py_XDECREF(finish);
    return NULL;
}

/* on_send(cycle, message): uvicorn's RequestResponseCycle.send, while the cycle holds a
 * record: the status from the first message, the time of the first body bytes (then the
 * cycle lets the record go: the rest of the stream costs one attribute test a message). */
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
    PyObject *h = PyObject_GetAttr(cycle, self->cycle_attr);
    if (h == NULL)
        return NULL;
    if (!is_record(h) || !PyDict_Check(message)) {
        Py_DECREF(h);
        Py_RETURN_NONE;
    }
    if (ITEM(h, STATUS) == Py_None) {
        PyObject *status = PyDict_GetItemWithError(message, s_status);
        if (status == NULL && PyErr_Occurred())
            goto fail;
        put_ref(h, STATUS, status != NULL ? status : Py_None);
    }
    else {
        PyObject *body = PyDict_GetItemWithError(message, s_body);
        if (body == NULL && PyErr_Occurred())
            goto fail;
        int any = body != NULL ? PyObject_IsTrue(body) : 0;
        if (any < 0)
            goto fail;
        if (any) {
            PyObject *t = now_ns();
            if (t == NULL)
                goto fail;
            put(h, T_FIRST_BYTES, t);
            if (PyObject_SetAttr(cycle, self->cycle_attr, Py_None) < 0)
                goto fail;
        }
    }
    Py_DECREF(h);
    Py_RETURN_NONE;
fail:
    Py_DECREF(h);
    return NULL;
}

/* A call of an ended response whose first output never came stops waiting for it. */
static int
stop_waiting(Hooks *self, PyObject *c)
{
    if (!is_record(c) || ITEM(c, RID) == Py_None || ITEM(c, T_FIRST_OUTPUT) != Py_None
            || ITEM(c, INTERNAL) == Py_None)
        return 0;
    PyObject *internal = ITEM(c, INTERNAL);
    PyObject *waiting = PyDict_GetItemWithError(self->await_dict, internal);
    if (waiting == NULL)
        return PyErr_Occurred() ? -1 : 0;
    return PyDict_DelItem(self->await_dict, internal);
}

/* The response has ended: its calls stop waiting; then, last, the end time (the record is
 * complete once the export thread sees it). */
static int
end_record(Hooks *self, PyObject *h)
{
    if (!is_record(h))
        return 0;
    PyObject *t = now_ns();
    if (t == NULL)
        return -1;
    if (PyDict_GET_SIZE(self->await_dict) > 0) {
        if (stop_waiting(self, h) < 0)
            goto fail;
        for (Py_ssize_t i = RECORD_LEN; i < PyList_GET_SIZE(h); i++)
            if (stop_waiting(self, PyList_GET_ITEM(h, i)) < 0)
                goto fail;
    }
    put(h, T_END, t);
    return 0;
fail:
    Py_DECREF(t);
    return -1;
}

/* end(record): the app has returned. */
static PyObject *
end(Hooks *self, PyObject *h)
{
    if (!Hooks_ready(self) || end_record(self, h) < 0)
        return NULL;
    Py_RETURN_NONE;
}

/* A recording failed where nothing may raise: hooks._hook_failed(name) (reported once). */
static void
report_failure(Hooks *self, const char *name)
{
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    Py_XDECREF(type);
    Py_XDECREF(value);
    Py_XDECREF(tb);
    if (self->failed != NULL) {
        PyObject *r = PyObject_CallFunction(self->failed, "s", name);
        Py_XDECREF(r);
        PyErr_Clear();
    }
}

/* Ended: what uvicorn's request cycle calls when the response is complete (its
 * on_response, wrapped: the record ends, then uvicorn's own runs). The cycle lets go of
 * it when run_asgi returns (it sets on_response to a no-op), also when the response
 * never completed (client gone, error): the record ends then, when the app has returned.
 * So the app runs with no coroutine of ours around it. */
typedef struct {
    PyObject_HEAD
    Hooks *hooks;
    PyObject *record, *on_response;
    int ended;
} Ended;

static void
Ended_end(Ended *self, const char *where)
{
    if (self->ended || self->hooks == NULL || self->record == NULL)
        return;
    self->ended = 1;
    if (end_record(self->hooks, self->record) < 0)
        report_failure(self->hooks, where);
}

static PyObject *
Ended_call(Ended *self, PyObject *args, PyObject *kwargs)
{
    Ended_end(self, "uvicorn on_response");
    if (self->on_response == NULL)
        Py_RETURN_NONE;
    return PyObject_Call(self->on_response, args, kwargs);
}

static int
Ended_traverse(Ended *self, visitproc visit, void *arg)
{
    Py_VISIT(self->hooks);
    Py_VISIT(self->on_response);
    return 0;
}

static int
Ended_clear(Ended *self)
{
    Py_CLEAR(self->on_response);
    return 0;
}

static void
Ended_dealloc(Ended *self)
{
    PyObject_GC_UnTrack(self);
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    Ended_end(self, "uvicorn run_asgi end");
    PyErr_Restore(type, value, tb);
    Py_CLEAR(self->on_response);
    Py_CLEAR(self->record);
    Py_CLEAR(self->hooks);
    PyObject_GC_Del(self);
}

static PyTypeObject EndedType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "kvprof.probes._fastrec.Ended",
    .tp_doc = "uvicorn's on_response, ending a kvprof record first.",
    .tp_basicsize = sizeof(Ended),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_call = (ternaryfunc)Ended_call,
    .tp_traverse = (traverseproc)Ended_traverse,
    .tp_clear = (inquiry)Ended_clear,
    .tp_dealloc = (destructor)Ended_dealloc,
};

/* uvicorn's cycle calls on_response when the response is complete: wrapped in an Ended
 * the record ends with no coroutine of ours; 1 when done, 0 where the cycle has none. */
static int
end_with_cycle(Hooks *self, PyObject *cycle, PyObject *h)
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
    Ended *ended = PyObject_GC_New(Ended, &EndedType);
    if (ended == NULL) {
        Py_DECREF(on_response);
        return -1;
    }
    Py_INCREF(self);
    ended->hooks = self;
    Py_INCREF(h);
    ended->record = h;
    ended->on_response = on_response;
    ended->ended = 0;
    PyObject_GC_Track(ended);
    int r = PyObject_SetAttr(cycle, s_on_response, (PyObject *)ended);
    if (r < 0)
        ended->ended = 1;  /* not installed: the caller's coroutine ends the record */
    Py_DECREF(ended);
    return r < 0 ? -1 : 1;
}

static int
Hooks_init(Hooks *self, PyObject *args, PyObject *kwds)
{
    PyObject *hv, *cv, *aw, *sp, *hm, *kind, *tpk, *attr, *pr, *fl;
    Py_ssize_t limit;
    if (!PyArg_ParseTuple(args, "O!O!O!O!OOUnUOO:Hooks", &PyContextVar_Type, &hv,
                          &PyContextVar_Type, &cv, &PyDict_Type, &aw, &PySet_Type, &sp, &hm,
                          &kind, &tpk, &limit, &attr, &pr, &fl))
        return -1;
    Py_XSETREF(self->failed, Py_NewRef(fl));
    Py_XSETREF(self->http_var, Py_NewRef(hv));
    Py_XSETREF(self->call_var, Py_NewRef(cv));
    Py_XSETREF(self->await_dict, Py_NewRef(aw));
    Py_XSETREF(self->send_probes, Py_NewRef(sp));
    Py_XSETREF(self->hooks_module, Py_NewRef(hm));
    Py_XSETREF(self->api_kind, Py_NewRef(kind));
    Py_XSETREF(self->traceparent_key, Py_NewRef(tpk));
    Py_XSETREF(self->cycle_attr, Py_NewRef(attr));
    Py_XSETREF(self->prune, Py_NewRef(pr));
    self->await_limit = limit;
    return 0;
}

static void
Hooks_dealloc(Hooks *self)
{
    Py_XDECREF(self->http_var);
    Py_XDECREF(self->call_var);
    Py_XDECREF(self->await_dict);
    Py_XDECREF(self->send_probes);
    Py_XDECREF(self->hooks_module);
    Py_XDECREF(self->api_kind);
    Py_XDECREF(self->traceparent_key);
    Py_XDECREF(self->cycle_attr);
    Py_XDECREF(self->prune);
    Py_XDECREF(self->failed);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyMethodDef Hooks_methods[] = {
    {"intake", (PyCFunction)(void (*)(void))intake, METH_FASTCALL,
     "intake(scope, send) -> None, or (record, registered)."},
    {"on_add_request", (PyCFunction)(void (*)(void))on_add_request, METH_FASTCALL,
     "AsyncLLM.add_request's recording."},
    {"on_handoff", (PyCFunction)on_handoff, METH_O,
     "EngineCoreClient.add_request_async's recording."},
    {"on_outputs", (PyCFunction)on_outputs, METH_O,
     "OutputProcessor.process_outputs' recording."},
    {"on_send", (PyCFunction)(void (*)(void))on_send, METH_FASTCALL,
     "uvicorn RequestResponseCycle.send's recording."},
    {"end", (PyCFunction)end, METH_O, "The response has ended: end(record)."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject HooksType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "kvprof.probes._fastrec.Hooks",
    .tp_doc = "Hooks(http_var, call_var, await_dict, send_probes, hooks_module, api_kind, "
              "traceparent_key, await_limit, cycle_attr, prune, failed): one api_hooks module's "
              "request-path recording.",
    .tp_basicsize = sizeof(Hooks),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Hooks_init,
    .tp_dealloc = (destructor)Hooks_dealloc,
    .tp_methods = Hooks_methods,
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_fastrec",
    "The API-server hooks' request-path work in C (see api_hooks.py).", -1, NULL,
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
    INTERN(s_on_response, "on_response");
    INTERN(s_extra_args, "extra_args");
    INTERN(s_request_id, "request_id");
    INTERN(s_trace_headers, "trace_headers");
    INTERN(s_new_token_ids, "new_token_ids");
    INTERN(s_finish_reason, "finish_reason");
#undef INTERN
    if (PyType_Ready(&HooksType) < 0 || PyType_Ready(&EndedType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    Py_INCREF(&HooksType);
    if (PyModule_AddObject(m, "Hooks", (PyObject *)&HooksType) < 0) {
        Py_DECREF(&HooksType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
