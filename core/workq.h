/*
 * A fixed pool of worker threads behind a bounded job queue, for work that
 * must not run on the event loop (DKIM signatures, password hashes). No
 * Lua here, and nothing about the jobs themselves: the owner embeds an
 * mp_workq_item as the first member of its job and says how to run and
 * how to drop one.
 *
 * Jobs are queued under a mutex, a worker runs one and puts it on the
 * finished list, where it waits until the loop thread collects it; an
 * eventfd is readable whenever finished jobs wait, so the loop polls it
 * like any other fd. Nothing runs a callback on the loop thread.
 */
#ifndef MOONPOST_WORKQ_H
#define MOONPOST_WORKQ_H

#include <stddef.h>
#include <stdint.h>

typedef struct mp_workq_item {
    struct mp_workq_item *next;  /* the queue's; a collected list is linked through it */
    uint64_t id;                 /* set by mp_workq_submit(), from 1 */
} mp_workq_item;

typedef void (*mp_workq_fn)(mp_workq_item *job);

typedef struct mp_workq mp_workq;

/* threads workers and room for max_queue jobs submitted and not collected.
 * run is called on a worker thread; drop frees a job that mp_workq_free()
 * finds queued or uncollected. NULL with *err an errno value. */
mp_workq *mp_workq_new(int threads, size_t max_queue, mp_workq_fn run, mp_workq_fn drop, int *err);

/* Queue job (the queue owns it from here): 0 with *id set, or -EBUSY when
 * max_queue jobs are out, and then the caller still owns it. */
int mp_workq_submit(mp_workq *q, mp_workq_item *job, uint64_t *id);

/* Up to max finished jobs, oldest first, as a list through next (the
 * caller owns them). Drains the eventfd first, so a job that finishes
 * meanwhile, or one left behind by max, leaves it readable. */
mp_workq_item *mp_workq_collect(mp_workq *q, size_t max);

int mp_workq_fd(const mp_workq *q);      /* readable while finished jobs wait */
size_t mp_workq_pending(mp_workq *q);    /* submitted, not yet collected */

/* Stop and join the threads (a running job finishes first); queued and
 * uncollected jobs are dropped. */
void mp_workq_free(mp_workq *q);

#endif
