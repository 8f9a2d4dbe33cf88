/*
 * SMTP engine. See smtp.h for the contract. No I/O and no Lua here.
 */
#include "smtp.h"

#include <arpa/inet.h>
#include <stdlib.h>
#include <string.h>

/* ---- message body ------------------------------------------------------ */

void mp_body_init(mp_body *b) { memset(b, 0, sizeof *b); }

void mp_body_free(mp_body *b)
{
    free(b->base);
    mp_body_init(b);
}

/* Make room for n more bytes after the body. */
static int body_reserve(mp_body *b, size_t n)
{
    size_t need, cap;
    char *nb;
    if (b->base == NULL) {
        cap = MP_SMTP_HEADROOM + (n > 4096 ? n : 4096);
        b->base = malloc(cap);
        if (b->base == NULL) return -1;
        b->cap = cap;
        b->head = MP_SMTP_HEADROOM;
        b->len = 0;
        return 0;
    }
    need = b->head + b->len + n;
    if (need < n) return -1; /* overflow */
    if (need <= b->cap) return 0;
    cap = b->cap;
    while (cap < need) {
        if (cap > ((size_t)-1) / 2) { cap = need; break; }
        cap *= 2;
    }
    nb = realloc(b->base, cap);
    if (nb == NULL) return -1;
    b->base = nb;
    b->cap = cap;
    return 0;
}

int mp_body_append(mp_body *b, const char *p, size_t n)
{
    if (n == 0) return 0;
    if (body_reserve(b, n) != 0) return -1;
    memcpy(b->base + b->head + b->len, p, n);
    b->len += n;
    return 0;
}

int mp_body_prepend(mp_body *b, const char *p, size_t n)
{
    if (n == 0) return 0;
    if (b->base == NULL && body_reserve(b, 0) != 0) return -1;
    if (n > b->head) {
        /* Not enough headroom: grow and move the body up, keeping headroom
         * for the next prepend too. */
        size_t shift = n + MP_SMTP_HEADROOM - b->head;
        if (body_reserve(b, shift) != 0) return -1;
        memmove(b->base + b->head + shift, b->base + b->head, b->len);
        b->head += shift;
    }
    b->head -= n;
    memcpy(b->base + b->head, p, n);
    b->len += n;
    return 0;
}

void mp_body_remove(mp_body *b, size_t off, size_t n)
{
    if (n == 0 || off >= b->len) return;
    if (n > b->len - off) n = b->len - off;
    memmove(b->base + b->head + n, b->base + b->head, off);
    b->head += n;
    b->len -= n;
}

/* ---- server-side input parser ------------------------------------------ */

struct mp_smtp_in {
    char *buf;        /* input bytes; unconsumed are buf[off, len) */
    size_t off, len, cap;
    int mode;
    mp_in_limits lim;
    /* command mode: a line over the limit is being skipped */
    int discarding;
    size_t discard_len;
    /* content state */
    int bol;          /* at the beginning of a content line */
    int prev_crlf;    /* the previous line ended with a real CRLF */
    int pending_cr;   /* BDAT: a CR was the last byte of the previous input */
    size_t cur_line;  /* wire octets of the current content line so far */
    uint64_t bdat_left;
    mp_body body;
    unsigned body_flags;
    char verb[20];
};

void mp_in_limits_default(mp_in_limits *l)
{
    l->cmd_line = MP_SMTP_CMD_LINE_MAX;
    l->text_line = MP_SMTP_TEXT_LINE_MAX;
    l->max_size = 0;
}

mp_smtp_in *mp_in_new(const mp_in_limits *limits)
{
    mp_smtp_in *p = calloc(1, sizeof *p);
    if (p == NULL) return NULL;
    if (limits) p->lim = *limits;
    else mp_in_limits_default(&p->lim);
    p->mode = MP_MODE_CMD;
    mp_body_init(&p->body);
    return p;
}

void mp_in_free(mp_smtp_in *p)
{
    if (p == NULL) return;
    free(p->buf);
    mp_body_free(&p->body);
    free(p);
}

/* Input received and not yet parsed is buf[off..len): append n octets,
 * moving what is left to the front before growing the buffer. 0 | -1. */
static int input_append(char **buf, size_t *off, size_t *len, size_t *cap, size_t first_cap, const char *data,
                        size_t n)
{
    if (n == 0) return 0;
    if (*off == *len) {
        *off = *len = 0;
    } else if (*off > 0 && *len + n > *cap) {
        memmove(*buf, *buf + *off, *len - *off);
        *len -= *off;
        *off = 0;
    }
    if (*len + n > *cap) {
        size_t c = *cap ? *cap : first_cap;
        char *nb;
        while (c < *len + n) c *= 2;
        nb = realloc(*buf, c);
        if (nb == NULL) return -1;
        *buf = nb;
        *cap = c;
    }
    memcpy(*buf + *len, data, n);
    *len += n;
    return 0;
}

void mp_in_set_limits(mp_smtp_in *p, const mp_in_limits *limits) { p->lim = *limits; }
const mp_in_limits *mp_in_get_limits(const mp_smtp_in *p) { return &p->lim; }
size_t mp_in_buffered(const mp_smtp_in *p) { return p->len - p->off; }
size_t mp_in_capacity(const mp_smtp_in *p) { return p->cap; }
size_t mp_in_body_size(const mp_smtp_in *p) { return p->body.len; }
int mp_in_mode(const mp_smtp_in *p) { return p->mode; }

int mp_in_push(mp_smtp_in *p, const char *data, size_t n)
{
    return input_append(&p->buf, &p->off, &p->len, &p->cap, 4096, data, n);
}

void mp_in_discard(mp_smtp_in *p)
{
    p->off = p->len = 0;
    p->discarding = 0;
    p->discard_len = 0;
    /* Keep a big buffer from one pipelined burst from pinning memory for
     * the rest of an idle session. */
    if (p->cap > 65536) {
        free(p->buf);
        p->buf = NULL;
        p->cap = 0;
    }
}

