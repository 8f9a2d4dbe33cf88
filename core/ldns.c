/*
 * moonpost.core.dns: DNS queries on c-ares, driven by the runtime's loop.
 *
 *   local ch = dns.channel { servers = "127.0.0.1:5353", timeout = 2000, tries = 2 }
 *   local id = ch:query("example.org", "MX")       -- | nil, err
 *   ch:getsock()  -> { { fd, readable, writable }, ... } sockets to watch
 *   ch:process(fd, readable, writable)              -- after poll; fd -1: timeouts only
 *   ch:timeout()  -> seconds until c-ares wants process(-1), or nil
 *   ch:results()  -> { { id, status, rcode, neg_ttl, records = { { type, name, ttl,
 *                        data, pref, usage, selector, mtype } } } }
 *   ch:graveyard() -> { fd, ... } sockets c-ares closed: stop watching them, then
 *   ch:bury()      closes them. Until then the fd numbers cannot be reused, so a
 *                  poll handle never ends up watching someone else's socket.
 *   ch:pending(), ch:close()
 *
 * Nothing here calls into Lua: answers are parsed (core/dns.c) and kept
 * until results() collects them. status is "ok", "nodata", "nxdomain",
 * "timeout", "servfail", "refused", "cancelled" or "error".
 */
#include <ares.h>
#include <idn2.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>

#include "dns.h"
#include "lcompat.h"

#define CHANNEL_MT "moonpost.core.dns.channel"

typedef struct completion {
    struct completion *next;
    int id;
    int status;
    unsigned char *abuf;
    int alen;
} completion;

#define GRAVEYARD_MAX 64

typedef struct lchannel {
    ares_channel ch;
    int open;
    int next_id;
    int pending;
    completion *head, *tail;
    int grave[GRAVEYARD_MAX];
    int ngrave;
} lchannel;

/* ---- sockets: as c-ares would, except that close is deferred ---------------- */

static ares_socket_t s_socket(int domain, int type, int protocol, void *ud)
{
    (void)ud;
    return socket(domain, type | SOCK_CLOEXEC, protocol);
}

static int s_close(ares_socket_t fd, void *ud)
{
    lchannel *lc = ud;
    if (lc->ngrave < GRAVEYARD_MAX) {
        lc->grave[lc->ngrave++] = fd;
        return 0;
    }
    return close(fd); /* cannot happen with c-ares' few sockets; be safe */
}

static int s_connect(ares_socket_t fd, const struct sockaddr *sa, ares_socklen_t len, void *ud)
{
    (void)ud;
    return connect(fd, sa, len);
}

static ares_ssize_t s_recvfrom(ares_socket_t fd, void *buf, size_t n, int flags, struct sockaddr *from,
                               ares_socklen_t *fromlen, void *ud)
{
    (void)ud;
    return recvfrom(fd, buf, n, flags, from, fromlen);
}

static ares_ssize_t s_sendv(ares_socket_t fd, const struct iovec *iov, int n, void *ud)
{
    (void)ud;
    return writev(fd, iov, n);
}

static const struct ares_socket_functions socket_functions = {s_socket, s_close, s_connect, s_recvfrom, s_sendv};

static void bury(lchannel *lc)
{
    int i;
    for (i = 0; i < lc->ngrave; i++) close(lc->grave[i]);
    lc->ngrave = 0;
}

typedef struct qarg {
    lchannel *lc;
    int id;
} qarg;

static void on_answer(void *arg, int status, int timeouts, unsigned char *abuf, int alen)
{
    qarg *q = arg;
    lchannel *lc = q->lc;
    completion *c = calloc(1, sizeof *c);
    (void)timeouts;
    lc->pending--;
    if (c) {
        c->id = q->id;
        c->status = status;
        if (abuf && alen > 0) {
            c->abuf = malloc((size_t)alen);
            if (c->abuf) {
                memcpy(c->abuf, abuf, (size_t)alen);
                c->alen = alen;
            }
        }
        if (lc->tail) lc->tail->next = c;
        else lc->head = c;
        lc->tail = c;
    }
    free(q);
}

static void free_completions(lchannel *lc)
{
    completion *c = lc->head;
    while (c) {
        completion *n = c->next;
        free(c->abuf);
        free(c);
        c = n;
    }
    lc->head = lc->tail = NULL;
}

