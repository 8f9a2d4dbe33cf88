/* conns_client: a bounded load client for idle SMTP sessions (issue 8 item 4,
 * driven by scripts/bench/conns.sh).
 *
 * Opens up to K sessions to a loopback SMTP server, spread over P child
 * processes (each under the per-process descriptor limit) and A loopback
 * source addresses (127.0.0.2 ... 127.0.0.<A+1>, so the ~28k ephemeral ports
 * of one address are no limit). Each session reads the 220 greeting, sends
 * EHLO, reads the whole multi-line 250 reply and is then held. Once every
 * child has finished opening, the parent announces it (a line on stderr and
 * the --ready-file), waits --hold seconds, and tells the children to send
 * NOOP on every held session: a 250 counts as "alive". Then QUIT and close.
 * The parent prints one JSON line with the totals.
 *
 * Bounded: at most K sessions; a cap on handshakes in flight and on new
 * connections per second; an overall deadline; a child stops opening after
 * --max-fail consecutive failures or when MemAvailable falls below
 * --mem-floor MiB. Only 127.0.0.0/8 targets are accepted.
 *
 * Second mode, --greet N: N sessions, one after another from 127.0.0.1
 * (--interval ms apart), each timed from connect() to its 220 line; prints
 * {"samples":[ms...],"median":ms,"max":ms,"failed":n}.
 *
 * Build: gcc -O2 -o build/conns_client scripts/bench/conns_client.c
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#ifndef IP_BIND_ADDRESS_NO_PORT
#define IP_BIND_ADDRESS_NO_PORT 24
#endif

enum { S_FREE, S_CONNECT, S_GREET, S_EHLO, S_HELD, S_NOOP, S_ALIVE, S_DONE };

/* Failure kinds, counted per child and summed by the parent. */
enum {
  E_CONNECT_REFUSED, E_ADDR_NOT_AVAIL, E_CONNECT_OTHER, E_SOCKET, E_TIMEOUT,
  E_BAD_GREETING, E_BAD_EHLO, E_CLOSED_HANDSHAKE, E_DROPPED_HOLD, E_NOOP_FAILED,
  E_NKINDS
};
static const char *kind_name[E_NKINDS] = {
  "connect_refused", "addr_not_avail", "connect_other", "socket", "handshake_timeout",
  "bad_greeting", "bad_ehlo", "closed_in_handshake", "dropped_while_held", "noop_failed",
};

struct conn {
  int fd;
  uint8_t state;
  uint8_t hlen;    /* bytes of the current line's first 4 kept in head */
  char head[4];    /* "250-", "250 ", ... of the line being read */
  double started;  /* when the handshake began (for its timeout) */
};

static struct {
  const char *host;
  int port, k, procs, addrs, hold, deadline, inflight, rate, max_fail, mem_floor;
  int handshake_timeout;
  const char *ready_file, *ehlo;
} opt = {
  "127.0.0.1", 2525, 1000, 0, 64, 10, 300, 2000, 20000, 500, 512, 15, NULL, "conns.bench.test",
};

static double now(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return ts.tv_sec + ts.tv_nsec / 1e9;
}

static long mem_available_mib(void) {
  FILE *f = fopen("/proc/meminfo", "r");
  char line[256];
  long kb = -1;
  if (!f) return 1L << 30;
  while (fgets(line, sizeof line, f))
    if (sscanf(line, "MemAvailable: %ld kB", &kb) == 1) break;
  fclose(f);
  return kb < 0 ? 1L << 30 : kb / 1024;
}

static int write_all(int fd, const char *p, size_t n) {
  while (n > 0) {
    ssize_t w = write(fd, p, n);
    if (w < 0) {
      if (errno == EINTR) continue;
      return -1;
    }
    p += w;
    n -= (size_t)w;
  }
  return 0;
}

/* ---- one child: its share of the sessions ---------------------------- */

struct child_stats {
  long attempted, held, alive, failed, kinds[E_NKINDS];
  double open_seconds;
  const char *stop;
};

static struct conn *conns;
static int nconns, epfd;
static struct child_stats st;

static void conn_fail(struct conn *c, int kind) {
  if (c->fd >= 0) close(c->fd); /* close() also takes it out of the epoll set */
  c->fd = -1;
  c->state = S_DONE;
  st.failed++;
  st.kinds[kind]++;
}

