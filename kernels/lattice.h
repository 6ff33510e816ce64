/* The lattices of the i-quants (IQ2_XXS, IQ2_XS, IQ2_S, IQ1_S/IQ1_M, IQ3_XXS, IQ3_S): a grid of
 * points, each `dim` coordinates 2l+1 (l a level of `bits` bits), and for every point of levels
 * that is not on the grid the grid points nearest to it. Built the way ggml's iq2xs_init_impl
 * and iq3xs_init_impl build them (ggml/src/ggml-quants.c), from the grid's levels, which the
 * bindings take from the gguf package's tables; reference: qconvert/quant/reference/lattice.py. */
#ifndef QK_LATTICE_H
#define QK_LATTICE_H
#include <stdint.h>

enum { QK_LAT_IQ2_XXS, QK_LAT_IQ2_XS, QK_LAT_IQ2_S, QK_LAT_IQ1, QK_LAT_IQ3_XXS, QK_LAT_IQ3_S, QK_LAT_COUNT };

typedef struct {
    int size;                   /* grid points */
    int dim;                    /* coordinates per point: 8 (IQ2, IQ1) or 4 (IQ3) */
    const int8_t *grid;         /* size x dim coordinates 2l+1; a point of 8 is one aligned uint64 */
    const int32_t *map;         /* levels index (sum l_k << bits*k) -> grid index when on the grid,
                                 * else -(1 + offset of its neighbour list) */
    const uint16_t *neighbours; /* at each offset: count n, then n grid indexes, nearest first */
    const uint16_t *index;      /* each grid point's levels index (where map points back to it) */
    int32_t map_size;
    int32_t neighbours_size;
} qk_lattice;

/* the built lattice, or NULL when qk_lattice_build has not run for it */
const qk_lattice *qk_lattice_get(int which);
/* builds lattice `which` from its grid's levels (size x dim bytes, each < 2^bits); once: later
 * calls return the existing one. 0 on success, -1 on a size mismatch or out of memory. */
int qk_lattice_build(int which, const uint8_t *levels, int size, int dim);
/* grid size and coordinates per point lattice `which` expects */
void qk_lattice_shape(int which, int *size, int *dim);
#endif
