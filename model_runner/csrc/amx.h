// AMX tile registers: the permission Linux asks for and the tile shapes, shared by the kernels that use them
// (prefill_attention.cpp, qmatmul.cpp), included after immintrin.h where the compiler targets AMX.
#pragma once
#include <sys/syscall.h>
#include <unistd.h>

#include <cstdint>
#include <immintrin.h>

// Linux hands the AMX tile registers only to a process that asks for them (arch_prctl ARCH_REQ_XCOMP_PERM
// for XTILEDATA, Linux 5.16 and later); once granted they serve every thread of the process.
inline bool amx_permitted() {
  static const bool granted = [] {
    constexpr int ARCH_REQ_XCOMP_PERM = 0x1023, XFEATURE_XTILEDATA = 18;
    return syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0;
  }();
  return granted;
}

// Tile register t as rows[t] rows of colsb[t] bytes (t = 0..7). Loaded at the start of each task: oneDNN's AMX
// kernels, and our other kernels, load their own configuration on the same threads between our calls.
inline void configure_tiles(const uint8_t (&rows)[8], const uint16_t (&colsb)[8]) {
  struct alignas(64) {
    uint8_t palette = 1, start_row = 0, reserved[14] = {};
    uint16_t colsb[16] = {};
    uint8_t rows[16] = {};
  } config;
  for (int t = 0; t < 8; t++) config.colsb[t] = colsb[t], config.rows[t] = rows[t];
  // Not _tile_loadconfig(&config): GCC's reads the configuration through a pointer it does not size, and with
  // the shapes passed in it dropped their stores as dead (measured: LDTILECFG of a zeroed block, then a fault).
  // The whole struct as the operand keeps every byte written.
  asm volatile("ldtilecfg %0" : : "m"(config));
}