/* The bytes of a reply arrive; returns the code of the reply once its last
 * line ("NNN " or "NNN\r\n") is complete, 0 while more is to come, -1 on a
 * line that is no reply. Keeps only a line's first 4 bytes. */
static int reply_feed(struct conn *c, const char *p, ssize_t n, int *done_at) {
  for (ssize_t i = 0; i < n; i++) {
    char ch = p[i];
    if (ch == '\n') {
      int len = c->hlen;
      c->hlen = 0;
      if (len < 3) return -1;
      int code = (c->head[0] - '0') * 100 + (c->head[1] - '0') * 10 + (c->head[2] - '0');
      if (code < 200 || code > 599) return -1;
      if (len == 4 && c->head[3] == '-') continue;
      *done_at = (int)i + 1;
      return code;
    }
    if (c->hlen < 4) c->head[c->hlen++] = ch == '\r' ? ' ' : ch;
  }
  return 0;
}

static int open_one(struct conn *c, int idx, int addr_idx) {
  int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  if (fd < 0) {
    st.attempted++;
    c->fd = -1;
    conn_fail(c, E_SOCKET);
    return -1;
  }
  int one = 1;
  setsockopt(fd, IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, &one, sizeof one);
  struct sockaddr_in src = { .sin_family = AF_INET, .sin_port = 0 };
  src.sin_addr.s_addr = htonl((127u << 24) | (uint32_t)(2 + addr_idx % opt.addrs));
  struct sockaddr_in dst = { .sin_family = AF_INET, .sin_port = htons((uint16_t)opt.port) };
  inet_pton(AF_INET, opt.host, &dst.sin_addr);
  st.attempted++;
  c->fd = fd;
  c->hlen = 0;
  c->started = now();
  if (bind(fd, (struct sockaddr *)&src, sizeof src) < 0) {
    conn_fail(c, errno == EADDRNOTAVAIL || errno == EADDRINUSE ? E_ADDR_NOT_AVAIL : E_SOCKET);
    return -1;
  }
  int r = connect(fd, (struct sockaddr *)&dst, sizeof dst);
  if (r < 0 && errno != EINPROGRESS) {
    int e = errno;
    conn_fail(c, e == ECONNREFUSED ? E_CONNECT_REFUSED
                 : (e == EADDRNOTAVAIL || e == EADDRINUSE) ? E_ADDR_NOT_AVAIL : E_CONNECT_OTHER);
    return -1;
  }
  c->state = r == 0 ? S_GREET : S_CONNECT;
  struct epoll_event ev = { .events = EPOLLIN | (r == 0 ? 0 : EPOLLOUT) | EPOLLRDHUP };
  ev.data.u32 = (uint32_t)idx;
  if (epoll_ctl(epfd, EPOLL_CTL_ADD, fd, &ev) < 0) {
    conn_fail(c, E_SOCKET);
    return -1;
  }
  return 0;
}

static void send_line(struct conn *c, const char *line, int kind) {
  size_t n = strlen(line);
  if (send(c->fd, line, n, MSG_NOSIGNAL) != (ssize_t)n) conn_fail(c, kind);
}

/* Events of one connection; returns +1 when it became held, -1 when it
 * failed in its handshake, 0 otherwise. */
