//! Deployment: the workers' user and groups (privilege separation), the CPU each one runs on,
//! process names, and the open-file limit.
//!
//! Everything that looks something up is resolved once, in the primary, when the cluster starts
//! ([`Options::resolve`]: the user and group databases, the CPUs this process may run on, and
//! `setrlimit`), so a forked worker makes no NSS call. Each worker then applies the result
//! ([`Deploy::enter`]) right after fork, before the worker function: its name, its CPU, and the
//! privilege drop, verified.

use std::ffi::{CStr, CString};

use arrayvec::ArrayVec;
use rustix::process::{Pid, Resource, Signal};
use rustix::thread::CpuSet;

use crate::error::{Call, Error, Result};
use crate::sys;

/// The exit code of a worker whose privilege drop failed or did not verify (see
/// [`Builder::user`](crate::Builder::user)): it exits with this code before the worker function
/// runs, so that no application code ever runs with the primary's privileges. The primary sees
/// an [`Event::Exit`](crate::Event::Exit) with this code, as for a crash at start-up (respawned
/// with backoff, unless it is the [`fatal_exit_code`](crate::Builder::fatal_exit_code)).
pub const EXIT_PRIVSEP_FAILED: i32 = 123;

/// The default prefix of the workers' process names: `fc-worker-3` (see
/// [`Builder::worker_name`](crate::Builder::worker_name)).
pub const DEFAULT_WORKER_NAME: &str = "fc-worker";

/// The longest process name Linux keeps (`PR_SET_NAME`, `/proc/PID/comm`): 15 bytes.
const COMM_MAX: usize = 15;

/// A user or a group, by name or by number.
///
/// A name that the database does not know but that is all digits is taken as the number, so a
/// command line's `--user 65534` works as well as `--user nobody`.
///
/// # Example
///
/// ```
/// use forkcluster::NameOrId;
///
/// assert_eq!(NameOrId::from("nobody"), NameOrId::Name("nobody".into()));
/// assert_eq!(NameOrId::from(65534), NameOrId::Id(65534));
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NameOrId {
    /// A name in the user (`/etc/passwd`) or group (`/etc/group`) database.
    Name(String),
    /// A uid or gid.
    Id(u32),
}

impl From<&str> for NameOrId {
    fn from(s: &str) -> Self {
        NameOrId::Name(s.to_string())
    }
}

impl From<String> for NameOrId {
    fn from(s: String) -> Self {
        NameOrId::Name(s)
    }
}

impl From<u32> for NameOrId {
    fn from(id: u32) -> Self {
        NameOrId::Id(id)
    }
}

/// The supplementary groups of workers that run as another user
/// ([`Builder::supplementary_groups`](crate::Builder::supplementary_groups)).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Groups {
    /// The user's groups from the group database (`getgrouplist`, as `login` and `su` set
    /// them), the worker's group included. The default.
    #[default]
    User,
    /// No supplementary group: the worker has only its group.
    None,
}

/// Which CPU each worker runs on ([`Builder::cpu_affinity`](crate::Builder::cpu_affinity)).
///
/// Workers are placed by their slot in the worker table: the first `n` workers have slots
/// `0..n`, and a worker that replaces another (respawn, rolling restart) takes the lowest free
/// slot, usually the one it replaces. Slot `i` runs on the `i`-th CPU of the list, modulo its
/// length.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Affinity {
    /// The CPUs this process may run on when the cluster starts (`sched_getaffinity`, what
    /// `nproc` counts), in order: worker slot `i` on allowed CPU `i` modulo their number, like
    /// nginx's `worker_cpu_affinity auto`.
    Auto,
    /// These CPU numbers, in order: slot `i` on `list[i % list.len()]`. Each must be one this
    /// process may run on.
    List(Vec<usize>),
}

/// Resolves the user and group in the primary (NSS lookups); see [`Options::ids_fn`].
pub(crate) type IdsFn = fn(&Options) -> Result<Option<Ids>>;