static void content_start(mp_smtp_in *p)
{
    p->bol = 1;
    p->prev_crlf = 1;
    p->cur_line = 0;
}

void mp_in_begin_data(mp_smtp_in *p)
{
    p->mode = MP_MODE_DATA;
    content_start(p);
}

void mp_in_begin_bdat(mp_smtp_in *p, uint64_t size)
{
    p->mode = MP_MODE_BDAT;
    p->bdat_left = size;
    /* Line state carries over from the previous chunk of the same message. */
}

void mp_in_begin_line(mp_smtp_in *p) { p->mode = MP_MODE_LINE; }

void mp_in_reset_body(mp_smtp_in *p)
{
    mp_body_free(&p->body);
    p->body_flags = 0;
    p->pending_cr = 0;
    content_start(p);
}

unsigned mp_in_take_body(mp_smtp_in *p, mp_body *out)
{
    unsigned flags;
    if (p->pending_cr) {
        /* A CR that ended the last BDAT chunk was a bare CR. */
        p->pending_cr = 0;
        p->body_flags |= MP_MSG_BARE_CR;
        if (mp_body_append(&p->body, "\r\n", 2) != 0) p->body_flags |= MP_MSG_NOMEM;
    }
    flags = p->body_flags;
    *out = p->body;
    mp_body_init(&p->body);
    p->body_flags = 0;
    content_start(p);
    return flags;
}

/* Append message content, honouring the size limit. Past the limit the
 * bytes are counted as dropped and the message is flagged. */
static void body_add(mp_smtp_in *p, const char *s, size_t n)
{
    if (n == 0 || (p->body_flags & (MP_MSG_TOO_BIG | MP_MSG_NOMEM))) return;
    if (p->lim.max_size && p->body.len + n > p->lim.max_size) {
        /* Keep exactly max_size octets, whatever the chunking of the input
         * (none if the limit was lowered below what is already stored). */
        if (p->body.len < p->lim.max_size &&
            mp_body_append(&p->body, s, p->lim.max_size - p->body.len) != 0)
            p->body_flags |= MP_MSG_NOMEM;
        p->body_flags |= MP_MSG_TOO_BIG;
        return;
    }
    if (mp_body_append(&p->body, s, n) != 0) p->body_flags |= MP_MSG_NOMEM;
}

static void line_done(mp_smtp_in *p, size_t wire_len)
{
    if (p->lim.text_line && wire_len > p->lim.text_line) p->body_flags |= MP_MSG_LONG_LINE;
    p->bol = 1;
    p->cur_line = 0;
}

/* DATA content: CRLF.CRLF ends it, and only when the CRLF before the dot is
 * a real CRLF too. A bare CR or LF ends a line for storage (it becomes CRLF)
 * but never takes part in the terminator: this closes SMTP smuggling. */
static int data_next(mp_smtp_in *p, mp_in_ev *ev)
{
    for (;;) {
        const char *s = p->buf + p->off;
        size_t avail = p->len - p->off;
        const char *nl, *cr;
        size_t scan, i;

        if (avail == 0) return MP_EV_NONE;
        if (p->bol) {
            if (s[0] == '.') {
                if (avail < 2) return MP_EV_NONE;
                if (s[1] == '\r') {
                    if (avail < 3) return MP_EV_NONE;
                    if (s[2] == '\n' && p->prev_crlf) {
                        p->off += 3;
                        p->mode = MP_MODE_CMD;
                        ev->type = MP_EV_DATA_END;
                        ev->flags = p->body_flags;
                        return MP_EV_DATA_END;
                    }
                }
                /* Transparency (RFC 5321 4.5.2): drop the leading dot. The
                 * text line limit (4.5.3.1.6) does not count it. */
                p->off += 1;
                p->cur_line = 0;
                p->bol = 0;
                continue;
            }
            p->bol = 0;
            p->cur_line = 0;
        }
        nl = memchr(s, '\n', avail);
        scan = nl ? (size_t)(nl - s) : avail;
        cr = memchr(s, '\r', scan);
        if (cr) {
            i = (size_t)(cr - s);
            if (i + 1 == avail) {
                /* Wait for the byte after the CR. */
                body_add(p, s, i);
                p->cur_line += i;
                p->off += i;
                return MP_EV_NONE;
            }
            if (s[i + 1] == '\n') {
                body_add(p, s, i + 2);
                p->prev_crlf = 1;
                p->off += i + 2;
                line_done(p, p->cur_line + i + 2);
            } else {
                body_add(p, s, i);
                body_add(p, "\r\n", 2);
                p->body_flags |= MP_MSG_BARE_CR;
                p->prev_crlf = 0;
                p->off += i + 1;
                line_done(p, p->cur_line + i + 1);
            }
            continue;
        }
        if (nl) {
            i = (size_t)(nl - s);
            body_add(p, s, i);
            body_add(p, "\r\n", 2);
            p->body_flags |= MP_MSG_BARE_LF;
            p->prev_crlf = 0;
            p->off += i + 1;
            line_done(p, p->cur_line + i + 1);
            continue;
        }
        body_add(p, s, avail);
        p->cur_line += avail;
        p->off += avail;
        return MP_EV_NONE;
    }
}

/* BDAT content is framed by length, so there is no terminator to protect;
 * line endings are still normalised to CRLF so that the stored message is
 * the same whichever way it arrived. */
