/*
 * SMTP engine: incremental command framing, DATA and BDAT framing with
 * dot-unstuffing, RFC 5321/6531 path and ESMTP parameter parsing, the reply
 * parser the client side uses, and dot-stuffing for sending.
 *
 * Pure C: no I/O, no Lua. The server input parser follows the
 * new / push / next / reset / free shape so it can be fuzzed and tested alone.
 */
#ifndef MOONPOST_SMTP_H
#define MOONPOST_SMTP_H

#include <stddef.h>
#include <stdint.h>

/* RFC 5321 4.5.3.1.4: 512 octets including CRLF for a command line. */
#ifndef MP_SMTP_CMD_LINE_MAX
#define MP_SMTP_CMD_LINE_MAX 512
#endif
/* MAIL and RCPT may carry ESMTP parameters that each extension says lengthen
 * the line: SIZE (+26, RFC 1870), ENVID (+100) and ORCPT (+500, RFC 3461),
 * AUTH= (+500, RFC 4954). One allowance covers any combination. */
#ifndef MP_SMTP_PARAM_ALLOWANCE
#define MP_SMTP_PARAM_ALLOWANCE 1024
#endif
/* RFC 4954 4: an AUTH command or SASL response line may be up to 12288 octets. */
#ifndef MP_SMTP_AUTH_LINE_MAX
#define MP_SMTP_AUTH_LINE_MAX 12288
#endif
/* RFC 5321 4.5.3.1.6: 1000 octets including CRLF for a line of text. */
#ifndef MP_SMTP_TEXT_LINE_MAX
#define MP_SMTP_TEXT_LINE_MAX 1000
#endif
/* Room kept in front of a message body so that a Received header can be
 * prepended without moving the body. */
#ifndef MP_SMTP_HEADROOM
#define MP_SMTP_HEADROOM 1024
#endif
/* RFC 5321 4.5.3.1.3: a path is at most 256 octets. */
#ifndef MP_SMTP_PATH_MAX
#define MP_SMTP_PATH_MAX 256
#endif

/* ---- message body buffer ---------------------------------------------- */

typedef struct mp_body {
    char *base;   /* allocation */
    size_t head;  /* offset of the first byte of the message */
    size_t len;   /* bytes of message from base + head */
    size_t cap;   /* bytes allocated at base */
} mp_body;

void mp_body_init(mp_body *b);
void mp_body_free(mp_body *b);
int mp_body_append(mp_body *b, const char *p, size_t n);   /* 0 ok, -1 ENOMEM */
int mp_body_prepend(mp_body *b, const char *p, size_t n);  /* 0 ok, -1 ENOMEM */
/* Drop n octets at offset off (off + n <= len). The octets before them move
 * up, so removing a header field costs the size of the header, not of the
 * message. */
void mp_body_remove(mp_body *b, size_t off, size_t n);
static inline const char *mp_body_data(const mp_body *b) { return b->base ? b->base + b->head : ""; }

/* ---- server-side input parser ----------------------------------------- */

enum mp_in_mode {
    MP_MODE_CMD = 0, /* command lines */
    MP_MODE_LINE,    /* one raw line (a SASL response), then back to commands */
    MP_MODE_DATA,    /* DATA content up to CRLF.CRLF */
    MP_MODE_BDAT     /* a BDAT chunk of a known length */
};

enum mp_in_event {
    MP_EV_NONE = 0,  /* need more input */
    MP_EV_CMD,       /* a command line: verb and argument */
    MP_EV_LINE,      /* a raw line (MP_MODE_LINE) */
    MP_EV_TOO_LONG,  /* a line over its limit was discarded */
    MP_EV_DATA_END,  /* DATA content ended with CRLF.CRLF */
    MP_EV_BDAT_END   /* the BDAT chunk has been read in full */
};

/* flags of an MP_EV_CMD / MP_EV_LINE */
#define MP_LINE_BARE_LF 0x01 /* ended by LF without CR */
#define MP_LINE_BAD_CHAR 0x02 /* holds a NUL or a bare CR */