/* The caller stops watching the sockets first (see graveyard()). */
static void channel_close(lchannel *lc)
{
    if (lc->open) {
        lc->open = 0;
        ares_destroy(lc->ch); /* pending queries complete with ARES_EDESTRUCTION */
    }
    bury(lc);
    free_completions(lc);
}

static lchannel *checkchannel(lua_State *L, int i)
{
    lchannel *lc = luaL_checkudata(L, i, CHANNEL_MT);
    if (!lc->open) luaL_argerror(L, i, "channel is closed");
    return lc;
}

static int l_channel(lua_State *L)
{
    static int library_ready;
    struct ares_options o;
    int mask = ARES_OPT_TIMEOUTMS | ARES_OPT_TRIES;
    lchannel *lc;
    int r;
    const char *servers = NULL;
    memset(&o, 0, sizeof o);
    o.timeout = 2000;
    o.tries = 2;
    if (!lua_isnoneornil(L, 1)) {
        luaL_checktype(L, 1, LUA_TTABLE);
        lua_getfield(L, 1, "servers");
        servers = lua_tostring(L, -1);
        lua_getfield(L, 1, "timeout");
        if (!lua_isnil(L, -1)) o.timeout = (int)luaL_checkinteger(L, -1);
        lua_getfield(L, 1, "tries");
        if (!lua_isnil(L, -1)) o.tries = (int)luaL_checkinteger(L, -1);
        lua_pop(L, 2);
    }
    if (!library_ready) {
        if (ares_library_init(ARES_LIB_INIT_ALL) != ARES_SUCCESS) return luaL_error(L, "c-ares: cannot initialise");
        library_ready = 1;
    }
    lc = lua_newuserdata(L, sizeof *lc);
    memset(lc, 0, sizeof *lc);
    luaL_getmetatable(L, CHANNEL_MT);
    lua_setmetatable(L, -2);
    r = ares_init_options(&lc->ch, &o, mask);
    if (r != ARES_SUCCESS) {
        lua_pushnil(L);
        lua_pushfstring(L, "dns: %s", ares_strerror(r));
        return 2;
    }
    lc->open = 1;
    ares_set_socket_functions(lc->ch, &socket_functions, lc);
    if (servers && *servers) {
        r = ares_set_servers_ports_csv(lc->ch, servers);
        if (r != ARES_SUCCESS) {
            channel_close(lc);
            lua_pushnil(L);
            lua_pushfstring(L, "dns: bad servers '%s': %s", servers, ares_strerror(r));
            return 2;
        }
    }
    /* With one server, a SERVFAIL or REFUSED answer is handed back as it is
     * (ARES_FLAG_NOCHECKRESP): c-ares 1.18 would otherwise skip that server
     * and, with no other to try, end the query with ECONNREFUSED ("could
     * not contact DNS servers"), so a domain whose DNS is broken looked like
     * a resolver that is down. With several, c-ares tries the next one. */
    {
        struct ares_addr_port_node *list = NULL;
        ares_channel one;
        if (ares_get_servers_ports(lc->ch, &list) == ARES_SUCCESS && list != NULL && list->next == NULL) {
            o.flags = ARES_FLAG_NOCHECKRESP;
            if (ares_init_options(&one, &o, mask | ARES_OPT_FLAGS) == ARES_SUCCESS) {
                if (ares_set_servers_ports(one, list) == ARES_SUCCESS) {
                    ares_destroy(lc->ch);
                    lc->ch = one;
                    ares_set_socket_functions(lc->ch, &socket_functions, lc);
                } else {
                    ares_destroy(one);
                }
            }
        }
        if (list) ares_free_data(list);
    }
    return 1;
}

static int c_query(lua_State *L)
{
    lchannel *lc = checkchannel(L, 1);
    const char *name = luaL_checkstring(L, 2);
    const char *tname = luaL_checkstring(L, 3);
    int type = mp_dns_type(tname);
    int id;
    qarg *q;
    if (type == 0) luaL_argerror(L, 3, "unknown record type");
    q = malloc(sizeof *q);
    if (q == NULL) return luaL_error(L, "out of memory");
    id = ++lc->next_id;
    q->lc = lc;
    q->id = id;
    lc->pending++;
    /* c-ares may call on_answer (and free q) before returning, e.g. for a
     * name it cannot encode: q is not ours to read after this call */
    ares_query(lc->ch, name, 1 /* C_IN */, type, on_answer, q);
    lua_pushinteger(L, id);
    return 1;
}

