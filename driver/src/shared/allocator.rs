//! The C allocator's thresholds for `serve`. By hand with `libc`, since `mallopt` is one call
//! and no crate wraps it (swapping in another allocator crate would change every allocation
//! of the process, not the one behaviour that cost).
//!
//! glibc adjusts its thresholds as a program runs: after a large block is freed, its arena's
//! top is trimmed back to the kernel (and big blocks may be `mmap`ed and `munmap`ed) once more
//! than ~2x the last large block is free. A cross-node copy allocates and frees a 4 MiB buffer
//! per chunk on each end (gRPC's encode and decode buffers), so every chunk landed in fresh
//! pages: a page fault and a zeroed page per 4 KiB, and on this project's VM a first touch
//! that costs far more than the copy itself. With fixed thresholds the freed buffers are
//! reused: a 1 GiB restore took 1.02 s of CPU on the source instead of 1.27 s and 1.19 s on the
//! target instead of 1.31 s (docs/benchmarks.md). What stays mapped is bounded by
//! [`TRIM_THRESHOLD`] per arena, and only arenas that held such buffers keep that much.

/// Blocks up to this size come from the arenas, not from `mmap` (glibc's ceiling for it).
const MMAP_THRESHOLD: i32 = 32 << 20;
/// Free memory at an arena's top that is kept rather than returned to the kernel.
const TRIM_THRESHOLD: i32 = 64 << 20;

/// Fix the thresholds; called once, before the runtime's threads start.
pub fn keep_freed_buffers() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets allocator parameters; called before other threads exist.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD);
        libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD);
    }
}