/// What the builder was asked for.
#[derive(Debug, Clone, Default)]
pub(crate) struct Options {
    /// Set by `Builder::user` and `Builder::group` only: the lookups and the privilege drop
    /// (libc's NSS and credential code, about 15 kB in a static musl binary) are reached through
    /// this pointer, so a program that never asks for a user does not link them.
    pub(crate) ids_fn: Option<IdsFn>,
    pub(crate) user: Option<NameOrId>,
    pub(crate) group: Option<NameOrId>,
    pub(crate) groups: Groups,
    pub(crate) dumpable: Option<bool>,
    pub(crate) no_new_privs: bool,
    pub(crate) affinity: Option<Affinity>,
    pub(crate) nofile: Option<u64>,
    pub(crate) worker_name: Option<String>,
    pub(crate) primary_name: Option<String>,
}

/// The ids a worker drops to, resolved before the first fork.
#[derive(Debug, Clone)]
pub(crate) struct Ids {
    pub(crate) uid: u32,
    pub(crate) gid: u32,
    /// Sorted, without duplicates.
    pub(crate) groups: Vec<u32>,
    /// The drop itself, in the worker ([`drop_to`]; a pointer for the reason given at
    /// [`Options::ids_fn`]).
    pub(crate) drop: fn(&Ids) -> Result<()>,
}

/// What each worker applies after fork, resolved in the primary.
#[derive(Debug, Clone, Default)]
pub(crate) struct Deploy {
    /// `None`: the workers keep the primary's credentials.
    pub(crate) ids: Option<Ids>,
    /// `Some(d)`: `PR_SET_DUMPABLE` to `d` in each worker.
    pub(crate) dumpable: Option<bool>,
    pub(crate) no_new_privs: bool,
    /// Empty: no pinning.
    pub(crate) cpus: Vec<usize>,
    /// The process-name prefix; empty: workers keep the program's name.
    pub(crate) name: ArrayVec<u8, COMM_MAX>,
    /// The `RLIMIT_NOFILE` soft limit in force after start (`None`: unlimited).
    pub(crate) nofile: Option<u64>,
}

