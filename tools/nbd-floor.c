/*
 * nbd-floor: the least an NBD server can do for a read, as a yardstick for tools/bench.py.
 *
 * It serves one file read-only over a Unix socket, with no RAID, no checksums and no request
 * limits: whatever latency or IOPS it reaches is what the client, the socket and the disk allow,
 * and a target beyond it is beyond any server on that rig. Two modes:
 *
 *   sync   one blocking pread (O_DIRECT) per request, then one writev of the reply: the shortest
 *          path for a single request in flight (QD1). The disk's completion wakes the thread
 *          that waits for it.
 *   uring  one thread, one io_uring for the socket and the file: requests are parsed as they
 *          arrive, every read goes to the disk at once, each reply is written as soon as its read
 *          completes. Nothing limits the requests in flight but the client.
 *
 *   gcc -O2 -o nbd-floor tools/nbd-floor.c -luring     (Debian: gcc liburing-dev)
 *   nbd-floor sync|uring SOCKET FILE
 *
 * Connections are served one after another. It is a measuring tool, not a server to use:
 * writes are refused (the export is read-only) and any malformed request ends the connection.
 */
#define _GNU_SOURCE
#include <endian.h>
#include <errno.h>
#include <fcntl.h>
#include <liburing.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <sys/un.h>
#include <unistd.h>

#define REQUEST_MAGIC 0x25609513u
#define SIMPLE_REPLY_MAGIC 0x67446698u
#define OPTION_REPLY_MAGIC 0x3e889045565a9ULL
#define CMD_READ 0
#define CMD_DISC 2
#define MAX_READ (1u << 20)
#define EIO_CODE 5
#define EPERM_CODE 1

static int read_full(int s, void *b, size_t n) {
    for (size_t got = 0; got < n;) {
        ssize_t r = read(s, (char *)b + got, n - got);
        if (r <= 0) return -1;
        got += (size_t)r;
    }
    return 0;
}

static int write_full(int s, const void *b, size_t n) {
    for (size_t put = 0; put < n;) {
        ssize_t r = write(s, (const char *)b + put, n - put);
        if (r <= 0) return -1;
        put += (size_t)r;
    }
    return 0;
}

static void put16(uint8_t *p, uint16_t v) { v = htobe16(v); memcpy(p, &v, 2); }
static void put32(uint8_t *p, uint32_t v) { v = htobe32(v); memcpy(p, &v, 4); }
static void put64(uint8_t *p, uint64_t v) { v = htobe64(v); memcpy(p, &v, 8); }
static uint16_t get16(const uint8_t *p) { uint16_t v; memcpy(&v, p, 2); return be16toh(v); }
static uint32_t get32(const uint8_t *p) { uint32_t v; memcpy(&v, p, 4); return be32toh(v); }
static uint64_t get64(const uint8_t *p) { uint64_t v; memcpy(&v, p, 8); return be64toh(v); }

static int option_reply(int s, uint32_t opt, uint32_t type, const void *data, uint32_t len) {
    uint8_t h[20];
    put64(h, OPTION_REPLY_MAGIC);
    put32(h + 8, opt);
    put32(h + 12, type);
    put32(h + 16, len);
    return write_full(s, h, sizeof h) || (len && write_full(s, data, len)) ? -1 : 0;
}

/* Fixed newstyle handshake; answers NBD_OPT_INFO/GO and EXPORT_NAME, refuses every other option
 * (structured replies among them, so replies stay simple). Returns 0 once in transmission. */
