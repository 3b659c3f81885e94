//! Exec'd workers: placing the fds and `execve` without allocating after fork; owning the fds
//! in the exec'd program.
#![allow(unsafe_code)]

use core::sync::atomic::AtomicBool;
use std::ffi::CStr;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};

use super::{errno, exit_now};
use crate::error::{Call, Error, Result};

/// The first fd number of an exec'd worker's inherited descriptors: its channel is fd 3, its
/// listeners (shared schedule) 4, 5, ... ([`exec_worker`]).
pub(crate) const EXEC_FIRST_FD: RawFd = 3;

/// The exit code of an exec'd worker whose `execve` (or the `dup2`/`chdir` before it) failed.
pub(crate) const EXEC_FAILED: i32 = 127;

/// In a forked child, never returns: places `fds` at [`EXEC_FIRST_FD`], [`EXEC_FIRST_FD`]` + 1`,
/// ... without close-on-exec, closes every other descriptor above 2, changes to `cwd`, and
/// `execve`s `path` with `argv` and `envp` (null-terminated arrays of pointers to
/// NUL-terminated strings). If any step fails it writes `failed` and the `errno` on stderr and
/// `_exit`s with [`EXEC_FAILED`].
///
/// Only async-signal-safe system calls run here (`fcntl`, `dup2`, `close_range` or `close`,
/// `chdir`, `execve`, `write`, `_exit`), and nothing allocates: everything was made by the
/// caller before `fork`.
pub(crate) fn exec_worker(
    fds: &[RawFd],
    cwd: Option<&CStr>,
    path: &CStr,
    argv: &[*const libc::c_char],
    envp: &[*const libc::c_char],
    failed: &[u8],
) -> ! {
    let fail = |what: &[u8]| -> ! {
        let e = errno();
        let mut num = [0u8; 12];
        let mut i = num.len();
        let mut n = e.unsigned_abs();
        loop {
            i -= 1;
            num[i] = b'0' + (n % 10) as u8;
            n /= 10;
            if n == 0 || i == 0 {
                break;
            }
        }
        for part in [failed, what, b" (errno ", &num[i..], b")\n"] {
            // SAFETY: writing a live byte slice to stderr; a short write loses only the message.
            unsafe { libc::write(2, part.as_ptr().cast(), part.len()) };
        }
        exit_now(EXEC_FAILED)
    };
    if argv.last() != Some(&core::ptr::null()) || envp.last() != Some(&core::ptr::null()) {
        fail(b": argv or envp not null-terminated");
    }
    let n = fds.len().min(64);
    let above = EXEC_FIRST_FD + n as RawFd;
    // First move every fd above the target range, so that no dup2 below overwrites a source
    // that is still to be placed.
    let mut moved = [-1 as RawFd; 64];
    for (i, &fd) in fds.iter().take(n).enumerate() {
        // SAFETY: F_DUPFD_CLOEXEC on an fd the caller keeps open makes a new fd; no memory is
        // touched.
        let d = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, above) };
        if d < 0 {
            fail(b": fcntl(F_DUPFD_CLOEXEC)");
        }
        moved[i] = d;
    }
    for (i, &d) in moved.iter().take(n).enumerate() {
        // SAFETY: dup2 replaces the target number in this child, which is about to exec and
        // holds no Rust owner that uses it again; the new fd has no close-on-exec flag.
        if unsafe { libc::dup2(d, EXEC_FIRST_FD + i as RawFd) } < 0 {
            fail(b": dup2");
        }
    }
    // Everything else above stdio goes: the primary's own fds are close-on-exec, but a
    // descriptor an application opened without it must not reach the worker program.
    // SAFETY: close_range takes plain integers and only closes this child's descriptors.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_close_range,
            above as libc::c_uint,
            libc::c_uint::MAX,
            0 as libc::c_uint,
        )
    };
    if rc != 0 {
        // Before Linux 5.9: close them one by one, up to the open-file limit (at most 2^20).
        let lim = rustix::process::getrlimit(rustix::process::Resource::Nofile)
            .current
            .unwrap_or(1 << 20)
            .min(1 << 20) as RawFd;
        for fd in above..lim {
            // SAFETY: as above; EBADF on numbers that are not open is ignored.
            unsafe { libc::close(fd) };
        }
    }
    if let Some(dir) = cwd {
        // SAFETY: `dir` is NUL-terminated and lives across the call.
        if unsafe { libc::chdir(dir.as_ptr()) } != 0 {
            fail(b": chdir");
        }
    }
    // SAFETY: `path` is NUL-terminated; `argv` and `envp` are null-terminated arrays (checked
    // above) of pointers to NUL-terminated strings the caller keeps alive (they were made
    // before fork, and this process's memory is a copy of the caller's).
    unsafe { libc::execve(path.as_ptr(), argv.as_ptr(), envp.as_ptr()) };
    fail(b": execve")
}

/// Takes ownership of the descriptors `raws`, inherited across `execve` at the numbers the
/// primary put in the environment ([`Worker::from_env`](crate::Worker::from_env)), and sets
/// their close-on-exec flag again. Fails when a number is not open, is stdio, or is named
/// twice. Works once per process: a second call fails and takes nothing, so no number is ever
/// owned twice.
pub(crate) fn take_exec_fds(raws: &[RawFd]) -> Result<Vec<OwnedFd>> {
    static TAKEN: AtomicBool = AtomicBool::new(false);
    if TAKEN.swap(true, core::sync::atomic::Ordering::AcqRel) {
        return Err(Error::Invalid(
            "Worker::from_env already took this process's inherited descriptors",
        ));
    }
    for (i, r) in raws.iter().enumerate() {
        if *r <= 2 || raws[..i].contains(r) {
            return Err(Error::Invalid(
                "FORKCLUSTER_CHANNEL_FD and FORKCLUSTER_LISTENERS must name distinct fds above 2",
            ));
        }
        // SAFETY: F_GETFD only reads the descriptor's flags; EBADF when it is not open.
        if unsafe { libc::fcntl(*r, libc::F_GETFD) } == -1 {
            return Err(Error::Invalid(
                "an fd named in FORKCLUSTER_CHANNEL_FD or FORKCLUSTER_LISTENERS is not open",
            ));
        }
    }
    let mut out = Vec::with_capacity(raws.len());
    for &r in raws {
        // SAFETY: the descriptor is open (checked above), the primary passed it to this process
        // for this purpose, and nothing else in the process owns it: the numbers are distinct
        // and taken once per process (TAKEN above).
        let fd = unsafe { OwnedFd::from_raw_fd(r) };
        rustix::io::fcntl_setfd(&fd, rustix::io::FdFlags::CLOEXEC).call("fcntl(F_SETFD)")?;
        out.push(fd);
    }
    Ok(out)
}
