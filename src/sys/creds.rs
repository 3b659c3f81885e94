//! Users, groups and credentials: the NSS lookups (in the primary, before fork) and the
//! process-wide privilege drop (in the worker).
#![allow(unsafe_code)]

use std::ffi::{CStr, CString};

use super::errno;
use crate::error::{Error, Result};

/// A user of the user database: its uid, its primary gid and its name.
pub(crate) type PasswdEntry = (u32, u32, CString);

/// The largest buffer the `_r` lookups get (their entries are lines of `/etc/passwd` or
/// `/etc/group`, or what NSS makes of a directory service; a group with thousands of members
/// needs more than the first few kilobytes).
const LOOKUP_BUF_MAX: usize = 1 << 24;

/// Runs a `getpw*_r` call with a growing buffer. `call` gets the entry, the buffer, its length
/// and the result pointer, as the `_r` functions do, and returns their return value.
fn passwd_lookup(
    what: &'static str,
    mut call: impl FnMut(*mut libc::passwd, *mut libc::c_char, usize, *mut *mut libc::passwd) -> i32,
) -> Result<Option<PasswdEntry>> {
    let mut buf: Vec<u8> = vec![0; 1024];
    loop {
        // SAFETY: an all-zero `passwd` (null pointers, zero ids) is a valid value to be
        // overwritten by the call.
        let mut pw: libc::passwd = unsafe { core::mem::zeroed() };
        let mut res: *mut libc::passwd = core::ptr::null_mut();
        let rc = call(&mut pw, buf.as_mut_ptr().cast(), buf.len(), &mut res);
        if !nss_found(rc, res.is_null(), &mut buf, what)? {
            if buf.is_empty() {
                return Ok(None);
            }
            continue;
        }
        // SAFETY: on success `pw.pw_name` points to a NUL-terminated string inside `buf`,
        // which is alive and unchanged here.
        let name = unsafe { CStr::from_ptr(pw.pw_name) }.to_owned();
        return Ok(Some((pw.pw_uid, pw.pw_gid, name)));
    }
}

/// The outcome of one `get*_r` call: `Ok(true)` found; `Ok(false)` with `buf` grown, try again
/// (`ERANGE`); `Ok(false)` with `buf` emptied, there is no such entry (glibc and musl say so
/// with 0 and a null result; POSIX allows `ENOENT`, `ESRCH`, `EBADF`, `EPERM` too).
fn nss_found(rc: i32, res_null: bool, buf: &mut Vec<u8>, what: &'static str) -> Result<bool> {
    if rc == libc::ERANGE && buf.len() < LOOKUP_BUF_MAX {
        let n = buf.len() * 4;
        buf.resize(n, 0);
        return Ok(false);
    }
    if res_null
        && matches!(
            rc,
            0 | libc::ENOENT | libc::ESRCH | libc::EBADF | libc::EPERM
        )
    {
        buf.clear();
        return Ok(false);
    }
    if rc != 0 || res_null {
        return Err(Error::os(what, rustix::io::Errno::from_raw_os_error(rc)));
    }
    Ok(true)
}

/// Looks a user up by name (`getpwnam_r`): uid, primary gid, name. `None` when there is none.
/// Runs NSS: call it in the primary only, before fork.
pub(crate) fn user_by_name(name: &CStr) -> Result<Option<PasswdEntry>> {
    passwd_lookup("getpwnam_r", |pw, buf, len, res| {
        // SAFETY: `name` is NUL-terminated; `pw`, `buf` (of `len` bytes) and `res` are valid
        // for writes for the duration of the call (passwd_lookup owns them).
        unsafe { libc::getpwnam_r(name.as_ptr(), pw, buf, len, res) }
    })
}

/// Looks a user up by uid (`getpwuid_r`). Primary only, before fork.
pub(crate) fn user_by_id(uid: u32) -> Result<Option<PasswdEntry>> {
    passwd_lookup("getpwuid_r", |pw, buf, len, res| {
        // SAFETY: `pw`, `buf` (of `len` bytes) and `res` are valid for writes for the duration
        // of the call (passwd_lookup owns them).
        unsafe { libc::getpwuid_r(uid, pw, buf, len, res) }
    })
}

/// Looks a group up by name (`getgrnam_r`): its gid. Primary only, before fork.
pub(crate) fn group_by_name(name: &CStr) -> Result<Option<u32>> {
    let mut buf: Vec<u8> = vec![0; 1024];
    loop {
        // SAFETY: an all-zero `group` is a valid value to be overwritten by the call.
        let mut gr: libc::group = unsafe { core::mem::zeroed() };
        let mut res: *mut libc::group = core::ptr::null_mut();
        // SAFETY: `name` is NUL-terminated; `gr`, `buf` and `res` are valid for writes for the
        // duration of the call, and `buf.len()` is the buffer's length.
        let rc = unsafe {
            libc::getgrnam_r(
                name.as_ptr(),
                &mut gr,
                buf.as_mut_ptr().cast(),
                buf.len(),
                &mut res,
            )
        };
        if !nss_found(rc, res.is_null(), &mut buf, "getgrnam_r")? {
            if buf.is_empty() {
                return Ok(None);
            }
            continue;
        }
        return Ok(Some(gr.gr_gid));
    }
}

