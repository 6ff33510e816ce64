#include <pthread.h>
#include <stdlib.h>
#include "qk.h"

typedef struct { qk_rows_fn fn; void *ctx; int64_t begin, end; pthread_t id; int started; } qk_task;

static void *run_task(void *p) {
    qk_task *t = (qk_task *)p;
    if (t->begin < t->end) t->fn(t->ctx, t->begin, t->end);
    return NULL;
}

/* Contiguous row ranges, one per thread; the calling thread takes the first. A thread that
 * cannot be started has its range run inline, so the result never depends on threads. */
int qk_parallel_rows(qk_rows_fn fn, void *ctx, int64_t nrows, int nthreads) {
    if (nthreads < 1) nthreads = 1;
    if (nthreads > nrows) nthreads = nrows > 0 ? (int)nrows : 1;
    qk_task *tasks = nthreads > 1 ? calloc((size_t)nthreads, sizeof *tasks) : NULL;
    if (!tasks) { fn(ctx, 0, nrows); return 0; }
    const int64_t per = nrows / nthreads, extra = nrows % nthreads;
    int64_t at = 0;
    for (int i = 0; i < nthreads; i++) {
        const int64_t len = per + (i < extra ? 1 : 0);
        tasks[i].fn = fn; tasks[i].ctx = ctx; tasks[i].begin = at; tasks[i].end = at + len;
        at += len;
        if (i > 0) tasks[i].started = pthread_create(&tasks[i].id, NULL, run_task, &tasks[i]) == 0;
    }
    run_task(&tasks[0]);
    for (int i = 1; i < nthreads; i++) {
        if (tasks[i].started) pthread_join(tasks[i].id, NULL);
        else run_task(&tasks[i]);
    }
    free(tasks);
    return 0;
}