static int handshake(int s, uint64_t size) {
    const uint16_t tflags = 1 /* HAS_FLAGS */ | 2 /* READ_ONLY */;
    uint8_t hello[18];
    memcpy(hello, "NBDMAGICIHAVEOPT", 16);
    put16(hello + 16, 1 /* FIXED_NEWSTYLE */ | 2 /* NO_ZEROES */);
    uint8_t client_flags[4];
    if (write_full(s, hello, sizeof hello) || read_full(s, client_flags, 4)) return -1;
    for (;;) {
        uint8_t h[16];
        if (read_full(s, h, sizeof h) || memcmp(h, "IHAVEOPT", 8)) return -1;
        uint32_t opt = get32(h + 8), len = get32(h + 12);
        if (len > 65536) return -1;
        char data[65536];
        if (len && read_full(s, data, len)) return -1;
        if (opt == 1 /* EXPORT_NAME */) {
            uint8_t r[10];
            put64(r, size);
            put16(r + 8, tflags);
            return write_full(s, r, sizeof r);
        }
        if (opt == 6 /* INFO */ || opt == 7 /* GO */) {
            uint8_t info[12];
            put16(info, 0 /* NBD_INFO_EXPORT */);
            put64(info + 2, size);
            put16(info + 10, tflags);
            if (option_reply(s, opt, 3 /* REP_INFO */, info, sizeof info) || option_reply(s, opt, 1 /* REP_ACK */, NULL, 0)) return -1;
            if (opt == 7) return 0;
        } else if (opt == 2 /* ABORT */) {
            option_reply(s, opt, 1, NULL, 0);
            return -1;
        } else if (option_reply(s, opt, 0x80000001u /* ERR_UNSUP */, NULL, 0)) {
            return -1;
        }
    }
}

struct request {
    uint16_t type;
    uint64_t cookie, offset;
    uint32_t len;
};

static int parse_request(const uint8_t *q, struct request *r) {
    if (get32(q) != REQUEST_MAGIC) return -1;
    r->type = get16(q + 6);
    memcpy(&r->cookie, q + 8, 8); /* echoed back as sent */
    r->offset = get64(q + 16);
    r->len = get32(q + 24);
    return 0;
}

static int send_reply(int s, uint64_t cookie, uint32_t error, const void *data, size_t len) {
    uint8_t h[16];
    put32(h, SIMPLE_REPLY_MAGIC);
    put32(h + 4, error);
    memcpy(h + 8, &cookie, 8);
    struct iovec iov[2] = {{h, sizeof h}, {(void *)data, error ? 0 : len}};
    size_t want = sizeof h + iov[1].iov_len;
    ssize_t put = writev(s, iov, 2);
    if (put < 0) return -1;
    if ((size_t)put < want) { /* a short write: finish it plainly */
        size_t done = (size_t)put;
        if (done < sizeof h) {
            if (write_full(s, h + done, sizeof h - done)) return -1;
            done = sizeof h;
        }
        return write_full(s, (const char *)data + (done - sizeof h), want - done);
    }
    return 0;
}

static void serve_sync(int s, int fd, uint64_t size) {
    void *buf;
    if (posix_memalign(&buf, 4096, MAX_READ)) return;
    for (;;) {
        uint8_t q[28];
        struct request r;
        if (read_full(s, q, sizeof q) || parse_request(q, &r) || r.type == CMD_DISC) break;
        if (r.type != CMD_READ) {
            if (send_reply(s, r.cookie, EPERM_CODE, NULL, 0)) break;
            continue;
        }
        if (r.len > MAX_READ || r.offset > size || r.len > size - r.offset) break;
        uint32_t err = pread(fd, buf, r.len, (off_t)r.offset) == (ssize_t)r.len ? 0 : EIO_CODE;
        if (send_reply(s, r.cookie, err, buf, r.len)) break;
    }
    free(buf);
}

#define SLOTS 256
#define RECV_TAG UINT64_MAX