static int c_getsock(lua_State *L)
{
    lchannel *lc = checkchannel(L, 1);
    ares_socket_t socks[ARES_GETSOCK_MAXNUM];
    int bits = ares_getsock(lc->ch, socks, ARES_GETSOCK_MAXNUM);
    int i, n = 0;
    lua_newtable(L);
    for (i = 0; i < ARES_GETSOCK_MAXNUM; i++) {
        int r = ARES_GETSOCK_READABLE(bits, i) != 0, w = ARES_GETSOCK_WRITABLE(bits, i) != 0;
        if (!r && !w) continue;
        lua_createtable(L, 3, 0);
        lua_pushinteger(L, socks[i]);
        lua_rawseti(L, -2, 1);
        lua_pushboolean(L, r);
        lua_rawseti(L, -2, 2);
        lua_pushboolean(L, w);
        lua_rawseti(L, -2, 3);
        lua_rawseti(L, -2, ++n);
    }
    return 1;
}

static int c_process(lua_State *L)
{
    lchannel *lc = checkchannel(L, 1);
    int fd = (int)luaL_checkinteger(L, 2);
    int r = lua_toboolean(L, 3), w = lua_toboolean(L, 4);
    if (fd < 0) ares_process_fd(lc->ch, ARES_SOCKET_BAD, ARES_SOCKET_BAD);
    else ares_process_fd(lc->ch, r ? fd : ARES_SOCKET_BAD, w ? fd : ARES_SOCKET_BAD);
    return 0;
}

static int c_timeout(lua_State *L)
{
    lchannel *lc = checkchannel(L, 1);
    struct timeval tv, *t;
    if (lc->pending == 0) return 0;
    t = ares_timeout(lc->ch, NULL, &tv);
    if (t == NULL) return 0;
    lua_pushnumber(L, (lua_Number)t->tv_sec + (lua_Number)t->tv_usec / 1e6);
    return 1;
}

static const char *status_token(int s)
{
    switch (s) {
    case ARES_SUCCESS: return "ok";
    case ARES_ENODATA: return "nodata";
    case ARES_ENOTFOUND:
    case ARES_EBADNAME: /* a name DNS cannot carry cannot exist */
        return "nxdomain";
    case ARES_ETIMEOUT: return "timeout";
    case ARES_ESERVFAIL: return "servfail";
    case ARES_EREFUSED: return "refused";
    case ARES_EDESTRUCTION:
    case ARES_ECANCELLED: return "cancelled";
    default: return "error";
    }
}

static const char *type_name(int t)
{
    switch (t) {
    case MP_DNS_A: return "A";
    case MP_DNS_AAAA: return "AAAA";
    case MP_DNS_MX: return "MX";
    case MP_DNS_TXT: return "TXT";
    case MP_DNS_PTR: return "PTR";
    case MP_DNS_CNAME: return "CNAME";
    case MP_DNS_NS: return "NS";
    case MP_DNS_TLSA: return "TLSA";
    default: return "?";
    }
}

