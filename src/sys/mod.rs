//! The only module with `unsafe`: the few calls that neither `std` nor `rustix` offers safely.
//!
//! The contract of each function is in its doc comment; each `unsafe` block says why it holds.
//! Everything else in the crate goes through `rustix` (sockets, `sendmsg`/`recvmsg`, epoll,
//! `waitpid`, `kill`, `prctl`) or `std`.
//!
//! | function | wraps | why it is here |
//! |---|---|---|
//! | [`fork`] | `fork(2)` | `rustix` does not expose a process-level fork |
//! | [`thread_count`] | `clone(2)` | a fork that skips atfork handlers, to tell an emulator's threads apart |
//! | [`SignalSet`] | `sigprocmask(2)`, `signalfd(2)` | not in `rustix` outside its `runtime` module |
//! | [`SharedPages`] | `mmap(MAP_SHARED \| MAP_ANONYMOUS)`, `munmap` | turning the mapping into `&[AtomicU32]`; unmapping the other workers' pages in a child |
//! | [`exec_worker`], [`take_exec_fds`] | `dup2`, `close_range`, `chdir`, `execve`; `OwnedFd::from_raw_fd` | an exec'd worker: placing its fds and exec'ing it without allocating after fork; owning them in the exec'd program |
//! | [`exit_now`] | `_exit(2)` | leave a forked child without running the parent's exit handlers |
//! | [`peek_exited_child`] | `waitid(P_ALL, WNOWAIT)` | `rustix`'s `waitid` does not return the pid |
//! | [`set_default`], [`ignore`] | `sigaction(2)` | SIGCHLD must not be `SIG_IGN` while the primary runs |
//! | [`set_tcp_defer_accept`] | `setsockopt(TCP_DEFER_ACCEPT)` | not in `rustix` |
//! | [`take_inherited_fds`] | `OwnedFd::from_raw_fd` | owning the fds a service manager passed (socket activation) |
//! | [`user_by_name`], [`user_by_id`], [`group_by_name`], [`group_list`] | `getpwnam_r`, `getpwuid_r`, `getgrnam_r`, `getgrouplist` | the user and group databases (in the primary, before fork): not in `rustix` |
//! | [`set_credentials`], [`credentials`], [`groups_into`], [`setuid_root_works`], [`setgid_root_works`] | `setgroups`, `setresgid`, `setresuid`, `getresuid`, `getresgid`, `getgroups`, `setuid(0)`, `setgid(0)` | the process-wide libc wrappers (see [`set_credentials`] for why not `rustix`'s per-thread calls) |

#![allow(unsafe_code)]

use core::sync::atomic::{AtomicBool, AtomicU32};
use std::os::fd::{FromRawFd, OwnedFd, RawFd};

use crate::error::{Error, Result};

/// What [`fork`] returned in this process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Forked {
    /// We are the parent; the child's pid.
    Parent(rustix::process::Pid),
    /// We are the new child.
    Child,
}

/// Counts this program's threads: procfs gives `/proc/self/task` a link count of 2 plus the
/// number of threads (one `stat`, no directory walk). 1 when procfs is not mounted.
///
/// A user-mode emulator (qemu-user) runs threads of its own in the process, and they show in
/// `/proc/self/task` too. So when the count is above 1, a freshly forked child counts its own:
/// fork copies only the calling thread, so on a real kernel the child always sees 1 and the
/// count stands as it is; whatever the child sees beyond 1 are the emulator's threads (qemu
/// starts its helper thread again in the child), and they are taken off. When the child cannot
/// be forked or does not report, the count stands.
pub(crate) fn thread_count() -> usize {
    let n = task_count();
    if n <= 1 {
        return n;
    }
    match fresh_child_task_count() {
        Some(base) if base > 1 => n.saturating_sub(base - 1).max(1),
        _ => n,
    }
}

/// The threads procfs lists for this process, its own and any an emulator runs in it.
fn task_count() -> usize {
    rustix::fs::stat("/proc/self/task")
        .map_or(1, |st| (st.st_nlink as usize).saturating_sub(2).max(1))
}

