//! `reuse_batch_buffers` keeps a freed 16 MB block (under its 32 MiB mmap threshold, under its
//! 64 MiB trim threshold) for the next allocation: touching it again faults almost no pages.
//! Without the libtest harness, so that it runs on the main thread.

mod common;

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn main() {
    use common::faults;
    use tessera_core::alloc::reuse_batch_buffers;
    /// Allocate and touch 16 MB, then free it; the faults it took.
    fn round() -> i64 {
        let before = faults();
        drop(std::hint::black_box(vec![1u8; 16 << 20]));
        faults() - before
    }
    if common::skipped_for_user_settings("alloc_batch_policy") {
        return;
    }
    assert!(reuse_batch_buffers(), "mallopt refused the policy");
    let first = round();
    let again = round();
    // 4,096 faults for 16 MB of fresh 4 KB pages (fewer where huge pages back the heap): the
    // second round must fault at most a tenth as often as a fresh block would.
    assert!(
        again * 10 <= (16 << 20) / 4096,
        "{again} faults for a reused 16 MB block (the first round took {first})"
    );
    println!("alloc_batch_policy: {first} faults for a fresh 16 MB block, {again} reused: ok");
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn main() {
    assert!(!tessera_core::alloc::reuse_batch_buffers());
    println!("alloc_batch_policy: not Linux/glibc, the policy is a no-op");
}
