//! The allocator policy for a process that scores batch after batch.
//!
//! Every batch allocates the same large buffers again (features, reduced embeddings, distance
//! blocks: tens of MB each). glibc's `malloc` serves requests above its mmap threshold (at most
//! 32 MB) with a fresh `mmap` and gives them back with `munmap` on free, so each batch pays a
//! page fault for every 4 KB it touches — on the 2-core development VM that was more than the
//! work itself in some stages (assembling a Wide-ResNet-50-2 PaDiM embedding: 115–186 ms per
//! batch of 8 with fresh pages, 17–25 ms with reused ones; docs/performance.md). With
//! [`retain_freed_memory`] large blocks come from the heap and freed memory stays there for the
//! next batch: the price is that the process's resident memory does not shrink after a peak.
//!
//! Only the main thread's arena follows the policy for blocks above 64 MB (glibc maps those
//! for other threads' arenas regardless); the scoring stages allocate there.
//!
//! It is not a win everywhere: in the same measurements PatchCore's `test` became slower
//! (39–43 → 49–51 ms/image), so the `tessera` binary applies it only when asked
//! (`--retain-freed-memory`).
//!
//! ```
//! // Call it once, first thing in `main`, before any thread starts.
//! let applied = tessera_core::alloc::retain_freed_memory();
//! if cfg!(all(target_os = "linux", target_env = "gnu")) && !tessera_core::alloc::user_tuned() {
//!     assert!(applied);
//! }
//! ```

/// Environment variables through which a user tunes glibc's allocator; when one is set, the
/// user's choice stands and [`retain_freed_memory`] changes nothing.
pub const USER_SETTINGS: [&str; 4] = [
    "MALLOC_MMAP_MAX_",
    "MALLOC_MMAP_THRESHOLD_",
    "MALLOC_TRIM_THRESHOLD_",
    "GLIBC_TUNABLES",
];

/// Whether the user set one of [`USER_SETTINGS`].
pub fn user_tuned() -> bool {
    USER_SETTINGS.iter().any(|v| std::env::var_os(v).is_some())
}

/// The `tessera` binary's default (Linux with glibc): blocks under 32 MiB come from the heap —
/// glibc's mmap threshold fixed there instead of sliding with what was freed last — and up to
/// 64 MiB of freed memory stays at the heap's top, so the per-batch buffers of the feature and
/// PFAM stages (hundreds of KB to MBs, allocated and freed on every image) are reused instead
/// of mapped, faulted in and returned again; blocks of 32 MiB and more (model matrices,
/// whole-batch embeddings) are still mapped and given back. PFAM's forward pass faulted ~1,400
/// pages per image without it and none with it (docs/performance.md). Returns whether the
/// policy was applied (false on other platforms, or when [`user_tuned`]).
pub fn reuse_batch_buffers() -> bool {
    if user_tuned() {
        return false;
    }
    apply_batch()
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn apply_batch() -> bool {
    // SAFETY: as in `apply`.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20) == 1
            && libc::mallopt(libc::M_TRIM_THRESHOLD, 64 << 20) == 1
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn apply_batch() -> bool {
    false
}

/// On Linux with glibc: no `mmap` for large blocks and a 2 GiB trim threshold, so freed memory
/// is reused instead of being returned and faulted in again. Returns whether the policy was
/// applied (false on other platforms, or when [`user_tuned`]).
pub fn retain_freed_memory() -> bool {
    if user_tuned() {
        return false;
    }
    apply()
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn apply() -> bool {
    // SAFETY: mallopt only changes allocator parameters; it is called before the caller starts
    // threads, and glibc takes its own lock in any case.
    unsafe {
        libc::mallopt(libc::M_MMAP_MAX, 0) == 1
            && libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX) == 1
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn apply() -> bool {
    false
}
