/*
 * ofi_shim.c: the few libfabric calls the `ofi` back end needs, as plain (non-inline)
 * functions that Rust can call.
 *
 * Most fi_* calls are `static inline` in the headers and dispatch through the ops tables
 * of the objects (fid), so they need no symbol of libfabric.so. The handful of exported
 * functions (fi_getinfo, fi_freeinfo, fi_dupinfo, fi_fabric, fi_strerror, fi_version) are
 * resolved at run time with dlopen/dlsym (dshim_load), so that this object, and everything
 * linking it, neither links against nor needs libfabric until an `ofi` endpoint is opened.
 * Nothing here may call an exported fi_* function directly: `nm` of the object must show
 * no undefined fi_* symbol (build.rs checks this when `nm` is available).
 *
 * Error convention: functions return 0 or a positive count on success and a negative
 * libfabric error code (-FI_E...) on failure; -FI_EAGAIN means "progress, then retry".
 */
#include <dlfcn.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <rdma/fabric.h>
#include <rdma/fi_cm.h>
#include <rdma/fi_domain.h>
#include <rdma/fi_endpoint.h>
#include <rdma/fi_eq.h>
#include <rdma/fi_errno.h>
#include <rdma/fi_rma.h>

/* ---- run-time loaded symbols ------------------------------------------------------- */

static void *lib;
static int (*p_getinfo)(uint32_t, const char *, const char *, uint64_t, const struct fi_info *,
                        struct fi_info **);
static void (*p_freeinfo)(struct fi_info *);
static struct fi_info *(*p_dupinfo)(const struct fi_info *);
static int (*p_fabric)(struct fi_fabric_attr *, struct fid_fabric **, void *);
static const char *(*p_strerror)(int);
static uint32_t (*p_version)(void);

/* Loads libfabric from `path` (once per process; later calls return the first result).
 * Returns 0, or -1 with a reason in `err`. Not thread-safe: the caller serializes. */
int dshim_load(const char *path, char *err, size_t errlen)
{
    if (lib)
        return 0;
    void *h = dlopen(path, RTLD_NOW | RTLD_LOCAL);
    if (!h) {
        const char *e = dlerror();
        snprintf(err, errlen, "%s", e ? e : "dlopen failed");
        return -1;
    }
    const char *missing = NULL;
#define LOAD(var, name)                                                                       \
    do {                                                                                      \
        *(void **)&var = dlsym(h, name);                                                      \
        if (!var && !missing)                                                                 \
            missing = name;                                                                   \
    } while (0)
    LOAD(p_getinfo, "fi_getinfo");
    LOAD(p_freeinfo, "fi_freeinfo");
    LOAD(p_dupinfo, "fi_dupinfo");
    LOAD(p_fabric, "fi_fabric");
    LOAD(p_strerror, "fi_strerror");
    LOAD(p_version, "fi_version");
#undef LOAD
    if (missing) {
        snprintf(err, errlen, "%s: symbol %s not found", path, missing);
        dlclose(h);
        return -1;
    }
    lib = h;
    return 0;
}

/* The loaded library's version (FI_VERSION(major, minor)); 0 when not loaded. */
uint32_t dshim_version(void) { return lib ? p_version() : 0; }

/* The version of the headers this shim was compiled with. */
uint32_t dshim_header_version(void) { return FI_VERSION(FI_MAJOR_VERSION, FI_MINOR_VERSION); }

/* Text of a libfabric error code (positive). */
const char *dshim_strerror(int e) { return lib ? p_strerror(e) : "libfabric not loaded"; }

/* ---- one endpoint with everything it needs ------------------------------------------- */

struct dshim_ep {
    struct fi_info *info;
    struct fid_fabric *fabric;
    struct fid_domain *domain;
    struct fid_cq *cq;
    struct fid_av *av;
    struct fid_ep *ep;
    int wait_fd; /* the CQ's wait descriptor (FI_WAIT_FD), or -1 */
};