static int on_event(struct conn *c, uint32_t events) {
  char buf[4096];
  if (c->state == S_CONNECT) {
    int err = 0;
    socklen_t len = sizeof err;
    getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &len);
    if (err) {
      conn_fail(c, err == ECONNREFUSED ? E_CONNECT_REFUSED : E_CONNECT_OTHER);
      return -1;
    }
    if (!(events & (EPOLLOUT | EPOLLIN))) return 0;
    c->state = S_GREET;
    struct epoll_event ev = { .events = EPOLLIN | EPOLLRDHUP };
    ev.data.u32 = (uint32_t)(c - conns);
    epoll_ctl(epfd, EPOLL_CTL_MOD, c->fd, &ev);
    if (!(events & EPOLLIN)) return 0;
  }
  for (;;) {
    ssize_t n = recv(c->fd, buf, sizeof buf, 0);
    if (n < 0 && (errno == EAGAIN || errno == EINTR)) return 0;
    if (n <= 0) {
      int in_handshake = c->state == S_GREET || c->state == S_EHLO;
      if (c->state == S_HELD) {
        st.held--;
        conn_fail(c, E_DROPPED_HOLD);
      } else if (c->state == S_NOOP) {
        conn_fail(c, E_NOOP_FAILED);
      } else if (c->state == S_ALIVE) {
        close(c->fd), c->fd = -1, c->state = S_DONE;
      } else {
        conn_fail(c, E_CLOSED_HANDSHAKE);
      }
      return in_handshake ? -1 : 0;
    }
    int off = 0;
    while (off < n) {
      int done_at = 0;
      int code = reply_feed(c, buf + off, n - off, &done_at);
      if (code == 0) break;
      if (code < 0) {
        int hs = c->state == S_GREET || c->state == S_EHLO;
        if (c->state == S_HELD) st.held--;
        conn_fail(c, c->state == S_GREET ? E_BAD_GREETING : c->state == S_EHLO ? E_BAD_EHLO
                     : c->state == S_NOOP ? E_NOOP_FAILED : E_DROPPED_HOLD);
        return hs ? -1 : 0;
      }
      off += done_at;
      switch (c->state) {
      case S_GREET:
        if (code != 220) { conn_fail(c, E_BAD_GREETING); return -1; }
        c->state = S_EHLO;
        char ehlo[300];
        snprintf(ehlo, sizeof ehlo, "EHLO %s\r\n", opt.ehlo);
        send_line(c, ehlo, E_CLOSED_HANDSHAKE);
        if (c->state == S_DONE) return -1;
        break;
      case S_EHLO:
        if (code != 250) { conn_fail(c, E_BAD_EHLO); return -1; }
        c->state = S_HELD;
        st.held++;
        return 1;
      case S_NOOP:
        if (code != 250) { conn_fail(c, E_NOOP_FAILED); return 0; }
        c->state = S_ALIVE;
        st.alive++;
        return 0;
      case S_HELD: /* something unasked while held (a 421): it is going */
        st.held--;
        conn_fail(c, E_DROPPED_HOLD);
        return 0;
      default:
        return 0;
      }
    }
  }
}