/* Flags of a finished message (DATA or the chunks of a BDAT transaction).
 * A bare CR or LF in content is stored as CRLF and flagged; whether that
 * rejects the message is the session's policy. Content ends only on a
 * CRLF.CRLF whose first CRLF is real. */
#define MP_MSG_BARE_LF 0x01   /* content had a bare LF */
#define MP_MSG_BARE_CR 0x02   /* content had a bare CR */
#define MP_MSG_LONG_LINE 0x04 /* a line was longer than the text line limit */
#define MP_MSG_TOO_BIG 0x08   /* content exceeded max_size; the excess was dropped */
#define MP_MSG_NOMEM 0x10     /* memory ran out; the excess was dropped */

typedef struct mp_smtp_in mp_smtp_in;

typedef struct mp_in_ev {
    int type;          /* enum mp_in_event */
    const char *verb;  /* MP_EV_CMD, and MP_EV_TOO_LONG of a command line:
                        * upper-cased verb (NUL-terminated); else NULL */
    size_t verb_len;
    const char *arg;   /* MP_EV_CMD: argument; MP_EV_LINE: the line */
    size_t arg_len;
    unsigned flags;    /* MP_LINE_* for lines, MP_MSG_* for message ends */
    size_t line_len;   /* length of the line on the wire (MP_EV_TOO_LONG too) */
} mp_in_ev;

typedef struct mp_in_limits {
    size_t cmd_line;      /* max command line including CRLF (default 512) */
    size_t text_line;     /* max content line including CRLF (default 1000, 0 = none) */
    size_t max_size;      /* max message size in octets (0 = none) */
} mp_in_limits;

void mp_in_limits_default(mp_in_limits *l);

mp_smtp_in *mp_in_new(const mp_in_limits *limits);
void mp_in_free(mp_smtp_in *p);
/* Append input bytes. Returns 0, or -1 when out of memory. */
int mp_in_push(mp_smtp_in *p, const char *data, size_t n);
/* Next event; MP_EV_NONE when more input is needed. Pointers in *ev stay
 * valid until the next call on p. */
int mp_in_next(mp_smtp_in *p, mp_in_ev *ev);
/* Switch modes. Data and BDAT append to the current body. */
void mp_in_begin_data(mp_smtp_in *p);
void mp_in_begin_bdat(mp_smtp_in *p, uint64_t size);
void mp_in_begin_line(mp_smtp_in *p);
/* Drop unconsumed input (after STARTTLS, or before closing). */
void mp_in_discard(mp_smtp_in *p);
/* Drop the current body and its flags (RSET, a rejected BDAT transaction). */
void mp_in_reset_body(mp_smtp_in *p);
/* Move the current body out; p starts a fresh one. Returns the MP_MSG_* flags. */
unsigned mp_in_take_body(mp_smtp_in *p, mp_body *out);
size_t mp_in_buffered(const mp_smtp_in *p);
size_t mp_in_capacity(const mp_smtp_in *p);   /* bytes allocated for input */
size_t mp_in_body_size(const mp_smtp_in *p);   /* octets received for the body so far */
int mp_in_mode(const mp_smtp_in *p);
void mp_in_set_limits(mp_smtp_in *p, const mp_in_limits *limits);
const mp_in_limits *mp_in_get_limits(const mp_smtp_in *p);

/* ---- paths and parameters (RFC 5321 4.1.2, RFC 6531) -------------------- */

#define MP_PATH_MAX_PARAMS 16

typedef struct mp_param {
    const char *key; size_t key_len;     /* as sent; compare case-insensitively */
    const char *value; size_t value_len; /* value == NULL when there is no "=" */
} mp_param;

