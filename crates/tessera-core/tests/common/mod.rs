//! Shared by the allocator-policy tests (each its own process: a policy cannot be undone).

/// Minor page faults of this thread so far.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
pub fn faults() -> i64 {
    // SAFETY: getrusage only writes into the struct passed to it.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    assert_eq!(unsafe { libc::getrusage(libc::RUSAGE_THREAD, &mut u) }, 0);
    u.ru_minflt
}

/// Whether allocator settings in the environment leave `test` nothing to check (it says so).
pub fn skipped_for_user_settings(test: &str) -> bool {
    let tuned = tessera_core::alloc::user_tuned();
    if tuned {
        println!("{test}: allocator settings in the environment, policy not applied: SKIPPED");
    }
    tuned
}