static void child_main(int share, int first_idx, int rfd, int wfd, double open_deadline, double deadline) {
  conns = calloc((size_t)share, sizeof *conns);
  epfd = epoll_create1(EPOLL_CLOEXEC);
  if (!conns || epfd < 0) _exit(3);
  struct epoll_event ctl = { .events = EPOLLIN };
  ctl.data.u32 = UINT32_MAX;
  epoll_ctl(epfd, EPOLL_CTL_ADD, rfd, &ctl);
  nconns = share;
  int next = 0, inflight = 0, consec = 0;
  double t0 = now(), tokens = 0, last = t0;
  double rate = (double)opt.rate / opt.procs, cap_inflight = (double)opt.inflight / opt.procs;
  if (cap_inflight < 1) cap_inflight = 1;
  int opening = 1, go = 0;
  const int MAXEV = 1024;
  struct epoll_event evs[1024];
  st.stop = "k_reached";
  double noop_deadline = 0, last_sweep = t0;
  int noop_first = 0, noop_next = 0, noop_pending = 0;
  for (;;) {
    double t = now();
    if (t > deadline || (opening && t > open_deadline)) {
      if (opening) st.stop = "deadline";
      break;
    }
    if (opening) {
      tokens += (t - last) * rate;
      if (tokens > rate / 10 + 1) tokens = rate / 10 + 1;
      last = t;
      while (next < share && inflight < cap_inflight && tokens >= 1) {
        tokens -= 1;
        if (open_one(&conns[next], next, next + first_idx) == 0) inflight++;
        else if (++consec >= opt.max_fail) { st.stop = "consecutive_failures"; break; }
        next++;
        if ((next & 1023) == 0 && mem_available_mib() < opt.mem_floor) {
          st.stop = "mem_floor";
          break;
        }
      }
      if (consec >= opt.max_fail || !strcmp(st.stop, "mem_floor")) share = next;
      if (t - last_sweep > 1) { /* handshakes that take too long */
        last_sweep = t;
        for (int i = 0; i < next; i++) {
          struct conn *c = &conns[i];
          if ((c->state == S_CONNECT || c->state == S_GREET || c->state == S_EHLO) &&
              t - c->started > opt.handshake_timeout) {
            conn_fail(c, E_TIMEOUT);
            inflight--;
            if (++consec >= opt.max_fail) { st.stop = "consecutive_failures"; share = next; }
          }
        }
      }
      if (next >= share && inflight == 0) {
        opening = 0;
        st.open_seconds = now() - t0;
        char msg[64];
        int m = snprintf(msg, sizeof msg, "O %ld\n", st.held);
        write_all(wfd, msg, (size_t)m);
      }
    }
    if (go && now() > noop_deadline) break;
    if (go) { /* NOOP on the held sessions, at most cap_inflight unanswered at once */
      noop_pending = 0;
      for (int i = noop_first; i < noop_next; i++) noop_pending += conns[i].state == S_NOOP;
      while (noop_first < noop_next && conns[noop_first].state != S_NOOP) noop_first++;
      while (noop_next < next && noop_pending < cap_inflight) {
        struct conn *c = &conns[noop_next++];
        if (c->state != S_HELD) continue;
        c->state = S_NOOP;
        send_line(c, "NOOP\r\n", E_NOOP_FAILED);
        noop_pending += c->state == S_NOOP;
      }
      if (noop_next >= next && noop_pending == 0) break;
    }
    int n = epoll_wait(epfd, evs, MAXEV, opening || go ? 2 : 200);
    for (int i = 0; i < n; i++) {
      uint32_t idx = evs[i].data.u32;
      if (idx == UINT32_MAX) { /* the parent: the hold is over */
        char b[16];
        if (read(rfd, b, sizeof b) <= 0 || go) { epoll_ctl(epfd, EPOLL_CTL_DEL, rfd, NULL); }
        if (go) continue;
        go = 1;
        noop_deadline = deadline;
        continue;
      }
      struct conn *c = &conns[idx];
      if (c->state == S_DONE || c->fd < 0) continue;
      int was_handshake = c->state == S_CONNECT || c->state == S_GREET || c->state == S_EHLO;
      int r = on_event(c, evs[i].events);
      if (was_handshake && r != 0) {
        inflight--;
        if (r > 0) consec = 0;
        else consec++;
      }
    }
  }
  if (opening) { /* the deadline came first */
    st.open_seconds = now() - t0;
    char msg[64];
    int m = snprintf(msg, sizeof msg, "O %ld\n", st.held);
    write_all(wfd, msg, (size_t)m);
  }
  for (int i = 0; i < next; i++) {
    struct conn *c = &conns[i];
    if (c->state == S_NOOP) { conn_fail(c, E_NOOP_FAILED); continue; }
    if (c->fd >= 0) {
      send(c->fd, "QUIT\r\n", 6, MSG_NOSIGNAL | MSG_DONTWAIT);
      close(c->fd);
      c->fd = -1;
    }
  }
  char out[1024];
  int m = snprintf(out, sizeof out, "R %ld %ld %ld %ld %.3f %s", st.attempted, st.held,
                   st.alive, st.failed, st.open_seconds, st.stop);
  for (int i = 0; i < E_NKINDS; i++) m += snprintf(out + m, sizeof out - (size_t)m, " %ld", st.kinds[i]);
  m += snprintf(out + m, sizeof out - (size_t)m, "\n");
  write_all(wfd, out, (size_t)m);
  _exit(0);
}

/* ---- the parent ------------------------------------------------------- */

static int read_line(int fd, char *buf, size_t size, double deadline) {
  size_t n = 0;
  while (n + 1 < size) {
    int ms = (int)((deadline - now()) * 1000);
    if (ms <= 0) return -1;
    struct pollfd p = { .fd = fd, .events = POLLIN };
    int r = poll(&p, 1, ms);
    if (r < 0 && errno == EINTR) continue;
    if (r <= 0) return -1;
    ssize_t k = read(fd, buf + n, 1);
    if (k <= 0) return -1;
    if (buf[n] == '\n') { buf[n] = 0; return (int)n; }
    n++;
  }
  buf[n] = 0;
  return (int)n;
}

static int cmp_double(const void *a, const void *b) {
  double x = *(const double *)a, y = *(const double *)b;
  return x < y ? -1 : x > y;
}