static void bdat_add(mp_smtp_in *p, const char *s, size_t n)
{
    while (n > 0) {
        const char *nl, *cr;
        size_t scan, i;
        if (p->pending_cr) {
            p->pending_cr = 0;
            if (s[0] == '\n') {
                body_add(p, "\r\n", 2);
                line_done(p, p->cur_line + 2);
                s++;
                n--;
            } else {
                body_add(p, "\r\n", 2);
                p->body_flags |= MP_MSG_BARE_CR;
                line_done(p, p->cur_line + 1);
            }
            continue;
        }
        nl = memchr(s, '\n', n);
        scan = nl ? (size_t)(nl - s) : n;
        cr = memchr(s, '\r', scan);
        if (cr) {
            i = (size_t)(cr - s);
            body_add(p, s, i);
            p->cur_line += i;
            if (i + 1 == n) {
                p->pending_cr = 1;
                return;
            }
            if (s[i + 1] == '\n') {
                body_add(p, "\r\n", 2);
                line_done(p, p->cur_line + 2);
                s += i + 2;
                n -= i + 2;
            } else {
                body_add(p, "\r\n", 2);
                p->body_flags |= MP_MSG_BARE_CR;
                line_done(p, p->cur_line + 1);
                s += i + 1;
                n -= i + 1;
            }
            continue;
        }
        if (nl) {
            i = (size_t)(nl - s);
            body_add(p, s, i);
            body_add(p, "\r\n", 2);
            p->body_flags |= MP_MSG_BARE_LF;
            line_done(p, p->cur_line + i + 1);
            s += i + 1;
            n -= i + 1;
            continue;
        }
        body_add(p, s, n);
        p->cur_line += n;
        return;
    }
}

static int bdat_next(mp_smtp_in *p, mp_in_ev *ev)
{
    size_t avail = p->len - p->off;
    size_t n = avail;
    if (p->bdat_left < (uint64_t)n) n = (size_t)p->bdat_left;
    if (n > 0) {
        bdat_add(p, p->buf + p->off, n);
        p->off += n;
        p->bdat_left -= n;
    }
    if (p->bdat_left > 0) return MP_EV_NONE;
    p->mode = MP_MODE_CMD;
    ev->type = MP_EV_BDAT_END;
    ev->flags = p->body_flags;
    return MP_EV_BDAT_END;
}

static size_t cmd_limit(const mp_smtp_in *p, const char *verb)
{
    if (strcmp(verb, "MAIL") == 0 || strcmp(verb, "RCPT") == 0)
        return p->lim.cmd_line + MP_SMTP_PARAM_ALLOWANCE;
    if (strcmp(verb, "AUTH") == 0) return MP_SMTP_AUTH_LINE_MAX;
    return p->lim.cmd_line;
}

/* The verb of the command line s (n octets): its first word, upper-cased,
 * at most 16 octets kept (a longer one cannot match and is reported as
 * unknown), into p->verb. Returns where the verb ends. */
static size_t take_verb(mp_smtp_in *p, const char *s, size_t n)
{
    size_t i;
    for (i = 0; i < n && s[i] != ' ' && i < 16; i++) {
        char c = s[i];
        p->verb[i] = (c >= 'a' && c <= 'z') ? (char)(c - 32) : c;
    }
    p->verb[i] = '\0';
    return i;
}

static int line_next(mp_smtp_in *p, mp_in_ev *ev)
{
    const char *s = p->buf + p->off;
    size_t avail = p->len - p->off;
    const char *nl;
    size_t wire, n, i;
    unsigned flags = 0;
    size_t hard = MP_SMTP_AUTH_LINE_MAX;

    if (p->discarding) {
        nl = memchr(s, '\n', avail);
        if (nl == NULL) {
            p->discard_len += avail;
            p->off = p->len;
            return MP_EV_NONE;
        }
        wire = p->discard_len + (size_t)(nl - s) + 1;
        p->off += (size_t)(nl - s) + 1;
        p->discarding = 0;
        p->discard_len = 0;
        /* the verb was kept when the discarding began (a command line) */
        ev->verb = p->mode == MP_MODE_LINE ? NULL : p->verb;
        ev->verb_len = ev->verb ? strlen(p->verb) : 0;
        if (p->mode == MP_MODE_LINE) p->mode = MP_MODE_CMD;
        ev->type = MP_EV_TOO_LONG;
        ev->line_len = wire;
        ev->flags = 0;
        return MP_EV_TOO_LONG;
    }
    if (avail == 0) return MP_EV_NONE;
    if (hard < p->lim.cmd_line + MP_SMTP_PARAM_ALLOWANCE) hard = p->lim.cmd_line + MP_SMTP_PARAM_ALLOWANCE;
    nl = memchr(s, '\n', avail);
    if (nl == NULL) {
        if (avail > hard) {
            /* Skip to the end of this line, then answer it once. */
            if (p->mode != MP_MODE_LINE) take_verb(p, s, avail);
            p->discarding = 1;
            p->discard_len = avail;
            p->off = p->len;
        }
        return MP_EV_NONE;
    }
    wire = (size_t)(nl - s) + 1;
    n = wire - 1;
    if (n > 0 && s[n - 1] == '\r') n--;
    else flags |= MP_LINE_BARE_LF;
    if (memchr(s, '\r', n) || memchr(s, '\0', n)) flags |= MP_LINE_BAD_CHAR;
    p->off += wire;
    ev->flags = flags;
    ev->line_len = wire;

    if (p->mode == MP_MODE_LINE) {
        p->mode = MP_MODE_CMD;
        if (wire > MP_SMTP_AUTH_LINE_MAX) {
            ev->type = MP_EV_TOO_LONG;
            ev->verb = NULL;
            ev->verb_len = 0;
            return MP_EV_TOO_LONG;
        }
        ev->type = MP_EV_LINE;
        ev->arg = s;
        ev->arg_len = n;
        return MP_EV_LINE;
    }

    i = take_verb(p, s, n);
    ev->verb = p->verb;
    ev->verb_len = i;
    while (i < n && s[i] != ' ') i++; /* rest of an over-long verb */
    while (i < n && s[i] == ' ') i++;
    {
        size_t e = n;
        while (e > i && (s[e - 1] == ' ' || s[e - 1] == '\t')) e--;
        ev->arg = s + i;
        ev->arg_len = e - i;
    }
    if (wire > cmd_limit(p, p->verb)) {
        ev->type = MP_EV_TOO_LONG;
        return MP_EV_TOO_LONG;
    }
    ev->type = MP_EV_CMD;
    return MP_EV_CMD;
}