static int c_results(lua_State *L)
{
    lchannel *lc = checkchannel(L, 1);
    completion *c = lc->head;
    int n = 0;
    mp_dns_msg *msg = malloc(sizeof *msg);
    if (msg == NULL) return luaL_error(L, "out of memory");
    lc->head = lc->tail = NULL;
    lua_newtable(L);
    while (c) {
        completion *next = c->next;
        const char *status = status_token(c->status);
        lua_createtable(L, 0, 6);
        lua_pushinteger(L, c->id);
        lua_setfield(L, -2, "id");
        lua_newtable(L);
        if (c->abuf && mp_dns_parse(c->abuf, (size_t)c->alen, msg) == 0) {
            int i;
            lua_pushinteger(L, msg->rcode);
            lua_setfield(L, -3, "rcode");
            lua_pushnumber(L, msg->neg_ttl);
            lua_setfield(L, -3, "neg_ttl");
            for (i = 0; i < msg->nrr; i++) {
                mp_dns_rr *r = &msg->rr[i];
                lua_createtable(L, 0, 6);
                lua_pushstring(L, type_name(r->type));
                lua_setfield(L, -2, "type");
                lua_pushstring(L, r->name);
                lua_setfield(L, -2, "name");
                lua_pushnumber(L, r->ttl);
                lua_setfield(L, -2, "ttl");
                lua_pushlstring(L, r->text, r->text_len);
                lua_setfield(L, -2, "data");
                if (r->type == MP_DNS_MX) {
                    lua_pushinteger(L, r->pref);
                    lua_setfield(L, -2, "pref");
                } else if (r->type == MP_DNS_TLSA) {
                    lua_pushinteger(L, r->usage);
                    lua_setfield(L, -2, "usage");
                    lua_pushinteger(L, r->selector);
                    lua_setfield(L, -2, "selector");
                    lua_pushinteger(L, r->mtype);
                    lua_setfield(L, -2, "mtype");
                }
                lua_rawseti(L, -2, i + 1);
            }
        } else if (c->status == ARES_SUCCESS) {
            status = "error"; /* an answer we could not read */
        }
        lua_setfield(L, -2, "records");
        lua_pushstring(L, status);
        lua_setfield(L, -2, "status");
        lua_rawseti(L, -2, ++n);
        free(c->abuf);
        free(c);
        c = next;
    }
    free(msg);
    return 1;
}

static int c_graveyard(lua_State *L)
{
    lchannel *lc = checkchannel(L, 1);
    int i;
    lua_createtable(L, lc->ngrave, 0);
    for (i = 0; i < lc->ngrave; i++) {
        lua_pushinteger(L, lc->grave[i]);
        lua_rawseti(L, -2, i + 1);
    }
    return 1;
}

static int c_bury(lua_State *L)
{
    bury(checkchannel(L, 1));
    return 0;
}

static int c_pending(lua_State *L)
{
    lua_pushinteger(L, checkchannel(L, 1)->pending);
    return 1;
}

static int c_close(lua_State *L)
{
    channel_close(luaL_checkudata(L, 1, CHANNEL_MT));
    lua_pushboolean(L, 1);
    return 1;
}

static int c_gc(lua_State *L)
{
    channel_close(luaL_checkudata(L, 1, CHANNEL_MT));
    return 0;
}

/* to_ascii(name) -> the name with every label in its ASCII form (IDNA2008
 * with the UTS #46 mapping, so case and width variants of a U-label give the
 * same A-label: "BÜCHER.example" -> "xn--bcher-kva.example") | nil, err.
 * For names of the DNS and comparisons of domains (RFC 5890, RFC 6531 3.2). */
static int l_to_ascii(lua_State *L)
{
    const char *name = luaL_checkstring(L, 1);
    char *out = NULL;
    int rc = idn2_to_ascii_8z(name, &out, IDN2_NONTRANSITIONAL | IDN2_NFC_INPUT);
    if (rc != IDN2_OK) {
        lua_pushnil(L);
        lua_pushstring(L, idn2_strerror(rc));
        return 2;
    }
    lua_pushstring(L, out);
    idn2_free(out);
    return 1;
}

static const luaL_Reg funcs[] = {{"channel", l_channel}, {"to_ascii", l_to_ascii}, {NULL, NULL}};
static const luaL_Reg methods[] = {
    {"query", c_query}, {"getsock", c_getsock}, {"process", c_process}, {"timeout", c_timeout},
    {"results", c_results}, {"graveyard", c_graveyard}, {"bury", c_bury}, {"pending", c_pending},
    {"close", c_close}, {NULL, NULL}};
static const luaL_Reg meta[] = {{"__gc", c_gc}, {NULL, NULL}};

MP_EXPORT int luaopen_moonpost_core_dns(lua_State *L);
MP_EXPORT int luaopen_moonpost_core_dns(lua_State *L)
{
    mp_createmeta(L, CHANNEL_MT, meta, methods);
    lua_newtable(L);
    mp_setfuncs(L, funcs);
    return 1;
}
