/* The coarse stage's exhaustive scan in C (dlbhc/codes.py's HammingBall
 * calls it through ctypes; dlbhc/native.py builds this file).
 *
 *   dlbhc_ball_scan    one pass over every code: the codes that may lie
 *                      within the stopping radius, kept as it goes, and per
 *                      Hamming distance to the query how many codes and
 *                      images (a code's weight: the images of its bucket)
 *                      up to that radius.
 *   dlbhc_ball_select  of those, the codes within the radius the caller
 *                      chose, in (distance, position) order, placed by a
 *                      counting sort: no comparison sort, no second pass
 *                      over the codes.
 *
 * The stopping rule itself (the smallest radius whose ball holds `need`
 * images, capped at `limit`: index.shell_radius) is applied by the caller to
 * the histogram between the two calls, so it keeps its one home.  The
 * scan only needs a bound: the rule's radius over the codes seen so far can
 * only shrink as more are seen, so a code farther than it cannot be within
 * the final radius and is not kept.  The first codes are all kept, later
 * ones rarely (a few times `need` in all for codes in random order; every
 * code in the worst order, hence the caller's room for n).
 *
 * Codes are rows of n_words 64-bit words; XOR and popcount are bitwise, so
 * the words' byte order does not matter.  Distances fit uint16 (codes have
 * at most 1024 bits).  Nothing here allocates or keeps state: threads may
 * call concurrently with their own buffers. */
#include <stdint.h>
#include <string.h>

/* popcnt where the CPU has it (chosen once, at load, by the dynamic linker),
 * a portable bit count elsewhere: the library runs on any machine of its
 * type, not only the one that built it. */
#if defined(__GNUC__) && defined(__x86_64__) && !defined(__clang__)
#define SCAN_CLONES __attribute__((target_clones("popcnt", "default")))
#else
#define SCAN_CLONES
#endif

#define POPCOUNT(x) ((uint32_t)__builtin_popcountll(x))

/* One pass; DIST_EXPR is row r's distance, WEIGHT its images.  `bound` is
 * the rule's radius over the codes seen so far (limit until enough images
 * were seen), `below` the images seen closer than it.  Only codes within
 * the bound are counted: the rule never reads beyond its radius, and most
 * codes then cost a popcount and one comparison. */
#define SCAN_LOOP(DIST_EXPR, WEIGHT)                                     \
    for (int64_t i = 0; i < n; i++) {                                    \
        const uint64_t *r = rows + i * n_words;                          \
        const uint32_t d = DIST_EXPR;                                    \
        if (d <= bound) {                                                \
            const int64_t w = WEIGHT;                                    \
            row_hist[d] += 1;                                            \
            image_hist[d] += w;                                          \
            kept_pos[kept] = i;                                          \
            kept_dist[kept] = (uint16_t)d;                               \
            kept++;                                                      \
            if (d < bound) {                                             \
                below += w;                                              \
                while (bound > 0 && below >= need) {                     \
                    bound--;                                             \
                    below -= image_hist[bound];                          \
                }                                                        \
            }                                                            \
        }                                                                \
    }

#define SCAN_WIDTHS(WEIGHT)                                                     \
    switch (n_words) {                                                          \
    case 1: SCAN_LOOP(POPCOUNT(r[0] ^ q0), WEIGHT) break;                       \
    case 2: SCAN_LOOP(POPCOUNT(r[0] ^ q0) + POPCOUNT(r[1] ^ q1), WEIGHT) break; \
    case 4:                                                                     \
        SCAN_LOOP(POPCOUNT(r[0] ^ q0) + POPCOUNT(r[1] ^ q1)                     \
                  + POPCOUNT(r[2] ^ q[2]) + POPCOUNT(r[3] ^ q[3]), WEIGHT)      \
        break;                                                                  \
    default: {                                                                  \
        SCAN_LOOP(({ uint32_t s = 0;                                            \
                     for (int32_t j = 0; j < n_words; j++)                      \
                         s += POPCOUNT(r[j] ^ q[j]);                            \
                     s; }), WEIGHT)                                             \
    }                                                                           \
    }

/* rows (n, n_words) uint64 C order; q the query's n_words words; weights
 * (n,) int64 or NULL (one image per row); need, limit: the stopping rule's
 * parameters.  Out: row_hist, image_hist (64 * n_words + 1,) int64, exact at
 * every distance up to the rule's radius (beyond it they count only the
 * codes kept); the kept codes' positions (ascending) and distances, room for
 * n; returns how many. */
SCAN_CLONES
int64_t dlbhc_ball_scan(const uint64_t *rows, int64_t n, int32_t n_words, const uint64_t *q,
                        const int64_t *weights, int64_t need, int32_t limit,
                        int64_t *row_hist, int64_t *image_hist,
                        int64_t *kept_pos, uint16_t *kept_dist, int32_t *bound_out)
{
    const size_t hist_bytes = (size_t)(64 * n_words + 1) * sizeof(int64_t);
    const uint64_t q0 = q[0], q1 = n_words > 1 ? q[1] : 0;
    uint32_t bound = limit < 0 ? 0 : (uint32_t)limit;
    int64_t below = 0, kept = 0;
    memset(row_hist, 0, hist_bytes);
    memset(image_hist, 0, hist_bytes);
    if (need <= 0)
        bound = 0;
    if (weights) {
        SCAN_WIDTHS(weights[i])
    } else {
        SCAN_WIDTHS(1)
    }
    *bound_out = (int32_t)bound;
    return kept;
}

/* Of the n_kept codes dlbhc_ball_scan kept, those at distance <= radius in
 * (distance, position) order: pos and dist receive row_hist[0] + ... +
 * row_hist[radius] entries, the count returned.  The radius must not exceed
 * the scan's final bound (the rule's radius never does); the caller checks. */
int64_t dlbhc_ball_select(const int64_t *kept_pos, const uint16_t *kept_dist, int64_t n_kept,
                          int32_t radius, const int64_t *row_hist, int64_t *pos, int32_t *dist)
{
    int64_t next[radius + 1];
    int64_t total = 0;
    for (int32_t d = 0; d <= radius; d++) {
        next[d] = total;
        total += row_hist[d];
    }
    for (int64_t i = 0; i < n_kept; i++) {
        const uint32_t d = kept_dist[i];
        if (d <= (uint32_t)radius) {
            const int64_t k = next[d]++;
            pos[k] = kept_pos[i];
            dist[k] = (int32_t)d;
        }
    }
    return total;
}
