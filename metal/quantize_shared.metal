// Threadgroup memory of quantize.metal, at the kernel's outermost scope (so that
// merge_quantize, which runs quantize.metal's code in a block, declares it there too).
constexpr int QNW = (D + 31) / 32;
SHARED float q_us[ROWS * D];
SHARED uint32_t q_idx[ROWS * D];
SHARED float q_red[ROWS * QNW];
constexpr int QMB = KB > VB ? KB : VB;
SHARED float q_lev[1 << QMB];
SHARED float q_bnd[1 << QMB];
const int q_first = 0;