/// The groups `user` belongs to, `gid` included (`getgrouplist`, what `initgroups` would set).
/// Primary only, before fork.
pub(crate) fn group_list(user: &CStr, gid: u32) -> Result<Vec<u32>> {
    let mut cap: usize = 64;
    loop {
        let mut groups: Vec<libc::gid_t> = vec![0; cap];
        let mut n: libc::c_int = cap as libc::c_int;
        // SAFETY: `user` is NUL-terminated, `groups` has room for `n` entries, and `n` is a
        // valid in/out pointer.
        let rc = unsafe { libc::getgrouplist(user.as_ptr(), gid, groups.as_mut_ptr(), &mut n) };
        if rc >= 0 {
            groups.truncate((n.max(0) as usize).min(cap));
            return Ok(groups);
        }
        // Too small: glibc says how many it needs in `n`; grow to that (or double).
        let want = (n.max(0) as usize).max(cap * 2);
        if cap > MAX_GROUPS {
            return Err(Error::Invalid(
                "the user is in more groups than the kernel allows (NGROUPS_MAX, 65536)",
            ));
        }
        cap = want.min(MAX_GROUPS + 1);
    }
}

/// The kernel's bound on supplementary groups (`NGROUPS_MAX`).
pub(crate) const MAX_GROUPS: usize = 65536;

/// Changes this process's credentials for good: supplementary groups, then real, effective and
/// saved gid, then real, effective and saved uid, in that order (once the uid is not root, the
/// groups could no longer change).
///
/// Through libc's `setgroups`/`setresgid`/`setresuid`, not `rustix`'s `set_thread_*`: Linux
/// keeps credentials per thread and the raw system calls change only the calling thread, while
/// glibc and musl apply these to every thread of the process (glibc's `setxid` broadcast, musl's
/// `__synccall`). A worker is single-threaded when this runs (a fork of the single-threaded
/// primary), so both would do today; the process-wide calls stay right if that ever changes.
pub(crate) fn set_credentials(uid: u32, gid: u32, groups: &[u32]) -> Result<()> {
    // SAFETY: `groups` is a valid slice of gid_t (u32) of the given length, only read.
    if unsafe { libc::setgroups(groups.len() as _, groups.as_ptr()) } != 0 {
        return Err(Error::os(
            "setgroups",
            rustix::io::Errno::from_raw_os_error(errno()),
        ));
    }
    // SAFETY: setresgid takes plain integers.
    if unsafe { libc::setresgid(gid, gid, gid) } != 0 {
        return Err(Error::os(
            "setresgid",
            rustix::io::Errno::from_raw_os_error(errno()),
        ));
    }
    // SAFETY: setresuid takes plain integers.
    if unsafe { libc::setresuid(uid, uid, uid) } != 0 {
        return Err(Error::os(
            "setresuid",
            rustix::io::Errno::from_raw_os_error(errno()),
        ));
    }
    Ok(())
}

/// This process's supplementary groups, into `buf` (`getgroups`): how many, or `None` when
/// there are more than `buf` holds. Allocates nothing.
pub(crate) fn groups_into(buf: &mut [u32]) -> Result<Option<usize>> {
    let cap = buf.len().min(i32::MAX as usize) as libc::c_int;
    // SAFETY: `buf` has room for `cap` gid_t (u32) values, written by the call.
    let n = unsafe { libc::getgroups(cap, buf.as_mut_ptr()) };
    if n < 0 {
        let e = errno();
        if e == libc::EINVAL {
            return Ok(None);
        }
        return Err(Error::os(
            "getgroups",
            rustix::io::Errno::from_raw_os_error(e),
        ));
    }
    Ok(Some(n as usize))
}

/// This process's (real, effective, saved) uid and (real, effective, saved) gid.
pub(crate) fn credentials() -> ([u32; 3], [u32; 3]) {
    let (mut u, mut g) = ([u32::MAX; 3], [u32::MAX; 3]);
    // SAFETY: the six pointers are to distinct live u32s (uid_t and gid_t are u32 on Linux).
    unsafe {
        let [ur, ue, us] = &mut u;
        libc::getresuid(ur, ue, us);
        let [gr, ge, gs] = &mut g;
        libc::getresgid(gr, ge, gs);
    }
    (u, g)
}

/// Whether `setuid(0)` succeeds now. After a drop to a user other than root it must fail with
/// `EPERM`; `true` means the drop did not hold, and the process may now be root: it must exit.
pub(crate) fn setuid_root_works() -> bool {
    // SAFETY: setuid takes a plain integer.
    unsafe { libc::setuid(0) == 0 }
}

/// Whether `setgid(0)` succeeds now (as [`setuid_root_works`], for a drop to a group other than
/// root).
pub(crate) fn setgid_root_works() -> bool {
    // SAFETY: setgid takes a plain integer.
    unsafe { libc::setgid(0) == 0 }
}
