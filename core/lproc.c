/*
 * moonpost.core.proc: the watchdog of a Moonpost process that has no
 * supervisor (workers = 1).
 *
 *   proc.watchdog(seconds [, json])  start it, or change its limit (0: off);
 *                           json: its line in the log's JSON format
 *   proc.beat()             the event loop runs: called from a loop timer
 *
 * A thread of its own checks four times a second when the loop last beat.
 * A loop that has not beaten for `seconds` (a hook in an endless loop, a C
 * call that never returns) serves nobody: the thread writes one line to
 * stderr and kills the process with SIGKILL, for the service manager
 * (systemd, Kubernetes) to start it again; accepted mail is in the spool.
 * Time this thread did not run either (the process stopped or frozen, a
 * paused virtual machine) does not count against the loop.
 */
#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "lcompat.h"

#define CHECK_NS 250000000L /* between two checks */
#define FROZEN_MS 1000      /* a check this late: the whole process was stopped */

static _Atomic long long last_beat;  /* ms, CLOCK_MONOTONIC */
static _Atomic long long limit_ms;   /* 0: off */
static atomic_int started;
static atomic_int json; /* the log's format */

static long long now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static void *watch(void *arg)
{
    long long prev = now_ms();
    (void)arg;
    for (;;) {
        struct timespec ts = { 0, CHECK_NS };
        while (nanosleep(&ts, &ts) != 0 && errno == EINTR) {
        }
        long long t = now_ms(), limit = atomic_load(&limit_ms);
        if (t - prev > FROZEN_MS) atomic_store(&last_beat, t); /* not the loop's fault */
        prev = t;
        if (limit <= 0) continue;
        long long silent = t - atomic_load(&last_beat);
        if (silent > limit) {
            /* one line as the log writes them (runtime/log.lua), text or JSON */
            char stamp[40], msg[200], line[320];
            struct timespec wall;
            struct tm tm;
            clock_gettime(CLOCK_REALTIME, &wall);
            gmtime_r(&wall.tv_sec, &tm);
            strftime(stamp, sizeof stamp, "%Y-%m-%dT%H:%M:%S", &tm);
            snprintf(msg, sizeof msg,
                     "watchdog: the event loop has not run for %.1f s (watchdog %g s): "
                     "a hook or a call that does not return; killing pid %ld (SIGKILL)",
                     silent / 1000.0, limit / 1000.0, (long)getpid());
            int n = atomic_load(&json)
                        ? snprintf(line, sizeof line, "{\"time\":\"%s.%03ldZ\",\"level\":\"error\",\"message\":\"%s\"}\n",
                                   stamp, wall.tv_nsec / 1000000, msg)
                        : snprintf(line, sizeof line, "%s.%03ldZ error %s\n", stamp, wall.tv_nsec / 1000000, msg);
            if (n > 0 && write(2, line, (size_t)n) < 0) {
                /* nothing more to tell anyone */
            }
            kill(getpid(), SIGKILL);
        }
    }
    return NULL;
}

static int l_watchdog(lua_State *L)
{
    double s = luaL_checknumber(L, 1);
    if (s < 0) return luaL_argerror(L, 1, "negative");
    atomic_store(&json, lua_toboolean(L, 2));
    atomic_store(&last_beat, now_ms());
    atomic_store(&limit_ms, (long long)(s * 1000));
    if (s > 0 && !atomic_exchange(&started, 1)) {
        pthread_t th;
        pthread_attr_t a;
        sigset_t all, old;
        pthread_attr_init(&a);
        pthread_attr_setdetachstate(&a, PTHREAD_CREATE_DETACHED);
        pthread_attr_setstacksize(&a, 64 * 1024);
        /* the process's signals (SIGTERM, SIGHUP, ...) stay the loop's */
        sigfillset(&all);
        pthread_sigmask(SIG_SETMASK, &all, &old);
        int r = pthread_create(&th, &a, watch, NULL);
        pthread_sigmask(SIG_SETMASK, &old, NULL);
        pthread_attr_destroy(&a);
        if (r != 0) {
            atomic_store(&started, 0);
            lua_pushnil(L);
            lua_pushfstring(L, "watchdog: cannot start its thread: %s", strerror(r));
            return 2;
        }
    }
    lua_pushboolean(L, 1);
    return 1;
}

static int l_beat(lua_State *L)
{
    (void)L;
    atomic_store(&last_beat, now_ms());
    return 0;
}

static const luaL_Reg funcs[] = {{"watchdog", l_watchdog}, {"beat", l_beat}, {NULL, NULL}};

MP_EXPORT int luaopen_moonpost_core_proc(lua_State *L);
MP_EXPORT int luaopen_moonpost_core_proc(lua_State *L)
{
    lua_newtable(L);
    mp_setfuncs(L, funcs);
    return 1;
}