static int in_next(mp_smtp_in *p, mp_in_ev *ev);

int mp_in_next(mp_smtp_in *p, mp_in_ev *ev)
{
    int t = in_next(p, ev);
    /* Everything consumed: give the buffer back. Most sessions spend most
     * of their time idle between commands, and 4 KiB held by each was half
     * of an idle session's memory; a busy one pays a malloc per read. */
    if (t == MP_EV_NONE && p->off == p->len && p->buf != NULL) {
        free(p->buf);
        p->buf = NULL;
        p->cap = p->off = p->len = 0;
    }
    return t;
}

static int in_next(mp_smtp_in *p, mp_in_ev *ev)
{
    memset(ev, 0, sizeof *ev);
    /* No input buffer at all (never pushed, or freed by discard): only an
     * empty BDAT chunk can complete. */
    if (p->buf == NULL) {
        if (p->mode == MP_MODE_BDAT) return bdat_next(p, ev);
        return MP_EV_NONE;
    }
    switch (p->mode) {
    case MP_MODE_DATA: return data_next(p, ev);
    case MP_MODE_BDAT: return bdat_next(p, ev);
    default: return line_next(p, ev);
    }
}

/* ---- UTF-8 and xtext ------------------------------------------------------ */

/* Length of the well-formed UTF-8 sequence at s (1..4), 0 if malformed.
 * Rejects overlongs, surrogates and code points past U+10FFFF (RFC 3629). */
static size_t utf8_seq(const unsigned char *s, size_t n)
{
    unsigned c = s[0];
    if (c < 0x80) return 1;
    if (c >= 0xC2 && c <= 0xDF) {
        if (n < 2 || (s[1] & 0xC0) != 0x80) return 0;
        return 2;
    }
    if (c >= 0xE0 && c <= 0xEF) {
        if (n < 3 || (s[1] & 0xC0) != 0x80 || (s[2] & 0xC0) != 0x80) return 0;
        if (c == 0xE0 && s[1] < 0xA0) return 0;
        if (c == 0xED && s[1] > 0x9F) return 0;
        return 3;
    }
    if (c >= 0xF0 && c <= 0xF4) {
        if (n < 4 || (s[1] & 0xC0) != 0x80 || (s[2] & 0xC0) != 0x80 || (s[3] & 0xC0) != 0x80)
            return 0;
        if (c == 0xF0 && s[1] < 0x90) return 0;
        if (c == 0xF4 && s[1] > 0x8F) return 0;
        return 4;
    }
    return 0;
}

int mp_utf8_valid(const char *s, size_t n)
{
    size_t i = 0;
    while (i < n) {
        size_t k = utf8_seq((const unsigned char *)s + i, n - i);
        if (k == 0) return 0;
        i += k;
    }
    return 1;
}

static int is_hex_upper(int c) { return (c >= '0' && c <= '9') || (c >= 'A' && c <= 'F'); }
static int hex_value(int c) { return c <= '9' ? c - '0' : c - 'A' + 10; }
static int is_hex(int c) { return is_hex_upper(c) || (c >= 'a' && c <= 'f'); }
static int hex_value_ci(int c) { return c >= 'a' ? c - 'a' + 10 : hex_value(c); }

/* The octet that "+XX" at s stands for (two upper-case hex digits follow). */
static int xtext_octet(const char *s) { return hex_value(s[1]) * 16 + hex_value(s[2]); }

/* RFC 3461 4.2, 4.4: ENVID and ORCPT are printable US-ASCII once decoded. A
 * control character in one (+0D+0A) would end the DSN field that quotes it
 * and start a field of the sender's choosing. */
static int is_control(int c) { return c < 0x20 || c == 0x7F; }

/* 1 when the valid xtext s has a "+XX" that stands for a control character */
static int xtext_has_control(const char *s, size_t n)
{
    size_t i;
    for (i = 0; i + 2 < n; i++)
        if (s[i] == '+' && is_control(xtext_octet(s + i))) return 1;
    return 0;
}

int mp_xtext_valid(const char *s, size_t n)
{
    size_t i;
    for (i = 0; i < n; i++) {
        unsigned char c = (unsigned char)s[i];
        if (c == '+') {
            if (i + 2 >= n) return 0;
            if (!is_hex_upper(s[i + 1]) || !is_hex_upper(s[i + 2])) return 0;
            i += 2;
        } else if (c < 33 || c > 126 || c == '=') {
            return 0;
        }
    }
    return 1;
}

/* ---- paths --------------------------------------------------------------- */