/* Attributes of an opened endpoint the Rust side needs. */
struct dshim_attrs {
    char prov[64];
    char fabric[64];
    uint64_t mr_mode;
    uint64_t inject_size;
    uint64_t max_msg_size;
    uint64_t tx_size;
    uint64_t rx_size;
    uint64_t mr_key_size;
    uint64_t msg_order;
    uint64_t mode;
    int wait_fd;
};

/* One completion (FI_CQ_FORMAT_MSG). */
struct dshim_cqe {
    void *ctx;
    uint64_t flags;
    uint64_t len;
};

/* One error completion. */
struct dshim_cqerr {
    void *ctx;
    uint64_t flags;
    int err;
    int prov_errno;
};

static void ep_free(struct dshim_ep *e)
{
    if (e->ep)
        fi_close(&e->ep->fid);
    if (e->av)
        fi_close(&e->av->fid);
    if (e->cq)
        fi_close(&e->cq->fid);
    if (e->domain)
        fi_close(&e->domain->fid);
    if (e->fabric)
        fi_close(&e->fabric->fid);
    if (e->info)
        p_freeinfo(e->info);
    free(e);
}

#define CHECK(call, what)                                                                      \
    do {                                                                                       \
        int r_ = (int)(call);                                                                  \
        if (r_) {                                                                              \
            snprintf(err, errlen, "%s: %s", what, p_strerror(-r_));                            \
            ep_free(e);                                                                        \
            return r_ < 0 ? r_ : -FI_EOTHER;                                                   \
        }                                                                                      \
    } while (0)

/* Opens an RDM endpoint of provider `prov` (e.g. "tcp;ofi_rxm", "shm"), bound to `node`
 * (an IP address for IP providers; NULL for shm), with FI_MSG | FI_RMA, ordered sends, a
 * completion queue (with a wait object when the provider has one) and a table AV. */
int dshim_open(const char *prov, const char *node, struct dshim_ep **out, char *err,
               size_t errlen)
{
    if (!lib) {
        snprintf(err, errlen, "libfabric not loaded");
        return -FI_ENOSYS;
    }
    struct dshim_ep *e = calloc(1, sizeof *e);
    if (!e) {
        snprintf(err, errlen, "out of memory");
        return -FI_ENOMEM;
    }
    struct fi_info *hints = p_dupinfo(NULL);
    if (!hints) {
        snprintf(err, errlen, "fi_allocinfo failed");
        free(e);
        return -FI_ENOMEM;
    }
    hints->ep_attr->type = FI_EP_RDM;
    hints->caps = FI_MSG | FI_RMA | FI_READ | FI_REMOTE_READ;
    hints->mode = FI_CONTEXT | FI_CONTEXT2;
    hints->domain_attr->mr_mode = FI_MR_LOCAL | FI_MR_VIRT_ADDR | FI_MR_ALLOCATED |
                                  FI_MR_PROV_KEY | FI_MR_ENDPOINT;
    hints->domain_attr->threading = FI_THREAD_SAFE;
    hints->tx_attr->msg_order = FI_ORDER_SAS;
    hints->rx_attr->msg_order = FI_ORDER_SAS;
    hints->addr_format = FI_FORMAT_UNSPEC;
    /* fi_freeinfo frees these strings. */
    hints->fabric_attr->prov_name = strdup(prov);
    uint32_t ver = FI_VERSION(FI_MAJOR_VERSION, FI_MINOR_VERSION);
    if (p_version() < ver)
        ver = p_version();
    int r = p_getinfo(ver, node, NULL, 0, hints, &e->info);
    p_freeinfo(hints);
    if (r) {
        snprintf(err, errlen, "fi_getinfo(%s): %s", prov, p_strerror(-r));
        e->info = NULL;
        ep_free(e);
        return r;
    }
    if (!e->info) {
        snprintf(err, errlen, "fi_getinfo(%s): no provider", prov);
        ep_free(e);
        return -FI_ENODATA;
    }
    /* Take only the first (best) match: free the rest of the list. */
    if (e->info->next) {
        p_freeinfo(e->info->next);
        e->info->next = NULL;
    }
    CHECK(p_fabric(e->info->fabric_attr, &e->fabric, NULL), "fi_fabric");
    CHECK(fi_domain(e->fabric, e->info, &e->domain, NULL), "fi_domain");
    struct fi_cq_attr ca;
    memset(&ca, 0, sizeof ca);
    ca.format = FI_CQ_FORMAT_MSG;
    ca.size = e->info->tx_attr->size + e->info->rx_attr->size;
    /* A descriptor to poll() when idle (tcp, verbs). Providers without one (shm only has
     * FI_WAIT_YIELD, a busy loop) are polled without a wait object. */
    e->wait_fd = -1;
    ca.wait_obj = FI_WAIT_FD;
    if (fi_cq_open(e->domain, &ca, &e->cq, NULL) == 0) {
        int fd = -1;
        if (fi_control(&e->cq->fid, FI_GETWAIT, &fd) == 0 && fd >= 0) {
            e->wait_fd = fd;
        } else {
            fi_close(&e->cq->fid);
            e->cq = NULL;
        }
    }
    if (!e->cq) {
        ca.wait_obj = FI_WAIT_NONE;
        CHECK(fi_cq_open(e->domain, &ca, &e->cq, NULL), "fi_cq_open");
    }
    struct fi_av_attr aa;
    memset(&aa, 0, sizeof aa);
    aa.type = FI_AV_TABLE;
    CHECK(fi_av_open(e->domain, &aa, &e->av, NULL), "fi_av_open");
    CHECK(fi_endpoint(e->domain, e->info, &e->ep, NULL), "fi_endpoint");
    CHECK(fi_ep_bind(e->ep, &e->cq->fid, FI_TRANSMIT | FI_RECV), "fi_ep_bind(cq)");
    CHECK(fi_ep_bind(e->ep, &e->av->fid, 0), "fi_ep_bind(av)");
    CHECK(fi_enable(e->ep), "fi_enable");
    *out = e;
    return 0;
}