static void serve_uring(int s, int fd, uint64_t size) {
    struct io_uring ring;
    if (io_uring_queue_init(2 * SLOTS, &ring, 0)) return;
    static void *bufs[SLOTS];
    static uint64_t cookies[SLOTS];
    int free_slots[SLOTS], nfree = 0, inflight = 0;
    for (int i = 0; i < SLOTS; i++) {
        if (!bufs[i] && posix_memalign(&bufs[i], 4096, MAX_READ)) goto out;
        free_slots[nfree++] = i;
    }
    static uint8_t in[1 << 16];
    size_t have = 0;
    int open = 1;
    struct io_uring_sqe *sqe = io_uring_get_sqe(&ring);
    io_uring_prep_recv(sqe, s, in, sizeof in, 0);
    io_uring_sqe_set_data64(sqe, RECV_TAG);
    while (open || inflight) {
        if (io_uring_submit_and_wait(&ring, 1) < 0 && errno != EINTR) break;
        struct io_uring_cqe *cqe;
        unsigned head, seen = 0;
        io_uring_for_each_cqe(&ring, head, cqe) {
            seen++;
            if (cqe->user_data != RECV_TAG) { /* a read finished: answer it now */
                int slot = (int)cqe->user_data;
                uint32_t err = cqe->res < 0 ? EIO_CODE : 0;
                if (send_reply(s, cookies[slot], err, bufs[slot], cqe->res > 0 ? (size_t)cqe->res : 0)) open = 0;
                free_slots[nfree++] = slot;
                inflight--;
                continue;
            }
            if (cqe->res <= 0) { open = 0; continue; }
            have += (size_t)cqe->res;
            size_t at = 0;
            while (open && have - at >= 28) {
                struct request r;
                if (parse_request(in + at, &r) || r.type == CMD_DISC) { open = 0; break; }
                at += 28;
                if (r.type != CMD_READ) {
                    if (send_reply(s, r.cookie, EPERM_CODE, NULL, 0)) open = 0;
                    continue;
                }
                if (r.len > MAX_READ || r.offset > size || r.len > size - r.offset || nfree == 0) { open = 0; break; }
                int slot = free_slots[--nfree];
                cookies[slot] = r.cookie;
                struct io_uring_sqe *rd = io_uring_get_sqe(&ring);
                io_uring_prep_read(rd, fd, bufs[slot], r.len, r.offset);
                io_uring_sqe_set_data64(rd, (uint64_t)slot);
                inflight++;
            }
            memmove(in, in + at, have - at);
            have -= at;
            if (open) {
                struct io_uring_sqe *next = io_uring_get_sqe(&ring);
                io_uring_prep_recv(next, s, in + have, sizeof in - have, 0);
                io_uring_sqe_set_data64(next, RECV_TAG);
            }
        }
        io_uring_cq_advance(&ring, seen);
    }
out:
    io_uring_queue_exit(&ring);
}

int main(int argc, char **argv) {
    if (argc != 4 || (strcmp(argv[1], "sync") && strcmp(argv[1], "uring"))) {
        fprintf(stderr, "usage: nbd-floor sync|uring SOCKET FILE\n");
        return 2;
    }
    int fd = open(argv[3], O_RDONLY | O_DIRECT);
    struct stat st;
    if (fd < 0 || fstat(fd, &st)) {
        perror(argv[3]);
        return 1;
    }
    int l = socket(AF_UNIX, SOCK_STREAM, 0);
    struct sockaddr_un a = {.sun_family = AF_UNIX};
    if (strlen(argv[2]) >= sizeof a.sun_path) {
        fprintf(stderr, "nbd-floor: socket path too long\n");
        return 2;
    }
    strcpy(a.sun_path, argv[2]);
    unlink(argv[2]);
    if (l < 0 || bind(l, (struct sockaddr *)&a, sizeof a) || listen(l, 8)) {
        perror(argv[2]);
        return 1;
    }
    for (;;) {
        int s = accept(l, NULL, NULL);
        if (s < 0) continue;
        if (handshake(s, (uint64_t)st.st_size) == 0) {
            if (argv[1][0] == 's') serve_sync(s, fd, (uint64_t)st.st_size);
            else serve_uring(s, fd, (uint64_t)st.st_size);
        }
        close(s);
    }
}
