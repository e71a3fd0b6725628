//! Process-wide heap settings for decorr's binaries. burn's CPU backend allocates a fresh buffer
//! for every tensor an op returns, and glibc hands large freed blocks back to the kernel (their
//! own mappings, or a trimmed heap top), so the next use faults every page in again and the
//! kernel zeroes it. A fine-tuning step frees and re-allocates about 320 MB of gradients: that
//! churn was half of its time.

/// Keeps freed memory in the process for reuse: blocks up to 32 MiB (the most glibc allows) come
/// from the heap instead of mappings of their own, and the heap's top goes back to the kernel only
/// beyond 2 GiB free. Call once at the start of `main`, before other threads start. Elsewhere
/// than glibc this does nothing.
pub fn retain_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallopt only changes allocator parameters; called before other threads run.
        let ok = unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20) == 1
                && libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX) == 1
        };
        if !ok {
            log::debug!("glibc refused the heap settings; freed memory may go back to the kernel");
        }
    }
}