/// [`task_count`] as seen by a child forked now, which has exactly one thread of this program.
///
/// The child comes from a raw `clone(SIGCHLD)`, which is `fork` without the C library's atfork
/// handlers (one of them could start a thread in the child and hide a real thread here), and it
/// does nothing but `stat`, `write` and `_exit`, all plain system calls, so the locks other
/// threads may hold at the fork do not matter. The count comes back through a pipe, not the
/// exit status: with SIGCHLD ignored the kernel reaps the child itself, and an application's
/// SIGCHLD handler may reap it first.
fn fresh_child_task_count() -> Option<usize> {
    let (r, w) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC).ok()?;
    // s390x takes clone's stack before its flags; the other Linux ports take the flags first.
    #[cfg(target_arch = "s390x")]
    let (a, b): (libc::c_long, libc::c_long) = (0, libc::SIGCHLD as libc::c_long);
    #[cfg(not(target_arch = "s390x"))]
    let (a, b): (libc::c_long, libc::c_long) = (libc::SIGCHLD as libc::c_long, 0);
    let zero: libc::c_long = 0;
    // SAFETY: clone without CLONE_VM and with a null stack is fork: the child runs on a copy of
    // this process's memory, so every pointer and fd stays valid, and it only makes system
    // calls that are async-signal-safe (`stat` with a path on the stack, `write` of a byte on
    // the stack, `_exit`) before it leaves.
    let pid = unsafe { libc::syscall(libc::SYS_clone, a, b, zero, zero, zero) };
    if pid == 0 {
        let _ = rustix::io::write(&w, &[task_count().min(255) as u8]);
        exit_now(0);
    }
    drop(w);
    if pid < 0 {
        return None;
    }
    // The child holds the only write end now: EOF if it died before it wrote.
    let mut byte = [0u8; 1];
    let count = loop {
        match rustix::io::read(&r, &mut byte) {
            Ok(1) => break Some(usize::from(byte[0])),
            Err(rustix::io::Errno::INTR) => continue,
            _ => break None,
        }
    };
    // Reap it; ECHILD when the kernel or a handler did already. A pid from clone fits a pid_t.
    if let Some(pid) = rustix::process::Pid::from_raw(pid as libc::pid_t) {
        while let Err(rustix::io::Errno::INTR) =
            rustix::process::waitpid(Some(pid), rustix::process::WaitOptions::empty())
        {}
    }
    count
}

/// The number of CPUs this process may run on (`sched_getaffinity`, what `nproc` prints).
pub(crate) fn cpu_count() -> usize {
    rustix::thread::sched_getaffinity(None).map_or(1, |set| set.count().max(1) as usize)
}

/// `setsockopt(IPPROTO_TCP, TCP_DEFER_ACCEPT, secs)`: the kernel completes `accept` only once
/// the client has sent data (or `secs` passed). Not in `rustix`.
pub(crate) fn set_tcp_defer_accept(fd: std::os::fd::BorrowedFd<'_>, secs: u32) -> Result<()> {
    use std::os::fd::AsRawFd;
    let v: libc::c_int = secs.min(i32::MAX as u32) as libc::c_int;
    // SAFETY: `fd` is a live socket borrowed for the call; the option value points to a c_int
    // that lives across the call, and its size is passed.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_DEFER_ACCEPT,
            (&v as *const libc::c_int).cast(),
            core::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(Error::os(
            "setsockopt(TCP_DEFER_ACCEPT)",
            rustix::io::Errno::from_raw_os_error(errno()),
        ));
    }
    Ok(())
}

/// Whether [`take_inherited_fds`] ran in this process (or in the parent it was forked from).
static INHERITED_TAKEN: AtomicBool = AtomicBool::new(false);

/// Takes ownership of the `n` descriptors `first..first + n` that this process inherited at
/// numbers fixed by a protocol (systemd's `LISTEN_FDS`: from 3). Each entry is the number and
/// the descriptor, or `None` when that number is not open.
///
/// Works once per process: a second call returns `None` and takes nothing, so that no number is
/// ever owned twice (the caller checked that the fds were meant for this process, as
/// `LISTEN_PID` says). Numbers above `i32::MAX` are not taken.
pub(crate) fn take_inherited_fds(first: RawFd, n: usize) -> Option<Vec<(RawFd, Option<OwnedFd>)>> {
    if INHERITED_TAKEN.swap(true, core::sync::atomic::Ordering::AcqRel) {
        return None;
    }
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let Some(raw) = i32::try_from(i).ok().and_then(|i| first.checked_add(i)) else {
            break;
        };
        // SAFETY: F_GETFD only reads the descriptor's flags; on a number that is not open it
        // fails with EBADF and has no effect.
        let open = unsafe { libc::fcntl(raw, libc::F_GETFD) } != -1;
        // SAFETY: the descriptor is open, it was passed to this process by its parent for this
        // purpose (the caller checked LISTEN_PID), and nothing else in the process owns it: the
        // crate takes these numbers once per process (INHERITED_TAKEN above), and the protocol
        // reserves them for the service manager's sockets.
        let fd = open.then(|| unsafe { OwnedFd::from_raw_fd(raw) });
        out.push((raw, fd));
    }
    Some(out)
}