static int is_alpha(int c) { return (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z'); }
static int is_digit(int c) { return c >= '0' && c <= '9'; }
static int is_atext(int c)
{
    return is_alpha(c) || is_digit(c) || (c && strchr("!#$%&'*+-/=?^_`{|}~", c) != NULL);
}

typedef struct cursor {
    const unsigned char *s;
    size_t n, i;
    int utf8;
} cursor;

static int cur_peek(const cursor *c) { return c->i < c->n ? c->s[c->i] : -1; }

/* Consume one UTF-8 non-ASCII character (RFC 6531 UTF8-non-ascii). */
static int take_utf8(cursor *c)
{
    size_t k;
    if (c->i >= c->n || c->s[c->i] < 0x80) return 0;
    k = utf8_seq(c->s + c->i, c->n - c->i);
    if (k < 2) return 0;
    c->i += k;
    c->utf8 = 1;
    return 1;
}

/* Dot-string = Atom *("." Atom) */
static int parse_dot_string(cursor *c)
{
    int atoms = 0;
    for (;;) {
        size_t start = c->i;
        for (;;) {
            int ch = cur_peek(c);
            if (ch < 0) break;
            if (ch >= 0x80) {
                if (!take_utf8(c)) return 0;
                continue;
            }
            if (!is_atext(ch)) break;
            c->i++;
        }
        if (c->i == start) return 0; /* empty atom: leading, trailing or double dot */
        atoms++;
        if (cur_peek(c) != '.') break;
        c->i++;
    }
    return atoms > 0;
}

/* Quoted-string = DQUOTE *QcontentSMTP DQUOTE */
static int parse_quoted(cursor *c)
{
    if (cur_peek(c) != '"') return 0;
    c->i++;
    for (;;) {
        int ch = cur_peek(c);
        if (ch < 0) return 0;
        if (ch == '"') { c->i++; return 1; }
        if (ch == '\\') {
            c->i++;
            ch = cur_peek(c);
            if (ch < 32 || ch > 126) return 0;
            c->i++;
            continue;
        }
        if (ch >= 0x80) {
            if (!take_utf8(c)) return 0;
            continue;
        }
        if (ch < 32 || ch > 126) return 0;
        c->i++;
    }
}

/* Domain = sub-domain *("." sub-domain); sub-domain = Let-dig [Ldh-str] or a
 * U-label. Labels of 1..63 octets, the whole at most 255. */
static int parse_domain(cursor *c)
{
    size_t start = c->i;
    for (;;) {
        size_t lstart = c->i;
        int last = -1;
        for (;;) {
            int ch = cur_peek(c);
            if (ch < 0) break;
            if (ch >= 0x80) {
                if (!take_utf8(c)) return 0;
                last = 'a';
                continue;
            }
            if (is_alpha(ch) || is_digit(ch)) { last = ch; c->i++; continue; }
            if (ch == '-') {
                if (c->i == lstart) return 0; /* label starts with '-' */
                last = ch;
                c->i++;
                continue;
            }
            break;
        }
        if (c->i == lstart || last == '-' || c->i - lstart > 63) return 0;
        if (cur_peek(c) != '.') break;
        c->i++;
    }
    return c->i - start <= 255;
}

static int valid_ipv4(const char *s, size_t n)
{
    int parts = 0;
    size_t i = 0;
    while (i < n) {
        unsigned v = 0;
        size_t d = 0;
        while (i < n && is_digit(s[i]) && d < 4) { v = v * 10 + (unsigned)(s[i] - '0'); i++; d++; }
        if (d == 0 || d > 3 || v > 255) return 0;
        parts++;
        if (i == n) break;
        if (s[i] != '.' || parts == 4) return 0;
        i++;
        if (i == n) return 0;
    }
    return parts == 4;
}

/* address-literal = "[" ( IPv4 / "IPv6:" IPv6 / tag ":" dcontent ) "]" */
static int parse_literal(cursor *c)
{
    size_t start, end;
    const char *body;
    size_t n;
    if (cur_peek(c) != '[') return 0;
    c->i++;
    start = c->i;
    while (c->i < c->n && c->s[c->i] != ']') {
        int ch = c->s[c->i];
        if (ch < 33 || ch > 126 || ch == '[' || ch == '\\') return 0;
        c->i++;
    }
    if (c->i >= c->n) return 0;
    end = c->i;
    c->i++; /* ] */
    body = (const char *)c->s + start;
    n = end - start;
    if (n == 0) return 0;
    if (n > 5 && strncasecmp(body, "IPv6:", 5) == 0) {
        char tmp[64];
        unsigned char addr[16];
        if (n - 5 >= sizeof tmp) return 0;
        memcpy(tmp, body + 5, n - 5);
        tmp[n - 5] = '\0';
        return inet_pton(AF_INET6, tmp, addr) == 1;
    }
    if (is_digit((unsigned char)body[0])) return valid_ipv4(body, n);
    {
        /* General-address-literal: Standardized-tag ":" 1*dcontent */
        size_t i = 0;
        while (i < n && (is_alpha(body[i]) || is_digit(body[i]) || body[i] == '-')) i++;
        if (i == 0 || body[i - 1] == '-' || i >= n - 1 || body[i] != ':') return 0;
        return 1;
    }
}

static int parse_params(cursor *c, mp_path *out)
{
    for (;;) {
        mp_param *pm;
        size_t ks;
        int ch;
        while (cur_peek(c) == ' ') c->i++;
        if (c->i >= c->n) return MP_PATH_OK;
        if (out->nparams >= MP_PATH_MAX_PARAMS) return MP_PATH_ERR_PARAMS;
        pm = &out->params[out->nparams];
        ks = c->i;
        ch = cur_peek(c);
        if (!(is_alpha(ch) || is_digit(ch))) return MP_PATH_ERR_PARAM;
        while ((ch = cur_peek(c)) >= 0 && (is_alpha(ch) || is_digit(ch) || ch == '-')) c->i++;
        pm->key = (const char *)c->s + ks;
        pm->key_len = c->i - ks;
        pm->value = NULL;
        pm->value_len = 0;
        if (cur_peek(c) == '=') {
            size_t vs;
            c->i++;
            vs = c->i;
            for (;;) {
                ch = cur_peek(c);
                if (ch < 0 || ch == ' ') break;
                if (ch >= 0x80) {
                    if (!take_utf8(c)) return MP_PATH_ERR_PARAM;
                    continue;
                }
                if (ch < 33 || ch > 126 || ch == '=') return MP_PATH_ERR_PARAM;
                c->i++;
            }
            if (c->i == vs) return MP_PATH_ERR_PARAM;
            pm->value = (const char *)c->s + vs;
            pm->value_len = c->i - vs;
        } else if (cur_peek(c) >= 0 && cur_peek(c) != ' ') {
            return MP_PATH_ERR_PARAM;
        }
        out->nparams++;
    }
}

int mp_parse_path(const char *arg, size_t len, int kind, mp_path *out,
                  char *buf, size_t bufsz, const char **detail)
{
    cursor c;
    const char *kw = kind == MP_PATH_MAIL ? "FROM:" : "TO:";
    size_t kwlen = strlen(kw);
    int bracket = 0;
    size_t lstart, lend, dstart = 0, dend = 0, pstart;
    int err;

    memset(out, 0, sizeof *out);
    *detail = "";
    if (len < kwlen || strncasecmp(arg, kw, kwlen) != 0) {
        *detail = kind == MP_PATH_MAIL ? "expected MAIL FROM:<address>" : "expected RCPT TO:<address>";
        return MP_PATH_ERR_SYNTAX;
    }
    c.s = (const unsigned char *)arg;
    c.n = len;
    c.i = kwlen;
    c.utf8 = 0;
    /* Tolerated: spaces after the colon, which many clients send. */
    while (cur_peek(&c) == ' ') c.i++;
    pstart = c.i;
    if (cur_peek(&c) == '<') { bracket = 1; c.i++; }

    if (bracket && cur_peek(&c) == '@') {
        /* Source route (RFC 5321 4.1.1.3, appendix C): parsed and ignored. */
        for (;;) {
            if (cur_peek(&c) != '@') goto bad_address;
            c.i++;
            if (!parse_domain(&c)) goto bad_address;
            if (cur_peek(&c) == ',') { c.i++; continue; }
            if (cur_peek(&c) == ':') { c.i++; break; }
            goto bad_address;
        }
        out->had_route = 1;
    }

    if (bracket && cur_peek(&c) == '>') {
        c.i++;
        if (kind == MP_PATH_RCPT) {
            *detail = "empty recipient address";
            return MP_PATH_ERR_ADDRESS;
        }
        if (out->had_route) goto bad_address;
        out->null_path = 1;
        out->mailbox = buf;
        out->mailbox_len = 0;
        buf[0] = '\0';
        out->local = out->domain = arg + c.i;
        goto params;
    }

    lstart = c.i;
    if (cur_peek(&c) == '"') {
        if (!parse_quoted(&c)) goto bad_address;
    } else if (!parse_dot_string(&c)) {
        goto bad_address;
    }
    lend = c.i;
    if (cur_peek(&c) == '@') {
        c.i++;
        dstart = c.i;
        if (cur_peek(&c) == '[') {
            if (!parse_literal(&c)) goto bad_address;
            out->literal = 1;
        } else if (!parse_domain(&c)) {
            goto bad_address;
        }
        dend = c.i;
    } else if (kind == MP_PATH_RCPT && bracket && !out->had_route && lend - lstart == 10 &&
               strncasecmp(arg + lstart, "postmaster", 10) == 0) {
        out->postmaster = 1;
        dstart = dend = c.i;
    } else {
        *detail = "address has no domain";
        return MP_PATH_ERR_ADDRESS;
    }
    if (bracket) {
        if (cur_peek(&c) != '>') goto bad_address;
        c.i++;
    } else if (cur_peek(&c) >= 0 && cur_peek(&c) != ' ') {
        goto bad_address;
    }
    if (c.i - pstart > MP_SMTP_PATH_MAX) {
        *detail = "address longer than 256 octets";
        return MP_PATH_ERR_TOO_LONG;
    }
    out->local = arg + lstart;
    out->local_len = lend - lstart;
    out->domain = arg + dstart;
    out->domain_len = dend - dstart;
    {
        size_t mlen = out->local_len + (out->postmaster ? 0 : 1 + out->domain_len);
        if (mlen + 1 > bufsz) {
            *detail = "address longer than 256 octets";
            return MP_PATH_ERR_TOO_LONG;
        }
        memcpy(buf, out->local, out->local_len);
        if (!out->postmaster) {
            buf[out->local_len] = '@';
            memcpy(buf + out->local_len + 1, out->domain, out->domain_len);
        }
        buf[mlen] = '\0';
        out->mailbox = buf;
        out->mailbox_len = mlen;
    }
    out->utf8 = c.utf8;

params:
    if (cur_peek(&c) >= 0 && cur_peek(&c) != ' ') goto bad_address;
    c.utf8 = 0;
    err = parse_params(&c, out);
    if (err == MP_PATH_ERR_PARAMS) *detail = "too many parameters";
    else if (err != MP_PATH_OK) *detail = "malformed parameter";
    return err;

bad_address:
    *detail = kind == MP_PATH_MAIL ? "bad sender address syntax" : "bad recipient address syntax";
    return MP_PATH_ERR_ADDRESS;
}

static int word_is(const char *v, size_t n, const char *w)
{
    return strlen(w) == n && strncasecmp(v, w, n) == 0;
}

#define KEY_IS(w) word_is(key, key_len, w)

const char *mp_check_param(const char *key, size_t key_len, const char *val, size_t val_len)
{
    size_t i;
    if (KEY_IS("SIZE")) {
        if (val == NULL || val_len == 0 || val_len > 20) return "SIZE needs a number";
        for (i = 0; i < val_len; i++)
            if (!is_digit(val[i])) return "SIZE needs a number";
        return NULL;
    }
    if (KEY_IS("BODY")) {
        if (val && (word_is(val, val_len, "7BIT") || word_is(val, val_len, "8BITMIME") ||
                    word_is(val, val_len, "BINARYMIME")))
            return NULL;
        return "BODY must be 7BIT or 8BITMIME";
    }
    if (KEY_IS("SMTPUTF8")) return val ? "SMTPUTF8 takes no value" : NULL;
    if (KEY_IS("RET")) {
        if (val && (word_is(val, val_len, "FULL") || word_is(val, val_len, "HDRS"))) return NULL;
        return "RET must be FULL or HDRS";
    }
    if (KEY_IS("ENVID")) {
        if (val == NULL || val_len > 100 || !mp_xtext_valid(val, val_len))
            return "ENVID must be xtext of at most 100 octets";
        if (xtext_has_control(val, val_len))
            return "ENVID must be printable US-ASCII: no control character (xtext +00 to +1F, +7F)";
        return NULL;
    }
    if (KEY_IS("AUTH")) {
        if (val == NULL) return "AUTH needs a value";
        if (word_is(val, val_len, "<>")) return NULL;
        if (!mp_xtext_valid(val, val_len)) return "AUTH must be xtext";
        return NULL;
    }
    if (KEY_IS("NOTIFY")) {
        unsigned seen = 0;
        size_t s = 0;
        if (val == NULL || val_len == 0) return "NOTIFY needs a value";
        if (word_is(val, val_len, "NEVER")) return NULL;
        for (i = 0; i <= val_len; i++) {
            if (i == val_len || val[i] == ',') {
                unsigned bit;
                if (word_is(val + s, i - s, "SUCCESS")) bit = 1;
                else if (word_is(val + s, i - s, "FAILURE")) bit = 2;
                else if (word_is(val + s, i - s, "DELAY")) bit = 4;
                else return "NOTIFY must be NEVER or a list of SUCCESS, FAILURE, DELAY";
                if (seen & bit) return "NOTIFY lists a keyword twice";
                seen |= bit;
                s = i + 1;
            }
        }
        return NULL;
    }
    if (KEY_IS("ORCPT")) {
        const char *semi;
        if (val == NULL) return "ORCPT needs addr-type;address";
        semi = memchr(val, ';', val_len);
        if (semi == NULL || semi == val) return "ORCPT needs addr-type;address";
        for (i = 0; val + i < semi; i++)
            if (!(is_alpha(val[i]) || is_digit(val[i]) || val[i] == '-')) return "ORCPT addr-type is not an atom";
        if (semi + 1 == val + val_len) return "ORCPT needs addr-type;address";
        /* utf-8-addr-xtext (RFC 6533) allows UTF-8 too; plain xtext otherwise. */
        {
            const char *x = semi + 1;
            size_t xn = (size_t)(val + val_len - x);
            for (i = 0; i < xn; i++) {
                unsigned char ch = (unsigned char)x[i];
                if (ch >= 0x80) {
                    size_t k = utf8_seq((const unsigned char *)x + i, xn - i);
                    if (k < 2) return "ORCPT address is not xtext";
                    i += k - 1;
                } else if (ch == '+') {
                    if (i + 2 >= xn || !is_hex_upper(x[i + 1]) || !is_hex_upper(x[i + 2]))
                        return "ORCPT address is not xtext";
                    if (is_control(xtext_octet(x + i)))
                        return "ORCPT address must be printable: no control character (xtext +00 to +1F, +7F)";
                    i += 2;
                } else if (ch == '\\') {
                    /* \x{HEXPOINT} of RFC 6533: 2 to 6 hex digits naming a
                     * Unicode scalar value, printable (no control character) */
                    size_t j = i + 3;
                    unsigned long cp = 0;
                    if (i + 2 >= xn || x[i + 1] != 'x' || x[i + 2] != '{') return "ORCPT address is not xtext";
                    while (j < xn && j - (i + 3) < 7 && is_hex(x[j])) {
                        cp = cp * 16 + (unsigned long)hex_value_ci(x[j]);
                        j++;
                    }
                    if (j >= xn || x[j] != '}' || j - (i + 3) < 2 || j - (i + 3) > 6 || cp > 0x10FFFF ||
                        (cp >= 0xD800 && cp <= 0xDFFF))
                        return "ORCPT address has a bad \\x{...} escape (RFC 6533: 2 to 6 hex digits of a Unicode "
                               "scalar value)";
                    if (cp < 0x20 || (cp >= 0x7F && cp < 0xA0))
                        return "ORCPT address must be printable: no control character (xtext +00 to +1F, +7F)";
                    i = j;
                } else if (ch < 33 || ch > 126 || ch == '=') {
                    return "ORCPT address is not xtext";
                }
            }
        }
        return NULL;
    }
    return NULL;
}

/* ---- reply parser ---------------------------------------------------------- */

struct mp_reply_parser {
    char *buf;
    size_t off, len, cap;
    /* the reply being assembled */
    int code;
    int nlines;
    char enhanced[16];
    char *text;
    size_t text_len, text_cap;
};

mp_reply_parser *mp_reply_new(void)
{
    return calloc(1, sizeof(mp_reply_parser));
}

void mp_reply_free(mp_reply_parser *r)
{
    if (r == NULL) return;
    free(r->buf);
    free(r->text);
    free(r);
}

size_t mp_reply_buffered(const mp_reply_parser *r) { return r->len - r->off; }

int mp_reply_push(mp_reply_parser *r, const char *data, size_t n)
{
    return input_append(&r->buf, &r->off, &r->len, &r->cap, 1024, data, n);
}

static int text_add(mp_reply_parser *r, const char *s, size_t n)
{
    if (r->text_len + n + 1 > r->text_cap) {
        size_t cap = r->text_cap ? r->text_cap : 256;
        char *nt;
        while (cap < r->text_len + n + 1) cap *= 2;
        nt = realloc(r->text, cap);
        if (nt == NULL) return -1;
        r->text = nt;
        r->text_cap = cap;
    }
    memcpy(r->text + r->text_len, s, n);
    r->text_len += n;
    r->text[r->text_len] = '\0';
    return 0;
}

/* Length of an enhanced status code "c.sss.ddd" at the start of s whose
 * class matches the reply's first digit (RFC 3463, RFC 2034), else 0. */
static size_t enhanced_len(const char *s, size_t n, int cls)
{
    size_t i = 0, d;
    if (n < 5 || s[0] != (char)('0' + cls) || s[1] != '.') return 0;
    i = 2;
    for (d = 0; i < n && is_digit(s[i]) && d < 4; i++, d++) ;
    if (d == 0 || d > 3 || i >= n || s[i] != '.') return 0;
    i++;
    for (d = 0; i < n && is_digit(s[i]) && d < 4; i++, d++) ;
    if (d == 0 || d > 3) return 0;
    if (i < n && s[i] != ' ') return 0;
    return i;
}

static int reply_fail(mp_reply_parser *r, mp_reply *out, const char *why)
{
    out->error = why;
    r->nlines = 0;
    r->code = 0;
    r->text_len = 0;
    return MP_REPLY_ERROR;
}

int mp_reply_next(mp_reply_parser *r, mp_reply *out)
{
    memset(out, 0, sizeof *out);
    for (;;) {
        const char *s = r->buf + r->off;
        size_t avail = r->len - r->off;
        const char *nl = avail ? memchr(s, '\n', avail) : NULL;
        size_t n, wire;
        int code, last;
        const char *t;
        size_t tn, el;

        if (nl == NULL) {
            if (avail > MP_REPLY_LINE_MAX) {
                r->off = r->len;
                return reply_fail(r, out, "reply line too long");
            }
            return MP_REPLY_NONE;
        }
        wire = (size_t)(nl - s) + 1;
        n = wire - 1;
        if (n > 0 && s[n - 1] == '\r') n--;
        r->off += wire;
        if (wire > MP_REPLY_LINE_MAX) return reply_fail(r, out, "reply line too long");
        if (n < 3 || s[0] < '2' || s[0] > '5' || !is_digit(s[1]) || !is_digit(s[2]))
            return reply_fail(r, out, "malformed reply code");
        if (n > 3 && s[3] != ' ' && s[3] != '-') return reply_fail(r, out, "malformed reply line");
        code = (s[0] - '0') * 100 + (s[1] - '0') * 10 + (s[2] - '0');
        last = (n == 3 || s[3] == ' ');
        if (r->nlines > 0 && code != r->code) return reply_fail(r, out, "reply code changed between lines");
        if (r->nlines >= MP_REPLY_LINES_MAX) return reply_fail(r, out, "reply has too many lines");
        t = n > 4 ? s + 4 : s + n;
        tn = n > 4 ? n - 4 : 0;
        el = enhanced_len(t, tn, s[0] - '0');
        if (r->nlines == 0) {
            r->code = code;
            r->text_len = 0;
            r->enhanced[0] = '\0';
            if (el > 0 && el < sizeof r->enhanced) {
                memcpy(r->enhanced, t, el);
                r->enhanced[el] = '\0';
            }
        } else if (text_add(r, "\n", 1) != 0) {
            return reply_fail(r, out, "out of memory");
        }
        /* Drop the enhanced code that RFC 2034 repeats on every line. */
        if (el > 0 && r->enhanced[0] && el == strlen(r->enhanced) && memcmp(t, r->enhanced, el) == 0) {
            t += el;
            tn -= el;
            if (tn > 0 && *t == ' ') { t++; tn--; }
        }
        if (text_add(r, t, tn) != 0) return reply_fail(r, out, "out of memory");
        r->nlines++;
        if (last) {
            out->code = r->code;
            memcpy(out->enhanced, r->enhanced, sizeof out->enhanced);
            out->text = r->text ? r->text : "";
            out->text_len = r->text_len;
            out->nlines = r->nlines;
            r->nlines = 0;
            return MP_REPLY_DONE;
        }
    }
}

/* ---- dot-stuffing ------------------------------------------------------------ */

void mp_stuff_init(mp_stuff *s)
{
    s->bol = 1;
    s->cr = 0;
}

/* The first CR or LF in p[i, n), or n: memchr finds the LF of the usual
 * CRLF, then the CR is looked for only before it. */
static size_t line_end(const char *p, size_t i, size_t n)
{
    const char *nl = memchr(p + i, '\n', n - i);
    size_t lim = nl ? (size_t)(nl - p) : n;
    const char *cr = memchr(p + i, '\r', lim - i);
    return cr ? (size_t)(cr - p) : lim;
}

/* Lines that need no change (CRLF-ended, not starting with a dot) are
 * copied in one run; the run breaks only for a dot to double or a bare CR
 * or LF to turn into CRLF. */
int mp_stuff_feed(mp_stuff *st, const char *p, size_t n, mp_body *out)
{
    size_t i = 0, start = 0; /* p[start, i) is still to copy as it is */
    while (i < n) {
        size_t j;
        if (st->cr) {
            /* a CR ended the last chunk: CRLF, whether an LF follows or not */
            st->cr = 0;
            if (mp_body_append(out, "\r\n", 2) != 0) return -1;
            st->bol = 1;
            if (p[i] == '\n') i++;
            start = i;
            continue;
        }
        if (st->bol && p[i] == '.') {
            if (mp_body_append(out, p + start, i - start) != 0) return -1;
            if (mp_body_append(out, ".", 1) != 0) return -1;
            start = i; /* the line's own dot follows in the run */
        }
        st->bol = 0;
        j = line_end(p, i, n);
        if (j == n) {
            i = n;
            break;
        }
        if (p[j] == '\r' && j + 1 < n && p[j + 1] == '\n') {
            i = j + 2; /* CRLF: stays in the run */
            st->bol = 1;
            continue;
        }
        if (mp_body_append(out, p + start, j - start) != 0) return -1;
        if (p[j] == '\r') {
            st->cr = 1; /* bare, or its LF is in the next chunk */
        } else {
            if (mp_body_append(out, "\r\n", 2) != 0) return -1;
            st->bol = 1;
        }
        i = start = j + 1;
    }
    return mp_body_append(out, p + start, i - start);
}

int mp_stuff_finish(mp_stuff *st, mp_body *out)
{
    if (st->cr || !st->bol) {
        if (mp_body_append(out, "\r\n", 2) != 0) return -1;
    }
    st->cr = 0;
    st->bol = 1;
    return mp_body_append(out, ".\r\n", 3);
}
