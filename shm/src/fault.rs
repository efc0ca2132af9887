//! Fault injection for crash tests: named points in the shared-memory code where a test can
//! make the process die (or a step fail), so every crash window has a test that lands in it.
//!
//! Only test builds of this crate carry the hooks: outside `cfg(test)`, [`point`] and
//! [`fails`] are empty `#[inline(always)]` functions the optimiser removes.
//!
//! * [`point`]`("kv.insert.busy")` marks a crash window. A thread that armed that name with
//!   [`arm`] ends the process there with `_exit(CRASH_EXIT)`: no destructor runs, no
//!   lock is released, exactly what a `SIGKILL` at that instruction leaves behind.
//! * [`fails`]`("kv.repair")` marks a step that a test can make fail (returns true once
//!   armed with [`arm_fail`]).
//! * [`crash_child_at`] forks a child that arms a point, runs a closure and must die there;
//!   the parent reaps it (so its pid reads as dead) and then checks the invariants.
//!
//! Arming is per thread (a thread-local), so tests running in parallel threads of the test
//! binary never trip each other's points.

/// Exit code of a process that died at an armed crash point.
#[cfg(test)]
pub(crate) const CRASH_EXIT: i32 = 86;

#[cfg(test)]
thread_local! {
    static CRASH: std::cell::Cell<Option<&'static str>> = const { std::cell::Cell::new(None) };
    static STOP: std::cell::Cell<Option<&'static str>> = const { std::cell::Cell::new(None) };
    static FAIL: std::cell::Cell<Option<&'static str>> = const { std::cell::Cell::new(None) };
}

/// A crash window named `name`: the process dies here when this thread armed `name`.
#[cfg(test)]
pub(crate) fn point(name: &'static str) {
    if CRASH.with(|c| c.get() == Some(name)) {
        // SAFETY: `_exit` ends the process at once without running destructors or atexit
        // hooks: the shared state is left exactly as a killed process leaves it.
        unsafe { libc::_exit(CRASH_EXIT) }
    }
    if STOP.with(|c| c.get() == Some(name)) {
        // SAFETY: raise only sends a signal to this process; SIGSTOP freezes it (alive, not
        // dead) until the test kills it.
        unsafe { libc::raise(libc::SIGSTOP) };
    }
}

/// A crash window (no hook outside test builds).
#[cfg(not(test))]
#[inline(always)]
pub(crate) fn point(_name: &'static str) {}

/// Whether the step `name` should fail now (armed by a test on this thread).
#[cfg(test)]
pub(crate) fn fails(name: &'static str) -> bool {
    FAIL.with(|c| c.get() == Some(name))
}

/// A step that never fails outside test builds.
#[cfg(not(test))]
#[inline(always)]
pub(crate) fn fails(_name: &'static str) -> bool {
    false
}

/// Makes this thread die at crash point `name` (`None` disarms).
#[cfg(test)]
pub(crate) fn arm(name: Option<&'static str>) {
    CRASH.with(|c| c.set(name));
}

/// Makes step `name` fail on this thread until disarmed (`None`).
#[cfg(test)]
pub(crate) fn arm_fail(name: Option<&'static str>) {
    FAIL.with(|c| c.set(name));
}

/// Forks a child that runs `f` and stops itself (SIGSTOP: alive, frozen) at `point`; returns
/// its pid once it is stopped there. End it with [`kill_and_reap`].
#[cfg(test)]
pub(crate) fn stop_child_at(point: &'static str, f: impl FnOnce()) -> libc::pid_t {
    // SAFETY: as in `crash_child_at`.
    match unsafe { libc::fork() } {
        0 => {
            STOP.with(|c| c.set(Some(point)));
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
            // SAFETY: ends the child without running the parent's destructors.
            unsafe { libc::_exit(if r.is_ok() { 2 } else { 3 }) }
        }
        child => {
            assert!(child > 0, "fork failed");
            let mut status = 0;
            // SAFETY: waits for our own child to stop or end; `status` is a valid out pointer.
            let r = unsafe { libc::waitpid(child, &mut status, libc::WUNTRACED) };
            assert_eq!(r, child);
            assert!(
                libc::WIFSTOPPED(status),
                "the child did not stop at {point}: status {status:#x}"
            );
            child
        }
    }
}

/// Kills a child of this process and reaps it (its pid then reads as dead).
#[cfg(test)]
pub(crate) fn kill_and_reap(child: libc::pid_t) {
    let mut status = 0;
    // SAFETY: signals and waits for our own child; `status` is a valid out pointer.
    unsafe {
        libc::kill(child, libc::SIGKILL);
        libc::waitpid(child, &mut status, 0);
    }
}

/// Forks a child that arms crash point `point`, runs `f` and dies at the point; waits for
/// it (after which its pid reads as dead) and panics unless it died there. The child must
/// only touch shared memory the parent mapped before the fork.
#[cfg(test)]
pub(crate) fn crash_child_at(point: &'static str, f: impl FnOnce()) {
    // SAFETY: the child runs `f` on the only thread it has and leaves with `_exit`, never
    // returning into the test harness; glibc's malloc is usable after fork.
    match unsafe { libc::fork() } {
        0 => {
            arm(Some(point));
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
            // SAFETY: ends the child without running the parent's destructors; reaching here
            // means the point was never hit (2) or `f` panicked (3).
            unsafe { libc::_exit(if r.is_ok() { 2 } else { 3 }) }
        }
        child => {
            assert!(child > 0, "fork failed");
            let mut status = 0;
            // SAFETY: waits for our own child; `status` is a valid out pointer.
            let r = unsafe { libc::waitpid(child, &mut status, 0) };
            assert_eq!(r, child);
            assert!(
                libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == CRASH_EXIT,
                "the child did not die at {point}: status {status:#x}"
            );
        }
    }
}