void dshim_attrs(const struct dshim_ep *e, struct dshim_attrs *a)
{
    memset(a, 0, sizeof *a);
    snprintf(a->prov, sizeof a->prov, "%s",
             e->info->fabric_attr->prov_name ? e->info->fabric_attr->prov_name : "");
    snprintf(a->fabric, sizeof a->fabric, "%s",
             e->info->fabric_attr->name ? e->info->fabric_attr->name : "");
    a->mr_mode = (uint64_t)e->info->domain_attr->mr_mode;
    a->inject_size = e->info->tx_attr->inject_size;
    a->max_msg_size = e->info->ep_attr->max_msg_size;
    a->tx_size = e->info->tx_attr->size;
    a->rx_size = e->info->rx_attr->size;
    a->mr_key_size = e->info->domain_attr->mr_key_size;
    a->msg_order = e->info->tx_attr->msg_order;
    a->mode = e->info->mode;
    a->wait_fd = e->wait_fd;
}

/* Closes the endpoint proper: pending operations are cancelled, and after this returns the
 * provider touches no buffer or context of them any more. Idempotent. */
void dshim_close_ep(struct dshim_ep *e)
{
    if (e->ep) {
        fi_close(&e->ep->fid);
        e->ep = NULL;
    }
}

/* Closes the endpoint (if still open) and everything it owns; frees `e`. Memory regions
 * must be closed before. */
void dshim_close(struct dshim_ep *e) { ep_free(e); }

/* This endpoint's address (to be inserted in peers' AVs). *len: buffer size in, length out. */
int dshim_getname(struct dshim_ep *e, void *buf, size_t *len)
{
    return fi_getname(&e->ep->fid, buf, len);
}

/* Inserts one peer address; *fi_addr receives its handle. */
int dshim_av_insert(struct dshim_ep *e, const void *addr, uint64_t *fi_addr)
{
    fi_addr_t a = FI_ADDR_NOTAVAIL;
    int n = fi_av_insert(e->av, addr, 1, &a, 0, NULL);
    if (n != 1)
        return n < 0 ? n : -FI_EINVAL;
    *fi_addr = a;
    return 0;
}