/// `fork(2)`.
///
/// The caller must make sure the process has one thread (the crate checks this when the cluster
/// starts): the child then is a faithful copy and may allocate, lock and run any code.
pub(crate) fn fork() -> Result<Forked> {
    // SAFETY: fork has no memory-safety preconditions of its own. The hazard of forking a
    // multi-threaded process (locks held by threads that do not exist in the child) is ruled out
    // by the single-thread check in `Builder::start`, and the child gets a copy of all memory, so
    // every reference stays valid in both processes.
    let pid = unsafe { libc::fork() };
    match pid {
        -1 => Err(Error::os(
            "fork",
            rustix::io::Errno::from_raw_os_error(errno()),
        )),
        0 => Ok(Forked::Child),
        // A positive pid is never zero.
        n => Ok(Forked::Parent(
            rustix::process::Pid::from_raw(n).ok_or(Error::Invalid("fork returned pid 0"))?,
        )),
    }
}

fn errno() -> i32 {
    std::io::Error::last_os_error()
        .raw_os_error()
        .unwrap_or(libc::EIO)
}

/// Leaves the process at once with `code`, without atexit handlers or stdio flushing (for a
/// child whose parent state must not run twice).
pub(crate) fn exit_now(code: i32) -> ! {
    // SAFETY: `_exit` is always safe to call; it does not return.
    unsafe { libc::_exit(code) }
}

mod creds;
mod exec;
pub(crate) use creds::*;
pub(crate) use exec::*;

/// A set of signals, blocked in this process and read from a `signalfd`.
pub(crate) struct SignalSet {
    set: libc::sigset_t,
    old: libc::sigset_t,
    /// `old` holds the mask from before `block_and_open`.
    blocked: bool,
}

impl SignalSet {
    /// A set of the given signal numbers.
    pub(crate) fn new(signals: &[i32]) -> Self {
        // SAFETY: an all-zero `sigset_t` is a valid value to hand to sigemptyset, which then
        // initializes it; `sigaddset` with a valid signal number only sets a bit.
        unsafe {
            let mut set: libc::sigset_t = core::mem::zeroed();
            libc::sigemptyset(&mut set);
            for &s in signals {
                libc::sigaddset(&mut set, s);
            }
            SignalSet {
                set,
                old: core::mem::zeroed(),
                blocked: false,
            }
        }
    }

    /// Blocks the set (`sigprocmask(SIG_BLOCK)`), remembering the previous mask, and returns a
    /// nonblocking, close-on-exec `signalfd` that reads them.
    pub(crate) fn block_and_open(&mut self) -> Result<OwnedFd> {
        // SAFETY: both pointers are to live `sigset_t` values owned by `self`.
        let rc = unsafe { libc::sigprocmask(libc::SIG_BLOCK, &self.set, &mut self.old) };
        if rc != 0 {
            return Err(Error::os(
                "sigprocmask",
                rustix::io::Errno::from_raw_os_error(errno()),
            ));
        }
        self.blocked = true;
        // SAFETY: -1 asks for a new fd; the mask pointer is valid for the call.
        let fd = unsafe { libc::signalfd(-1, &self.set, libc::SFD_CLOEXEC | libc::SFD_NONBLOCK) };
        if fd < 0 {
            let e = errno();
            self.restore();
            return Err(Error::os(
                "signalfd",
                rustix::io::Errno::from_raw_os_error(e),
            ));
        }
        // SAFETY: signalfd returned a new fd that nothing else owns.
        Ok(unsafe { OwnedFd::from_raw_fd(fd) })
    }