typedef struct mp_path {
    const char *mailbox; size_t mailbox_len;  /* local@domain, "" for <> */
    const char *local; size_t local_len;      /* local part as sent (quotes kept) */
    const char *domain; size_t domain_len;    /* domain or [literal]; "" for <> and <postmaster> */
    int null_path;     /* "<>" */
    int postmaster;    /* "<postmaster>" without a domain (RCPT only) */
    int utf8;          /* the path holds non-ASCII (needs SMTPUTF8) */
    int literal;       /* the domain is an address literal */
    int had_route;     /* a source route was given (and ignored) */
    int nparams;
    mp_param params[MP_PATH_MAX_PARAMS];
} mp_path;

enum mp_path_kind { MP_PATH_MAIL = 0, MP_PATH_RCPT = 1 };

/* Error classes of mp_parse_path; mp_path_error_reply() gives the reply. */
enum mp_path_err {
    MP_PATH_OK = 0,
    MP_PATH_ERR_SYNTAX,   /* missing FROM:/TO: or junk: 501 5.5.2 */
    MP_PATH_ERR_ADDRESS,  /* bad mailbox: 553 5.1.7 (MAIL) / 553 5.1.3 (RCPT) */
    MP_PATH_ERR_TOO_LONG, /* path over 256 octets: 553 same codes */
    MP_PATH_ERR_PARAM,    /* malformed parameter: 501 5.5.4 */
    MP_PATH_ERR_PARAMS    /* too many parameters: 501 5.5.4 */
};

/* Parse "FROM:<path> params" (kind MAIL) or "TO:<path> params" (RCPT).
 * Pointers in *out point into arg, except mailbox which points into buf
 * (size bufsz, at least MP_SMTP_PATH_MAX + 1). Returns enum mp_path_err and
 * sets *detail to a short static description. */
int mp_parse_path(const char *arg, size_t len, int kind, mp_path *out,
                  char *buf, size_t bufsz, const char **detail);

/* Validate an ESMTP parameter value that the engine knows. Returns NULL when
 * valid, else a short static description. Unknown keywords return NULL. */
const char *mp_check_param(const char *key, size_t key_len, const char *val, size_t val_len);

/* xtext (RFC 3461 4): returns 1 when s is valid xtext. */
int mp_xtext_valid(const char *s, size_t n);
/* UTF-8 well-formedness (RFC 3629). */
int mp_utf8_valid(const char *s, size_t n);

/* ---- reply parser (client side) ---------------------------------------- */

#ifndef MP_REPLY_LINE_MAX
#define MP_REPLY_LINE_MAX 4096
#endif
#ifndef MP_REPLY_LINES_MAX
#define MP_REPLY_LINES_MAX 256
#endif

typedef struct mp_reply_parser mp_reply_parser;

enum mp_reply_event { MP_REPLY_NONE = 0, MP_REPLY_DONE, MP_REPLY_ERROR };

typedef struct mp_reply {
    int code;              /* 200..599 */
    char enhanced[16];     /* "x.y.z" or "" */
    const char *text;      /* lines joined by "\n", without codes; valid until next call */
    size_t text_len;
    int nlines;
    const char *error;     /* MP_REPLY_ERROR: a short description */
} mp_reply;

mp_reply_parser *mp_reply_new(void);
void mp_reply_free(mp_reply_parser *r);
int mp_reply_push(mp_reply_parser *r, const char *data, size_t n);
int mp_reply_next(mp_reply_parser *r, mp_reply *out);
size_t mp_reply_buffered(const mp_reply_parser *r);

/* ---- dot-stuffing (client side) ---------------------------------------- */

/* Incremental: feed the message in any chunks; output is appended to out.
 * Lines end in CRLF on output (a bare CR or LF becomes CRLF); a line starting
 * with "." gets another. mp_stuff_finish() ends the last line and appends
 * ".\r\n". State starts at 0. */
typedef struct mp_stuff { int bol; int cr; } mp_stuff;
void mp_stuff_init(mp_stuff *s);
int mp_stuff_feed(mp_stuff *s, const char *p, size_t n, mp_body *out);
int mp_stuff_finish(mp_stuff *s, mp_body *out);

#endif
