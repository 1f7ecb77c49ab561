// pipeline._pagehash: the blake3 of many 4 KiB pages in one call (issue 13).
//
// A 4 KiB page is four blake3 chunks. The blake3 package hashes one page per call: its
// SIMD kernel then compresses that page's four chunks side by side, a quarter of
// AVX-512's sixteen lanes, and every page costs a Python call besides. Here the chunks of
// many pages go through the official C implementation's blake3_hash_many together
// (sixteen at a time with AVX-512, eight with AVX2), then each page's two parents and its
// root the same way. Each digest equals blake3(page).digest() (the 32-byte output: the
// root's chaining value). Vendored C: csrc/blake3 (BLAKE3 1.8.6, Apache-2.0 / CC0).
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <string.h>

#include "blake3_impl.h"

#define PAGE 4096
#define CHUNKS (PAGE / BLAKE3_CHUNK_LEN)
#define GROUP 64        // pages per round: their chunk CVs stay in the core's cache

// blake3_hash_many_avx2, for the inputs left over from its groups of eight, loads 32
// bytes where it wants the last 16 of a block (the upper half is then replaced): it reads
// up to 16 bytes past a chunk's end. Inside a buffer that is the next chunk; past a
// buffer's last page it is whatever follows, and where the buffer ends its mapping (the
// SVM's memory, hashed in place by the restore stage and the secondary coordinator) that
// was unmapped: SIGSEGV (the fault matrix, session 14: the core shows that load at the
// mapping's last 16 bytes). So a buffer's last page is hashed from a copy with room after
// it (``last``, ``last_copy``); the other pages are read where they are.
#define OVERREAD 64

static void hash_group(const uint8_t *base, const int64_t *rows, size_t at, size_t g,
                       size_t last, const uint8_t *last_copy, uint8_t *out) {
  const uint8_t *inputs[2 * GROUP];
  uint8_t cv[CHUNKS][GROUP * BLAKE3_OUT_LEN];       // chunk k of each page
  uint8_t blocks[2 * GROUP * BLAKE3_BLOCK_LEN];     // two parent blocks per page
  uint8_t parents[2 * GROUP * BLAKE3_OUT_LEN];
  for (size_t k = 0; k < CHUNKS; k++) {
    for (size_t i = 0; i < g; i++) {
      size_t r = rows ? (size_t)rows[at + i] : at + i;
      const uint8_t *page = r == last && last_copy ? last_copy : base + r * PAGE;
      inputs[i] = page + k * BLAKE3_CHUNK_LEN;
    }
    // chunk k of every page: chunk counter k, no increment between inputs
    blake3_hash_many(inputs, g, BLAKE3_CHUNK_LEN / BLAKE3_BLOCK_LEN, IV, k, false, 0,
                     CHUNK_START, CHUNK_END, cv[k]);
  }
  for (size_t i = 0; i < g; i++) {
    uint8_t *left = blocks + 2 * i * BLAKE3_BLOCK_LEN, *right = left + BLAKE3_BLOCK_LEN;
    memcpy(left, cv[0] + i * BLAKE3_OUT_LEN, BLAKE3_OUT_LEN);
    memcpy(left + BLAKE3_OUT_LEN, cv[1] + i * BLAKE3_OUT_LEN, BLAKE3_OUT_LEN);
    memcpy(right, cv[2] + i * BLAKE3_OUT_LEN, BLAKE3_OUT_LEN);
    memcpy(right + BLAKE3_OUT_LEN, cv[3] + i * BLAKE3_OUT_LEN, BLAKE3_OUT_LEN);
    inputs[2 * i] = left;
    inputs[2 * i + 1] = right;
  }
  blake3_hash_many(inputs, 2 * g, 1, IV, 0, false, PARENT, 0, 0, parents);
  for (size_t i = 0; i < g; i++)
    inputs[i] = parents + 2 * i * BLAKE3_OUT_LEN;   // page i's two parents, side by side
  blake3_hash_many(inputs, g, 1, IV, 0, false, PARENT | ROOT, 0, 0, out + at * BLAKE3_OUT_LEN);
}