/* Registers [buf, buf+len) with `access`, asking for `key` (ignored with FI_MR_PROV_KEY).
 * With FI_MR_ENDPOINT the region is bound to the endpoint and enabled. */
int dshim_mr_reg(struct dshim_ep *e, void *buf, size_t len, uint64_t access, uint64_t key,
                 struct fid_mr **mr, void **desc, uint64_t *key_out)
{
    struct fid_mr *m = NULL;
    int r = fi_mr_reg(e->domain, buf, len, access, 0, key, 0, &m, NULL);
    if (r)
        return r;
    if (e->info->domain_attr->mr_mode & FI_MR_ENDPOINT) {
        r = fi_mr_bind(m, &e->ep->fid, 0);
        if (!r)
            r = fi_mr_enable(m);
        if (r) {
            fi_close(&m->fid);
            return r;
        }
    }
    *mr = m;
    *desc = fi_mr_desc(m);
    *key_out = fi_mr_key(m);
    return 0;
}

int dshim_mr_close(struct fid_mr *mr) { return fi_close(&mr->fid); }

ssize_t dshim_send(struct dshim_ep *e, const void *buf, size_t len, void *desc, uint64_t dest,
                   void *ctx)
{
    return fi_send(e->ep, buf, len, desc, dest, ctx);
}

ssize_t dshim_inject(struct dshim_ep *e, const void *buf, size_t len, uint64_t dest)
{
    return fi_inject(e->ep, buf, len, dest);
}

ssize_t dshim_recv(struct dshim_ep *e, void *buf, size_t len, void *desc, void *ctx)
{
    return fi_recv(e->ep, buf, len, desc, FI_ADDR_UNSPEC, ctx);
}

ssize_t dshim_read(struct dshim_ep *e, void *buf, size_t len, void *desc, uint64_t src,
                   uint64_t addr, uint64_t key, void *ctx)
{
    return fi_read(e->ep, buf, len, desc, src, addr, key, ctx);
}

static ssize_t copy_out(struct fi_cq_msg_entry *b, ssize_t n, struct dshim_cqe *out)
{
    for (ssize_t i = 0; i < n; i++) {
        out[i].ctx = b[i].op_context;
        out[i].flags = b[i].flags;
        out[i].len = b[i].len;
    }
    return n;
}

/* Reads up to `n` (<= 64) completions without blocking: count, 0 when none, -FI_EAVAIL
 * when an error completion waits (dshim_cq_readerr), another negative code on failure. */
ssize_t dshim_cq_read(struct dshim_ep *e, struct dshim_cqe *out, size_t n)
{
    struct fi_cq_msg_entry b[64];
    if (n > 64)
        n = 64;
    ssize_t r = fi_cq_read(e->cq, b, n);
    if (r == -FI_EAGAIN)
        return 0;
    return r < 0 ? r : copy_out(b, r, out);
}

/* 0 when it is safe to block in poll() on the CQ's wait descriptor (nothing to read, no
 * progress owed), -FI_EAGAIN when the CQ must be read first. */
int dshim_trywait(struct dshim_ep *e)
{
    if (e->wait_fd < 0)
        return -FI_ENOSYS;
    struct fid *f = &e->cq->fid;
    return fi_trywait(e->fabric, &f, 1);
}

int dshim_cq_readerr(struct dshim_ep *e, struct dshim_cqerr *out)
{
    struct fi_cq_err_entry ee;
    memset(&ee, 0, sizeof ee);
    ssize_t r = fi_cq_readerr(e->cq, &ee, 0);
    if (r < 0)
        return (int)r;
    if (r == 0)
        return -FI_EAGAIN;
    out->ctx = ee.op_context;
    out->flags = ee.flags;
    out->err = ee.err;
    out->prov_errno = ee.prov_errno;
    return 0;
}

/* Makes the CQ's wait descriptor readable (wakes a thread in poll() on it). */
int dshim_cq_signal(struct dshim_ep *e) { return e->wait_fd >= 0 ? fi_cq_signal(e->cq) : 0; }
