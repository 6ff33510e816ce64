/* Lattice grids and neighbour maps of the i-quants; see lattice.h. ggml's order is kept: the
 * neighbours of an off-grid point are the grid points at its `nwant` smallest distinct squared
 * distances, by distance then grid index (its qsort on (d2, j)). */
#include <stdlib.h>
#include <string.h>
#include "lattice.h"

typedef struct { int size, dim, bits, map_size, nwant; } lattice_spec;

/* ggml: kmap_size 43692 for the 8-coordinate grids, 4096 for the 4-coordinate ones; nwant 2
 * (IQ2_XXS, IQ2_XS, IQ3_XXS), 1 (IQ2_S), 3 (IQ1_S/IQ1_M, IQ3_S) */
static const lattice_spec SPECS[QK_LAT_COUNT] = {
    [QK_LAT_IQ2_XXS] = {256, 8, 2, 43692, 2},
    [QK_LAT_IQ2_XS] = {512, 8, 2, 43692, 2},
    [QK_LAT_IQ2_S] = {1024, 8, 2, 43692, 1},
    [QK_LAT_IQ1] = {2048, 8, 2, 43692, 3},
    [QK_LAT_IQ3_XXS] = {256, 4, 3, 4096, 2},
    [QK_LAT_IQ3_S] = {512, 4, 3, 4096, 3},
};

static qk_lattice built[QK_LAT_COUNT];

const qk_lattice *qk_lattice_get(int which) {
    if (which < 0 || which >= QK_LAT_COUNT || !built[which].grid) return NULL;
    return &built[which];
}

void qk_lattice_shape(int which, int *size, int *dim) {
    *size = SPECS[which].size;
    *dim = SPECS[which].dim;
}

/* squared distances from the point of levels index i to every grid point */
static void distances(const lattice_spec *s, const int8_t *grid, int i, int *d2) {
    int8_t pos[8];
    const int mask = (1 << s->bits) - 1;
    for (int k = 0; k < s->dim; ++k) pos[k] = (int8_t)(2 * ((i >> s->bits * k) & mask) + 1);
    for (int j = 0; j < s->size; ++j) {
        int d = 0;
        for (int k = 0; k < s->dim; ++k) {
            const int e = grid[j * s->dim + k] - pos[k];
            d += e * e;
        }
        d2[j] = d;
    }
}

/* the `nwant` smallest distinct values of d2, ascending; returns how many there are */
static int nearest_levels(const lattice_spec *s, const int *d2, int *levels) {
    int n = 0;
    for (; n < s->nwant; ++n) {
        int best = -1;
        for (int j = 0; j < s->size; ++j)
            if ((n == 0 || d2[j] > levels[n - 1]) && (best < 0 || d2[j] < best)) best = d2[j];
        if (best < 0) break;
        levels[n] = best;
    }
    return n;
}

/* writes the neighbour list of a point at out (count, then indexes); returns its length without
 * the count */
static int neighbour_list(const lattice_spec *s, const int *d2, uint16_t *out) {
    int levels[8];
    const int nlev = nearest_levels(s, d2, levels);
    int n = 0;
    for (int l = 0; l < nlev; ++l)
        for (int j = 0; j < s->size; ++j)
            if (d2[j] == levels[l]) {
                out[1 + n] = (uint16_t)j;
                ++n;
            }
    out[0] = (uint16_t)n;
    return n;
}

int qk_lattice_build(int which, const uint8_t *levels, int size, int dim) {
    if (which < 0 || which >= QK_LAT_COUNT) return -1;
    const lattice_spec *s = &SPECS[which];
    if (built[which].grid) return 0;
    if (size != s->size || dim != s->dim) return -1;
    int8_t *grid = aligned_alloc(8, (size_t)s->size * s->dim);
    int32_t *map = malloc((size_t)s->map_size * sizeof(int32_t));
    int *d2 = malloc((size_t)s->size * sizeof(int));
    /* the off-grid points' lists in one pass; one list holds at most 1 + size entries, and the
     * buffer doubles when the next one might not fit */
    int64_t cap = (int64_t)s->map_size * 4 + s->size + 1, total = 0;
    uint16_t *neighbours = malloc((size_t)cap * sizeof(uint16_t));
    uint16_t *index_of = malloc((size_t)s->size * sizeof(uint16_t));
    if (!grid || !map || !d2 || !neighbours || !index_of) goto fail;
    for (int j = 0; j < s->size * s->dim; ++j) {
        if (levels[j] >> s->bits) goto fail;
        grid[j] = (int8_t)(2 * levels[j] + 1);
    }
    for (int i = 0; i < s->map_size; ++i) map[i] = -1;
    for (int j = 0; j < s->size; ++j) {
        int index = 0;
        for (int k = 0; k < s->dim; ++k) index |= levels[j * s->dim + k] << (s->bits * k);
        if (index >= s->map_size) goto fail;
        map[index] = j;
        index_of[j] = (uint16_t)index;
    }
    for (int i = 0; i < s->map_size; ++i) {
        if (map[i] >= 0) continue;
        if (total + 1 + s->size > cap) {
            cap *= 2;
            uint16_t *more = realloc(neighbours, (size_t)cap * sizeof(uint16_t));
            if (!more) goto fail;
            neighbours = more;
        }
        distances(s, grid, i, d2);
        map[i] = -(int32_t)(total + 1);
        total += 1 + neighbour_list(s, d2, neighbours + total);
    }
    free(d2);
    built[which] = (qk_lattice){s->size, s->dim, grid, map, neighbours, index_of, s->map_size, (int32_t)total};
    return 0;
fail:
    free(grid);
    free(map);
    free(d2);
    free(index_of);
    free(neighbours);
    return -1;
}