PyDoc_STRVAR(hash_pages_doc,
"hash_pages(pages, rows, out)\n--\n\n"
"blake3 of 4 KiB pages into ``out`` (32 bytes each, in order). ``pages``: a C-contiguous\n"
"buffer of whole pages; ``rows``: None (every page) or a buffer of int64 row indexes into\n"
"it, each checked against its size; ``out``: a writable buffer of 32 bytes per page\n"
"hashed. The GIL is released while it hashes.");

static PyObject *hash_pages(PyObject *self, PyObject *args) {
  PyObject *pages_obj, *rows_obj, *out_obj;
  if (!PyArg_ParseTuple(args, "OOO:hash_pages", &pages_obj, &rows_obj, &out_obj))
    return NULL;
  Py_buffer pages, rows = {0}, out;
  if (PyObject_GetBuffer(pages_obj, &pages, PyBUF_C_CONTIGUOUS) < 0)
    return NULL;
  if (PyObject_GetBuffer(out_obj, &out, PyBUF_C_CONTIGUOUS | PyBUF_WRITABLE) < 0) {
    PyBuffer_Release(&pages);
    return NULL;
  }
  PyObject *result = NULL;
  int have_rows = rows_obj != Py_None;
  if (have_rows && PyObject_GetBuffer(rows_obj, &rows, PyBUF_C_CONTIGUOUS) < 0)
    goto done_buffers;
  if (pages.len % PAGE) {
    PyErr_Format(PyExc_ValueError, "hash_pages: pages hold %zd bytes, not whole %d-byte "
                 "pages", pages.len, PAGE);
    goto done;
  }
  size_t total = (size_t)pages.len / PAGE;
  if (have_rows && rows.len % sizeof(int64_t)) {
    PyErr_Format(PyExc_ValueError, "hash_pages: rows hold %zd bytes, not int64 indexes",
                 rows.len);
    goto done;
  }
  size_t n = have_rows ? (size_t)rows.len / sizeof(int64_t) : total;
  if ((size_t)out.len != n * BLAKE3_OUT_LEN) {
    PyErr_Format(PyExc_ValueError, "hash_pages: out holds %zd bytes, not %zu (32 per page)",
                 out.len, n * BLAKE3_OUT_LEN);
    goto done;
  }
  const int64_t *idx = have_rows ? (const int64_t *)rows.buf : NULL;
  int wants_last = !have_rows && n > 0;
  for (size_t i = 0; have_rows && i < n; i++) {
    if (idx[i] < 0 || (size_t)idx[i] >= total) {
      PyErr_Format(PyExc_IndexError, "hash_pages: row %lld out of range (%zu pages)",
                   (long long)idx[i], total);
      goto done;
    }
    wants_last |= (size_t)idx[i] == total - 1;
  }
  Py_BEGIN_ALLOW_THREADS
  // (aligned as a page row is; OVERREAD bytes after it for the kernel to read past)
  _Alignas(64) uint8_t last_copy[PAGE + OVERREAD];
  if (wants_last)
    memcpy(last_copy, (const uint8_t *)pages.buf + (total - 1) * PAGE, PAGE);
  for (size_t at = 0; at < n; at += GROUP)
    hash_group((const uint8_t *)pages.buf, idx, at, n - at < GROUP ? n - at : GROUP,
               total - 1, wants_last ? last_copy : NULL, (uint8_t *)out.buf);
  Py_END_ALLOW_THREADS
  result = Py_None;
  Py_INCREF(result);
done:
  if (have_rows)
    PyBuffer_Release(&rows);
done_buffers:
  PyBuffer_Release(&out);
  PyBuffer_Release(&pages);
  return result;
}

static PyObject *simd_degree(PyObject *self, PyObject *unused) {
  return PyLong_FromSize_t(blake3_simd_degree());
}

static PyMethodDef methods[] = {
  {"hash_pages", hash_pages, METH_VARARGS, hash_pages_doc},
  {"simd_degree", simd_degree, METH_NOARGS,
   "Inputs blake3_hash_many compresses side by side on this CPU (16: AVX-512, 8: AVX2)."},
  {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
  PyModuleDef_HEAD_INIT, "pipeline._pagehash",
  "blake3 of many 4 KiB pages in one call (csrc/pagehash.c).", -1, methods,
};

PyMODINIT_FUNC PyInit__pagehash(void) {
  return PyModule_Create(&module);
}