static int greet_mode(int samples, int interval_ms) {
  double *ms = calloc((size_t)samples, sizeof *ms);
  int ok = 0, failed = 0;
  struct sockaddr_in dst = { .sin_family = AF_INET, .sin_port = htons((uint16_t)opt.port) };
  inet_pton(AF_INET, opt.host, &dst.sin_addr);
  for (int i = 0; i < samples; i++) {
    if (i) usleep((useconds_t)interval_ms * 1000);
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    struct timeval tv = { 5, 0 };
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
    double t = now();
    char buf[512];
    ssize_t n = -1;
    if (connect(fd, (struct sockaddr *)&dst, sizeof dst) == 0) n = recv(fd, buf, sizeof buf, 0);
    double dt = (now() - t) * 1000;
    if (n >= 4 && !memcmp(buf, "220", 3)) {
      ms[ok++] = dt;
      send(fd, "QUIT\r\n", 6, MSG_NOSIGNAL);
    } else {
      failed++;
    }
    close(fd);
  }
  printf("{\"samples\":[");
  for (int i = 0; i < ok; i++) printf("%s%.2f", i ? "," : "", ms[i]);
  qsort(ms, (size_t)ok, sizeof *ms, cmp_double);
  double med = ok ? (ok % 2 ? ms[ok / 2] : (ms[ok / 2 - 1] + ms[ok / 2]) / 2) : -1;
  printf("],\"median\":%.2f,\"max\":%.2f,\"failed\":%d}\n", med, ok ? ms[ok - 1] : -1, failed);
  return 0;
}

static void usage(void) {
  fprintf(stderr,
          "usage: conns_client --port P [-k K] [--procs P] [--addrs A] [--hold S] [--deadline S]\n"
          "         [--inflight N] [--rate N/s] [--max-fail N] [--mem-floor MiB] [--ready-file F]\n"
          "       conns_client --port P --greet N [--interval MS]\n");
  exit(2);
}

