//! `retain_freed_memory` makes a freed 64 MB block reusable without faulting its pages in again.
//! Without the libtest harness, so that it runs on the main thread (the arena the policy covers).

mod common;

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn main() {
    use common::faults;
    use tessera_core::alloc::retain_freed_memory;
    /// Allocate and touch 64 MB, free it, do it again: the faults of the second round.
    fn refault() -> i64 {
        let touch = || drop(std::hint::black_box(vec![1u8; 64 << 20]));
        touch();
        let before = faults();
        touch();
        faults() - before
    }
    if common::skipped_for_user_settings("alloc_policy") {
        return;
    }
    // 64 MB is above glibc's largest mmap threshold: by default each round maps fresh pages.
    let fresh = refault();
    assert!(retain_freed_memory(), "mallopt refused the policy");
    let reused = refault();
    // 16,384 faults per round with 4 KB pages (fewer where huge pages back the mapping):
    // with the policy a round must fault at most a tenth as often.
    assert!(
        reused * 10 <= fresh,
        "{reused} faults for a freed 64 MB block with the policy, {fresh} without"
    );
    println!(
        "alloc_policy: {fresh} faults per 64 MB round by default, {reused} with the policy: ok"
    );
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn main() {
    assert!(!tessera_core::alloc::retain_freed_memory());
    println!("alloc_policy: not Linux/glibc, the policy is a no-op");
}