    /// Restores the mask that was in force before [`block_and_open`](Self::block_and_open)
    /// (nothing if it never blocked).
    pub(crate) fn restore(&mut self) {
        if !core::mem::take(&mut self.blocked) {
            return;
        }
        // SAFETY: `old` is a valid `sigset_t`, filled by sigprocmask.
        unsafe { libc::sigprocmask(libc::SIG_SETMASK, &self.old, core::ptr::null_mut()) };
    }
}

/// Resets a forked child's signal state: every signal's disposition back to `SIG_DFL` except
/// those the process ignored at the time the cluster started, and an empty signal mask.
pub(crate) fn reset_child_signals(ignored: &[i32]) {
    // SAFETY: sigaction with a zeroed struct and SIG_DFL handler is valid for every catchable
    // signal; SIGKILL/SIGSTOP and out-of-range numbers fail with EINVAL, which is ignored.
    // sigprocmask with an empty set is always valid.
    unsafe {
        let mut dfl: libc::sigaction = core::mem::zeroed();
        dfl.sa_sigaction = libc::SIG_DFL;
        for sig in 1..libc::SIGRTMIN() {
            if sig == libc::SIGKILL || sig == libc::SIGSTOP || ignored.contains(&sig) {
                continue;
            }
            libc::sigaction(sig, &dfl, core::ptr::null_mut());
        }
        let mut empty: libc::sigset_t = core::mem::zeroed();
        libc::sigemptyset(&mut empty);
        libc::sigprocmask(libc::SIG_SETMASK, &empty, core::ptr::null_mut());
    }
}

/// The pid of a child that has exited and is waiting to be reaped, without reaping it
/// (`waitid(P_ALL, WEXITED | WNOHANG | WNOWAIT)`; `rustix`'s `waitid` does not give the pid).
/// `None` when no child has exited (or there is no child).
pub(crate) fn peek_exited_child() -> Option<u32> {
    // SAFETY: an all-zero siginfo_t is a valid out-value; waitid writes it and reads nothing.
    let mut info: libc::siginfo_t = unsafe { core::mem::zeroed() };
    loop {
        // SAFETY: `info` is a valid out-pointer for the call; P_ALL takes no id.
        let rc = unsafe {
            libc::waitid(
                libc::P_ALL,
                0,
                &mut info,
                libc::WEXITED | libc::WNOHANG | libc::WNOWAIT,
            )
        };
        if rc == 0 {
            break;
        }
        if errno() != libc::EINTR {
            return None;
        }
    }
    // SAFETY: after a successful waitid, si_pid is set (0 when no child had exited).
    let pid = unsafe { info.si_pid() };
    (pid > 0).then_some(pid as u32)
}

/// Sets `sig` back to its default disposition; true when it was ignored (`SIG_IGN`) before,
/// for [`ignore`] to restore.
pub(crate) fn set_default(sig: i32) -> bool {
    let was = is_ignored(sig);
    // SAFETY: sigaction with a zeroed struct and SIG_DFL handler is valid for a catchable
    // signal; the old action is not needed (is_ignored read it).
    unsafe {
        let mut dfl: libc::sigaction = core::mem::zeroed();
        dfl.sa_sigaction = libc::SIG_DFL;
        libc::sigaction(sig, &dfl, core::ptr::null_mut());
    }
    was
}

/// Sets `sig` to `SIG_IGN`.
pub(crate) fn ignore(sig: i32) {
    // SAFETY: as in `set_default`, with the SIG_IGN handler.
    unsafe {
        let mut ign: libc::sigaction = core::mem::zeroed();
        ign.sa_sigaction = libc::SIG_IGN;
        libc::sigaction(sig, &ign, core::ptr::null_mut());
    }
}

/// Whether `sig` is ignored (`SIG_IGN`) in this process now.
pub(crate) fn is_ignored(sig: i32) -> bool {
    // SAFETY: a null new action only queries; `old` is a valid out-pointer.
    unsafe {
        let mut old: libc::sigaction = core::mem::zeroed();
        libc::sigaction(sig, core::ptr::null(), &mut old) == 0 && old.sa_sigaction == libc::SIG_IGN
    }
}

/// A shared, anonymous mapping of `pages` pages of `u32` counters, made before fork so that
/// primary and workers see the same memory. Pages are only backed once written.
pub(crate) struct SharedPages {
    ptr: *mut AtomicU32,
    pages: usize,
    page: usize,
}