int main(int argc, char **argv) {
  int greet = 0, interval = 500;
  for (int i = 1; i < argc; i++) {
    const char *a = argv[i];
    if (i + 1 >= argc) usage();
    const char *v = argv[++i];
    if (!strcmp(a, "--host")) opt.host = v;
    else if (!strcmp(a, "--port")) opt.port = atoi(v);
    else if (!strcmp(a, "-k")) opt.k = atoi(v);
    else if (!strcmp(a, "--procs")) opt.procs = atoi(v);
    else if (!strcmp(a, "--addrs")) opt.addrs = atoi(v);
    else if (!strcmp(a, "--hold")) opt.hold = atoi(v);
    else if (!strcmp(a, "--deadline")) opt.deadline = atoi(v);
    else if (!strcmp(a, "--inflight")) opt.inflight = atoi(v);
    else if (!strcmp(a, "--rate")) opt.rate = atoi(v);
    else if (!strcmp(a, "--max-fail")) opt.max_fail = atoi(v);
    else if (!strcmp(a, "--mem-floor")) opt.mem_floor = atoi(v);
    else if (!strcmp(a, "--ready-file")) opt.ready_file = v;
    else if (!strcmp(a, "--greet")) greet = atoi(v);
    else if (!strcmp(a, "--interval")) interval = atoi(v);
    else usage();
  }
  struct in_addr h;
  if (inet_pton(AF_INET, opt.host, &h) != 1 || (ntohl(h.s_addr) >> 24) != 127) {
    fprintf(stderr, "conns_client: only 127.0.0.0/8 targets\n");
    return 2;
  }
  if (opt.port <= 0 || opt.k < 0 || opt.addrs < 1 || opt.addrs > 250 || opt.k > 2000000) usage();
  if (greet > 0) return greet_mode(greet > 1000 ? 1000 : greet, interval);

  struct rlimit rl;
  getrlimit(RLIMIT_NOFILE, &rl);
  rl.rlim_cur = rl.rlim_max;
  setrlimit(RLIMIT_NOFILE, &rl);
  int per_max = (int)rl.rlim_cur - 200;
  if (per_max > 18000) per_max = 18000;
  if (opt.procs <= 0) opt.procs = (opt.k + per_max - 1) / per_max;
  if (opt.procs < 1) opt.procs = 1;
  if ((opt.k + opt.procs - 1) / opt.procs > per_max) {
    fprintf(stderr, "conns_client: %d sessions over %d processes is past %d descriptors each\n",
            opt.k, opt.procs, per_max);
    return 2;
  }
  signal(SIGPIPE, SIG_IGN);
  double t0 = now(), deadline = t0 + opt.deadline;
  /* opening ends early enough for the hold, the NOOPs and the closing */
  double open_deadline = deadline - opt.hold - 30 - opt.k / 10000;
  if (open_deadline < t0 + 5) {
    fprintf(stderr, "conns_client: --deadline must exceed --hold by 35 s + K/10000 s or more\n");
    return 2;
  }
  int P = opt.procs;
  int *to_child = calloc((size_t)P, sizeof(int)), *from_child = calloc((size_t)P, sizeof(int));
  pid_t *pids = calloc((size_t)P, sizeof(pid_t));
  int first = 0;
  for (int i = 0; i < P; i++) {
    int share = opt.k / P + (i < opt.k % P);
    int down[2], up[2];
    if (pipe2(down, O_CLOEXEC) < 0 || pipe2(up, O_CLOEXEC) < 0) { perror("pipe"); return 1; }
    pid_t pid = fork();
    if (pid < 0) { perror("fork"); return 1; }
    if (pid == 0) {
      close(down[1]);
      close(up[0]);
      for (int j = 0; j < i; j++) close(to_child[j]), close(from_child[j]);
      /* every child starts with another source address, so they share them evenly */
      child_main(share, first, down[0], up[1], open_deadline, deadline - 5);
    }
    close(down[0]);
    close(up[1]);
    to_child[i] = down[1];
    from_child[i] = up[0];
    pids[i] = pid;
    first += share;
  }
  /* opening: every child says when it is done */
  long held_open = 0;
  char line[1024];
  for (int i = 0; i < P; i++) {
    if (read_line(from_child[i], line, sizeof line, open_deadline + 5) < 0) continue;
    long h = 0;
    if (sscanf(line, "O %ld", &h) == 1) held_open += h;
  }
  double opened = now() - t0;
  fprintf(stderr, "conns_client: %ld sessions held after %.1f s; holding for %d s\n", held_open, opened,
          opt.hold);
  if (opt.ready_file) {
    FILE *f = fopen(opt.ready_file, "w");
    if (f) fprintf(f, "%ld\n", held_open), fclose(f);
  }
  double hold_end = now() + opt.hold;
  if (hold_end > deadline - 20 - opt.k / 10000) hold_end = deadline - 20 - opt.k / 10000;
  while (now() < hold_end) usleep(100000);
  for (int i = 0; i < P; i++) write_all(to_child[i], "g", 1);
  long attempted = 0, held = 0, alive = 0, failed = 0, kinds[E_NKINDS] = { 0 };
  double open_max = 0;
  char stop[64] = "k_reached";
  for (int i = 0; i < P; i++) {
    if (read_line(from_child[i], line, sizeof line, deadline) < 0) {
      snprintf(stop, sizeof stop, "child_lost");
      continue;
    }
    long a, h, al, f, ks[E_NKINDS];
    double os;
    char s[64];
    int got = sscanf(line, "R %ld %ld %ld %ld %lf %63s %ld %ld %ld %ld %ld %ld %ld %ld %ld %ld", &a, &h,
                     &al, &f, &os, s, &ks[0], &ks[1], &ks[2], &ks[3], &ks[4], &ks[5], &ks[6], &ks[7],
                     &ks[8], &ks[9]);
    if (got != 6 + E_NKINDS) continue;
    attempted += a, held += h, alive += al, failed += f;
    for (int j = 0; j < E_NKINDS; j++) kinds[j] += ks[j];
    if (os > open_max) open_max = os;
    if (strcmp(s, "k_reached")) snprintf(stop, sizeof stop, "%s", s);
  }
  for (int i = 0; i < P; i++) {
    int status;
    for (int w = 0; w < 50 && waitpid(pids[i], &status, WNOHANG) == 0; w++) usleep(100000);
    if (waitpid(pids[i], &status, WNOHANG) == 0) kill(pids[i], SIGKILL), waitpid(pids[i], &status, 0);
  }
  printf("{\"attempted\":%ld,\"held\":%ld,\"held_at_hold_start\":%ld,\"alive_after_hold\":%ld,"
         "\"failed\":%ld,\"errors\":{",
         attempted, held, held_open, alive, failed);
  int firstk = 1;
  for (int j = 0; j < E_NKINDS; j++)
    if (kinds[j]) printf("%s\"%s\":%ld", firstk ? "" : ",", kind_name[j], kinds[j]), firstk = 0;
  printf("},\"procs\":%d,\"addrs\":%d,\"open_seconds\":%.2f,\"hold_seconds\":%d,\"total_seconds\":%.2f,"
         "\"stop_reason\":\"%s\"}\n",
         P, opt.addrs, open_max, opt.hold, now() - t0, stop);
  return 0;
}