/// The longest prefix of `s` of at most `max` bytes that ends on a character boundary.
fn truncate(s: &str, max: usize) -> &str {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

fn cstring(s: &str, why: &'static str) -> Result<CString> {
    CString::new(s).map_err(|_| Error::Invalid(why))
}

/// Sorts `v` and removes duplicates: a heapsort, because the standard library's sort costs a
/// static binary several kilobytes (this runs once per start and once per worker, on a user's
/// groups: at most 65536 of them).
fn sort_dedup(v: &mut Vec<u32>) {
    sort_in_place(v);
    v.dedup();
}

/// The heapsort of [`sort_dedup`], in place, without allocating.
fn sort_in_place(v: &mut [u32]) {
    fn sift_down(v: &mut [u32], mut root: usize, end: usize) {
        loop {
            let mut child = 2 * root + 1;
            if child >= end {
                return;
            }
            if child + 1 < end && v[child] < v[child + 1] {
                child += 1;
            }
            if v[root] >= v[child] {
                return;
            }
            v.swap(root, child);
            root = child;
        }
    }
    let n = v.len();
    for i in (0..n / 2).rev() {
        sift_down(v, i, n);
    }
    for end in (1..n).rev() {
        v.swap(0, end);
        sift_down(v, 0, end);
    }
}

/// `s` as a number when it is all ASCII digits.
fn digits(s: &str) -> Option<u32> {
    (!s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
        .then(|| s.parse().ok())
        .flatten()
}

/// A user: (uid, its primary gid and name when the database has it).
fn resolve_user(u: &NameOrId) -> Result<(u32, Option<(u32, CString)>)> {
    match u {
        NameOrId::Name(name) => {
            let c = cstring(name, "the user name contains a NUL byte")?;
            match sys::user_by_name(&c)? {
                Some((uid, gid, name)) => Ok((uid, Some((gid, name)))),
                None => match digits(name) {
                    Some(uid) => resolve_user(&NameOrId::Id(uid)),
                    None => Err(Error::Invalid("no such user (getpwnam_r found none)")),
                },
            }
        }
        NameOrId::Id(uid) => Ok((
            *uid,
            sys::user_by_id(*uid)?.map(|(_, gid, name)| (gid, name)),
        )),
    }
}

fn resolve_group(g: &NameOrId) -> Result<u32> {
    match g {
        NameOrId::Name(name) => {
            let c = cstring(name, "the group name contains a NUL byte")?;
            match sys::group_by_name(&c)? {
                Some(gid) => Ok(gid),
                None => digits(name).ok_or(Error::Invalid("no such group (getgrnam_r found none)")),
            }
        }
        NameOrId::Id(gid) => Ok(*gid),
    }
}

impl Options {
    /// Resolves everything in the primary, before the first fork: user and group lookups
    /// (NSS), the allowed CPUs, the names; then, once nothing can fail any more but the
    /// system calls themselves, raises `RLIMIT_NOFILE` and names the primary.
    pub(crate) fn resolve(self) -> Result<Deploy> {
        let ids = match self.ids_fn {
            Some(f) => f(&self)?,
            None => None,
        };
        let cpus = match &self.affinity {
            None => Vec::new(),
            Some(a) => {
                let allowed = rustix::thread::sched_getaffinity(None).call("sched_getaffinity")?;
                match a {
                    Affinity::Auto => (0..CpuSet::MAX_CPU)
                        .filter(|&c| allowed.is_set(c))
                        .collect(),
                    Affinity::List(list) => {
                        if list.is_empty() {
                            return Err(Error::Invalid("cpu_affinity: the CPU list is empty"));
                        }
                        if list
                            .iter()
                            .any(|&c| c >= CpuSet::MAX_CPU || !allowed.is_set(c))
                        {
                            return Err(Error::Invalid(
                                "cpu_affinity: a listed CPU is not one this process may run on (sched_getaffinity)",
                            ));
                        }
                        list.clone()
                    }
                }
            }
        };
        let prefix = self.worker_name.as_deref().unwrap_or(DEFAULT_WORKER_NAME);
        if prefix.contains('\0') {
            return Err(Error::Invalid("worker_name contains a NUL byte"));
        }
        let mut name = ArrayVec::new();
        // Cannot fail: at most COMM_MAX bytes.
        let _ = name.try_extend_from_slice(truncate(prefix, COMM_MAX).as_bytes());
        let primary_name = match &self.primary_name {
            Some(n) if n.contains('\0') => {
                return Err(Error::Invalid("primary_name contains a NUL byte"))
            }
            Some(n) => {
                let mut c: ArrayVec<u8, 16> = ArrayVec::new();
                // Cannot fail: at most COMM_MAX bytes and the NUL.
                let _ = c.try_extend_from_slice(truncate(n, COMM_MAX).as_bytes());
                c.push(0);
                Some(c)
            }
            None => None,
        };
        let changes = ids.as_ref().is_some_and(|i| {
            i.uid != rustix::process::getuid().as_raw()
                || i.gid != rustix::process::getgid().as_raw()
        });
        let dumpable = match self.dumpable {
            Some(d) => Some(d),
            // The kernel already clears the flag when the ids change (unless
            // fs.suid_dumpable says otherwise): the crate makes it explicit.
            None if changes => Some(false),
            None => None,
        };
        let nofile = raise_nofile(self.nofile)?;
        if let Some(n) = primary_name {
            if let Ok(c) = CStr::from_bytes_with_nul(&n) {
                rustix::thread::set_name(c).call("prctl(PR_SET_NAME)")?;
            }
        }
        Ok(Deploy {
            ids,
            dumpable,
            no_new_privs: self.no_new_privs,
            cpus,
            name,
            nofile,
        })
    }

    /// The [`IdsFn`]: resolves the user and the group, or `None` when nothing changes.
    pub(crate) fn resolve_ids(&self) -> Result<Option<Ids>> {
        if self.user.is_none() && self.group.is_none() {
            return Ok(None);
        }
        let me_uid = rustix::process::getuid().as_raw();
        let me_gid = rustix::process::getgid().as_raw();
        let (uid, entry) = match &self.user {
            Some(u) => resolve_user(u)?,
            None => (me_uid, None),
        };
        let gid = match (&self.group, &entry) {
            (Some(g), _) => resolve_group(g)?,
            (None, Some((gid, _))) => *gid,
            (None, None) => {
                return Err(Error::Invalid(
                    "the user has no entry in the user database: give the workers' group too (Builder::group)",
                ))
            }
        };
        if uid == u32::MAX || gid == u32::MAX {
            return Err(Error::Invalid("uid and gid 4294967295 (-1) are not ids"));
        }
        let mut groups = match (self.groups, &entry, &self.user) {
            (Groups::None, _, _) => Vec::new(),
            (Groups::User, Some((_, name)), Some(_)) => sys::group_list(name, gid)?,
            // A user without a database entry, or only a group: that group alone.
            (Groups::User, _, _) => vec![gid],
        };
        sort_dedup(&mut groups);
        if groups.len() > sys::MAX_GROUPS {
            return Err(Error::Invalid(
                "more supplementary groups than the kernel allows (65536)",
            ));
        }
        if !rustix::process::geteuid().is_root() {
            if uid != me_uid || gid != me_gid {
                return Err(Error::Invalid(
                    "workers can run as another user or group only when the primary runs as root",
                ));
            }
            // Already those ids; an unprivileged process could not change its groups anyway.
            return Ok(None);
        }
        Ok(Some(Ids {
            uid,
            gid,
            groups,
            drop: drop_to,
        }))
    }
}

/// Raises the soft `RLIMIT_NOFILE` to `want`, capped at the hard limit (never lowers it), and
/// returns the soft limit in force (`None`: unlimited).
fn raise_nofile(want: Option<u64>) -> Result<Option<u64>> {
    let lim = rustix::process::getrlimit(Resource::Nofile);
    let Some(want) = want else {
        return Ok(lim.current);
    };
    let target = match lim.maximum {
        Some(hard) => want.min(hard),
        None => want,
    };
    if lim.current.is_some_and(|cur| cur < target) {
        rustix::process::setrlimit(
            Resource::Nofile,
            rustix::process::Rlimit {
                current: Some(target),
                maximum: lim.maximum,
            },
        )
        .call("setrlimit(RLIMIT_NOFILE)")?;
    }
    Ok(rustix::process::getrlimit(Resource::Nofile).current)
}

/// `{prefix}-{id}`, NUL-terminated, at most [`COMM_MAX`] bytes before the NUL: the prefix is
/// cut so that the id stays whole.
fn worker_comm(prefix: &[u8], id: u32) -> ArrayVec<u8, 16> {
    let mut digits: ArrayVec<u8, 10> = ArrayVec::new();
    let mut n = id;
    loop {
        digits.push(b'0' + (n % 10) as u8);
        n /= 10;
        if n == 0 {
            break;
        }
    }
    let mut keep = prefix.len().min(COMM_MAX - 1 - digits.len());
    // Not in the middle of a UTF-8 character (the prefix came from a `str`).
    while keep > 0 && keep < prefix.len() && prefix[keep] & 0xC0 == 0x80 {
        keep -= 1;
    }
    let mut out = ArrayVec::new();
    out.extend(prefix[..keep].iter().copied());
    out.push(b'-');
    out.extend(digits.iter().rev().copied());
    out.push(0);
    out
}

/// In a worker whose privilege drop failed: say why on stderr and exit before any application
/// code.
///
/// The message is formatted without allocating (an exec'd worker is between `fork` and
/// `execve` here): an OS error shows its number, not the C library's text for it.
fn privsep_failed(id: u32, e: Error) -> ! {
    use std::io::Write;
    let _ = writeln!(
        std::io::stderr(),
        "forkcluster: worker {id}: dropping privileges failed ({}); exiting with code {EXIT_PRIVSEP_FAILED}",
        NoAlloc(e)
    );
    sys::exit_now(EXIT_PRIVSEP_FAILED)
}

/// An [`Error`] shown without allocating: `Error`'s own `Display` asks `std` for the text of
/// an errno, which makes a `String`.
struct NoAlloc(Error);

impl core::fmt::Display for NoAlloc {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self.0 {
            Error::Os { call, errno } => {
                write!(f, "{call} failed: os error {}", errno.raw_os_error())
            }
            e => write!(f, "{e}"),
        }
    }
}

impl Deploy {
    /// In a forked worker, before the worker function: its name, its CPU, then the privilege
    /// drop (groups, gid, uid), verified, then `PR_SET_DUMPABLE` and `PR_SET_NO_NEW_PRIVS`. A
    /// failed drop exits with [`EXIT_PRIVSEP_FAILED`]; a failed pinning is reported on stderr
    /// and the worker runs on the CPUs it inherited (as nginx does).
    pub(crate) fn enter(&self, id: u32, slot: usize, primary: Pid) {
        if !self.name.is_empty() {
            let comm = worker_comm(&self.name, id);
            if let Ok(c) = CStr::from_bytes_with_nul(&comm) {
                let _ = rustix::thread::set_name(c);
            }
        }
        if !self.cpus.is_empty() {
            let cpu = self.cpus[slot % self.cpus.len()];
            let mut set = CpuSet::new();
            set.set(cpu);
            if let Err(e) = rustix::thread::sched_setaffinity(None, &set) {
                eprintln!(
                    "forkcluster: worker {id}: sched_setaffinity(CPU {cpu}) failed (os error {}); running unpinned",
                    e.raw_os_error()
                );
            }
        }
        if let Some(ids) = &self.ids {
            if let Err(e) = (ids.drop)(ids) {
                privsep_failed(id, e);
            }
            // A change of credentials clears the parent-death signal: set it again, and if the
            // primary died meanwhile, do not start.
            if rustix::process::set_parent_process_death_signal(Some(Signal::KILL)).is_err()
                || rustix::process::getppid() != Some(primary)
            {
                sys::exit_now(1);
            }
        }
        if let Some(d) = self.dumpable {
            let how = if d {
                rustix::process::DumpableBehavior::Dumpable
            } else {
                rustix::process::DumpableBehavior::NotDumpable
            };
            if let Err(e) = rustix::process::set_dumpable_behavior(how) {
                privsep_failed(id, Error::os("prctl(PR_SET_DUMPABLE)", e));
            }
        }
        if self.no_new_privs {
            if let Err(e) = rustix::thread::set_no_new_privs(true) {
                privsep_failed(id, Error::os("prctl(PR_SET_NO_NEW_PRIVS)", e));
            }
        }
    }
}

/// Drops to `ids` and checks that it held: every uid and gid (real, effective, saved) is the
/// target, the groups are exactly the target's, and root cannot be regained.
fn drop_to(ids: &Ids) -> Result<()> {
    sys::set_credentials(ids.uid, ids.gid, &ids.groups)?;
    let (u, g) = sys::credentials();
    if u != [ids.uid; 3] {
        return Err(Error::Invalid(
            "the uids are not the user's after setresuid",
        ));
    }
    if g != [ids.gid; 3] {
        return Err(Error::Invalid(
            "the gids are not the group's after setresgid",
        ));
    }
    // Read into the stack when the groups fit (no allocation: an exec'd worker drops its
    // privileges between fork and exec), else into the heap.
    let mut small = [0u32; 256];
    let same = match sys::groups_into(&mut small)? {
        Some(n) => {
            let now = &mut small[..n];
            sort_in_place(now);
            let mut k = 0;
            for i in 0..now.len() {
                if i == 0 || now[i] != now[i - 1] {
                    now[k] = now[i];
                    k += 1;
                }
            }
            now[..k] == ids.groups[..]
        }
        None => {
            let mut now: Vec<u32> = rustix::process::getgroups()
                .call("getgroups")?
                .into_iter()
                .map(|g| g.as_raw())
                .collect();
            sort_dedup(&mut now);
            now == ids.groups
        }
    };
    if !same {
        return Err(Error::Invalid(
            "the supplementary groups are not the ones set",
        ));
    }
    if ids.uid != 0 && sys::setuid_root_works() {
        return Err(Error::Invalid("setuid(0) succeeded after the drop"));
    }
    if ids.uid != 0 && ids.gid != 0 && sys::setgid_root_works() {
        return Err(Error::Invalid("setgid(0) succeeded after the drop"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn worker_comm_keeps_the_id_whole() {
        assert_eq!(&worker_comm(b"fc-worker", 3)[..], b"fc-worker-3\0");
        assert_eq!(&worker_comm(b"fc-worker", 12345)[..], b"fc-worker-12345\0");
        assert_eq!(&worker_comm(b"fc-worker", 123456)[..], b"fc-worke-123456\0");
        assert_eq!(
            &worker_comm(b"fc-worker", u32::MAX)[..],
            b"fc-w-4294967295\0"
        );
        assert_eq!(&worker_comm(b"", 7)[..], b"-7\0");
        let e = "wébservéé".as_bytes(); // 12 bytes
        assert_eq!(&worker_comm(e, 12)[..], "wébservéé-12\0".as_bytes());
        assert_eq!(&worker_comm(e, 123)[..], "wébservé-123\0".as_bytes());
    }

    #[test]
    fn sort_dedup_sorts_and_dedups() {
        let mut seed = 12345u32;
        for n in [0usize, 1, 2, 3, 7, 100, 1000] {
            let mut v: Vec<u32> = (0..n)
                .map(|_| {
                    seed = seed.wrapping_mul(1_103_515_245).wrapping_add(12345);
                    (seed >> 16) % 64
                })
                .collect();
            let mut want = v.clone();
            want.sort();
            want.dedup();
            sort_dedup(&mut v);
            assert_eq!(v, want, "n = {n}");
        }
    }

    #[test]
    fn names_and_numbers() {
        assert_eq!(digits("65534"), Some(65534));
        assert_eq!(digits("6553x"), None);
        assert_eq!(digits(""), None);
        assert_eq!(digits("99999999999"), None);
        assert_eq!(truncate("héllo", 2), "h");
        assert_eq!(truncate("abc", 15), "abc");
    }

    #[test]
    fn unknown_names_are_invalid() {
        let o = Options {
            user: Some("no-such-user-forkcluster".into()),
            ids_fn: Some(Options::resolve_ids),
            ..Options::default()
        };
        assert!(matches!(o.resolve(), Err(Error::Invalid(_))));
        let o = Options {
            group: Some("no-such-group-forkcluster".into()),
            ids_fn: Some(Options::resolve_ids),
            ..Options::default()
        };
        assert!(matches!(o.resolve(), Err(Error::Invalid(_))));
        let o = Options {
            affinity: Some(Affinity::List(Vec::new())),
            ..Options::default()
        };
        assert!(matches!(o.resolve(), Err(Error::Invalid(_))));
        let o = Options {
            affinity: Some(Affinity::List(vec![CpuSet::MAX_CPU])),
            ..Options::default()
        };
        assert!(matches!(o.resolve(), Err(Error::Invalid(_))));
    }
}
