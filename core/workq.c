/*
 * Worker threads, a job queue and an eventfd (see workq.h).
 */
#include "workq.h"

#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdlib.h>
#include <sys/eventfd.h>
#include <unistd.h>

struct mp_workq {
    pthread_mutex_t lock;
    pthread_cond_t cond;
    pthread_t *threads;
    int nthreads;
    int stop;
    mp_workq_item *qhead, *qtail; /* queued, oldest first */
    mp_workq_item *dhead, *dtail; /* finished, oldest first */
    size_t pending, max_queue;
    uint64_t next_id;
    mp_workq_fn run, drop;
    int efd;
};

static void signal_fd(mp_workq *q)
{
    uint64_t one = 1;
    /* the counter cannot overflow in practice; a failed write is only a late wakeup */
    while (write(q->efd, &one, sizeof one) < 0 && errno == EINTR) ;
}

static void *worker(void *arg)
{
    mp_workq *q = arg;
    for (;;) {
        mp_workq_item *j;
        pthread_mutex_lock(&q->lock);
        while (!q->stop && q->qhead == NULL) pthread_cond_wait(&q->cond, &q->lock);
        if (q->stop) {
            pthread_mutex_unlock(&q->lock);
            return NULL;
        }
        j = q->qhead;
        q->qhead = j->next;
        if (q->qhead == NULL) q->qtail = NULL;
        pthread_mutex_unlock(&q->lock);
        j->next = NULL;
        q->run(j);
        pthread_mutex_lock(&q->lock);
        if (q->dtail) q->dtail->next = j;
        else q->dhead = j;
        q->dtail = j;
        pthread_mutex_unlock(&q->lock);
        signal_fd(q);
    }
}

mp_workq *mp_workq_new(int threads, size_t max_queue, mp_workq_fn run, mp_workq_fn drop, int *err)
{
    mp_workq *q;
    sigset_t all, old;
    int i;
    if (threads < 1 || max_queue < 1) {
        *err = EINVAL;
        return NULL;
    }
    q = calloc(1, sizeof *q);
    if (q == NULL) {
        *err = ENOMEM;
        return NULL;
    }
    q->threads = calloc((size_t)threads, sizeof *q->threads);
    q->efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (q->threads == NULL || q->efd < 0) {
        *err = q->efd < 0 ? errno : ENOMEM;
        if (q->efd >= 0) close(q->efd);
        free(q->threads);
        free(q);
        return NULL;
    }
    pthread_mutex_init(&q->lock, NULL);
    pthread_cond_init(&q->cond, NULL);
    q->next_id = 1;
    q->max_queue = max_queue;
    q->run = run;
    q->drop = drop;
    /* signals belong to the loop thread: the workers block them all */
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    for (i = 0; i < threads; i++) {
        int e = pthread_create(&q->threads[i], NULL, worker, q);
        if (e != 0) {
            *err = e;
            break;
        }
        q->nthreads++;
    }
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (q->nthreads < threads) {
        mp_workq_free(q);
        return NULL;
    }
    return q;
}

int mp_workq_submit(mp_workq *q, mp_workq_item *job, uint64_t *id)
{
    pthread_mutex_lock(&q->lock);
    if (q->pending >= q->max_queue) {
        pthread_mutex_unlock(&q->lock);
        return -EBUSY;
    }
    job->id = q->next_id++;
    job->next = NULL;
    if (q->qtail) q->qtail->next = job;
    else q->qhead = job;
    q->qtail = job;
    q->pending++;
    *id = job->id;
    pthread_cond_signal(&q->cond);
    pthread_mutex_unlock(&q->lock);
    return 0;
}

mp_workq_item *mp_workq_collect(mp_workq *q, size_t max)
{
    uint64_t v;
    mp_workq_item *list = NULL, *last = NULL;
    size_t n = 0;
    int more;
    /* drain first: a job that finishes after this leaves the fd readable */
    while (read(q->efd, &v, sizeof v) < 0 && errno == EINTR) ;
    pthread_mutex_lock(&q->lock);
    while (n < max && q->dhead != NULL) {
        mp_workq_item *j = q->dhead;
        q->dhead = j->next;
        if (q->dhead == NULL) q->dtail = NULL;
        j->next = NULL;
        if (last) last->next = j;
        else list = j;
        last = j;
        q->pending--;
        n++;
    }
    more = q->dhead != NULL;
    pthread_mutex_unlock(&q->lock);
    /* left some behind: keep the fd readable for them */
    if (more) signal_fd(q);
    return list;
}

int mp_workq_fd(const mp_workq *q) { return q->efd; }

size_t mp_workq_pending(mp_workq *q)
{
    size_t n;
    pthread_mutex_lock(&q->lock);
    n = q->pending;
    pthread_mutex_unlock(&q->lock);
    return n;
}

static void drop_list(mp_workq *q, mp_workq_item *j)
{
    while (j != NULL) {
        mp_workq_item *next = j->next;
        q->drop(j);
        j = next;
    }
}

void mp_workq_free(mp_workq *q)
{
    int i;
    if (q == NULL) return;
    pthread_mutex_lock(&q->lock);
    q->stop = 1;
    pthread_cond_broadcast(&q->cond);
    pthread_mutex_unlock(&q->lock);
    for (i = 0; i < q->nthreads; i++) pthread_join(q->threads[i], NULL);
    drop_list(q, q->qhead);
    drop_list(q, q->dhead);
    close(q->efd);
    pthread_cond_destroy(&q->cond);
    pthread_mutex_destroy(&q->lock);
    free(q->threads);
    free(q);
}