impl SharedPages {
    /// Maps `pages` zeroed pages.
    pub(crate) fn new(pages: usize) -> Result<Self> {
        let page = rustix::param::page_size();
        let bytes = pages.max(1) * page;
        // SAFETY: a fresh anonymous mapping at an address the kernel picks aliases nothing.
        let ptr = unsafe {
            rustix::mm::mmap_anonymous(
                core::ptr::null_mut(),
                bytes,
                rustix::mm::ProtFlags::READ | rustix::mm::ProtFlags::WRITE,
                rustix::mm::MapFlags::SHARED,
            )
        }
        .map_err(|e| Error::os("mmap", e))?;
        Ok(SharedPages {
            ptr: ptr.cast(),
            pages: pages.max(1),
            page,
        })
    }

    /// The counters of page `i` (empty past the end).
    pub(crate) fn page(&self, i: usize) -> &[AtomicU32] {
        if i >= self.pages {
            return &[];
        }
        let words = self.page / core::mem::size_of::<AtomicU32>();
        // SAFETY: page `i` lies inside the mapping made in `new`, which is page-aligned,
        // zero-initialized and valid for the life of `self` (only `keep_only` unmaps parts of
        // it, and then only pages other than the one the process still uses, as its contract
        // says); `AtomicU32` has the layout of `u32`, and every access is atomic, so writes by
        // other processes sharing the pages are not data races.
        unsafe { core::slice::from_raw_parts(self.ptr.add(i * words), words) }
    }

    /// In a forked worker: unmaps every page but page `i`, so that this process can no longer
    /// read or write the other workers' counters. The process must not touch any other page
    /// afterwards.
    pub(crate) fn keep_only(&self, i: usize) {
        let base = self.ptr.cast::<u8>();
        let total = self.pages * self.page;
        let start = (i.min(self.pages)) * self.page;
        let end = (start + self.page).min(total);
        // SAFETY: both ranges lie inside the mapping made in `new` and are page-aligned; no
        // reference into them is used again in this process (the contract above).
        unsafe {
            if start > 0 {
                let _ = rustix::mm::munmap(base.cast(), start);
            }
            if end < total {
                let _ = rustix::mm::munmap(base.add(end).cast(), total - end);
            }
        }
    }
}

impl Drop for SharedPages {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly the region mapped in `new` (parts already unmapped by
        // `keep_only` are no error); no reference outlives `self`.
        unsafe {
            let _ = rustix::mm::munmap(self.ptr.cast(), self.pages * self.page);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::sync::atomic::Ordering;
    use std::ffi::CString;

    #[test]
    fn user_and_group_lookups() {
        let root = CString::new("root").unwrap();
        let (uid, gid, name) = user_by_name(&root)
            .unwrap()
            .expect("root is in /etc/passwd");
        assert_eq!((uid, gid, name.as_c_str()), (0, 0, root.as_c_str()));
        let (_, gid, name) = user_by_id(0).unwrap().expect("uid 0 is in /etc/passwd");
        assert_eq!((gid, name.as_c_str()), (0, root.as_c_str()));
        assert_eq!(group_by_name(&root).unwrap(), Some(0));
        assert!(group_list(&root, 0).unwrap().contains(&0));
        let none = CString::new("no-such-user-forkcluster").unwrap();
        assert_eq!(user_by_name(&none).unwrap(), None);
        assert_eq!(group_by_name(&none).unwrap(), None);
        assert_eq!(user_by_id(4_000_000_000).unwrap(), None);
        let (u, g) = credentials();
        assert_eq!(u[0], rustix::process::getuid().as_raw());
        assert_eq!(g[1], rustix::process::getegid().as_raw());
    }

    #[test]
    fn shared_pages_are_shared_across_fork_and_a_child_keeps_only_its_own() {
        let s = SharedPages::new(3).unwrap();
        match fork().unwrap() {
            Forked::Child => {
                s.keep_only(1);
                s.page(1)[2].store(42, Ordering::Release);
                exit_now(0);
            }
            Forked::Parent(pid) => {
                let (_, st) =
                    rustix::process::waitpid(Some(pid), rustix::process::WaitOptions::empty())
                        .unwrap()
                        .unwrap();
                assert_eq!(st.exit_status(), Some(0));
                assert_eq!(s.page(1)[2].load(Ordering::Acquire), 42);
                assert_eq!(s.page(0)[2].load(Ordering::Acquire), 0);
                assert!(s.page(3).is_empty());
            }
        }
    }
}
